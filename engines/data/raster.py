"""Voxel rendering primitives shared by the phantom's anatomy and its findings.

Two kinds of objects make a chest CT. Large organs (body wall, lungs, heart, liver, spine) are
described by analytic shapes whose cross-section changes slowly with height; they are painted as
hard tissue labels, slab by slab, and turned into HU through a lookup table, which costs a few
byte-wide passes over the volume. Small objects (vessels, bronchi, ribs, nodules, septa, wires)
are tubes, spheres and thin disks; rendering them over whole slices would be far too slow, so each
one is evaluated only inside its own bounding box, all of them at once in flat vectorised chunks,
and composited into the HU volume with partial-volume occupancy.

The occupancy is mass conserving: an object smaller than a voxel is spread over a voxel-sized
footprint with its amplitude lowered so that its integrated density is what the real object would
contribute. That is what a scanner does, and it is the rule that keeps a 2 mm calcification from
looking like a 4 mm one on a coarse grid (findings must never be inflated to be easier to learn).

Coordinates: "world" millimetres are array-aligned, ``(x, y, z) = (ix * sx, iy * sy, iz * sz)``;
points are arrays whose last axis is (x, y, z). Shapes evaluate with numpy broadcasting, so the
same code tests a handful of points or a whole slab of voxels.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

__all__ = [
    "And",
    "AndNot",
    "Canvas",
    "Disks",
    "Ellipsoid",
    "Grid",
    "HalfSpace",
    "Layer",
    "NoisePool",
    "Periodic",
    "Prims",
    "Shape",
    "SplatResult",
    "Union",
    "ZEllipse",
    "blur_volume",
    "blur_z",
    "concat_prims",
    "interp",
    "labels_at",
    "paint_layers",
    "parallel_slabs",
    "polyline_prims",
    "sphere_prims",
    "splat",
    "splat_disks",
    "zellipse",
]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Bool = npt.NDArray[np.bool_]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
Arr = npt.NDArray[np.floating] | F64

Mode = Literal["max", "min", "set"]

# Entries (voxel, primitive) evaluated per vectorised chunk: large enough that numpy call overhead
# is negligible, small enough that the temporaries stay in cache-sized memory.
_CHUNK = 1 << 18


@dataclass(frozen=True)
class Grid:
    """Shape and spacing of a volume [z, y, x], and the conversions to world millimetres."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def pv_width(self) -> float:
        """Width (mm) of the partial-volume ramp at an object's edge: about one voxel."""
        sz, sy, sx = self.spacing
        return float(max(0.5, (sz * sy * sx) ** (1.0 / 3.0)))

    def axis_mm(self, axis: int) -> F64:
        """World coordinates (mm) of voxel centres along array axis 0 (z), 1 (y) or 2 (x)."""
        return np.arange(self.shape[axis], dtype=np.float64) * self.spacing[axis]

    def span(self, lo: float, hi: float, axis: int) -> tuple[int, int]:
        """Half-open index range of voxel centres inside [lo, hi] mm, clipped to the volume."""
        s = self.spacing[axis]
        i0 = max(0, math.ceil(lo / s - 1e-9))
        i1 = min(self.shape[axis], math.floor(hi / s + 1e-9) + 1)
        return i0, max(i0, i1)

    def extent_mm(self) -> tuple[float, float, float]:
        """World (x, y, z) of the last voxel centre: the volume spans 0..extent."""
        nz, ny, nx = self.shape
        sz, sy, sx = self.spacing
        return ((nx - 1) * sx, (ny - 1) * sy, (nz - 1) * sz)


def interp(z: Arr, zk: F64, vk: F64) -> F64:
    """np.interp for any array shape (clamped at the ends), so knots broadcast like scalars."""
    zz = np.asarray(z, dtype=np.float64)
    out: F64 = np.interp(zz.ravel(), zk, vk).reshape(zz.shape)
    return out


# --- analytic shapes -------------------------------------------------------------------------


class Shape(Protocol):
    """A solid that can say which points it contains and where it can possibly be."""

    def contains(self, x: Arr, y: Arr, z: Arr) -> Bool:
        """Membership for broadcastable coordinate arrays (mm)."""
        ...

    def bounds(self) -> tuple[F64, F64]:
        """Axis-aligned (lo, hi) world (x, y, z) mm box that contains the solid."""
        ...


