"""TensorRT engine: the bundle's ONNX graph compiled into a plan for one GPU, cached.

Written against the TensorRT 10 and 11 Python API documentation (``tensorrt`` is not
installable on the machines this project is developed and tested on; see README "TensorRT").
What runs without TensorRT is tested there: the plan cache (keys, paths, corruption) and the
graph audit (``engines.runtimes.onnx_ops``), which every bundle's graph passes.

Build (``_build_plan``): ``trt.Builder`` -> ``create_network(0)`` (networks are explicit-batch
in TensorRT 10; the ``EXPLICIT_BATCH`` flag is gone) -> ``trt.OnnxParser.parse_from_file`` ->
a builder config with a workspace memory-pool limit, ``BuilderFlag.FP16`` when the precision
is fp16, and an optimisation profile pinning any symbolic input to the bundle's declared shape
-> ``build_serialized_network``. TensorRT 11 removed the weak-typing flags (``FP16``): an fp32
graph then builds in fp32, and the engine says so.

Run: ``trt.Runtime.deserialize_cuda_engine`` -> one execution context; I/O tensors are found
by name (``num_io_tensors``, ``get_tensor_name``, ``get_tensor_mode``), their buffers are
torch tensors on the engine's GPU bound once with ``set_tensor_address``, and every volume is
copied in, run with ``execute_async_v3`` on torch's current stream and copied out; the copy
back to the host synchronises that stream.

Plans are cached beside the bundle (or in ``cache_dir`` / ``$RADFINDER_TRT_CACHE`` when the
bundle directory is read-only, else ``~/.cache/radfinder-node/tensorrt``). A plan only works
on the GPU model and TensorRT version that built it, so the file name and a JSON sidecar carry
the key: bundle, ONNX SHA-256, GPU name, compute capability, TensorRT version, precision. A
plan whose sidecar or checksum does not match, or that TensorRT refuses to deserialise, is
rebuilt, never served.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Final, Literal

import torch

from engines.bundle import Bundle
from engines.model.radfinder import Prediction
from engines.runtimes.base import Engine, EngineError, EngineUnavailable
from engines.runtimes.onnx_ops import audit_onnx

__all__ = [
    "CACHE_ENV",
    "PLAN_FORMAT",
    "PlanCache",
    "PlanKey",
    "TensorRTEngine",
    "bundle_allows_fp16",
    "import_tensorrt",
    "plan_cache_dir",
    "user_cache_dir",
]

log = logging.getLogger(__name__)

PLAN_FORMAT: Final = 1
CACHE_ENV: Final = "RADFINDER_TRT_CACHE"
DEFAULT_WORKSPACE: Final = 4 << 30
Precision = Literal["auto", "fp16", "fp32"]


def import_tensorrt() -> Any:
    """``import tensorrt``, or EngineUnavailable saying why it cannot be used here."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found, unused-ignore]
    except ImportError as e:
        raise EngineUnavailable(
            "TensorRT is not installed (the tensorrt Python package does not import: "
            f"{e}); install it on a CUDA host, or use runtime 'onnx' or 'torch'"
        ) from e
    return trt


def bundle_allows_fp16(bundle: Bundle) -> bool:
    """Whether the bundle says its graph may run in fp16 (``[onnx] fp16_allowed = true``).
    Absent means no: fp16's range (65504) is not something to assume for a trained model."""
    return bool(bundle.manifest.get("onnx", {}).get("fp16_allowed", False))


# ---------------------------------------------------------------------------------------------
# Plan cache (no TensorRT needed)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "x"


