"""Synthetic chest CT phantoms: anatomy, the 18 CT-RATE abnormalities, and their ground truth.

`generate_phantom` renders one patient's chest CT in HU at any size and spacing, from a
thin-section 512x512x300 study down to a model-resolution cube, with every finding's label, side,
lobe, size, extent and voxel mask. It is the data the model is trained, evaluated and grounded on
before (and beside) real studies, so three properties matter more than looks:

* Deterministic: the same seed gives a bit-identical volume. Anatomy, noise, label sampling and
  every finding draw from separate random streams, so the same seed *without* a finding is the
  same chest, and a finding's effect can be measured against it voxel by voxel.
* Honest: tissues have their real attenuation, lesions their real size range and partial volume;
  nothing is exaggerated to be easier to learn.
* Fast: vectorised numpy (no scipy); about a second for 512x512x300 on two cores, tens of
  milliseconds at model resolution, so thousands of volumes take minutes.

Array order is [z, y, x]; z index 0 is the most inferior slice. `Phantom.affine` maps a
homogeneous index (z, y, x, 1) to patient LPS millimetres (+x patient left, +y posterior, +z
superior), with the volume centred on the scanner isocentre as `dicom_io.synthetic` writes it.

`basic_chest_phantom` is the older plumbing phantom (ellipses, no findings), kept because
DICOM, spool and benchmark tests rely on its exact layout and speed.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from engines.data.anatomy import Anatomy, HeartSpec, Tissue
from engines.data.findings import (
    DRAW_ORDER,
    SPACE_OCCUPYING,
    Finding,
    Occupied,
    Plan,
    nothing_occupied,
    plan_finding,
)
from engines.data.labels import LABELS, label_index
from engines.data.raster import (
    Canvas,
    Grid,
    NoisePool,
    blur_volume,
    blur_z,
    paint_layers,
    parallel_slabs,
)

__all__ = [
    "CT_RATE_PREVALENCE",
    "DEFAULT_LINKS",
    "HU",
    "Finding",
    "Phantom",
    "PhantomConfig",
    "Tissue",
    "basic_chest_phantom",
    "cardiothoracic_ratio",
    "generate_phantom",
    "phantom_affine",
    "sample_labels",
]

#: Approximate share of CT-RATE studies carrying each label (from the dataset paper's label
#: distribution, rounded): the default prevalence of a sampled phantom.
CT_RATE_PREVALENCE: Final[Mapping[str, float]] = {
    "Medical material": 0.10,
    "Arterial wall calcification": 0.28,
    "Cardiomegaly": 0.10,
    "Pericardial effusion": 0.07,
    "Coronary artery wall calcification": 0.26,
    "Hiatal hernia": 0.14,
    "Lymphadenopathy": 0.26,
    "Emphysema": 0.19,
    "Atelectasis": 0.26,
    "Lung nodule": 0.45,
    "Lung opacity": 0.37,
    "Pulmonary fibrotic sequela": 0.27,
    "Pleural effusion": 0.12,
    "Mosaic attenuation pattern": 0.08,
    "Peribronchial thickening": 0.11,
    "Consolidation": 0.17,
    "Bronchiectasis": 0.10,
    "Interlobular septal thickening": 0.08,
}

#: Co-occurrence: (parent, child, lift). A child is ``lift`` times as likely when its parent is
#: present, and correspondingly less likely when it is absent, so its overall prevalence stays
#: what the configuration says.
DEFAULT_LINKS: Final[tuple[tuple[str, str, float], ...]] = (
    ("Cardiomegaly", "Pericardial effusion", 3.0),
    ("Arterial wall calcification", "Coronary artery wall calcification", 2.2),
    ("Emphysema", "Lung nodule", 1.3),
    ("Pleural effusion", "Atelectasis", 2.0),
    ("Lung opacity", "Consolidation", 1.8),
    ("Peribronchial thickening", "Bronchiectasis", 2.5),
    ("Pulmonary fibrotic sequela", "Interlobular septal thickening", 2.0),
)


@dataclass(frozen=True)
class PhantomConfig:
    """How phantoms are drawn when their labels are sampled rather than forced.

    ``prevalence`` may name only some labels; the others keep their CT-RATE value. Each label
    has at most one parent in ``links``. ``noise_sigma`` (HU) and ``blur_mm`` (Gaussian sigma of
    the reconstruction kernel) are drawn uniformly per patient. ``threads`` only changes speed.
    """

    prevalence: Mapping[str, float] = field(default_factory=lambda: dict(CT_RATE_PREVALENCE))
    links: tuple[tuple[str, str, float], ...] = DEFAULT_LINKS
    noise_sigma: tuple[float, float] = (10.0, 30.0)
    blur_mm: tuple[float, float] = (0.35, 0.9)
    threads: int | None = None

    def __post_init__(self) -> None:
        merged = dict(CT_RATE_PREVALENCE)
        for name, p in self.prevalence.items():
            label_index(name)
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"prevalence of {name!r} must be in [0, 1], got {p}")
            merged[name] = float(p)
        object.__setattr__(self, "prevalence", merged)
        children: set[str] = set()
        for parent, child, lift in self.links:
            label_index(parent)
            label_index(child)
            if child in children:
                raise ValueError(f"{child!r} has more than one parent in links")
            if parent == child or lift <= 0:
                raise ValueError(f"bad link {parent!r} -> {child!r} (lift {lift})")
            children.add(child)
        _link_order(self.links)  # rejects cycles
        lo, hi = self.noise_sigma
        if not 0.0 <= lo <= hi:
            raise ValueError(f"noise_sigma must be an increasing pair, got {self.noise_sigma}")
        lo, hi = self.blur_mm
        if not 0.0 <= lo <= hi:
            raise ValueError(f"blur_mm must be an increasing pair, got {self.blur_mm}")


def _link_order(links: Sequence[tuple[str, str, float]]) -> list[str]:
    """Labels in CT-RATE order, moved so that every parent comes before its child."""
    parent = {c: p for p, c, _ in links}
    out: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in out:
            return
        if name in visiting:
            raise ValueError(f"links form a cycle through {name!r}")
        visiting.add(name)
        if name in parent:
            visit(parent[name])
        visiting.discard(name)
        out.append(name)

    for name in LABELS:
        visit(name)
    return out


def sample_labels(rng: np.random.Generator, config: PhantomConfig) -> list[str]:
    """Draw which findings a patient has, honouring prevalences and co-occurrence links."""
    prev = config.prevalence
    parent = {c: (p, lift) for p, c, lift in config.links}
    present: dict[str, bool] = {}
    for name in _link_order(config.links):
        p = prev[name]
        u = float(rng.random())
        if name in parent:
            par, lift = parent[name]
            pa = prev[par]
            p_yes = min(1.0, p * lift)
            if present[par]:
                q = p_yes
            else:
                q = max(0.0, (p - pa * p_yes) / (1.0 - pa)) if pa < 1.0 else p
        else:
            q = p
        present[name] = u < q
    return [name for name in LABELS if present[name]]


@dataclass
class Phantom:
    """A rendered study and its truth.

    ``hu`` float32 [z, y, x]; ``spacing`` (z, y, x) mm; ``affine`` 4x4 index (z, y, x, 1) -> LPS
    mm; ``findings`` one per present label; ``labels`` int8 (18,) in CT-RATE order;
    ``tissue`` uint8 [z, y, x] `Tissue` codes of the anatomy (fluid collections and the heart
    as rendered, small lesions not); ``patient`` the drawn parameters (sex, age, size, noise...).
    """

    hu: npt.NDArray[np.float32]
    spacing: tuple[float, float, float]
    affine: npt.NDArray[np.float64]
    findings: list[Finding]
    labels: npt.NDArray[np.int8]
    patient: dict[str, Any]
    tissue: npt.NDArray[np.uint8]
    seed: int

    def finding(self, label: str) -> Finding | None:
        """The finding with this label, if present."""
        label_index(label)
        for f in self.findings:
            if f.label == label:
                return f
        return None

    def index_to_lps(self, zyx: Sequence[float]) -> tuple[float, float, float]:
        """LPS mm of an array index (z, y, x)."""
        v = self.affine @ np.array([zyx[0], zyx[1], zyx[2], 1.0])
        return (float(v[0]), float(v[1]), float(v[2]))


def phantom_affine(
    shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> npt.NDArray[np.float64]:
    """Index (z, y, x, 1) -> LPS mm, volume centred on the isocentre (as dicom_io writes it)."""
    nz, ny, nx = shape
    sz, sy, sx = spacing
    a = np.zeros((4, 4), dtype=np.float64)
    a[0, 2] = sx
    a[1, 1] = sy
    a[2, 0] = sz
    a[:3, 3] = (-(nx - 1) * sx / 2.0, -(ny - 1) * sy / 2.0, -(nz - 1) * sz / 2.0)
    a[3, 3] = 1.0
    return a


_OUTSIDE_CAVITY = frozenset(
    {
        Tissue.AIR,
        Tissue.TABLE,
        Tissue.SKIN,
        Tissue.FAT,
        Tissue.GLAND,
        Tissue.MUSCLE,
        Tissue.CORTICAL_BONE,
        Tissue.MARROW,
        Tissue.CARTILAGE,
        Tissue.DISC,
        Tissue.CANAL,
    }
)


def cardiothoracic_ratio(
    tissue: npt.NDArray[np.uint8], spacing: tuple[float, float, float]
) -> float:
    """CT cardiothoracic ratio from a tissue map: the widest axial left-right extent of the
    heart (with its epicardial fat) over the widest internal diameter of the thorax, both
    measured on slices that contain lung."""
    sx = spacing[2]
    lung = np.isin(tissue, [Tissue.LUNG_RIGHT, Tissue.LUNG_LEFT]).any(axis=(1, 2))
    if not lung.any():
        return float("nan")
    sub = tissue[lung]
    heart_cols = np.asarray(np.isin(sub, [Tissue.HEART, Tissue.EPICARDIAL_FAT]).any(axis=1))
    lut = np.ones(256, dtype=bool)
    lut[list(_OUTSIDE_CAVITY)] = False
    cav_cols = np.asarray(lut[sub].any(axis=1))

    def widest(cols: npt.NDArray[np.bool_]) -> float:
        best = 0
        for row in cols:
            idx = np.flatnonzero(row)
            if idx.size:
                best = max(best, int(idx[-1] - idx[0] + 1))
        return best * sx

    thorax = widest(cav_cols)
    return widest(heart_cols) / thorax if thorax > 0 else float("nan")


def _threads(config: PhantomConfig) -> int:
    if config.threads is not None:
        return max(1, int(config.threads))
    return max(1, min(4, os.cpu_count() or 1))


def _check_geometry(
    shape: Sequence[int], spacing: Sequence[float]
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    if len(shape) != 3 or min(int(v) for v in shape) < 1:
        raise ValueError(f"phantom shape must be three positive sizes (z, y, x), got {shape}")
    if len(spacing) != 3 or min(float(v) for v in spacing) <= 0:
        raise ValueError(f"phantom spacing must be three positive mm (z, y, x), got {spacing}")
    s = (int(shape[0]), int(shape[1]), int(shape[2]))
    sp = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    return s, sp


def _flat_to_box(
    idx: npt.NDArray[np.int64], shape: tuple[int, int, int]
) -> tuple[tuple[int, int, int, int, int, int], npt.NDArray[np.bool_]] | None:
    if idx.size == 0:
        return None
    iz, iy, ix = np.unravel_index(idx, shape)
    box = (int(iz.min()), int(iz.max()) + 1, int(iy.min()), int(iy.max()) + 1,
           int(ix.min()), int(ix.max()) + 1)
    m = np.zeros((box[1] - box[0], box[3] - box[2], box[5] - box[4]), dtype=bool)
    m[iz - box[0], iy - box[2], ix - box[4]] = True
    return box, m


def _layer_mask(
    plan: Plan, heart: HeartSpec, tissue: npt.NDArray[np.uint8], grid: Grid
) -> tuple[tuple[int, int, int, int, int, int], npt.NDArray[np.bool_]] | None:
    """Mask of a painted finding: its tissue codes inside its shape's box (and shape)."""
    assert plan.mask_codes is not None
    shape = plan.mask_shape if plan.mask_shape is not None else heart.shell(
        heart.epi + heart.fluid + heart.peri + 2.0)
    lo, hi = shape.bounds()
    z0, z1 = grid.span(lo[2] - 2.0, hi[2] + 2.0, 0)
    y0, y1 = grid.span(lo[1] - 2.0, hi[1] + 2.0, 1)
    x0, x1 = grid.span(lo[0] - 2.0, hi[0] + 2.0, 2)
    if z0 >= z1 or y0 >= y1 or x0 >= x1:
        return None
    sub = tissue[z0:z1, y0:y1, x0:x1]
    m = np.isin(sub, list(plan.mask_codes))
    if plan.mask_shape is not None:
        inside = plan.mask_shape.contains(
            grid.axis_mm(2)[None, None, x0:x1], grid.axis_mm(1)[None, y0:y1, None],
            grid.axis_mm(0)[z0:z1, None, None])
        m &= np.broadcast_to(inside, m.shape)
    if not m.any():
        return None
    nzz, nyy, nxx = np.nonzero(m)
    box = (z0 + int(nzz.min()), z0 + int(nzz.max()) + 1, y0 + int(nyy.min()),
           y0 + int(nyy.max()) + 1, x0 + int(nxx.min()), x0 + int(nxx.max()) + 1)
    crop = m[box[0] - z0:box[1] - z0, box[2] - y0:box[3] - y0, box[4] - x0:box[5] - x0]
    return box, np.ascontiguousarray(crop)


