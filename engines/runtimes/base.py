"""The one serving interface: ``Engine.predict(model_input) -> Prediction``.

Every runtime (ONNX Runtime, PyTorch as the reference, TensorRT) is constructed once
from a bundle and then answers many volumes; none of them preprocesses on its own:
``Engine.prepare`` is ``engines.preprocess.to_model_space`` with the bundle's model space, the
same function training used, so a runtime cannot drift from the trained geometry. Inputs whose
shape is not the bundle's model space are refused instead of being silently resized.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy.typing as npt
import torch

from engines.bundle import Bundle, load_bundle
from engines.model.radfinder import Prediction
from engines.preprocess import ModelInput, to_model_space

__all__ = ["Engine", "EngineError", "EngineUnavailable"]


class EngineError(ValueError):
    """An input the engine cannot serve (wrong model space) or a runtime it cannot start."""


class EngineUnavailable(EngineError):
    """The runtime or device is not there on this host (not installed, no GPU): ``auto``
    selection moves on to the next runtime instead of failing."""


class Engine(ABC):
    """A bundle loaded into a runtime. Subclasses set ``runtime`` and implement ``_run``."""

    runtime: ClassVar[str] = "abstract"

    def __init__(self, bundle: Bundle | str | Path) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.space = self.bundle.preset.space
        #: Where it runs, as metrics and logs name it: "cpu" or "cuda:N".
        self.device: str = "cpu"
        #: Why ``load_engine`` chose this runtime (empty when it was asked for by name).
        self.selected_because: str = ""

    @property
    def labels(self) -> tuple[str, ...]:
        return self.bundle.label_names

    @property
    def name(self) -> str:
        return self.runtime

    @property
    def bundle_version(self) -> str:
        return self.bundle.version

    def describe(self) -> dict[str, str]:
        """Low-cardinality labels for metrics and job records: engine, device, bundle."""
        return {
            "engine": self.runtime,
            "device": self.device,
            "bundle": self.bundle.name,
            "bundle_version": self.bundle.version,
        }

    def prepare(
        self,
        hu: npt.ArrayLike | torch.Tensor,
        spacing: Sequence[float],
        affine: npt.ArrayLike | None = None,
    ) -> ModelInput:
        """A HU volume ``[z, y, x]`` in model space: the shared preprocessing, no augmentation."""
        return to_model_space(hu, spacing, affine, config=self.space)

    def predict(self, model_input: ModelInput) -> Prediction:
        """The DESIGN §3 Prediction for one preprocessed volume (batch dimension 1)."""
        image = model_input.image
        if tuple(image.shape) != (1, *self.space.shape):
            raise EngineError(
                f"input is {tuple(image.shape)}, the bundle's model space is "
                f"{(1, *self.space.shape)}: preprocess with Engine.prepare"
            )
        valid = model_input.depth_valid
        if tuple(valid.shape) != (self.space.n_depth_tokens,):
            raise EngineError(f"depth_valid must have {self.space.n_depth_tokens} entries")
        return self._run(image[None].to(torch.float32), valid[None].to(torch.bool))

    def predict_volume(
        self,
        hu: npt.ArrayLike | torch.Tensor,
        spacing: Sequence[float],
        affine: npt.ArrayLike | None = None,
    ) -> tuple[Prediction, ModelInput]:
        """Preprocess and predict; the ModelInput maps depth tokens back to slices."""
        mi = self.prepare(hu, spacing, affine)
        return self.predict(mi), mi

    @abstractmethod
    def _run(self, volume: torch.Tensor, depth_valid: torch.Tensor) -> Prediction:
        """``volume [1, 1, Z, Y, X]`` float32 and ``depth_valid [1, D]`` bool on the CPU."""

    def close(self) -> None:  # noqa: B027 - optional hook, most runtimes hold nothing
        """Release what the runtime holds (GPU memory, sessions)."""
