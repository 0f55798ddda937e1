"""The RadFinder model: shapes, gradients, prompt scoring, text tower, ONNX parity, citations."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engines.data.labels import LABELS
from engines.data.reports import REPORT_LABELS, write_report
from engines.losses import RadFinderLoss
from engines.model import (
    PROMPT_TEMPLATES,
    PromptEmbeddings,
    RadFinder,
    TextFeatureCache,
    TextTower,
    VisionGraph,
    build_model,
    default_text_model_path,
    disease_prompts,
    export_vision_onnx,
    strip_citations,
)
from engines.model.vision import Combiner
from engines.presets import (
    TINY,
    CombinerConfig,
    HeadConfig,
    LossConfig,
    ModelConfig,
    ModelSpaceConfig,
    Preset,
    ViTBackboneConfig,
    override,
)
from model_fixtures import TINY_OPTIONS_ON
from standins import StandInFinding as _Finding

# The tiny preset's architecture on a smaller grid (8 depth tokens of 12 mm), so tests are fast.
SMALL = dataclasses.replace(
    override(
        override(TINY, "model.backbone.inplane_grid", (2, 2)),
        "model.combiner.region_readout",
        (2, 2, 2),
    ),
    space=ModelSpaceConfig(spacing_mm=(4.0, 2.5, 2.5), shape=(24, 64, 64)),
)
TEXT_DIM = 24


def small_model(preset: Preset = SMALL, seed: int = 0) -> RadFinder:
    torch.manual_seed(seed)
    return RadFinder(preset.model, preset.space, text_dim=TEXT_DIM)


def volume(b: int, space: ModelSpaceConfig = SMALL.space, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((b, 1, *space.shape), generator=g)


def random_prompts(n_labels: int, n_templates: int, dim: int, seed: int = 0) -> PromptEmbeddings:
    g = torch.Generator().manual_seed(seed)
    c = F.normalize(torch.randn(n_labels, n_templates, 2, dim, generator=g), dim=-1)
    loc = F.normalize(torch.randn(n_labels, n_templates, dim, generator=g), dim=-1)
    return PromptEmbeddings(c, loc)


def assert_every_trainable_param_has_grad(model: torch.nn.Module) -> None:
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or p.grad.abs().sum().item() == 0)
    ]
    assert not missing, f"no gradient reached: {missing}"


def training_step(
    model: RadFinder,
    report: torch.Tensor,
    snip: torch.Tensor,
    prompts: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    valid = torch.ones(2, model.n_depth_tokens, dtype=torch.bool)
    valid[1, -2:] = False  # the second scan's top tokens are padding
    out = model(
        volume(2, model.space),
        valid,
        report_features=report,
        snippet_features=snip,
        prompt_features=prompts,
    )
    n_labels = prompts[0].shape[0]
    labels = torch.tensor([[1, 0] * (n_labels // 2), [0, -1] * (n_labels // 2)])
    loss: torch.Tensor = RadFinderLoss(LossConfig(prompt_weight=1.0, localization_weight=1.0))(
        out,
        labels=labels,
        snippet_batch_index=torch.tensor([0, 1, 1]),
        snippet_target=torch.tensor([2, 0, model.n_depth_tokens - 3]),
    )["loss"]
    loss.backward()  # type: ignore[no-untyped-call]
    return loss


# --- shapes and gradients -------------------------------------------------------------------


def test_forward_shapes_and_initial_scale() -> None:
    model = small_model()
    out = model(volume(2))
    d, p = SMALL.space.n_depth_tokens, SMALL.model.head.output_dim
    assert out.image_embedding.shape == (2, p)
    assert out.image_embedding_local.shape == (2, p)
    assert out.depth_embeddings.shape == (2, d, p)
    assert out.depth_valid.shape == (2, d) and bool(out.depth_valid.all())
    assert model.logit_scale.item() == pytest.approx(np.log(10.0))
    assert model.logit_bias.item() == -10.0
    # the copies start as the heads they copy
    for a, b in zip(
        model.image_head.parameters(), model.image_head_local.parameters(), strict=True
    ):
        assert torch.equal(a, b)
    with pytest.raises(ValueError):
        model(torch.zeros(1, 1, 8, 8, 8))


def test_text_standardisation_is_fixed_from_the_corpus_and_used_for_every_text() -> None:
    model = small_model()
    h = model.text_dim
    feats = torch.randn(50, h) * 3 + 5
    raw = model.encode_reports(feats[:4]).detach()
    model.set_text_normalization(feats)
    assert torch.allclose(model.get_buffer("text_mean"), feats.mean(0))
    z = model.normalize_text(feats)
    assert torch.allclose(z.mean(0), torch.zeros(h), atol=1e-5)
    assert torch.allclose(z.std(0), torch.ones(h), atol=1e-4)
    assert not torch.allclose(model.encode_reports(feats[:4]), raw)
    # prompts go through the same standardisation as reports
    pos, neg = feats[:6].reshape(3, 2, h), feats[6:12].reshape(3, 2, h)
    pe = model.encode_prompts(pos, neg)
    want = F.normalize(model.text_head(model.normalize_text(pos)), dim=-1)
    assert torch.allclose(pe.classify[:, :, 0], want, atol=1e-6)
    # the statistics are saved with the weights
    assert "text_mean" in model.state_dict() and "text_std" in model.state_dict()


def test_gradient_reaches_every_parameter_of_the_tiny_model() -> None:
    model = small_model()
    g = torch.Generator().manual_seed(1)
    report, snip = torch.randn(2, TEXT_DIM, generator=g), torch.randn(3, TEXT_DIM, generator=g)
    pos, neg = torch.randn(2, 3, TEXT_DIM, generator=g), torch.randn(2, 3, TEXT_DIM, generator=g)
    loss = training_step(model, report, snip, (pos, neg))
    assert torch.isfinite(loss)
    assert_every_trainable_param_has_grad(model)


def test_padding_depths_are_masked_out_of_the_combiner() -> None:
    """Features at padded depths must not reach CLS tokens or valid depths through attention
    (the CNN's own receptive field may still cross a token border, as in the paper's windows)."""
    model = small_model().eval()
    comb = model.vision.combiner
    d, gy, gx = comb.grid
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(1, d, gy, gx, model.vision.backbone.out_dim, generator=g)
    valid = torch.ones(1, d, dtype=torch.bool)
    valid[0, :2] = False
    changed = feats.clone()
    changed[:, :2] = torch.randn(changed[:, :2].shape, generator=g) * 10
    with torch.no_grad():
        a, b = comb(feats, valid), comb(changed, valid)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    torch.testing.assert_close(a[2][:, 2:], b[2][:, 2:])
    pred = model.predict(volume(1), valid, random_prompts(3, 2, model.embed_dim))
    assert pred.depth_distribution[..., :2].abs().max() == 0
    torch.testing.assert_close(pred.depth_distribution.sum(-1), torch.ones(1, 3))


def test_vit_backbone_variant() -> None:
    space = ModelSpaceConfig(spacing_mm=(2.0, 1.0, 1.0), shape=(16, 32, 32), depth_token_mm=4.0)
    vit = ViTBackboneConfig(window=(8, 16, 16), patch=(2, 8, 8), embed_dim=16, depth=1, num_heads=2)
    cfg = ModelConfig(
        backbone=vit,
        combiner=CombinerConfig(embed_dim=16, depth=1, num_heads=2),
        head=HeadConfig(hidden_dim=32, bottleneck_dim=8, output_dim=16),
        text=TINY.model.text,
    )
    Preset(name="micro-vit", space=space, model=cfg)  # a valid preset
    torch.manual_seed(0)
    model = RadFinder(cfg, space, text_dim=TEXT_DIM)
    out = model(volume(2, space))
    assert out.depth_embeddings.shape == (2, 8, 16)  # 2 windows x 4 patches along z
    g = torch.Generator().manual_seed(2)
    report, snip = torch.randn(2, TEXT_DIM, generator=g), torch.randn(3, TEXT_DIM, generator=g)
    pos, neg = torch.randn(2, 2, TEXT_DIM, generator=g), torch.randn(2, 2, TEXT_DIM, generator=g)
    training_step(model, report, snip, (pos, neg))
    assert_every_trainable_param_has_grad(model)


def with_windows(preset: Preset, windows: tuple[tuple[float, float], ...]) -> Preset:
    """``preset`` with other HU windows and no cell extremes (whose indices name windows)."""
    bb = dataclasses.replace(
        preset.model.backbone, input_windows=windows, stem_max_windows=(), stem_min_windows=()
    )
    return dataclasses.replace(preset, model=dataclasses.replace(preset.model, backbone=bb))


def test_input_windows_are_the_model_space_value_rewindowed_in_hu() -> None:
    from engines.model.vision import CNNBackbone

    windows = ((-1000.0, -400.0), (-160.0, 240.0), (100.0, 1000.0))
    preset = with_windows(SMALL, windows)
    assert preset.model.backbone.input_windows == windows
    bb = CNNBackbone(preset.model.backbone, preset.space)
    hu = torch.tensor([-1024.0, -950.0, -850.0, -600.0, -100.0, 0.0, 40.0, 300.0, 900.0, 3000.0])
    lo, hi = preset.space.hu_window
    x = ((hu.clamp(lo, hi) - lo) / (hi - lo)).view(1, 1, -1, 1, 1)
    got = (x * bb.win_scale + bb.win_shift).clamp(0, 1)[0, :, :, 0, 0]
    torch.testing.assert_close(got[0], x.flatten())  # the model-space channel itself
    for k, (wlo, whi) in enumerate(windows, start=1):
        want = ((hu.clamp(lo, hi) - wlo) / (whi - wlo)).clamp(0, 1)
        torch.testing.assert_close(got[k], want, atol=1e-6, rtol=0)
    assert bb.stages[0][0].in_channels == 4
    # emphysema vs normal lung: 0.05 apart in model space, 0.17 in the lung window
    assert got[1, 2] - got[1, 1] > 3 * (got[0, 2] - got[0, 1])


def test_stem_max_and_min_windows_add_each_cells_extremes_of_those_windows() -> None:
    """A speck that fills one voxel of a cell barely moves the cell mean of its window; the
    cell maximum (a calcium speck) or minimum (an emphysematous hole) shows it in full, in the
    cell that holds it and no other."""
    from engines.model.stem import HistogramStem
    from engines.model.vision import CNNBackbone

    windows = ((-1000.0, -400.0), (200.0, 600.0))
    preset = with_windows(SMALL, windows)
    preset = override(preset, "model.backbone.stem_max_windows", [1])
    preset = override(preset, "model.backbone.stem_min_windows", [0])
    from_cfg = HistogramStem.from_config(preset.model.backbone, preset.space)
    assert from_cfg.max_channels == (2,) and from_cfg.min_channels == (1,)
    assert from_cfg.channels == preset.model.backbone.stem_channels == 5
    stem = dataclasses.replace(from_cfg, pool=(2, 2, 2))
    lo, hi = preset.space.hu_window
    hu = torch.full((1, 1, 4, 4, 4), -850.0)  # lung
    hu[0, 0, 3, 0, 1] = 1000.0  # one calcium voxel in cell (1, 0, 0)
    hu[0, 0, 0, 3, 3] = -1000.0  # one hole in cell (0, 1, 1)
    x = (hu - lo) / (hi - lo)
    out = stem.apply(x)
    assert out.shape == (1, 5, 2, 2, 2)
    torch.testing.assert_close(out[0, 2, 1, 0, 0], torch.tensor(1 / 8))  # the mean: diluted
    assert out[0, 3, 1, 0, 0] == 1.0 and out[0, 3].sum() == 1.0  # the maximum: that cell only
    lung = (-850.0 - -1000.0) / 600.0
    torch.testing.assert_close(out[0, 1, 0, 1, 1], torch.tensor(lung * 7 / 8))
    assert out[0, 4, 0, 1, 1] == 0.0  # the minimum: the hole's cell is at 0
    assert torch.all(out[0, 4].flatten().sort().values[1:] > lung - 1e-6)  # the rest: lung
    plain = HistogramStem(stem.scale, stem.shift, (2, 2, 2))
    torch.testing.assert_close(out[:, :3], plain.apply(x))
    with pytest.raises(ValueError, match="max channels"):
        HistogramStem(stem.scale, stem.shift, (2, 2, 2), (3,))
    with pytest.raises(ValueError, match="min channels"):
        HistogramStem(stem.scale, stem.shift, (2, 2, 2), (), (-1,))
    for k in (-1, 2):  # -1 would silently be the model-space channel
        with pytest.raises(ValueError, match="stem_min_windows"):
            override(preset, "model.backbone.stem_min_windows", [k])
    assert CNNBackbone(preset.model.backbone, preset.space).stages[0][0].in_channels == 5


def test_skip_extremes_pool_the_cell_maxima_by_max_and_minima_by_min() -> None:
    """A wire that sets one stem cell's maximum keeps it in its token's skip feature, where
    the mean over the token's cells would dilute it again."""
    from engines.model.vision import CNNBackbone

    preset = with_windows(SMALL, ((-1000.0, -400.0), (200.0, 600.0)))
    preset = override(preset, "model.backbone.stem_max_windows", [1])
    preset = override(preset, "model.backbone.stem_min_windows", [0])
    plain = CNNBackbone(preset.model.backbone, preset.space)
    extremes = CNNBackbone(
        override(preset, "model.backbone.stem_skip_extremes", True).model.backbone, preset.space
    )
    assert plain.skip_pool == extremes.skip_pool == (1, 8, 8)
    g = torch.Generator().manual_seed(0)
    stem = torch.rand((1, *plain.stem_shape), generator=g)  # [5, 8, 16, 16]
    stem[0, 3] = 0.1
    stem[0, 3, 2, 5, 9] = 1.0  # one cell's maximum: token (2, 0, 1)
    stem[0, 4] = 0.9
    stem[0, 4, 6, 12, 3] = 0.0  # one cell's minimum: token (6, 1, 0)
    a, b = plain._pool_skip(stem), extremes._pool_skip(stem)
    assert a.shape == b.shape == (1, 5, 8, 2, 2)
    torch.testing.assert_close(a[:, :3], b[:, :3])  # the means stay means
    torch.testing.assert_close(a[0, 3, 2, 0, 1], torch.tensor(0.1 + 0.9 / 64))
    assert b[0, 3, 2, 0, 1] == 1.0 and (b[0, 3] == 0.1).sum() == 8 * 4 - 1
    assert b[0, 4, 6, 1, 0] == 0.0 and (b[0, 4] == 0.9).sum() == 8 * 4 - 1
    # and the backbone runs on both the volume and its stem with them
    vol = volume(2, preset.space)
    torch.testing.assert_close(
        extremes.eval()(vol), extremes(extremes.stem.apply(vol)), rtol=1e-5, atol=1e-6
    )


