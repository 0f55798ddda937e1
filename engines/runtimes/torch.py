"""PyTorch engine: the reference the other runtimes are checked against, on CPU or CUDA.

It rebuilds the model from the bundle's weights-only checkpoint without a text tower and
scores the bundle's stored prompt embeddings, i.e. exactly what was exported to ONNX; the
ONNX engine must agree with it to 1e-4. ``precision="bf16"`` or ``"fp16"`` runs the forward
pass under autocast on CUDA: faster on tensor cores, not bit-comparable with the ONNX graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch

from engines.bundle import Bundle
from engines.model.radfinder import Prediction, PromptEmbeddings
from engines.runtimes.base import Engine, EngineError, EngineUnavailable
from engines.training.checkpoint import load_model

__all__ = ["TorchEngine", "resolve_torch_device"]

Precision = Literal["fp32", "bf16", "fp16"]
_AUTOCAST: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_torch_device(device: str) -> torch.device:
    """``"cuda"`` -> ``cuda:<current>``, so logs and metrics name the GPU actually used."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineUnavailable(f"{device} was asked for but CUDA is not available")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise EngineUnavailable(f"{device}: only {torch.cuda.device_count()} GPU(s) here")
        return torch.device("cuda", index)
    if dev.type != "cpu":
        raise EngineError(f"device must be cpu or cuda[:N], got {device!r}")
    return dev


class TorchEngine(Engine):
    """``TorchEngine(bundle, device="cpu" | "cuda" | "cuda:N", precision="fp32")``; ``bf16=True``
    is the older spelling of ``precision="bf16"``. Reduced precision applies on CUDA only."""

    runtime: ClassVar[str] = "torch"

    def __init__(
        self,
        bundle: Bundle | str | Path,
        *,
        device: str = "cpu",
        precision: Precision = "fp32",
        bf16: bool = False,
    ) -> None:
        super().__init__(bundle)
        self.torch_device = resolve_torch_device(device)
        self.device = str(self.torch_device)
        if precision not in ("fp32", *_AUTOCAST):
            raise EngineError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        if bf16:
            precision = "bf16"
        self.precision: Precision = precision if self.torch_device.type == "cuda" else "fp32"
        if self.torch_device.type == "cuda":
            # Model-space shapes never change, so cuDNN's autotuner pays once and wins after.
            torch.backends.cudnn.benchmark = True
        model, preset, _ = load_model(
            self.bundle.checkpoint_path, load_text=False, device=self.torch_device
        )
        if preset != self.bundle.preset:
            raise EngineError("the bundle's checkpoint was trained with another preset")
        self.model = model.eval()
        p = self.bundle.prompt_embeddings()
        self.prompts = PromptEmbeddings(
            p.classify.to(self.torch_device), p.locate.to(self.torch_device)
        )

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @torch.inference_mode()
    def _run(self, volume: torch.Tensor, depth_valid: torch.Tensor) -> Prediction:
        v = volume.to(self.torch_device, non_blocking=True)
        m = depth_valid.to(self.torch_device, non_blocking=True)
        if self.precision in _AUTOCAST:
            with torch.autocast(device_type="cuda", dtype=_AUTOCAST[self.precision]):
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
        if self.torch_device.type == "cuda":
            del self.model
            torch.cuda.empty_cache()
