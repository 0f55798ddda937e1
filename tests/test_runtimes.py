"""Runtimes: one interface, the shared preprocessing, and ONNX Runtime equal to torch."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

from engines.bundle import export_bundle
from engines.data.phantoms import generate_phantom
from engines.model import TextTower, build_model
from engines.preprocess import to_model_space
from engines.runtimes import Engine, EngineError, load_engine
from engines.training import load_model, save_checkpoint
from model_fixtures import MICRO


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(2)
    tower = TextTower.from_pretrained(None, max_length=64, freeze=True)
    torch.manual_seed(1)
    model = build_model(MICRO, text_tower=tower)
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run / "checkpoints" / "last.pt", model, MICRO, step=3)
    out = tmp_path_factory.mktemp("bundle")
    export_bundle(run, out, text_tower=tower, progress=False, overwrite=True)
    return out


@pytest.fixture(scope="module")
def engines(bundle_dir: Path) -> dict[str, Engine]:
    return {rt: load_engine(bundle_dir, rt) for rt in ("onnx", "torch")}


def _volume() -> tuple[torch.Tensor, tuple[float, float, float], npt.NDArray[np.float64]]:
    # Another grid than the model space (and a scan shorter than the crop): the runtimes must
    # share the preprocessing and the padding mask.
    ph = generate_phantom((12, 48, 48), (5.0, 7.0, 7.0), seed=4)
    return torch.from_numpy(ph.hu), ph.spacing, ph.affine


def test_onnx_equals_torch(engines: dict[str, Engine]) -> None:
    hu, spacing, affine = _volume()
    mi = engines["torch"].prepare(hu, spacing, affine)
    assert not bool(mi.depth_valid.all()), "the short scan leaves padded depth tokens"
    ref = engines["torch"].predict(mi)
    got = engines["onnx"].predict(mi)
    for name in ("probabilities", "depth_distribution", "image_embedding", "depth_embeddings"):
        a, b = getattr(got, name), getattr(ref, name)
        assert a.shape == b.shape, name
        assert float((a - b).abs().max()) <= 1e-4, name
    assert ref.probabilities.shape == (1, 18) and ref.depth_distribution.shape == (1, 18, 8)
    valid = ref.depth_valid[0]
    assert torch.allclose(ref.depth_distribution[0].sum(-1), torch.ones(18), atol=1e-5)
    assert float(got.depth_distribution[0][:, ~valid].abs().max()) == 0.0


def test_torch_engine_is_the_reference_model(engines: dict[str, Engine], bundle_dir: Path) -> None:
    hu, spacing, affine = _volume()
    eng = engines["torch"]
    mi = to_model_space(hu, spacing, affine, config=MICRO.space)
    assert torch.equal(eng.prepare(hu, spacing, affine).image, mi.image)
    model, _, _ = load_model(eng.bundle.checkpoint_path, load_text=False)
    with torch.no_grad():
        direct = model.predict(mi.image[None], mi.depth_valid[None], eng.bundle.prompt_embeddings())
    pred, _ = eng.predict_volume(hu, spacing, affine)
    torch.testing.assert_close(pred.probabilities, direct.probabilities)
    torch.testing.assert_close(pred.depth_distribution, direct.depth_distribution)


def test_wrong_inputs_are_refused(engines: dict[str, Engine], bundle_dir: Path) -> None:
    from engines.preprocess import ModelInput

    hu, spacing, affine = _volume()
    mi = engines["onnx"].prepare(hu, spacing, affine)
    wrong = ModelInput(torch.zeros((1, 24, 64, 64)), mi.space)
    for eng in engines.values():
        with pytest.raises(EngineError, match="model space"):
            eng.predict(wrong)
    with pytest.raises(EngineError, match="unknown runtime"):
        load_engine(bundle_dir, "tensorrt")
    assert engines["onnx"].labels[0] == "Medical material"
