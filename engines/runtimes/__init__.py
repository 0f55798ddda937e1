"""Serving runtimes behind one interface (``Engine.predict(model_input) -> Prediction``):
ONNX Runtime (the CPU default, or CUDA), PyTorch (the reference, CPU or CUDA) and TensorRT
(CUDA, when installed).

``load_engine(bundle, "auto")`` picks by what this host has, in this order, and logs the
choice with the reasons the others were passed over (event ``engine_selected``):

- on a GPU: TensorRT (fastest, compiled for the GPU) > ONNX Runtime with the CUDA execution
  provider > torch on CUDA (always there when CUDA is);
- on the CPU: ONNX Runtime (fused graph, about 1.5x torch eager) > torch.

The device ``"auto"`` means ``cuda`` when torch sees a GPU (and, for a runtime asked for by
name, when that runtime can use it), else ``cpu``. A runtime asked for by name that cannot
start here raises ``EngineUnavailable`` (an ``EngineError``) saying why.

Loading is slow (a session, a plan, a checkpoint) and engines hold memory, so a worker loads
each once: ``cached_engine`` keeps one engine per (bundle path and version, runtime, device,
options), thread-safe, and never loads the same one twice at the same time.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from engines.bundle import Bundle, load_bundle
from engines.runtimes.base import Engine, EngineError, EngineUnavailable

__all__ = [
    "AUTO_ORDER",
    "RUNTIMES",
    "Engine",
    "EngineError",
    "EngineUnavailable",
    "cached_engine",
    "clear_engine_cache",
    "load_engine",
    "resolve_device",
]

log = logging.getLogger(__name__)

RUNTIMES: Final = ("onnx", "torch", "tensorrt")
#: The order ``runtime="auto"`` tries, per device kind.
AUTO_ORDER: Final[Mapping[str, tuple[str, ...]]] = {
    "cuda": ("tensorrt", "onnx", "torch"),
    "cpu": ("onnx", "torch"),
}


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; anything else as given."""
    device = device.strip().lower()
    if device == "auto":
        return "cuda" if _cuda_available() else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise EngineError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    return device


def _construct(runtime: str, bundle: Bundle, device: str, options: Mapping[str, Any]) -> Engine:
    if runtime == "onnx":
        from engines.runtimes.onnx import OnnxEngine

        return OnnxEngine(bundle, device=device, **options)
    if runtime == "torch":
        from engines.runtimes.torch import TorchEngine

        return TorchEngine(bundle, device=device, **options)
    if runtime == "tensorrt":
        from engines.runtimes.tensorrt import TensorRTEngine

        return TensorRTEngine(bundle, device=device, **options)
    raise EngineError(f"unknown runtime {runtime!r}; expected auto or one of {RUNTIMES}")


def _precheck(runtime: str, device: str) -> str | None:
    """Why ``runtime`` cannot run on ``device`` here, found cheaply (None: try it)."""
    if runtime == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            return "tensorrt is not installed"
        if not device.startswith("cuda"):
            return "TensorRT needs a CUDA device"
    if device.startswith("cuda") and not _cuda_available():
        return "CUDA is not available"
    if runtime == "onnx" and device.startswith("cuda"):
        import onnxruntime as ort  # type: ignore[import-untyped]

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CUDAExecutionProvider"
    return None


