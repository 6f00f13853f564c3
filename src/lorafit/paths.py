"""Where a command may write: never onto, over or inside what it reads, never under a file.

Every command that writes (``train``, ``merge``, ``sweep``, ``report``) calls
:func:`check_output` before it loads anything, so a bad output path is refused while nothing has
been removed or written yet; ``bench`` calls :func:`check_writable_file` on its files before it
measures.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from lorafit.errors import LorafitError


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _related(output: Path, source: Path) -> str | None:
    """How ``output`` overlaps ``source``, or None when they are apart."""
    if output == source:
        return "is"
    if output in source.parents:
        return "contains"
    if source in output.parents:
        return "lies inside"
    return None


def check_output(flag: str, output: str | Path, inputs: Iterable[tuple[str, str | Path | None]] = (),
                 allow_inside: bool = False) -> None:
    """Refuse an output path that overlaps an input or cannot be a folder.

    Args:
        flag: How the user gave the output (``--output``, ``--output-dir``), for the message.
        output: The folder the command will write.
        inputs: ``(flag, path)`` of every file or folder the command reads; ``None`` paths skipped.
        allow_inside: Allow ``output`` inside an input folder (a report written into ``RUN/report``
            adds files of its own and removes none of the run's).

    Raises:
        LorafitError: naming the output and the input it overlaps, or why it cannot be written.
    """
    out = _resolved(output)
    for source_flag, source in inputs:
        if source is None or not Path(source).expanduser().exists():
            continue
        relation = _related(out, _resolved(source))
        if relation and not (relation == "lies inside" and allow_inside):
            raise LorafitError(
                f"{flag} {output}: {relation} the input {source_flag} {source}; "
                "write the output somewhere else (nothing was changed)"
            )
    check_writable(flag, output)


def check_writable_file(flag: str, output: str | Path) -> None:
    """Refuse a file output that is a folder or whose folder cannot be made or written."""
    if Path(output).expanduser().is_dir():
        raise LorafitError(f"{flag} {output}: is a directory; give the path of a file")
    check_writable(f"{flag} {output}: its folder", Path(output).expanduser().parent)


def check_writable(flag: str, output: str | Path) -> None:
    """Refuse an output that is a file, lies under a file, or on a read-only/unwritable place."""
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise LorafitError(f"{flag} {output}: exists and is not a directory")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise LorafitError(f"{flag} {output}: {existing} is a file, so no folder can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LorafitError(f"{flag} {output}: {existing} is not writable (read-only file system or permissions)")
