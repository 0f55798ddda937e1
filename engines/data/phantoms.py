"""Synthetic chest phantoms for tests and benchmarks.

The phantom only needs to look enough like a chest CT for plumbing to be exercised honestly:
realistic HU ranges (air, fat, soft tissue, lung, bone) in physically sized structures, so that
windowing, lung masks and compression behave as they would on real data. It is not anatomy; a
later generator replaces it. Everything is vectorised numpy, one 2D evaluation per slice, so a
300x512x512 volume takes a second or two.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["HU", "basic_chest_phantom"]

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
