"""A dependency-free progress bar on stderr, for every job that takes more than a moment.

Training, evaluation and bundle export run for minutes to days; someone watching a terminal
must see that they move and how fast. On a terminal the bar redraws in place; when stderr is a
file or pipe (a log under systemd, a CI job) it prints a plain line at most every
``min_interval_s`` so logs stay readable. ``enabled=False`` silences it (tests, non-zero ranks).
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

__all__ = ["Progress"]


def _fmt_time(s: float) -> str:
    s = max(0, int(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Progress:
    """``with Progress(total, "train") as bar: bar.update(1, loss=0.3)``."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        min_interval_s: float = 0.2,
        unit: str = "it",
        initial: int = 0,
    ) -> None:
        self.total = total
        self.desc = desc
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval_s = min_interval_s if self.tty else max(min_interval_s, 10.0)
        self.unit = unit
        self.n = initial
        self.start_n = initial
        self.t0 = time.monotonic()
        self._last = 0.0
        self._drawn = -1
        self.postfix: dict[str, str] = {}

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def update(self, n: int = 1, **postfix: float | int | str) -> None:
        self.n += n
        for k, v in postfix.items():
            self.postfix[k] = f"{v:.4g}" if isinstance(v, float) else str(v)
        now = time.monotonic()
        done = self.total is not None and self.n >= self.total
        if now - self._last >= self.min_interval_s or done:
            self._last = now
            self._draw(now)

    def _line(self, now: float) -> str:
        elapsed = now - self.t0
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        parts = [self.desc]
        if self.total:
            frac = min(self.n / self.total, 1.0)
            width = 24
            fill = int(frac * width)
            parts.append(f"{frac * 100:5.1f}% |{'#' * fill}{'.' * (width - fill)}|")
            parts.append(f"{self.n}/{self.total}")
            eta = (self.total - self.n) / rate if rate > 0 else float("nan")
            tail = _fmt_time(eta) if eta == eta else "?"
            parts.append(f"[{_fmt_time(elapsed)}<{tail}, {rate:.3g} {self.unit}/s]")
        else:
            parts.append(f"{self.n} [{_fmt_time(elapsed)}, {rate:.3g} {self.unit}/s]")
        if self.postfix:
            parts.append(" ".join(f"{k}={v}" for k, v in self.postfix.items()))
        return " ".join(parts)

    def _draw(self, now: float) -> None:
        if not self.enabled:
            return
        line = self._line(now)
        self._drawn = self.n
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def write(self, message: str) -> None:
        """A message that does not break the bar."""
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\x1b[K" + message + "\n")
            self._draw(time.monotonic())
        else:
            self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._drawn != self.n:
            self._draw(time.monotonic())
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()
        self.enabled = False
