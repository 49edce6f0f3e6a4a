"""Progress of long loops (sampling, scoring, bits/dim): items done, rate, time left.

One line per task, once it has run for ``quiet_for`` seconds (quick work says nothing).
On a terminal it is redrawn in place; into a file or a pipe a line is written at most
every ``every`` seconds and once at the end, so logs stay short::

    sampling  250/1,000 images  36.1 images/s  ETA 21 s
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO


def format_seconds(seconds: float) -> str:
    """``7 s``, ``2 min 05 s``, ``1 h 03 min``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """``add(n)`` after each batch; ``total`` items of ``unit``; ``label`` names the task.

    While running, the rate counts from the end of the first batch (which includes
    compilation and would skew the time left); with one batch done it is the overall
    rate, as it is in the final line."""

    def __init__(self, total: int, label: str, unit: str = "images",
                 stream: Optional[TextIO] = None, every: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, quiet_for: float = 2.0):
        self.total, self.label, self.unit = int(total), label, unit
        self.stream = stream if stream is not None else sys.stdout
        self.every, self.clock, self.quiet_for = float(every), clock, float(quiet_for)
        self.done = 0
        self.began = clock()
        self._first: Optional[tuple] = None  # (time, items) after the first batch
        self._last_line = -float("inf")
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._width = 0  # of the line on screen, so a shorter one overwrites it fully
        self._said = False

    def rate(self) -> float:
        """Items per second (0 before the first batch)."""
        now = self.clock()
        if self._first is not None and self.done > self._first[1] and now > self._first[0]:
            return (self.done - self._first[1]) / (now - self._first[0])
        return self.done / (now - self.began) if now > self.began else 0.0

    def line(self) -> str:
        """While running: the rate since the first batch and the time left; at the end:
        the overall rate and the time taken."""
        elapsed = self.clock() - self.began
        finished = self.done >= self.total
        rate = self.done / elapsed if finished and elapsed > 0 else self.rate()
        shown = f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"
        text = f"{self.label}  {self.done:,}/{self.total:,} {self.unit}  {shown} {self.unit}/s"
        if finished:
            return text + f"  took {format_seconds(elapsed)}"
        if rate > 0:
            text += f"  ETA {format_seconds((self.total - self.done) / rate)}"
        return text

    def add(self, n: int) -> None:
        self.done = min(self.total, self.done + int(n))
        now = self.clock()
        if self._first is None:
            self._first = (now, self.done)
        finished = self.done >= self.total
        if not self._said and now - self.began < self.quiet_for:
            return  # work shorter than quiet_for seconds says nothing
        if self._tty:
            text = self.line()
            self.stream.write("\r" + text.ljust(self._width) + ("\n" if finished else ""))
            self._width, self._said = len(text), True
        elif finished or now - self._last_line >= self.every:
            self.stream.write(self.line() + "\n")
            self._last_line, self._said = now, True
        self.stream.flush()