PLAIN_COMBINER = CombinerConfig(embed_dim=8, depth=1, num_heads=2)


def combiner_pair(grid: tuple[int, int, int], **options: Any) -> tuple[Combiner, Combiner]:
    """A small plain combiner and one with ``options``, from the same initial weights."""
    torch.manual_seed(0)
    plain = Combiner(PLAIN_COMBINER, 4, grid)
    torch.manual_seed(0)
    return plain, Combiner(dataclasses.replace(PLAIN_COMBINER, **options), 4, grid)


def test_region_readout_starts_as_the_plain_combiner_and_learns_from_step_one() -> None:
    grid = (4, 2, 2)
    plain, rr = combiner_pair(grid, region_readout=(2, 1, 1))
    assert rr.readout is not None and rr.readout.in_features == 2 * 8
    feats = torch.randn(3, *grid, 4)
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[2, 3] = False
    for a, b in zip(plain(feats, valid), rr(feats, valid), strict=True):
        torch.testing.assert_close(a, b)  # zero-initialised: the paper's combiner at step 0
    cls, local, _ = rr(feats, valid)
    (cls.sum() + local.sum()).backward()  # type: ignore[no-untyped-call]
    assert rr.readout.weight.grad is not None and rr.readout.weight.grad.abs().sum() > 0
    # a padding depth contributes nothing to its region
    with torch.no_grad():
        rr.readout.weight.normal_()
        changed = feats.clone()
        changed[2, 3] += 10.0
        x1, x2 = rr(feats, valid)[0], rr(changed, valid)[0]
    torch.testing.assert_close(x1[2], x2[2])
    with pytest.raises(ValueError, match="region_readout"):
        Combiner(dataclasses.replace(PLAIN_COMBINER, region_readout=(3, 1, 1)), 4, grid)


