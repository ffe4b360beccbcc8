"""Errors that oppass reports to users as one line."""


class OppassError(Exception):
    """A user mistake or an unusable input: the CLI prints it as one line and exits non-zero."""
