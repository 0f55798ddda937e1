"""A contact sheet of a phantom, so that a person can judge its realism at a glance.

Each finding gets a panel at its key slice (the finding's centre z): the whole axial slice with
the finding's box, and a magnified view with the mask outlined, in the window a radiologist
would read it in. Two more panels show the anatomy without annotation: an axial mid slice (lung
and mediastinal windows) and a coronal and a sagittal reformat.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from engines.data.findings import Finding
from engines.data.phantoms import Phantom

__all__ = ["WINDOWS", "preview_montage"]

#: Display windows (low, high HU).
WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-1150.0, 250.0),
    "mediastinum": (-160.0, 240.0),
    "bone": (-450.0, 1550.0),
}

_WINDOW_OF: dict[str, str] = {
    "Medical material": "bone",
    "Arterial wall calcification": "mediastinum",
    "Cardiomegaly": "mediastinum",
    "Pericardial effusion": "mediastinum",
    "Coronary artery wall calcification": "mediastinum",
    "Hiatal hernia": "mediastinum",
    "Lymphadenopathy": "mediastinum",
    "Pleural effusion": "mediastinum",
}

_PANEL = 300  # pixels per view
_PAD = 6
_TEXT_H = 38


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _gray(img: npt.NDArray[np.float32], window: tuple[float, float]) -> npt.NDArray[np.uint8]:
    lo, hi = window
    out: npt.NDArray[np.uint8] = (
        np.clip((img - lo) / (hi - lo), 0.0, 1.0) * 255.0 + 0.5
    ).astype(np.uint8)
    return out


def _outline(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Boundary pixels of a 2D mask (the mask minus its 4-neighbour erosion)."""
    if not mask.any():
        return mask
    m = np.pad(mask, 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    out: npt.NDArray[np.bool_] = mask & ~inner
    return out


def _rgb(gray: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    out: npt.NDArray[np.uint8] = np.repeat(gray[:, :, None], 3, axis=2)
    return out


def _fit(img: Image.Image, aspect: float, size: int = _PANEL) -> Image.Image:
    """Resize to ``size`` wide keeping the physical aspect (height/width in mm)."""
    h = max(1, round(size * aspect))
    return img.resize((size, min(h, 2 * size)), Image.Resampling.BILINEAR)


def _finding_panel(ph: Phantom, f: Finding, window: tuple[float, float] | None) -> Image.Image:
    _, sy, sx = ph.spacing
    kz = f.center_voxel[0]
    name = _WINDOW_OF.get(f.label, "lung")
    win = window if window is not None else WINDOWS[name]
    sl = ph.hu[kz]
    ny, nx = sl.shape
    full = _rgb(_gray(sl, win))
    m2 = np.zeros((ny, nx), dtype=bool)
    z0, _, y0, y1, x0, x1 = f.bbox
    m2[y0:y1, x0:x1] = f.mask[kz - z0]
    edge = _outline(m2)
    # Magnified view: twice the lesion's extent on this slice, at least 50 mm.
    ys, xs = np.nonzero(m2)
    cy, cx = float(f.center_voxel[1]), float(f.center_voxel[2])
    near = (np.abs(ys - cy) * sy < 60.0) & (np.abs(xs - cx) * sx < 60.0)
    ys, xs = ys[near], xs[near]
    ext_mm = max(50.0, 2.2 * max((np.ptp(ys) + 1) * sy if ys.size else 0.0,
                                 (np.ptp(xs) + 1) * sx if xs.size else 0.0))
    ext_mm = min(ext_mm, max(ny * sy, nx * sx))
    hy, hx = round(ext_mm / sy / 2), round(ext_mm / sx / 2)
    cy0 = int(np.clip(round(cy) - hy, 0, max(0, ny - 2 * hy)))
    cx0 = int(np.clip(round(cx) - hx, 0, max(0, nx - 2 * hx)))
    crop = full[cy0:cy0 + 2 * hy, cx0:cx0 + 2 * hx].copy()
    e = edge[cy0:cy0 + 2 * hy, cx0:cx0 + 2 * hx]
    # Outline drawn beside the lesion, not on it: the lesion itself stays visible.
    ring = _outline(np.pad(e, 1)[:-2, 1:-1] | np.pad(e, 1)[2:, 1:-1] | e)
    crop_marked = crop.copy()
    crop_marked[ring & ~m2[cy0:cy0 + 2 * hy, cx0:cx0 + 2 * hx]] = (255, 60, 40)
    left = _fit(Image.fromarray(full), ny * sy / (nx * sx))
    draw = ImageDraw.Draw(left)
    scale = _PANEL / nx
    draw.rectangle([x0 * scale - 2, y0 * scale - 2, x1 * scale + 2, y1 * scale + 2],
                   outline=(255, 200, 0), width=1)
    zoom_plain = Image.fromarray(crop).resize((_PANEL // 2 * 2, _PANEL), Image.Resampling.NEAREST)
    zoom_mark = Image.fromarray(crop_marked).resize((_PANEL, _PANEL), Image.Resampling.NEAREST)
    zoom_plain = zoom_plain.resize((_PANEL, _PANEL))
    w = 3 * _PANEL + 4 * _PAD
    h = _TEXT_H + max(left.height, _PANEL) + 2 * _PAD
    panel = Image.new("RGB", (w, h), (18, 18, 22))
    panel.paste(left, (_PAD, _TEXT_H + _PAD))
    panel.paste(zoom_plain, (2 * _PAD + _PANEL, _TEXT_H + _PAD))
    panel.paste(zoom_mark, (3 * _PAD + 2 * _PANEL, _TEXT_H + _PAD))
    d = ImageDraw.Draw(panel)
    where = ", ".join(v for v in (f.side, f.lobe) if v)
    d.text((_PAD, 2), f"{f.label_index:2d} {f.label}", fill=(255, 220, 120), font=_font(16))
    d.text((_PAD, 20), f"{where}  size {f.size_mm:.1f} mm  z {f.z_extent[0]}-{f.z_extent[1]}"
           f" (key {kz})  {name} window  {_detail(f)}", fill=(200, 200, 200), font=_font(12))
    return panel


def _detail(f: Finding) -> str:
    for key in ("kind", "type", "grade", "severity", "pattern", "distribution", "zone"):
        if key in f.extra:
            return str(f.extra[key])
    return ""


def _anatomy_panels(ph: Phantom) -> Image.Image:
    sz, sy, sx = ph.spacing
    nz, ny, nx = ph.hu.shape
    lung_rows = np.flatnonzero(np.isin(ph.tissue, [7, 8]).any(axis=(1, 2)))
    kz = int(np.median(lung_rows)) if lung_rows.size else nz // 2
    sl = ph.hu[kz]
    a = _fit(Image.fromarray(_gray(sl, WINDOWS["lung"])), ny * sy / (nx * sx))
    b = _fit(Image.fromarray(_gray(sl, WINDOWS["mediastinum"])), ny * sy / (nx * sx))
    cor = ph.hu[::-1, ny // 2 - int(15 / sy), :]
    sag = ph.hu[::-1, :, nx // 2 + int(35 / sx)]
    c = _fit(Image.fromarray(_gray(cor, WINDOWS["lung"])), nz * sz / (nx * sx))
    s = _fit(Image.fromarray(_gray(sag, WINDOWS["lung"])), nz * sz / (ny * sy))
    w = 4 * _PANEL + 5 * _PAD
    h = _TEXT_H + max(a.height, c.height, s.height) + 2 * _PAD
    panel = Image.new("RGB", (w, h), (18, 18, 22))
    for i, im in enumerate((a, b, c, s)):
        panel.paste(im, (_PAD + i * (_PANEL + _PAD), _TEXT_H + _PAD))
    d = ImageDraw.Draw(panel)
    p = ph.patient
    d.text((_PAD, 2), f"anatomy: axial z={kz} (lung, mediastinal window), coronal, sagittal",
           fill=(255, 220, 120), font=_font(16))
    d.text((_PAD, 20), f"{p['sex']} {p['age']} y, CTR {p['ctr']:.2f}, noise "
           f"{p['noise_sigma_hu']:.0f} HU, blur {p['blur_mm']:.2f} mm, "
           f"{nz}x{ny}x{nx} @ {sz:g}x{sy:g}x{sx:g} mm, seed {ph.seed}",
           fill=(200, 200, 200), font=_font(12))
    return panel


def preview_montage(
    phantom: Phantom,
    out_png: Path,
    *,
    window: tuple[float, float] | None = None,
    columns: int = 2,
) -> Path:
    """Write a montage PNG of ``phantom`` to ``out_png`` and return the path.

    ``window`` forces one (low, high) HU window on every finding panel; by default each finding
    is shown in the window it is read in (lung, mediastinal or bone).
    """
    panels = [_anatomy_panels(phantom)]
    finding_panels = [_finding_panel(phantom, f, window) for f in phantom.findings]
    cols = max(1, columns)
    rows: list[Image.Image] = [panels[0]]
    for i in range(0, len(finding_panels), cols):
        group = finding_panels[i:i + cols]
        w = sum(p.width for p in group)
        h = max(p.height for p in group)
        row = Image.new("RGB", (w, h), (18, 18, 22))
        x = 0
        for p in group:
            row.paste(p, (x, 0))
            x += p.width
        rows.append(row)
    width = max(r.width for r in rows)
    height = sum(r.height for r in rows)
    sheet = Image.new("RGB", (width, height), (10, 10, 12))
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
