"""Small file helpers: every file lorafit writes lands whole or not at all.

A failed write (a full disk, a file-size limit, a read-only file system) raises a
:class:`LorafitError` naming the file, and leaves the previous file or folder as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorafit.errors import LorafitError


def os_error(path: str | Path, error: OSError, doing: str = "could not write") -> LorafitError:
    """One line for an OSError on ``path``: what failed and why (``No space left on device``, ...)."""
    reason = error.strerror or str(error) or type(error).__name__
    return LorafitError(f"{path}: {doing} ({reason})")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it into place.

    A crash or a full disk leaves the old file (or none), never a truncated one.

    Raises:
        LorafitError: if the file cannot be written; the old file is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise os_error(path, e) from e
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise os_error(path, e) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def append_line(path: str | Path, line: str) -> None:
    """Add one line to a small text file by rewriting it atomically (never a half line)."""
    path = Path(path)
    try:
        old = path.read_bytes() if path.exists() else b""
    except OSError as e:
        raise os_error(path, e, "could not read") from e
    atomic_write_bytes(path, old + line.rstrip("\n").encode() + b"\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``path`` and swap it in whole on success.

    Yields the temporary folder to write into. On any error it is removed and ``path`` keeps its
    old content; a crash between the two renames leaves ``<path>.old`` beside it, which
    :func:`recover_dir` puts back.

    Raises:
        LorafitError: if writing fails for lack of space or permission (names ``path``).
    """
    path = Path(path)
    new, old = path.with_name(path.name + ".new"), path.with_name(path.name + ".old")
    try:
        if new.exists():
            shutil.rmtree(new)
        new.mkdir(parents=True)
    except OSError as e:
        raise os_error(path, e) from e
    try:
        yield new
        _fsync_tree(new)
        if path.exists():
            if old.exists():
                shutil.rmtree(old)
            path.rename(old)
        new.rename(path)
    except BaseException as e:
        shutil.rmtree(new, ignore_errors=True)
        if old.exists() and not path.exists():
            old.rename(path)
        if isinstance(e, OSError):
            raise os_error(path, e) from e
        if _is_write_error(e):
            raise LorafitError(f"{path}: could not write ({e}); the previous content is kept") from e
        raise
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(path: str | Path) -> None:
    """Put back ``<path>.old`` left by a crash between :func:`atomic_dir`'s two renames."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if old.is_dir() and not path.exists():
        old.rename(path)


def _fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def _is_write_error(error: BaseException) -> bool:
    """Libraries that write files (safetensors, torch.save) report I/O failures in their own types."""
    from safetensors import SafetensorError

    if isinstance(error, SafetensorError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("write" in text or "file too large" in text or "space" in text)


def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file, with a missing, unreadable or non-UTF-8 file as a LorafitError."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LorafitError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise LorafitError(f"{path}: is a directory, expected a {what}") from None
    except UnicodeDecodeError as e:
        raise LorafitError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise os_error(path, e, "could not read") from None


def read_json(path: str | Path, what: str = "file") -> Any:
    """Read a JSON file, turning a missing or malformed file into a LorafitError."""
    path = Path(path)
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LorafitError(f"{path}: not valid JSON ({e})") from None


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping (a recipe, a grid), with clear errors."""
    import yaml

    text = read_text(path, what)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise LorafitError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise LorafitError(f"{path}: {what} must be a mapping of settings, got {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise LorafitError(f"{path}: {what} keys must be names, got {bad[0]!r}")
    return data
