"""Model space: presets, HU window, resampling, orientation, crop/pad and the depth geometry."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import numpy.typing as npt
import pytest
import torch

from engines.preprocess import ModelSpace, orientation, to_model_space
from engines.presets import (
    PRESETS,
    ModelSpaceConfig,
    get_preset,
    override,
    preset_from_dict,
    preset_to_dict,
)
from model_fixtures import TINY_OPTIONS_ON

# --- presets --------------------------------------------------------------------------------


def test_paper_preset_matches_the_paper() -> None:
    p = get_preset("paper")
    assert p.space.spacing_mm == (3.0, 0.75, 0.75)
    assert p.space.shape == (128, 384, 384)
    assert p.space.hu_window == (-1000.0, 1000.0)
    assert p.space.depth_token_mm == 12.0 and p.space.slices_per_token == 4
    assert p.space.n_depth_tokens == 32
    assert p.model.head.output_dim == 512
    assert p.loss.init_logit_scale == pytest.approx(math.log(10)) and p.loss.init_logit_bias == -10
    assert (p.loss.siglip_weight, p.loss.prompt_weight, p.loss.localization_weight) == (
        1.0,
        0.5,
        0.004,
    )
    assert (p.loss.localization_tau, p.loss.localization_sigma, p.loss.pos_weight_cap) == (
        0.1,
        2.0,
        20.0,
    )
    o = p.optim
    assert (o.lr, o.weight_decay, o.betas, o.precision) == (2e-4, 1e-4, (0.9, 0.95), "bf16")
    assert o.warmup_epochs > 0 and p.augment.flip_prob > 0


def test_tiny_preset_is_small_and_frozen() -> None:
    p = get_preset("tiny")
    assert p.space.depth_token_mm == 12.0
    assert 2.5 <= p.space.spacing_mm[1] <= 3.0 and 3.0 <= p.space.spacing_mm[0] <= 6.0
    assert math.prod(p.space.shape) <= 128 * 128 * 96
    assert p.model.text.freeze and p.model.text.cache_embeddings
    assert p.model.backbone.kind == "cnn"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_dict_round_trip(name: str) -> None:
    p = get_preset(name)
    assert preset_from_dict(preset_to_dict(p)) == p
    if p.model.backbone.kind == "cnn":  # the options tiny leaves off survive bundle.toml too
        for key, value in TINY_OPTIONS_ON:
            p = override(p, key, value)
        assert preset_from_dict(preset_to_dict(p)) == p
    with pytest.raises(ValueError, match="unknown keys"):
        preset_from_dict({**preset_to_dict(p), "space": {"spacing_mm": [1, 1, 1], "typo": 1}})
    with pytest.raises(KeyError):
        get_preset("huge")


def test_invalid_model_space_configs() -> None:
    with pytest.raises(ValueError, match="whole number"):
        ModelSpaceConfig(spacing_mm=(5.0, 1, 1), shape=(10, 8, 8), depth_token_mm=12.0)
    with pytest.raises(ValueError, match="tokens"):
        ModelSpaceConfig(spacing_mm=(3.0, 1, 1), shape=(10, 8, 8), depth_token_mm=12.0)
    with pytest.raises(ValueError):
        ModelSpaceConfig(spacing_mm=(3.0, 1, 1), shape=(8, 8, 8), hu_window=(100, -100))
    paper = get_preset("paper")
    with pytest.raises(ValueError, match="patch depth"):
        dataclasses.replace(
            paper,
            space=ModelSpaceConfig(spacing_mm=(1.5, 0.75, 0.75), shape=(128, 384, 384)),
        )


# --- helpers --------------------------------------------------------------------------------

CFG = ModelSpaceConfig(spacing_mm=(3.0, 2.0, 2.0), shape=(24, 8, 8), depth_token_mm=12.0)


def axial_affine(
    spacing: tuple[float, float, float], origin: tuple[float, float, float], z_sign: float = 1.0
) -> npt.NDArray[np.float64]:
    a = np.zeros((4, 4))
    a[0, 2], a[1, 1], a[2, 0] = spacing[2], spacing[1], z_sign * spacing[0]
    a[:3, 3] = origin
    a[3, 3] = 1.0
    return a


def slice_coded(nz: int, ny: int = 8, nx: int = 8) -> npt.NDArray[np.float32]:
    """HU = 10 * slice index - 900: every slice is identifiable after the window."""
    z = np.arange(nz, dtype=np.float32)[:, None, None] * 10.0 - 900.0
    return np.broadcast_to(z, (nz, ny, nx)).copy()


def source_z_mm(aff: npt.NDArray[np.float64], n: int) -> npt.NDArray[np.float64]:
    idx = np.stack([np.arange(n), np.zeros(n), np.zeros(n), np.ones(n)])
    return np.asarray((aff @ idx)[2])


# --- values ---------------------------------------------------------------------------------


def test_hu_window_and_identity_resampling() -> None:
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1500, 1500, size=(24, 8, 8)).astype(np.float32)
    out = to_model_space(hu, CFG.spacing_mm, config=CFG)
    want = (np.clip(hu, -1000, 1000) + 1000) / 2000
    np.testing.assert_allclose(out.image[0].numpy(), want, atol=1e-6)
    assert out.image.dtype == torch.float32 and out.image.shape == (1, 24, 8, 8)
    assert out.space.depth_valid.all()
    assert out.depth_valid.dtype == torch.bool and out.depth_valid.shape == (6,)


def test_linear_ramp_survives_non_unit_resampling() -> None:
    # 2.5 mm slices -> 3 mm: a linear ramp in z stays linear (away from the clamped edges).
    nz = 40
    hu = slice_coded(nz, 4, 4) * 0.5  # 5 HU per slice = 2 HU per mm
    cfg = ModelSpaceConfig(spacing_mm=(3.0, 2.5, 2.5), shape=(24, 4, 4), depth_token_mm=12.0)
    out = to_model_space(hu, (2.5, 2.5, 2.5), config=cfg)
    v = out.image[0, :, 2, 2].numpy() * 2000 - 1000
    lo, hi = out.space.valid[0]
    inner = v[lo + 1 : hi - 1]
    np.testing.assert_allclose(np.diff(inner), 3.0 * 2.0, atol=1e-3)  # 3 mm per model slice


def test_downsampling_averages_a_thin_finding() -> None:
    # A one-voxel bright line must not vanish when 1 mm pixels become 4 mm pixels.
    hu = np.full((8, 64, 64), -1000.0, dtype=np.float32)
    hu[:, 33, :] = 1000.0
    cfg = ModelSpaceConfig(spacing_mm=(3.0, 4.0, 4.0), shape=(8, 16, 16), depth_token_mm=12.0)
    out = to_model_space(hu, (3.0, 1.0, 1.0), config=cfg).image[0, 4, :, 8]
    assert out.max() > 0.1 and out.max() < 0.5  # spread over ~4 pixels, not skipped


# --- orientation ----------------------------------------------------------------------------


def test_orientation_of_standard_and_flipped_affines() -> None:
    assert orientation(axial_affine((3, 1, 1), (0, 0, 0))) == ((0, 1, 2), (False, False, False))
    assert orientation(axial_affine((3, 1, 1), (0, 0, 0), -1.0)) == (
        (0, 1, 2),
        (True, False, False),
    )
    swapped = np.zeros((4, 4))
    swapped[0, 1], swapped[1, 2], swapped[2, 0], swapped[3, 3] = -1.0, 1.0, 3.0, 1.0
    # array y runs right (-L), array x runs posterior: model y <- x, model x <- y reversed
    assert orientation(swapped) == ((0, 2, 1), (False, False, True))


def test_z_descending_volume_is_flipped_to_superior_up() -> None:
    nz, sp = 24, (3.0, 2.0, 2.0)
    hu = slice_coded(nz)
    down = axial_affine(sp, (0.0, 0.0, 100.0), -1.0)  # slice 0 is the most superior
    out = to_model_space(hu, sp, down, config=CFG)
    up = axial_affine(sp, (0.0, 0.0, 100.0 - (nz - 1) * 3.0))
    ref = to_model_space(hu[::-1].copy(), sp, up, config=CFG)
    assert torch.equal(out.image, ref.image)
    np.testing.assert_allclose(out.space.depth_z_mm(), ref.space.depth_z_mm())
    z = out.space.depth_z_mm()
    assert np.all(np.diff(z) > 0)  # token order = inferior -> superior


def test_in_plane_permutation() -> None:
    rng = np.random.default_rng(1)
    hu = rng.uniform(-900, 900, size=(24, 8, 8)).astype(np.float32)
    a = np.zeros((4, 4))
    a[2, 0], a[0, 1], a[1, 2], a[3, 3] = 3.0, 2.0, 2.0, 1.0  # array y -> +L, array x -> +P
    out = to_model_space(hu, (3.0, 2.0, 2.0), a, config=CFG)
    want = (hu.transpose(0, 2, 1) + 1000) / 2000
    np.testing.assert_allclose(out.image[0].numpy(), want, atol=1e-6)


def test_spacing_must_agree_with_affine() -> None:
    hu = slice_coded(24)
    nifti_order = axial_affine((2.0, 2.0, 3.0), (0, 0, 0))  # columns in the wrong order
    with pytest.raises(ValueError, match="disagree"):
        to_model_space(hu, (3.0, 2.0, 2.0), nifti_order, config=CFG)
    with pytest.raises(ValueError):
        to_model_space(hu[0], (3.0, 2.0, 2.0), config=CFG)
    with pytest.raises(ValueError):
        to_model_space(hu, (0.0, 2.0, 2.0), config=CFG)


# --- crop / pad and the depth geometry ------------------------------------------------------


@pytest.mark.parametrize(
    ("nz", "z_spacing", "z_sign"),
    [
        (60, 3.0, 1.0),  # crop, same spacing
        (10, 3.0, -1.0),  # pad, flipped
        (57, 2.5, 1.0),  # crop, non-unit ratio
        (13, 2.5, -1.0),  # pad, non-unit ratio, flipped
        (7, 5.0, 1.0),  # thick slices, pad
    ],
)
def test_nearest_source_slice_under_crop_and_pad(nz: int, z_spacing: float, z_sign: float) -> None:
    sp = (z_spacing, 2.0, 2.0)
    aff = axial_affine(sp, (-7.0, 3.0, -41.3), z_sign)
    out = to_model_space(slice_coded(nz), sp, aff, config=CFG)
    space = out.space
    src_z = source_z_mm(aff, nz)
    lo, hi = space.valid[0]
    assert 0 <= lo < hi <= CFG.shape[0]
    for kz in range(lo, hi):
        z = space.model_z_to_z_mm(kz)
        brute = int(np.argmin(np.abs(src_z - z)))
        got = space.model_z_to_source_slice(kz)
        assert abs(src_z[got] - z) <= abs(src_z[brute] - z) + 1e-6
        if z_spacing == CFG.spacing_mm[0]:  # no z resampling: the model slice is that slice
            assert got == brute
            assert out.image[0, kz, 3, 3].item() * 2000 - 1000 == pytest.approx(10 * got - 900)
    # padding is air (0) and the valid range is exactly where the source lies
    if lo > 0:
        assert out.image[0, :lo].abs().max() == 0
    if hi < CFG.shape[0]:
        assert out.image[0, hi:].abs().max() == 0
    # valid model slices lie inside the source's physical extent, padded ones outside it
    s_in, s_out = z_spacing, CFG.spacing_mm[0]
    first, last = src_z.min() - s_in / 2, src_z.max() + s_in / 2
    for kz in range(CFG.shape[0]):
        z = space.model_z_to_z_mm(kz)
        if lo <= kz < hi:
            assert first - s_out / 2 - 1e-6 <= z <= last + s_out / 2 + 1e-6
        else:
            assert z < first + 0.75 * s_out or z > last - 0.75 * s_out
    for tok in range(space.n_depth_tokens):
        z = space.token_to_z_mm(tok)
        got = space.token_to_source_slice(tok)
        assert abs(src_z[got] - z) <= np.abs(src_z - z).min() + 1e-6
    # every source slice that survived the crop maps back into its token
    for i in range(nz):
        back = space.source_slice_to_token(i)
        if back is not None:
            assert abs(space.token_to_z_mm(back) - src_z[i]) <= 6.0 + 1e-6


@pytest.mark.parametrize("z_sign", [1.0, -1.0])
def test_z_to_depth_to_z_round_trip(z_sign: float) -> None:
    sp = (2.5, 2.0, 2.0)
    aff = axial_affine(sp, (0.0, 0.0, 812.5), z_sign)
    space = to_model_space(slice_coded(70), sp, aff, config=CFG).space
    z_lo = space.model_z_to_z_mm(-0.5)
    z_hi = space.model_z_to_z_mm(CFG.shape[0] - 0.5)
    for z in np.linspace(z_lo + 1e-3, z_hi - 1e-3, 97):
        tok = space.depth_token_at(float(z))
        assert tok is not None
        assert abs(space.token_to_z_mm(tok) - z) <= CFG.depth_token_mm / 2 + 1e-6
        assert round(space.z_mm_to_token(float(z))) == tok
        assert space.model_z_to_z_mm(space.z_mm_to_model_z(float(z))) == pytest.approx(z)
    assert space.depth_token_at(z_hi + 10) is None and space.depth_token_at(z_lo - 10) is None


def test_padded_tokens_are_invalid_and_unmapped() -> None:
    sp = (3.0, 2.0, 2.0)
    space = to_model_space(slice_coded(6), sp, config=CFG).space  # 18 mm in a 72 mm field
    assert space.valid[0] == (9, 15)
    assert space.depth_valid.tolist() == [False, False, True, True, False, False]
    assert space.depth_token_at(space.model_z_to_z_mm(2.0)) is None  # padding
    assert space.depth_token_at(space.model_z_to_z_mm(10.0)) == 2
    assert space.source_slice_to_token(0) == 2 and space.source_slice_to_token(5) == 3


def test_shift_and_flip_are_recorded() -> None:
    sp = (3.0, 2.0, 2.0)
    hu = slice_coded(40)
    base = to_model_space(hu, sp, config=CFG)
    moved = to_model_space(hu, sp, config=CFG, shift=(3, 0, 0))
    assert torch.equal(moved.image[0, :-3], base.image[0, 3:])
    assert moved.space.token_to_z_mm(0) == pytest.approx(base.space.token_to_z_mm(0) + 9.0)
    flipped = to_model_space(hu, sp, config=CFG, flip=(True, False, True))
    assert torch.equal(flipped.image, base.image.flip(1).flip(3))
    n = base.space.n_depth_tokens
    for tok in range(n):
        assert flipped.space.token_to_source_slice(tok) == base.space.token_to_source_slice(
            n - 1 - tok
        )
        assert flipped.space.token_to_z_mm(tok) == pytest.approx(
            base.space.token_to_z_mm(n - 1 - tok)
        )


def test_model_space_dict_round_trip_and_affine() -> None:
    sp = (2.5, 2.0, 2.0)
    aff = axial_affine(sp, (1.0, 2.0, -30.0), -1.0)
    space = to_model_space(slice_coded(30), sp, aff, config=CFG).space
    again = ModelSpace.from_dict(space.to_dict())
    assert again == space
    # the model affine maps a model voxel to the same LPS point as the source affine
    k = np.array([5.0, 2.0, 3.0, 1.0])
    src = space.model_to_source @ k
    np.testing.assert_allclose(space.affine @ k, aff @ src)
    assert space.affine[2, 0] == pytest.approx(3.0)  # model z: +3 mm superior per slice


def test_same_spacing_gather_path_equals_interpolation() -> None:
    """Data on the model grid with an integer shift take the gather path; it must give what
    linear interpolation gives (weights 1 and 0), edges replicated."""
    from engines.preprocess import _interp_axis

    vol = torch.rand(7, 5, 4)
    pos = torch.arange(-2, 9, dtype=torch.float64)
    fast = _interp_axis(vol, 0, pos, 1.0)
    slow = _interp_axis(vol, 0, pos + 1e-3, 1.0 + 1e-6)  # off-grid: the general path
    assert fast.shape == (11, 5, 4)
    assert torch.allclose(fast, slow, atol=2e-3)
    assert torch.equal(fast[0], vol[0]) and torch.equal(fast[-1], vol[-1])
