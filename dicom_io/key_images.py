"""A PNG contact sheet of key slices, each captioned with the findings it shows.

The demo prints a findings table; this picture is what lets a person check at a glance that the
key image of "Pleural effusion" shows a pleural effusion. Pure rendering: the caller picks the
slices (HU arrays, rows top to bottom as displayed) and writes the captions.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

__all__ = ["LUNG_WINDOW", "MEDIASTINAL_WINDOW", "WIDE_WINDOW", "render_key_images", "window_to_u8"]

# (lowest, highest) HU shown. The wide default spans lung parenchyma and mediastinum, since
# the sheet mixes findings of both (nodules, effusions, calcifications).
WIDE_WINDOW: Final = (-1000.0, 400.0)
LUNG_WINDOW: Final = (-1350.0, 150.0)  # centre -600, width 1500
MEDIASTINAL_WINDOW: Final = (-160.0, 240.0)  # centre 40, width 400

_TILE: Final = 256  # longest side of one slice on the sheet, in pixels
_COLUMNS: Final = 3
_PAD: Final = 8
_FONT_SIZE: Final = 13
_CAPTION_LINES: Final = 4


def window_to_u8(hu: npt.ArrayLike, window: tuple[float, float]) -> npt.NDArray[np.uint8]:
    """Map HU linearly so ``window[0]`` is black and ``window[1]`` white; clip outside."""
    low, high = (float(window[0]), float(window[1]))
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise ValueError(f"window must be (low, high) HU with high > low, got {window}")
    arr = np.asarray(hu, dtype=np.float32)
    scaled = (arr - low) * (255.0 / (high - low))
    out: npt.NDArray[np.uint8] = np.clip(np.nan_to_num(scaled, nan=0.0), 0, 255).astype(np.uint8)
    return out


def _tile(hu: npt.ArrayLike, window: tuple[float, float]) -> Image.Image:
    arr = np.asarray(hu)
    if arr.ndim != 2 or 0 in arr.shape:
        raise ValueError(f"each key slice must be a non-empty 2-D HU array, got shape {arr.shape}")
    img = Image.fromarray(window_to_u8(arr, window), mode="L")
    scale = _TILE / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.BILINEAR)


def _caption_lines(text: str, width_px: int, font: ImageFont.FreeTypeFont) -> list[str]:
    """Greedy word wrap measured in pixels; an over-long caption ends in an ellipsis."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width_px:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > _CAPTION_LINES:
        last = lines[_CAPTION_LINES - 1]
        while last and font.getlength(last + "...") > width_px:
            last = last[:-1]
        lines = [*lines[: _CAPTION_LINES - 1], last + "..."]
    return lines


def render_key_images(
    slices: Sequence[tuple[npt.ArrayLike, str]],
    out_png: Path,
    window: tuple[float, float] = WIDE_WINDOW,
) -> Path:
    """Write a grid of the key slices (``(hu_2d, caption)`` each) to ``out_png``; return it.

    Written to a temporary file and renamed, so a reader never sees half a PNG.
    """
    if not slices:
        raise ValueError("no key slices to render")
    font = ImageFont.load_default(size=_FONT_SIZE)
    if not isinstance(font, ImageFont.FreeTypeFont):  # Pillow without FreeType: bitmap font
        raise RuntimeError("Pillow was built without FreeType; captions cannot be drawn")
    tiles = [_tile(hu, window) for hu, _ in slices]
    line_h = _FONT_SIZE + 4
    cap_h = _CAPTION_LINES * line_h + _PAD
    cols = min(_COLUMNS, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    cell_w, cell_h = _TILE + _PAD, _TILE + cap_h + _PAD
    sheet = Image.new("L", (cols * cell_w + _PAD, rows * cell_h + _PAD), color=0)
    draw = ImageDraw.Draw(sheet)
    for n, (tile, (_, caption)) in enumerate(zip(tiles, slices, strict=True)):
        x0 = _PAD + (n % cols) * cell_w
        y0 = _PAD + (n // cols) * cell_h
        sheet.paste(tile, (x0 + (_TILE - tile.width) // 2, y0 + (_TILE - tile.height) // 2))
        for k, line in enumerate(_caption_lines(caption, _TILE, font)):
            draw.text((x0, y0 + _TILE + _PAD // 2 + k * line_h), line, fill=255, font=font)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    try:
        sheet.save(tmp, format="PNG")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
