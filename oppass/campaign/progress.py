"""Progress of a campaign on stderr: a redrawn bar on a terminal, a line every PIPE_INTERVAL seconds otherwise.

Both show trials stored out of the campaign's total (on resume, counting those stored before
this run), the rate of this run and the ETA. A background thread draws them, so a line comes
even while a slow task keeps every worker busy.
"""

from __future__ import annotations

import threading
import time
from typing import TextIO

PIPE_INTERVAL = 10.0
TTY_INTERVAL = 1.0
_WIDTH = 30


class Progress:
    """Counts stored trials out of `total`, `already` of them stored before this run; silent if `stream` is None."""

    def __init__(self, total: int, already: int, stream: TextIO | None, interval: float | None = None) -> None:
        self.total = total
        self.already = already
        self.done = already
        self.stream = stream
        self.tty = stream is not None and stream.isatty()
        self.interval = interval if interval is not None else TTY_INTERVAL if self.tty else PIPE_INTERVAL
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if stream is None:
            return
        before = f", {already} already stored" if already else ""
        self._write(f"campaign: {total} trials{before}, {total - already} to run")
        if total > already:
            self._thread = threading.Thread(target=self._tick_every_interval, daemon=True, name="oppass-progress")
            self._thread.start()

    def advance(self, count: int) -> None:
        """Counts `count` more stored trials (and redraws the bar on a terminal)."""
        with self._lock:
            self.done += count
        if self.tty:
            self.tick()

    def tick(self) -> None:
        """Draws the current state: the bar on a terminal, a line otherwise."""
        if self.stream is not None:
            self._write(self.line(), redraw=self.tty)

    def line(self) -> str:
        """E.g. `[#####-----] 420/1200 trials (300 before this run)  35.2/s  ETA 0:00:08`."""
        with self._lock:
            done = self.done
        elapsed = time.monotonic() - self.started
        rate = (done - self.already) / elapsed if elapsed > 0 else 0.0
        eta = _clock((self.total - done) / rate) if rate > 0 else "--:--:--"
        before = f" ({self.already} before this run)" if self.already else ""
        text = f"{done}/{self.total} trials{before}  {rate:.1f}/s  ETA {eta}"
        if not self.tty:
            return f"campaign: {text}"
        filled = _WIDTH * done // max(self.total, 1)
        return f"[{'#' * filled}{'-' * (_WIDTH - filled)}] {text}"

    def close(self) -> None:
        """Stops the drawing thread and writes the final state."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.tick()
            if self.tty:
                self._write("")

    def _tick_every_interval(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()

    def _write(self, text: str, redraw: bool = False) -> None:
        assert self.stream is not None
        try:
            self.stream.write(("\r" + text) if redraw else text + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream must not stop the campaign
            pass


def _clock(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"
