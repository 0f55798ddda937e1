"""The per-step learning indicators (``engines.training.diagnostics``) and the time-budget fit
of the training loop: small pure functions, checked against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from engines.training.diagnostics import batch_diagnostics, rank_auc
from engines.training.loop import _fit_to_budget


def test_rank_auc_hand_values() -> None:
    label = torch.tensor([1, 1, 0, 0])
    assert rank_auc(torch.tensor([0.9, 0.8, 0.1, 0.2]), label) == 1.0
    assert rank_auc(torch.tensor([0.1, 0.2, 0.9, 0.8]), label) == 0.0
    # pos {0.5, 0.2} vs neg {0.5, 0.1}: wins 0.5 (tie) + 1 + 0 + 1 = 2.5 of 4
    assert rank_auc(torch.tensor([0.5, 0.2, 0.5, 0.1]), label) == pytest.approx(0.625)
    assert rank_auc(torch.tensor([0.5, 0.2]), torch.tensor([1, 1])) is None


def test_collapsed_and_perfect_embeddings() -> None:
    torch.manual_seed(0)
    b, p, n_labels = 6, 8, 3
    same = torch.ones(b, p)
    labels = torch.randint(0, 2, (b, n_labels))
    labels[0], labels[1] = 1, 0  # every label has both classes
    prompts = torch.randn(n_labels, 2, 2, p)
    collapsed = batch_diagnostics(same, same, torch.randn(b, p), prompts, labels)
    assert collapsed["img_cos"] == pytest.approx(1.0)
    assert collapsed["prompt_auc"] == pytest.approx(0.5)  # identical scores: all ties

    eye = torch.eye(b, p)
    perfect = batch_diagnostics(eye, eye, eye.clone(), None, None)
    assert perfect["img_cos"] == pytest.approx(0.0) and perfect["batch_r1"] == 1.0
    assert "prompt_auc" not in perfect


def test_prompt_auc_follows_the_prompt_direction() -> None:
    p = 4
    pos = torch.tensor([1.0, 0.0, 0.0, 0.0])
    prompts = torch.stack([pos, -pos])[None, None].expand(1, 3, 2, p)  # [L=1, V=3, 2, P]
    image = torch.tensor([[1.0, 0.1, 0, 0], [0.8, -0.3, 0, 0], [-1.0, 0.2, 0, 0], [-0.5, 1, 0, 0]])
    labels = torch.tensor([[1], [1], [0], [0]])
    assert batch_diagnostics(image, image, None, prompts, labels)["prompt_auc"] == 1.0
    assert batch_diagnostics(image, image, None, prompts, 1 - labels)["prompt_auc"] == 0.0


def test_fit_to_budget() -> None:
    # 30 steps done, 0.5 s per step, 100 s left: 0.97 * 100 / 0.5 = 194 more steps
    assert _fit_to_budget(30, 0.5, 100.0, 1000, 1) == 224
    assert _fit_to_budget(30, 0.5, 100.0, 100, 1) == 100  # never past the planned end
    assert _fit_to_budget(30, 0.5, -5.0, 1000, 1) == 31  # over budget: stop at the next step
