"""Procedural adult chest anatomy for the synthetic phantoms.

One `Anatomy` is one patient: body habitus, fat, lung height and volume, heart size and position,
spine, ribs, great vessels and a bronchovascular tree are drawn from the patient's own random
stream. Everything is defined analytically in millimetres (shapes for the large organs, tubes and
spheres for the small ones), so the same patient can be rendered at any size and spacing, and the
anatomy can be queried at arbitrary points: findings are placed with the analytic lung and lobe
maps, which is what keeps "the same seed without this finding" the same chest.

Height is measured as ``t``: 0 at the lowest point of the lungs (the posterior costophrenic
recess), 1 at the lung apices. A scan shorter than the patient's thorax compresses the thorax to
fit (a training volume must contain both lungs); a longer one shows neck and upper abdomen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from engines.data.raster import (
    F64,
    And,
    AndNot,
    Canvas,
    Disks,
    Ellipsoid,
    Grid,
    HalfSpace,
    Layer,
    Periodic,
    Prims,
    Union,
    ZEllipse,
    concat_prims,
    interp,
    labels_at,
    paint_layers,
    polyline_prims,
    sphere_prims,
    splat,
    splat_disks,
    zellipse,
)

__all__ = [
    "CAVITY",
    "LOBE_NAMES",
    "LUNG",
    "Anatomy",
    "HeartSpec",
    "Lobe",
    "Tissue",
    "Tree",
]

I64 = npt.NDArray[np.int64]


class Tissue(IntEnum):
    """Labels of the tissue map (`Phantom.tissue`), one byte per voxel."""

    AIR = 0
    TABLE = 1
    SKIN = 2
    FAT = 3
    GLAND = 4
    MUSCLE = 5
    MEDIASTINUM = 6
    LUNG_RIGHT = 7
    LUNG_LEFT = 8
    ABDOMEN = 9
    LIVER = 10
    SPLEEN = 11
    STOMACH = 12
    GAS = 13
    PERICARDIUM = 14
    PERICARDIAL_FLUID = 15
    EPICARDIAL_FAT = 16
    HEART = 17
    VESSEL = 18
    ESOPHAGUS = 19
    AIRWAY = 20
    AIRWAY_WALL = 21
    CORTICAL_BONE = 22
    MARROW = 23
    DISC = 24
    CANAL = 25
    CARTILAGE = 26
    THYROID = 27
    PLEURAL_FLUID = 28
    KIDNEY = 29
    NODE = 30


T = Tissue
LUNG = frozenset({T.LUNG_RIGHT.value, T.LUNG_LEFT.value})
#: Labels inside the thoracic and abdominal cavities (what the heart and organs may displace).
CAVITY = frozenset(
    {
        T.MEDIASTINUM,
        T.LUNG_RIGHT,
        T.LUNG_LEFT,
        T.ABDOMEN,
        T.LIVER,
        T.SPLEEN,
        T.STOMACH,
        T.GAS,
        T.MUSCLE,
        T.VESSEL,
        T.ESOPHAGUS,
    }
)


class Lobe(IntEnum):
    NONE = 0
    RUL = 1
    RML = 2
    RLL = 3
    LUL = 4
    LLL = 5


LOBE_NAMES: dict[int, str] = {
    Lobe.RUL: "right upper lobe",
    Lobe.RML: "right middle lobe",
    Lobe.RLL: "right lower lobe",
    Lobe.LUL: "left upper lobe",
    Lobe.LLL: "left lower lobe",
}

# Height knots (t) for the profiles of the trunk, from the upper abdomen to the neck.
_T = np.array([-3.0, -0.5, -0.1, 0.0, 0.15, 0.3, 0.5, 0.7, 0.85, 0.95, 1.02, 1.1, 1.2, 1.35, 3.0])
_BODY_X = np.array(
    [0.97, 0.98, 1.0, 1.0, 1.01, 1.01, 1.0, 0.98, 0.95, 0.9, 0.82, 0.68, 0.52, 0.45, 0.45]
)
_BODY_Y = np.array(
    [1.0, 0.99, 0.98, 0.98, 0.98, 0.97, 0.96, 0.94, 0.9, 0.86, 0.8, 0.72, 0.64, 0.6, 0.6]
)
_CAV_X = np.array(
    [0.96, 0.98, 1.0, 1.0, 1.0, 1.0, 0.98, 0.93, 0.84, 0.72, 0.56, 0.36, 0.28, 0.26, 0.26]
)
# Skin to vertebral-body centre, posteriorly (spinous process and paraspinal muscles), mm.
_SPINE_DEPTH = np.array([62, 62, 60, 60, 58, 57, 56, 56, 55, 53, 50, 44, 38, 36, 36], float)
_VERT_R = np.array([23, 22, 20, 19.5, 19, 18, 17, 16, 15, 14, 12.5, 11, 10, 10, 10], float)
# The neck sits over the cervical spine, posterior to the chest's centre.
_NECK_SHIFT = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0.02, 0.05, 0.1, 0.16, 0.18, 0.18])


def _draw(canvas: Canvas, prims: Prims, **kw: Any) -> None:
    """Anatomy is drawn without keeping a report of the voxels (only findings need masks)."""
    splat(canvas, prims, collect=False, **kw)


def _draw_disks(canvas: Canvas, disks: Disks, **kw: Any) -> None:
    splat_disks(canvas, disks, collect=False, **kw)


def m_lat_w(k: float) -> float:
    """Thickness of the lateral chest wall inside the subcutaneous fat (muscle and ribs)."""
    return 13.0 * k


def _unit(v: F64) -> F64:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    out: F64 = v / np.maximum(n, 1e-12)
    return out


# The heart as a union of ellipsoids in its own frame (long axis e1 towards the apex, e2 in
# plane, z): ventricles, right atrium at the right border, left atrium posteriorly. Offsets and
# axes are in units of the ventricles' semi-axes (a, b, c).
_HEART_PARTS: tuple[tuple[tuple[float, float, float], tuple[float, float, float]], ...] = (
    ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    ((-0.52, -0.2, 0.12), (0.45, 0.6, 0.58)),
    ((-0.5, 0.55, 0.38), (0.36, 0.48, 0.42)),
)


@dataclass(frozen=True)
class HeartSpec:
    """The heart as nested shells: myocardium and blood, epicardial fat, an optional
    pericardial effusion (thickest posteriorly, where fluid settles in a supine patient) and the
    pericardium. Each shell is the union of the parts grown by a thickness."""

    center: tuple[float, float, float]
    a: float
    b: float
    c: float
    theta: float
    epi: float
    peri: float = 1.5
    fluid: float = 0.0

    def _frame(self) -> tuple[F64, F64]:
        ct, st = math.cos(self.theta), math.sin(self.theta)
        return np.array([ct, st, 0.0]), np.array([-st, ct, 0.0])

    def parts(self, extra: float, shift_y: float = 0.0,
              core_shift: tuple[float, float] = (0.0, 0.0)) -> list[Ellipsoid]:
        e1, e2 = self._frame()
        out = []
        for off, ax in _HEART_PARTS:
            c = (np.asarray(self.center) + off[0] * self.a * e1 + off[1] * self.b * e2
                 + np.array([0.0, shift_y, off[2] * self.c]))
            c = c + core_shift[0] * e1 + core_shift[1] * e2
            axes = (ax[0] * self.a + extra, ax[1] * self.b + extra, ax[2] * self.c + extra)
            out.append(Ellipsoid((float(c[0]), float(c[1]), float(c[2])), axes, self.theta))
        return out

    def shell(self, extra: float, shift_y: float = 0.0,
              core_shift: tuple[float, float] = (0.0, 0.0)) -> Union:
        return Union(tuple(self.parts(extra, shift_y, core_shift)))

    def transverse_diameter(self) -> float:
        """Widest left-right extent of the heart including epicardial fat (the CTR numerator),
        measured on axial sections as a radiologist does."""
        parts = self.parts(self.epi)
        zlo = min(p.center[2] - p.axes[2] for p in parts)
        zhi = max(p.center[2] + p.axes[2] for p in parts)
        zs = np.linspace(zlo, zhi, 256)
        lo = np.full(zs.shape, np.inf)
        hi = np.full(zs.shape, -np.inf)
        ct, st = math.cos(self.theta), math.sin(self.theta)
        for p in parts:
            a, b, c = p.axes
            w = 1.0 - ((zs - p.center[2]) / c) ** 2
            ok = w > 0
            hw = np.sqrt(np.where(ok, w, 0.0)) * math.hypot(a * ct, b * st)
            lo = np.where(ok, np.minimum(lo, p.center[0] - hw), lo)
            hi = np.where(ok, np.maximum(hi, p.center[0] + hw), hi)
        width = np.where(np.isfinite(lo), hi - lo, 0.0)
        return float(width.max())

    def surface_point(self, u: F64, phi: F64, extra: float) -> F64:
        """Points on the ventricles' surface (+ ``extra`` mm): ``u`` along the long axis (-1
        base, +1 apex), ``phi`` around it (0 towards e2, pi/2 superior)."""
        e1, e2 = self._frame()
        e3 = np.array([0.0, 0.0, 1.0])
        rr = np.sqrt(np.clip(1.0 - u * u, 0.0, 1.0))
        a, b, c = self.a + extra, self.b + extra, self.c + extra
        out: F64 = (
            np.asarray(self.center)
            + (u * a)[..., None] * e1
            + (rr * np.cos(phi) * b)[..., None] * e2
            + (rr * np.sin(phi) * c)[..., None] * e3
        )
        return out


@dataclass
class Tree:
    """A binary branching tree of straight branches (one per node), parent before child."""

    start: F64
    end: F64
    radius: F64
    parent: I64
    gen: I64
    lobe: I64
    offset: F64  # unit vector perpendicular to each branch: where its companion artery runs
    npts: I64

    def __len__(self) -> int:
        return int(self.start.shape[0])

    @staticmethod
    def empty() -> Tree:
        z3 = np.zeros((0, 3))
        zi = np.zeros(0, dtype=np.int64)
        return Tree(z3, z3, np.zeros(0), zi, zi, zi, z3, zi)


def grow_tree(
    rng: np.random.Generator,
    points: F64,
    groups: I64,
    roots: F64,
    r0: float,
    lobe_fn: Any,
    *,
    n_min: int = 2,
    alpha: float = 0.5,
    max_levels: int = 14,
) -> Tree:
    """Grow a space-filling tree into a cloud of territory points.

    Each branch owns a set of points; it grows part of the way towards their centroid, then
    splits them in two across their widest spread perpendicular to itself, and each half gets a
    child. Radii follow Murray's law on the territory size. Real airways and arteries are built
    the same way (they supply volume evenly), so the result has the right look in any section:
    thick hilar branches, tapering dots and lines towards the pleura. Every step is vectorised
    over all branches of a level.
    """
    n_total = max(1, points.shape[0])
    starts_l: list[F64] = []
    ends_l: list[F64] = []
    rad_l: list[F64] = []
    par_l: list[I64] = []
    gen_l: list[I64] = []
    off_l: list[F64] = []
    cnt_l: list[I64] = []
    g = groups.astype(np.int64).copy()
    pts = points
    n_groups = int(roots.shape[0])
    start = roots.astype(np.float64).copy()
    parent = np.full(n_groups, -1, dtype=np.int64)
    prev_off = np.zeros((n_groups, 3))
    next_id = 0
    for level in range(max_levels):
        if n_groups == 0 or pts.shape[0] == 0:
            break
        cnt = np.bincount(g, minlength=n_groups).astype(np.int64)
        safe = np.maximum(cnt, 1).astype(np.float64)
        cen = np.stack([np.bincount(g, pts[:, k], n_groups) / safe for k in range(3)], axis=1)
        terminal = (cnt <= n_min) | (level == max_levels - 1)
        frac = np.where(terminal, 1.0, alpha)
        end = start + (cen - start) * frac[:, None]
        d = _unit(end - start)
        # Companion offset: the parent's, made perpendicular to this branch.
        off = prev_off - (prev_off * d).sum(axis=1, keepdims=True) * d
        bad = np.linalg.norm(off, axis=1) < 1e-3
        if bad.any():
            alt = np.cross(d[bad], np.array([0.0, 0.0, 1.0]))
            alt_bad = np.linalg.norm(alt, axis=1) < 1e-3
            alt[alt_bad] = np.cross(d[bad][alt_bad], np.array([1.0, 0.0, 0.0]))
            off[bad] = alt
        off = _unit(off)
        ids = np.arange(next_id, next_id + n_groups, dtype=np.int64)
        next_id += n_groups
        starts_l.append(start)
        ends_l.append(end)
        rad_l.append(r0 * (cnt / n_total) ** (1.0 / 2.7))
        par_l.append(parent)
        gen_l.append(np.full(n_groups, level, dtype=np.int64))
        off_l.append(off)
        cnt_l.append(cnt)
        # Split every non-terminal group across its widest perpendicular spread.
        live_group = ~terminal
        keep = live_group[g]
        pts, g = pts[keep], g[keep]
        if pts.shape[0] == 0:
            break
        q = pts - cen[g]
        dg = d[g]
        q = q - (q * dg).sum(axis=1, keepdims=True) * dg
        v = _unit(np.cross(d, rng.standard_normal((n_groups, 3))))
        for _ in range(3):
            proj = (q * v[g]).sum(axis=1)
            nv = np.stack([np.bincount(g, proj * q[:, k], n_groups) for k in range(3)], axis=1)
            ok = np.linalg.norm(nv, axis=1) > 1e-9
            v[ok] = _unit(nv[ok])
        proj = (q * v[g]).sum(axis=1)
        order = np.lexsort((proj, g))
        gs = g[order]
        first = np.searchsorted(gs, gs, side="left")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size) - first
        left = rank < (cnt[g] // 2)
        live_ids = np.flatnonzero(live_group)
        slot = np.full(n_groups, -1, dtype=np.int64)
        slot[live_ids] = np.arange(live_ids.size)
        g = 2 * slot[g] + left.astype(np.int64)
        start = np.repeat(end[live_ids], 2, axis=0)
        parent = np.repeat(ids[live_ids], 2)
        prev_off = np.repeat(off[live_ids], 2, axis=0)
        n_groups = 2 * live_ids.size
        # Drop children that received no points (odd splits of tiny groups).
        cnt_new = np.bincount(g, minlength=n_groups)
        if (cnt_new == 0).any():
            alive = cnt_new > 0
            remap = np.cumsum(alive) - 1
            g = remap[g]
            start, parent, prev_off = start[alive], parent[alive], prev_off[alive]
            n_groups = int(alive.sum())
    if not starts_l:
        return Tree.empty()
    s = np.concatenate(starts_l)
    e = np.concatenate(ends_l)
    lobes = np.asarray(lobe_fn((s + e) / 2.0), dtype=np.int64)
    return Tree(
        s,
        e,
        np.concatenate(rad_l),
        np.concatenate(par_l),
        np.concatenate(gen_l),
        lobes,
        np.concatenate(off_l),
        np.concatenate(cnt_l),
    )


@dataclass
class Hu:
    """Per-patient attenuation of each tissue (HU), drawn within physiological ranges."""

    values: dict[int, float] = field(default_factory=dict)

    def lut(self) -> npt.NDArray[np.float32]:
        out = np.full(256, -1000.0, dtype=np.float32)
        for k, v in self.values.items():
            out[k] = v
        return out


class Anatomy:
    """One patient's chest, in world millimetres of a given grid."""

    def __init__(self, grid: Grid, rng: np.random.Generator) -> None:
        self.grid = grid
        _, sy, sx = grid.spacing
        ex, ey, ez = grid.extent_mm()
        female = bool(rng.random() < 0.45)
        age = float(20.0 + 70.0 * rng.beta(2.4, 1.8))
        size = float(np.clip(rng.normal(1.0, 0.07), 0.86, 1.16)) * (0.94 if female else 1.03)
        fat = float(rng.uniform(4.0, 30.0)) * (1.15 if female else 1.0)
        bx = 148.0 * size * float(rng.uniform(0.94, 1.06)) + 0.8 * fat
        by = bx * float(rng.uniform(0.68, 0.8))
        dx = float(rng.uniform(-12.0, 12.0))
        dy = float(rng.uniform(-8.0, 12.0))
        # Shrink the whole patient in-plane only when the field of view cannot hold it.
        hx, hy = (ex + sx) / 2.0, (ey + sy) / 2.0
        fit = min(1.0, 0.96 * hx / (bx * 1.02 + abs(dx)), 0.96 * hy / (by + abs(dy) + 8.0))
        # In-plane scale applied to every fixed anatomical length below.
        self.k = size * fit
        kk = self.k
        bx, by, dx, dy, fat = bx * fit, by * fit, dx * fit, dy * fit, fat * fit
        # Height: lungs from the posterior recess to the apex, with some abdomen below and some
        # neck above. A short scan compresses the thorax so that both lungs stay in it.
        lung_h = 250.0 * size * float(rng.uniform(0.9, 1.1))
        below = float(rng.uniform(25.0, 45.0))
        above = float(rng.uniform(15.0, 30.0))
        need = lung_h + below + above
        split = float(rng.uniform(0.3, 0.75))
        if ez >= need:
            z_base = below + (ez - need) * split
        elif ez >= 0.5 * need:
            f = ez / need
            lung_h, below = lung_h * f, below * f
            z_base = below
        else:
            # Far too short for a thorax (a few slices): a partial scan through mid-chest.
            z_base = ez / 2.0 - 0.5 * lung_h
        self.H = lung_h
        self.z_base = z_base
        self.female = female
        self.age = age
        self.size = size
        self.fit = fit
        xm = ex / 2.0 + dx
        self.xm = xm
        cyb0 = ey / 2.0 + dy
        tk = _T
        self.zk = self.z(tk)
        self.bx_k = bx * _BODY_X
        self.by_k = by * _BODY_Y
        self.cyb_k = cyb0 + by * _NECK_SHIFT
        f_lat = fat
        f_ant = fat * float(rng.uniform(0.5, 0.85))
        f_post = fat * float(rng.uniform(0.7, 1.05))
        self.f_lat, self.f_ant, self.f_post = f_lat, f_ant, f_post
        pect = (12.0 if not female else 7.0) * kk * np.clip((tk - 0.45) / 0.3, 0, 1) * np.clip(
            (1.25 - tk) / 0.2, 0, 1
        )
        self.rvb_k = _VERT_R * kk
        self.yv_k = self.cyb_k + self.by_k - f_post - _SPINE_DEPTH * kk
        self.yant_k = self.cyb_k - self.by_k + f_ant + 13.0 * kk + pect
        self.ypost_k = self.yv_k + self.rvb_k + 14.0 * kk
        self.cyc_k = (self.yant_k + self.ypost_k) / 2.0
        self.ayc_k = (self.ypost_k - self.yant_k) / 2.0
        m_lat = m_lat_w(kk)
        self.axc0 = float(bx - f_lat - m_lat)
        self.axc_k = self.axc0 * _CAV_X
        # Cardiothoracic geometry: the widest internal diameter of the thorax over the lungs.
        self.thorax_width = 2.0 * float(np.max(self.axc_k[(tk >= 0) & (tk <= 1)]))
        self.ctr_normal = float(rng.uniform(0.41, 0.49))
        self.heart_theta = -float(rng.uniform(0.5, 0.8))
        self.epi = float(rng.uniform(2.0, 5.0) + 0.03 * max(0.0, age - 40.0)) * kk
        self.t_carina = float(rng.uniform(0.58, 0.64))
        self.t_dome_r = float(rng.uniform(0.19, 0.27))
        self.t_dome_l = self.t_dome_r - float(rng.uniform(0.03, 0.08))
        self.lung_hu = float(rng.uniform(-880.0, -840.0))
        self.lung_gradient = float(rng.uniform(30.0, 70.0))
        self.vertebra_phase = float(rng.uniform(0.0, 1.0))
        age_f = max(0.0, age - 40.0)
        self.r_aa = (14.0 + 0.06 * age_f + float(rng.uniform(-1.5, 1.5))) * kk
        self.r_ad = (11.0 + 0.05 * age_f + float(rng.uniform(-1.0, 1.0))) * kk
        self.rng_tree_seed = int(rng.integers(0, 2**31))
        self.hu = self._draw_hu(rng, age)
        self.vessel_r0 = float(rng.uniform(9.0, 11.0)) * kk
        self.vein_r0 = float(rng.uniform(8.0, 10.0)) * kk
        self.node_rng_seed = int(rng.integers(0, 2**31))
        self.esophagus_air = bool(rng.random() < 0.4)
        self.breast = float(rng.uniform(0.6, 1.2))
        self.coronary_phase = float(rng.uniform(-0.2, 0.2))
        self._normal_layers: list[Layer] | None = None
        self._trees: dict[str, Tree] | None = None
        self._coarse: tuple[npt.NDArray[np.uint8], Grid] | None = None
        self._hearts: dict[tuple[float | None, float], HeartSpec] = {}

    # --- profiles -----------------------------------------------------------------------------

    def z(self, t: F64 | float) -> F64:
        """World z (mm) of height t."""
        out: F64 = self.z_base + np.asarray(t, dtype=np.float64) * self.H
        return out

    def t_of(self, z: F64 | float) -> F64:
        out: F64 = (np.asarray(z, dtype=np.float64) - self.z_base) / self.H
        return out

    def prof(self, name: str, t: F64 | float) -> F64:
        """A trunk profile (e.g. ``axc``, ``cyc``, ``yv``) at heights t."""
        return interp(np.asarray(t, dtype=np.float64), _T, getattr(self, name + "_k"))

    def _draw_hu(self, rng: np.random.Generator, age: float) -> Hu:
        u = rng.uniform
        cart = 110.0 + min(250.0, 4.0 * max(0.0, age - 35.0))
        fat = float(u(-112.0, -88.0))
        blood = float(u(35.0, 48.0))
        v: dict[int, float] = {
            T.AIR: -1000.0,
            T.TABLE: float(u(-350.0, -200.0)),
            T.SKIN: float(u(20.0, 45.0)),
            T.FAT: fat,
            T.GLAND: float(u(-40.0, 20.0)),
            T.MUSCLE: float(u(42.0, 58.0)),
            T.MEDIASTINUM: fat + float(u(0.0, 15.0)),
            T.LUNG_RIGHT: 0.0,  # set from lung_hu per voxel (dependent gradient)
            T.LUNG_LEFT: 0.0,
            T.ABDOMEN: float(u(-60.0, -20.0)),
            T.LIVER: float(u(50.0, 66.0)),
            T.SPLEEN: float(u(40.0, 52.0)),
            T.STOMACH: float(u(15.0, 35.0)),
            T.GAS: -1000.0,
            T.PERICARDIUM: float(u(30.0, 45.0)),
            T.PERICARDIAL_FLUID: float(u(5.0, 18.0)),
            T.EPICARDIAL_FAT: fat + float(u(-5.0, 10.0)),
            T.HEART: blood + float(u(0.0, 6.0)),
            T.VESSEL: blood,
            T.ESOPHAGUS: float(u(35.0, 50.0)),
            T.AIRWAY: -1000.0,
            T.AIRWAY_WALL: float(u(30.0, 50.0)),
            T.CORTICAL_BONE: float(u(800.0, 1400.0)),
            T.MARROW: float(u(150.0, 320.0)),
            T.DISC: float(u(70.0, 100.0)),
            T.CANAL: float(u(15.0, 35.0)),
            T.CARTILAGE: cart,
            T.THYROID: float(u(85.0, 120.0)),
            T.PLEURAL_FLUID: float(u(5.0, 18.0)),
            T.KIDNEY: float(u(28.0, 40.0)),
            T.NODE: float(u(30.0, 45.0)),
        }
        return Hu(v)

    # --- landmarks --------------------------------------------------------------------------

    def y_trachea(self, t: F64 | float) -> F64:
        out: F64 = self.prof("yv", t) - self.prof("rvb", t) - 26.0 * self.k
        return out

    def y_esophagus(self, t: F64 | float) -> F64:
        out: F64 = self.prof("yv", t) - self.prof("rvb", t) - 8.0 * self.k
        return out

    def heart(self, *, ctr: float | None = None, fluid: float = 0.0) -> HeartSpec:
        """The heart sized for a cardiothoracic ratio (the patient's normal one if None)."""
        key = (ctr, fluid)
        if key not in self._hearts:
            self._hearts[key] = self._size_heart(ctr, fluid)
        return self._hearts[key]

    def _size_heart(self, ctr: float | None, fluid: float) -> HeartSpec:
        target = self.ctr_normal if ctr is None else ctr
        kk = self.k
        a0, b0, c0 = 58.0 * kk, 43.0 * kk, 50.0 * kk * min(1.0, self.H / (250.0 * self.size))
        th = self.heart_theta
        want = target * self.thorax_width

        def spec(scale: float) -> HeartSpec:
            a, b = a0 * scale, b0 * scale
            c = c0 * (1.0 + 0.6 * (scale - 1.0))
            zh = float(self.z(0.1)) + c
            probe = HeartSpec((0.0, 0.0, zh), a, b, c, th, self.epi, 1.5 * kk, fluid)
            pts = probe.parts(self.epi)
            xlo = min(p.bounds()[0][0] for p in pts)
            xhi = max(p.bounds()[1][0] for p in pts)
            ylo = min(p.bounds()[0][1] for p in pts)
            # Left of the midline by about a third of the heart; touching the anterior wall.
            xh = self.xm - (xlo + xhi) / 2.0 + 0.28 * (xhi - xlo)
            yh = float(self.prof("yant", float(self.t_of(zh)))) - ylo + 3.0 * kk + 0.2 * fluid
            return HeartSpec((xh, yh, zh), a, b, c, th, self.epi, 1.5 * kk, fluid)

        lo, hi = 0.3, 3.0
        for _ in range(28):
            mid = 0.5 * (lo + hi)
            if spec(mid).transverse_diameter() < want:
                lo = mid
            else:
                hi = mid
        return spec(0.5 * (lo + hi))

    def hilum(self, side: int) -> F64:
        """Root of a lung's bronchial tree (side -1 right, +1 left)."""
        tc = self.t_carina
        t = tc - (0.06 if side < 0 else 0.08)
        x = self.xm + side * (36.0 if side < 0 else 44.0) * self.k
        y = float(self.y_trachea(t)) + 14.0 * self.k
        return np.array([x, y, float(self.z(t))])

    def carina(self) -> F64:
        t = self.t_carina
        return np.array([self.xm, float(self.y_trachea(t)), float(self.z(t))])

    # --- layers ----------------------------------------------------------------------------

    def cavity_shape(self) -> Union:
        """Inner surface of the ribs: rounded in front, squarer behind, where the lungs reach
        back beside the spine (the spine and paraspinal muscles are painted into it later)."""
        zk = self.zk
        front = zellipse(zk, self.xm, self.cyc_k, self.axc_k, self.ayc_k, power=2.2,
                         z_open=(True, True))
        back = zellipse(zk, self.xm, self.cyc_k + 0.3 * self.ayc_k, 0.97 * self.axc_k,
                        0.7 * self.ayc_k, power=3.6, z_open=(True, True))
        return Union((front, back))

    def wall_points(self, side: F64 | float, t: F64, psi: F64, off: F64 | float) -> F64:
        """Points ``off`` mm outside the cavity wall (negative: inside) at heights t and angles
        psi from the back (0) round the ``side`` flank (-1 right, +1 left) to the front (pi)."""
        t = np.asarray(t, dtype=np.float64)
        psi = np.asarray(psi, dtype=np.float64)
        cyc = self.prof("cyc", t)
        zz = self.z(t)
        dx, dy = np.asarray(side, dtype=np.float64) * np.sin(psi), np.cos(psi)
        rmax = 1.3 * max(self.axc0, float(np.max(self.ayc_k)))
        cav = self.cavity_shape()
        # March out along each ray, then refine the crossing by bisection.
        steps = np.arange(0.0, rmax, 2.0)
        px = self.xm + dx[:, None] * steps[None, :]
        py = cyc[:, None] + dy[:, None] * steps[None, :]
        inside = cav.contains(px, py, zz[:, None])
        last = np.where(inside.any(axis=1),
                        steps.size - 1 - np.argmax(inside[:, ::-1], axis=1), 0)
        lo, hi = steps[last], steps[last] + 2.0
        for _ in range(5):
            mid = 0.5 * (lo + hi)
            ins = cav.contains(self.xm + dx * mid, cyc + dy * mid, zz)
            lo, hi = np.where(ins, mid, lo), np.where(ins, hi, mid)
        rho = lo + np.asarray(off, dtype=np.float64)
        return np.stack([self.xm + dx * rho, cyc + dy * rho, zz], axis=1)

    def layers(self, heart: HeartSpec, extra: list[Layer] | None = None) -> list[Layer]:
        """The painter's list: body, cavity, lungs, mediastinum, organs, heart, vessels, bones."""
        k = self.k
        zk = self.zk
        tk = _T
        xm = self.xm
        L: list[Layer] = []
        # Table under the patient.
        ytab = float(np.max(self.cyb_k + self.by_k)) + 1.0
        L.append(Layer(T.TABLE, zellipse(zk, xm - 0.0, ytab + 9.0 * k, 230.0, 9.0 * k, power=6.0,
                                          z_open=(True, True))))
        body = zellipse(zk, xm, self.cyb_k, self.bx_k, self.by_k, power=2.2, z_open=(True, True))
        L.append(Layer(T.SKIN, body))
        inset = 2.0 * k
        L.append(Layer(T.FAT, zellipse(zk, xm, self.cyb_k, self.bx_k - inset, self.by_k - inset,
                                       power=2.2, z_open=(True, True))))
        if self.female:
            # Supine breasts: wide, flattened mounds on the anterior chest wall.
            for side in (-1.0, 1.0):
                tb = 0.42
                bx5, by5 = self.bx_k[5], self.by_k[5]
                x = xm + side * 0.4 * bx5
                y_skin = float(np.interp(tb, tk, self.cyb_k)) - by5 * (1 - 0.4**2.2) ** (1 / 2.2)
                ax = (0.36 * bx5 * self.breast, 0.2 * by5 * self.breast, 0.11 * self.H + 18 * k)
                c = (x + side * 0.05 * bx5, y_skin + 0.35 * ax[1], float(self.z(tb)))
                L.append(Layer(T.SKIN, Ellipsoid(c, ax, side * 0.25), frozenset({T.AIR})))
                inner = (ax[0] - inset, ax[1] - inset, ax[2] - inset)
                L.append(Layer(T.FAT, Ellipsoid(c, inner, side * 0.25), frozenset({T.SKIN})))
                g = (c[0], c[1] - 0.2 * ax[1], c[2])
                L.append(Layer(T.GLAND, Ellipsoid(g, (0.55 * ax[0], 0.45 * ax[1], 0.6 * ax[2]),
                                                  side * 0.25), frozenset({T.FAT})))
        cyb_m = self.cyb_k + (self.f_post - self.f_ant) / 2.0
        muscle = zellipse(zk, xm, cyb_m, self.bx_k - self.f_lat,
                          self.by_k - (self.f_ant + self.f_post) / 2.0, power=2.2,
                          z_open=(True, True))
        L.append(Layer(T.MUSCLE, muscle))
        # A fat plane between the superficial and deep chest wall muscles.
        mid = (self.f_lat + 0.5 * m_lat_w(k))
        plane_o = zellipse(zk, xm + 2 * k, cyb_m - 3 * k, self.bx_k - mid, self.by_k - mid - 2 * k,
                           power=2.2, z_open=(True, True))
        plane_i = zellipse(zk, xm + 2 * k, cyb_m - 1 * k, self.bx_k - mid - 1.6 * k,
                           self.by_k - mid - 3.2 * k, power=2.2, z_open=(True, True))
        L.append(Layer(T.FAT, AndNot(plane_o, plane_i), frozenset({T.MUSCLE})))
        # Thoracic and abdominal cavity (fat until organs are painted in).
        cavity = self.cavity_shape()
        L.append(Layer(T.MEDIASTINUM, cavity))
        ab = zellipse(zk, xm, self.cyc_k, self.axc_k, self.ayc_k, power=2.2, z_open=(True, False))
        ab = ZEllipse(zk[zk <= self.z(0.02)], ab.cx[zk <= self.z(0.02)], ab.cy[zk <= self.z(0.02)],
                      ab.ax[zk <= self.z(0.02)], ab.ay[zk <= self.z(0.02)], 2.0, (True, False))
        if ab.zk.size:
            L.append(Layer(T.ABDOMEN, ab, frozenset({T.MEDIASTINUM})))
        # Lungs: a per-side ellipse intersected with the cavity, domed at the apex.
        lt = np.array([-0.02, 0.0, 0.3, 0.5, 0.6, 0.68, 0.76, 0.84, 0.9, 0.95, 0.98, 1.01])
        dome = np.sqrt(np.clip(1.0 - ((lt - 0.5) / 0.51) ** 2, 0.0, 1.0))
        dome[lt <= 0.5] = 1.0
        dome[-1] = 0.0
        axc = self.prof("axc", lt)
        ayc = self.prof("ayc", lt)
        cyc = self.prof("cyc", lt)
        shift = np.clip((lt - 0.7) / 0.3, 0.0, 1.0)
        for side, code in ((-1.0, T.LUNG_RIGHT), (1.0, T.LUNG_LEFT)):
            cx = xm + side * axc * (0.5 - 0.12 * shift)
            lung = zellipse(self.z(lt), cx, cyc + 0.22 * ayc * shift, 0.64 * axc * dome,
                            1.06 * ayc * np.maximum(dome, 0.05) ** 0.6)
            L.append(Layer(code, And(lung, cavity), frozenset({T.MEDIASTINUM})))
        lungs = LUNG
        mt = np.array([-0.05, 0.3, 0.55, 0.7, 0.85, 1.0, 1.05])
        mw = np.array([8.0, 9.0, 10.0, 12.0, 11.0, 9.0, 9.0]) * k
        L.append(Layer(T.MEDIASTINUM, zellipse(self.z(mt), xm, self.prof("cyc", mt),
                                               mw, 1.15 * self.prof("ayc", mt)), lungs))
        # Paravertebral fat and the spine's footprint in the posterior lung, then the
        # paraspinal muscles behind it: together they make the cavity kidney shaped.
        L.append(Layer(T.MEDIASTINUM, zellipse(zk, xm, self.yv_k, self.rvb_k + 4 * k,
                                               self.rvb_k + 4 * k, z_open=(True, True)), lungs))
        para_y = self.yv_k + self.rvb_k + 24.0 * k
        L.append(Layer(T.MUSCLE, zellipse(zk, xm, para_y, self.rvb_k + 26.0 * k, 24.0 * k,
                                          power=2.5, z_open=(True, True)),
                       frozenset(lungs | {T.MEDIASTINUM, T.ABDOMEN})))
        self._dome_layers(L, lungs)
        self._heart_layers(L, heart)
        self._vessel_layers(L, heart)
        self._spine_layers(L)
        self._sternum_layers(L)
        if extra:
            L.extend(extra)
        return L

    def _dome_layers(self, L: list[Layer], lungs: frozenset[int]) -> None:
        k = self.k
        xm = self.xm
        ax0 = self.axc0
        ay0 = float(self.prof("ayc", 0.2))
        cy0 = float(self.prof("cyc", 0.2))
        under = frozenset(lungs | {T.MEDIASTINUM, T.ABDOMEN})
        cl = 0.42 * self.H
        zr = float(self.z(self.t_dome_r))
        liver = ((xm - 0.3 * ax0, cy0 - 0.12 * ay0, zr - cl), (0.7 * ax0, 0.95 * ay0, cl))
        zl = float(self.z(self.t_dome_l))
        cll = 0.36 * self.H
        left = ((xm + 0.4 * ax0, cy0 - 0.12 * ay0, zl - cll), (0.62 * ax0, 0.92 * ay0, cll))
        d = 4.0 * k
        for (c, a), code in ((liver, T.LIVER), (left, T.ABDOMEN)):
            L.append(Layer(T.MUSCLE, Ellipsoid(c, (a[0] + d, a[1] + d, a[2] + d)), under))
            L.append(Layer(code, Ellipsoid(c, a), frozenset(under | {T.MUSCLE})))
        organs = frozenset({T.ABDOMEN, T.MEDIASTINUM})
        # Left lobe of the liver, under the heart.
        L.append(Layer(T.LIVER, Ellipsoid((xm + 0.05 * ax0, cy0 - 0.5 * ay0, zr - 0.42 * self.H),
                                          (0.42 * ax0, 0.42 * ay0, 0.36 * self.H)), organs))
        sp = Ellipsoid((xm + 0.7 * ax0, cy0 + 0.42 * ay0, zl - 0.22 * self.H),
                       (0.2 * ax0, 0.42 * ay0, 0.18 * self.H), 0.5)
        L.append(Layer(T.SPLEEN, sp, organs))
        st_c = (xm + 0.38 * ax0, cy0 - 0.28 * ay0, zl - 0.2 * self.H)
        st_a = (0.32 * ax0, 0.42 * ay0, 0.18 * self.H)
        L.append(Layer(T.STOMACH, Ellipsoid(st_c, st_a), organs))
        inner = Ellipsoid(st_c, (st_a[0] - 3 * k, st_a[1] - 3 * k, st_a[2] - 3 * k))
        level = st_c[1] - 0.35 * st_a[1]
        L.append(Layer(T.GAS, And(inner, HalfSpace(1, level, below=True)),
                       frozenset({T.STOMACH})))
        yv = float(self.prof("yv", -0.35))
        rv = float(self.prof("rvb", -0.35))
        for side in (-1.0, 1.0):
            kc = (xm + side * (rv + 42 * k), yv - 0.2 * rv, float(self.z(-0.42)))
            L.append(Layer(T.KIDNEY, Ellipsoid(kc, (26 * k, 24 * k, 55 * k), side * 0.4), organs))

    def _heart_layers(self, L: list[Layer], h: HeartSpec) -> None:
        k = self.k
        f = h.fluid
        grow = 0.8 * f
        shift = 0.2 * f
        outer = h.epi + grow + h.peri
        around = frozenset(CAVITY | {T.PERICARDIUM})
        L.append(Layer(T.MEDIASTINUM, h.shell(outer + 4.0 * k, shift), LUNG))
        L.append(Layer(T.PERICARDIUM, h.shell(outer, shift), around))
        if f > 0:
            L.append(Layer(T.PERICARDIAL_FLUID, h.shell(h.epi + grow, shift),
                           frozenset({T.PERICARDIUM})))
        L.append(Layer(T.EPICARDIAL_FAT, h.shell(h.epi),
                       frozenset({T.PERICARDIUM, T.PERICARDIAL_FLUID})))
        # The myocardium sits off-centre in its fat so the fat is thicker in the grooves.
        cs = (0.35 * h.epi, -0.45 * h.epi)
        L.append(Layer(T.HEART, h.shell(0.0, 0.0, cs), frozenset({T.EPICARDIAL_FAT})))

    def _ztube(self, L: list[Layer], code: int, ts: F64, x: F64 | float, y: F64 | float,
               r: F64 | float,
               allowed: frozenset[int] | None, margin: float = 0.0,
               ry: F64 | float | None = None) -> None:
        rr = np.broadcast_to(np.asarray(r, dtype=np.float64), ts.shape)
        ryy = rr if ry is None else np.broadcast_to(np.asarray(ry, dtype=np.float64), ts.shape)
        zt = self.z(ts)
        if margin > 0:
            L.append(Layer(T.MEDIASTINUM, zellipse(zt, x, y, rr + margin, ryy + margin), LUNG))
        L.append(Layer(code, zellipse(zt, x, y, rr, ryy), allowed))

    def _vessel_layers(self, L: list[Layer], heart: HeartSpec) -> None:
        # The great vessels keep the roots of the patient's normal heart: an enlarged heart
        # grows around them rather than moving them (and the rest of the chest stays put).
        del heart
        h = self.heart()
        k = self.k
        xm = self.xm
        soft = frozenset(CAVITY | {T.PERICARDIUM, T.EPICARDIAL_FAT, T.HEART})
        m = 3.5 * k
        tc = self.t_carina
        ap = self.aorta_paths(h)
        for name in ("descending", "ascending"):
            ts, xs, ys = ap[name]
            r = self.r_ad if name == "descending" else self.r_aa
            self._ztube(L, T.VESSEL, ts, xs, ys, r, soft, m)
        ya = ap["ascending"][2]
        # Superior vena cava, right of the ascending aorta; azygos beside the spine.
        ts = np.array([float(self.t_of(h.center[2] + 0.3 * h.c)), 0.7, 0.84])
        ysvc = ya[1] + 8 * k
        self._ztube(L, T.VESSEL, ts, xm - np.array([24.0, 28.0, 30.0]) * k, ysvc, 9.0 * k, soft, m)
        ta = np.array([-0.5, 0.3, tc + 0.01])
        self._ztube(L, T.VESSEL, ta, xm - 6.0 * k,
                    self.prof("yv", ta) - 0.75 * self.prof("rvb", ta), 3.5 * k, soft, 2.0 * k)
        # Inferior vena cava, through the liver into the right atrium.
        ti = np.array([-3.0, 0.0, float(self.t_of(h.center[2] - 0.4 * h.c))])
        self._ztube(L, T.VESSEL, ti, xm - 18.0 * k,
                    self.prof("yv", ti) - self.prof("rvb", ti) - 16 * k, 11.0 * k,
                    frozenset(soft | {T.LIVER}))
        # Supra-aortic arteries from the arch into the neck.
        tsa = np.array([0.74, 0.9, 1.05, 1.4])
        ytr = self.y_trachea(tsa)
        for dx0, dx1, dy0, r in ((-10.0, -26.0, -14.0, 6.5), (6.0, 22.0, -13.0, 4.5),
                                 (16.0, 40.0, 2.0, 5.0)):
            xs = xm + np.array([dx0, (dx0 + dx1) / 2, dx1, dx1]) * k
            self._ztube(L, T.VESSEL, tsa, xs, ytr + dy0 * k, r * k, soft, 2.0 * k)
        # Esophagus (collapsed, sometimes with a little air) and trachea above the carina.
        te = np.array([-0.1, 0.15, 0.5, 1.0, 3.0])
        xe = xm + np.array([14.0, 8.0, 4.0, 3.0, 3.0]) * k
        ye = self.y_esophagus(te) - np.array([10.0, 4.0, 0.0, 0.0, 0.0]) * k
        self._ztube(L, T.ESOPHAGUS, te, xe, ye, 9.0 * k, soft, 2.5 * k, ry=6.0 * k)
        if self.esophagus_air:
            self._ztube(L, T.GAS, te[2:4], xe[2:4], ye[2:4], 2.5 * k,
                        frozenset({T.ESOPHAGUS}), ry=1.5 * k)
        tt = np.array([tc, tc + 0.1, 1.0, 3.0])
        ytr = self.y_trachea(tt)
        self._ztube(L, T.AIRWAY_WALL, tt, xm, ytr, 10.5 * k, soft, 3.0 * k, ry=10.0 * k)
        self._ztube(L, T.AIRWAY, tt, xm, ytr, 8.5 * k, frozenset({T.AIRWAY_WALL}), ry=8.0 * k)
        # Thyroid lobes either side of the trachea in the neck.
        tt = np.array([1.04, 1.12, 1.2])
        for side in (-1.0, 1.0):
            self._ztube(L, T.THYROID, tt, xm + side * 17.0 * k, self.y_trachea(tt) - 2 * k,
                        np.array([4.0, 8.0, 5.0]) * k, soft, ry=np.array([6.0, 10.0, 6.0]) * k)

    def _spine_layers(self, L: list[Layer]) -> None:
        k = self.k
        zk = self.zk
        xm = self.xm
        per = 0.1 * self.H
        ph = float(self.z(0.0)) + self.vertebra_phase * per
        yv, rv = self.yv_k, self.rvb_k
        body = zellipse(zk, xm, yv, rv * 1.08, rv, z_open=(True, True))
        core = zellipse(zk, xm, yv, rv * 1.08 - 1.6 * k, rv - 1.6 * k, z_open=(True, True))
        L.append(Layer(T.DISC, body))
        L.append(Layer(T.CORTICAL_BONE, Periodic(body, ph, per, 0.8)))
        L.append(Layer(T.MARROW, Periodic(core, ph, per, 0.8), frozenset({T.CORTICAL_BONE})))
        rc = 7.5 * k
        yc = yv + rv + rc + 1.0 * k
        arch = zellipse(zk, xm, yc + 2 * k, rc + 6 * k, rc + 6 * k, z_open=(True, True))
        canal = zellipse(zk, xm, yc, rc + 1.0 * k, rc, z_open=(True, True))
        php = ph + 0.15 * per
        L.append(Layer(T.CORTICAL_BONE, Periodic(AndNot(arch, canal), php, per, 0.7)))
        sp = zellipse(zk, xm, yc + rc + 18 * k, 4.0 * k, 15.0 * k, z_open=(True, True))
        sp_in = zellipse(zk, xm, yc + rc + 18 * k, 2.0 * k, 12.0 * k, z_open=(True, True))
        L.append(Layer(T.CORTICAL_BONE, Periodic(sp, php + 0.2 * per, per, 0.55)))
        L.append(Layer(T.MARROW, Periodic(sp_in, php + 0.2 * per, per, 0.55),
                       frozenset({T.CORTICAL_BONE})))
        for side in (-1.0, 1.0):
            tp = zellipse(zk, xm + side * (rv + 12 * k), yc + 2 * k, 12.0 * k, 5.5 * k,
                          z_open=(True, True))
            L.append(Layer(T.CORTICAL_BONE, Periodic(tp, php, per, 0.45)))
        L.append(Layer(T.CANAL, canal))

    def _sternum_layers(self, L: list[Layer]) -> None:
        k = self.k
        xm = self.xm
        st = np.array([0.22, 0.3, 0.7, 0.74, 0.8, 0.93, 0.96])
        wx = np.array([6.0, 12.0, 14.0, 16.0, 24.0, 26.0, 18.0]) * k
        wy = np.array([4.0, 5.5, 6.0, 7.0, 8.5, 8.5, 6.0]) * k
        y = self.prof("yant", st) - wy - 1.0 * k
        zt = self.z(st)
        L.append(Layer(T.CORTICAL_BONE, zellipse(zt, xm, y, wx, wy)))
        L.append(Layer(T.MARROW, zellipse(zt, xm, y, np.maximum(wx - 1.5 * k, 0.1),
                                          np.maximum(wy - 1.5 * k, 0.1)),
                       frozenset({T.CORTICAL_BONE})))

    def modulate_lungs(self, hu: npt.NDArray[np.float32], lab: npt.NDArray[np.uint8],
                       z_range: tuple[int, int], texture: Any) -> None:
        """Lung parenchyma of slices [z_range]: attenuation rising towards the dependent
        (posterior) lung as in any supine scan, fine texture, and the interlobar fissures as
        thin lines (mass conserving, so they fade on coarse grids as they do on thick slices)."""
        grid = self.grid
        sz = grid.spacing[0]
        k = self.k
        x0, x1 = grid.span(self.xm - self.axc0 - 5.0, self.xm + self.axc0 + 5.0, 2)
        y0, y1 = grid.span(float(np.min(self.yant_k)) - 5.0, float(np.max(self.ypost_k)) + 5.0, 1)
        if x0 >= x1 or y0 >= y1:
            return
        xs = grid.axis_mm(2)[x0:x1]
        ys = grid.axis_mm(1)[y0:y1]
        wf = max(grid.pv_width, 0.8)
        amp_f = np.float32(300.0 / wf)
        lat = np.clip(np.abs(xs - self.xm) / max(self.axc0, 1.0), 0.0, 1.0)
        b_x = (-0.1 * (lat - 0.5)).astype(np.float32)
        right = xs < self.xm
        lung_hu = np.float32(self.lung_hu)
        tex_amp = np.float32(14.0)
        for kz in range(*z_range):
            z = kz * sz
            t = float(self.t_of(z))
            if t < -0.06 or t > 1.03:
                continue
            lb = lab[kz, y0:y1, x0:x1]
            m = (lb == T.LUNG_RIGHT) | (lb == T.LUNG_LEFT)
            if not m.any():
                continue
            cyc, ayc = float(self.prof("cyc", t)), float(self.prof("ayc", t))
            q = np.clip((ys - (cyc - ayc)) / (2.0 * ayc), 0.0, 1.0)
            base = (lung_hu + self.lung_gradient * (q - 0.5)).astype(np.float32)
            val = texture.slice(kz)[y0:y1, x0:x1] * tex_amp
            val += base[:, None]
            # Oblique fissure: t_obl(q, lat) = 0.1 + 0.62 q - 0.1 (lat - 0.5).
            slope = 0.62 * self.H / (2.0 * ayc)
            scale = self.H / math.sqrt(1.0 + slope * slope)
            a_y = ((t - 0.1 - 0.62 * q) * scale).astype(np.float32)
            rows = np.flatnonzero(np.abs(a_y) < 0.06 * scale + wf)
            if rows.size:
                r0, r1 = int(rows[0]), int(rows[-1]) + 1
                d = np.abs(a_y[r0:r1, None] - b_x[None, :] * np.float32(-scale))
                bump = np.maximum(np.float32(0.0), np.float32(1.0) - d / np.float32(wf))
                val[r0:r1] += amp_f * bump
            # Horizontal fissure (right lung, anterior to the oblique one).
            t_hor = 0.56 + 0.06 * (0.5 - q)
            dh = (t - t_hor) * self.H
            rows = np.flatnonzero(np.abs(dh) < 0.04 * self.H + wf)
            if rows.size:
                r0, r1 = int(rows[0]), int(rows[-1]) + 1
                lat_term = 0.04 * (lat - 0.5) * self.H
                d = np.abs(dh[r0:r1, None] - lat_term[None, :]).astype(np.float32)
                anterior = (a_y[r0:r1, None] - b_x[None, :] * np.float32(-scale)) >= 0
                bump = np.maximum(np.float32(0.0), np.float32(1.0) - d / np.float32(wf))
                bump *= (anterior & right[None, :]).astype(np.float32)
                val[r0:r1] += np.float32(0.7) * amp_f * bump
            np.copyto(hu[kz, y0:y1, x0:x1], val, where=m)
        del k

    # --- analytic queries -------------------------------------------------------------------

    def normal_layers(self) -> list[Layer]:
        """Layers of the anatomy without any finding (for placing findings and growing trees)."""
        if self._normal_layers is None:
            self._normal_layers = self.layers(self.heart())
        return self._normal_layers

    def labels_at(self, points: F64) -> npt.NDArray[np.uint8]:
        """Exact analytic labels of the normal anatomy at points."""
        return labels_at(points, self.normal_layers())

    def _lookup(self) -> tuple[npt.NDArray[np.uint8], Grid]:
        """The normal anatomy painted once on a coarse grid (4 mm), for fast queries.

        Placing findings and growing trees ask "which tissue is here?" for tens of thousands
        of points; a table lookup answers that in microseconds, to within half a coarse voxel,
        the same whatever the size of the volume being rendered.
        """
        if self._coarse is None:
            ex, ey, ez = self.grid.extent_mm()
            step = 4.0
            shape = (int(ez // step) + 2, int(ey // step) + 2, int(ex // step) + 2)
            g = Grid(shape, (step, step, step))
            lab = np.zeros(shape, dtype=np.uint8)
            paint_layers(lab, g, self.normal_layers(), (0, shape[0]))
            self._coarse = (lab, g)
        return self._coarse

    def lung_side_at(self, points: F64) -> I64:
        """0 outside the lungs, -1 right lung, +1 left lung (normal anatomy)."""
        lab_grid, g = self._lookup()
        pts = np.asarray(points, dtype=np.float64)
        idx = np.rint(pts[..., ::-1] / g.spacing[0]).astype(np.int64)
        ok = np.all((idx >= 0) & (idx < np.asarray(g.shape)), axis=-1)
        idx = np.clip(idx, 0, np.asarray(g.shape) - 1)
        lab = np.where(ok, lab_grid[idx[..., 0], idx[..., 1], idx[..., 2]], 0)
        out = np.zeros(lab.shape, dtype=np.int64)
        out[lab == T.LUNG_RIGHT] = -1
        out[lab == T.LUNG_LEFT] = 1
        return out

    def fissure_t(self, x: F64, y: F64, z: F64) -> tuple[F64, F64]:
        """Height (t) of the oblique and horizontal fissures above (x, y) at height z."""
        t = self.t_of(z)
        cyc, ayc, axc = self.prof("cyc", t), self.prof("ayc", t), self.prof("axc", t)
        q = np.clip((y - (cyc - ayc)) / (2.0 * ayc), 0.0, 1.0)
        lat = np.clip(np.abs(x - self.xm) / np.maximum(axc, 1.0), 0.0, 1.0)
        t_obl = 0.1 + 0.62 * q - 0.1 * (lat - 0.5)
        t_hor = 0.56 + 0.06 * (0.5 - q) + 0.04 * (lat - 0.5)
        return t_obl, t_hor

    def lobe_at(self, points: F64) -> I64:
        """Lobe of each point in the normal lungs (Lobe codes; 0 outside the lungs)."""
        pts = np.asarray(points, dtype=np.float64)
        side = self.lung_side_at(pts)
        return self.lobe_of(pts, side)

    def lobe_of(self, points: F64, side: I64) -> I64:
        """Lobe of points already known to be in the lung on ``side``."""
        pts = np.asarray(points, dtype=np.float64)
        x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
        t = self.t_of(z)
        t_obl, t_hor = self.fissure_t(x, y, z)
        lower = t < t_obl
        out = np.zeros(side.shape, dtype=np.int64)
        r = side < 0
        out[r & lower] = Lobe.RLL
        out[r & ~lower & (t >= t_hor)] = Lobe.RUL
        out[r & ~lower & (t < t_hor)] = Lobe.RML
        left = side > 0
        out[left & lower] = Lobe.LLL
        out[left & ~lower] = Lobe.LUL
        return out

    def sample_lung(
        self,
        rng: np.random.Generator,
        n: int,
        *,
        side: int | None = None,
        lobes: set[int] | None = None,
        t_range: tuple[float, float] = (0.0, 1.0),
        max_tries: int = 40,
    ) -> F64:
        """Uniform random points in the normal lungs (optionally one side, some lobes)."""
        ez = self.grid.extent_mm()[2]
        lo = np.array([self.xm - self.axc0 * 1.02, float(np.min(self.yant_k[3:11])) - 5.0,
                       float(self.z(t_range[0]))])
        hi = np.array([self.xm + self.axc0 * 1.02, float(np.max(self.ypost_k[3:11])) + 5.0,
                       float(self.z(t_range[1]))])
        if side is not None:
            if side < 0:
                hi[0] = self.xm
            else:
                lo[0] = self.xm
        out: list[F64] = []
        got = 0
        for _ in range(max_tries):
            cand = lo + (hi - lo) * rng.random((max(64, 4 * (n - got)), 3))
            s = self.lung_side_at(cand)
            ok = s != 0
            if side is not None:
                ok &= s == side
            if lobes is not None:
                lb = self.lobe_of(cand, s)
                ok &= np.isin(lb, list(lobes))
            # Keep inside the scanned volume: findings must be visible.
            ok &= (cand[:, 2] >= 0.0) & (cand[:, 2] <= ez)
            sel = cand[ok][: n - got]
            out.append(sel)
            got += sel.shape[0]
            if got >= n:
                break
        if not out:
            return np.zeros((0, 3))
        return np.concatenate(out)[:n]

    def costal_point(self, side: int, t: float, psi: float, depth: float) -> tuple[F64, F64]:
        """A point ``depth`` mm inside the costal pleura at height t and angle psi (0 posterior,
        pi anterior), with the outward direction there."""
        p, n = self.costal_points(np.array([float(side)]), np.array([t]), np.array([psi]),
                                  np.array([depth]))
        return p[0], n[0]

    def costal_points(self, side: F64, t: F64, psi: F64, depth: F64) -> tuple[F64, F64]:
        """Vectorised `costal_point`: arrays of sides, heights, angles and depths."""
        wall = self.wall_points(side, t, psi, 0.0)
        p = self.wall_points(side, t, psi, -np.asarray(depth, dtype=np.float64))
        n = wall - np.stack([np.full(wall.shape[0], self.xm), self.prof("cyc", t), wall[:, 2]],
                            axis=1)
        n[:, 2] = 0.0
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-9)
        return p, n

    # --- trees ------------------------------------------------------------------------------

    def trees(self) -> dict[str, Tree]:
        """Bronchovascular trees (bronchi with their arteries) and veins of both lungs."""
        if self._trees is not None:
            return self._trees
        rng = np.random.default_rng(self.rng_tree_seed)
        out: dict[str, Tree] = {}
        for side, name in ((-1, "right"), (1, "left")):
            pts = self.sample_lung(rng, 1100, side=side, t_range=(-0.02, 1.0))
            if pts.shape[0] < 8:
                out["bronchi_" + name] = Tree.empty()
                out["veins_" + name] = Tree.empty()
                continue
            sides = np.full(pts.shape[0], side, dtype=np.int64)
            lobes = self.lobe_of(pts, sides)
            uniq = np.unique(lobes)
            groups = np.searchsorted(uniq, lobes)
            root = self.hilum(side)
            roots = np.repeat(root[None, :], uniq.size, axis=0)

            def lobe_fn(p: F64, s: int = side) -> I64:
                return self.lobe_of(p, np.full(p.shape[0], s, dtype=np.int64))

            out["bronchi_" + name] = grow_tree(rng, pts, groups, roots, self.vessel_r0 * 0.75,
                                               lobe_fn, alpha=0.5)
            vp = self.sample_lung(rng, 1000, side=side, t_range=(-0.02, 1.0))
            la = self._la_ostia(side)
            vg = (vp[:, 2] > la[0][2]).astype(np.int64)
            out["veins_" + name] = grow_tree(rng, vp, vg, la, self.vein_r0 * 0.75, lobe_fn,
                                             alpha=0.45)
        self._trees = out
        return out

    def _la_ostia(self, side: int) -> F64:
        h = self.heart()
        _, cy, cz = h.center
        x = self.xm + side * (22.0 if side < 0 else 20.0) * self.k
        y = cy + 0.55 * h.b
        return np.array([[x, y, cz - 0.1 * h.c], [x, y, cz + 0.45 * h.c]])

    # --- small structures -------------------------------------------------------------------

    def draw_small(self, canvas: Canvas, heart: HeartSpec) -> None:
        """Ribs, clavicles, scapulae, airways, pulmonary vessels, coronaries and nodes."""
        hu = self.hu.values
        k = self.k
        soft_out = frozenset({T.MUSCLE, T.FAT, T.SKIN, T.GLAND, T.MEDIASTINUM, T.LUNG_RIGHT,
                              T.LUNG_LEFT})
        bones, marrow, cart = self._rib_prims()
        _draw(canvas, bones, mode="max", allowed=soft_out, code=T.CORTICAL_BONE)
        _draw(canvas, marrow, mode="min", allowed=frozenset({T.CORTICAL_BONE}), code=T.MARROW)
        _draw(canvas, cart, mode="max", allowed=soft_out, code=T.CARTILAGE)
        _draw_disks(canvas, self._scapulae(), mode="max",
                    allowed=frozenset({T.MUSCLE, T.FAT}), code=T.CORTICAL_BONE)
        # Central airways, then pulmonary arteries and veins, then the peripheral airways.
        walls, lumens = self._central_airways()
        airway_ok = frozenset({T.MEDIASTINUM, T.LUNG_RIGHT, T.LUNG_LEFT, T.AIRWAY_WALL,
                               T.AIRWAY, T.VESSEL})
        _draw(canvas, walls, mode="max", allowed=airway_ok, code=T.AIRWAY_WALL)
        _draw(canvas, lumens, mode="min", allowed=airway_ok, code=T.AIRWAY)
        lung_ok = frozenset({T.MEDIASTINUM, T.LUNG_RIGHT, T.LUNG_LEFT})
        _draw(canvas, self._pulmonary_trunk(heart), mode="max", allowed=lung_ok, code=T.VESSEL)
        art, vein, bwall, blumen = self.tree_prims()
        _draw(canvas, concat_prims([art, vein]), mode="max", allowed=lung_ok, code=T.VESSEL)
        _draw(canvas, bwall, mode="max", allowed=lung_ok | {T.AIRWAY_WALL}, code=T.AIRWAY_WALL)
        _draw(canvas, blumen, mode="min", allowed=lung_ok | {T.AIRWAY_WALL, T.AIRWAY},
              code=T.AIRWAY)
        # Aortic arch (horizontal, so tubes rather than slices), coronaries, normal nodes.
        _draw(canvas, self.arch_prims(heart), mode="max",
              allowed=frozenset(lung_ok | {T.VESSEL}), code=T.VESSEL)
        _draw(canvas, self.coronary_prims(heart), mode="max",
              allowed=frozenset({T.EPICARDIAL_FAT, T.PERICARDIUM}), code=T.VESSEL)
        _draw(canvas, self._normal_nodes(), mode="max", allowed=frozenset({T.MEDIASTINUM}),
              code=T.NODE)
        del hu, k

    def _rib_prims(self) -> tuple[Prims, Prims, Prims]:
        hu = self.hu.values
        k = self.k
        xm = self.xm
        cort: list[Prims] = []
        marr: list[Prims] = []
        cart: list[Prims] = []
        r_out, r_in = 4.0 * k, 2.4 * k
        # Shafts and costal cartilages of all 24 ribs, as two batched wall queries.
        ribs = []
        for side in (-1.0, 1.0):
            for i in range(1, 13):
                t_head = 1.0 - 0.086 * (i - 0.45)
                if i == 1:
                    psi_end, drop = 2.45, 0.07
                elif i <= 7:
                    psi_end, drop = 2.72, 0.13 + 0.012 * i
                elif i <= 10:
                    psi_end, drop = 2.45 - 0.08 * (i - 8), 0.2
                else:
                    psi_end, drop = (1.75 if i == 11 else 1.25), 0.08
                ribs.append((side, i, t_head, psi_end, drop))
        u = np.linspace(0.0, 1.0, 14)
        psi0 = 0.62
        sh_side = np.concatenate([np.full(14, r[0]) for r in ribs])
        sh_psi = np.concatenate([psi0 + (r[3] - psi0) * u for r in ribs])
        sh_t = np.concatenate([r[2] - r[4] * u**1.6 for r in ribs])
        shafts = self.wall_points(sh_side, sh_t, sh_psi, 5.0 * k + r_out * 0.5).reshape(
            len(ribs), 14, 3)
        uu = np.linspace(0.0, 1.0, 5)
        c_side, c_psi, c_t, c_ribs = [], [], [], []
        for j, (side, i, t_head, psi_end, drop) in enumerate(ribs):
            if i > 10:
                continue
            t_end = t_head - drop
            t_st = max(0.93 - (i - 1) * 0.105, 0.27) if i <= 7 else t_end + 0.05
            c_side.append(np.full(5, side))
            c_psi.append(psi_end + (math.pi - 0.2 - psi_end) * uu)
            c_t.append(t_end + (t_st - t_end) * uu**0.7)
            c_ribs.append(j)
        carts = self.wall_points(np.concatenate(c_side), np.concatenate(c_t),
                                 np.concatenate(c_psi), 3.0 * k + r_out * 0.5).reshape(-1, 5, 3)
        for j, (side, _, t_head, _, _) in enumerate(ribs):
            # Head on the vertebral body, neck out to the transverse process, then the angle,
            # where the shaft meets the chest wall.
            rv = float(self.prof("rvb", t_head))
            yvh = float(self.prof("yv", t_head))
            zh = float(self.z(t_head + 0.01))
            head = np.array([xm + side * 0.95 * rv, yvh + 0.35 * rv, zh])
            tp = np.array([xm + side * (rv + 20 * k), yvh + rv + 10 * k, zh])
            line = np.vstack([head[None, :], tp[None, :], shafts[j]])
            cort.append(polyline_prims(line, r_out, hu[T.CORTICAL_BONE]))
            marr.append(polyline_prims(line, r_in, hu[T.MARROW]))
        for m, j in enumerate(c_ribs):
            side, i = ribs[j][0], ribs[j][1]
            cp = carts[m].copy()
            if i <= 7:
                cp[-1, 0] = xm + side * (12.0 + 3.0 * (i - 1)) * k
            cart.append(polyline_prims(cp, 4.0 * k, hu[T.CARTILAGE]))
        for side in (-1.0, 1.0):
            # Clavicle.
            p0 = np.array([xm + side * 16 * k, float(self.prof("yant", 0.93)) - 10 * k,
                           float(self.z(0.95))])
            p1 = np.array([xm + side * 0.42 * float(self.prof("bx", 0.95)),
                           float(self.prof("yant", 0.97)) - 6 * k, float(self.z(1.0))])
            p2 = np.array([xm + side * 0.7 * float(self.prof("bx", 1.02)),
                           float(self.prof("cyb", 1.02)) - 0.1 * float(self.prof("by", 1.02)),
                           float(self.z(1.03))])
            cl = np.vstack([p0, (p0 + p1) / 2, p1, (p1 + p2) / 2, p2])
            cort.append(polyline_prims(cl, 6.0 * k, hu[T.CORTICAL_BONE]))
            marr.append(polyline_prims(cl, 4.0 * k, hu[T.MARROW]))
        return concat_prims(cort), concat_prims(marr), concat_prims(cart)

    def _scapulae(self) -> Disks:
        k = self.k
        cs, ns = [], []
        for side in (-1.0, 1.0):
            t, psi = 0.78, 0.75
            p_in = self.wall_points(side, np.array([t]), np.array([psi]), 0.0)[0]
            p = self.wall_points(side, np.array([t]), np.array([psi]), 17.0 * k)[0]
            n = p - p_in
            cs.append(p)
            ns.append(n / max(1e-9, float(np.linalg.norm(n))))
        hu = self.hu.values[T.CORTICAL_BONE]
        return Disks(np.array(cs), np.array(ns), np.full(2, 45.0 * k), np.full(2, 2.2 * k),
                     np.full(2, hu), np.zeros(2, dtype=np.int64))

    def _central_airways(self) -> tuple[Prims, Prims]:
        hu = self.hu.values
        k = self.k
        c = self.carina()
        walls, lumens = [], []
        for side, rl in ((-1, 6.5 * k), (1, 5.5 * k)):
            h = self.hilum(side)
            mid = (c + h) / 2 + np.array([0.0, 0.0, 4.0 * k])
            line = np.vstack([c + np.array([0.0, 0.0, 6.0 * k]), mid, h])
            walls.append(polyline_prims(line, rl + 1.8 * k, hu[T.AIRWAY_WALL]))
            lumens.append(polyline_prims(line, rl, -1000.0))
        return concat_prims(walls), concat_prims(lumens)

    def _pulmonary_trunk(self, heart: HeartSpec) -> Prims:
        del heart
        h = self.heart()
        hu = self.hu.values[T.VESSEL]
        k = self.k
        cx, cy, cz = h.center
        tc = self.t_carina
        start = np.array([cx + 0.1 * h.a, cy - 0.55 * h.b, cz + 0.7 * h.c])
        bif = np.array([self.xm + 14 * k, float(self.y_trachea(tc)) - 8 * k,
                        float(self.z(tc - 0.02))])
        parts = [polyline_prims(np.vstack([start, (start + bif) / 2 + [0, 0, 6 * k], bif]),
                                13.0 * k, hu)]
        for side in (-1, 1):
            root = self.artery_root(side)
            mid = (bif + root) / 2 + np.array([0.0, -4.0 * k if side < 0 else 4.0 * k, 5.0 * k])
            parts.append(polyline_prims(np.vstack([bif, mid, root]), 10.0 * k, hu))
        return concat_prims(parts)

    def artery_root(self, side: int) -> F64:
        h = self.hilum(side)
        k = self.k
        off = (np.array([0.0, -12.0 * k, 3.0 * k]) if side < 0 else
               np.array([0.0, -4.0 * k, 13.0 * k]))
        out: F64 = h + off
        return out

    def aorta_paths(self, heart: HeartSpec) -> dict[str, F64]:
        """Knots (t, x, y) of the ascending and descending aorta, and the arch's centre line
        (rooted on the normal heart, like every great vessel)."""
        del heart
        h = self.heart()
        k = self.k
        xm = self.xm
        # Descending: left of the spine, moving in front of it towards the hiatus.
        ta = np.array([-3.0, -0.2, 0.2, 0.5, 0.73])
        yv, rv = self.prof("yv", ta), self.prof("rvb", ta)
        dx = xm + np.array([6.0, 8.0, 17.0, 25.0, 25.0]) * k
        dy = yv - rv * np.array([1.5, 1.3, 0.8, 0.45, 0.45])
        # Ascending: from the aortic root, anterior and right, up to the arch.
        t_root = float(self.t_of(h.center[2] + 0.35 * h.c))
        ts = np.array([t_root, max(t_root + 0.01, 0.6), 0.73])
        ay = np.array([h.center[1] - 0.1 * h.b,
                       float(self.prof("yant", 0.6)) + self.r_aa + 14 * k,
                       float(self.prof("yant", 0.73)) + self.r_aa + 12 * k])
        axs = xm - np.array([4.0, 10.0, 10.0]) * k
        p0 = np.array([xm - 10 * k, float(ay[-1]), float(self.z(0.72))])
        p2 = np.array([float(dx[-1]), float(dy[-1]), float(self.z(0.72))])
        p1 = np.array([xm + 30 * k, float(self.y_trachea(0.78)) - 6 * k, float(self.z(0.84))])
        u = np.linspace(0.0, 1.0, 12)[:, None]
        arch = (1 - u) ** 2 * p0 + 2 * (1 - u) * u * p1 + u**2 * p2
        return {
            "descending": np.stack([ta, dx, dy]),
            "ascending": np.stack([ts, axs, ay]),
            "arch": arch,
        }

    def aorta_centerline(self, h: HeartSpec) -> tuple[F64, F64, list[str]]:
        """Points along the whole aorta with its radius and segment name, for wall findings."""
        ap = self.aorta_paths(h)
        pts, rad, seg = [], [], []
        ts, xs, ys = ap["ascending"]
        tt = np.linspace(ts[0], ts[-1], 12)
        pts.append(np.stack([np.interp(tt, ts, xs), np.interp(tt, ts, ys), self.z(tt)], axis=1))
        rad.append(np.full(12, self.r_aa))
        seg += ["ascending aorta"] * 12
        pts.append(ap["arch"])
        rad.append(np.linspace(self.r_aa, self.r_ad, 12))
        seg += ["aortic arch"] * 12
        ts, xs, ys = ap["descending"]
        tt = np.linspace(0.72, max(-0.1, float(self.t_of(0.0))), 24)
        pts.append(np.stack([np.interp(tt, ts, xs), np.interp(tt, ts, ys), self.z(tt)], axis=1))
        rad.append(np.full(24, self.r_ad))
        seg += ["descending aorta"] * 24
        return np.concatenate(pts), np.concatenate(rad), seg

    def arch_prims(self, h: HeartSpec) -> Prims:
        arch = self.aorta_paths(h)["arch"]
        r = np.linspace(self.r_aa, self.r_ad, arch.shape[0])
        return polyline_prims(arch, r, self.hu.values[T.VESSEL])

    def coronary_paths(self, h: HeartSpec) -> dict[str, F64]:
        """Centre lines of the main coronary arteries, in the epicardial fat."""
        ph = self.coronary_phase
        extra = 0.5 * h.epi
        u_av = -0.45
        rca_phi = np.linspace(2.0, 4.6, 12) + ph
        lcx_phi = np.linspace(1.6, -0.9, 10) + ph
        lad_u = np.linspace(u_av, 0.85, 12)
        lad_phi = np.full(12, 3.5 + ph) - 0.4 * np.linspace(0, 1, 12)
        return {
            "RCA": h.surface_point(np.full(12, u_av), rca_phi, extra),
            "LCX": h.surface_point(np.full(10, u_av), lcx_phi, extra),
            "LAD": h.surface_point(lad_u, lad_phi, extra),
        }

    def coronary_prims(self, h: HeartSpec) -> Prims:
        hu = self.hu.values[T.VESSEL]
        parts = []
        for name, pts in self.coronary_paths(h).items():
            r0 = (1.9 if name != "LCX" else 1.6) * self.k
            r = np.linspace(r0, 0.7 * r0, pts.shape[0])
            parts.append(polyline_prims(pts, r, hu))
        return concat_prims(parts)

    def node_stations(self) -> dict[str, F64]:
        """Lymph node stations (IASLC-like) as points in the mediastinal fat and hila."""
        k = self.k
        xm = self.xm
        tc = self.t_carina
        ytr = float(self.y_trachea(tc + 0.08))
        c = self.carina()
        hr, hl = self.hilum(-1), self.hilum(1)
        return {
            "right paratracheal (4R)": np.array([xm - 17 * k, ytr - 4 * k,
                                                 float(self.z(tc + 0.06))]),
            "left paratracheal (4L)": np.array([xm + 15 * k, ytr + 6 * k,
                                                float(self.z(tc + 0.03))]),
            "prevascular (3A)": np.array([xm - 2 * k, float(self.prof("yant", tc + 0.1)) + 10 * k,
                                          float(self.z(tc + 0.1))]),
            "aortopulmonary window (5)": np.array([xm + 24 * k, ytr + 4 * k,
                                                   float(self.z(tc + 0.02))]),
            "subcarinal (7)": c + np.array([2 * k, 14 * k, -22 * k]),
            "right hilar (10R)": hr + np.array([-10 * k, 16 * k, -16 * k]),
            "left hilar (10L)": hl + np.array([10 * k, 16 * k, -16 * k]),
        }

    def _normal_nodes(self) -> Prims:
        rng = np.random.default_rng(self.node_rng_seed)
        st = list(self.node_stations().values())
        n = int(rng.integers(2, 6))
        pick = rng.choice(len(st), size=n, replace=False)
        cen = np.array([st[i] for i in pick]) + rng.normal(0.0, 3.0 * self.k, (n, 3))
        r = rng.uniform(2.0, 4.0, n) * self.k
        return sphere_prims(cen, r, self.hu.values[T.NODE])

    def tree_prims(
        self, *, bronchus_min_lumen: float = 0.9
    ) -> tuple[Prims, Prims, Prims, Prims]:
        """Arteries, veins, bronchial walls and lumens of both lungs."""
        hu = self.hu.values
        arts, veins, walls, lumens = [], [], [], []
        for name in ("right", "left"):
            tr = self.trees()["bronchi_" + name]
            vt = self.trees()["veins_" + name]
            if len(tr):
                geo = bronchus_geometry(tr)
                arts.append(Prims(geo.art_a, geo.art_b, tr.radius, tr.radius * 0.9,
                                  np.full(len(tr), hu[T.VESSEL])))
                vis = geo.lumen >= bronchus_min_lumen * self.k
                walls.append(Prims(tr.start[vis], tr.end[vis], geo.outer[vis],
                                   geo.outer[vis] * 0.92,
                                   np.full(int(vis.sum()), hu[T.AIRWAY_WALL])))
                lumens.append(Prims(tr.start[vis], tr.end[vis], geo.lumen[vis],
                                    geo.lumen[vis] * 0.92, np.full(int(vis.sum()), -1000.0)))
            if len(vt):
                veins.append(Prims(vt.start, vt.end, vt.radius, vt.radius * 0.9,
                                   np.full(len(vt), hu[T.VESSEL])))
        return (concat_prims(arts), concat_prims(veins), concat_prims(walls),
                concat_prims(lumens))


@dataclass
class BronchusGeometry:
    lumen: F64
    outer: F64
    art_a: F64
    art_b: F64


def bronchus_geometry(tr: Tree) -> BronchusGeometry:
    """Normal bronchi: lumen about 0.65 of the companion artery's radius, wall about a fifth of
    the lumen (broncho-arterial ratio below 1, as in healthy lungs)."""
    lumen = 0.65 * tr.radius
    outer = lumen + 0.22 * lumen + 0.2
    gap = outer + tr.radius + 0.3
    return BronchusGeometry(
        lumen,
        outer,
        tr.start + tr.offset * gap[:, None],
        tr.end + tr.offset * gap[:, None],
    )
