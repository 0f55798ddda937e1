"""`radfinder-node train / bundle export / evaluate` as a new user runs them (a few steps)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from radfinder_node.cli import main

pytestmark = pytest.mark.slow

KEYS = [
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
]


def test_train_export_evaluate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run, bundle, report = tmp_path / "run", tmp_path / "bundle", tmp_path / "eval"
    assert (
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--data",
                "synthetic:8",
                "--out",
                str(run),
                "--steps",
                "2",
                "--batch",
                "2",
            ]
        )
        == 0
    )
    assert (run / "checkpoints" / "last.pt").is_file()
    assert main(["bundle", "export", str(run), "--out", str(bundle)]) == 0
    meta = tomllib.loads((bundle / "bundle.toml").read_text())
    assert len(meta["labels"]) == 18
    assert (bundle / "vision.onnx").stat().st_size > 0
    assert (
        main(
            [
                "evaluate",
                "--bundle",
                str(bundle),
                "--data",
                "synthetic:6",
                "--out",
                str(report),
                "--bootstrap",
                "50",
            ]
        )
        == 0
    )
    metrics = json.loads((report / "metrics.json").read_text())
    for key in KEYS:
        lo, hi = metrics[key]["ci95"]
        assert lo <= metrics[key]["value"] <= hi, key
    assert len(metrics["auc"]) == 18
