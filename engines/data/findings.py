"""The 18 CT-RATE abnormalities as rendered lesions, each with its ground truth.

Every finding is planned from the analytic anatomy of the patient (the normal lungs, lobes,
heart, aorta, airway tree) with its own random stream, so adding or removing one finding never
moves another or the anatomy. A plan either adds painted layers (large fluid collections, the
heart) or draws tubes, spheres and sheets into the rendered volume; in both cases the voxels it
claimed become the finding's mask.

Appearance follows the radiology, and intensities are intrinsic tissue values rendered with
partial volume: a lesion is never made denser or bigger than the real one would be to help a
model see it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from engines.data.anatomy import (
    LOBE_NAMES,
    LUNG,
    Anatomy,
    HeartSpec,
    Lobe,
    Tissue,
    Tree,
    bronchus_geometry,
)
from engines.data.labels import LABELS, label_index
from engines.data.raster import (
    F64,
    And,
    AndNot,
    Canvas,
    Disks,
    Ellipsoid,
    HalfSpace,
    Layer,
    Prims,
    Shape,
    SplatResult,
    Union,
    concat_prims,
    polyline_prims,
    sphere_prims,
    splat,
    splat_disks,
    zellipse,
)

__all__ = [
    "DRAW_ORDER",
    "SPACE_OCCUPYING",
    "Finding",
    "Occupied",
    "Plan",
    "nothing_occupied",
    "plan_finding",
]

T = Tissue
I64 = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


@dataclass
class Finding:
    """One present abnormality and where it is.

    ``mask`` covers ``bbox`` only (``full_mask`` expands it); ``bbox`` is (z0, z1, y0, y1, x0,
    x1), half-open voxel indices. ``size_mm`` is the measurement a report would give: nodule
    diameter, node short axis, effusion or rim thickness, heart transverse diameter, sac height,
    plaque length, lumen diameter, septal thickness, or the largest extent of a diffuse pattern
    (``extra`` says which and carries the details: counts, kinds, densities, per-lesion lists).
    ``center_voxel`` (z, y, x) always lies in the mask and ``center_mm`` is its LPS position.
    """

    label: str
    label_index: int
    side: str | None
    lobe: str | None
    size_mm: float
    center_voxel: tuple[int, int, int]
    center_mm: tuple[float, float, float]
    z_extent: tuple[int, int]
    bbox: tuple[int, int, int, int, int, int]
    mask: npt.NDArray[np.bool_]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        z0, z1, y0, y1, x0, x1 = self.bbox
        return slice(z0, z1), slice(y0, y1), slice(x0, x1)

    def mask_z(self) -> tuple[int, ...]:
        """The z indices whose slice shows the finding (scattered findings leave gaps in
        ``z_extent``; a citation must point at a slice that shows it)."""
        present = np.flatnonzero(self.mask.reshape(self.mask.shape[0], -1).any(axis=1))
        return tuple(int(self.bbox[0] + z) for z in present)

    def full_mask(self, shape: tuple[int, int, int]) -> npt.NDArray[np.bool_]:
        """The mask as a boolean array of the whole volume."""
        out = np.zeros(shape, dtype=bool)
        out[self.slices] = self.mask
        return out

    @property
    def voxels(self) -> int:
        return int(self.mask.sum())


#: Draws a finding into the canvas; returns the flat indices of its mask (repeats allowed).
DrawFn = Callable[[Canvas, HeartSpec], I64]
#: Points (N, 3) -> True where a space-occupying finding (enlarged heart, effusion, hernia) sits.
Occupied = Callable[[F64], BoolArray]


def nothing_occupied(points: F64) -> BoolArray:
    return np.zeros(np.asarray(points).shape[:-1], dtype=bool)


#: Findings painted as layers, which displace lung: planned first, and other lesions avoid them.
SPACE_OCCUPYING: tuple[str, ...] = (
    "Cardiomegaly",
    "Pericardial effusion",
    "Hiatal hernia",
    "Pleural effusion",
)


@dataclass
class Plan:
    """How one finding will be rendered, and the truth that goes with it."""

    label: str
    side: str | None
    lobe: str | None
    size_mm: float
    center: F64
    extra: dict[str, Any]
    layers: list[Layer] = field(default_factory=list)
    mask_shape: Shape | None = None
    mask_codes: frozenset[int] | None = None
    draw: DrawFn | None = None
    ctr: float | None = None
    fluid: float = 0.0
    center_fn: Callable[[HeartSpec], F64] | None = None


# Findings drawn into the rendered volume, in this order: diffuse lung patterns first, focal
# lesions over them, calcium and metal last (nothing covers them).
DRAW_ORDER: tuple[str, ...] = (
    "Mosaic attenuation pattern",
    "Emphysema",
    "Lung opacity",
    "Interlobular septal thickening",
    "Pulmonary fibrotic sequela",
    "Bronchiectasis",
    "Peribronchial thickening",
    "Consolidation",
    "Atelectasis",
    "Lung nodule",
    "Lymphadenopathy",
    "Arterial wall calcification",
    "Coronary artery wall calcification",
    "Medical material",
)

_LUNG_AND_VESSELS = frozenset(LUNG | {T.VESSEL})
_UPPER = {int(Lobe.RUL), int(Lobe.LUL)}
_LOWER = {int(Lobe.RLL), int(Lobe.LLL)}
_ALL_LOBES = {int(v) for v in LOBE_NAMES}


def _side_name(xs: F64, xm: float) -> str:
    left = bool(np.any(xs > xm))
    right = bool(np.any(xs <= xm))
    if left and right:
        return "bilateral"
    return "left" if left else "right"


def _lobe_name(lobes: set[int]) -> str | None:
    lobes = {lb for lb in lobes if lb in LOBE_NAMES}
    if not lobes:
        return None
    if len(lobes) == 1:
        return LOBE_NAMES[next(iter(lobes))]
    if lobes <= _UPPER:
        return "upper lobes"
    if lobes <= _LOWER:
        return "lower lobes"
    if lobes == _ALL_LOBES:
        return "all lobes"
    return ", ".join(LOBE_NAMES[lb] for lb in sorted(lobes))


def _perp(d: F64, rng: np.random.Generator) -> F64:
    """A random unit vector perpendicular to ``d``."""
    v = rng.standard_normal(3)
    v -= v.dot(d) / max(1e-12, d.dot(d)) * d
    n = float(np.linalg.norm(v))
    if n < 1e-9:
        v = np.cross(d, [1.0, 0.0, 0.0])
        n = float(np.linalg.norm(v))
    out: F64 = v / max(n, 1e-12)
    return out


def _mask_of(res: SplatResult, rel: float = 0.5, floor: float = 0.5) -> I64:
    return res.mask_indices(rel=rel, floor=floor)


def _roomy(
    anat: Anatomy, rng: np.random.Generator, occ: Occupied, cands: F64, radius: float
) -> F64:
    """The candidate with the most free lung within ``radius``: a lesion of that size placed
    there is not cut away by the mediastinum, the diaphragm or another finding."""
    if cands.shape[0] <= 1:
        first: F64 = cands[0]
        return first
    probes = rng.normal(0.0, 1.0, (32, 3))
    probes *= (radius * rng.uniform(0.3, 1.0, 32) / np.linalg.norm(probes, axis=1))[:, None]
    pts = cands[:, None, :] + probes[None, :, :]
    flat = pts.reshape(-1, 3)
    free = (anat.lung_side_at(flat) != 0) & ~occ(flat)
    score = free.reshape(cands.shape[0], -1).mean(axis=1)
    best: F64 = cands[int(np.argmax(score))]
    return best


# --- 0 Medical material ---------------------------------------------------------------------

_STEEL = 25000.0  # intrinsic; the scanner clips it to its top value, with blooming around
_TITANIUM = 6000.0


def _skin_y(anat: Anatomy, x: float, t: float) -> float:
    """y of the anterior body surface at lateral position x and height t."""
    bx, by, cyb = (float(anat.prof(n, t)) for n in ("bx", "by", "cyb"))
    u = min(0.98, abs(x - anat.xm) / bx)
    return float(cyb - by * (1.0 - u**2.2) ** (1.0 / 2.2))


def _plan_medical_material(anat: Anatomy, rng: np.random.Generator, occ: Occupied) -> Plan:
    k = anat.k
    kind = str(rng.choice(["port", "pacemaker", "sternotomy wires"], p=[0.45, 0.3, 0.25]))
    xm = anat.xm
    h0 = anat.heart()
    svc_top = np.array([xm - 29 * k, float(anat.y_trachea(0.8)) - 14 * k, float(anat.z(0.8))])
    ra = np.array([xm - 25 * k, float(anat.y_trachea(0.55)) - 12 * k, h0.center[2] + 0.35 * h0.c])
    extra: dict[str, Any] = {"kind": kind}
    if kind == "sternotomy wires":
        n = int(rng.integers(4, 8))
        ts = np.linspace(0.3, 0.88, n) + rng.uniform(-0.02, 0.02, n)
        loops = []
        for t in ts:
            wy = float(np.interp(t, [0.22, 0.3, 0.7, 0.74, 0.8, 0.93], [4, 5.5, 6, 7, 8.5, 8.5]))
            wx = float(np.interp(t, [0.22, 0.3, 0.7, 0.74, 0.8, 0.93], [6, 12, 14, 16, 24, 26]))
            yc = float(anat.prof("yant", t)) - wy * k - 1.0 * k
            ang = np.linspace(0, 2 * np.pi, 17)
            pts = np.stack(
                [
                    xm + (wx + 2.0) * k * np.cos(ang),
                    yc + (wy + 2.0) * k * np.sin(ang),
                    np.full(17, float(anat.z(t))),
                ],
                axis=1,
            )
            loops.append(polyline_prims(pts, 0.6, _STEEL))
        prims = concat_prims(loops)
        center = np.array(
            [
                xm,
                float(anat.prof("yant", float(ts[n // 2]))) - 8 * k,
                float(anat.z(float(ts[n // 2]))),
            ]
        )
        side = None
        size = float(np.interp(float(ts[n // 2]), [0.3, 0.7, 0.93], [12, 14, 26])) * 2 * k
        extra.update(count=n, material="steel")
        disks: Disks | None = None
    elif kind == "port":
        sgn = -1.0 if rng.random() < 0.8 else 1.0
        t = float(rng.uniform(0.8, 0.88))
        x = xm + sgn * float(rng.uniform(0.35, 0.5)) * float(anat.prof("bx", t))
        # A reservoir about 25 mm across and 12 mm deep, in the fat on the pectoral fascia.
        y = _skin_y(anat, x, t) + max(7.0, 0.7 * anat.f_ant) + 6.0
        p = np.array([x, y, float(anat.z(t))])
        disks = Disks(
            p[None, :],
            np.array([[0.0, 1.0, 0.0]]),
            np.array([10.0]),
            np.array([6.0]),
            np.array([_TITANIUM]),
            np.zeros(1, dtype=np.int64),
        )
        vein = np.array(
            [xm + sgn * 30 * k, float(anat.prof("yant", 0.92)) + 8 * k, float(anat.z(0.92))]
        )
        line = np.vstack([p, (p + vein) / 2 + [0.0, 0.0, 8.0], vein, svc_top, ra])
        prims = polyline_prims(line, 1.3, 900.0)
        center = p
        side = "right" if sgn < 0 else "left"
        size = 25.0
        extra.update(material="titanium port with catheter to the cavoatrial junction")
    else:
        sgn = 1.0 if rng.random() < 0.9 else -1.0
        t = float(rng.uniform(0.8, 0.87))
        x = xm + sgn * float(rng.uniform(0.38, 0.5)) * float(anat.prof("bx", t))
        y = _skin_y(anat, x, t) + max(7.0, 0.6 * anat.f_ant)
        p = np.array([x, y, float(anat.z(t))])
        disks = Disks(
            p[None, :],
            np.array([[sgn * 0.25, -0.97, 0.0]]),
            np.array([21.0]),
            np.array([3.5]),
            np.array([_TITANIUM]),
            np.zeros(1, dtype=np.int64),
        )
        vein = np.array(
            [xm + sgn * 32 * k, float(anat.prof("yant", 0.92)) + 9 * k, float(anat.z(0.92))]
        )
        rv = np.asarray(h0.surface_point(np.array([0.6]), np.array([math.pi]), -6.0 * k))[0]
        leads = []
        for tip in (ra + np.array([6 * k, 4 * k, -6 * k]), rv):
            line = np.vstack([p, (p + vein) / 2 + [0.0, 0.0, 6.0], vein, svc_top, ra, tip])
            leads.append(polyline_prims(line, 0.9, _STEEL))
            leads.append(sphere_prims(tip[None, :], 1.6, _STEEL))
        prims = concat_prims(leads)
        center = p
        side = "right" if sgn < 0 else "left"
        size = 50.0
        extra.update(material="pacemaker generator with two leads (right atrium, right ventricle)")

    def draw(canvas: Canvas, heart: HeartSpec) -> I64:
        parts = [_mask_of(splat(canvas, prims, mode="max"))]
        if disks is not None:
            parts.append(_mask_of(splat_disks(canvas, disks, mode="max")))
        return np.concatenate(parts)

    return Plan(LABELS[0], side, None, size, center, extra, draw=draw)


# --- 1 Arterial wall calcification ----------------------------------------------------------


def _wall_plaques(
    rng: np.random.Generator,
    pts: F64,
    rad: F64,
    n: int,
    sel_p: F64 | None,
    length: tuple[float, float],
    thick: tuple[float, float],
    depth: float,
) -> tuple[Prims, list[int], F64]:
    """Short curved plaques in the wall of a vessel given by centre points and radii."""
    idx = rng.choice(pts.shape[0], size=n, p=sel_p)
    a_list, b_list, r_list, v_list = [], [], [], []
    lengths = []
    for j, i in enumerate(idx):
        i0, i1 = max(0, i - 1), min(pts.shape[0] - 1, i + 1)
        tan = pts[i1] - pts[i0]
        tan = tan / max(1e-9, float(np.linalg.norm(tan)))
        u = _perp(tan, rng)
        w = np.cross(tan, u)
        r = float(rad[i]) - depth
        ln = float(rng.uniform(*length))
        dphi = ln / max(r, 1.0)
        c = pts[i] + tan * float(rng.uniform(-2.0, 2.0))
        a = c + r * (u * math.cos(-dphi / 2) + w * math.sin(-dphi / 2))
        b = c + r * (u * math.cos(dphi / 2) + w * math.sin(dphi / 2))
        a_list.append(a)
        b_list.append(b)
        r_list.append(float(rng.uniform(*thick)))
        v_list.append(float(rng.uniform(400.0, 1000.0)))
        lengths.append(ln)
        del j
    prims = Prims(
        np.array(a_list),
        np.array(b_list),
        np.array(r_list),
        np.array(r_list),
        np.array(v_list),
        np.arange(n, dtype=np.int64),
    )
    return prims, [int(i) for i in idx], np.array(lengths)


def _plan_arterial_calcification(anat: Anatomy, rng: np.random.Generator, occ: Occupied) -> Plan:
    severity = str(rng.choice(["mild", "moderate", "severe"], p=[0.45, 0.35, 0.2]))
    n = int(
        {
            "mild": rng.integers(3, 8),
            "moderate": rng.integers(8, 20),
            "severe": rng.integers(20, 40),
        }[severity]
    )
    h0 = anat.heart()
    pts, rad, seg = anat.aorta_centerline(h0)
    w = np.array(
        [{"ascending aorta": 0.4, "aortic arch": 1.6, "descending aorta": 1.0}[s] for s in seg]
    )
    # Keep plaques inside the scanned range.
    ez = anat.grid.extent_mm()[2]
    w = w * ((pts[:, 2] > 3.0) & (pts[:, 2] < ez - 3.0))
    if w.sum() <= 0:
        w = np.ones_like(w)
    w = w / w.sum()
    prims, idx, lengths = _wall_plaques(rng, pts, rad, n, w, (2.0, 9.0), (0.7, 1.6), 0.3)
    biggest = int(np.argmax(lengths))
    center = (prims.a[biggest] + prims.b[biggest]) / 2
    segs = sorted({seg[i] for i in idx})
    extra = {"count": n, "severity": severity, "segments": segs, "hu_range": (400, 1000)}

    def draw(canvas: Canvas, heart: HeartSpec) -> I64:
        res = splat(canvas, prims, mode="max", allowed=frozenset({T.VESSEL, T.MEDIASTINUM} | LUNG))
        return _mask_of(res)

    return Plan(LABELS[1], None, None, float(lengths.max()), center, extra, draw=draw)


# --- 2 Cardiomegaly, 3 Pericardial effusion -------------------------------------------------


def _plan_cardiomegaly(anat: Anatomy, rng: np.random.Generator, occ: Occupied) -> Plan:
    # Mostly mild to moderate enlargement (normal: 0.40-0.50).
    ctr = 0.53 + 0.12 * float(rng.beta(1.5, 2.5))
    h = anat.heart(ctr=ctr)
    extra = {"ctr": ctr, "thorax_width_mm": anat.thorax_width, "normal_ctr": anat.ctr_normal}

    def center_fn(heart: HeartSpec) -> F64:
        return np.asarray(heart.center, dtype=np.float64)

    return Plan(
        LABELS[2],
        None,
        None,
        h.transverse_diameter(),
        np.asarray(h.center),
        extra,
        mask_codes=frozenset({T.HEART, T.EPICARDIAL_FAT}),
        ctr=ctr,
        center_fn=center_fn,
    )


def _plan_pericardial_effusion(anat: Anatomy, rng: np.random.Generator, occ: Occupied) -> Plan:
    fluid = float(rng.uniform(4.0, 20.0))
    grade = "small" if fluid < 10 else ("moderate" if fluid < 15 else "large")

    def center_fn(heart: HeartSpec) -> F64:
        cx, cy, cz = heart.center
        return np.array([cx, cy + heart.b + heart.epi + 0.75 * fluid, cz])

    return Plan(
        LABELS[3],
        None,
        None,
        fluid,
        np.zeros(3),
        {"grade": grade, "max_thickness_mm": fluid, "distribution": "dependent"},
        mask_codes=frozenset({T.PERICARDIAL_FLUID}),
        fluid=fluid,
        center_fn=center_fn,
    )


# --- 4 Coronary artery wall calcification ---------------------------------------------------


def _plan_coronary_calcification(anat: Anatomy, rng: np.random.Generator, occ: Occupied) -> Plan:
    vessels = [v for v, p in (("LAD", 0.85), ("RCA", 0.5), ("LCX", 0.4)) if rng.random() < p]
    if not vessels:
        vessels = ["LAD"]
    counts = {v: int(rng.integers(1, 7)) for v in vessels}
    total = sum(counts.values())
    grade = "mild" if total <= 3 else ("moderate" if total <= 8 else "severe")
    seeds = int(rng.integers(0, 2**31))
    extra: dict[str, Any] = {
        "vessels": vessels,
        "count": total,
        "severity": grade,
        "hu_range": (400, 1000),
    }
    state: dict[str, Any] = {}

    def plaques(heart: HeartSpec) -> tuple[Prims, F64, float]:
        if "p" not in state:
            r2 = np.random.default_rng(seeds)
            paths = anat.coronary_paths(heart)
            parts, lens = [], []
            for v in vessels:
                pts = paths[v]
                n = pts.shape[0]
                # Proximal two thirds, where plaque is commonest.
                w = np.linspace(1.5, 0.3, n)
                w[int(0.7 * n) :] = 0.05
                w /= w.sum()
                rad = np.full(n, 1.7 * anat.k)
                pr, _, ln = _wall_plaques(r2, pts, rad, counts[v], w, (1.5, 6.0), (0.6, 1.5), 0.0)
                parts.append(pr)
                lens.append(ln)
            prims = concat_prims(parts)
            prims.group = np.arange(len(prims), dtype=np.int64)
            lengths = np.concatenate(lens)
            b = int(np.argmax(lengths))
            state["p"] = (prims, (prims.a[b] + prims.b[b]) / 2, float(lengths.max()))
        out: tuple[Prims, F64, float] = state["p"]
        return out

    def center_fn(heart: HeartSpec) -> F64:
        return plaques(heart)[1]

    def draw(canvas: Canvas, heart: HeartSpec) -> I64:
        prims = plaques(heart)[0]
        res = splat(
            canvas,
            prims,
            mode="max",
            allowed=frozenset({T.VESSEL, T.EPICARDIAL_FAT, T.PERICARDIUM, T.HEART}),
        )
        return _mask_of(res)

    size = float(rng.uniform(2.0, 6.0))
    plan = Plan(LABELS[4], None, None, size, np.zeros(3), extra, draw=draw, center_fn=center_fn)
    return plan


# --- 5 Hiatal hernia ------------------------------------------------------------------------


def _plan_hiatal_hernia(anat: Anatomy, rng: np.random.Generator, occ: Occupied) -> Plan:
    k = anat.k
    height = float(rng.uniform(20.0, 60.0))
    width = max(30.0, height * float(rng.uniform(0.8, 1.15)))
    # The sac rises from the hiatus, behind the heart, above both domes of the diaphragm.
    t_h = max(anat.t_dome_l, anat.t_dome_r)
    z0 = float(anat.z(t_h)) - 4.0 * k
    cz = z0 + height / 2.0
    tc = float(anat.t_of(cz))
    cx = anat.xm + float(rng.uniform(2.0, 14.0)) * k
    cy = float(anat.y_esophagus(tc)) - 0.3 * width
    a, b, c = width / 2.0, 0.4 * width, height / 2.0
    sac = Ellipsoid((cx, cy, cz), (a, b, c), float(rng.uniform(-0.3, 0.3)))
    inner = Ellipsoid((cx, cy, cz), (a - 2.5, b - 2.5, c - 2.5), sac.theta)
    gas_frac = float(rng.uniform(0.45, 0.85))
    level = cy - (b - 2.5) + 2.0 * (b - 2.5) * gas_frac
    # A hernia indents the back of the heart (the left atrium), not the other way round.
    allowed = frozenset(
        LUNG
        | {
            T.MEDIASTINUM,
            T.ESOPHAGUS,
            T.GAS,
            T.STOMACH,
            T.PERICARDIUM,
            T.PERICARDIAL_FLUID,
            T.EPICARDIAL_FAT,
            T.HEART,
        }
    )
    layers = [
        Layer(T.STOMACH, sac, allowed),
        Layer(T.GAS, _and(inner, HalfSpace(1, level, below=True)), frozenset({T.STOMACH})),
    ]
    extra = {
        "type": "sliding",
        "height_mm": height,
        "width_mm": width,
        "gas_fraction": gas_frac,
        "contents": "gas and fluid",
    }
    center = np.array([cx, cy, cz])
    return Plan(
        LABELS[5],
        None,
        None,
        height,
        center,
        extra,
        layers=layers,
        mask_shape=sac,
        mask_codes=frozenset({T.STOMACH, T.GAS}),
    )


def _and(a: Shape, b: Shape) -> Shape:
    return And(a, b)


# --- 6 Lymphadenopathy ----------------------------------------------------------------------

_STATION_DIR = {
    "right paratracheal (4R)": (-1.0, 0.0, 0.0),
    "left paratracheal (4L)": (1.0, 0.3, 0.0),
    "prevascular (3A)": (0.0, -1.0, 0.0),
    "aortopulmonary window (5)": (1.0, -0.3, 0.0),
    "subcarinal (7)": (0.0, 0.3, -1.0),
    "right hilar (10R)": (-1.0, 0.4, -0.3),
    "left hilar (10L)": (1.0, 0.4, -0.3),
}


def _plan_lymphadenopathy(anat: Anatomy, rng: np.random.Generator, occ: Occupied) -> Plan:
    st = anat.node_stations()
    names = [nm for nm in st if not bool(occ(st[nm][None, :])[0])] or list(st)
    n = min(len(names), int(rng.choice([1, 2, 3, 4], p=[0.4, 0.3, 0.2, 0.1])))
    pick = [names[i] for i in rng.choice(len(names), size=n, replace=False)]
    a_l, b_l, r_l, shorts = [], [], [], []
    for name in pick:
        short = 10.0 + 20.0 * float(rng.beta(1.3, 3.5))
        long_ = short * float(rng.uniform(1.1, 1.6))
        d = np.asarray(_STATION_DIR[name], dtype=np.float64)
        d /= np.linalg.norm(d)
        c = st[name] + d * (0.5 * short) + rng.normal(0.0, 1.5, 3)
        ax = np.array([rng.normal(0, 0.3), rng.normal(0, 0.3), 1.0])
        ax /= np.linalg.norm(ax)
        half = 0.5 * (long_ - short)
        a_l.append(c - ax * half)
        b_l.append(c + ax * half)
        r_l.append(0.5 * short)
        shorts.append(short)
    prims = Prims(
        np.array(a_l),
        np.array(b_l),
        np.array(r_l),
        np.array(r_l),
        np.full(n, anat.hu.values[T.NODE] + float(rng.uniform(-5, 5))),
        np.arange(n, dtype=np.int64),
    )
    big = int(np.argmax(shorts))
    center = (prims.a[big] + prims.b[big]) / 2
    xs = (prims.a[:, 0] + prims.b[:, 0]) / 2
    hilar = [p for p in pick if "hilar" in p]
    side = _side_name(xs[[pick.index(p) for p in hilar]], anat.xm) if hilar else None
    extra = {"stations": pick, "short_axes_mm": [round(s, 1) for s in shorts], "count": n}

    def draw(canvas: Canvas, heart: HeartSpec) -> I64:
        res = splat(canvas, prims, mode="max", allowed=frozenset(LUNG | {T.MEDIASTINUM, T.NODE}))
        return _mask_of(res)

    return Plan(LABELS[6], side, None, float(max(shorts)), center, extra, draw=draw)


# --- 7 Emphysema ----------------------------------------------------------------------------


def _plan_emphysema(anat: Anatomy, rng: np.random.Generator, occ: Occupied) -> Plan:
    kind = str(rng.choice(["centrilobular", "paraseptal", "panlobular"], p=[0.6, 0.25, 0.15]))
    severity = str(rng.choice(["mild", "moderate", "severe"], p=[0.5, 0.35, 0.15]))
    mult = {"mild": 1.0, "moderate": 2.5, "severe": 5.0}[severity]
    rad: F64
    if kind == "centrilobular":
        n = int(40 * mult)
        pts = _lung_points(anat, rng, occ, n, lobes=_UPPER | {int(Lobe.RML)}, t_range=(0.4, 1.0))
        rad = np.asarray(rng.uniform(2.0, 5.5, pts.shape[0]), dtype=np.float64)
    elif kind == "paraseptal":
        n = int(25 * mult)
        m = 3 * n
        rad = rng.uniform(3.0, 8.0, m)
        cand, _ = anat.costal_points(
            np.where(rng.random(m) < 0.5, -1.0, 1.0),
            rng.uniform(0.45, 0.95, m),
            rng.uniform(0.3, 2.8, m),
            rad + 0.5,
        )
        ok = (anat.lung_side_at(cand) != 0) & ~occ(cand)
        pts, rad = cand[ok][:n], rad[ok][:n]
    else:
        n = int(20 * mult)
        pts = _lung_points(anat, rng, occ, n, lobes=_LOWER, t_range=(0.0, 0.6))
        rad = np.asarray(rng.uniform(5.0, 12.0, pts.shape[0]), dtype=np.float64)
    side_code = anat.lung_side_at(pts)
    keep = side_code != 0
    pts, rad = pts[keep], rad[: pts.shape[0]][keep]
    if pts.shape[0] == 0:
        pts = _lung_points(anat, rng, occ, 3)
        rad = np.full(pts.shape[0], 5.0)
    lobes = set(anat.lobe_at(pts).tolist())
    vals = rng.uniform(-1000.0, -985.0, pts.shape[0])
    prims = sphere_prims(pts, rad, vals, np.arange(pts.shape[0], dtype=np.int64))
    big = int(np.argmax(rad))
    extra = {
        "type": kind,
        "severity": severity,
        "count": int(pts.shape[0]),
        "hu_range": (-1000, -985),
    }

    def draw(canvas: Canvas, heart: HeartSpec) -> I64:
        res = splat(canvas, prims, mode="min", allowed=LUNG)
        # The core of each lucency: its rim is shared with surrounding lung by partial volume.
        return _mask_of(res, rel=0.8, floor=0.8)

    return Plan(
        LABELS[7],
        _side_name(pts[:, 0], anat.xm),
        _lobe_name(lobes),
        float(2 * rad.max()),
        pts[big],
        extra,
        draw=draw,
    )


# --- 8 Atelectasis ---------------------------------------------------------------------------


def _plan_atelectasis(anat: Anatomy, rng: np.random.Generator, occ: Occupied) -> Plan:
    k = anat.k
    kind = str(rng.choice(["subsegmental", "segmental"], p=[0.6, 0.4]))
    where = str(
        rng.choice(["dependent lower lobe", "lingula/middle lobe", "upper lobe"], p=[0.7, 0.2, 0.1])
    )
    side = -1 if rng.random() < 0.5 else 1
    t_r, psi_r = {
        "dependent lower lobe": ((0.08, 0.4), (0.45, 1.1)),
        "lingula/middle lobe": ((0.3, 0.45), (2.2, 2.7)),
        "upper lobe": ((0.65, 0.85), (0.8, 2.2)),
    }[where]
    _, _, t, psi = _costal(anat, rng, occ, side, t_r, psi_r, 8.0)
    length = float(rng.uniform(20.0, 45.0) if kind == "subsegmental" else rng.uniform(40, 70))
    spread = float(rng.uniform(12.0, 25.0) if kind == "subsegmental" else rng.uniform(25, 45))
    thick = float(rng.uniform(2.0, 4.0) if kind == "subsegmental" else rng.uniform(5.0, 9.0))
    base, _ = anat.costal_point(side, t, psi, -4.0 * k)
    hil = anat.hilum(side)
    dirv = hil - base
    dirv /= max(1e-9, float(np.linalg.norm(dirv)))
    apex = base + dirv * length
    # Spread the base along the wall, in the plane of the wedge.
    along = np.cross(dirv, [0.0, 0.0, 1.0]) if kind == "subsegmental" else _perp(dirv, rng)
    along /= max(1e-9, float(np.linalg.norm(along)))
    m = 5
    offs = np.linspace(-0.5, 0.5, m) * spread
    a = np.repeat(apex[None, :], m, axis=0)
    b = base[None, :] + offs[:, None] * along[None, :]
    prims = Prims(
        a,
        b,
        np.full(m, 0.8),
        np.full(m, thick),
        np.full(m, float(rng.uniform(20.0, 45.0))),
        np.zeros(m, dtype=np.int64),
    )
    center_probe = base + dirv * (0.3 * length)
    extra = {"type": kind, "location": where, "length_mm": length, "hu_range": (20, 45)}
    lobe = anat.lobe_of(center_probe[None, :], np.array([side], dtype=np.int64))
    lobe_name = _lobe_name({int(lobe[0])}) if int(lobe[0]) else None

    def draw(canvas: Canvas, heart: HeartSpec) -> I64:
        res = splat(canvas, prims, mode="max", allowed=frozenset(_LUNG_AND_VESSELS))
        return _mask_of(res)

    return Plan(
        LABELS[8],
        "right" if side < 0 else "left",
        lobe_name,
        length,
        center_probe,
        extra,
        draw=draw,
    )


# --- 9 Lung nodule ----------------------------------------------------------------------------


def _plan_nodule(anat: Anatomy, rng: np.random.Generator, occ: Occupied) -> Plan:
    n = int(rng.choice([1, 2, 3, 4], p=[0.7, 0.18, 0.08, 0.04]))
    parts: list[Prims] = []
    info: list[dict[str, Any]] = []
    centers = []
    diam = []
    for i in range(n):
        d = float(np.clip(rng.lognormal(math.log(7.0), 0.5), 4.0, 30.0))
        kind = str(rng.choice(["solid", "calcified", "part-solid"], p=[0.8, 0.1, 0.1]))
        if kind == "calcified":
            d = min(d, 10.0)
        lobes = _UPPER if rng.random() < 0.55 else _ALL_LOBES
        p = _lung_points(anat, rng, occ, 1, lobes=lobes, t_range=(0.05, 0.97))
        if p.shape[0] == 0:
            p = _lung_points(anat, rng, occ, 1)
        c = p[0]
        r = d / 2.0
        if kind == "solid":
            val = float(rng.uniform(20.0, 50.0))
            parts.append(sphere_prims(c[None, :], r, val, i))
            if d >= 10.0:
                for _ in range(int(rng.integers(2, 4))):
                    u = _perp(np.array([0.0, 0.0, 1.0]), rng) + rng.normal(0, 0.4, 3)
                    u /= np.linalg.norm(u)
                    parts.append(sphere_prims((c + u * 0.45 * r)[None, :], 0.6 * r, val, i))
            if d >= 12.0 and rng.random() < 0.6:
                for _ in range(int(rng.integers(4, 9))):
                    u = rng.normal(0, 1, 3)
                    u /= np.linalg.norm(u)
                    ln = r * float(rng.uniform(0.5, 1.0))
                    parts.append(
                        Prims(
                            (c + u * 0.8 * r)[None, :],
                            (c + u * (r + ln))[None, :],
                            np.array([0.9]),
                            np.array([0.4]),
                            np.array([val]),
                            np.array([i], dtype=np.int64),
                        )
                    )
        elif kind == "calcified":
            parts.append(sphere_prims(c[None, :], r, float(rng.uniform(250.0, 700.0)), i))
        else:
            parts.append(sphere_prims(c[None, :], r, float(rng.uniform(-600.0, -450.0)), i))
            parts.append(sphere_prims(c[None, :], 0.45 * r, float(rng.uniform(10.0, 40.0)), i))
        side = int(anat.lung_side_at(c[None, :])[0])
        lobe = int(anat.lobe_of(c[None, :], np.array([side], dtype=np.int64))[0])
        info.append(
            {
                "diameter_mm": round(d, 1),
                "type": kind,
                "lobe": LOBE_NAMES.get(lobe),
                "world_mm": c.tolist(),
            }
        )
        centers.append(c)
        diam.append(d)
    prims = concat_prims(parts)
    big = int(np.argmax(diam))
    cs = np.array(centers)
    lobes_all = {int(v) for v in anat.lobe_at(cs)}
    extra = {"count": n, "nodules": info, "diameters_mm": [round(v, 1) for v in diam]}

    def draw(canvas: Canvas, heart: HeartSpec) -> I64:
        res = splat(canvas, prims, mode="max", allowed=frozenset(_LUNG_AND_VESSELS))
        return _mask_of(res)

    return (
        Plan(
            LABELS[9],
            _side_name(cs[:, 0], anat.xm),
            LOBE_NAMES.get(int(anat.lobe_at(cs[big][None, :])[0])),
            float(max(diam)),
            cs[big],
            extra,
            draw=draw,
        )
        if lobes_all
        else Plan(LABELS[9], None, None, float(max(diam)), cs[big], extra, draw=draw)
    )


# --- 10 Lung opacity (ground glass), 15 Consolidation ----------------------------------------


def _blob(
    anat: Anatomy, rng: np.random.Generator, center: F64, size: float, n: int
) -> tuple[F64, F64]:
    """A cluster of overlapping spheres: an irregular patch about ``size`` mm across."""
    r = rng.uniform(0.3, 0.5, n) * size
    off = rng.normal(0.0, 0.22 * size, (n, 3))
    off[0] = 0.0
    return center + off, r


def _plan_opacity(anat: Anatomy, rng: np.random.Generator, occ: Occupied) -> Plan:
    n_patch = int(rng.choice([1, 2, 3, 4], p=[0.4, 0.3, 0.2, 0.1]))
    peripheral = rng.random() < 0.6
    cs, rs, vals, groups = [], [], [], []
    sizes = []
    for g in range(n_patch):
        size = float(rng.uniform(15.0, 70.0))
        side = -1 if rng.random() < 0.5 else 1
        if peripheral:
            cands = np.array(
                [
                    _costal(anat, rng, occ, side, (0.1, 0.85), (0.4, 2.7), 0.35 * size)[0]
                    for _ in range(6)
                ]
            )
        else:
            cands = _lung_points(anat, rng, occ, 6, side=side)
        c = _roomy(anat, rng, occ, cands, 0.4 * size)
        cc, rr = _blob(anat, rng, c, size, int(rng.integers(4, 10)))
        v = float(rng.uniform(-620.0, -420.0))
        cs.append(cc)
        rs.append(rr)
        vals.append(np.full(rr.size, v))
        groups.append(np.full(rr.size, g))
        sizes.append(size)
    c_all, r_all = np.concatenate(cs), np.concatenate(rs)
    v_all, g_all = np.concatenate(vals), np.concatenate(groups)
    # Ground glass is patchy (each lobule has its own density) and fades into the lung around
    # it: a fainter rim (0.6 of the density) surrounds every lobule of the patch.
    v_all = anat.lung_hu + rng.uniform(0.75, 1.0, v_all.size) * (v_all - anat.lung_hu)
    rim = anat.lung_hu + 0.6 * (v_all - anat.lung_hu)
    rim_p = sphere_prims(c_all, r_all * 1.2, rim, g_all)
    core_p = sphere_prims(c_all, r_all, v_all, g_all)
    big = int(np.argmax(sizes))
    center = cs[big][0]
    lobes = {int(v) for v in anat.lobe_at(np.array([c[0] for c in cs]))}
    extra = {
        "pattern": "ground-glass",
        "count": n_patch,
        "peripheral": peripheral,
        "hu_range": (-620, -420),
    }

    def draw(canvas: Canvas, heart: HeartSpec) -> I64:
        # The rims contain the cores, so the rims alone give the mask.
        res = splat(canvas, rim_p, mode="max", allowed=LUNG)
        splat(canvas, core_p, mode="max", allowed=LUNG, collect=False)
        return _mask_of(res)

    return Plan(
        LABELS[10],
        _side_name(np.array([c[0][0] for c in cs]), anat.xm),
        _lobe_name(lobes),
        float(max(sizes)),
        center,
        extra,
        draw=draw,
    )


def _plan_consolidation(anat: Anatomy, rng: np.random.Generator, occ: Occupied) -> Plan:
    lobe = int(
        rng.choice(
            [int(Lobe.RLL), int(Lobe.LLL), int(Lobe.RML), int(Lobe.RUL), int(Lobe.LUL)],
            p=[0.3, 0.25, 0.15, 0.15, 0.15],
        )
    )
    side = -1 if lobe in (Lobe.RUL, Lobe.RML, Lobe.RLL) else 1
    size = float(rng.uniform(25.0, 80.0))
    cands = _lung_points(anat, rng, occ, 8, side=side, lobes={lobe})
    if cands.shape[0] == 0:
        cands = _lung_points(anat, rng, occ, 8, side=side)
    c = _roomy(anat, rng, occ, cands, 0.4 * size)[None, :]
    cc, rr = _blob(anat, rng, c[0], size, int(rng.integers(3, 7)))
    val = float(rng.uniform(20.0, 45.0))
    prims = sphere_prims(cc, rr, val)
    sides = np.full(1, side, dtype=np.int64)
    c2 = cc
    r2 = (rr + 1.0) ** 2

    def in_region(x: Any, y: Any, z: Any) -> BoolArray:
        pts = np.stack([x, y, z], axis=-1).astype(np.float64)
        inside = np.zeros(x.shape, dtype=bool)
        for j in range(c2.shape[0]):
            d = pts - c2[j]
            inside |= (d * d).sum(axis=-1) <= r2[j]
        lb = anat.lobe_of(pts, np.broadcast_to(sides, x.shape))
        out: BoolArray = inside & (lb == lobe)
        return out

    def in_lobe(x: Any, y: Any, z: Any) -> BoolArray:
        pts = np.stack([x, y, z], axis=-1).astype(np.float64)
        out: BoolArray = anat.lobe_of(pts, np.broadcast_to(sides, x.shape)) == lobe
        return out

    def draw(canvas: Canvas, heart: HeartSpec) -> I64:
        res = splat(
            canvas,
            prims,
            mode="max",
            allowed=frozenset(_LUNG_AND_VESSELS | {T.AIRWAY_WALL}),
            entry_filter=in_lobe,
        )
        # Air bronchograms: the airways keep their air inside the consolidated lung, down to
        # branches that are invisible in aerated lung.
        tr = anat.trees()["bronchi_" + ("right" if side < 0 else "left")]
        if len(tr):
            mid = (tr.start + tr.end) / 2
            near = np.zeros(len(tr), dtype=bool)
            for j in range(c2.shape[0]):
                near |= ((mid - c2[j]) ** 2).sum(axis=1) <= (rr[j] + 10.0) ** 2
            if near.any():
                geo = bronchus_geometry(tr)
                lum = Prims(
                    tr.start[near],
                    tr.end[near],
                    geo.lumen[near],
                    0.9 * geo.lumen[near],
                    np.full(int(near.sum()), -950.0),
                )
                splat(
                    canvas,
                    lum,
                    mode="min",
                    allowed=frozenset(LUNG | {T.AIRWAY_WALL, T.AIRWAY}),
                    entry_filter=in_region,
                )
        return _mask_of(res)

    extra = {"lobe_bounded": True, "air_bronchograms": True, "hu_range": (20, 45)}
    return Plan(
        LABELS[15], "right" if side < 0 else "left", LOBE_NAMES[lobe], size, c[0], extra, draw=draw
    )


# --- 11 Pulmonary fibrotic sequela ----------------------------------------------------------


def _plan_fibrosis(anat: Anatomy, rng: np.random.Generator, occ: Occupied) -> Plan:
    upper = rng.random() < 0.5
    side = -1 if rng.random() < 0.5 else 1
    _, _, t0, psi0 = _costal(
        anat, rng, occ, side, (0.65, 0.9) if upper else (0.1, 0.35), (0.5, 2.6), 10.0
    )
    lines: list[Prims] = []
    lengths = []
    n_bands = int(rng.integers(3, 9))
    for _ in range(n_bands):
        t = t0 + float(rng.normal(0, 0.05))
        psi = psi0 + float(rng.normal(0, 0.25))
        p0, nrm = anat.costal_point(side, t, psi, 1.0)
        ln = float(rng.uniform(15.0, 45.0))
        d = -nrm + rng.normal(0.0, 0.35, 3)
        d /= np.linalg.norm(d)
        bend = _perp(d, rng) * ln * float(rng.uniform(0.05, 0.2))
        pts = np.vstack([p0, p0 + d * ln * 0.5 + bend, p0 + d * ln])
        lines.append(
            polyline_prims(pts, float(rng.uniform(0.8, 1.6)), float(rng.uniform(-20.0, 40.0)))
        )
        lengths.append(ln)
    # Reticulation: a net of short thin lines near the pleura.
    n_ret = int(rng.integers(15, 40))
    p0, _ = anat.costal_points(
        np.full(n_ret, float(side)),
        t0 + rng.normal(0, 0.05, n_ret),
        psi0 + rng.normal(0, 0.3, n_ret),
        rng.uniform(1.0, 18.0, n_ret),
    )
    dirs = rng.normal(0.0, 1.0, (n_ret, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    lens: F64 = rng.uniform(4.0, 10.0, n_ret)
    r_ret = rng.uniform(0.5, 0.8, n_ret)
    lines.append(
        Prims(p0, p0 + dirs * lens[:, None], r_ret, r_ret, rng.uniform(-20.0, 40.0, n_ret))
    )
    prims = concat_prims(lines)
    center = anat.costal_point(side, t0, psi0, 8.0)[0]
    lobe = int(anat.lobe_of(center[None, :], np.array([side], dtype=np.int64))[0])
    extra = {
        "pattern": "parenchymal bands and reticulation",
        "zone": "upper" if upper else "lower",
        "bands": n_bands,
        "extent_mm": float(max(lengths)),
    }

    def draw(canvas: Canvas, heart: HeartSpec) -> I64:
        res = splat(canvas, prims, mode="max", allowed=frozenset(_LUNG_AND_VESSELS))
        return _mask_of(res)

    return Plan(
        LABELS[11],
        "right" if side < 0 else "left",
        LOBE_NAMES.get(lobe),
        float(max(lengths)),
        center,
        extra,
        draw=draw,
    )


# --- 12 Pleural effusion --------------------------------------------------------------------


def _plan_pleural_effusion(anat: Anatomy, rng: np.random.Generator, occ: Occupied) -> Plan:
    u = rng.random()
    sides = [-1] if u < 0.4 else ([1] if u < 0.7 else [-1, 1])
    grade = str(rng.choice(["small", "moderate", "large"], p=[0.5, 0.35, 0.15]))
    lo, hi = {"small": (8.0, 20.0), "moderate": (20.0, 45.0), "large": (45.0, 80.0)}[grade]
    layers: list[Layer] = []
    shapes: list[Shape] = []
    thick_all = []
    for s in sides:
        d_max = float(rng.uniform(lo, hi))
        top = min(0.95, 0.25 + d_max / 110.0 + float(rng.uniform(0.0, 0.15)))
        tk = np.linspace(-0.1, top, 14)
        prof = d_max * np.clip(1.0 - np.clip(tk - 0.05, 0.0, None) / (top - 0.05), 0.0, 1.0) ** 0.8
        zk = anat.z(tk)
        cyc, ayc, axc = anat.prof("cyc", tk), anat.prof("ayc", tk), anat.prof("axc", tk)
        # Fluid lies along the posterior wall: the cavity minus the cavity moved forward.
        cav = anat.cavity_shape()
        fwd = Union(
            (
                zellipse(zk, anat.xm, cyc - prof, axc, ayc, power=2.2),
                zellipse(zk, anat.xm, cyc + 0.3 * ayc - prof, 0.97 * axc, 0.7 * ayc, power=3.6),
            )
        )
        box = zellipse(zk, anat.xm + s * 0.5 * axc, cyc, 0.55 * axc + 2.0, 1.2 * ayc)
        shape = _and(AndNot(cav, fwd), box)
        code = T.LUNG_RIGHT if s < 0 else T.LUNG_LEFT
        layers.append(Layer(T.PLEURAL_FLUID, shape, frozenset({code})))
        shapes.append(shape)
        thick_all.append(d_max)
    s0 = sides[int(np.argmax(thick_all))]
    d0 = max(thick_all)
    center = anat.costal_point(s0, 0.1, 0.5, 0.45 * d0)[0]
    side = "bilateral" if len(sides) == 2 else ("right" if sides[0] < 0 else "left")
    extra = {
        "grade": grade,
        "max_thickness_mm": [round(v, 1) for v in thick_all],
        "distribution": "dependent (posterior)",
        "hu_range": (5, 18),
    }
    mask_shape: Shape = shapes[0] if len(shapes) == 1 else Union(tuple(shapes))
    return Plan(
        LABELS[12],
        side,
        None,
        float(d0),
        center,
        extra,
        layers=layers,
        mask_shape=mask_shape,
        mask_codes=frozenset({T.PLEURAL_FLUID}),
    )


# --- 13 Mosaic attenuation -------------------------------------------------------------------


def _plan_mosaic(anat: Anatomy, rng: np.random.Generator, occ: Occupied) -> Plan:
    pattern = str(rng.choice(["lower lobes", "diffuse", "single lobe"], p=[0.4, 0.4, 0.2]))
    if pattern == "lower lobes":
        lobes = _LOWER
    elif pattern == "diffuse":
        lobes = _ALL_LOBES
    else:
        lobes = {int(rng.choice(sorted(_ALL_LOBES)))}
    n = int(rng.integers(25, 70))
    pts = _lung_points(anat, rng, occ, n, lobes=lobes)
    if pts.shape[0] == 0:
        pts = _lung_points(anat, rng, occ, 5)
    r = np.asarray(rng.uniform(8.0, 18.0, pts.shape[0]), dtype=np.float64)
    dark = rng.random(pts.shape[0]) < 0.6
    lung = np.float64(anat.lung_hu)
    v_dark = lung - np.asarray(rng.uniform(60.0, 100.0, pts.shape[0]), dtype=np.float64)
    v_light = lung + np.asarray(rng.uniform(50.0, 90.0, pts.shape[0]), dtype=np.float64)
    g = np.arange(pts.shape[0], dtype=np.int64)
    dark_p = sphere_prims(pts[dark], r[dark], v_dark[dark], g[dark])
    light_p = sphere_prims(pts[~dark], r[~dark], v_light[~dark], g[~dark])
    found = {int(v) for v in anat.lobe_at(pts)}
    extra: dict[str, Any] = {
        "distribution": pattern,
        "lobules": int(pts.shape[0]),
        "low_attenuation_hu": round(float(np.mean(v_dark)), 1),
        "extent_mm": float(np.ptp(pts, axis=0).max() + 2 * r.max()),
    }

    def draw(canvas: Canvas, heart: HeartSpec) -> I64:
        a = splat(canvas, dark_p, mode="min", allowed=LUNG)
        b = splat(canvas, light_p, mode="max", allowed=LUNG)
        return np.concatenate([_mask_of(a), _mask_of(b)])

    return Plan(
        LABELS[13],
        _side_name(pts[:, 0], anat.xm),
        _lobe_name(found),
        float(extra["extent_mm"]),
        pts[int(np.argmax(r))],
        extra,
        draw=draw,
    )


# --- 14 Peribronchial thickening, 16 Bronchiectasis ------------------------------------------


def _pick_bronchi(
    anat: Anatomy, lobes: set[int], min_gen: int, min_radius: float
) -> list[tuple[Tree, npt.NDArray[np.bool_]]]:
    out = []
    for name in ("right", "left"):
        tr = anat.trees()["bronchi_" + name]
        if not len(tr):
            continue
        sel = np.isin(tr.lobe, list(lobes)) & (tr.gen >= min_gen) & (tr.radius >= min_radius)
        if sel.any():
            out.append((tr, sel))
    return out


def _key_bronchus(mids: F64, walls: Prims, occ: Occupied) -> F64:
    """The key image of an airway disease: its largest bronchus in lung that is still there
    (index and mid-points as in ``walls``)."""
    if len(walls) != mids.shape[0] or not len(walls):
        first: F64 = mids[len(mids) // 2]
        return first
    score = np.where(occ(mids), -1.0, walls.ra)
    best: F64 = mids[int(np.argmax(score))]
    return best


def _plan_peribronchial(anat: Anatomy, rng: np.random.Generator, occ: Occupied) -> Plan:
    choice = str(rng.choice(["lower lobes", "diffuse", "single lobe"], p=[0.5, 0.3, 0.2]))
    lobes = (
        _LOWER
        if choice == "lower lobes"
        else (_ALL_LOBES if choice == "diffuse" else {int(rng.choice(sorted(_ALL_LOBES)))})
    )
    factor = float(rng.uniform(2.0, 3.2))
    walls, lumens = [], []
    mids = []
    wall_mm = 0.0
    for tr, sel in _pick_bronchi(anat, lobes, 1, 1.3 * anat.k):
        geo = bronchus_geometry(tr)
        lum = geo.lumen[sel]
        wall = (geo.outer[sel] - lum) * factor + 0.4
        walls.append(
            Prims(
                tr.start[sel],
                tr.end[sel],
                lum + wall,
                0.92 * (lum + wall),
                np.full(int(sel.sum()), anat.hu.values[T.AIRWAY_WALL]),
            )
        )
        lumens.append(
            Prims(tr.start[sel], tr.end[sel], lum, 0.92 * lum, np.full(int(sel.sum()), -1000.0))
        )
        mids.append((tr.start[sel] + tr.end[sel]) / 2)
        wall_mm = max(wall_mm, float(wall.max()))
    wp, lp = concat_prims(walls), concat_prims(lumens)
    m = np.concatenate(mids) if mids else _lung_points(anat, rng, occ, 1)
    center = _key_bronchus(m, wp, occ)
    extra = {
        "distribution": choice,
        "wall_factor": factor,
        "bronchi": len(wp),
        "wall_thickness_mm": wall_mm,
    }

    def draw(canvas: Canvas, heart: HeartSpec) -> I64:
        res = splat(canvas, wp, mode="max", allowed=frozenset(LUNG | {T.AIRWAY_WALL}))
        lum = splat(canvas, lp, mode="min", allowed=frozenset(LUNG | {T.AIRWAY_WALL, T.AIRWAY}))
        return np.concatenate([_mask_of(res), _mask_of(lum)])

    found = {int(v) for v in anat.lobe_at(m)} if len(m) else set()
    return Plan(
        LABELS[14],
        _side_name(m[:, 0], anat.xm),
        _lobe_name(found or lobes),
        wall_mm,
        center,
        extra,
        draw=draw,
    )


def _plan_bronchiectasis(anat: Anatomy, rng: np.random.Generator, occ: Occupied) -> Plan:
    choice = str(rng.choice(["lower lobes", "single lobe"], p=[0.5, 0.5]))
    lobes = _LOWER if choice == "lower lobes" else {int(rng.choice(sorted(_ALL_LOBES)))}
    kind = str(rng.choice(["cylindrical", "varicose", "cystic"], p=[0.6, 0.25, 0.15]))
    ratio = float(rng.uniform(1.3, 2.2))
    walls, lumens = [], []
    mids = []
    lumen_max = 0.0
    for tr, sel in _pick_bronchi(anat, lobes, 2, 1.0 * anat.k):
        geo = bronchus_geometry(tr)
        ra = tr.radius[sel]
        lum = ratio * ra
        if kind == "varicose":
            lum = lum * rng.uniform(0.8, 1.3, lum.size)
        wall = 0.2 * lum + 0.5
        # The dilated bronchus pushes away from its artery, which keeps its place (the
        # "signet ring": a small artery beside a large airway).
        shift = (lum + wall - geo.outer[sel])[:, None] * tr.offset[sel]
        a, b = tr.start[sel] - shift, tr.end[sel] - shift
        walls.append(
            Prims(
                a, b, lum + wall, lum + wall, np.full(int(sel.sum()), anat.hu.values[T.AIRWAY_WALL])
            )
        )
        lumens.append(Prims(a, b, lum, lum, np.full(int(sel.sum()), -1000.0)))
        if kind == "cystic":
            leaf = tr.npts[sel] <= 3
            if leaf.any():
                rc = rng.uniform(3.0, 6.0, int(leaf.sum()))
                walls.append(sphere_prims(b[leaf], rc + 0.8, anat.hu.values[T.AIRWAY_WALL]))
                lumens.append(sphere_prims(b[leaf], rc, -1000.0))
        mids.append((a + b) / 2)
        lumen_max = max(lumen_max, float(2 * lum.max()))
    wp, lp = concat_prims(walls), concat_prims(lumens)
    m = np.concatenate(mids) if mids else _lung_points(anat, rng, occ, 1)
    center = _key_bronchus(m, wp, occ)
    extra = {
        "type": kind,
        "broncho_arterial_ratio": ratio,
        "distribution": choice,
        "bronchi": len(wp),
    }
    allowed = frozenset(LUNG | {T.AIRWAY_WALL, T.AIRWAY})

    def draw(canvas: Canvas, heart: HeartSpec) -> I64:
        res = splat(canvas, wp, mode="max", allowed=allowed)
        lum = splat(canvas, lp, mode="min", allowed=allowed)
        return np.concatenate([_mask_of(res), _mask_of(lum)])

    found = {int(v) for v in anat.lobe_at(m)} if len(m) else set()
    return Plan(
        LABELS[16],
        _side_name(m[:, 0], anat.xm),
        _lobe_name(found or lobes),
        lumen_max,
        center,
        extra,
        draw=draw,
    )


# --- 17 Interlobular septal thickening ------------------------------------------------------


def _plan_septal(anat: Anatomy, rng: np.random.Generator, occ: Occupied) -> Plan:
    zone = str(rng.choice(["lower", "diffuse", "upper"], p=[0.5, 0.35, 0.15]))
    t_lo, t_hi = {"lower": (0.02, 0.45), "diffuse": (0.05, 0.9), "upper": (0.5, 0.95)}[zone]
    bilateral = rng.random() < 0.7
    sides = [-1, 1] if bilateral else [(-1 if rng.random() < 0.5 else 1)]
    thick = float(rng.uniform(1.0, 2.0))
    # Lobules thicken in patches: a few subpleural zones, each a dense polygonal net.
    zones = []
    for s in sides:
        for _ in range(int(rng.integers(1, 3))):
            _, _, tz, pz = _costal(anat, rng, occ, s, (t_lo, t_hi), (0.35, 2.75), 10.0)
            zones.append((s, tz, pz))
    cs_l, ns_l, rads_l = [], [], []
    for s, tz, pz in zones:
        m = int(rng.integers(70, 130))
        t = np.clip(tz + rng.normal(0.0, 0.06, m), -0.02, 0.98)
        psi = np.clip(pz + rng.normal(0.0, 0.22, m), 0.1, 3.0)
        p, nrm = anat.costal_points(np.full(m, float(s)), t, psi, rng.uniform(2.0, 22.0, m))
        # Most septa stand perpendicular to the pleura (Kerley B-like lines, polygon sides);
        # the rest run parallel to it, closing the polygons.
        tang = np.cross(nrm, rng.normal(0.0, 1.0, (m, 3)))
        tang /= np.maximum(np.linalg.norm(tang, axis=1, keepdims=True), 1e-9)
        perpendicular = rng.random(m) < 0.7
        cs_l.append(p)
        ns_l.append(np.where(perpendicular[:, None], tang, nrm))
        rads_l.append(rng.uniform(4.0, 8.0, m))
    cs = np.concatenate(cs_l)
    ns = np.concatenate(ns_l)
    rads = np.concatenate(rads_l)
    c = cs
    keep = (anat.lung_side_at(c) != 0) & ~occ(c)
    if not keep.any():
        keep[:] = True
    rads_k = rads[keep]
    disks = Disks(
        c[keep],
        ns[keep],
        rads_k,
        np.full(int(keep.sum()), thick / 2.0),
        np.full(int(keep.sum()), float(rng.uniform(20.0, 40.0))),
        np.arange(int(keep.sum()), dtype=np.int64),
    )
    lobes = {int(v) for v in anat.lobe_at(c[keep])}
    extra = {
        "zone": zone,
        "septa": int(keep.sum()),
        "thickness_mm": thick,
        "extent_mm": float(np.ptp(c[keep], axis=0).max()) if keep.sum() > 1 else 20.0,
    }

    def draw(canvas: Canvas, heart: HeartSpec) -> I64:
        res = splat_disks(canvas, disks, mode="max", allowed=LUNG)
        return _mask_of(res)

    return Plan(
        LABELS[17],
        "bilateral" if bilateral else ("right" if sides[0] < 0 else "left"),
        _lobe_name(lobes),
        thick,
        c[keep][int(np.argmax(rads_k))],
        extra,
        draw=draw,
    )


_PLANNERS: dict[str, Callable[[Anatomy, np.random.Generator, Occupied], Plan]] = {
    LABELS[0]: _plan_medical_material,
    LABELS[1]: _plan_arterial_calcification,
    LABELS[2]: _plan_cardiomegaly,
    LABELS[3]: _plan_pericardial_effusion,
    LABELS[4]: _plan_coronary_calcification,
    LABELS[5]: _plan_hiatal_hernia,
    LABELS[6]: _plan_lymphadenopathy,
    LABELS[7]: _plan_emphysema,
    LABELS[8]: _plan_atelectasis,
    LABELS[9]: _plan_nodule,
    LABELS[10]: _plan_opacity,
    LABELS[11]: _plan_fibrosis,
    LABELS[12]: _plan_pleural_effusion,
    LABELS[13]: _plan_mosaic,
    LABELS[14]: _plan_peribronchial,
    LABELS[15]: _plan_consolidation,
    LABELS[16]: _plan_bronchiectasis,
    LABELS[17]: _plan_septal,
}


def plan_finding(anat: Anatomy, label: str, seed: int, occupied: Occupied | None = None) -> Plan:
    """Plan one finding with its own random stream (seed, label).

    ``occupied`` marks where space-occupying findings of the same patient are, so that lung
    lesions land in lung that is still there; without them a finding's plan depends only on
    the anatomy and the seed.
    """
    i = label_index(label)
    rng = np.random.default_rng([seed, 1000 + i])
    return _PLANNERS[label](anat, rng, occupied if occupied is not None else nothing_occupied)


def _lung_points(anat: Anatomy, rng: np.random.Generator, occ: Occupied, n: int, **kw: Any) -> F64:
    """``anat.sample_lung`` avoiding occupied space (falls back to any lung if it must)."""
    got: list[F64] = []
    have = 0
    for _ in range(6):
        p = anat.sample_lung(rng, 2 * (n - have) + 4, **kw)
        p = p[~occ(p)] if p.shape[0] else p
        got.append(p[: n - have])
        have += got[-1].shape[0]
        if have >= n:
            break
    out = np.concatenate(got) if got else np.zeros((0, 3))
    if out.shape[0] < n:
        extra = anat.sample_lung(rng, n, **kw)
        out = np.concatenate([out, extra])
    if out.shape[0] < n:
        # No lung in this field of view (a toy volume): fall back to mid-lung positions, so
        # the finding is planned; it is dropped later if nothing of it can be drawn.
        side = kw.get("side")
        sides = np.array(
            [side if side is not None else (-1 if i % 2 == 0 else 1) for i in range(n)],
            dtype=np.float64,
        )
        t = 0.5
        mid = np.stack(
            [
                anat.xm + sides * 0.5 * float(anat.prof("axc", t)),
                np.full(n, float(anat.prof("cyc", t))),
                np.full(n, float(anat.z(t))),
            ],
            axis=1,
        )
        out = np.concatenate([out, mid])
    return out[:n]


def _costal(
    anat: Anatomy,
    rng: np.random.Generator,
    occ: Occupied,
    side: int,
    t_range: tuple[float, float],
    psi_range: tuple[float, float],
    depth: float,
) -> tuple[F64, F64, float, float]:
    """A point ``depth`` inside the costal pleura, in lung that is free, with its normal."""
    p = nrm = np.zeros(3)
    t = psi = 0.0
    for _ in range(30):
        t = float(rng.uniform(*t_range))
        psi = float(rng.uniform(*psi_range))
        p, nrm = anat.costal_point(side, t, psi, depth)
        if int(anat.lung_side_at(p[None, :])[0]) != 0 and not bool(occ(p[None, :])[0]):
            break
    return p, nrm, t, psi
