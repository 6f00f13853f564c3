"""The exception and the warning a user of the CLI is meant to see.

Anything raised as :class:`LorafitError` is bad input (a flag, a file, a config field). The CLI
prints its message on one line and exits with code 2; every other exception is a bug and keeps
its traceback. A :class:`LorafitWarning` is printed on one line too, and the command goes on.
A reader of the CLI's output that stops early (``| head``) is not an error at all.
"""

import os
import sys
import warnings


class LorafitError(Exception):
    """Bad input, with a message that names the file, field or flag and what was expected."""


class LorafitWarning(UserWarning):
    """Something a user should know that does not stop the command: a slow setting, a fallback.

    The CLI prints it as one line, ``lorafit: warning: ...`` (:func:`show_warnings_on_one_line`);
    a caller of the library filters it as any other warning.
    """


def show_warnings_on_one_line() -> None:
    """Print each :class:`LorafitWarning` as one line on stderr, as the CLI prints its errors.

    Other warnings keep Python's own format: they come from the libraries lorafit calls.
    """
    shown = warnings.showwarning
    if getattr(shown, "lorafit", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):  # warnings.showwarning's signature
        if issubclass(category, LorafitWarning):
            print(f"lorafit: warning: {one_line(str(message))}", file=file or sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    show.lorafit = True
    warnings.showwarning = show


def one_line(text: str) -> str:
    """``text`` with its line breaks and runs of spaces as single spaces."""
    return " ".join(text.split())


def stdout_reader_gone() -> bool:
    """Whether stdout's reader has gone (``lorafit bench --from ... | head``); if so, stdout is
    pointed at /dev/null, so that Python's own flush at exit has nothing to complain about. A
    broken pipe of anything else (a worker's) leaves stdout as it is, and is reported."""
    import select

    try:  # a pipe whose reader has closed polls as an error (not on Windows: reported there)
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        gone = any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return False
    if gone:
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    return gone