@dataclass(frozen=True)
class ZEllipse:
    """A stack of axial (super)ellipses whose centre and semi-axes are knotted along z.

    Most of the trunk is like this: the body outline, the thoracic cavity, the lungs, the aorta and
    trachea, the vertebrae. Outside [zk[0], zk[-1]] the shape is empty. ``power`` > 2 squares the
    ellipse off (a flatter back and flanks than an ellipse has).
    """

    zk: F64
    cx: F64
    cy: F64
    ax: F64
    ay: F64
    power: float = 2.0
    z_open: tuple[bool, bool] = (False, False)

    def contains(self, x: Arr, y: Arr, z: Arr) -> Bool:
        zk = self.zk
        cx, cy = interp(z, zk, self.cx), interp(z, zk, self.cy)
        ax = np.maximum(interp(z, zk, self.ax), 1e-6)
        ay = np.maximum(interp(z, zk, self.ay), 1e-6)
        zz = np.asarray(z, dtype=np.float64)
        outside = np.zeros(zz.shape, dtype=bool)
        if not self.z_open[0]:
            outside |= zz < zk[0]
        if not self.z_open[1]:
            outside |= zz > zk[-1]
        u = np.abs((np.asarray(x) - cx) / ax)
        v = np.abs((np.asarray(y) - cy) / ay)
        if self.power == 2.0:
            u = u * u
            v = v * v
        else:
            u = u**self.power
            v = v**self.power
        # 1 - v first: it is small (no x), so only the final comparison is volume sized.
        lim = np.where(outside, -1.0, 1.0 - v)
        out: Bool = np.less_equal(u, lim)
        return out

    def bounds(self) -> tuple[F64, F64]:
        lo = np.array(
            [
                float(np.min(self.cx - self.ax)),
                float(np.min(self.cy - self.ay)),
                -1e9 if self.z_open[0] else float(self.zk[0]),
            ]
        )
        hi = np.array(
            [
                float(np.max(self.cx + self.ax)),
                float(np.max(self.cy + self.ay)),
                1e9 if self.z_open[1] else float(self.zk[-1]),
            ]
        )
        return lo, hi


def zellipse(
    zk: Sequence[float] | F64,
    cx: Sequence[float] | F64 | float,
    cy: Sequence[float] | F64 | float,
    ax: Sequence[float] | F64 | float,
    ay: Sequence[float] | F64 | float,
    *,
    power: float = 2.0,
    z_open: tuple[bool, bool] = (False, False),
) -> ZEllipse:
    """Build a ZEllipse, broadcasting scalar parameters over the z knots."""
    zka = np.asarray(zk, dtype=np.float64)
    n = zka.size

    def arr(v: Sequence[float] | F64 | float) -> F64:
        a = np.asarray(v, dtype=np.float64)
        return np.broadcast_to(a, (n,)).copy() if a.ndim == 0 else a.astype(np.float64)

    return ZEllipse(zka, arr(cx), arr(cy), arr(ax), arr(ay), power, z_open)


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid with semi-axes (a, b, c), rotated by ``theta`` about the z axis."""

    center: tuple[float, float, float]
    axes: tuple[float, float, float]
    theta: float = 0.0

    def contains(self, x: Arr, y: Arr, z: Arr) -> Bool:
        cx, cy, cz = self.center
        a, b, c = (max(v, 1e-6) for v in self.axes)
        w = (np.asarray(z, dtype=np.float64) - cz) / c
        lim = 1.0 - w * w
        dx = np.asarray(x, dtype=np.float64) - cx
        dy = np.asarray(y, dtype=np.float64) - cy
        if self.theta == 0.0:
            u = (dx / a) ** 2
            v = (dy / b) ** 2
            out: Bool = np.less_equal(u, lim - v)
            return out
        ct, st = math.cos(self.theta), math.sin(self.theta)
        p = (dx * ct + dy * st) / a
        q = (-dx * st + dy * ct) / b
        out2: Bool = np.less_equal(p * p + q * q, lim)
        return out2

    def bounds(self) -> tuple[F64, F64]:
        a, b, c = self.axes
        ct, st = math.cos(self.theta), math.sin(self.theta)
        ex = math.hypot(a * ct, b * st)
        ey = math.hypot(a * st, b * ct)
        cen = np.asarray(self.center, dtype=np.float64)
        half = np.array([ex, ey, c])
        return cen - half, cen + half


@dataclass(frozen=True)
class And:
    """Intersection of two shapes."""

    a: Shape
    b: Shape

    def contains(self, x: Arr, y: Arr, z: Arr) -> Bool:
        out: Bool = np.logical_and(self.a.contains(x, y, z), self.b.contains(x, y, z))
        return out

    def bounds(self) -> tuple[F64, F64]:
        la, ha = self.a.bounds()
        lb, hb = self.b.bounds()
        return np.maximum(la, lb), np.minimum(ha, hb)


@dataclass(frozen=True)
class Union:
    """Any of several shapes (a heart made of ventricles and atria)."""

    parts: tuple[Shape, ...]

    def contains(self, x: Arr, y: Arr, z: Arr) -> Bool:
        out: Bool = self.parts[0].contains(x, y, z)
        for p in self.parts[1:]:
            out = np.logical_or(out, p.contains(x, y, z))
        return out

    def bounds(self) -> tuple[F64, F64]:
        bs = [p.bounds() for p in self.parts]
        return np.min([b[0] for b in bs], axis=0), np.max([b[1] for b in bs], axis=0)


@dataclass(frozen=True)
class AndNot:
    """``a`` without ``b``: crescents, shells and walls."""

    a: Shape
    b: Shape

    def contains(self, x: Arr, y: Arr, z: Arr) -> Bool:
        inner = self.b.contains(x, y, z)
        out: Bool = np.logical_and(self.a.contains(x, y, z), np.logical_not(inner))
        return out

    def bounds(self) -> tuple[F64, F64]:
        return self.a.bounds()


@dataclass(frozen=True)
class Periodic:
    """A shape kept only in a repeating z pattern: vertebral bodies alternate with discs."""

    shape: Shape
    z0: float
    period: float
    duty: float
    invert: bool = False

    def contains(self, x: Arr, y: Arr, z: Arr) -> Bool:
        frac = np.mod((np.asarray(z, dtype=np.float64) - self.z0) / self.period, 1.0)
        on = frac < self.duty
        if self.invert:
            on = ~on
        out: Bool = np.logical_and(self.shape.contains(x, y, z), on)
        return out

    def bounds(self) -> tuple[F64, F64]:
        return self.shape.bounds()


@dataclass(frozen=True)
class HalfSpace:
    """Points on one side of an axis-aligned plane: the air-fluid level of a supine stomach."""

    axis: int  # 0 x, 1 y, 2 z
    value: float
    below: bool = True

    def contains(self, x: Arr, y: Arr, z: Arr) -> Bool:
        c = np.asarray((x, y, z)[self.axis], dtype=np.float64)
        out: Bool = c < self.value if self.below else c >= self.value
        return out

    def bounds(self) -> tuple[F64, F64]:
        lo = np.full(3, -1e9)
        hi = np.full(3, 1e9)
        if self.below:
            hi[self.axis] = self.value
        else:
            lo[self.axis] = self.value
        return lo, hi


@dataclass(frozen=True)
class Layer:
    """Paint ``code`` wherever ``shape`` is, but only over voxels whose label is in ``allowed``."""

    code: int
    shape: Shape
    allowed: frozenset[int] | None = None


def _allowed_lut(allowed: frozenset[int] | None) -> Bool | None:
    if allowed is None:
        return None
    lut = np.zeros(256, dtype=bool)
    lut[list(allowed)] = True
    return lut


def _allowed_mask(view: U8, allowed: frozenset[int]) -> Bool:
    """``view``'s membership in ``allowed``: a few byte comparisons beat a table lookup."""
    codes = sorted(allowed)
    if len(codes) <= 4:
        m: Bool = view == codes[0]
        for c in codes[1:]:
            m |= view == c
        return m
    lut = _allowed_lut(allowed)
    assert lut is not None
    out: Bool = lut[view]
    return out