def test_head_skip_starts_as_the_paper_head_and_adds_a_linear_path() -> None:
    from engines.model.radfinder import ProjectionHead

    cfg = HeadConfig(hidden_dim=16, bottleneck_dim=4, output_dim=8, init="fan_in")
    torch.manual_seed(0)
    plain = ProjectionHead(6, cfg)
    torch.manual_seed(0)
    skip = ProjectionHead(6, dataclasses.replace(cfg, skip=True))
    x = torch.randn(5, 6)
    torch.testing.assert_close(plain(x), skip(x))  # zero-initialised: the paper's head
    assert skip.skip is not None and skip.skip.weight.shape == (8, 6)
    skip(x).square().sum().backward()  # type: ignore[no-untyped-call]
    assert skip.skip.weight.grad is not None and skip.skip.weight.grad.abs().sum() > 0
    with torch.no_grad():
        skip.skip.weight.normal_()
    torch.testing.assert_close(skip(x), plain(x) + x @ skip.skip.weight.T)
    # the model's heads all take it (image, local image, text, local text)
    model = small_model(override(SMALL, "model.head.skip", True))
    for head in (model.image_head, model.image_head_local, model.text_head, model.text_head_local):
        assert head.skip is not None


def test_embeddings_without_the_depth_mean_read_only_the_cls_tokens() -> None:
    paper = small_model(SMALL, seed=3).eval()
    cls_only = small_model(override(SMALL, "model.embedding_depth_mean", False), seed=3).eval()
    cls_only.load_state_dict(paper.state_dict())  # same weights: only the option differs
    x = volume(2, seed=4)
    valid = torch.ones(2, paper.n_depth_tokens, dtype=torch.bool)
    with torch.no_grad():
        a, b = paper.encode_image(x, valid), cls_only.encode_image(x, valid)
        cls, local_cls, _, mean_depth = paper.head_inputs(x, valid)
        zero = torch.zeros_like(mean_depth)
        want_global = paper.image_head(torch.cat([cls, zero], dim=1))
        want_local = paper.image_head_local(torch.cat([local_cls, zero], dim=1))
    assert mean_depth.abs().max() > 0.1  # the paper's embeddings do read it
    torch.testing.assert_close(b.image_embedding, want_global)
    torch.testing.assert_close(b.image_embedding_local, want_local)
    assert not torch.allclose(a.image_embedding_local, b.image_embedding_local)
    torch.testing.assert_close(a.depth_embeddings, b.depth_embeddings)  # per depth: unchanged


