"""A progress bar for training: one line redrawn in place on a terminal, a few lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, start: int = 0, stream: TextIO | None = None, width: int = 28, enabled: bool = True):
        self.total, self.start, self.width, self.enabled = total, start, width, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.next_line = start  # without a terminal: a line every 10% of the run
        self.last = ""

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        frac = step / self.total if self.total else 1.0
        filled = int(self.width * frac)
        bar = "=" * filled + (">" if filled < self.width else "") + " " * max(0, self.width - filled - 1)
        elapsed = time.perf_counter() - self.t0
        rate = (step - self.start) / elapsed if elapsed > 0 else 0.0
        parts = [f"step {step:>{len(str(self.total))}}/{self.total} [{bar}]"]
        for key, fmt in (("loss", ".4f"), ("accuracy", ".3f"), ("lr", ".5f")):
            if key in metrics:
                parts.append(f"{'acc' if key == 'accuracy' else key} {metrics[key]:{fmt}}")
        parts.append(f"{rate:,.0f} steps/s")
        line = "  ".join(parts)
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
