"""Series geometry: the checks that decide whether a stack of slices is a regular volume.

Kept free of pydicom so the rules can be tested with plain arrays and reused by any reader
(single-frame series, Enhanced CT frames). Every rejection is a typed :class:`VolumeError`
whose ``reason`` names the cause, because the caller (a job, a CLI) must tell a user *why*
a series was not read, and must never receive a volume that silently distorts anatomy.

Conventions: DICOM patient coordinates (LPS, mm). The slice normal is the cross product of
the row and column direction cosines of ImageOrientationPatient; a slice's position is the
dot product of its ImagePositionPatient with that normal. Slices are ordered by increasing
position, which is what ITK/GDCM do too, so arrays agree index for index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

#: Absolute floor (mm) for position comparisons. Scanners write ImagePositionPatient with as
#: few as two decimals, so differences below this are rounding, not geometry.
POSITION_EPS_MM = 0.01
#: Direction cosines of two slices may differ by this much (about 0.06 degrees) and still be
#: "the same orientation"; values are written as decimal strings and lose precision.
ORIENTATION_TOLERANCE = 1e-3
#: Relative tolerance on pixel spacing between slices of one series.
PIXEL_SPACING_RTOL = 1e-3
#: Gaps at least this many times the typical spacing count as missing slices rather than
#: merely uneven spacing.
MISSING_GAP_RATIO = 1.5


class VolumeError(Exception):
    """A series that cannot be assembled into a volume without guessing."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotAnImageSeriesError(VolumeError):
    """The objects are not CT slices (no pixels, localizer, secondary capture, ...)."""


class MultipleSeriesError(VolumeError):
    """The input mixes several series; the caller must pick one."""

    def __init__(self, reason: str, series: dict[str, int]) -> None:
        super().__init__(reason)
        self.series = series


class MixedGeometryError(VolumeError):
    """Slices disagree on orientation, matrix size or pixel spacing."""


class GantryTiltError(VolumeError):
    """Slices are stacked along a direction that is not their normal (sheared volume)."""

    def __init__(self, reason: str, angle_deg: float) -> None:
        super().__init__(reason)
        self.angle_deg = angle_deg


class MissingSlicesError(VolumeError):
    """A gap between neighbouring slices is clearly larger than the typical spacing."""


class UnevenSpacingError(VolumeError):
    """Slice spacing varies beyond tolerance without looking like missing slices."""


class DuplicatePositionError(VolumeError):
    """Two different instances sit at the same position along the normal."""


@dataclass(frozen=True)
class StackGeometry:
    """The validated geometry of a sorted stack, enough to build the affine."""

    order: npt.NDArray[np.intp]  # input index for every z index
    origin: FloatArray  # ImagePositionPatient of z index 0
    row_cosine: FloatArray  # direction of increasing column index (x)
    col_cosine: FloatArray  # direction of increasing row index (y)
    normal: FloatArray  # direction of increasing z index
    spacing: tuple[float, float, float]  # (z, y, x) mm

    def affine(self) -> FloatArray:
        """Map homogeneous array index (z, y, x, 1) to LPS mm."""
        dz, dy, dx = self.spacing
        out = np.eye(4, dtype=np.float64)
        out[:3, 0] = self.normal * dz
        out[:3, 1] = self.col_cosine * dy
        out[:3, 2] = self.row_cosine * dx
        out[:3, 3] = self.origin
        return out


