"""Evaluation: metrics with known answers on constructed embeddings, bootstrap intervals, the
shuffled control's partners, and one run of ``evaluate`` on a checkpoint."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.data.labels import LABELS
from engines.datasets import SyntheticDataset
from engines.evaluation import (
    EvalOutputs,
    compute_metrics,
    evaluate,
    recall_at_k,
    retrieval_ranks,
    roc_auc,
    roc_curve,
    write_report,
    youden_threshold,
)
from engines.evaluation.metrics import bootstrap_counts, estimate, weighted_auc
from engines.evaluation.run import patient_key, shuffled_partner
from engines.model import TextTower, build_model
from engines.training import save_checkpoint
from model_fixtures import MICRO

REQUIRED = (
    "auc_macro",
    "t2i_r1",
    "t2i_r5",
    "t2i_r10",
    "i2t_r1",
    "i2t_r5",
    "i2t_r10",
    "loc_mae_mm",
    "loc_mae_mm_center_baseline",
    "loc_mae_mm_prior_baseline",
    "loc_mae_mm_shuffled_control",
)


def unit(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def outputs(n: int = 60, seed: int = 0, *, perfect: bool = True) -> EvalOutputs:
    """Embeddings and scores with known answers: image i pairs with report i; label scores
    separate the classes perfectly (or not at all); snippets point at their target."""
    rng = np.random.default_rng(seed)
    img = unit(rng.normal(size=(n, 32)))
    rep = img.copy() if perfect else unit(rng.normal(size=(n, 32)))
    labels = rng.integers(0, 2, size=(n, len(LABELS)))
    labels[:, 3] = -1  # an unknown label everywhere: no AUC for it
    probs = np.where(labels == 1, 0.9, 0.1) if perfect else rng.random((n, len(LABELS)))
    s = 3 * n
    vol = np.repeat(np.arange(n), 3)
    target = rng.integers(1, 7, size=s)
    return EvalOutputs(
        volume_ids=[f"valid_{i}_a_1" for i in range(n)],
        image_embedding=img,
        report_embedding=rep,
        probabilities=probs.astype(np.float64),
        labels=labels.astype(np.int64),
        token_mm=12.0,
        snippet_volume=vol.astype(np.int64),
        snippet_label=[LABELS[i % len(LABELS)] for i in range(s)],
        snippet_text=["x"] * s,
        snippet_target=target.astype(np.int64),
        snippet_valid=np.tile([0, 7], (s, 1)).astype(np.int64),
        snippet_pred=target.astype(np.int64) if perfect else rng.integers(0, 8, size=s),
        snippet_pred_shuffled=rng.integers(0, 8, size=s).astype(np.int64),
        snippet_pred_prior=np.full(s, 3.5),
    )


def test_retrieval_ranks_and_recall() -> None:
    sim = np.array([[0.9, 0.1, 0.2], [0.5, 0.4, 0.6], [0.3, 0.3, 0.3]])
    assert retrieval_ranks(sim).tolist() == [0, 2, 2]  # ties count against the query
    assert recall_at_k([0, 2, 2], 1) == pytest.approx(1 / 3)
    assert recall_at_k([0, 2, 2], 3) == 1.0


def test_perfect_retrieval_and_auc_and_localization() -> None:
    m = compute_metrics(outputs(perfect=True), bootstrap=200, seed=1)
    for key in ("t2i_r1", "i2t_r1", "t2i_r10", "auc_macro"):
        assert m[key]["value"] == 1.0 and m[key]["ci95"] == [1.0, 1.0], key
    assert m["auc"][LABELS[3]]["value"] is None, "a label without known values has no AUC"
    assert m["auc_macro_n_labels"] == len(LABELS) - 1
    assert m["loc_mae_mm"]["value"] == 0.0
    assert m["loc_mae_mm_center_baseline"]["value"] > 10.0
    assert m["loc_within_one_token"]["value"] == 1.0
    for key in REQUIRED:
        assert set(m[key]) >= {"value", "ci95"}, key


def test_random_embeddings_recall_is_k_over_n() -> None:
    n = 400
    m = compute_metrics(outputs(n=n, perfect=False, seed=3), bootstrap=200, seed=2)
    for k in (1, 5, 10):
        for d in ("t2i", "i2t"):
            v = m[f"{d}_r{k}"]["value"]
            assert v == pytest.approx(k / n, abs=4 * np.sqrt(k / n / n) + 1e-9), (d, k, v)
    assert m["auc_macro"]["value"] == pytest.approx(0.5, abs=0.05)


def test_bootstrap_interval_contains_the_value() -> None:
    m = compute_metrics(outputs(n=80, perfect=False, seed=4), bootstrap=300, seed=0)
    for key in (*REQUIRED, *(f"auc.{lb}" for lb in LABELS if lb != LABELS[3])):
        e = m["auc"][key[4:]] if key.startswith("auc.") else m[key]
        lo, hi = e["ci95"]
        assert lo <= e["value"] <= hi, key
        if 0.0 < e["value"] < 1.0 and not key.startswith("loc"):
            assert hi > lo, f"{key}: degenerate interval"


def test_auc_matches_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, size=50).astype(float)  # many ties
    y = rng.integers(0, 2, size=50)
    pos, neg = s[y == 1], s[y == 0]
    brute = np.mean(
        [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg)]
    )
    assert roc_auc(s, y) == pytest.approx(brute)
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert np.isnan(roc_auc([0.1, 0.2], [1, 1]))
    # weighted by bootstrap counts == AUC of the explicitly resampled data
    counts = bootstrap_counts(50, 5, seed=1)
    idx = [np.repeat(np.arange(50), c.astype(int)) for c in counts]
    explicit = [roc_auc(s[i], y[i]) for i in idx]
    assert weighted_auc(s, y, counts) == pytest.approx(explicit)


def test_roc_curve_and_youden() -> None:
    fpr, tpr, thr = roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert thr[0] == np.inf and thr[-1] == 0.1
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    t, info = youden_threshold([0.1, 0.2, 0.3, 0.7, 0.8], [0, 0, 0, 1, 1])
    assert t == 0.7 and info["method"] == "youden" and info["j"] == 1.0
    t, info = youden_threshold([0.1, 0.2], [1, 1])
    assert t == 0.5 and info["method"] == "default"
    lo, hi = estimate(0.3, [0.1, 0.2, 0.4, 0.5])["ci95"]
    assert lo is not None and hi is not None and lo < 0.3 < hi


def test_shuffled_partner_is_another_patient() -> None:
    ids = ["valid_1_a_1", "valid_1_a_2", "valid_2_a_1", "valid_3_b_1", "valid_3_b_2", "x"]
    partner = shuffled_partner(ids, seed=0)
    for i, j in enumerate(partner):
        assert patient_key(ids[i]) != patient_key(ids[int(j)])
    assert patient_key("valid_12_a_1.nii.gz") == "valid_12"


def test_report_files(tmp_path: Path) -> None:
    o = outputs(n=30)
    m = compute_metrics(o, bootstrap=50)
    write_report(tmp_path, o, m)
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert all(k in data for k in REQUIRED) and set(data["auc"]) == set(LABELS)
    table = (tmp_path / "metrics.md").read_text()
    assert "| Text->image R@1 | 1.000 |" in table
    for png in ("roc.png", "localization.png", "localization_scatter.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "localization.jsonl").read_text().splitlines()) == 90


def test_evaluate_a_checkpoint_end_to_end(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    tower = TextTower.from_pretrained(None, max_length=64, freeze=True)
    torch.manual_seed(0)
    model = build_model(MICRO, text_tower=tower)
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "last.pt", model, MICRO, step=0)
    prior = {"labels": {"Lung nodule": {"mean": 0.7, "n": 3}}, "overall": {"mean": 0.5, "n": 9}}
    (run / "depth_prior.json").write_text(json.dumps(prior))
    data = SyntheticDataset(MICRO.space, 5, seed=11, fresh_each_epoch=False)
    result = evaluate(
        run,
        data,
        tmp_path / "eval",
        bootstrap=30,
        progress=False,
        text_tower=tower,
        no_localization=run / "checkpoints" / "last.pt",
    )
    m = result.metrics
    assert m["n_volumes"] == 5 and m["n_snippets"] > 0
    assert m["source"]["prior"].endswith("depth_prior.json")
    assert m["loc_mae_mm_prior_baseline"]["value"] is not None
    # the ablation here is the same checkpoint, so it localizes identically
    assert m["loc_mae_mm_no_localization_model"]["value"] == m["loc_mae_mm"]["value"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n_volumes"] == 5