def paint_layers(lab: U8, grid: Grid, layers: Sequence[Layer], z_range: tuple[int, int]) -> None:
    """Paint layers in order into ``lab[z_range]``; later layers win, as in a painter."""
    k0, k1 = z_range
    zmm, ymm, xmm = grid.axis_mm(0), grid.axis_mm(1), grid.axis_mm(2)
    for layer in layers:
        lo, hi = layer.shape.bounds()
        z0, z1 = grid.span(lo[2], hi[2], 0)
        z0, z1 = max(z0, k0), min(z1, k1)
        y0, y1 = grid.span(lo[1], hi[1], 1)
        x0, x1 = grid.span(lo[0], hi[0], 2)
        if z0 >= z1 or y0 >= y1 or x0 >= x1:
            continue
        view = lab[z0:z1, y0:y1, x0:x1]
        m = layer.shape.contains(
            xmm[None, None, x0:x1], ymm[None, y0:y1, None], zmm[z0:z1, None, None]
        )
        if m.shape != view.shape:
            m = np.broadcast_to(m, view.shape)
        if layer.allowed is not None:
            m = np.logical_and(m, _allowed_mask(view, layer.allowed))
        np.copyto(view, np.uint8(layer.code), where=m)


def labels_at(points: F64, layers: Sequence[Layer], background: int = 0) -> U8:
    """The label the painter would give each point: the analytic, resolution-free anatomy."""
    pts = np.asarray(points, dtype=np.float64)
    out = np.full(pts.shape[:-1], background, dtype=np.uint8)
    x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
    for layer in layers:
        m = layer.shape.contains(x, y, z)
        lut = _allowed_lut(layer.allowed)
        if lut is not None:
            m = np.logical_and(m, lut[out])
        out[m] = layer.code
    return out


