"""Progress of long jobs on stderr: a bar on a terminal, a line every 10% in a log."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total = max(total, 0)
        self.label = label
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self._tty = self.stream.isatty()
        self._last_decile = -1

    def __call__(self, done: int, total: int | None = None) -> None:
        total = self.total if total is None else total
        elapsed = time.monotonic() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        text = f"{self.label} {done}/{total} {rate:.2f}/s eta {eta:.0f}s"
        if self._tty:
            width = 30
            filled = int(width * done / total) if total else width
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r{self.label} [{bar}] {done}/{total} {rate:.2f}/s eta {eta:.0f}s")
            if done >= total:
                self.stream.write("\n")
        else:
            decile = int(10 * done / total) if total else 10
            if decile != self._last_decile:
                self._last_decile = decile
                self.stream.write(text + "\n")
        self.stream.flush()
