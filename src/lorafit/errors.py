"""The exception and the warning a user of the CLI is meant to see.

Anything raised as :class:`LorafitError` is bad input (a flag, a file, a config field). The CLI
prints its message on one line and exits with code 2; every other exception is a bug and keeps
its traceback. A :class:`LorafitWarning` is printed on one line too, and the command goes on.
"""

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
            print(f"lorafit: warning: {' '.join(str(message).split())}", file=file or sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    show.lorafit = True
    warnings.showwarning = show