def test_prompt_depth_mean_without_gradient_reads_it_but_trains_only_the_cls_route() -> None:
    def grads(preset: Preset) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        model = small_model(preset, seed=5)
        assert model.feature_norm is not None
        out = model.encode_image(volume(2, seed=6))
        out.image_embedding_local.square().sum().backward()  # type: ignore[no-untyped-call]
        bn_local, bn_depth = model.feature_norm[1], model.feature_norm[2]
        return out.image_embedding_local.detach(), bn_local.weight.grad, bn_depth.weight.grad

    paper_out, paper_local, paper_depth = grads(SMALL)
    out, local, depth = grads(override(SMALL, "model.prompt_depth_mean_grad", False))
    torch.testing.assert_close(out, paper_out)  # the same embedding
    assert paper_depth is not None and paper_depth.abs().sum() > 0
    assert depth is None or depth.abs().sum() == 0  # no gradient through the depth mean
    assert local is not None and paper_local is not None
    torch.testing.assert_close(local, paper_local)  # the CLS route is untouched


@pytest.mark.parametrize("where", ["embedding", "neck", "neck_pool"])
def test_label_head_reads_the_embedding_or_the_neck_without_the_depth_means_gradient(
    where: str,
) -> None:
    torch.manual_seed(5)
    model = RadFinder(
        SMALL.model, SMALL.space, text_dim=TEXT_DIM, label_head=True, label_head_input=where
    )
    assert model.label_head is not None and model.feature_norm is not None
    x = volume(2, seed=6)
    valid = torch.ones(2, model.n_depth_tokens, dtype=torch.bool)
    out = model.encode_image(x, valid)
    logits = model.label_logits(out.label_input)
    assert logits is not None and logits.shape == (2, len(LABELS))
    with torch.no_grad():
        _, local_cls, _, mean_depth = model.head_inputs(x, valid)
        if where == "neck":
            want = model.label_head(torch.cat([local_cls, mean_depth], dim=1))
        elif where == "neck_pool":  # and the backbone's tokens, averaged by hand
            tokens = model.vision.backbone(x)
            assert tokens.ndim == 5 and tokens.shape[1] == model.n_depth_tokens
            pooled = tokens.mean(dim=(1, 2, 3))
            want = model.label_head(torch.cat([local_cls, mean_depth, pooled], dim=1))
        else:
            want = model.label_head(F.normalize(out.image_embedding_local, dim=-1))
    torch.testing.assert_close(logits, want)
    logits.square().sum().backward()  # type: ignore[no-untyped-call]
    bn_local, bn_depth = model.feature_norm[1], model.feature_norm[2]
    assert bn_local.weight.grad is not None and bn_local.weight.grad.abs().sum() > 0
    depth_grad = bn_depth.weight.grad
    if where != "embedding":  # the depth mean is read but not trained through, nor any head
        assert depth_grad is None or depth_grad.abs().sum() == 0
        assert model.image_head_local.last_weight.grad is None
        # The pooled tokens reach the backbone without the combiner; the neck alone through it.
        model.zero_grad(set_to_none=True)
        label_input = model.encode_image(x, valid).label_input
        assert label_input is not None
        tokens = label_input[:, -model.vision.backbone.out_dim :]
        tokens.sum().backward()  # type: ignore[no-untyped-call]
        stem_conv = model.vision.backbone.stages[0][0].weight.grad
        combiner = model.vision.combiner.axis_patch_proj.weight.grad
        if where == "neck_pool":
            assert stem_conv is not None and stem_conv.abs().sum() > 0
            assert combiner is None or combiner.abs().sum() == 0
    else:
        assert depth_grad is not None and depth_grad.abs().sum() > 0
    assert small_model(SMALL, seed=5).encode_image(x, valid).label_input is None  # no head