def _point_mask(
    plan: Plan, heart: HeartSpec, grid: Grid
) -> tuple[tuple[int, int, int, int, int, int], npt.NDArray[np.bool_]] | None:
    """A lesion smaller than what this grid can show still exists: its truth is the voxel at
    its centre (flagged ``below_resolution``). None if the centre is outside the volume."""
    c = plan.center_fn(heart) if plan.center_fn is not None else plan.center
    v = [round(float(c[2]) / grid.spacing[0]), round(float(c[1]) / grid.spacing[1]),
         round(float(c[0]) / grid.spacing[2])]
    if not all(0 <= v[i] < grid.shape[i] for i in range(3)):
        return None
    plan.extra["below_resolution"] = True
    box = (v[0], v[0] + 1, v[1], v[1] + 1, v[2], v[2] + 1)
    return box, np.ones((1, 1, 1), dtype=bool)


def _finding(
    plan: Plan,
    box: tuple[int, int, int, int, int, int],
    mask: npt.NDArray[np.bool_],
    heart: HeartSpec,
    grid: Grid,
    affine: npt.NDArray[np.float64],
) -> Finding:
    sz, sy, sx = grid.spacing
    c = plan.center_fn(heart) if plan.center_fn is not None else plan.center
    want = np.array([c[2] / sz, c[1] / sy, c[0] / sx])
    v = np.round(want).astype(np.int64) - np.array([box[0], box[2], box[4]])
    inside = bool(np.all(v >= 0) and np.all(v < np.array(mask.shape)) and mask[tuple(v)])
    if not inside:
        pts = np.argwhere(mask).astype(np.float64)
        off = np.array([box[0], box[2], box[4]], dtype=np.float64)
        d = ((pts + off - want) * np.array([sz, sy, sx])) ** 2
        v = pts[int(np.argmin(d.sum(axis=1)))].astype(np.int64)
    cv = (int(v[0]) + box[0], int(v[1]) + box[2], int(v[2]) + box[4])
    mm = affine @ np.array([cv[0], cv[1], cv[2], 1.0])
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    return Finding(
        label=plan.label,
        label_index=label_index(plan.label),
        side=plan.side,
        lobe=plan.lobe,
        size_mm=round(float(plan.size_mm), 2),
        center_voxel=cv,
        center_mm=(float(mm[0]), float(mm[1]), float(mm[2])),
        z_extent=(box[0] + int(zs[0]), box[0] + int(zs[-1])),
        bbox=box,
        mask=mask,
        extra=dict(plan.extra),
    )


