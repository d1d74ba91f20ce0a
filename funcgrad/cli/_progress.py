"""A progress bar for training: one line redrawn in place on a terminal, a few lines otherwise.

The line shows the step, the latest loss (``.4g``: an MSE of 3e-05 reads as such, not as 0.0000), accuracy
and learning rate, the *recent* rate (steps per second over the last few seconds, so compilation and a slow
start do not distort it) and the estimated time left at that rate.
"""

from __future__ import annotations

import collections
import math
import sys
import time
from typing import TextIO

RECENT_SECONDS = 10.0  # the rate is measured over about this much of the latest progress


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    def __init__(self, total: int, start: int = 0, stream: TextIO | None = None, width: int = 28, enabled: bool = True,
                 clock=time.perf_counter):
        self.total, self.start, self.width, self.enabled = total, start, width, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.clock = clock
        self.history: collections.deque[tuple[float, int]] = collections.deque([(clock(), start)])
        self.warmup = True  # the first point (before compiling) is still in the history
        self.next_line = start  # without a terminal: a line every 10% of the run
        self.last = ""

    def rate(self) -> float:
        """Steps per second over the recent history (about :data:`RECENT_SECONDS`)."""
        (t0, s0), (t1, s1) = self.history[0], self.history[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0

    def line(self, step: int, metrics: dict[str, float]) -> str:
        now = self.clock()
        self.history.append((now, step))
        if self.warmup and len(self.history) > 2:  # the start (compilation) is left out once steps were timed
            self.history.popleft()
            self.warmup = False
        while len(self.history) > 2 and now - self.history[1][0] >= RECENT_SECONDS:
            self.history.popleft()
        frac = step / self.total if self.total else 1.0
        filled = int(self.width * frac)
        bar = "=" * filled + (">" if filled < self.width else "") + " " * max(0, self.width - filled - 1)
        parts = [f"step {step:>{len(str(self.total))}}/{self.total} [{bar}]"]
        for key, label, fmt in (("loss", "loss", ".4g"), ("accuracy", "acc", ".3f"), ("lr", "lr", ".4g")):
            if key in metrics:
                parts.append(f"{label} {metrics[key]:{fmt}}")
        rate = self.rate()
        parts.append(f"{rate:,.0f} steps/s" if rate >= 10 else f"{rate:.2f} steps/s")
        left = self.total - step
        if left > 0:
            parts.append(f"ETA {format_duration(left / rate) if rate > 0 else '?'}")
        return "  ".join(parts)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = self.line(step, metrics)
        if self.tty:
            self.stream.write("\r" + line + " " * max(0, len(self.last) - len(line)))
            self.stream.flush()
        elif step >= self.next_line or step >= self.total:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.next_line = step + max(1, self.total // 10)
        self.last = line

    def close(self) -> None:
        if self.tty and self.last:
            self.stream.write("\n")
            self.stream.flush()
            self.last = ""