def test_input_readout_reads_the_regions_of_the_combiners_input_linearly() -> None:
    grid = (4, 2, 2)
    _, rr = combiner_pair(grid, region_readout=(2, 1, 1))
    _, ir = combiner_pair(grid, region_readout=(2, 1, 1), input_readout=True)
    assert ir.input_readout is not None and ir.input_readout.in_features == 2 * 4
    feats = torch.randn(3, *grid, 4)
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[2, 3] = False
    for a, b in zip(rr(feats, valid), ir(feats, valid), strict=True):
        torch.testing.assert_close(a, b)  # zero-initialised: the region-readout combiner
    cls, local, _ = ir(feats, valid)
    (cls.sum() + local.sum()).backward()  # type: ignore[no-untyped-call]
    grad = ir.input_readout.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # With the transformer's own outputs taken out, CLS is exactly a linear map of the two
    # regions' input means (padding depths counting as zeros): what a logistic probe reads.
    with torch.no_grad():
        ir.input_readout.weight.normal_()
        ir.input_readout.bias.zero_()
        base, _, _ = ir(torch.zeros_like(feats), valid)
        cls, _, _ = ir(feats, valid)
        masked = feats * valid[:, :, None, None, None]
        regions = masked.reshape(3, 2, 2 * 2 * 2, 4).mean(dim=2)  # [B, region, C]
        w = ir.input_readout.weight[:8]  # the CLS half, [E, C * region] (channel-major)
        want = regions.transpose(1, 2).reshape(3, -1) @ w.T
        # the readout's part is what changes with the input beyond the transformer's
        readout_part = cls - base - (rr(feats, valid)[0] - rr(torch.zeros_like(feats), valid)[0])
    torch.testing.assert_close(readout_part, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="needs region_readout"):
        Combiner(dataclasses.replace(PLAIN_COMBINER, input_readout=True), 4, grid)


