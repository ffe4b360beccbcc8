"""Errors that oppass reports to users as one line."""


class OppassError(Exception):
    """A user mistake or an unusable input: the CLI prints it as one line and exits non-zero."""


class CampaignInterrupted(KeyboardInterrupt):
    """The campaign stopped on KeyboardInterrupt with `stored` of its `total` trials in its store."""

    def __init__(self, stored: int, total: int) -> None:
        super().__init__(f"interrupted: {stored} of {total} trials stored; run the same command to resume")
        self.stored = stored
        self.total = total


class Interrupted(BaseException):
    """A catchable signal (SIGINT, SIGTERM, SIGHUP) stopped oppass; what it was writing is removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
