"""Findings from a prediction (DESIGN.md §3, "Findings"): pure, no I/O.

Per label: the probability, present or absent at the bundle's threshold, and for a present
finding its key slice: the mode of the label's depth distribution over valid depth tokens,
mapped through the model space to patient z (the centre of the token's data) and to the nearest
source slice, whose SOP Instance UID the volume recorded. The mode, not the mean, because a
finding cited on two separate levels has a bimodal distribution whose mean can fall between
them, on a slice that shows neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dicom_io.results import Code, FindingResult
from engines.bundle import BundleLabel
from engines.bundle import Code as BundleCode
from engines.model.radfinder import Prediction
from engines.preprocess import ModelInput, ModelSpace


class FindingsError(ValueError):
    """A prediction that does not fit its bundle or its volume."""


def _code(code: BundleCode) -> Code:
    return Code(value=code.value, scheme=code.scheme, meaning=code.meaning)


def key_token(distribution: np.ndarray, valid: np.ndarray) -> int:
    """The most likely valid depth token (ties: the lowest index, i.e. the most inferior)."""
    if not valid.any():
        raise FindingsError("no valid depth token: the volume lies entirely in padding")
    masked = np.where(valid, distribution, -np.inf)
    return int(np.argmax(masked))


def token_data_centre(space: ModelSpace, token: int) -> float:
    """Model z index at the centre of the token's data. A token at the edge of the scan is
    partly padding; its evidence comes from its data slices only, so its centre is taken there
    (the plain token centre could lie outside the scanned range)."""
    spt = space.slices_per_token
    lo, hi = space.valid[0]
    first, last = max(token * spt, lo), min((token + 1) * spt, hi) - 1
    if first > last:
        raise FindingsError(f"depth token {token} holds no data")
    return (first + last) / 2.0


def key_slice(
    space: ModelSpace, token: int, sop_instance_uids: Sequence[str]
) -> tuple[float, str | None]:
    """``(z_mm, SOP Instance UID)`` of a depth token. The UID is None when the model's depth
    axis is not the series' slice axis (a sagittal or coronal acquisition), where no single
    source slice holds the token."""
    kz = token_data_centre(space, token)
    z_mm = space.model_z_to_z_mm(kz)
    if space.axes[0] != 0:
        return z_mm, None
    index = space.model_z_to_source_slice(kz)
    if len(sop_instance_uids) != space.source_shape[0]:
        raise FindingsError(
            f"{len(sop_instance_uids)} slice UIDs for a volume of {space.source_shape[0]} slices"
        )
    return z_mm, sop_instance_uids[index]


def findings_from_prediction(
    prediction: Prediction,
    model_input: ModelInput,
    labels: Sequence[BundleLabel],
    sop_instance_uids: Sequence[str],
) -> list[FindingResult]:
    """One FindingResult per bundle label, in the bundle's label order."""
    probs = prediction.probabilities.detach().cpu().numpy().astype(np.float64)
    dist = prediction.depth_distribution.detach().cpu().numpy().astype(np.float64)
    valid = np.asarray(model_input.space.depth_valid, dtype=bool)
    if probs.shape != (1, len(labels)):
        raise FindingsError(f"probabilities {probs.shape}, expected (1, {len(labels)})")
    if dist.shape != (1, len(labels), valid.shape[0]):
        raise FindingsError(
            f"depth distribution {dist.shape}, expected (1, {len(labels)}, {valid.shape[0]})"
        )
    out: list[FindingResult] = []
    for j, label in enumerate(labels):
        p = float(np.clip(probs[0, j], 0.0, 1.0))
        if not np.isfinite(p):
            raise FindingsError(f"{label.name}: probability is not finite")
        present = p >= label.threshold
        z_mm: float | None = None
        uid: str | None = None
        if present:
            token = key_token(dist[0, j], valid)
            z_mm, uid = key_slice(model_input.space, token, sop_instance_uids)
        out.append(
            FindingResult(
                label=label.name,
                code=_code(label.code),
                probability=p,
                threshold=float(label.threshold),
                present=present,
                key_sop_instance_uid=uid,
                key_z_mm=z_mm,
                finding_site=_code(label.finding_site) if label.finding_site else None,
            )
        )
    return out


def findings_summary(findings: Sequence[FindingResult]) -> list[dict[str, Any]]:
    """JSON-able rows for the job record, the status and the demo table."""
    return [
        {
            "label": f.label,
            "code": f"{f.code.scheme}:{f.code.value}",
            "probability": f.probability,
            "threshold": f.threshold,
            "present": f.present,
            "key_sop_instance_uid": f.key_sop_instance_uid,
            "key_z_mm": f.key_z_mm,
        }
        for f in findings
    ]