def test_depth_readout_starts_as_the_mean_and_tells_where_in_the_slice() -> None:
    grid = (3, 2, 2)
    plain, dr = combiner_pair(grid, depth_readout=True)
    assert dr.depth_readout is not None and dr.depth_readout.in_features == 2 * 2 * 8
    feats = torch.randn(2, *grid, 4)
    for a, b in zip(plain(feats), dr(feats), strict=True):
        torch.testing.assert_close(a, b)  # zero-initialised: the paper's mean at step 0
    _, _, per_depth = dr(feats)
    per_depth[:, 1].sum().backward()  # type: ignore[no-untyped-call]
    grad = dr.depth_readout.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # Swapping two cells of a depth leaves the mean unchanged; the readout sees the swap.
    with torch.no_grad():
        dr.blocks = torch.nn.ModuleList()  # no attention: the tokens are the cells' own
        dr.pos_row.zero_()  # nor in-plane positions (the mean would then see a swap too)
        dr.pos_col.zero_()
        swapped = feats.clone()
        swapped[:, 1, 0, 0], swapped[:, 1, 1, 1] = feats[:, 1, 1, 1], feats[:, 1, 0, 0]
        dr.depth_readout = None
        mean_a, mean_b = dr(feats)[2], dr(swapped)[2]
    torch.testing.assert_close(mean_a, mean_b)
    with torch.no_grad():
        torch.manual_seed(1)
        dr.depth_readout = torch.nn.Linear(2 * 2 * 8, 8)
        a, b = dr(feats)[2], dr(swapped)[2]
    assert (a[:, 1] - b[:, 1]).abs().max() > 1e-3
    torch.testing.assert_close(a[:, 0], b[:, 0])
    torch.testing.assert_close(a[:, 2], b[:, 2])


def test_override_replaces_nested_fields_and_rejects_typos() -> None:
    p = override(TINY, "model.backbone.norm", "group")
    assert p.model.backbone.norm == "group"
    assert override(p, "model.backbone.norm", "batch").model.backbone.norm == "batch"
    assert p.model.combiner == TINY.model.combiner and p.loss == TINY.loss
    assert override(TINY, "optim.lr", 3e-4).optim.lr == 3e-4
    with pytest.raises(KeyError, match="nrom"):
        override(TINY, "model.backbone.nrom", "batch")


# --- prediction -----------------------------------------------------------------------------


def test_probability_is_the_softmax_over_the_prompt_pair() -> None:
    model = small_model().eval()
    prompts = random_prompts(4, 3, model.embed_dim, seed=3)
    x = volume(2)
    with torch.no_grad():
        pred = model.predict(x, None, prompts)
        img = model.encode_image(x)
    classify, locate = prompts.ensemble()
    logits = (
        torch.einsum("bp,lkp->blk", F.normalize(img.image_embedding_local, dim=-1), classify)
        * model.logit_scale.exp()
        + model.logit_bias
    )
    torch.testing.assert_close(pred.probabilities, logits.softmax(-1)[..., 0])
    sim = torch.einsum("bdp,lp->bld", F.normalize(img.depth_embeddings, dim=-1), locate) / 0.1
    torch.testing.assert_close(pred.depth_distribution, sim.softmax(-1))
    assert pred.depth_argmax.shape == (2, 4)
    torch.testing.assert_close(pred.image_embedding.norm(dim=-1), torch.ones(2))


