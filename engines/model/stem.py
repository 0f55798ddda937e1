"""The fixed front of the tiny CNN backbone: HU re-windowing and cell averaging.

It has no weights, so its output for a volume never changes during training. At the tiny
preset's scale it is also the most expensive part of a training step on a CPU (twelve
full-resolution channels for every voxel, ~40% of the step), which is why training may compute
it once per volume and cache it (``engines.datasets.StemCache``) while serving and the ONNX
graph compute it from the model-space volume every time. Both paths run this one function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engines.presets import CNNBackboneConfig, IntTriple, ModelSpaceConfig, ViTBackboneConfig

__all__ = ["HistogramStem"]


@dataclass(frozen=True)
class HistogramStem:
    """Channel 0 is the model-space value; channel k > 0 is ``clip(x * scale_k + shift_k, 0,
    1)``, the value re-windowed to the k-th HU window; all are averaged over ``pool`` cells.
    With adjacent narrow windows each cell's channels are a soft cumulative HU histogram."""

    scale: tuple[float, ...]
    shift: tuple[float, ...]
    pool: IntTriple
    # Channels (indices into ``scale``) whose cell maximum, then those whose cell minimum,
    # follow the cell means.
    max_channels: tuple[int, ...] = ()
    min_channels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for kind, chans in (("max", self.max_channels), ("min", self.min_channels)):
            bad = [c for c in chans if not 0 <= c < len(self.scale)]
            if bad:
                raise ValueError(
                    f"{kind} channels {bad} are not among the {len(self.scale)} channels"
                )

    @classmethod
    def from_config(cls, cfg: CNNBackboneConfig, space: ModelSpaceConfig) -> HistogramStem:
        lo, hi = space.hu_window
        scale, shift = [1.0], [0.0]
        for wlo, whi in cfg.input_windows:
            if not whi > wlo:
                raise ValueError(f"input window {(wlo, whi)} must be (low, high), high > low")
            scale.append((hi - lo) / (whi - wlo))
            shift.append((lo - wlo) / (whi - wlo))
        # Window k is channel k + 1 (channel 0 is the model-space value itself).
        max_channels = tuple(k + 1 for k in cfg.stem_max_windows)
        min_channels = tuple(k + 1 for k in cfg.stem_min_windows)
        return cls(tuple(scale), tuple(shift), cfg.stem_pool, max_channels, min_channels)

    @classmethod
    def of_preset(
        cls, backbone: CNNBackboneConfig | ViTBackboneConfig, space: ModelSpaceConfig
    ) -> HistogramStem | None:
        """The stem of a backbone, or None where there is nothing worth caching (a ViT, or a
        CNN fed the plain volume)."""
        if not isinstance(backbone, CNNBackboneConfig):
            return None
        stem = cls.from_config(backbone, space)
        return None if stem.is_identity else stem

    @property
    def channels(self) -> int:
        return len(self.scale) + len(self.max_channels) + len(self.min_channels)

    @property
    def is_identity(self) -> bool:
        return self.channels == 1 and self.pool == (1, 1, 1)

    def output_shape(self, shape: IntTriple) -> tuple[int, int, int, int]:
        """``(C, z, y, x)`` for a ``[.., 1, *shape]`` input; each axis must divide by the pool."""
        if any(n % p for n, p in zip(shape, self.pool, strict=True)):
            raise ValueError(f"shape {shape} does not divide into stem cells {self.pool}")
        z, y, x = (n // p for n, p in zip(shape, self.pool, strict=True))
        return (self.channels, z, y, x)

    def weights(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)`` as ``[1, C, 1, 1, 1]`` tensors (the backbone keeps them as
        buffers so that they follow the module's device)."""
        s = torch.tensor(self.scale, device=device).view(1, -1, 1, 1, 1)
        b = torch.tensor(self.shift, device=device).view(1, -1, 1, 1, 1)
        return s, b

    def apply(
        self,
        x: torch.Tensor,
        scale: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B, 1, Z, Y, X]`` in [0, 1] -> ``[B, C, Z/pz, Y/py, X/px]``: the cell means of
        every channel, then the cell maxima of ``max_channels``, then the cell minima of
        ``min_channels``."""
        if len(self.scale) > 1:
            if scale is None or shift is None:
                scale, shift = self.weights(x.device)
            # One fused pass and an in-place clip (the input needs no gradient): at full
            # resolution the naive form costs more than the convolutions after it.
            x = torch.addcmul(shift, x, scale).clamp_(0.0, 1.0)
        extremes = []
        if self.max_channels:
            extremes.append(F.max_pool3d(_channels(x, self.max_channels), self.pool))
        if self.min_channels:
            extremes.append(-F.max_pool3d(-_channels(x, self.min_channels), self.pool))
        if self.pool != (1, 1, 1):
            x = F.avg_pool3d(x, kernel_size=self.pool)
        return torch.cat([x, *extremes], dim=1) if extremes else x


def _channels(x: torch.Tensor, chans: tuple[int, ...]) -> torch.Tensor:
    """``x[:, chans]``, as a view where the channels are contiguous (a gather copies every
    voxel of them)."""
    c0, c1 = chans[0], chans[-1] + 1
    return x[:, c0:c1] if chans == tuple(range(c0, c1)) else x[:, list(chans)]
