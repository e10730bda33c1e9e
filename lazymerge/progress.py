"""The one progress bar, for merges (bytes) and scoring (pairs, texts): stderr, terminal only."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressBar:
    """`merging ████░░░░  45% 1.20/2.70 GB 0.91 GB/s ETA 0:00:12`, redrawn at most 10 times a second.

    `unit` "bytes" shows sizes; any other unit shows counts (`scoring ... 120/400 pairs 3.1 pairs/s`),
    with `per` counted items making one shown unit (2 texts per pair).
    """

    def __init__(
        self,
        total: int,
        label: str = "merging",
        enabled: bool | None = None,
        stream: TextIO | None = None,
        unit: str = "bytes",
        per: float = 1.0,
    ):
        self.unit, self.per = unit, per
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = max(total, 1)
        self.label = label
        self.done = 0
        self._start = time.monotonic()
        self._last = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last >= 0.1 or self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        frac = min(self.done / self.total, 1.0)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        width = 24
        filled = int(frac * width)
        bar = "█" * filled + "░" * (width - filled)
        if self.unit == "bytes":
            amount = f"{format_bytes(self.done)}/{format_bytes(self.total)} {format_bytes(rate)}/s"
        else:
            done, total, shown_rate = self.done / self.per, self.total / self.per, rate / self.per
            amount = f"{done:.0f}/{total:.0f} {self.unit} {shown_rate:.1f} {self.unit}/s"
        self.stream.write(f"\r{self.label} {bar} {frac * 100:3.0f}% {amount} ETA {format_duration(eta)} ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
