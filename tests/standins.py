"""Light stand-ins for engines.data phantoms and findings: the attributes reports, the CT-RATE
writer and the manifest read, without the cost of rendering a phantom."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass
class StandInFinding:
    label: str
    label_index: int
    side: str | None
    lobe: str | None
    size_mm: float
    center_voxel: tuple[int, int, int]
    z_extent: tuple[int, int]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StandInPhantom:
    hu: npt.NDArray[np.float32]
    spacing: tuple[float, float, float]
    affine: npt.NDArray[np.float64]
    findings: list[StandInFinding]
    labels: npt.NDArray[np.int8]
    patient: dict[str, Any]
