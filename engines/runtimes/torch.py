"""PyTorch engine: the reference the other runtimes are checked against, on CPU or CUDA.

It rebuilds the model from the bundle's weights-only checkpoint without a text tower and
scores the bundle's stored prompt embeddings, i.e. exactly what was exported to ONNX; the
ONNX engine must agree with it to 1e-4.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from engines.bundle import Bundle
from engines.model.radfinder import Prediction, PromptEmbeddings
from engines.runtimes.base import Engine, EngineError
from engines.training.checkpoint import load_model

__all__ = ["TorchEngine"]


class TorchEngine(Engine):
    """``TorchEngine(bundle, device="cpu" | "cuda" | "cuda:N")``; ``bf16`` runs the vision tower
    under bfloat16 autocast on CUDA (faster, not bit-comparable with the ONNX graph)."""

    runtime: ClassVar[str] = "torch"

    def __init__(
        self, bundle: Bundle | str | Path, *, device: str = "cpu", bf16: bool = False
    ) -> None:
        super().__init__(bundle)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EngineError("CUDA was asked for but is not available")
        model, preset, _ = load_model(self.bundle.checkpoint_path, load_text=False, device=device)
        if preset != self.bundle.preset:
            raise EngineError("the bundle's checkpoint was trained with another preset")
        self.model = model.eval()
        p = self.bundle.prompt_embeddings()
        self.prompts = PromptEmbeddings(p.classify.to(self.device), p.locate.to(self.device))
        self.bf16 = bool(bf16 and self.device.type == "cuda")

    @torch.no_grad()
    def _run(self, volume: torch.Tensor, depth_valid: torch.Tensor) -> Prediction:
        v = volume.to(self.device)
        m = depth_valid.to(self.device)
        if self.bf16:
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                pred = self.model.predict(v, m, self.prompts)
        else:
            pred = self.model.predict(v, m, self.prompts)
        return Prediction(
            probabilities=pred.probabilities.float().cpu(),
            depth_distribution=pred.depth_distribution.float().cpu(),
            image_embedding=pred.image_embedding.float().cpu(),
            depth_embeddings=pred.depth_embeddings.float().cpu(),
            depth_valid=pred.depth_valid.cpu(),
        )

    def close(self) -> None:
        if self.device.type == "cuda":
            del self.model
            torch.cuda.empty_cache()
