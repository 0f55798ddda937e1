"""ONNX Runtime engine: the default for serving (CPU out of the box, CUDA when asked).

The bundle's graph has the prompt embeddings baked in, so one ``session.run`` gives
probabilities, depth distributions and embeddings; no text tower, and no torch model, is
loaded. The session is created once per engine (graph optimisation takes longer than a run).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from engines.bundle import Bundle
from engines.model.radfinder import Prediction
from engines.runtimes.base import Engine, EngineError

__all__ = ["OnnxEngine"]

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


class OnnxEngine(Engine):
    """``OnnxEngine(bundle, device="cpu")``; ``providers`` overrides the execution providers,
    ``threads`` the intra-op thread count (None: ONNX Runtime's default)."""

    runtime: ClassVar[str] = "onnx"

    def __init__(
        self,
        bundle: Bundle | str | Path,
        *,
        device: str = "cpu",
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        super().__init__(bundle)
        import onnxruntime as ort  # type: ignore[import-untyped]

        if providers is None:
            if device not in _PROVIDERS:
                raise EngineError(f"device must be one of {sorted(_PROVIDERS)}, got {device!r}")
            providers = _PROVIDERS[device]
        available = set(ort.get_available_providers())
        chosen = [p for p in providers if p in available]
        if not chosen:
            raise EngineError(f"none of {list(providers)} is available (have {sorted(available)})")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        self.session: Any = ort.InferenceSession(
            str(self.bundle.onnx_path), sess_options=options, providers=chosen
        )
        self.providers = list(self.session.get_providers())
        names = [o.name for o in self.session.get_outputs()]
        expected = ["image_embedding", "depth_embeddings", "probabilities", "depth_distribution"]
        if names != expected:
            raise EngineError(f"{self.bundle.onnx_path.name}: outputs {names}, need {expected}")

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
