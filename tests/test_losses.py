"""Every loss against numbers worked out by hand on 2-d unit vectors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engines.losses import (
    RadFinderLoss,
    clip_loss,
    gather_negatives,
    gaussian_depth_target,
    localization_error_mm,
    localization_loss,
    localization_predict,
    masked_bce,
    positive_weights,
    prompt_loss,
    sample_prompt_pairs,
    siglip_loss,
)
from engines.model.radfinder import PromptEmbeddings, RadFinderOutput
from engines.presets import LossConfig


def logsig(v: float) -> float:
    return -math.log1p(math.exp(-v))


def t(x: object) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


X = t([[1.0, 0.0], [0.0, 1.0]])
Y = t([[1.0, 0.0], [0.6, 0.8]])


# --- SigLIP ---------------------------------------------------------------------------------


def test_siglip_unit_scale_no_bias() -> None:
    # logits = cos: [[1, 0.6], [0, 0.8]]; z = +1 on the diagonal.
    want = -(logsig(1.0) + logsig(-0.6) + logsig(-0.0) + logsig(0.8)) / 2
    got = siglip_loss(X, Y, t(0.0), t(0.0))
    assert got.item() == pytest.approx(want, abs=1e-12)


def test_siglip_paper_init_and_normalisation() -> None:
    # t' = log 10, b = -10: logits = 10 cos - 10 = [[0, -4], [-10, -2]].
    want = -(logsig(0.0) + logsig(4.0) + logsig(10.0) + logsig(-2.0)) / 2
    got = siglip_loss(3.0 * X, 0.5 * Y, t(math.log(10.0)), t(-10.0))  # scale must not matter
    assert got.item() == pytest.approx(want, abs=1e-12)


def test_clip_loss_hand_values() -> None:
    # logits = 10 cos = [[10, 6], [0, 8]]; image->text rows, text->image columns.
    def ce(row: list[float], k: int) -> float:
        return -(row[k] - math.log(sum(math.exp(v) for v in row)))

    i2t = (ce([10.0, 6.0], 0) + ce([0.0, 8.0], 1)) / 2
    t2i = (ce([10.0, 0.0], 0) + ce([6.0, 8.0], 1)) / 2
    got = clip_loss(2.0 * X, Y, t(math.log(10.0)))
    assert got.item() == pytest.approx((i2t + t2i) / 2, abs=1e-12)


def test_ablation_loss_configs() -> None:
    from engines.presets import TINY
    from engines.training.loop import step_loss_config

    full = step_loss_config(TINY)
    assert full.contrastive == "siglip" and full.prompt_weight > 0 and full.localization_weight > 0
    assert step_loss_config(TINY, ablation="no-localization").localization_weight == 0
    assert step_loss_config(TINY, ablation="no-prompts").prompt_weight == 0
    assert step_loss_config(TINY, ablation="clip").contrastive == "clip"
    with pytest.raises(ValueError):
        step_loss_config(TINY, ablation="no-siglip")


def test_siglip_extra_negatives() -> None:
    n = t([[0.0, 2.0]])  # normalised to (0, 1): cos with x1 = 0, with x2 = 1, both negatives
    want = (
        -(logsig(1.0) + logsig(-0.6) + logsig(-0.0) + logsig(-0.0) + logsig(0.8) + logsig(-1.0)) / 2
    )
    assert siglip_loss(X, Y, t(0.0), t(0.0), n).item() == pytest.approx(want, abs=1e-12)
    # An empty set of negatives (single process) changes nothing.
    empty = gather_negatives(Y)
    assert empty.shape == (0, 2)
    assert siglip_loss(X, Y, t(0.0), t(0.0), empty).item() == pytest.approx(
        siglip_loss(X, Y, t(0.0), t(0.0)).item()
    )


def test_siglip_gradients_reach_scale_and_bias() -> None:
    scale = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    x = X.float().clone().requires_grad_(True)
    siglip_loss(x, Y.float(), scale, bias).backward()  # type: ignore[no-untyped-call]
    assert scale.grad is not None and scale.grad.abs() > 0
    assert bias.grad is not None and bias.grad.abs() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        siglip_loss(X, Y[:1], scale, bias)


# --- disease prompts ------------------------------------------------------------------------


def test_prompt_loss_hand_values() -> None:
    image = t([[1.0, 0.0]])
    # label 0: cos_pos 1, cos_neg 0; label 1: cos_pos 0.6, cos_neg 0.8.
    pairs = t([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [0.8, 0.6]]])  # [L, 2, P]
    labels = torch.tensor([[1, 0]])
    scale, bias = t(math.log(2.0)), t(-10.0)  # e^t' = 2; b cancels in the difference
    d0, d1 = 2.0 * (1.0 - 0.0), 2.0 * (0.6 - 0.8)
    want = (-3.0 * logsig(d0) - logsig(-d1)) / 2  # pos_weight 3 scales the positive term only
    got = prompt_loss(image, pairs, labels, scale, bias, t([3.0, 5.0]))
    assert got.item() == pytest.approx(want, abs=1e-12)
    # Per-sample pairs [B, L, 2, P] give the same.
    got_b = prompt_loss(image, pairs[None], labels, scale, bias, t([3.0, 5.0]))
    assert got_b.item() == pytest.approx(want, abs=1e-12)
    # Without pos_weight both terms count once.
    plain = prompt_loss(image, pairs, labels, scale, bias)
    assert plain.item() == pytest.approx((-logsig(d0) - logsig(-d1)) / 2, abs=1e-12)


def test_prompt_loss_masks_unknown_labels() -> None:
    image = t([[1.0, 0.0]])
    pairs = t([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [0.8, 0.6]]])
    got = prompt_loss(image, pairs, torch.tensor([[1, -1]]), t(math.log(2.0)), t(0.0), t([3, 5]))
    assert got.item() == pytest.approx(-3.0 * logsig(2.0), abs=1e-12)
    x = image.clone().requires_grad_(True)
    none = prompt_loss(x, pairs, torch.tensor([[-1, -1]]), t(0.0), t(0.0))
    assert none.item() == 0.0
    none.backward()  # type: ignore[no-untyped-call]
    assert x.grad is not None
    with pytest.raises(ValueError):
        prompt_loss(image, pairs, torch.tensor([[1, 0, 1]]), t(0.0), t(0.0))


def test_positive_weights() -> None:
    labels = np.array([[1, 0, -1], [0, 0, -1], [0, 1, -1], [0, -1, -1]])
    assert positive_weights(labels).tolist() == [3.0, 2.0, 1.0]
    many = np.array([[1]] + [[0]] * 100)
    assert positive_weights(many).tolist() == [20.0]
    assert positive_weights(many, cap=50.0).tolist() == [50.0]


def test_sample_prompt_pairs() -> None:
    prompts = torch.arange(3 * 4 * 2 * 1, dtype=torch.float32).reshape(3, 4, 2, 1)
    g = torch.Generator().manual_seed(0)
    pairs = sample_prompt_pairs(prompts, 5, g)
    assert pairs.shape == (5, 3, 2, 1)
    for b in range(5):
        for lb in range(3):
            # each choice is one whole (positive, negative) template pair of that label
            assert any(torch.equal(pairs[b, lb], prompts[lb, v]) for v in range(4))
    again = sample_prompt_pairs(prompts, 5, torch.Generator().manual_seed(0))
    assert torch.equal(pairs, again)


# --- localization ---------------------------------------------------------------------------


def test_gaussian_target_hand_values() -> None:
    valid = torch.ones(1, 5, dtype=torch.bool)
    w = [math.exp(-2.0), math.exp(-0.5), 1.0, math.exp(-0.5), math.exp(-2.0)]
    got = gaussian_depth_target(torch.tensor([2]), valid, sigma=1.0)
    assert got[0].tolist() == pytest.approx([v / sum(w) for v in w])
    # Renormalised over valid depths only.
    part = torch.tensor([[True, True, True, False, False]])
    got = gaussian_depth_target(torch.tensor([2]), part, sigma=1.0)
    assert got[0].tolist() == pytest.approx([v / sum(w[:3]) for v in w[:3]] + [0.0, 0.0])
    # sigma 0: one-hot. Truncation at round(3 sigma) = 3 positions.
    assert gaussian_depth_target(torch.tensor([1]), valid, 0.0)[0].tolist() == [0, 1, 0, 0, 0]
    far = gaussian_depth_target(torch.tensor([0]), torch.ones(1, 10, dtype=torch.bool), 1.0)
    assert far[0, 3] > 0 and far[0, 4:].abs().sum() == 0


DEPTH = t([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])  # cos with (1, 0): 1, 0, -1
SNIP = t([[1.0, 0.0]])


def test_localization_loss_hard_target() -> None:
    valid = torch.ones(1, 3, dtype=torch.bool)
    # tau 0.5: logits 2, 0, -2; target 0, no smoothing.
    want = -(2.0 - math.log(math.exp(2) + 1 + math.exp(-2)))
    got = localization_loss(DEPTH, SNIP, torch.tensor([0]), valid, tau=0.5, sigma=0.0)
    assert got.item() == pytest.approx(want, abs=1e-12)


def test_localization_loss_soft_target_and_mask() -> None:
    valid = torch.ones(1, 3, dtype=torch.bool)
    logits = [2.0, 0.0, -2.0]
    lse = math.log(sum(math.exp(v) for v in logits))
    w = [math.exp(-0.5), 1.0, math.exp(-0.5)]
    want = -sum(wi / sum(w) * (li - lse) for wi, li in zip(w, logits, strict=True))
    got = localization_loss(DEPTH, SNIP, torch.tensor([1]), valid, tau=0.5, sigma=1.0)
    assert got.item() == pytest.approx(want, abs=1e-12)
    # The third depth is padding: it leaves the softmax and the target.
    masked = torch.tensor([[True, True, False]])
    lse2 = math.log(math.exp(2.0) + 1.0)
    w2 = w[:2]
    want2 = -sum(wi / sum(w2) * (li - lse2) for wi, li in zip(w2, logits[:2], strict=True))
    got2 = localization_loss(DEPTH, SNIP, torch.tensor([1]), masked, tau=0.5, sigma=1.0)
    assert got2.item() == pytest.approx(want2, abs=1e-12)
    with pytest.raises(ValueError, match="padded"):
        localization_loss(DEPTH, SNIP, torch.tensor([2]), masked)


def test_localization_loss_paper_defaults_and_empty() -> None:
    valid = torch.ones(1, 3, dtype=torch.bool)
    logits = [10.0, 0.0, -10.0]  # tau 0.1
    lse = math.log(sum(math.exp(v) for v in logits))
    w = [math.exp(-0.125), 1.0, math.exp(-0.125)]  # sigma 2 around position 1
    want = -sum(wi / sum(w) * (li - lse) for wi, li in zip(w, logits, strict=True))
    assert localization_loss(DEPTH, SNIP, torch.tensor([1]), valid).item() == pytest.approx(want)
    d = torch.zeros(0, 3, 2, requires_grad=True)
    empty = localization_loss(
        d, torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), torch.ones(0, 3, dtype=torch.bool)
    )
    assert empty.item() == 0.0
    empty.backward()  # type: ignore[no-untyped-call]


def test_localization_predict_and_error() -> None:
    valid = torch.tensor([[True, True, True], [False, True, True]])
    depth = torch.cat([DEPTH, DEPTH])
    pred = localization_predict(depth, torch.cat([SNIP, SNIP]), valid)
    assert pred.tolist() == [0, 1]  # the best depth is padding in the second scan
    err = localization_error_mm(pred, torch.tensor([2, 1]), token_mm=12.0)
    assert err.tolist() == [24.0, 0.0]


# --- weighted sum ---------------------------------------------------------------------------


def test_radfinder_loss_weights_components() -> None:
    torch.manual_seed(0)
    b, d, p, n_l, n_v = 2, 4, 3, 2, 3
    report, snippets = torch.randn(b, p), torch.randn(3, p)
    classify = torch.randn(n_l, n_v, 2, p)
    out = RadFinderOutput(
        image_embedding=torch.randn(b, p),
        image_embedding_local=torch.randn(b, p),
        depth_embeddings=torch.randn(b, d, p),
        depth_valid=torch.tensor([[True] * 4, [True, True, True, False]]),
        logit_scale=torch.tensor(math.log(10.0)),
        logit_bias=torch.tensor(-10.0),
        report_embedding=report,
        snippet_embedding=snippets,
        prompts=PromptEmbeddings(classify, torch.randn(n_l, n_v, p)),
    )
    cfg = LossConfig(siglip_weight=1.0, prompt_weight=0.5, localization_weight=0.004)
    labels = torch.tensor([[1, -1], [0, 1]])
    idx, tgt = torch.tensor([0, 1, 1]), torch.tensor([3, 0, 2])
    pw = torch.tensor([2.0, 1.0])
    parts = RadFinderLoss(cfg, pw)(
        out,
        labels=labels,
        snippet_batch_index=idx,
        snippet_target=tgt,
        generator=torch.Generator().manual_seed(1),
    )
    pairs = sample_prompt_pairs(classify, b, torch.Generator().manual_seed(1))
    scale, bias = out.logit_scale, out.logit_bias
    s = siglip_loss(out.image_embedding, report, scale, bias)
    pr = prompt_loss(out.image_embedding_local, pairs, labels, scale, bias, pw)
    loc = localization_loss(out.depth_embeddings[idx], snippets, tgt, out.depth_valid[idx])
    assert parts["siglip"].item() == pytest.approx(s.item())
    assert parts["prompt"].item() == pytest.approx(pr.item())
    assert parts["localization"].item() == pytest.approx(loc.item())
    assert parts["loss"].item() == pytest.approx(s.item() + 0.5 * pr.item() + 0.004 * loc.item())


@pytest.mark.parametrize("text_grad", [True, False])
def test_prompt_text_grad_decides_whether_the_prompt_loss_moves_the_prompts(
    text_grad: bool,
) -> None:
    torch.manual_seed(0)
    classify = torch.randn(2, 3, 2, 4, requires_grad=True)
    image = torch.randn(3, 4, requires_grad=True)
    out = RadFinderOutput(
        image_embedding=torch.randn(3, 4),
        image_embedding_local=image,
        depth_embeddings=torch.randn(3, 5, 4),
        depth_valid=torch.ones(3, 5, dtype=torch.bool),
        logit_scale=torch.tensor(math.log(10.0), requires_grad=True),
        logit_bias=torch.tensor(-10.0),
        prompts=PromptEmbeddings(classify, torch.randn(2, 3, 4)),
    )
    cfg = LossConfig(siglip_weight=0.0, prompt_weight=1.0, prompt_text_grad=text_grad)
    labels = torch.tensor([[1, 0], [0, 1], [1, 1]])
    parts = RadFinderLoss(cfg)(out, labels=labels, generator=torch.Generator().manual_seed(2))
    pairs = sample_prompt_pairs(classify, 3, torch.Generator().manual_seed(2))
    want = prompt_loss(image, pairs, labels, out.logit_scale, out.logit_bias)
    assert parts["prompt"].item() == pytest.approx(want.item())  # the same value either way
    parts["loss"].backward()  # type: ignore[no-untyped-call]
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert out.logit_scale.grad is not None and out.logit_scale.grad.abs() > 0
    moved = classify.grad is not None and bool(classify.grad.abs().sum() > 0)
    assert moved is text_grad


def test_label_head_loss_is_masked_weighted_bce_and_joins_the_total() -> None:
    logits = t([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    labels = torch.tensor([[1, 0, -1], [0, -1, 1]])
    pw = t([4.0, 1.0, 2.0])
    # known: (0,0) y=1 w=4; (0,1) y=0; (1,0) y=0; (1,2) y=1 w=2
    want = (-4 * logsig(2.0) - logsig(1.0) - logsig(0.0) - 2 * logsig(-2.0)) / 4
    assert masked_bce(logits, labels, pw).item() == pytest.approx(want, abs=1e-12)
    assert masked_bce(logits, torch.full((2, 3), -1)).item() == 0.0
    with pytest.raises(ValueError):
        masked_bce(logits, labels[:, :2])

    out = RadFinderOutput(
        image_embedding=torch.randn(2, 4),
        image_embedding_local=torch.randn(2, 4),
        depth_embeddings=torch.randn(2, 3, 4),
        depth_valid=torch.ones(2, 3, dtype=torch.bool),
        logit_scale=torch.tensor(0.0),
        logit_bias=torch.tensor(0.0),
        label_logits=logits,
    )
    off = RadFinderLoss(LossConfig(), pw)(out, labels=labels)
    assert "labels" not in off  # weight 0: the paper's losses only
    on = RadFinderLoss(LossConfig(label_head_weight=0.5), pw)(out, labels=labels)
    assert on["labels"].item() == pytest.approx(want, abs=1e-12)
    assert on["loss"].item() == pytest.approx(0.5 * want, abs=1e-12)
