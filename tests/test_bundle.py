"""Model bundles: export and load round trip, codes, thresholds, and refusal of damaged ones."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest
import tomli_w
import torch

from engines.bundle import OWN_SCHEME, BundleError, export_bundle, load_bundle
from engines.data.labels import LABELS
from engines.datasets import SyntheticDataset
from engines.model import TextTower, build_model
from engines.training import load_model, save_checkpoint
from model_fixtures import MICRO


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tower: TextTower) -> Path:
    """A training run folder as ``train`` leaves it (checkpoint + label-depth prior)."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = build_model(MICRO, text_tower=tower)
    train_info = {
        "seed": 0,
        "total_steps": 7,
        "data": {"kind": "manifest", "path": "/data/m.jsonl", "sha256": "ab" * 32},
        "git_commit": None,
    }
    save_checkpoint(
        run / "checkpoints" / "last.pt", model, MICRO, step=7, extra={"train": train_info}
    )
    (run / "depth_prior.json").write_text(json.dumps({"labels": {}, "overall": {"mean": 0.5}}))
    return run


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory, run_dir: Path, tower: TextTower) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    export_bundle(run_dir, out, text_tower=tower, progress=False, overwrite=True)
    return out


def test_round_trip(bundle_dir: Path, run_dir: Path, tower: TextTower) -> None:
    b = load_bundle(bundle_dir)
    assert b.preset == MICRO and b.name == "radfinder-micro" and b.version == "0.1.0+step7"
    assert b.label_names == LABELS
    assert b.feature_resolution_mm == 12.0
    assert b.threshold_method == "default" and np.all(b.thresholds == 0.5)
    m = tomllib.loads((bundle_dir / "bundle.toml").read_text())
    assert "no validation data" in m["thresholds"]["note"]
    assert m["preprocessing"]["shape"] == [24, 32, 32]
    assert m["provenance"]["training_data"]["sha256"] == "ab" * 32
    assert m["provenance"]["seed"] == 0
    assert m["files"]["depth_prior"] == "depth_prior.json"
    total = sum(f.stat().st_size for f in bundle_dir.iterdir())
    assert total <= 25 * 2**20
    # the weights are the run's, and the stored prompts are the model's own
    model, _, _ = load_model(b.checkpoint_path, text_tower=tower)
    ref, _, _ = load_model(run_dir / "checkpoints" / "last.pt", text_tower=tower)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    with torch.no_grad():
        p = ref.prompt_embeddings()
    stored = b.prompt_embeddings()
    torch.testing.assert_close(stored.classify, p.classify)
    torch.testing.assert_close(stored.locate, p.locate)


def test_codes_never_invent_snomed(bundle_dir: Path) -> None:
    b = load_bundle(bundle_dir)
    by = {lb.name: lb for lb in b.labels}
    assert (by["Hiatal hernia"].code.scheme, by["Hiatal hernia"].code.value) == (
        OWN_SCHEME,
        "RF006",
    )
    for name in ("Atelectasis", "Peribronchial thickening", "Bronchiectasis"):
        assert by[name].code.scheme == OWN_SCHEME and by[name].code.value.startswith("RF")
    nodule = by["Lung nodule"]
    assert (nodule.code.scheme, nodule.code.value) == ("SCT", "27925004")
    assert nodule.finding_site is not None and nodule.finding_site.value == "39607008"
    assert by["Emphysema"].code.scheme == "RADLEX"
    assert by["Cardiomegaly"].positive_prompts[0] == "Cardiomegaly is present."


def test_onnx_graph_is_static_and_self_contained(bundle_dir: Path) -> None:
    b = load_bundle(bundle_dir)
    proto = onnx.load(str(b.onnx_path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    for i in proto.graph.input:
        assert all(d.HasField("dim_value") for d in i.type.tensor_type.shape.dim), i.name
    assert [i.name for i in proto.graph.input] == ["volume", "depth_valid"]
    assert "probabilities" in b.onnx_outputs, "prompts are baked in: no text tower to serve"


def test_thresholds_from_validation_data(run_dir: Path, tower: TextTower, tmp_path: Path) -> None:
    val = SyntheticDataset(MICRO.space, 6, seed=21, fresh_each_epoch=False)
    b = export_bundle(
        run_dir, tmp_path / "b", validation_data=val, text_tower=tower, progress=False
    )
    assert b.threshold_method == "youden"
    methods = {lb.threshold_method for lb in b.labels}
    assert "youden" in methods
    assert all(0.0 <= t <= 1.0 for t in b.thresholds)
    m = tomllib.loads((tmp_path / "b" / "bundle.toml").read_text())
    assert m["thresholds"]["validation_data"]["kind"] == "synthetic"
    with pytest.raises(FileExistsError):
        export_bundle(run_dir, tmp_path / "b", text_tower=tower, progress=False)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_toml(path: Path, edit: dict[str, object]) -> None:
    m = tomllib.loads(path.read_text())
    for dotted, value in edit.items():
        node = m
        keys = dotted.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[keys[-1]] = value
    path.write_bytes(tomli_w.dumps(m).encode())


def test_damaged_bundles_are_refused(bundle_dir: Path, tmp_path: Path) -> None:
    tampered = _copy(bundle_dir, tmp_path / "tampered")
    data = bytearray((tampered / "prompts.npz").read_bytes())
    data[-100] ^= 0xFF
    (tampered / "prompts.npz").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="SHA-256"):
        load_bundle(tampered)

    missing = _copy(bundle_dir, tmp_path / "missing")
    (missing / "vision.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(missing)

    cases: list[tuple[dict[str, object], str]] = [
        ({"labels.5.threshold": 1.5}, "threshold"),
        ({"labels.5.scheme": "SCT", "labels.5.code": "12345678"}, "SNOMED"),
        ({"preprocessing.shape": [24, 64, 64]}, "preprocessing"),
        ({"format_version": 99}, "format_version"),
    ]
    for i, (edit, match) in enumerate(cases):
        d = _copy(bundle_dir, tmp_path / f"edit{i}")
        _edit_toml(d / "bundle.toml", edit)
        with pytest.raises(BundleError, match=match):
            load_bundle(d)