# --- ONNX -----------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [False, True], ids=["preset", "skip-extremes+depth-readout"])
def test_onnx_export_matches_torch(tmp_path: Path, options: bool) -> None:
    import onnx
    import onnxruntime as ort  # type: ignore[import-untyped]

    preset = SMALL
    if options:  # the skip's extreme pooling needs extremes in the stem to pool
        for key, value in TINY_OPTIONS_ON:
            preset = override(preset, key, value)
    model = small_model(preset, seed=4).eval()
    if options:  # not the zeros they start at, or the readout and skips would not be tested
        readout = model.vision.combiner.depth_readout
        assert readout is not None
        skips = [model.image_head.skip, model.image_head_local.skip]
        with torch.no_grad():
            for layer in (readout, *skips):
                assert layer is not None
                layer.weight.normal_(std=0.05)
    prompts = random_prompts(len(LABELS), 2, model.embed_dim, seed=5)
    path = tmp_path / "vision.onnx"
    names = export_vision_onnx(model, path, prompts=prompts, batch_size=2)
    assert names == ["image_embedding", "depth_embeddings", "probabilities", "depth_distribution"]

    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    for value in (*proto.graph.input, *proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        assert all(d.dim_value > 0 and not d.dim_param for d in dims), value.name

    x = volume(2, seed=6)
    valid = torch.ones(2, model.n_depth_tokens, dtype=torch.bool)
    valid[1, :3] = False
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"volume": x.numpy(), "depth_valid": valid.numpy()})
    with torch.no_grad():
        want = VisionGraph(model, prompts).eval()(x, valid)
        pred = model.predict(x, valid, prompts)
    assert len(got) == len(want) == 4
    for name, g, w in zip(names, got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=0, err_msg=name)
    np.testing.assert_allclose(got[2], pred.probabilities.numpy(), atol=1e-4)
    np.testing.assert_allclose(got[3], pred.depth_distribution.numpy(), atol=1e-4)


# --- text tower -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> TextTower:
    return TextTower.from_pretrained(max_length=64, freeze=True)


def test_minilm_tower_is_frozen_mean_pooled_and_meaningful(minilm: TextTower) -> None:
    assert minilm.hidden_size == 384
    assert not any(p.requires_grad for p in minilm.parameters())
    minilm.train()
    assert not minilm.encoder.training  # frozen: dropout stays off
    feats = minilm.embed(
        ["There is a pleural effusion.", "Fluid in the pleural space.", "The invoice is overdue."]
    )
    assert feats.shape == (3, 384) and not feats.requires_grad
    f = F.normalize(feats, dim=-1)
    assert (f[0] @ f[1]) > (f[0] @ f[2]) + 0.2


def test_text_feature_cache(minilm: TextTower, tmp_path: Path) -> None:
    cache = TextFeatureCache(minilm, batch_size=2)
    texts = ["Cardiomegaly is present.", "No effusion.", "Cardiomegaly is present."]
    a = cache(texts)
    assert a.shape == (3, 384) and len(cache) == 2
    torch.testing.assert_close(a[0], a[2])
    torch.testing.assert_close(a, minilm.embed(texts), atol=1e-5, rtol=1e-5)
    cache.save(tmp_path / "c.pt")
    again = TextFeatureCache(minilm)
    again.load(tmp_path / "c.pt")
    assert len(again) == 2
    torch.testing.assert_close(again(texts), a)
    assert cache([]).shape == (0, 384)
    other = TextFeatureCache(
        TextTower(minilm.encoder, minilm.tokenizer, max_length=32, freeze=True, name=minilm.name)
    )
    with pytest.raises(ValueError, match="made by"):
        other.load(tmp_path / "c.pt")