def slice_normal(orientation: Sequence[float]) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Return (row cosine, column cosine, normal), rejecting cosines that are not a frame.

    A corrupt orientation would produce a meaningless sort order, so it is an error here
    rather than a silently skewed volume later.
    """
    iop = np.asarray(orientation, dtype=np.float64)
    if iop.shape != (6,) or not np.all(np.isfinite(iop)):
        raise MixedGeometryError(f"ImageOrientationPatient is not six numbers: {orientation!r}")
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 0.01 or abs(np.linalg.norm(col) - 1) > 0.01:
        raise MixedGeometryError(f"ImageOrientationPatient is not unit vectors: {orientation!r}")
    if abs(float(row @ col)) > 0.01:
        raise MixedGeometryError(f"ImageOrientationPatient rows/columns not orthogonal: {iop}")
    row = row / np.linalg.norm(row)
    col = col / np.linalg.norm(col)
    normal = np.cross(row, col)
    return row, col, normal / np.linalg.norm(normal)


def check_uniform(
    orientations: FloatArray,
    pixel_spacings: FloatArray,
    shapes: npt.NDArray[np.int64],
    labels: Sequence[str],
) -> None:
    """Reject stacks whose slices do not share one in-plane grid.

    ``labels`` name each slice (SOP UID or file) so the error points at the odd one out.
    """
    _check_same(shapes, 0.0, 0.0, "matrix size (Rows, Columns)", labels)
    _check_same(orientations, ORIENTATION_TOLERANCE, 0.0, "orientation", labels)
    _check_same(pixel_spacings, 0.0, PIXEL_SPACING_RTOL, "PixelSpacing", labels)


def _check_same(
    values: npt.NDArray[np.generic],
    atol: float,
    rtol: float,
    what: str,
    labels: Sequence[str],
) -> None:
    ref = values[0].astype(np.float64)
    diff = np.abs(values.astype(np.float64) - ref)
    bad = np.flatnonzero(np.any(diff > atol + rtol * np.abs(ref), axis=1))
    if bad.size:
        i = int(bad[0])
        kinds = len({tuple(v) for v in np.round(values.astype(np.float64), 4).tolist()})
        raise MixedGeometryError(
            f"mixed {what}: {kinds} distinct values, e.g. {labels[0]} has "
            f"{values[0].tolist()} but {labels[i]} has {values[i].tolist()}"
        )


def stack_geometry(
    positions: FloatArray,
    orientation: Sequence[float],
    pixel_spacing: tuple[float, float],
    labels: Sequence[str],
    *,
    spacing_tolerance: float,
    tilt_tolerance_deg: float,
    single_slice_spacing: float | None,
) -> StackGeometry:
    """Sort slices along the normal and validate that they form a regular, unsheared stack.

    ``positions`` is (n, 3) ImagePositionPatient. ``single_slice_spacing`` is used only when
    n == 1, because one slice carries no positional information about z spacing.
    """
    row, col, normal = slice_normal(orientation)
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    dist = dist[order]
    pos = positions[order]
    sorted_labels = [labels[int(i)] for i in order]
    if len(order) == 1:
        dz = _single_slice_spacing(single_slice_spacing)
    else:
        _check_duplicates(dist, sorted_labels)
        tilt = _tilt_error(pos, dist, normal, tilt_tolerance_deg, min(pixel_spacing))
        dz = _spacing_unless_tilted(dist, sorted_labels, spacing_tolerance, tilt)
    return StackGeometry(
        order=order,
        origin=pos[0].copy(),
        row_cosine=row,
        col_cosine=col,
        normal=normal,
        spacing=(dz, float(pixel_spacing[0]), float(pixel_spacing[1])),
    )


def _single_slice_spacing(value: float | None) -> float:
    if value is None or not math.isfinite(value) or value <= 0:
        raise VolumeError(
            "single slice without SliceThickness or SpacingBetweenSlices: z spacing unknown"
        )
    return float(value)


def _check_duplicates(dist: FloatArray, labels: Sequence[str]) -> None:
    gaps = np.diff(dist)
    dup = np.flatnonzero(gaps <= POSITION_EPS_MM)
    if dup.size:
        i = int(dup[0])
        raise DuplicatePositionError(
            f"{dup.size} pair(s) of slices share a position; e.g. {labels[i]} and "
            f"{labels[i + 1]} both at {dist[i]:.3f} mm along the normal"
        )


def _tilt_angle(pos: FloatArray, dist: FloatArray, normal: FloatArray) -> tuple[float, float]:
    """Return (angle in degrees, largest in-plane drift in mm) of the stack.

    The in-plane drift of each slice relative to the first, over the extent along the
    normal, is tan(tilt) for a tilted gantry and a pessimistic bound for jitter.
    """
    rel = pos - pos[0]
    along = dist - dist[0]
    inplane = rel - np.outer(along, normal)
    drift = float(np.linalg.norm(inplane, axis=1).max())
    return math.degrees(math.atan2(drift, float(along[-1]))), drift


def _tilt_error(
    pos: FloatArray, dist: FloatArray, normal: FloatArray, tolerance_deg: float, pixel: float
) -> GantryTiltError | None:
    """The error for shear beyond ``tolerance_deg``, or None.

    Drift below a tenth of a pixel is ignored whatever the angle: it cannot move anatomy
    visibly, and in short stacks rounding of written positions would otherwise read as tilt.
    """
    angle, drift = _tilt_angle(pos, dist, normal)
    if angle <= tolerance_deg or drift <= max(0.1 * pixel, POSITION_EPS_MM):
        return None
    return GantryTiltError(
        f"gantry tilt / sheared stack: slices are stacked {angle:.2f} degrees off their "
        f"normal (in-plane drift {drift:.2f} mm over {dist[-1] - dist[0]:.2f} mm); "
        "correction (resampling) is not done here",
        angle_deg=angle,
    )


def _spacing_unless_tilted(
    dist: FloatArray, labels: Sequence[str], tolerance: float, tilt: GantryTiltError | None
) -> float:
    """Check spacing, then raise the tilt; a tilted series with bad gaps names both."""
    try:
        dz = check_spacing(dist, labels, tolerance)
    except VolumeError as spacing:
        if tilt is None:
            raise
        raise GantryTiltError(f"{tilt.reason}; also {spacing.reason}", tilt.angle_deg) from None
    if tilt is not None:
        raise tilt
    return dz


def check_spacing(dist: FloatArray, labels: Sequence[str], tolerance: float) -> float:
    """Return the slice spacing (median gap), or raise if the gaps are not all equal.

    ``tolerance`` is relative to the median gap, with an absolute floor of POSITION_EPS_MM
    for positions written with few decimals.
    """
    gaps = np.diff(dist)
    dz = float(np.median(gaps))
    allowed = max(tolerance * dz, POSITION_EPS_MM)
    irregular = np.flatnonzero(np.abs(gaps - dz) > allowed)
    if irregular.size == 0:
        return dz
    if np.all(gaps[irregular] >= MISSING_GAP_RATIO * dz):
        raise MissingSlicesError(_missing_reason(gaps, irregular, dz, labels))
    raise UnevenSpacingError(_uneven_reason(gaps, irregular, dz, allowed))


def _missing_reason(
    gaps: FloatArray, irregular: npt.NDArray[np.intp], dz: float, labels: Sequence[str]
) -> str:
    missing = int(sum(max(round(g / dz) - 1, 1) for g in gaps[irregular]))
    i = int(irregular[0])
    return (
        f"missing slices: {irregular.size} gap(s) larger than the {dz:.3f} mm spacing "
        f"(about {missing} slice(s) absent); first gap {gaps[i]:.3f} mm between "
        f"{labels[i]} and {labels[i + 1]}"
    )


def _uneven_reason(
    gaps: FloatArray, irregular: npt.NDArray[np.intp], dz: float, allowed: float
) -> str:
    distinct = sorted({round(float(g), 2) for g in gaps})
    shown = ", ".join(f"{g:g}" for g in distinct[:6])
    more = "" if len(distinct) <= 6 else f" and {len(distinct) - 6} more"
    return (
        f"uneven slice spacing: {irregular.size} of {gaps.size} gaps differ from the "
        f"median {dz:.3f} mm by more than {allowed:.3f} mm (gaps seen: {shown}{more} mm)"
    )
