"""A one-line progress bar with rate and ETA on stderr, drawn only when stderr is a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_WIDTH = 30


class Progress:
    """Counts finished trials out of `total`; silent unless `stream` is a TTY."""

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total = total
        self.done = 0
        self.stream = stream
        self.enabled = stream.isatty()
        self.started = time.monotonic()

    def advance(self, count: int) -> None:
        """Counts `count` more finished trials and redraws the bar."""
        self.done += count
        if self.enabled:
            self.stream.write("\r" + self.line())
            self.stream.flush()

    def line(self) -> str:
        """The bar, e.g. `[#####-----] 120/400 trials  35.2/s  ETA 0:00:08`."""
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        filled = _WIDTH * self.done // max(self.total, 1)
        eta = _clock((self.total - self.done) / rate) if rate > 0 else "--:--:--"
        return f"[{'#' * filled}{'-' * (_WIDTH - filled)}] {self.done}/{self.total} trials  {rate:.1f}/s  ETA {eta}"

    def close(self) -> None:
        """Ends the bar's line."""
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"
