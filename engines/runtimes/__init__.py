"""Serving runtimes behind one interface (``Engine.predict(model_input) -> Prediction``):
ONNX Runtime (the default, CPU or CUDA) and PyTorch (the reference). TensorRT comes later."""

from __future__ import annotations

from pathlib import Path

from engines.bundle import Bundle
from engines.runtimes.base import Engine, EngineError

__all__ = ["RUNTIMES", "Engine", "EngineError", "load_engine"]

RUNTIMES = ("onnx", "torch")


def load_engine(
    bundle: Bundle | str | Path, runtime: str = "onnx", *, device: str = "cpu"
) -> Engine:
    """The engine for ``runtime`` on ``device``, loaded once; reuse it for every volume."""
    if runtime == "onnx":
        from engines.runtimes.onnx import OnnxEngine

        return OnnxEngine(bundle, device=device.split(":")[0])
    if runtime == "torch":
        from engines.runtimes.torch import TorchEngine

        return TorchEngine(bundle, device=device)
    raise EngineError(f"unknown runtime {runtime!r}; expected one of {RUNTIMES}")
