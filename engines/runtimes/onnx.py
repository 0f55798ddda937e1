"""ONNX Runtime engine: the default for serving (CPU out of the box, CUDA when asked).

The bundle's graph has the prompt embeddings baked in, so one ``session.run`` gives
probabilities, depth distributions and embeddings; no text tower, and no torch model, is
loaded. The session is created once per engine (graph optimisation takes longer than a run).

Session options are chosen for one volume at a time on a shared host: every graph
optimisation (constant folding, fusions, layout transforms), one inter-op thread with
sequential execution (the graph is a chain; parallel branches only fight the intra-op pool
for cores), memory-pattern planning and the CPU arena (shapes are static, so the second run
reuses the first run's allocations). ``threads`` sets the intra-op pool; ``None`` leaves ONNX
Runtime's default (one per physical core).

On CUDA the engine refuses to start when the CUDA execution provider is missing or fails to
initialise, instead of quietly running every node on the CPU fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from engines.bundle import Bundle
from engines.model.radfinder import Prediction
from engines.runtimes.base import Engine, EngineError, EngineUnavailable

__all__ = ["OUTPUTS", "OnnxEngine", "session_options"]

OUTPUTS = ("image_embedding", "depth_embeddings", "probabilities", "depth_distribution")
_CUDA_EP = "CUDAExecutionProvider"
_CPU_EP = "CPUExecutionProvider"


def session_options(threads: int | None = None) -> Any:
    """The SessionOptions every engine and the benchmark use (see the module docstring)."""
    import onnxruntime as ort  # type: ignore[import-untyped]

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    options.enable_mem_pattern = True
    options.enable_cpu_mem_arena = True
    if threads is not None:
        if threads < 1:
            raise EngineError(f"threads must be >= 1, got {threads}")
        options.intra_op_num_threads = int(threads)
    return options


def _providers(device: str) -> tuple[str, list[Any]]:
    """``(device label, providers)`` for ``cpu``, ``cuda`` or ``cuda:N``."""
    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return "cpu", [_CPU_EP]
    if kind == "cuda":
        if index and not index.isdigit():
            raise EngineError(f"bad CUDA device {device!r}")
        n = int(index or 0)
        return f"cuda:{n}", [(_CUDA_EP, {"device_id": n}), _CPU_EP]
    raise EngineError(f"device must be cpu or cuda[:N], got {device!r}")


class OnnxEngine(Engine):
    """``OnnxEngine(bundle, device="cpu" | "cuda" | "cuda:N")``; ``providers`` overrides the
    execution providers, ``threads`` the intra-op thread count (None: ONNX Runtime's default)."""

    runtime: ClassVar[str] = "onnx"

    def __init__(
        self,
        bundle: Bundle | str | Path,
        *,
        device: str = "cpu",
        providers: Sequence[Any] | None = None,
        threads: int | None = None,
    ) -> None:
        super().__init__(bundle)
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - a dependency; only broken installs
            raise EngineUnavailable(f"onnxruntime does not import: {e}") from e

        label, wanted = _providers(device)
        if providers is not None:
            wanted = list(providers)
        available = set(ort.get_available_providers())
        names = [p[0] if isinstance(p, tuple) else p for p in wanted]
        if label.startswith("cuda") and _CUDA_EP not in available:
            raise EngineUnavailable(
                f"{label}: this onnxruntime has no {_CUDA_EP} (have {sorted(available)}); "
                "install onnxruntime-gpu"
            )
        chosen = [p for p, n in zip(wanted, names, strict=True) if n in available]
        if not chosen:
            raise EngineUnavailable(f"none of {names} is available (have {sorted(available)})")
        self.session: Any = ort.InferenceSession(
            str(self.bundle.onnx_path), sess_options=session_options(threads), providers=chosen
        )
        self.providers = list(self.session.get_providers())
        if label.startswith("cuda") and self.providers[0] != _CUDA_EP:
            # ORT falls back to the CPU with only a warning when CUDA/cuDNN libraries are missing.
            raise EngineUnavailable(f"{_CUDA_EP} did not initialise (running {self.providers})")
        self.device = label
        self.threads = threads
        names_out = [o.name for o in self.session.get_outputs()]
        if names_out != list(OUTPUTS):
            raise EngineError(
                f"{self.bundle.onnx_path.name}: outputs {names_out}, need {list(OUTPUTS)}"
            )

    def _run(self, volume: torch.Tensor, depth_valid: torch.Tensor) -> Prediction:
        feeds = {
            "volume": np.ascontiguousarray(volume.numpy(), dtype=np.float32),
            "depth_valid": np.ascontiguousarray(depth_valid.numpy(), dtype=np.bool_),
        }
        image, depth, prob, dist = self.session.run(None, feeds)
        return Prediction(
            probabilities=torch.from_numpy(np.asarray(prob)),
            depth_distribution=torch.from_numpy(np.asarray(dist)),
            image_embedding=torch.from_numpy(np.asarray(image)),
            depth_embeddings=torch.from_numpy(np.asarray(depth)),
            depth_valid=depth_valid.clone(),
        )

    def close(self) -> None:
        self.session = None