def test_text_feature_cache_batches_texts_of_like_length(
    minilm: TextTower, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Padding is to the longest text of a batch, so short snippets must not share batches
    with long reports; the features are those of each text embedded alone."""
    report = "The heart is normal in size. " * 12
    texts = [report + "A", "No effusion.", report + "B", "Nodule.", report + "C", "Mild."]
    chunks: list[list[str]] = []
    embed = minilm.embed

    def recording(batch: Sequence[str]) -> torch.Tensor:
        chunks.append(list(batch))
        return embed(batch)

    monkeypatch.setattr(minilm, "embed", recording)
    got = TextFeatureCache(minilm, batch_size=3)(texts)
    assert [sorted(len(t) > 100 for t in c) for c in chunks] == [[False] * 3, [True] * 3]
    alone = torch.cat([embed([t]) for t in texts])
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 1-layer BERT with MiniLM's tokenizer, saved as a local HF directory."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    where = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(str(default_text_model_path()), local_files_only=True)
    tok.save_pretrained(str(where))
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(str(where))
    return where


def test_any_local_encoder_trains_end_to_end(tiny_bert: Path) -> None:
    tower = TextTower.from_pretrained(tiny_bert, max_length=32, freeze=False)
    assert tower.hidden_size == 16
    with pytest.raises(ValueError, match="stale"):
        TextFeatureCache(tower)
    torch.manual_seed(0)
    model = RadFinder(SMALL.model, SMALL.space, text_dim=16, text_tower=tower)
    labels = ["Lung nodule", "Pleural effusion"]
    pos, neg = disease_prompts(labels, PROMPT_TEMPLATES[:2])
    feats = model.text_features([t for row in pos + neg for t in row])
    p, n = feats[:4].reshape(2, 2, -1), feats[4:].reshape(2, 2, -1)
    report = model.text_features(["Findings: nodule.", "Findings: effusion."])
    snip = model.text_features(["A nodule.", "An effusion.", "Fluid."])
    training_step(model, report, snip, (p, n))
    assert_every_trainable_param_has_grad(model)  # the text encoder included
    assert any(
        n.startswith("text.encoder") and p.grad is not None for n, p in model.named_parameters()
    )


def test_build_model_and_prompt_embeddings(minilm: TextTower) -> None:
    model = build_model(SMALL, text_tower=minilm)
    assert model.text is minilm and model.text_dim == 384
    pe = model.prompt_embeddings()
    assert pe.classify.shape == (18, len(PROMPT_TEMPLATES), 2, SMALL.model.head.output_dim)
    assert pe.locate.shape == (18, len(PROMPT_TEMPLATES), SMALL.model.head.output_dim)
    torch.testing.assert_close(pe.classify.norm(dim=-1), torch.ones(18, len(PROMPT_TEMPLATES), 2))
    headless = build_model(SMALL, load_text=False)
    assert headless.text is None and headless.text_dim == 384
    with pytest.raises(RuntimeError):
        headless.text_features(["x"])


def test_disease_prompts() -> None:
    pos, neg = disease_prompts(LABELS)
    assert len(pos) == len(neg) == 18 and all(len(r) == len(PROMPT_TEMPLATES) for r in pos)
    assert pos[9][0] == "Lung nodule is present." and neg[9][0] == "Lung nodule is not present."
    assert pos[0][2] == "There is evidence of medical material."


# --- citation stripping ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (
            "A 6 mm nodule in the right upper lobe (series 2, image 45).",
            "A 6 mm nodule in the right upper lobe.",
        ),
        ("Nodule on series 2, image 45 in the lower lobe.", "Nodule in the lower lobe."),
        ("Pleural effusion (Se: 3, Im: 86/232).", "Pleural effusion."),
        ("Atelectasis at section 48.", "Atelectasis."),
        (
            "Consolidation (series 3 section 45) with air bronchograms.",
            "Consolidation with air bronchograms.",
        ),
        ("Rundherd im Unterlappen (Serie 3, Bild 45).", "Rundherd im Unterlappen."),
        ("Erguss; Serie 3, Bild 45.", "Erguss."),
        ("Bronchiectasis between images 206 and 286.", "Bronchiectasis."),
        ("Nodule (image 45 of series 3).", "Nodule."),
        ("Nodule (in image 45 in series 3).", "Nodule."),
        ("Nodule (Section No: 45/232).", "Nodule."),
        ("Herd im 3. Segment (Schicht 12).", "Herd im 3. Segment."),
        (
            "Axial sections 1.5 mm thick were obtained.",
            "Axial sections 1.5 mm thick were obtained.",
        ),
        ("No image artefacts; a 5 mm nodule.", "No image artefacts; a 5 mm nodule."),
    ],
)
def test_strip_citations_by_hand(text: str, want: str) -> None:
    assert strip_citations(text) == want


@pytest.mark.parametrize("language", ["en", "de"])
def test_strip_citations_on_generated_reports(language: str) -> None:
    """Every citation form the report generator writes strips to its truth snippet."""
    n = 0
    for seed in range(60):
        rng = random.Random(seed)
        findings = []
        for _ in range(rng.randint(1, 5)):
            i = rng.randrange(18)
            a = rng.randrange(60)
            b = min(79, a + rng.choice((0, 3, 10)))
            findings.append(
                _Finding(
                    REPORT_LABELS[i],
                    i,
                    rng.choice(("left", "right", None)),
                    rng.choice(("upper", "lower", None)),
                    rng.choice((0.0, 6.0, 14.0)),
                    (rng.randint(a, b), 5, 5),
                    (a, b),
                )
            )
        report = write_report(
            findings,
            seed=seed,
            n_slices=80,
            series_number=rng.choice((2, 301)),
            language=language,
            cite_probability=1.0,
        )
        stripped = strip_citations(report.findings)
        for c in report.citations:
            sentence = report.text[c.sentence_start : c.sentence_end]
            assert strip_citations(sentence) == " ".join(c.snippet.split())
            assert report.text[c.start : c.end] not in stripped
            n += 1
    assert n > 50
