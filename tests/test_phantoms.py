"""Synthetic chest phantoms: determinism, tissue attenuation, each finding's truth, prevalence.

Volumes are small (a few million voxels) so the whole file runs in seconds; spacing is chosen
fine enough in plane that millimetre lesions still have the partial volume the checks assume.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import numpy.typing as npt
import pytest

from engines.data.anatomy import Tissue
from engines.data.labels import LABEL_INDEX, LABELS
from engines.data.phantoms import (
    CT_RATE_PREVALENCE,
    Phantom,
    PhantomConfig,
    cardiothoracic_ratio,
    generate_phantom,
    sample_labels,
)

# 240 x 307 x 307 mm: the whole thorax of an average adult, 3.4 M voxels.
SHAPE = (96, 192, 192)
SPACING = (2.5, 1.6, 1.6)
SEED = 11
# Noise and blur off: what is left in a finding's mask is its own attenuation and partial volume.
CLEAN = PhantomConfig(noise_sigma=(0.0, 0.0), blur_mm=(0.0, 0.0))

F32 = npt.NDArray[np.float32]


@cache
def clean(*labels: str) -> Phantom:
    return generate_phantom(SHAPE, SPACING, seed=SEED, config=CLEAN, labels=list(labels))


@cache
def noisy(seed: int = SEED) -> Phantom:
    return generate_phantom(SHAPE, SPACING, seed=seed, labels=[])


def erode(mask: npt.NDArray[np.bool_], n: int = 1) -> npt.NDArray[np.bool_]:
    """Binary erosion with the 6-neighbourhood (partial-volume rims excluded)."""
    m = mask.copy()
    for _ in range(n):
        p = np.pad(m, 1)
        m = (
            p[1:-1, 1:-1, 1:-1]
            & p[:-2, 1:-1, 1:-1] & p[2:, 1:-1, 1:-1]
            & p[1:-1, :-2, 1:-1] & p[1:-1, 2:, 1:-1]
            & p[1:-1, 1:-1, :-2] & p[1:-1, 1:-1, 2:]
        )
    return m


# --- determinism and geometry ------------------------------------------------------------


def test_same_seed_is_bit_identical_and_seeds_differ() -> None:
    a = generate_phantom((24, 64, 64), (10.0, 6.0, 6.0), seed=5)
    b = generate_phantom((24, 64, 64), (10.0, 6.0, 6.0), seed=5)
    c = generate_phantom((24, 64, 64), (10.0, 6.0, 6.0), seed=6)
    assert a.hu.dtype == np.float32 and a.hu.shape == (24, 64, 64)
    assert np.array_equal(a.hu, b.hu)
    assert np.array_equal(a.tissue, b.tissue)
    assert np.array_equal(a.labels, b.labels)
    assert [f.center_voxel for f in a.findings] == [f.center_voxel for f in b.findings]
    assert not np.array_equal(a.hu, c.hu)


def test_threads_do_not_change_the_result() -> None:
    one = generate_phantom((32, 96, 96), (8.0, 4.0, 4.0), seed=3, labels=LABELS,
                           config=PhantomConfig(threads=1))
    two = generate_phantom((32, 96, 96), (8.0, 4.0, 4.0), seed=3, labels=LABELS,
                           config=PhantomConfig(threads=2))
    assert np.array_equal(one.hu, two.hu)


def test_affine_is_lps_centred_and_z_up() -> None:
    ph = noisy()
    nz, ny, nx = SHAPE
    sz, sy, sx = SPACING
    a = ph.affine
    assert a.shape == (4, 4)
    # x index -> patient left, y index -> posterior, z index -> superior.
    assert np.allclose(a[:3, :3], [[0, 0, sx], [0, sy, 0], [sz, 0, 0]])
    centre = a @ np.array([(nz - 1) / 2, (ny - 1) / 2, (nx - 1) / 2, 1.0])
    assert np.allclose(centre[:3], 0.0)
    # Anatomy agrees: the heart is left of the midline, the spine posterior, the lung apices
    # at the top (high z index) and the liver at the bottom.
    heart = np.argwhere(ph.tissue == Tissue.HEART)
    assert heart[:, 2].mean() > (nx - 1) / 2
    bone = np.argwhere(ph.tissue == Tissue.CANAL)
    assert bone[:, 1].mean() > (ny - 1) / 2
    lung_z = np.argwhere(np.isin(ph.tissue, [Tissue.LUNG_RIGHT, Tissue.LUNG_LEFT]))[:, 0]
    liver_z = np.argwhere(ph.tissue == Tissue.LIVER)[:, 0]
    assert lung_z.max() > liver_z.max() and liver_z.min() < lung_z.min()


def test_any_size_and_spacing_renders() -> None:
    for shape, spacing in (((64, 96, 96), (4.0, 4.0, 4.0)), ((4, 32, 32), (1.0, 1.0, 1.0)),
                           ((1, 48, 40), (5.0, 8.0, 8.0))):
        ph = generate_phantom(shape, spacing, seed=2)
        assert ph.hu.shape == shape and np.isfinite(ph.hu).all()
        assert ph.hu.min() >= -1024 and ph.hu.max() <= 3071
        assert ph.labels.sum() == len(ph.findings)


def test_rejects_bad_geometry_and_labels() -> None:
    with pytest.raises(ValueError, match="shape"):
        generate_phantom((0, 8, 8), (1.0, 1.0, 1.0), seed=0)
    with pytest.raises(ValueError, match="spacing"):
        generate_phantom((8, 8, 8), (1.0, 0.0, 1.0), seed=0)
    with pytest.raises(KeyError, match="unknown label"):
        generate_phantom((8, 8, 8), (1.0, 1.0, 1.0), seed=0, labels=["Nodule"])
    with pytest.raises(ValueError, match="prevalence"):
        PhantomConfig(prevalence={"Emphysema": 1.5})


# --- tissues -------------------------------------------------------------------------------


def test_tissue_attenuation() -> None:
    ph = noisy()
    hu, t = ph.hu, ph.tissue
    lung = erode(np.isin(t, [Tissue.LUNG_RIGHT, Tissue.LUNG_LEFT]))
    assert abs(float(hu[lung].mean()) + 850.0) < 50.0
    fat = erode(t == Tissue.FAT)
    assert -125.0 < float(np.median(hu[fat])) < -75.0
    muscle = erode(t == Tissue.MUSCLE, 2)
    assert 35.0 < float(np.median(hu[muscle])) < 65.0
    air = hu[:, :8, :8]
    assert float(air.mean()) < -990.0
    c = clean()
    cortex = c.hu[c.tissue == Tissue.CORTICAL_BONE]
    assert 700.0 <= float(np.percentile(cortex, 95)) <= 1500.0
    assert float(cortex.max()) <= 1500.0


def test_noise_level() -> None:
    ph = noisy()
    sigma = ph.patient["noise_sigma_hu"]
    assert 10.0 <= sigma <= 30.0
    liver = erode(ph.tissue == Tissue.LIVER, 2)
    # Liver is homogeneous: its spread is the image noise (a little less after the slice
    # profile has averaged neighbouring slices).
    assert 0.6 * sigma < float(ph.hu[liver].std()) < 1.2 * sigma


def test_cardiothoracic_ratio() -> None:
    normal = clean()
    big = clean("Cardiomegaly")
    r_normal = cardiothoracic_ratio(normal.tissue, SPACING)
    r_big = cardiothoracic_ratio(big.tissue, SPACING)
    assert 0.40 <= r_normal <= 0.50
    assert r_big > 0.5
    assert abs(r_normal - normal.patient["ctr"]) < 0.03
    assert abs(r_big - big.patient["ctr"]) < 0.03
    f = big.finding("Cardiomegaly")
    assert f is not None and f.extra["ctr"] > 0.5


# --- each finding --------------------------------------------------------------------------


def _check_truth(ph: Phantom, label: str) -> None:
    f = ph.finding(label)
    assert f is not None, ph.patient["dropped_findings"]
    assert f.label_index == LABEL_INDEX[label]
    assert [x.label for x in ph.findings] == [label]
    expect = np.zeros(len(LABELS), dtype=np.int8)
    expect[LABEL_INDEX[label]] = 1
    assert np.array_equal(ph.labels, expect)
    full = f.full_mask(ph.hu.shape)
    assert full.sum() == f.voxels > 0
    assert full[f.center_voxel]
    zs = np.flatnonzero(full.any(axis=(1, 2)))
    assert f.z_extent == (int(zs[0]), int(zs[-1]))
    lps = ph.affine @ np.array([*f.center_voxel, 1.0])
    assert np.allclose(lps[:3], f.center_mm)
    assert f.size_mm > 0
    assert f.side in (None, "left", "right", "bilateral")


@pytest.mark.parametrize("label", LABELS)
def test_each_finding_changes_only_its_region(label: str) -> None:
    base, ph = clean(), clean(label)
    _check_truth(ph, label)
    f = ph.finding(label)
    assert f is not None
    m = f.full_mask(ph.hu.shape)
    with_, without = ph.hu[m], base.hu[m]
    if label == "Mosaic attenuation pattern":
        # Darker and denser lobules: the pattern is in the spread, not the mean.
        assert float(np.abs(with_ - without).mean()) > 20.0
    else:
        assert abs(float(with_.mean()) - float(without.mean())) > 20.0
    # Same seed without the finding is the same chest: nothing changes away from it, beyond
    # the partial-volume fringe of the lesion (a few voxels, a fraction of a HU at most).
    z0, z1, y0, y1, x0, x1 = f.bbox
    near = np.zeros(ph.hu.shape, dtype=bool)
    near[max(0, z0 - 3):z1 + 3, max(0, y0 - 6):y1 + 6, max(0, x0 - 6):x1 + 6] = True
    assert float(np.abs(ph.hu[~near] - base.hu[~near]).max()) < 1.0
    assert np.array_equal(ph.tissue[~near], base.tissue[~near])


def _values(label: str) -> tuple[Phantom, F32]:
    ph = clean(label)
    f = ph.finding(label)
    assert f is not None
    return ph, ph.hu[f.full_mask(ph.hu.shape)]


def test_fluid_collections_measure_as_water() -> None:
    for label in ("Pleural effusion", "Pericardial effusion"):
        _, v = _values(label)
        assert 0.0 <= float(np.median(v)) <= 20.0, label


def test_calcifications_are_bright_specks() -> None:
    for label in ("Arterial wall calcification", "Coronary artery wall calcification"):
        ph, v = _values(label)
        assert 200.0 <= float(v.max()) <= 1000.0, label
        f = ph.finding(label)
        assert f is not None and f.voxels < 2000


def test_metal_is_metal_dense() -> None:
    ph, v = _values("Medical material")
    assert float(v.max()) >= 2000.0
    f = ph.finding("Medical material")
    assert f is not None and f.extra["kind"] in ("port", "pacemaker", "sternotomy wires")


def test_lung_density_findings() -> None:
    _, v = _values("Emphysema")
    assert float(v.mean()) < -950.0
    _, v = _values("Lung opacity")
    assert -700.0 <= float(v.mean()) <= -300.0
    _, v = _values("Consolidation")
    assert -100.0 <= float(v.mean()) <= 60.0
    _, v = _values("Atelectasis")
    assert float(v.mean()) > -500.0


def test_sizes_follow_the_radiology() -> None:
    sizes = []
    for seed in range(12):
        ph = generate_phantom((48, 96, 96), (6.0, 4.0, 4.0), seed=seed, labels=["Lung nodule"])
        f = ph.finding("Lung nodule")
        assert f is not None
        sizes += f.extra["diameters_mm"]
    assert all(4.0 <= d <= 30.0 for d in sizes)
    assert np.mean(np.array(sizes) < 10.0) > 0.5
    for label, lo, hi in (("Lymphadenopathy", 10.0, 30.0), ("Pericardial effusion", 4.0, 20.0),
                          ("Hiatal hernia", 20.0, 60.0),
                          ("Interlobular septal thickening", 1.0, 2.0)):
        f = clean(label).finding(label)
        assert f is not None and lo <= f.size_mm <= hi, label


def test_hiatal_hernia_holds_gas_and_fluid() -> None:
    _, v = _values("Hiatal hernia")
    assert float(v.min()) < -800.0
    assert np.any((v > -20.0) & (v < 60.0))


# --- prevalence ----------------------------------------------------------------------------


def test_sampled_prevalence_and_links() -> None:
    cfg = PhantomConfig()
    rng = np.random.default_rng(0)
    n = 4000
    counts = dict.fromkeys(LABELS, 0)
    both = 0
    for _ in range(n):
        got = sample_labels(rng, cfg)
        for name in got:
            counts[name] += 1
        both += "Cardiomegaly" in got and "Pericardial effusion" in got
    for name in LABELS:
        p = CT_RATE_PREVALENCE[name]
        assert abs(counts[name] / n - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-3, name
    # Linked: pericardial effusion is three times as likely with cardiomegaly.
    p_joint = both / n
    assert p_joint > 2.0 * CT_RATE_PREVALENCE["Cardiomegaly"] * CT_RATE_PREVALENCE[
        "Pericardial effusion"]


def test_phantoms_respect_configured_prevalence() -> None:
    cfg = PhantomConfig(prevalence={**dict.fromkeys(LABELS, 0.0), "Lung nodule": 0.5,
                                    "Emphysema": 0.2, "Pleural effusion": 1.0})
    n = 200
    got = np.zeros(len(LABELS))
    for seed in range(n):
        ph = generate_phantom((12, 24, 24), (24.0, 16.0, 16.0), seed=seed, config=cfg)
        assert ph.labels.sum() == len(ph.findings)
        got += ph.labels
    frac = got / n
    assert frac[LABEL_INDEX["Pleural effusion"]] == 1.0
    assert abs(frac[LABEL_INDEX["Lung nodule"]] - 0.5) < 0.12
    assert abs(frac[LABEL_INDEX["Emphysema"]] - 0.2) < 0.1
    others = [i for i, name in enumerate(LABELS)
              if name not in ("Lung nodule", "Emphysema", "Pleural effusion")]
    assert frac[others].sum() == 0.0