def _occupied(heart: HeartSpec, plans: Sequence[Plan], *, big_heart: bool) -> Occupied:
    shapes = [p.mask_shape for p in plans if p.mask_shape is not None]
    if big_heart:
        shapes.append(heart.shell(heart.epi + heart.fluid + heart.peri + 4.0))
    if not shapes:
        return nothing_occupied

    def occupied(points: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
        pts = np.asarray(points, dtype=np.float64)
        out = np.zeros(pts.shape[:-1], dtype=bool)
        for sh in shapes:
            out |= sh.contains(pts[..., 0], pts[..., 1], pts[..., 2])
        return out

    return occupied


@contextmanager
def _plain_pages() -> Iterator[None]:
    """Allocate without transparent huge pages while rendering.

    numpy advises the kernel to back large arrays with huge pages; where the kernel then
    compacts memory synchronously on first touch (THP defrag "madvise", common on VMs), every
    fresh volume-sized array costs ~0.6 s instead of ~0.1 s. The switch is numpy-internal and
    process-wide, so it is restored on exit and skipped when this numpy lacks it.
    """
    setter = None
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            setter = getattr(importlib.import_module(mod), "_set_madvise_hugepage", None)
        except ImportError:
            continue
        if setter is not None:
            break
    if setter is None:
        yield
        return
    previous = setter(False)
    try:
        yield
    finally:
        setter(previous)


def generate_phantom(
    shape: Sequence[int],
    spacing: Sequence[float],
    *,
    seed: int,
    config: PhantomConfig | None = None,
    labels: Sequence[str] | None = None,
) -> Phantom:
    """Render one synthetic chest CT.

    ``labels`` forces exactly these findings (tests, balanced sets); otherwise they are sampled
    from ``config``. A lesion too small for the grid keeps its label with a one-voxel mask at
    its centre (``extra["below_resolution"]``); one whose centre lies outside the field of view
    (a toy volume) is dropped and named in ``patient["dropped_findings"]``.
    """
    with _plain_pages():
        return _generate(shape, spacing, seed=seed, config=config, labels=labels)


def _generate(
    shape: Sequence[int],
    spacing: Sequence[float],
    *,
    seed: int,
    config: PhantomConfig | None,
    labels: Sequence[str] | None,
) -> Phantom:
    shp, spc = _check_geometry(shape, spacing)
    cfg = config if config is not None else PhantomConfig()
    threads = _threads(cfg)
    grid = Grid(shp, spc)
    anat = Anatomy(grid, np.random.default_rng([seed, 1]))
    if labels is None:
        present = sample_labels(np.random.default_rng([seed, 3]), cfg)
    else:
        wanted = {label_index(name) for name in labels}
        present = [LABELS[i] for i in sorted(wanted)]
    # Space-occupying findings first; lung lesions are then placed in lung that is left.
    plans = {name: plan_finding(anat, name, seed) for name in present
             if name in SPACE_OCCUPYING}
    ctr = plans["Cardiomegaly"].ctr if "Cardiomegaly" in plans else None
    fluid = plans["Pericardial effusion"].fluid if "Pericardial effusion" in plans else 0.0
    heart = anat.heart(ctr=ctr, fluid=fluid)
    occupied = _occupied(heart, list(plans.values()), big_heart=ctr is not None or fluid > 0)
    for name in present:
        if name not in plans:
            plans[name] = plan_finding(anat, name, seed, occupied)
    layers = anat.layers(heart, [lay for name in present for lay in plans[name].layers])

    rng_r = np.random.default_rng([seed, 2])
    noise_sigma = float(rng_r.uniform(*cfg.noise_sigma))
    blur_mm = float(rng_r.uniform(*cfg.blur_mm))
    nz, ny, nx = shp
    _, sy, sx = spc
    sigma_xy = math.sqrt((blur_mm / min(sx, sy)) ** 2 + 0.09)
    noise = NoisePool(rng_r, ny, nx, nz, sigma_xy)
    texture = NoisePool(np.random.default_rng([seed, 4]), ny, nx, nz, max(1.0, 2.0 / sx),
                        planes=3)

    hu = np.empty(shp, dtype=np.float32)
    tissue = np.zeros(shp, dtype=np.uint8)
    lut = anat.hu.lut()

    def paint(k0: int, k1: int) -> None:
        paint_layers(tissue, grid, layers, (k0, k1))
        for kz in range(k0, k1):
            np.take(lut, tissue[kz], out=hu[kz], mode="clip")
        anat.modulate_lungs(hu, tissue, (k0, k1), texture)

    parallel_slabs(nz, paint, voxels_per_slice=ny * nx, threads=threads)
    canvas = Canvas(grid, hu, tissue, threads)
    anat.draw_small(canvas, heart)
    drawn: dict[str, npt.NDArray[np.int64]] = {}
    for name in DRAW_ORDER:
        plan = plans.get(name)
        if plan is not None and plan.draw is not None:
            drawn[name] = plan.draw(canvas, heart)
    boxes: dict[str, tuple[tuple[int, int, int, int, int, int], npt.NDArray[np.bool_]] | None]
    boxes = {}
    for name in present:
        plan = plans[name]
        if plan.draw is not None:
            boxes[name] = _flat_to_box(drawn[name], shp)
        else:
            boxes[name] = _layer_mask(plan, heart, tissue, grid)

    # Reconstruction: slice profile along z, kernel blur in plane, then image noise.
    blur_z(hu, 0.45, threads=threads)
    sigma_n = np.float32(noise_sigma)

    def finish(k0: int, k1: int) -> None:
        blur_volume(hu, sigma_xy, (k0, k1))
        for kz in range(k0, k1):
            sl = hu[kz]
            sl += sigma_n * noise.slice(kz)
        np.clip(hu[k0:k1], -1024.0, 3071.0, out=hu[k0:k1])

    parallel_slabs(nz, finish, voxels_per_slice=ny * nx, threads=threads)

    affine = phantom_affine(shp, spc)
    findings: list[Finding] = []
    dropped: list[str] = []
    for name in present:
        got = boxes[name]
        if got is None:
            got = _point_mask(plans[name], heart, grid)
        if got is None:
            dropped.append(name)
            continue
        findings.append(_finding(plans[name], got[0], got[1], heart, grid, affine))
    vec = np.zeros(len(LABELS), dtype=np.int8)
    for f in findings:
        vec[f.label_index] = 1
    patient: dict[str, Any] = {
        "sex": "F" if anat.female else "M",
        "age": round(anat.age),
        "size_scale": round(anat.size, 3),
        "fov_fit": round(anat.fit, 3),
        "subcutaneous_fat_mm": round(anat.f_lat, 1),
        "lung_height_mm": round(anat.H, 1),
        "thorax_width_mm": round(anat.thorax_width, 1),
        "heart_transverse_mm": round(heart.transverse_diameter(), 1),
        "ctr": round(heart.transverse_diameter() / anat.thorax_width, 3),
        "lung_hu": round(anat.lung_hu, 1),
        "noise_sigma_hu": round(noise_sigma, 2),
        "blur_mm": round(blur_mm, 3),
        "dropped_findings": dropped,
    }
    return Phantom(hu, spc, affine, findings, vec, patient, tissue, int(seed))


# --- the plumbing phantom ---------------------------------------------------------------------

# Nominal HU of each tissue, kept in one place so tests can assert against the same numbers.
HU: dict[str, float] = {
    "air": -1000.0,
    "fat": -100.0,
    "muscle": 50.0,
    "lung": -850.0,
    "heart": 40.0,
    "cortical_bone": 1000.0,
    "cancellous_bone": 700.0,
}

# Half-sizes of an adult chest in mm (left-right, anterior-posterior); scaled down to fit a small
# field of view so the body never touches the image edge, where real scanners show air too.
_BODY_HALF_MM = (170.0, 120.0)
_FAT_RING_MM = 12.0
_NOISE_SIGMA = 15.0
_LUNG_EXTRA_SIGMA = 25.0

FloatGrid = npt.NDArray[np.float32]


def _grid_mm(n: int, spacing: float) -> FloatGrid:
    """Coordinates of pixel centres in mm, centred on the middle of the image."""
    return ((np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * np.float32(spacing)).astype(
        np.float32
    )


def _inside(
    x: FloatGrid, y: FloatGrid, cx: float, cy: float, ax: float, ay: float
) -> npt.NDArray[np.bool_]:
    """Ellipse membership; semi-axes of zero give an empty mask rather than dividing by zero."""
    if ax <= 0.0 or ay <= 0.0:
        return np.zeros(np.broadcast_shapes(x.shape, y.shape), dtype=bool)
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


def _profile(t: npt.NDArray[np.float64], start: float, stop: float) -> npt.NDArray[np.float64]:
    """A smooth 0..1..0 bump over [start, stop] of the normalised z axis (0 = inferior)."""
    u = np.clip((t - start) / (stop - start), 0.0, 1.0)
    out: npt.NDArray[np.float64] = np.sqrt(np.sin(np.pi * u))
    return out


def _slice(
    x: FloatGrid,
    y: FloatGrid,
    scale: float,
    body: float,
    lung: float,
    heart: float,
) -> FloatGrid:
    """One axial slice; `body`, `lung`, `heart` are the z-dependent size factors in 0..1."""
    bx, by = _BODY_HALF_MM[0] * scale * body, _BODY_HALF_MM[1] * scale * body
    img = np.full(np.broadcast_shapes(x.shape, y.shape), HU["air"], dtype=np.float32)
    img[_inside(x, y, 0.0, 0.0, bx, by)] = HU["fat"]
    ring = _FAT_RING_MM * scale
    img[_inside(x, y, 0.0, 0.0, bx - ring, by - ring)] = HU["muscle"]
    # Lungs: two ellipses either side of the midline, in image coordinates x = patient left,
    # y = patient posterior (DICOM LPS), so the spine sits at larger y.
    lx, ly = 0.36 * bx * lung, 0.62 * by * lung
    for side in (-1.0, 1.0):
        img[_inside(x, y, side * 0.47 * bx, -0.05 * by, lx, ly)] = HU["lung"]
    # Heart: anterior, slightly to the patient's left, carved out of the lungs it overlaps.
    img[_inside(x, y, 0.12 * bx, -0.25 * by, 0.30 * bx * heart, 0.33 * by * heart)] = HU["heart"]
    # Spine: vertebral body (cancellous core, cortical shell) posteriorly on the midline.
    sr = 0.17 * by
    img[_inside(x, y, 0.0, 0.62 * by, sr, sr)] = HU["cortical_bone"]
    img[_inside(x, y, 0.0, 0.62 * by, 0.75 * sr, 0.75 * sr)] = HU["cancellous_bone"]
    return img


def basic_chest_phantom(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    *,
    seed: int = 0,
) -> npt.NDArray[np.float32]:
    """A float32 HU volume [z, y, x]; z index 0 is the most inferior slice.

    In-plane the anatomy is sized in mm from `spacing` (shrunk only to fit a small field of
    view); along z it always spans the volume from lung bases to apices, so a thin and a thick
    slice version of the same phantom describe the same chest. Deterministic for a given shape,
    spacing and seed.
    """
    nz, ny, nx = shape
    if min(shape) < 1:
        raise ValueError(f"phantom shape must be positive, got {shape}")
    if min(spacing) <= 0:
        raise ValueError(f"phantom spacing must be positive, got {spacing}")
    _, sy, sx = spacing
    x = _grid_mm(nx, sx)[np.newaxis, :]
    y = _grid_mm(ny, sy)[:, np.newaxis]
    fov_half = (nx * sx / 2.0, ny * sy / 2.0)
    scale = min(1.0, 0.92 * fov_half[0] / _BODY_HALF_MM[0], 0.92 * fov_half[1] / _BODY_HALF_MM[1])

    t = np.linspace(0.0, 1.0, nz) if nz > 1 else np.full(1, 0.5)
    body = 0.92 + 0.08 * np.sin(np.pi * t)
    lung = _profile(t, 0.06, 1.04)
    heart = _profile(t, 0.10, 0.62)

    rng = np.random.default_rng(seed)
    lung_sigma = np.float32(np.hypot(_NOISE_SIGMA, _LUNG_EXTRA_SIGMA))
    vol = np.empty(shape, dtype=np.float32)
    for k in range(nz):
        img = _slice(x, y, scale, float(body[k]), float(lung[k]), float(heart[k]))
        # Lung parenchyma is noisier than solid tissue on real scans; one draw per voxel with a
        # tissue-dependent sigma keeps the cost to a single pass of the generator.
        sigma = np.where(img == np.float32(HU["lung"]), lung_sigma, np.float32(_NOISE_SIGMA))
        noise = rng.standard_normal((ny, nx), dtype=np.float32)
        noise *= sigma
        np.add(img, noise, out=vol[k])
    return vol
