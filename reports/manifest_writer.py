"""The training manifest, written: rows of the node's export as JSON Lines (DESIGN §3).

The reader and the schema's definition live in ``engines.manifest`` (version 1); ``reports`` may
not import ``engines`` (DESIGN §2: the libraries never import each other), so the fields are
written here directly and checked as strictly as the reader checks them, so that a bad row
fails at export, where its cause is known, and not weeks later when training opens the file.
Version 1 fields: ``manifest_version``, ``volume_id``, ``volume_path`` (relative to the
manifest's directory), ``volume_format`` (``npz`` or ``ctrate-nifti``), ``spacing`` (z, y, x
mm), ``affine`` (4x4 index (z, y, x, 1) -> LPS mm, or null), ``rescale`` ([slope, intercept]
or null), ``geometry_source``, ``report``, ``labels`` (18 of 1, 0, -1 in the order of DESIGN
§5), ``snippets`` (``{text, z_mm[, sop_instance_uid][, label]}``), and the optional ``split``
and ``source``. A test reads this module's output with ``engines.manifest.read_manifest``.

Pure: values in, text out; the caller decides where and how durably the bytes go.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "MANIFEST_VERSION",
    "N_LABELS",
    "UNKNOWN_LABELS",
    "VOLUME_FORMATS",
    "ManifestEntry",
    "ManifestWriteError",
    "SnippetEntry",
    "manifest_line",
    "manifest_text",
]

MANIFEST_VERSION: Final = 1
N_LABELS: Final = 18
UNKNOWN_LABELS: Final = (-1,) * N_LABELS
VOLUME_FORMATS: Final = ("npz", "ctrate-nifti")


class ManifestWriteError(ValueError):
    """A row the training reader would refuse; says which field."""


def _finite(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ManifestWriteError(f"{what} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SnippetEntry:
    """A report clause and the patient z (LPS mm) of the slice it cites."""

    text: str
    z_mm: float
    sop_instance_uid: str | None = None
    label: str | None = None

    def to_json(self) -> dict[str, Any]:
        if not self.text.strip():
            raise ManifestWriteError("snippet text must not be empty")
        out: dict[str, Any] = {"text": self.text, "z_mm": _finite(self.z_mm, "snippet z_mm")}
        if self.sop_instance_uid is not None:
            out["sop_instance_uid"] = self.sop_instance_uid
        if self.label is not None:
            out["label"] = self.label
        return out


@dataclass(frozen=True)
class ManifestEntry:
    """One volume: where its pixels are, their geometry, its report and its snippets."""

    volume_id: str
    volume_path: str
    volume_format: str
    spacing: Sequence[float]
    report: str
    labels: Sequence[int] = UNKNOWN_LABELS
    snippets: Sequence[SnippetEntry] = field(default_factory=tuple)
    affine: Sequence[Sequence[float]] | None = None
    rescale: Sequence[float] | None = None
    geometry_source: str = ""
    split: str | None = None
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        """The row as the version-1 reader expects it; raises ManifestWriteError if it would
        refuse it."""
        for name in ("volume_id", "volume_path"):
            if not getattr(self, name):
                raise ManifestWriteError(f"{name} must be a non-empty string")
        if self.volume_format not in VOLUME_FORMATS:
            raise ManifestWriteError(
                f"volume_format must be one of {VOLUME_FORMATS}, got {self.volume_format!r}"
            )
        spacing = [_finite(s, "spacing") for s in self.spacing]
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ManifestWriteError(f"spacing must be 3 positive numbers, got {spacing}")
        labels = [int(v) for v in self.labels]
        if len(labels) != N_LABELS or any(v not in (-1, 0, 1) for v in labels):
            raise ManifestWriteError(f"labels must be {N_LABELS} of 1, 0 or -1, got {labels}")
        out: dict[str, Any] = {
            "manifest_version": MANIFEST_VERSION,
            "volume_id": self.volume_id,
            "volume_path": self.volume_path,
            "volume_format": self.volume_format,
            "spacing": spacing,
            "affine": None if self.affine is None else _affine(self.affine),
            "rescale": None if self.rescale is None else _rescale(self.rescale),
            "geometry_source": self.geometry_source,
            "report": self.report,
            "labels": labels,
            "snippets": [s.to_json() for s in self.snippets],
        }
        if self.split is not None:
            out["split"] = self.split
        if self.source:
            out["source"] = self.source
        return out


def _affine(a: Sequence[Sequence[float]]) -> list[list[float]]:
    rows = [[_finite(v, "affine") for v in row] for row in a]
    if len(rows) != 4 or any(len(r) != 4 for r in rows) or rows[3] != [0.0, 0.0, 0.0, 1.0]:
        raise ManifestWriteError(f"affine must be 4x4 with last row 0 0 0 1, got {rows}")
    m = [r[:3] for r in rows[:3]]
    det = (
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    )
    if abs(det) < 1e-9:
        raise ManifestWriteError(f"affine must be invertible, got {rows}")
    return rows


def _rescale(r: Sequence[float]) -> list[float]:
    values = [_finite(v, "rescale") for v in r]
    if len(values) != 2 or values[0] == 0:
        raise ManifestWriteError(f"rescale must be [slope != 0, intercept], got {values}")
    return values


def manifest_line(entry: ManifestEntry) -> str:
    """One JSON Lines row, newline included (UTF-8 text, no NaN)."""
    return json.dumps(entry.to_json(), ensure_ascii=False, allow_nan=False) + "\n"


def manifest_text(entries: Iterable[ManifestEntry]) -> str:
    """A whole manifest; files written by this can be concatenated."""
    return "".join(manifest_line(e) for e in entries)
