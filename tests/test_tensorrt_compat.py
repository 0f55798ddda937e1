"""TensorRT without TensorRT: the graphs it would parse, the plan cache it would use, and the
refusal when it is not installed (it cannot be, here; see README "TensorRT")."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import dataclasses
import importlib.util
import json
import logging
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from engines.bundle import Bundle, export_bundle, load_bundle
from engines.model import TextTower, build_model
from engines.model.radfinder import RadFinder, export_vision_onnx
from engines.presets import PAPER, TINY, Preset, ViTBackboneConfig, override
from engines.runtimes import EngineUnavailable, load_engine
from engines.runtimes.onnx_ops import MIN_OPSET, TENSORRT_ONNX_OPS, audit_onnx
from engines.runtimes.tensorrt import (
    CACHE_ENV,
    PlanCache,
    PlanKey,
    TensorRTEngine,
    bundle_allows_fp16,
    plan_cache_dir,
    user_cache_dir,
)
from engines.training import save_checkpoint
from model_fixtures import MICRO, TINY_OPTIONS_ON

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
TEXT_DIM = 384  # all-MiniLM-L6-v2; the vision graph only needs the width


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, tower: TextTower) -> Bundle:
    torch.manual_seed(5)
    model = build_model(MICRO, text_tower=tower)
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run / "checkpoints" / "last.pt", model, MICRO, step=2)
    return export_bundle(
        run, tmp_path_factory.mktemp("bundle"), text_tower=tower, progress=False, overwrite=True
    )


def _export(preset: Preset, path: Path) -> Path:
    torch.manual_seed(0)
    model = RadFinder(preset.model, preset.space, text_dim=TEXT_DIM).eval()
    export_vision_onnx(model, path)
    return path


def _assert_tensorrt_ready(path: Path, preset: Preset) -> None:
    audit = audit_onnx(path)
    assert audit.ok, audit.problems()
    assert audit.opset >= MIN_OPSET
    assert set(audit.op_counts) <= TENSORRT_ONNX_OPS
    # the ops the architecture is built from are all there, so the check is not vacuous
    assert {"MatMul", "Softmax", "LayerNormalization", "Conv", "Where"} <= set(audit.op_counts)
    d = preset.space.n_depth_tokens
    assert audit.io_shapes["volume"] == (1, 1, *preset.space.shape)
    assert audit.io_shapes["depth_valid"] == (1, d)
    assert audit.io_shapes["depth_embeddings"] == (1, d, preset.model.head.output_dim)


def test_bundle_graph_is_tensorrt_ready(bundle: Bundle) -> None:
    audit = audit_onnx(bundle.onnx_path)
    assert audit.ok, audit.problems()
    assert audit.io_shapes["probabilities"] == (1, 18)
    assert audit.io_shapes["depth_distribution"] == (1, 18, MICRO.space.n_depth_tokens)
    assert {"Sigmoid", "Softmax", "ReduceL2"} & set(audit.op_counts)


def test_tiny_preset_graph_is_tensorrt_ready(tmp_path: Path) -> None:
    _assert_tensorrt_ready(_export(TINY, tmp_path / "tiny.onnx"), TINY)


def test_tiny_options_graph_is_tensorrt_ready(tmp_path: Path) -> None:
    """The stem's extremes, their pooling in the skip, the per-depth readout and the heads'
    linear path, which the preset leaves off."""
    preset = TINY
    for key, value in TINY_OPTIONS_ON:
        preset = override(preset, key, value)
    _assert_tensorrt_ready(_export(preset, tmp_path / "tiny.onnx"), preset)


def _slim_paper() -> Preset:
    """The paper preset's model space, windows and patches, with one thin ViT and combiner
    layer: the same operators and I/O shapes as PAPER (its layers repeat), exported in seconds."""
    assert isinstance(PAPER.model.backbone, ViTBackboneConfig)
    bb = dataclasses.replace(PAPER.model.backbone, depth=1, embed_dim=48, num_heads=4)
    comb = dataclasses.replace(PAPER.model.combiner, depth=1, embed_dim=48, num_heads=4)
    model = dataclasses.replace(PAPER.model, backbone=bb, combiner=comb)
    return dataclasses.replace(PAPER, name="paper-slim", model=model)


@pytest.mark.slow
def test_paper_structure_graph_is_tensorrt_ready(tmp_path: Path) -> None:
    preset = _slim_paper()
    _assert_tensorrt_ready(_export(preset, tmp_path / "paper.onnx"), preset)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("RADFINDER_FULL_PAPER_AUDIT") != "1",
    reason="the full paper graph is 1.65 GB of ONNX from a 13.4 TFLOP trace (42 s on 16 "
    "cores); set RADFINDER_FULL_PAPER_AUDIT=1",
)
def test_full_paper_graph_is_tensorrt_ready(tmp_path: Path) -> None:
    _assert_tensorrt_ready(_export(PAPER, tmp_path / "paper.onnx"), PAPER)


# ---------------------------------------------------------------------------------------------
# The audit finds what TensorRT would refuse


def _graph(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    *,
    opset: int = 17,
    initializers: list[onnx.TensorProto] | None = None,
) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers or [])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_audit_reports_unsupported_ops_dynamic_dims_and_restrictions() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    axes_in = helper.make_tensor_value_info("axes", TensorProto.INT64, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])
    nodes = [
        helper.make_node("Unique", ["x"], ["u"]),
        helper.make_node("Inverse", ["u"], ["v"], domain="com.microsoft"),
        helper.make_node("ReduceSum", ["v", "axes"], ["r"]),  # axes from a graph input
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2]),  # 1D pooling
        helper.make_node("Identity", ["p"], ["y"]),
    ]
    audit = audit_onnx(_graph(nodes, [x, axes_in], [y]))
    assert not audit.ok
    assert audit.unsupported_ops == ("Unique", "com.microsoft::Inverse")
    assert any("ReduceSum" in r and "axes must be a constant" in r for r in audit.restrictions)
    assert any("MaxPool" in r and "1D" in r for r in audit.restrictions)
    assert sorted(str(d) for d in audit.dynamic_dims) == ["x[0]=batch", "y[0]=batch", "y[1]=n"]
    assert audit.opset_problem is None
    text = "\n".join(audit.problems())
    assert "Unique is not in TensorRT's ONNX parser" in text and "y[1]=n" in text

    # a bundle's declared input shape pins the symbol for the inputs and the outputs
    declared = audit_onnx(_graph(nodes, [x, axes_in], [y]), input_shapes={"x": [1, 4]})
    assert [str(d) for d in declared.dynamic_dims] == ["y[1]=n"]
    named = audit_onnx(_graph(nodes, [x, axes_in], [y]), declared_dims={"batch": 1, "n": 4})
    assert named.dynamic_dims == ()


def test_audit_accepts_constant_axes_and_checks_the_opset() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)]
    ok = audit_onnx(_graph(nodes, [x], [y], initializers=[axes]))
    assert ok.ok and ok.op_counts == {"ReduceSum": 1}
    old = audit_onnx(_graph(nodes, [x], [y], opset=13, initializers=[axes]))
    assert not old.ok and old.opset_problem is not None and "13 < 17" in old.opset_problem
    s = helper.make_tensor_value_info("s", TensorProto.STRING, [1])
    t = helper.make_tensor_value_info("t", TensorProto.STRING, [1])
    typed = audit_onnx(_graph([helper.make_node("Identity", ["s"], ["t"])], [s], [t]))
    assert typed.bad_dtypes and "STRING" in typed.bad_dtypes[0]


def test_audit_reads_a_file_without_its_weights(bundle: Bundle, tmp_path: Path) -> None:
    proto = onnx.load(str(bundle.onnx_path))
    onnx.save_model(
        proto,
        str(tmp_path / "ext.onnx"),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    (tmp_path / "weights.bin").unlink()  # the audit must not need them
    assert audit_onnx(tmp_path / "ext.onnx").op_counts == audit_onnx(proto).op_counts


# ---------------------------------------------------------------------------------------------
# Without TensorRT


@pytest.mark.skipif(HAS_TENSORRT, reason="checks a host without TensorRT")
def test_tensorrt_missing_is_a_clear_error(bundle: Bundle) -> None:
    with pytest.raises(EngineUnavailable, match="tensorrt is not installed"):
        load_engine(bundle, "tensorrt", device="cuda")
    with pytest.raises(EngineUnavailable, match="TensorRT is not installed"):
        TensorRTEngine(bundle, device="cuda")


def test_fp16_only_where_the_bundle_allows(bundle: Bundle) -> None:
    assert not bundle_allows_fp16(bundle), "absent means fp32"
    m = json.loads(json.dumps(bundle.manifest))
    m["onnx"]["fp16_allowed"] = True
    assert bundle_allows_fp16(dataclasses.replace(bundle, manifest=m))


# ---------------------------------------------------------------------------------------------
# The plan cache


def _key(**kw: object) -> PlanKey:
    base: dict[str, object] = {
        "bundle": "radfinder-tiny-0.1.0",
        "onnx_sha256": "ab" * 32,
        "gpu_name": "NVIDIA H200",
        "compute_capability": (9, 0),
        "tensorrt_version": "10.13.0.35",
        "precision": "fp16",
    }
    base.update(kw)
    return PlanKey(**base)  # type: ignore[arg-type]


def test_plan_key_names_everything_a_plan_depends_on() -> None:
    name = _key().filename()
    assert name == "radfinder-tiny-0.1.0-abababababab.nvidia-h200.sm90.trt10.13.0.35.fp16.plan"
    variants = [
        _key(gpu_name="NVIDIA A100-SXM4-80GB", compute_capability=(8, 0)),
        _key(tensorrt_version="11.4.0.106"),
        _key(precision="fp32"),
        _key(onnx_sha256="cd" * 32),
    ]
    assert len({name, *(k.filename() for k in variants)}) == 5


def test_plan_cache_round_trip_and_corruption(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = PlanCache(tmp_path)
    key = _key()
    assert cache.load(key) is None
    plan = os.urandom(4096)
    path = cache.store(key, plan, build_seconds=12.5)
    assert path.parent == tmp_path and cache.load(key) == plan
    meta = json.loads(path.with_suffix(".plan.json").read_text())
    assert meta["key"]["gpu_name"] == "NVIDIA H200" and meta["build_seconds"] == 12.5

    with caplog.at_level(logging.WARNING, logger="engines.runtimes.tensorrt"):
        damaged = bytearray(plan)
        damaged[100] ^= 0xFF
        path.write_bytes(bytes(damaged))
        assert cache.load(key) is None
        path.write_bytes(plan[:2000])  # a build killed mid-write (without the atomic rename)
        assert cache.load(key) is None
        cache.store(key, plan)
        meta = json.loads(path.with_suffix(".plan.json").read_text())
        meta["key"]["tensorrt_version"] = "10.0.0"  # renamed by hand from another version
        path.with_suffix(".plan.json").write_text(json.dumps(meta))
        assert cache.load(key) is None
        path.with_suffix(".plan.json").write_text("{not json")
        assert cache.load(key) is None
    reasons = [r.fields["reason"] for r in caplog.records]  # type: ignore[attr-defined]
    assert reasons[:3] == ["checksum mismatch", "checksum mismatch", "built for another key"]
    assert reasons[3].startswith("unreadable")

    cache.store(key, plan)
    assert cache.load(key) == plan, "a rebuilt plan replaces the bad one"
    cache.discard(key)
    assert list(tmp_path.iterdir()) == []


def test_plan_cache_directory(
    bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert plan_cache_dir(bundle.path) == bundle.path, "beside the bundle when writable"
    assert not [p for p in bundle.path.iterdir() if p.name.startswith(".probe-")]
    assert plan_cache_dir(bundle.path, tmp_path / "explicit") == tmp_path / "explicit"
    # a bundle on a read-only file system (/proc is one, even for root)
    assert plan_cache_dir(Path("/proc")) == user_cache_dir()
    assert user_cache_dir() == tmp_path / "xdg" / "radfinder-node" / "tensorrt"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert plan_cache_dir(bundle.path) == tmp_path / "env"
    assert load_bundle(bundle.path).version == bundle.version, "the probe left the bundle valid"
