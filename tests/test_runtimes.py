"""Runtimes: one interface, the shared preprocessing, and ONNX Runtime equal to torch."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

from engines.bundle import export_bundle
from engines.data.phantoms import generate_phantom
from engines.model import TextTower, build_model
from engines.preprocess import to_model_space
from engines.runtimes import (
    Engine,
    EngineError,
    EngineUnavailable,
    cached_engine,
    clear_engine_cache,
    load_engine,
)
from engines.runtimes.onnx import OnnxEngine
from engines.runtimes.torch import TorchEngine
from engines.training import load_model, save_checkpoint
from model_fixtures import MICRO


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory, tower: TextTower) -> Path:
    torch.set_num_threads(2)
    torch.manual_seed(1)
    model = build_model(MICRO, text_tower=tower)
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run / "checkpoints" / "last.pt", model, MICRO, step=3)
    out = tmp_path_factory.mktemp("bundle")
    export_bundle(run, out, text_tower=tower, progress=False, overwrite=True)
    return out


@pytest.fixture(scope="module")
def engines(bundle_dir: Path) -> dict[str, Engine]:
    # CPU on purpose: the 1e-4 agreement is between fp32 CPU kernels (cuDNN may use TF32).
    return {rt: load_engine(bundle_dir, rt, device="cpu") for rt in ("onnx", "torch")}


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
        load_engine(bundle_dir, "tflite")
    with pytest.raises(EngineError, match="takes no options"):
        load_engine(bundle_dir, "onnx", device="cpu", precision="fp16")
    with pytest.raises(EngineError, match="device must be"):
        load_engine(bundle_dir, "onnx", device="tpu")
    assert engines["onnx"].labels[0] == "Medical material"


def test_engines_describe_themselves(engines: dict[str, Engine]) -> None:
    for name, eng in engines.items():
        labels = eng.describe()
        assert labels == {
            "engine": name,
            "device": "cpu",
            "bundle": "radfinder-micro",
            "bundle_version": "0.1.0+step3",
        }
        assert eng.name == name and eng.bundle_version == "0.1.0+step3"
        assert eng.selected_because == "asked for by name"


def test_auto_on_cpu_picks_onnx_runtime_and_says_why(
    bundle_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="engines.runtimes"):
        eng = load_engine(bundle_dir, "auto", device="cpu", threads=1, precision="fp32")
    assert isinstance(eng, OnnxEngine) and eng.device == "cpu"
    assert eng.session.get_session_options().intra_op_num_threads == 1
    assert eng.selected_because == "auto on cpu: first choice"
    [record] = [r for r in caplog.records if r.getMessage() == "engine_selected"]
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["engine"] == "onnx" and fields["device"] == "cpu"
    assert fields["requested_device"] == "cpu" and fields["bundle"] == "radfinder-micro"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the host without a GPU")
def test_gpu_runtimes_are_refused_clearly_without_a_gpu(
    bundle_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(EngineUnavailable, match="CUDA is not available"):
        load_engine(bundle_dir, "torch", device="cuda")
    with pytest.raises(EngineUnavailable, match="CUDA"):
        TorchEngine(bundle_dir, device="cuda:0")
    with pytest.raises(EngineUnavailable, match="CUDAExecutionProvider"):
        OnnxEngine(bundle_dir, device="cuda")
    with pytest.raises(EngineUnavailable, match="no runtime can serve on cuda") as info:
        load_engine(bundle_dir, "auto", device="cuda")
    for rt in ("tensorrt", "onnx", "torch"):
        assert rt in str(info.value)
    # device "auto" resolves to the CPU here, and the choice is ONNX Runtime
    with caplog.at_level(logging.INFO, logger="engines.runtimes"):
        eng = load_engine(bundle_dir)
    assert (eng.runtime, eng.device) == ("onnx", "cpu")


def test_cached_engine_loads_once_per_key(bundle_dir: Path) -> None:
    loads: list[tuple[str, str]] = []
    lock = threading.Lock()

    def counting_loader(bundle: Any, runtime: str, **kw: Any) -> Engine:
        with lock:
            loads.append((runtime, kw["device"]))
        return load_engine(bundle, runtime, **kw)

    clear_engine_cache()
    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            got = list(
                pool.map(
                    lambda _: cached_engine(bundle_dir, "onnx", "cpu", loader=counting_loader),
                    range(12),
                )
            )
        assert len({id(e) for e in got}) == 1 and loads == [("onnx", "cpu")]
        torch_eng = cached_engine(bundle_dir, "torch", "cpu", loader=counting_loader)
        assert torch_eng is not got[0] and torch_eng.runtime == "torch"
        assert cached_engine(bundle_dir, "torch", "cpu", loader=counting_loader) is torch_eng
        threaded = cached_engine(bundle_dir, "onnx", "cpu", loader=counting_loader, threads=1)
        assert threaded is not got[0]
        assert len(loads) == 3
        # the cached engine serves like a fresh one
        hu, spacing, affine = _volume()
        pred, _ = got[0].predict_volume(hu, spacing, affine)
        assert pred.probabilities.shape == (1, 18)
    finally:
        clear_engine_cache()
    assert isinstance(got[0], OnnxEngine)
    assert got[0].session is None, "clear_engine_cache closes what it drops"
