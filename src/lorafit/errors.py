"""The one exception type a user of the CLI is meant to see.

Anything raised as :class:`LorafitError` is bad input (a flag, a file, a config field). The CLI
prints its message on one line and exits with code 2; every other exception is a bug and keeps
its traceback.
"""


class LorafitError(Exception):
    """Bad input, with a message that names the file, field or flag and what was expected."""