@dataclass(frozen=True)
class PlanKey:
    """Everything a plan depends on; two keys that differ never share a file."""

    bundle: str
    onnx_sha256: str
    gpu_name: str
    compute_capability: tuple[int, int]
    tensorrt_version: str
    precision: str
    format: int = PLAN_FORMAT

    def filename(self) -> str:
        major, minor = self.compute_capability
        return (
            f"{_slug(self.bundle)}-{self.onnx_sha256[:12]}.{_slug(self.gpu_name)}"
            f".sm{major}{minor}.trt{_slug(self.tensorrt_version)}.{self.precision}.plan"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["compute_capability"] = list(self.compute_capability)
        return d


def _writable(directory: Path) -> bool:
    """A real write probe: permission bits lie on read-only mounts and for root."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            pass
    except OSError:
        return False
    return True


def plan_cache_dir(bundle_dir: Path, cache_dir: str | Path | None = None) -> Path:
    """Where plans go: ``cache_dir``, else ``$RADFINDER_TRT_CACHE``, else beside the bundle
    when that is writable, else the user's cache directory."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    if _writable(bundle_dir):
        return bundle_dir
    return user_cache_dir()


def user_cache_dir() -> Path:
    """The per-user fallback: ``$XDG_CACHE_HOME/radfinder-node/tensorrt``."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "radfinder-node" / "tensorrt"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class PlanCache:
    """Plans and their sidecars in one directory. ``load`` returns None for anything that
    must not be served (missing, another key, truncated or edited), with the reason logged."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, key: PlanKey) -> Path:
        return self.directory / key.filename()

    def _sidecar(self, key: PlanKey) -> Path:
        return self.path(key).with_suffix(".plan.json")

    def load(self, key: PlanKey) -> bytes | None:
        plan_path, meta_path = self.path(key), self._sidecar(key)
        if not plan_path.exists():
            return None
        reason = None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            data = plan_path.read_bytes()
        except (OSError, ValueError) as e:
            meta, data, reason = {}, b"", f"unreadable ({e})"
        if reason is None and meta.get("key") != key.to_dict():
            reason = "built for another key"
        elif reason is None and hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            reason = "checksum mismatch"
        if reason is not None:
            log.warning(
                "tensorrt_plan_rejected",
                extra={"fields": {"plan": str(plan_path), "reason": reason}},
            )
            return None
        return data

    def store(self, key: PlanKey, plan: bytes, **info: Any) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        _atomic_write(path, plan)
        meta = {"key": key.to_dict(), "sha256": hashlib.sha256(plan).hexdigest(), **info}
        _atomic_write(self._sidecar(key), json.dumps(meta, indent=1).encode())
        return path

    def discard(self, key: PlanKey) -> None:
        for p in (self.path(key), self._sidecar(key)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


# ---------------------------------------------------------------------------------------------
# The engine (TensorRT from here on)


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT8: torch.int8,
        trt.DataType.BOOL: torch.bool,
    }
    for name, td in (("BF16", torch.bfloat16), ("INT64", torch.int64), ("UINT8", torch.uint8)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = td
    if dtype not in table:
        raise EngineError(f"TensorRT tensor type {dtype} has no torch equivalent")
    return table[dtype]


class TensorRTEngine(Engine):
    """``TensorRTEngine(bundle, device="cuda" | "cuda:N", precision="auto")``.

    ``precision="auto"`` builds fp16 when the bundle allows it (``[onnx] fp16_allowed``) and
    the TensorRT version has the FP16 builder flag, else fp32; ``"fp16"`` on a bundle that
    does not allow it is an error. The first load on a new GPU or TensorRT version builds the
    plan (minutes for the paper preset); later loads deserialise it (seconds).
    """

    runtime: ClassVar[str] = "tensorrt"

    def __init__(
        self,
        bundle: Bundle | str | Path,
        *,
        device: str = "cuda",
        precision: Precision = "auto",
        cache_dir: str | Path | None = None,
        workspace_bytes: int = DEFAULT_WORKSPACE,
    ) -> None:
        super().__init__(bundle)
        trt = import_tensorrt()
        self._trt = trt
        dev = torch.device(device)
        if dev.type != "cuda":
            raise EngineUnavailable(f"TensorRT runs on CUDA devices only, not {device!r}")
        if not torch.cuda.is_available():
            raise EngineUnavailable("TensorRT needs CUDA, which is not available here")
        self.index = torch.cuda.current_device() if dev.index is None else int(dev.index)
        self.device = f"cuda:{self.index}"
        self.precision = self._resolve_precision(precision)
        self.workspace_bytes = int(workspace_bytes)
        self.key = PlanKey(
            bundle=f"{self.bundle.name}-{self.bundle.version}",
            onnx_sha256=str(self.bundle.manifest["sha256"]["onnx"]),
            gpu_name=torch.cuda.get_device_name(self.index),
            compute_capability=tuple(torch.cuda.get_device_capability(self.index)),  # type: ignore[arg-type]
            tensorrt_version=str(trt.__version__),
            precision=self.precision,
        )
        self.cache = PlanCache(plan_cache_dir(self.bundle.path, cache_dir))
        self._lock = threading.Lock()
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.index):
            self._engine = self._load_or_build()
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise EngineError("TensorRT could not create an execution context")
            self._bind()

    # -- precision and plan ----------------------------------------------------------------

    def _resolve_precision(self, precision: Precision) -> str:
        if precision not in ("auto", "fp16", "fp32"):
            raise EngineError(f"precision must be auto, fp16 or fp32, got {precision!r}")
        has_fp16_flag = hasattr(self._trt.BuilderFlag, "FP16")
        allowed = bundle_allows_fp16(self.bundle)
        if precision == "fp16" and not allowed:
            raise EngineError(
                f"bundle {self.bundle.name} does not allow fp16 ([onnx] fp16_allowed is not true)"
            )
        want_fp16 = precision == "fp16" or (precision == "auto" and allowed)
        if want_fp16 and not has_fp16_flag:
            log.warning(
                "tensorrt_fp16_unavailable",
                extra={
                    "fields": {
                        "tensorrt": self._trt.__version__,
                        "reason": "strongly typed networks only (no BuilderFlag.FP16); "
                        "the fp32 graph builds in fp32",
                    }
                },
            )
            if precision == "fp16":
                raise EngineError(
                    f"TensorRT {self._trt.__version__} has no FP16 builder flag; "
                    "an fp16 plan needs an fp16 ONNX graph"
                )
            want_fp16 = False
        return "fp16" if want_fp16 else "fp32"

    def _deserialize(self, plan: bytes) -> Any:
        runtime = self._trt.Runtime(self._logger)
        self._runtime = runtime  # the engine must not outlive its runtime
        return runtime.deserialize_cuda_engine(plan)

    def _load_or_build(self) -> Any:
        plan = self.cache.load(self.key)
        if plan is not None:
            engine = self._deserialize(plan)
            if engine is not None:
                log.info(
                    "tensorrt_plan_loaded",
                    extra={"fields": {"plan": str(self.cache.path(self.key)), **self.describe()}},
                )
                return engine
            log.warning(
                "tensorrt_plan_rejected",
                extra={"fields": {"plan": str(self.cache.path(self.key)), "reason": "stale"}},
            )
            self.cache.discard(self.key)
        started = time.perf_counter()
        plan = self._build_plan()
        seconds = time.perf_counter() - started
        info = {"build_seconds": round(seconds, 1), "workspace_bytes": self.workspace_bytes}
        try:
            path = self.cache.store(self.key, plan, **info)
        except OSError as e:
            log.warning(
                "tensorrt_plan_cache_unwritable",
                extra={"fields": {"dir": str(self.cache.directory), "error": str(e)}},
            )
            self.cache = PlanCache(user_cache_dir())
            path = self.cache.store(self.key, plan, **info)
        log.info(
            "tensorrt_plan_built",
            extra={"fields": {"plan": str(path), "seconds": info["build_seconds"]}},
        )
        engine = self._deserialize(plan)
        if engine is None:
            raise EngineError("TensorRT could not deserialise the plan it just built")
        return engine

    def _declared_shapes(self) -> dict[str, list[int]]:
        shapes = self.bundle.manifest.get("onnx", {}).get("input_shapes", {})
        return {str(k): [int(d) for d in v] for k, v in shapes.items()}

    def _build_plan(self) -> bytes:
        trt = self._trt
        declared = self._declared_shapes()
        audit = audit_onnx(self.bundle.onnx_path, input_shapes=declared)
        if not audit.ok:
            raise EngineError(
                f"{self.bundle.onnx_path.name} cannot be built by TensorRT: "
                + "; ".join(audit.problems())
            )
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse_from_file(str(self.bundle.onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EngineError(f"TensorRT's ONNX parser refused the graph: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        if self.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        profile = None
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            if all(int(d) >= 0 for d in tensor.shape):
                continue
            if tensor.name not in declared:
                raise EngineError(
                    f"input {tensor.name} is dynamic and the bundle declares no shape"
                )
            profile = profile or builder.create_optimization_profile()
            shape = tuple(declared[tensor.name])
            profile.set_shape(tensor.name, shape, shape, shape)
        if profile is not None:
            config.add_optimization_profile(profile)
        log.info(
            "tensorrt_plan_building",
            extra={"fields": {**self.key.to_dict(), "workspace_bytes": self.workspace_bytes}},
        )
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError("TensorRT failed to build the plan (see its log above)")
        return bytes(serialized)

    # -- I/O -------------------------------------------------------------------------------

    def _bind(self) -> None:
        trt, engine, ctx = self._trt, self._engine, self._context
        declared = self._declared_shapes()
        self._inputs: dict[str, torch.Tensor] = {}
        self._outputs: dict[str, torch.Tensor] = {}
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        for name in names:
            if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
                continue
            shape = [int(d) for d in engine.get_tensor_shape(name)]
            if any(d < 0 for d in shape):
                shape = declared[name]
                if not ctx.set_input_shape(name, shape):
                    raise EngineError(f"TensorRT refused shape {shape} for input {name}")
            dtype = _torch_dtype(trt, engine.get_tensor_dtype(name))
            self._inputs[name] = torch.empty(shape, dtype=dtype, device=self.device)
        for name in names:
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                continue
            shape = [int(d) for d in ctx.get_tensor_shape(name)]
            dtype = _torch_dtype(trt, engine.get_tensor_dtype(name))
            self._outputs[name] = torch.empty(shape, dtype=dtype, device=self.device)
        for name, t in (*self._inputs.items(), *self._outputs.items()):
            if not ctx.set_tensor_address(name, t.data_ptr()):
                raise EngineError(f"TensorRT refused the buffer for {name}")
        want_in, want_out = set(self.bundle.onnx_inputs), set(self.bundle.onnx_outputs)
        if set(self._inputs) != want_in or not want_out <= set(self._outputs):
            raise EngineError(
                f"plan I/O {sorted(self._inputs)} -> {sorted(self._outputs)} does not match "
                f"the bundle's {sorted(want_in)} -> {sorted(want_out)}"
            )

    @contextlib.contextmanager
    def _on_device(self) -> Iterator[None]:
        with self._lock, torch.cuda.device(self.index):
            yield

    def _run(self, volume: torch.Tensor, depth_valid: torch.Tensor) -> Prediction:
        with self._on_device():
            stream = torch.cuda.current_stream()
            vin, min_ = self._inputs["volume"], self._inputs["depth_valid"]
            vin.copy_(volume.to(vin.dtype), non_blocking=True)
            min_.copy_(depth_valid.to(min_.dtype), non_blocking=True)
            if not self._context.execute_async_v3(stream.cuda_stream):
                raise EngineError("TensorRT execution failed (see its log)")
            out: Mapping[str, torch.Tensor] = {
                k: v.float().cpu() for k, v in self._outputs.items()
            }  # .cpu() waits for the stream
        return Prediction(
            probabilities=out["probabilities"],
            depth_distribution=out["depth_distribution"],
            image_embedding=out["image_embedding"],
            depth_embeddings=out["depth_embeddings"],
            depth_valid=depth_valid.clone(),
        )

    def close(self) -> None:
        with self._lock:
            self._inputs, self._outputs = {}, {}
            self._context = None
            self._engine = None
        torch.cuda.empty_cache()