def parallel_slabs(
    nz: int, work: Callable[[int, int], None], *, voxels_per_slice: int, threads: int
) -> None:
    """Run ``work(k0, k1)`` over z slabs, on threads when the volume is big enough to gain.

    numpy releases the GIL inside its loops, so two threads on disjoint slabs nearly halve the
    time of the byte-wide painting passes. Results do not depend on the thread count.
    """
    slab = max(1, min(nz, (1 << 21) // max(1, voxels_per_slice)))
    ranges = [(k, min(nz, k + slab)) for k in range(0, nz, slab)]
    if threads <= 1 or len(ranges) == 1:
        for k0, k1 in ranges:
            work(k0, k1)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for fut in [pool.submit(work, k0, k1) for k0, k1 in ranges]:
            fut.result()


# --- small objects: tubes, spheres, disks ----------------------------------------------------


@dataclass
class Prims:
    """Rounded cones from ``a`` to ``b`` (radii ``ra`` .. ``rb``); a == b makes a sphere.

    ``value`` is the intrinsic HU of each primitive and ``group`` a caller's tag (which nodule,
    which bronchus) carried through to the rendered voxels.
    """

    a: F64
    b: F64
    ra: F64
    rb: F64
    value: F64
    group: I64 = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        n = self.a.shape[0]
        if self.group.shape[0] != n:
            self.group = np.zeros(n, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.a.shape[0])


def concat_prims(parts: Sequence[Prims]) -> Prims:
    """One batch from several, so one vectorised pass renders them all."""
    parts = [p for p in parts if len(p)]
    if not parts:
        e3 = np.zeros((0, 3))
        e = np.zeros(0)
        return Prims(e3, e3, e, e, e, np.zeros(0, dtype=np.int64))
    return Prims(
        np.concatenate([p.a for p in parts]),
        np.concatenate([p.b for p in parts]),
        np.concatenate([p.ra for p in parts]),
        np.concatenate([p.rb for p in parts]),
        np.concatenate([p.value for p in parts]),
        np.concatenate([p.group for p in parts]),
    )


def polyline_prims(points: F64, radii: F64 | float, value: float, group: int = 0) -> Prims:
    """Consecutive points joined by rounded cones (a vessel, a rib, a wire)."""
    pts = np.asarray(points, dtype=np.float64)
    r = np.broadcast_to(np.asarray(radii, dtype=np.float64), (pts.shape[0],))
    n = pts.shape[0] - 1
    if n < 1:
        return sphere_prims(pts, r, value, group)
    return Prims(
        pts[:-1].copy(),
        pts[1:].copy(),
        r[:-1].copy(),
        r[1:].copy(),
        np.full(n, value, dtype=np.float64),
        np.full(n, group, dtype=np.int64),
    )


def sphere_prims(
    centers: F64, radii: F64 | float, value: F64 | float, group: I64 | int = 0
) -> Prims:
    """Spheres (nodules, nodes, calcium specks, emphysema holes)."""
    c = np.atleast_2d(np.asarray(centers, dtype=np.float64))
    n = c.shape[0]
    r = np.broadcast_to(np.asarray(radii, dtype=np.float64), (n,)).copy()
    v = np.broadcast_to(np.asarray(value, dtype=np.float64), (n,)).copy()
    g = np.broadcast_to(np.asarray(group, dtype=np.int64), (n,)).copy()
    return Prims(c.copy(), c.copy(), r, r.copy(), v, g)


@dataclass
class Disks:
    """Thin circular plates (interlobular septa, the scapula) of half-thickness ``half_t``."""

    center: F64
    normal: F64
    radius: F64
    half_t: F64
    value: F64
    group: I64

    def __len__(self) -> int:
        return int(self.center.shape[0])


@dataclass
class SplatResult:
    """The voxels a batch touched: flat index, occupancy, primitive and group of each."""

    idx: I64
    occ: F32
    item: I64
    group: I64

    def mask_indices(
        self, rel: float = 0.5, floor: float = 0.5, groups: Sequence[int] | None = None
    ) -> I64:
        """Voxels whose occupancy reaches ``floor``, or ``rel`` of the most any voxel got from
        the same primitive when that primitive is too thin or too hidden (by tissue it may not
        cover) to reach it. So every primitive that changed the image is in the mask, however
        small it is relative to a voxel, and what is left outside is the partial-volume fringe
        next to it. Indices may repeat (overlapping primitives); the callers paint them into a
        mask, which makes sorting them out unnecessary."""
        if not self.idx.size:
            return self.idx
        best = np.zeros(int(self.item.max()) + 1, dtype=np.float32)
        np.maximum.at(best, self.item, self.occ)
        keep = self.occ >= np.minimum(np.float32(floor), np.float32(rel) * best[self.item])
        keep &= self.occ > 0
        if groups is not None:
            keep &= np.isin(self.group, np.asarray(groups, dtype=np.int64))
        out: I64 = self.idx[keep]
        return out


def _empty_result() -> SplatResult:
    return SplatResult(
        np.zeros(0, dtype=np.int64),
        np.zeros(0, dtype=np.float32),
        np.zeros(0, dtype=np.int64),
        np.zeros(0, dtype=np.int64),
    )


def _join(results: Sequence[SplatResult]) -> SplatResult:
    if not results:
        return _empty_result()
    return SplatResult(
        np.concatenate([r.idx for r in results]),
        np.concatenate([r.occ for r in results]),
        np.concatenate([r.item for r in results]),
        np.concatenate([r.group for r in results]),
    )


@dataclass
class Canvas:
    """The volume being rendered: HU, tissue labels and the grid they live on."""

    grid: Grid
    hu: F32
    lab: U8
    threads: int = 1

    @property
    def huf(self) -> F32:
        out: F32 = self.hu.reshape(-1)
        return out

    @property
    def labf(self) -> U8:
        out: U8 = self.lab.reshape(-1)
        return out

    def coords(self, idx: I64) -> tuple[F32, F32, F32]:
        """World (x, y, z) mm of flat voxel indices."""
        _, ny, nx = self.grid.shape
        sz, sy, sx = self.grid.spacing
        iz, rem = np.divmod(idx, ny * nx)
        iy, ix = np.divmod(rem, nx)
        return (
            ix.astype(np.float32) * np.float32(sx),
            iy.astype(np.float32) * np.float32(sy),
            iz.astype(np.float32) * np.float32(sz),
        )


def _split_long(p: Prims, w: float) -> Prims:
    """Cut long primitives into pieces about one radius long.

    A primitive is evaluated over its bounding box; for an oblique tube the box holds many times
    the tube's own volume, and the waste is smallest when pieces are about a radius long.
    """
    if not len(p):
        return p
    d = p.b - p.a
    length = np.sqrt((d * d).sum(axis=1))
    piece = np.maximum(1.5 * np.maximum(p.ra, p.rb) + w, 3.0 * w)
    n = np.maximum(1, np.ceil(length / piece).astype(np.int64))
    if int(n.max()) == 1:
        return p
    rep = np.repeat(np.arange(len(p)), n)
    start = np.repeat(np.cumsum(n) - n, n)
    k = (np.arange(rep.size) - start).astype(np.float64)
    nn = n[rep].astype(np.float64)
    t0, t1 = k / nn, (k + 1.0) / nn
    a, dd = p.a[rep], d[rep]
    ra, dr = p.ra[rep], (p.rb - p.ra)[rep]
    return Prims(
        a + dd * t0[:, None],
        a + dd * t1[:, None],
        ra + dr * t0,
        ra + dr * t1,
        p.value[rep],
        p.group[rep],
    )


def _boxes(grid: Grid, lo: F64, hi: F64) -> tuple[npt.NDArray[np.int32], ...]:
    """Integer voxel boxes [x0, x1) x [y0, y1) x [z0, z1) of world-mm boxes, clipped."""
    nz, ny, nx = grid.shape
    sz, sy, sx = grid.spacing

    def rng_(lo_: F64, hi_: F64, s: float, n: int) -> tuple[npt.NDArray[np.int32], ...]:
        a = np.clip(np.ceil(lo_ / s), 0, n).astype(np.int32)
        b = np.clip(np.floor(hi_ / s) + 1, 0, n).astype(np.int32)
        return a, np.maximum(b, a)

    x0, x1 = rng_(lo[:, 0], hi[:, 0], sx, nx)
    y0, y1 = rng_(lo[:, 1], hi[:, 1], sy, ny)
    z0, z1 = rng_(lo[:, 2], hi[:, 2], sz, nz)
    return x0, x1, y0, y1, z0, z1


def _expand(
    counts: npt.NDArray[np.int32],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]:
    """For items with ``counts`` children each: the parent of every child and its rank."""
    total = int(counts.sum())
    parent = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
    first = np.cumsum(counts, dtype=np.int64) - counts
    rank = (np.arange(total, dtype=np.int64) - first[parent]).astype(np.int32)
    return parent, rank


@dataclass
class _Entries:
    """Voxels of a batch of boxes, enumerated row by row (no integer division needed)."""

    prim: npt.NDArray[np.int64]  # per entry
    ix: npt.NDArray[np.int32]  # per entry
    row: npt.NDArray[np.int64]  # per entry: index into the row arrays
    row_prim: npt.NDArray[np.int64]
    row_y: npt.NDArray[np.int32]
    row_z: npt.NDArray[np.int32]


def _enumerate(grid: Grid, lo: F64, hi: F64) -> _Entries | None:
    x0, x1, y0, y1, z0, z1 = _boxes(grid, lo, hi)
    bx, by, bz = x1 - x0, y1 - y0, z1 - z0
    empty = (bx == 0) | (by == 0)
    bz = np.where(empty, 0, bz).astype(np.int32)
    if int(bz.sum()) == 0:
        return None
    pz, kz = _expand(bz)
    row_z = z0[pz] + kz
    pr, ky = _expand(by[pz])
    row_prim = pz[pr]
    row_y = y0[row_prim] + ky
    row_zz = row_z[pr]
    row, kx = _expand(bx[row_prim])
    prim = row_prim[row]
    ix = x0[prim] + kx
    return _Entries(prim, ix, row, row_prim, row_y, row_zz)


EntryFilter = Callable[[F32, F32, F32], Bool]


def _chunks(cost: I64, limit: int = _CHUNK) -> list[tuple[int, int]]:
    """Split primitives into consecutive runs of about ``limit`` voxel entries each."""
    out: list[tuple[int, int]] = []
    n = cost.size
    csum = np.cumsum(cost)
    i = 0
    while i < n:
        base = int(csum[i - 1]) if i else 0
        j = max(i + 1, int(np.searchsorted(csum, base + limit, side="right")))
        out.append((i, min(j, n)))
        i = j
    return out


def _amplitude(r: F64, w: float, dims: F64) -> tuple[F64, F64]:
    """Footprint radius R and peak A of an object of radius ``r`` (partial-volume rule).

    The profile is a linear ramp one voxel (``w``) wide around R = max(r, w/2). For r below a
    voxel, A is lowered so that the integrated density equals the true object's (sphere: dims 3,
    tube: 2, sheet: 1), blending to A = 1 at r = w; bigger objects are simply anti-aliased.
    """
    half = 0.5 * w
    big = np.maximum(r, half)
    rr = np.maximum(r, 1e-6)
    a3 = rr**3 / (big * (big * big + w * w / 4.0))
    a2 = rr * rr / (big * big + w * w / 12.0)
    a1 = rr / big
    blend = np.clip((r - half) / half, 0.0, 1.0)
    amp = np.where(dims >= 3, a3 * (1.0 + 0.25 * blend),
                   np.where(dims >= 2, a2 * (1.0 + blend / 12.0), a1))
    return big, np.minimum(amp, 1.0)


def _composite(
    canvas: Canvas,
    idx: I64,
    occ: F32,
    value: F32,
    mode: Mode,
    code: int | None,
) -> None:
    huf, labf = canvas.huf, canvas.labf
    hu0 = huf[idx]
    target = hu0 + occ * (value - hu0)
    if mode == "max":
        np.maximum.at(huf, idx, target)
        took = value > hu0
    elif mode == "min":
        np.minimum.at(huf, idx, target)
        took = value < hu0
    else:
        huf[idx] = target
        took = np.ones(idx.shape, dtype=bool)
    if code is not None:
        sel = took & (occ >= 0.5)
        labf[idx[sel]] = np.uint8(code)


def _f32(a: F64) -> F32:
    out: F32 = np.ascontiguousarray(a, dtype=np.float32)
    return out


_Chunk = tuple[I64, F32, I64]


def _run_chunks(
    canvas: Canvas, n_chunks: int, compute: Callable[[int], _Chunk | None]
) -> list[_Chunk | None]:
    """Evaluate chunks, on threads when there are several (they only read the canvas)."""
    if canvas.threads <= 1 or n_chunks <= 1:
        return [compute(c) for c in range(n_chunks)]
    with ThreadPoolExecutor(max_workers=canvas.threads) as pool:
        return list(pool.map(compute, range(n_chunks)))


def _apply(
    canvas: Canvas,
    chunks: Sequence[_Chunk | None],
    value: F32,
    group: I64,
    *,
    mode: Mode,
    code: int | None,
    draw: bool,
    collect: bool,
) -> SplatResult:
    """Composite computed chunks in order (so the result never depends on threads)."""
    results: list[SplatResult] = []
    for ch in chunks:
        if ch is None:
            continue
        idx, occ, prim = ch
        if draw:
            _composite(canvas, idx, occ, value[prim], mode, code)
        if collect:
            results.append(SplatResult(idx, occ, prim, group[prim]))
    return _join(results)


def _select(
    canvas: Canvas,
    ent: _Entries,
    keep: Bool,
    row: I64,
    occ: F32,
    prim: I64,
    lut: Bool | None,
    entry_filter: EntryFilter | None,
) -> _Chunk | None:
    """Flat indices of kept entries, filtered by tissue and by the caller's predicate."""
    _, ny, nx = canvas.grid.shape
    ix = ent.ix[keep]
    iz = ent.row_z[row].astype(np.int64)
    iy = ent.row_y[row].astype(np.int64)
    idx = (iz * ny + iy) * nx + ix
    sel: Bool | None = None
    if lut is not None:
        sel = lut[canvas.labf[idx]]
    if entry_filter is not None:
        sz, sy, sx = canvas.grid.spacing
        f = entry_filter(
            ix.astype(np.float32) * np.float32(sx),
            iy.astype(np.float32) * np.float32(sy),
            iz.astype(np.float32) * np.float32(sz),
        )
        sel = f if sel is None else sel & f
    if sel is not None and not sel.all():
        idx, occ, prim = idx[sel], occ[sel], prim[sel]
    if not idx.size:
        return None
    return idx, occ, prim


def _box_cost(lo: F64, hi: F64, step: tuple[float, float, float]) -> I64:
    """Voxels in each primitive's bounding box (x, y, z order): how chunks share the work."""
    ext = hi - lo
    cost: I64 = (
        (np.floor(ext[:, 0] / step[0]) + 1)
        * (np.floor(ext[:, 1] / step[1]) + 1)
        * (np.floor(ext[:, 2] / step[2]) + 1)
    ).astype(np.int64)
    return cost


def splat(
    canvas: Canvas,
    prims: Prims,
    *,
    mode: Mode,
    allowed: frozenset[int] | None = None,
    code: int | None = None,
    entry_filter: EntryFilter | None = None,
    draw: bool = True,
    collect: bool = True,
) -> SplatResult:
    """Render rounded cones/spheres into the canvas and report the voxels they touched.

    ``max`` composites objects brighter than what they cover (vessels over lung, bone over
    muscle): a voxel gets the largest occupancy-weighted value, so overlapping pieces of one
    vessel do not add up. ``min`` is the same for darker objects (airway lumens, emphysema);
    ``set`` overwrites (last primitive wins). ``allowed`` limits drawing to tissue labels as
    they were before this call (lung vessels stay out of the heart); ``code`` relabels voxels
    the object dominates; ``draw`` False only measures; ``collect`` False skips the report.
    """
    if not len(prims):
        return _empty_result()
    grid = canvas.grid
    w = grid.pv_width
    p = _split_long(prims, w)
    d = p.b - p.a
    dd = (d * d).sum(axis=1)
    point = dd < 1e-12
    inv = np.where(point, 0.0, 1.0 / np.maximum(dd, 1e-12))
    dims = np.where(point, 3.0, 2.0)
    big_a, amp_a = _amplitude(p.ra, w, dims)
    big_b, amp_b = _amplitude(p.rb, w, dims)
    reach = np.maximum(big_a, big_b) + 0.5 * w
    lo = np.minimum(p.a, p.b) - reach[:, None]
    hi = np.maximum(p.a, p.b) + reach[:, None]
    sz, sy, sx = grid.spacing
    cost = _box_cost(lo, hi, (sx, sy, sz))
    ax, ay, az = _f32(p.a[:, 0]), _f32(p.a[:, 1]), _f32(p.a[:, 2])
    dx, dy, dz = _f32(d[:, 0]), _f32(d[:, 1]), _f32(d[:, 2])
    inv32, ra32, dr32 = _f32(inv), _f32(big_a), _f32(big_b - big_a)
    aa32, da32, val32 = _f32(amp_a), _f32(amp_b - amp_a), _f32(p.value)
    half_w = np.float32(0.5 * w)
    inv_w = np.float32(1.0 / w)
    lut = _allowed_lut(allowed)
    spans = _chunks(cost)

    def compute(c: int) -> _Chunk | None:
        i, j = spans[c]
        ent = _enumerate(grid, lo[i:j], hi[i:j])
        if ent is None:
            return None
        rp = ent.row_prim + i
        qy_r = ent.row_y.astype(np.float32) * np.float32(sy) - ay[rp]
        qz_r = ent.row_z.astype(np.float32) * np.float32(sz) - az[rp]
        yz_r = qy_r * dy[rp] + qz_r * dz[rp]
        pe = ent.prim + i
        row = ent.row
        qx = ent.ix.astype(np.float32) * np.float32(sx) - ax[pe]
        t = (qx * dx[pe] + yz_r[row]) * inv32[pe]
        np.clip(t, 0.0, 1.0, out=t)
        ex = qx - t * dx[pe]
        ey = qy_r[row] - t * dy[pe]
        ez = qz_r[row] - t * dz[pe]
        dist = np.sqrt(ex * ex + ey * ey + ez * ez)
        big = ra32[pe] + t * dr32[pe]
        keep = dist < big + half_w
        pe, t, dist, big, row = pe[keep], t[keep], dist[keep], big[keep], row[keep]
        amp = (aa32[pe] + t * da32[pe]).astype(np.float32)
        ramp = np.clip(np.float32(0.5) + (big - dist) * inv_w, 0.0, 1.0)
        occ = (amp * ramp).astype(np.float32)
        return _select(canvas, ent, keep, row, occ, pe, lut, entry_filter)

    chunks = _run_chunks(canvas, len(spans), compute)
    return _apply(canvas, chunks, val32, p.group, mode=mode, code=code, draw=draw,
                  collect=collect)


def splat_disks(
    canvas: Canvas,
    disks: Disks,
    *,
    mode: Mode,
    allowed: frozenset[int] | None = None,
    code: int | None = None,
    entry_filter: EntryFilter | None = None,
    collect: bool = True,
) -> SplatResult:
    """Render thin disks (sheets) with mass-conserving partial volume, like ``splat``."""
    if not len(disks):
        return _empty_result()
    grid = canvas.grid
    w = grid.pv_width
    big, amp = _amplitude(disks.half_t, w, np.ones(len(disks)))
    reach = disks.radius + big + 0.5 * w
    lo = disks.center - reach[:, None]
    hi = disks.center + reach[:, None]
    sz, sy, sx = grid.spacing
    cost = _box_cost(lo, hi, (sx, sy, sz))
    cx, cy, cz = (_f32(disks.center[:, k]) for k in range(3))
    nx_, ny_, nz_ = (_f32(disks.normal[:, k]) for k in range(3))
    rad, big32, amp32, val32 = _f32(disks.radius), _f32(big), _f32(amp), _f32(disks.value)
    half_w = np.float32(0.5 * w)
    inv_w = np.float32(1.0 / w)
    lut = _allowed_lut(allowed)
    spans = _chunks(cost)

    def compute(c: int) -> _Chunk | None:
        i, j = spans[c]
        ent = _enumerate(grid, lo[i:j], hi[i:j])
        if ent is None:
            return None
        rp = ent.row_prim + i
        qy_r = ent.row_y.astype(np.float32) * np.float32(sy) - cy[rp]
        qz_r = ent.row_z.astype(np.float32) * np.float32(sz) - cz[rp]
        dn_r = qy_r * ny_[rp] + qz_r * nz_[rp]
        q2_r = qy_r * qy_r + qz_r * qz_r
        pe = ent.prim + i
        row = ent.row
        qx = ent.ix.astype(np.float32) * np.float32(sx) - cx[pe]
        dn = qx * nx_[pe] + dn_r[row]
        q2 = qx * qx + q2_r[row]
        rho = np.sqrt(np.maximum(q2 - dn * dn, 0.0))
        edge = np.maximum(rho - rad[pe], 0.0)
        dist = np.sqrt(dn * dn + edge * edge)
        keep = dist < big32[pe] + half_w
        pe, dist, row = pe[keep], dist[keep], row[keep]
        ramp = np.clip(np.float32(0.5) + (big32[pe] - dist) * inv_w, 0.0, 1.0)
        occ = (amp32[pe] * ramp).astype(np.float32)
        return _select(canvas, ent, keep, row, occ, pe, lut, entry_filter)

    chunks = _run_chunks(canvas, len(spans), compute)
    return _apply(canvas, chunks, val32, disks.group, mode=mode, code=code, draw=True,
                  collect=collect)


# --- reconstruction: blur and noise ----------------------------------------------------------


def _kernel_passes(sigma_vox: float) -> tuple[float, int]:
    """A [w, 1-2w, w] kernel applied n times has variance 2nw; pick n so that w <= 0.25."""
    var = sigma_vox * sigma_vox
    if var < 0.01:
        return 0.0, 0
    n = max(1, math.ceil(var / 0.5))
    return var / (2 * n), n


def _blur_axis(a: F32, w: float, axis: int) -> None:
    """In-place [w, 1-2w, w] filter along ``axis``; the two border samples are left as they are
    (they are air in any CT, and keeping them avoids a second volume-sized copy)."""
    if w <= 0.0 or a.shape[axis] < 3:
        return

    def s(start: int | None, stop: int | None) -> tuple[slice, ...]:
        sl = [slice(None)] * a.ndim
        sl[axis] = slice(start, stop)
        return tuple(sl)

    nb = a[s(None, -2)] + a[s(2, None)]
    nb *= np.float32(w)
    mid = a[s(1, -1)]
    mid *= np.float32(1.0 - 2.0 * w)
    mid += nb


def blur_volume(hu: F32, sigma_xy_vox: float, z_range: tuple[int, int]) -> None:
    """In-plane point-spread blur of slices [z_range] (z is handled by ``blur_z``), one slice
    at a time: a slice stays in cache through all passes, which is twice as fast as slabs."""
    k0, k1 = z_range
    w, n = _kernel_passes(sigma_xy_vox)
    for k in range(k0, k1):
        sl = hu[k]
        for _ in range(n):
            _blur_axis(sl, w, 1)
            _blur_axis(sl, w, 0)


def _blur_z_range(
    hu: F32, w: float, k0: int, k1: int, below: F32 | None, above: F32 | None
) -> None:
    prev = below
    a, b = np.float32(w), np.float32(1.0 - 2.0 * w)
    for k in range(k0, k1):
        cur = hu[k].copy()
        nxt = hu[k + 1] if k + 1 < k1 else above
        if prev is not None and nxt is not None:
            nb = prev + nxt
            nb *= a
            hu[k] *= b
            hu[k] += nb
        prev = cur


def blur_z(hu: F32, sigma_z_vox: float, *, threads: int = 1) -> None:
    """Slice-profile blur along z, slice by slice so no volume-sized temporary exists; on
    threads, each slab starts from saved copies of its neighbours (same result either way)."""
    w, n = _kernel_passes(sigma_z_vox)
    nz = hu.shape[0]
    if n == 0 or nz < 3:
        return
    parts = max(1, min(threads, nz // 8))
    edges = [round(i * nz / parts) for i in range(parts + 1)]
    for _ in range(n):
        jobs = []
        for k0, k1 in itertools.pairwise(edges):
            below = hu[k0 - 1].copy() if k0 > 0 else None
            above = hu[k1].copy() if k1 < nz else None
            jobs.append((k0, k1, below, above))
        if parts == 1:
            _blur_z_range(hu, w, *jobs[0])
            continue
        with ThreadPoolExecutor(max_workers=parts) as pool:
            futs = [pool.submit(_blur_z_range, hu, w, *job) for job in jobs]
            for fut in futs:
                fut.result()


class NoisePool:
    """Correlated image noise for every slice, drawn from a few pre-filtered noise planes.

    Drawing 78 M Gaussian samples for a 512x512x300 study costs about a second; a pool of a few
    padded planes, read at a random offset and orientation per slice (views, no copies), gives
    noise that is visually indistinguishable at a few percent of the cost. The planes are blurred
    with the reconstruction kernel so the grain has the size real CT noise has, then rescaled to
    unit standard deviation.
    """

    def __init__(
        self, rng: np.random.Generator, ny: int, nx: int, nz: int, sigma_vox: float, planes: int = 6
    ) -> None:
        pad = 24
        self._ny, self._nx, self._pad = ny, nx, pad
        pool = rng.standard_normal((planes, ny + pad, nx + pad), dtype=np.float32)
        w, n = _kernel_passes(sigma_vox)
        for _ in range(n):
            _blur_axis(pool, w, 2)
            _blur_axis(pool, w, 1)
        std = float(pool[:, 2:-2, 2:-2].std())
        pool /= np.float32(max(std, 1e-6))
        self._pool = pool
        self._plane = rng.integers(0, planes, nz)
        self._oy = rng.integers(0, pad + 1, nz)
        self._ox = rng.integers(0, pad + 1, nz)
        self._flip = rng.integers(0, 4, nz)

    def slice(self, k: int) -> F32:
        """The noise plane for slice ``k`` (a read-only view)."""
        oy, ox = int(self._oy[k]), int(self._ox[k])
        v = self._pool[int(self._plane[k]), oy : oy + self._ny, ox : ox + self._nx]
        f = int(self._flip[k])
        if f & 1:
            v = v[::-1]
        if f & 2:
            v = v[:, ::-1]
        return v
