"""Small charts drawn with Pillow: loss curves, ROC curves, localization errors.

The project has Pillow and no plotting library; these charts only have to be legible in a
report or a pull request (axes, ticks, a legend), not publication-ready, and drawing them with
Pillow keeps matplotlib out of the dependencies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

__all__ = ["PALETTE", "Series", "bar_chart", "line_chart", "scatter_chart"]

PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)

_W, _H = 900, 600
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 230, 40, 50


@dataclass(frozen=True)
class Series:
    name: str
    x: npt.ArrayLike
    y: npt.ArrayLike


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    out = []
    v = start
    while v <= hi + 1e-9 * step:
        out.append(round(v, 10))
        v += step
    return out


def _log_ticks(lo: float, hi: float) -> list[float]:
    """log10 positions of 1, 2, 5 x 10^k inside [lo, hi] (log10 units)."""
    out = []
    for k in range(math.floor(lo), math.ceil(hi) + 1):
        for m in (1.0, 2.0, 5.0):
            v = k + math.log10(m)
            if lo <= v <= hi:
                out.append(v)
    return out or [lo]


class _Canvas:
    def __init__(
        self,
        title: str,
        xlabel: str,
        ylabel: str,
        xlim: tuple[float, float],
        ylim: tuple[float, float],
        *,
        log_y: bool = False,
    ) -> None:
        self.img = Image.new("RGB", (_W, _H), "white")
        self.d = ImageDraw.Draw(self.img)
        self.font = _font()
        self.xlim = xlim
        self.log_y = log_y
        self.ylim = (math.log10(ylim[0]), math.log10(ylim[1])) if log_y else ylim
        self.x0, self.x1 = _LEFT, _W - _RIGHT
        self.y0, self.y1 = _H - _BOTTOM, _TOP
        d = self.d
        d.rectangle((self.x0, self.y1, self.x1, self.y0), outline="black")
        d.text((_LEFT, 10), title, fill="black", font=self.font)
        d.text(((self.x0 + self.x1) // 2 - 3 * len(xlabel), _H - 20), xlabel, fill="black",
               font=self.font)
        d.text((5, self.y1 - 25), ylabel, fill="black", font=self.font)
        for t in _ticks(*xlim) if xlabel else []:
            px = self.px(t)
            d.line((px, self.y0, px, self.y0 + 5), fill="black")
            d.line((px, self.y1, px, self.y0), fill=(235, 235, 235))
            d.text((px - 10, self.y0 + 8), f"{t:g}", fill="black", font=self.font)
        for t in _log_ticks(*self.ylim) if log_y else _ticks(*self.ylim):
            py = self.py_raw(t)
            d.line((self.x0 - 5, py, self.x0, py), fill="black")
            d.line((self.x0, py, self.x1, py), fill=(235, 235, 235))
            label = f"{10**t:.3g}" if log_y else f"{t:g}"
            d.text((5, py - 6), label, fill="black", font=self.font)
        d.rectangle((self.x0, self.y1, self.x1, self.y0), outline="black")
        self.legend_y = _TOP

    def px(self, x: float) -> float:
        lo, hi = self.xlim
        return self.x0 + (x - lo) / (hi - lo or 1.0) * (self.x1 - self.x0)

    def py_raw(self, y: float) -> float:
        lo, hi = self.ylim
        return self.y0 - (y - lo) / (hi - lo or 1.0) * (self.y0 - self.y1)

    def py(self, y: float) -> float:
        if self.log_y:
            y = math.log10(max(y, 10 ** self.ylim[0]))
        return self.py_raw(y)

    def legend(self, name: str, color: tuple[int, int, int]) -> None:
        x = self.x1 + 10
        self.d.line((x, self.legend_y + 6, x + 20, self.legend_y + 6), fill=color, width=3)
        self.d.text((x + 25, self.legend_y), name[:30], fill="black", font=self.font)
        self.legend_y += 16

    def save(self, path: str | Path) -> None:
        self.img.save(Path(path))


def _finite(values: npt.ArrayLike) -> npt.NDArray[np.float64]:
    a = np.asarray(values, dtype=np.float64)
    return a[np.isfinite(a)]


def line_chart(
    path: str | Path,
    series: Sequence[Series],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    xlim: tuple[float, float] | None = None,
    ylim: tuple[float, float] | None = None,
    log_y: bool = False,
    diagonal: bool = False,
) -> None:
    """One line per series (NaNs break nothing, they are skipped)."""
    xs = np.concatenate([_finite(s.x) for s in series]) if series else np.zeros(1)
    ys = np.concatenate([_finite(s.y) for s in series]) if series else np.zeros(1)
    if log_y:
        ys = ys[ys > 0]
    if xlim is None:
        xlim = (float(xs.min()), float(xs.max())) if xs.size else (0.0, 1.0)
        if xlim[1] <= xlim[0]:
            xlim = (xlim[0], xlim[0] + 1.0)
    if ylim is None:
        if ys.size:
            lo, hi = float(ys.min()), float(ys.max())
        else:
            lo, hi = (1.0, 10.0) if log_y else (0.0, 1.0)
        if hi <= lo:
            hi = lo * 10 if log_y else lo + 1.0
        pad = 0.0 if log_y else 0.05 * (hi - lo)
        ylim = (lo - pad, hi + pad)
    c = _Canvas(title, xlabel, ylabel, xlim, ylim, log_y=log_y)
    if diagonal:
        c.d.line((c.px(xlim[0]), c.py(ylim[0]), c.px(xlim[1]), c.py(ylim[1])),
                 fill=(180, 180, 180), width=1)
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        x = np.asarray(s.x, dtype=np.float64)
        y = np.asarray(s.y, dtype=np.float64)
        ok = np.isfinite(x) & np.isfinite(y)
        if log_y:
            ok &= y > 0
        pts = [(c.px(float(a)), c.py(float(b))) for a, b in zip(x[ok], y[ok], strict=True)]
        if len(pts) >= 2:
            c.d.line(pts, fill=color, width=2)
        elif pts:
            px, py = pts[0]
            c.d.ellipse((px - 2, py - 2, px + 2, py + 2), fill=color)
        c.legend(s.name, color)
    c.save(path)


def scatter_chart(
    path: str | Path,
    series: Sequence[Series],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    lim: tuple[float, float],
    jitter: float = 0.0,
    seed: int = 0,
) -> None:
    """Points on a square range with the identity line (predicted vs cited depth)."""
    c = _Canvas(title, xlabel, ylabel, lim, lim)
    c.d.line((c.px(lim[0]), c.py(lim[0]), c.px(lim[1]), c.py(lim[1])), fill=(150, 150, 150))
    rng = np.random.default_rng(seed)
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        x = np.asarray(s.x, dtype=np.float64)
        y = np.asarray(s.y, dtype=np.float64)
        jx = rng.uniform(-jitter, jitter, x.shape) if jitter else 0.0
        jy = rng.uniform(-jitter, jitter, y.shape) if jitter else 0.0
        for a, b in zip(x + jx, y + jy, strict=True):
            px, py = c.px(float(a)), c.py(float(b))
            c.d.ellipse((px - 2, py - 2, px + 2, py + 2), outline=color)
        c.legend(s.name, color)
    c.save(path)


def bar_chart(
    path: str | Path,
    bars: Mapping[str, tuple[float, float, float]],
    *,
    title: str,
    ylabel: str,
) -> None:
    """Bars with 95% interval whiskers: ``name -> (value, lo, hi)``."""
    names = list(bars)
    vals = [v for trip in bars.values() for v in trip if math.isfinite(v)]
    hi = max(vals) * 1.1 if vals else 1.0
    c = _Canvas(title, "", ylabel, (0.0, float(len(names))), (0.0, hi or 1.0))
    for i, name in enumerate(names):
        v, lo_ci, hi_ci = bars[name]
        color = PALETTE[i % len(PALETTE)]
        if math.isfinite(v):
            c.d.rectangle((c.px(i + 0.2), c.py(v), c.px(i + 0.8), c.py(0.0)), fill=color)
        if math.isfinite(lo_ci) and math.isfinite(hi_ci):
            mid = c.px(i + 0.5)
            c.d.line((mid, c.py(lo_ci), mid, c.py(hi_ci)), fill="black", width=2)
            for y in (lo_ci, hi_ci):
                c.d.line((mid - 6, c.py(y), mid + 6, c.py(y)), fill="black", width=2)
        c.d.text((c.px(i + 0.2), c.y0 + 8), name[:16], fill="black", font=c.font)
        c.legend(f"{name}: {v:.1f}", color)
    c.save(path)
