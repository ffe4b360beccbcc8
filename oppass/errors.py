"""Errors that oppass reports to users as one line."""


class OppassError(Exception):
    """A user mistake or an unusable input: the CLI prints it as one line and exits non-zero."""


class Interrupted(BaseException):
    """A catchable signal (SIGINT, SIGTERM, SIGHUP) stopped oppass; what it was writing is removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
