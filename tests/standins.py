"""Light stand-ins for engines.data phantoms and findings: the attributes reports, the CT-RATE
writer and the manifest read, without the cost of rendering a phantom."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from engines.data.reports import REPORT_LABELS, Report, write_report


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


def random_report(seed: int, lobes: Sequence[str | None]) -> Report:
    """A generated report: 1-6 stand-in findings anywhere in a 60-480 slice series, English or
    German, series numbered 2..301, slices numbered from the bottom or the top.

    ``lobes`` is the list lobes are drawn from; the mining tests and the mining benchmark draw
    from different lists, and each keeps its own so that its seeds keep giving the same reports.
    """
    rng = random.Random(seed)
    n = rng.choice((60, 120, 300, 480))
    findings = []
    for _ in range(rng.randint(1, 6)):
        i = rng.randrange(len(REPORT_LABELS))
        first = rng.randrange(n)
        last = min(n - 1, first + rng.choice((0, 2, 5, 20)))
        findings.append(
            StandInFinding(
                label=REPORT_LABELS[i],
                label_index=i,
                side=rng.choice(("left", "right", "bilateral", None)),
                lobe=rng.choice(lobes),
                size_mm=rng.choice((0.0, 2.5, 6.0, 14.0, 23.0)),
                center_voxel=(rng.randint(first, last), 5, 5),
                z_extent=(first, last),
            )
        )
    from_top = rng.random() < 0.5
    return write_report(
        findings,
        seed=seed,
        n_slices=n,
        series_number=rng.choice((2, 3, 4, 201, 301)),
        instance_number_of_z=(lambda z: n - z) if from_top else None,
        language=rng.choice(("en", "de")),
    )
