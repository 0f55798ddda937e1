"""Training manifest (DESIGN §3): what the node's nightly export writes and training reads.

One JSON object per line (JSON Lines), one line per volume. Every line carries
``manifest_version`` so files can be concatenated and a reader can refuse what it does not
understand; unknown keys are errors, so a typo in a writer fails loudly instead of silently
dropping data. Version 1 fields (``ManifestRow``):

==================  =============================================================================
manifest_version    1
volume_id           unique id of the volume (Series Instance UID, CT-RATE VolumeName, ...)
volume_path         the pixel file; a relative path is relative to the manifest's directory
volume_format       ``npz``: key ``volume`` holds the stored values ``[z, y, x]``;
                    ``ctrate-nifti``: NIfTI holding ``[row, column, slice]`` as CT-RATE does
spacing             ``[z, y, x]`` mm of the ``[z, y, x]`` array
affine              4x4, array index ``(z, y, x, 1)`` -> LPS mm, or null (then slice 0 is
                    taken as the most inferior, origin 0)
rescale             ``[slope, intercept]`` turning stored values into HU, or null if they are HU
geometry_source     where spacing and affine came from (``dicom``, ``nifti-header``, ...)
report              report text (findings and impression)
labels              18 ints in ``engines.data.labels.LABELS`` order: 1, 0, or -1 (unknown)
snippets            list of ``{text, z_mm, sop_instance_uid, label}``: a report sentence and the
                    patient z (LPS, mm, the cited slice's centre) it refers to; the SOP
                    Instance UID of the cited slice and the label are optional
split, source       optional provenance (``train``/``valid``; ``node``, ``ctrate``)
==================  =============================================================================

``read_ctrate`` turns CT-RATE's layout into the same rows, so training has one dataset code.
It reuses ``engines.data.ctrate`` for names and pixels. CT-RATE's ``*_fixed`` volumes already
hold HU (and some NIfTI headers carry their own scaling, which nibabel applies): for those the
row's ``rescale`` is null, so the metadata's slope and intercept are never applied twice.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple, cast

import nibabel as nib
import numpy as np
import numpy.typing as npt

from engines.data import ctrate
from engines.data.labels import LABELS

__all__ = [
    "MANIFEST_VERSION",
    "VOLUME_FORMATS",
    "LoadedVolume",
    "ManifestError",
    "ManifestRow",
    "Snippet",
    "load_volume",
    "read_ctrate",
    "read_manifest",
    "save_npz_volume",
    "write_manifest",
]

MANIFEST_VERSION: Final = 1
VOLUME_FORMATS: Final = ("npz", "ctrate-nifti")
_ROW_KEYS: Final = frozenset(
    {
        "manifest_version",
        "volume_id",
        "volume_path",
        "volume_format",
        "spacing",
        "affine",
        "rescale",
        "geometry_source",
        "report",
        "labels",
        "snippets",
        "split",
        "source",
    }
)
_REQUIRED: Final = frozenset(
    {"manifest_version", "volume_id", "volume_path", "volume_format", "spacing", "report", "labels"}
)
_SNIPPET_KEYS: Final = frozenset({"text", "z_mm", "sop_instance_uid", "label"})
Affine = tuple[tuple[float, float, float, float], ...]


class ManifestError(ValueError):
    """A manifest row that training must not read; says which field and, from files, where."""


def _finite(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        raise ManifestError(f"{what} must be a finite number, got {x!r}")
    return float(x)


@dataclass(frozen=True)
class Snippet:
    """A report sentence and the patient z (LPS, mm) of the slice it cites."""

    text: str
    z_mm: float
    sop_instance_uid: str | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise ManifestError(f"snippet text must be a non-empty string, got {self.text!r}")
        _finite(self.z_mm, "snippet z_mm")
        if self.sop_instance_uid is not None and not isinstance(self.sop_instance_uid, str):
            raise ManifestError(f"sop_instance_uid must be a string, got {self.sop_instance_uid!r}")
        if self.label is not None and self.label not in LABELS:
            raise ManifestError(f"snippet label {self.label!r} is not one of the 18 labels")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"text": self.text, "z_mm": self.z_mm}
        if self.sop_instance_uid is not None:
            out["sop_instance_uid"] = self.sop_instance_uid
        if self.label is not None:
            out["label"] = self.label
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Snippet:
        if not isinstance(d, Mapping):
            raise ManifestError(f"a snippet must be an object, got {d!r}")
        unknown = set(d) - _SNIPPET_KEYS
        if unknown:
            raise ManifestError(f"unknown snippet keys {sorted(unknown)}")
        if "text" not in d or "z_mm" not in d:
            raise ManifestError(f"a snippet needs text and z_mm, got keys {sorted(d)}")
        return cls(
            text=d["text"],
            z_mm=_finite(d["z_mm"], "snippet z_mm"),
            sop_instance_uid=d.get("sop_instance_uid"),
            label=d.get("label"),
        )


@dataclass(frozen=True)
class ManifestRow:
    """One volume of the training manifest (see the module docstring for each field)."""

    volume_id: str
    volume_path: str
    volume_format: str
    spacing: tuple[float, float, float]
    report: str
    labels: tuple[int, ...]
    snippets: tuple[Snippet, ...] = ()
    affine: Affine | None = None
    rescale: tuple[float, float] | None = None
    geometry_source: str = ""
    split: str | None = None
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("volume_id", "volume_path"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                raise ManifestError(f"{name} must be a non-empty string, got {v!r}")
        if self.volume_format not in VOLUME_FORMATS:
            raise ManifestError(
                f"volume_format must be one of {VOLUME_FORMATS}, got {self.volume_format!r}"
            )
        if len(self.spacing) != 3 or min(_finite(s, "spacing") for s in self.spacing) <= 0:
            raise ManifestError(f"spacing must be 3 positive numbers (z, y, x), got {self.spacing}")
        if not isinstance(self.report, str):
            raise ManifestError(f"report must be a string, got {type(self.report).__name__}")
        if len(self.labels) != len(LABELS):
            raise ManifestError(f"labels must have {len(LABELS)} entries, got {len(self.labels)}")
        bad = [v for v in self.labels if isinstance(v, bool) or v not in (-1, 0, 1)]
        if bad:
            raise ManifestError(f"labels must be 1, 0 or -1 (unknown), got {bad}")
        if self.affine is not None:
            a = np.asarray(self.affine, dtype=np.float64)
            if a.shape != (4, 4) or not np.all(np.isfinite(a)):
                raise ManifestError(f"affine must be a finite 4x4 matrix, got {self.affine}")
            if not np.allclose(a[3], (0, 0, 0, 1)) or abs(np.linalg.det(a[:3, :3])) < 1e-9:
                raise ManifestError(f"affine must be invertible with last row 0 0 0 1: {a}")
        if self.rescale is not None:
            if len(self.rescale) != 2 or _finite(self.rescale[0], "rescale slope") == 0:
                raise ManifestError(f"rescale must be [slope != 0, intercept], got {self.rescale}")
            _finite(self.rescale[1], "rescale intercept")
        for s in self.snippets:
            if not isinstance(s, Snippet):
                raise ManifestError(f"snippets must be Snippet objects, got {s!r}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "manifest_version": MANIFEST_VERSION,
            "volume_id": self.volume_id,
            "volume_path": self.volume_path,
            "volume_format": self.volume_format,
            "spacing": list(self.spacing),
            "affine": None if self.affine is None else [list(r) for r in self.affine],
            "rescale": None if self.rescale is None else list(self.rescale),
            "geometry_source": self.geometry_source,
            "report": self.report,
            "labels": list(self.labels),
            "snippets": [s.to_json() for s in self.snippets],
        }
        if self.split is not None:
            out["split"] = self.split
        if self.source:
            out["source"] = self.source
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ManifestRow:
        if not isinstance(d, Mapping):
            raise ManifestError(f"a row must be a JSON object, got {type(d).__name__}")
        missing = _REQUIRED - set(d)
        if missing:
            raise ManifestError(f"missing keys {sorted(missing)}")
        unknown = set(d) - _ROW_KEYS
        if unknown:
            raise ManifestError(f"unknown keys {sorted(unknown)}")
        if d["manifest_version"] != MANIFEST_VERSION:
            raise ManifestError(
                f"manifest_version {d['manifest_version']!r} is not supported "
                f"(this reader knows {MANIFEST_VERSION})"
            )
        for key in ("spacing", "labels"):
            if not isinstance(d[key], list):
                raise ManifestError(f"{key} must be a list, got {d[key]!r}")
        labels = d["labels"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
            raise ManifestError(f"labels must be integers, got {labels}")
        affine = d.get("affine")
        rescale = d.get("rescale")
        snippets = d.get("snippets", [])
        if not isinstance(snippets, list):
            raise ManifestError(f"snippets must be a list, got {snippets!r}")
        return cls(
            volume_id=d["volume_id"],
            volume_path=d["volume_path"],
            volume_format=d["volume_format"],
            spacing=cast(tuple[float, float, float], tuple(d["spacing"])),
            report=d["report"],
            labels=tuple(labels),
            snippets=tuple(Snippet.from_json(s) for s in snippets),
            affine=None if affine is None else _affine(affine),
            rescale=None if rescale is None else cast(tuple[float, float], tuple(rescale)),
            geometry_source=str(d.get("geometry_source", "")),
            split=d.get("split"),
            source=str(d.get("source", "")),
        )


def _affine(a: Any) -> Affine:
    arr = np.asarray(a, dtype=np.float64)
    if arr.shape != (4, 4):
        raise ManifestError(f"affine must be 4x4, got {a!r}")
    return tuple((float(r[0]), float(r[1]), float(r[2]), float(r[3])) for r in arr)


# ---------------------------------------------------------------------------------------------
# JSON Lines


def write_manifest(path: str | Path, rows: Iterable[ManifestRow]) -> int:
    """Write rows (validated on construction); returns how many."""
    n = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row.to_json(), ensure_ascii=False, allow_nan=False) + "\n")
            n += 1
    return n


def read_manifest(path: str | Path) -> Iterator[ManifestRow]:
    """Rows of a manifest; blank lines are skipped; errors name ``path:line``."""
    p = Path(path)
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield ManifestRow.from_json(json.loads(line))
            except json.JSONDecodeError as e:
                raise ManifestError(f"{p}:{lineno}: not JSON: {e}") from None
            except ManifestError as e:
                raise ManifestError(f"{p}:{lineno}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Pixels


class LoadedVolume(NamedTuple):
    """HU ``[z, y, x]`` float32, spacing ``(z, y, x)`` mm, index->LPS affine or None: exactly
    the arguments of ``engines.preprocess.to_model_space``."""

    hu: npt.NDArray[np.float32]
    spacing: tuple[float, float, float]
    affine: npt.NDArray[np.float64] | None


def save_npz_volume(path: str | Path, stored: npt.ArrayLike) -> None:
    """The ``npz`` format: stored values ``[z, y, x]`` (int16 or float32) under ``volume``."""
    arr = np.asarray(stored)
    if arr.ndim != 3:
        raise ValueError(f"volume must be [z, y, x], got shape {arr.shape}")
    np.savez_compressed(Path(path), volume=arr)


def load_volume(row: ManifestRow, base_dir: str | Path | None = None) -> LoadedVolume:
    """Read a row's pixels as HU. Relative paths resolve against ``base_dir`` (the manifest's
    directory)."""
    path = Path(row.volume_path)
    if not path.is_absolute():
        if base_dir is None:
            raise ValueError(f"{row.volume_path} is relative; pass the manifest's directory")
        path = Path(base_dir) / path
    slope, intercept = row.rescale if row.rescale is not None else (1.0, 0.0)
    if row.volume_format == "npz":
        with np.load(path) as z:
            stored = np.asarray(z["volume"])
        hu = (stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)).astype(
            np.float32
        )
    else:
        sz, sy, sx = row.spacing
        meta = {
            "RescaleSlope": repr(float(slope)),
            "RescaleIntercept": repr(float(intercept)),
            "XYSpacing": f"[{sy!r}, {sx!r}]",
            "ZSpacing": repr(float(sz)),
        }
        hu, _ = ctrate.read_volume(path, meta)
    if hu.ndim != 3:
        raise ManifestError(f"{path}: expected a 3D volume, got shape {hu.shape}")
    affine = None if row.affine is None else np.asarray(row.affine, dtype=np.float64)
    return LoadedVolume(np.ascontiguousarray(hu, dtype=np.float32), row.spacing, affine)


# ---------------------------------------------------------------------------------------------
# CT-RATE

# NIfTI index (row y, column x, slice z) <- model index (z, y, x); RAS <- LPS.
_NIFTI_FROM_INDEX: Final = np.array(
    [[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64
)
_LPS_FROM_RAS: Final = np.diag([-1.0, -1.0, 1.0, 1.0])


def _parse_xy(text: str) -> tuple[float, float]:
    parts = [p for p in text.strip().strip("[]").replace(",", " ").split() if p]
    if len(parts) != 2:
        raise ManifestError(f"XYSpacing must hold two numbers, got {text!r}")
    return float(parts[0]), float(parts[1])


def _read_csv(path: Path) -> dict[str, dict[str, str]]:
    if not path.exists():
        return {}
    with path.open(newline="", encoding="utf-8") as f:
        return {row["VolumeName"]: row for row in csv.DictReader(f)}


def _ctrate_path(root: Path, folder: str, name: str) -> Path:
    stem = name.removesuffix(".nii.gz")
    parts = stem.split("_")
    if len(parts) != 4:
        raise ManifestError(f"not a CT-RATE volume name: {name!r}")
    split, patient, scan, _ = parts
    return root / folder / f"{split}_{patient}" / f"{split}_{patient}_{scan}" / name


def _header_geometry(
    image: nib.Nifti1Image, spacing: tuple[float, float, float]
) -> npt.NDArray[np.float64] | None:
    """The header's affine as index (z, y, x, 1) -> LPS, if the header has a real one that
    agrees with the metadata spacing (CT-RATE's first release shipped blank headers)."""
    header = image.header
    codes = (int(header["sform_code"]), int(header["qform_code"]))
    if max(codes) <= 0:
        return None
    lps: npt.NDArray[np.float64] = _LPS_FROM_RAS @ np.asarray(image.affine) @ _NIFTI_FROM_INDEX
    norms = np.linalg.norm(lps[:3, :3], axis=0)
    if not np.allclose(norms, spacing, rtol=1e-2, atol=1e-3):
        return None
    return lps


def _header_scaled(image: nib.Nifti1Image) -> bool:
    """Does nibabel already apply a non-trivial scaling from the header? (On load nibabel moves
    scl_slope/scl_inter from the header into the array proxy, so ask the proxy.)"""
    proxy = image.dataobj
    slope = float(getattr(proxy, "slope", 1.0))
    inter = float(getattr(proxy, "inter", 0.0))
    return not (slope == 1.0 and inter == 0.0)


def read_ctrate(
    root: str | Path,
    split: str,
    *,
    fixed: bool | None = None,
    with_truth: bool = True,
) -> Iterator[ManifestRow]:
    """Rows for a CT-RATE split (``train``/``valid``) under ``root`` (CT-RATE's ``dataset/``).

    ``fixed``: read ``<split>_fixed/`` (volumes already in HU); None picks it when only that
    folder exists. Labels come from the labels CSV (-1 where a volume has no row), the report
    from ``Findings_EN`` and ``Impressions_EN``, spacing and rescale from the metadata CSV,
    the affine from the NIfTI header when it agrees with the metadata. With ``with_truth``,
    the synthetic world's ``truth/<split>_citations.jsonl`` gives the snippets (real CT-RATE
    has none); a two-image citation keeps the truth's first image, whose z the truth records.
    ``volume_path`` is absolute, so the rows can be written to a manifest anywhere.
    """
    base = Path(root).resolve()
    if fixed is None:
        fixed = (base / f"{split}_fixed").is_dir() and not (base / split).is_dir()
    folder = f"{split}_fixed" if fixed else split
    reports_csv, labels_csv, metadata_csv, truth_jsonl = ctrate.csv_paths(base, split)
    reports = _read_csv(reports_csv)
    labels = _read_csv(labels_csv)
    metadata = _read_csv(metadata_csv)
    snippets: dict[str, list[Snippet]] = {}
    if with_truth and truth_jsonl.exists():
        with truth_jsonl.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                t = json.loads(line)
                snippets.setdefault(t["VolumeName"], []).append(
                    Snippet(text=t["snippet"], z_mm=float(t["z_mm"]), label=t.get("label"))
                )
    for name, rep in reports.items():
        meta = metadata.get(name)
        if meta is None:
            raise ManifestError(f"{name}: no row in {metadata_csv}")
        sy, sx = _parse_xy(meta["XYSpacing"])
        spacing = (float(meta["ZSpacing"]), sy, sx)
        path = _ctrate_path(base, folder, name)
        image = cast(nib.Nifti1Image, nib.load(path))
        if fixed or _header_scaled(image):
            rescale = None
        else:
            rescale = (float(meta["RescaleSlope"]), float(meta["RescaleIntercept"]))
        affine = _header_geometry(image, spacing)
        yield ManifestRow(
            volume_id=name,
            volume_path=str(path),
            volume_format="ctrate-nifti",
            spacing=spacing,
            report=_report_text(rep),
            labels=_labels(labels.get(name)),
            snippets=tuple(snippets.get(name, ())),
            affine=None if affine is None else _affine(affine),
            rescale=rescale,
            geometry_source="nifti-header" if affine is not None else "ctrate-metadata",
            split=split,
            source="ctrate",
        )


def _report_text(row: Mapping[str, str]) -> str:
    parts = []
    for key, head in (("Findings_EN", "Findings"), ("Impressions_EN", "Impression")):
        text = (row.get(key) or "").strip()
        if text:
            parts.append(f"{head}: {text}")
    return "\n".join(parts)


def _labels(row: Mapping[str, str] | None) -> tuple[int, ...]:
    if row is None:
        return (-1,) * len(LABELS)
    out = []
    for name in LABELS:
        v = (row.get(name) or "").strip()
        out.append(int(float(v)) if v else -1)
    return tuple(out)