def load_engine(
    bundle: Bundle | str | Path,
    runtime: str = "auto",
    *,
    device: str = "auto",
    **options: Any,
) -> Engine:
    """The engine for ``runtime`` (``auto``, ``onnx``, ``torch`` or ``tensorrt``) on ``device``
    (``auto``, ``cpu``, ``cuda`` or ``cuda:N``). ``options`` go to the engine's constructor
    (``threads`` for onnx, ``precision`` for torch and tensorrt, ``cache_dir`` for tensorrt);
    with ``auto`` they go only to the runtime that accepts them. Loads every time: a worker
    should use ``cached_engine``."""
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    dev = resolve_device(device)
    requested_device = device.strip().lower()
    if runtime != "auto":
        if runtime not in RUNTIMES:
            raise EngineError(f"unknown runtime {runtime!r}; expected auto or one of {RUNTIMES}")
        unknown = set(options) - _OPTION_OWNERS[runtime]
        if unknown:
            raise EngineError(f"runtime {runtime} takes no options {sorted(unknown)}")
        reason = _precheck(runtime, dev)
        because = "asked for by name"
        if reason is not None and requested_device == "auto" and dev != "cpu":
            # e.g. onnx on a GPU host whose onnxruntime has no CUDA provider: its CPU is fine
            because, dev = f"asked for by name; on cpu because {reason}", "cpu"
            reason = _precheck(runtime, dev)
        if reason is not None:
            raise EngineUnavailable(f"runtime {runtime} on {dev}: {reason}")
        engine = _construct(runtime, b, dev, options)
        engine.selected_because = because
        _log_choice(engine, requested_device, {})
        return engine

    skipped: dict[str, str] = {}
    kind = "cuda" if dev.startswith("cuda") else "cpu"
    for candidate in AUTO_ORDER[kind]:
        reason = _precheck(candidate, dev)
        if reason is None:
            try:
                engine = _construct(candidate, b, dev, _options_for(candidate, options))
            except EngineUnavailable as e:
                reason = str(e)
            except EngineError as e:
                # Installed but broken for this bundle (a plan that does not build, a provider
                # that fails): serve with the next runtime, and say so loudly.
                reason = f"failed: {e}"
                log.error(
                    "engine_failed",
                    extra={"fields": {"engine": candidate, "device": dev, "error": str(e)}},
                )
            else:
                first = candidate == AUTO_ORDER[kind][0]
                engine.selected_because = (
                    f"auto on {kind}: first choice"
                    if first
                    else f"auto on {kind}: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())
                )
                _log_choice(engine, requested_device, skipped)
                return engine
        skipped[candidate] = reason
    raise EngineUnavailable(f"no runtime can serve on {dev}: {skipped}")


_OPTION_OWNERS: Final[Mapping[str, frozenset[str]]] = {
    "onnx": frozenset({"threads", "providers"}),
    "torch": frozenset({"precision", "bf16"}),
    "tensorrt": frozenset({"precision", "cache_dir", "workspace_bytes"}),
}


def _options_for(runtime: str, options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(options) - set().union(*_OPTION_OWNERS.values())
    if unknown:
        raise EngineError(f"unknown engine options {sorted(unknown)}")
    out = {k: v for k, v in options.items() if k in _OPTION_OWNERS[runtime]}
    if runtime == "torch" and out.get("precision") == "auto":
        out["precision"] = "fp32"
    return out


def _log_choice(engine: Engine, requested_device: str, skipped: Mapping[str, str]) -> None:
    log.info(
        "engine_selected",
        extra={
            "fields": {
                **engine.describe(),
                "requested_device": requested_device,
                "reason": engine.selected_because,
                "skipped": dict(skipped),
            }
        },
    )


# ---------------------------------------------------------------------------------------------
# One engine per process and key


_cache: dict[tuple[Any, ...], Engine] = {}
_cache_lock = threading.Lock()
_key_locks: dict[tuple[Any, ...], threading.Lock] = {}


def _cache_key(b: Bundle, runtime: str, device: str, options: Mapping[str, Any]) -> tuple[Any, ...]:
    frozen = tuple(sorted((k, repr(v)) for k, v in options.items()))
    return (str(b.path), b.name, b.version, b.manifest["sha256"]["onnx"], runtime, device, frozen)


def cached_engine(
    bundle: Bundle | str | Path,
    runtime: str = "auto",
    device: str = "auto",
    *,
    loader: Callable[..., Engine] = load_engine,
    **options: Any,
) -> Engine:
    """``load_engine`` once per process for each (bundle path + version, runtime, device,
    options); later calls return the same engine. Thread-safe: concurrent first calls for one
    key load it once, different keys load in parallel. A bundle replaced in place with a new
    version is a new key (the old engine stays until ``clear_engine_cache``)."""
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    key = _cache_key(b, runtime, resolve_device(device), options)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            return hit
        key_lock = _key_locks.setdefault(key, threading.Lock())
    with key_lock:
        with _cache_lock:
            hit = _cache.get(key)
        if hit is not None:
            return hit
        engine = loader(b, runtime, device=device, **options)
        with _cache_lock:
            _cache[key] = engine
        return engine


def clear_engine_cache() -> None:
    """Close and forget every cached engine (tests, or a worker switching bundles)."""
    with _cache_lock:
        engines = list(_cache.values())
        _cache.clear()
        _key_locks.clear()
    for engine in engines:
        engine.close()
