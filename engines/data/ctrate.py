"""CT-RATE's on-disk layout, written from synthetic chest phantoms whose truth is known.

The dataset code reads CT-RATE (DESIGN §3, training manifest); before anyone downloads 12 TB it
must be tested, and the model's depth head trained, on a world where every label, every report
citation and every cited slice is known. So this module writes that world in CT-RATE's exact
shape, plus one file CT-RATE does not have: the truth of each citation.

Layout under ``root`` (CT-RATE's ``dataset/`` folder)::

    <split>/<split>_<patient>/<split>_<patient>_<scan>/<split>_<patient>_<scan>_<recon>.nii.gz
    radiology_text_reports/{train,validation}_reports.csv   VolumeName + the four _EN sections
    multi_abnormality_labels/{train,valid}_predicted_labels.csv   VolumeName + the 18 labels, 0/1
    metadata/{train,validation}_metadata.csv    CT-RATE's 44 columns (XYSpacing "[row, col]")
    truth/<split>_citations.jsonl               one JSON object per citation (TRUTH_FIELDS)

Volumes follow CT-RATE's convention: the NIfTI holds *stored* values as int16 with no scaling in
its header, and the metadata's ``RescaleSlope``/``RescaleIntercept`` (1, -1024) turn them into HU,
so loaders written for CT-RATE (``slope * get_fdata() + intercept``) work unchanged. The array
is ``[row (y), column (x), slice (z)]`` with slice 0 the most inferior: what stacking DICOM pixel
arrays gives, and what CT-CLIP-style loaders expect before their ``transpose(2, 0, 1)`` to
``[z, y, x]``. Unlike the first CT-RATE release the header is not blank: its affine maps that
index order to RAS mm and agrees with the metadata (pixdim = row spacing, column spacing,
ZSpacing), so geometry-aware readers need no metadata at all.

``synthesize_ctrate`` generates phantoms and reports on several processes; every volume depends
only on ``seed`` and its index, and rows are written in index order, so the output is the same
for any number of workers.
"""

from __future__ import annotations

import csv
import importlib
import json
import multiprocessing
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, TextIO, cast

import nibabel as nib
import numpy as np
import numpy.typing as npt

from engines.data.reports import REPORT_LABELS, FindingLike, Report, write_report

__all__ = [
    "LABEL_COLUMNS",
    "METADATA_COLUMNS",
    "REPORT_COLUMNS",
    "RESCALE_INTERCEPT",
    "RESCALE_SLOPE",
    "TRUTH_FIELDS",
    "CTRateItem",
    "CTRateManifest",
    "PhantomLike",
    "centred_affine",
    "csv_paths",
    "nifti_affine",
    "read_volume",
    "synthesize_ctrate",
    "volume_name",
    "volume_path",
    "volume_seed",
    "write_ctrate",
    "write_volume",
]

RESCALE_SLOPE: Final = 1
RESCALE_INTERCEPT: Final = -1024
REPORT_COLUMNS: Final = (
    "VolumeName",
    "ClinicalInformation_EN",
    "Technique_EN",
    "Findings_EN",
    "Impressions_EN",
)
LABEL_COLUMNS: Final = ("VolumeName", *REPORT_LABELS)
# CT-RATE's metadata header, in its order.
METADATA_COLUMNS: Final = (
    "VolumeName",
    "Manufacturer",
    "SeriesDescription",
    "ManufacturerModelName",
    "PatientSex",
    "PatientAge",
    "ReconstructionDiameter",
    "DistanceSourceToDetector",
    "DistanceSourceToPatient",
    "GantryDetectorTilt",
    "TableHeight",
    "RotationDirection",
    "ExposureTime",
    "XRayTubeCurrent",
    "Exposure",
    "FilterType",
    "GeneratorPower",
    "FocalSpots",
    "ConvolutionKernel",
    "PatientPosition",
    "RevolutionTime",
    "SingleCollimationWidth",
    "TotalCollimationWidth",
    "TableSpeed",
    "TableFeedPerRotation",
    "SpiralPitchFactor",
    "DataCollectionCenterPatient",
    "ReconstructionTargetCenterPatient",
    "ExposureModulationType",
    "CTDIvol",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceLocation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "XYSpacing",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "NumberofSlices",
    "ZSpacing",
    "StudyDate",
)
# Fields of each truth line. ``findings_start``/``findings_end`` index the Findings column of the
# reports CSV; ``z_mm`` is the LPS (= RAS) z of the cited slice's centre plane (superior > 0
# above the isocentre); ``instance_numbering`` says whether instance numbers ran from the
# inferior or the superior end, which is what turns an "image" number into a z index.
TRUTH_FIELDS: Final = (
    "VolumeName",
    "label",
    "snippet",
    "z_index",
    "z_mm",
    "image",
    "series",
    "form",
    "citation",
    "findings_start",
    "findings_end",
    "images",
    "z_indices",
    "instance_numbering",
    "n_slices",
)

# CSV file stems per split, as CT-RATE names them (its validation files mix two spellings).
_CSV_STEMS: Final[Mapping[str, tuple[str, str, str]]] = {
    "train": ("train_reports", "train_predicted_labels", "train_metadata"),
    "valid": ("validation_reports", "valid_predicted_labels", "validation_metadata"),
}
_SCANNERS: Final = (
    ("Philips", "iCT 256", "HRCT", "YA"),
    ("Philips", "Ingenuity CT", "Chest 1.5", "B"),
    ("SIEMENS", "SOMATOM Definition Flash", "Thorax 1.5 Br40", "Br40d"),
    ("PNMS", "NeuViz 128", "Lung 1.5", "F_LUNG"),
)

FloatVolume = npt.NDArray[np.floating[Any]]


class PhantomLike(Protocol):
    """The part of ``engines.data.phantoms.Phantom`` the writer needs."""

    @property
    def hu(self) -> FloatVolume: ...

    @property
    def spacing(self) -> Sequence[float]: ...

    @property
    def affine(self) -> npt.NDArray[np.float64]: ...

    @property
    def findings(self) -> Sequence[FindingLike]: ...

    @property
    def labels(self) -> npt.NDArray[np.int8]: ...

    @property
    def patient(self) -> Mapping[str, Any]: ...


PhantomFactory = Callable[..., PhantomLike]


@dataclass(frozen=True)
class CTRateItem:
    """One volume to write: pixels, geometry, report, labels and the patient it belongs to.

    ``affine`` maps array index ``(z, y, x, 1)`` to LPS mm (default: centred on the isocentre,
    axial). ``instance_numbering`` is only recorded in the truth (how the report's image numbers
    were made). ``metadata`` overrides any metadata column.
    """

    patient: int
    hu: FloatVolume
    spacing: tuple[float, float, float]
    report: Report
    labels: Sequence[int]
    scan: str = "a"
    recon: int = 1
    affine: npt.NDArray[np.float64] | None = None
    patient_sex: str = "M"
    patient_age: int = 60
    instance_numbering: str = "inferior"
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CTRateManifest:
    """Where everything went."""

    root: Path
    split: str
    volumes: tuple[str, ...]
    reports_csv: Path
    labels_csv: Path
    metadata_csv: Path
    truth_jsonl: Path
    n_citations: int


@dataclass(frozen=True)
class _Rows:
    """What one volume adds to each table; small, so workers can send it back cheaply."""

    report: dict[str, str]
    labels: dict[str, str]
    metadata: dict[str, str]
    truth: list[dict[str, Any]]


# ---------------------------------------------------------------------------------------------
# Names and geometry


def volume_name(split: str, patient: int, scan: str = "a", recon: int = 1) -> str:
    """CT-RATE's file name, e.g. ``train_1_a_1.nii.gz``."""
    if not split.isalpha() or not scan.isalpha() or patient < 0 or recon < 1:
        raise ValueError(f"bad volume name parts: {split!r}, {patient}, {scan!r}, {recon}")
    return f"{split}_{patient}_{scan}_{recon}.nii.gz"


def volume_path(root: Path, split: str, patient: int, scan: str = "a", recon: int = 1) -> Path:
    """``root/train/train_1/train_1_a/train_1_a_1.nii.gz``."""
    return (
        Path(root)
        / split
        / f"{split}_{patient}"
        / f"{split}_{patient}_{scan}"
        / volume_name(split, patient, scan, recon)
    )


def csv_paths(root: Path, split: str) -> tuple[Path, Path, Path, Path]:
    """(reports, labels, metadata, truth) file paths for a split."""
    reports, labels, metadata = _CSV_STEMS.get(
        split, (f"{split}_reports", f"{split}_predicted_labels", f"{split}_metadata")
    )
    r = Path(root)
    return (
        r / "radiology_text_reports" / f"{reports}.csv",
        r / "multi_abnormality_labels" / f"{labels}.csv",
        r / "metadata" / f"{metadata}.csv",
        r / "truth" / f"{split}_citations.jsonl",
    )


def centred_affine(shape: Sequence[int], spacing: Sequence[float]) -> npt.NDArray[np.float64]:
    """(z, y, x, 1) -> LPS for an axial volume centred on the isocentre, z 0 most inferior."""
    nz, ny, nx = (int(v) for v in shape)
    sz, sy, sx = (float(v) for v in spacing)
    affine = np.zeros((4, 4), dtype=np.float64)
    affine[0, 2] = sx
    affine[1, 1] = sy
    affine[2, 0] = sz
    affine[:3, 3] = (-(nx - 1) * sx / 2, -(ny - 1) * sy / 2, -(nz - 1) * sz / 2)
    affine[3, 3] = 1.0
    return affine


# Array (row y, column x, slice z) -> index (z, y, x); LPS -> RAS.
_INDEX_FROM_NIFTI: Final = np.array(
    [[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=np.float64
)
_RAS_FROM_LPS: Final = np.diag([-1.0, -1.0, 1.0, 1.0])


def nifti_affine(lps_affine: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """NIfTI (RAS) affine of the ``[y, x, z]`` array from the phantom's ``(z, y, x)`` LPS one."""
    out: npt.NDArray[np.float64] = _RAS_FROM_LPS @ np.asarray(lps_affine) @ _INDEX_FROM_NIFTI
    return out


def stored_values(hu: FloatVolume) -> npt.NDArray[np.int16]:
    """HU -> CT-RATE stored values (``(HU - intercept) / slope``), int16, ``[y, x, z]``.

    HU are rounded before the intercept is applied: in float32 ``hu + 1024`` can move a value
    across a .5 boundary, and the DICOM writer rounds the same way, so both agree voxel for voxel.
    """
    raw = (np.rint(np.asarray(hu, dtype=np.float32)) - RESCALE_INTERCEPT) / RESCALE_SLOPE
    np.clip(raw, np.iinfo(np.int16).min, np.iinfo(np.int16).max, out=raw)
    return np.ascontiguousarray(raw.astype(np.int16).transpose(1, 2, 0))


def write_volume(path: Path, hu: FloatVolume, lps_affine: npt.NDArray[np.float64]) -> None:
    """One ``.nii.gz``: stored values, no header scaling, qform = sform = scanner RAS."""
    affine = nifti_affine(lps_affine)
    # nibabel's constructors and setters are untyped; the ignores are confined to this function.
    image = nib.Nifti1Image(stored_values(hu), affine)  # type: ignore[no-untyped-call]
    image.header.set_xyzt_units("mm")  # type: ignore[no-untyped-call]
    image.set_qform(affine, code=1)  # type: ignore[no-untyped-call]
    image.set_sform(affine, code=1)  # type: ignore[no-untyped-call]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)


def read_volume(
    path: Path, metadata: Mapping[str, str]
) -> tuple[npt.NDArray[np.float32], tuple[float, float, float]]:
    """The inverse, as CT-RATE loaders do it: HU ``[z, y, x]`` and ``(z, y, x)`` spacing in mm."""
    image = cast(nib.Nifti1Image, nib.load(path))
    raw = np.asarray(image.dataobj, dtype=np.float32)
    slope = float(metadata["RescaleSlope"])
    intercept = float(metadata["RescaleIntercept"])
    hu = (raw * slope + intercept).transpose(2, 0, 1)
    row, col = (float(v) for v in metadata["XYSpacing"].strip("[]").split(","))
    return np.ascontiguousarray(hu), (float(metadata["ZSpacing"]), row, col)


# ---------------------------------------------------------------------------------------------
# Rows


def _num(value: float) -> str:
    """Numbers as CT-RATE prints them: integers bare, others without float noise."""
    v = float(value)
    return str(int(v)) if v.is_integer() else f"{v:.10g}"


def _vec(values: Iterable[float]) -> str:
    return "[" + ", ".join(_num(v) for v in values) + "]"


def _metadata_row(item: CTRateItem, name: str, affine: npt.NDArray[np.float64]) -> dict[str, str]:
    """CT-RATE's metadata columns; scanner settings are plausible values, geometry is exact."""
    rng = random.Random(f"{name}\x1fmetadata")
    maker, model, description, kernel = rng.choice(_SCANNERS)
    nz, ny, nx = item.hu.shape
    sz, sy, sx = item.spacing
    first = affine[:3, 3]
    row_dir = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    col_dir = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    centre = affine @ np.array([(nz - 1) / 2, (ny - 1) / 2, (nx - 1) / 2, 1.0])
    ma = rng.randint(80, 300)
    rotation = 0.5
    pitch = rng.choice((0.9, 1.0, 1.2))
    collimation = 40.0
    row = {
        "VolumeName": name,
        "Manufacturer": maker,
        "SeriesDescription": description,
        "ManufacturerModelName": model,
        "PatientSex": item.patient_sex,
        "PatientAge": f"{item.patient_age:03d}Y",
        "ReconstructionDiameter": _num(round(max(nx * sx, ny * sy), 3)),
        "DistanceSourceToDetector": "1040",
        "DistanceSourceToPatient": "570",
        "GantryDetectorTilt": "0",
        "TableHeight": _num(rng.randint(120, 190)),
        "RotationDirection": "CW",
        "ExposureTime": _num(rng.randint(400, 900)),
        "XRayTubeCurrent": _num(ma),
        "Exposure": _num(round(ma * rotation)),
        "FilterType": "B",
        "GeneratorPower": _num(ma * 120 // 1000),
        "FocalSpots": "1.2",
        "ConvolutionKernel": kernel,
        "PatientPosition": "HFS",
        "RevolutionTime": _num(rotation),
        "SingleCollimationWidth": "0.625",
        "TotalCollimationWidth": _num(collimation),
        "TableSpeed": _num(pitch * collimation / rotation),
        "TableFeedPerRotation": _num(pitch * collimation),
        "SpiralPitchFactor": _num(pitch),
        "DataCollectionCenterPatient": _vec(centre[:3]),
        "ReconstructionTargetCenterPatient": _vec(centre[:3]),
        "ExposureModulationType": "Z DOM",
        "CTDIvol": _num(round(rng.uniform(3.0, 12.0), 6)),
        "ImagePositionPatient": _vec(first),
        "ImageOrientationPatient": _vec((*row_dir, *col_dir)),
        "SliceLocation": _num(round(float(first[2]), 6)),
        "SamplesPerPixel": "1",
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": str(ny),
        "Columns": str(nx),
        "XYSpacing": _vec((sy, sx)),
        "RescaleIntercept": _num(RESCALE_INTERCEPT),
        "RescaleSlope": _num(RESCALE_SLOPE),
        "RescaleType": "HU",
        "NumberofSlices": str(nz),
        "ZSpacing": _num(sz),
        "StudyDate": f"20{rng.randint(18, 23)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
    }
    row.update(item.metadata)
    return row


def _truth_rows(
    item: CTRateItem, name: str, affine: npt.NDArray[np.float64]
) -> list[dict[str, Any]]:
    report = item.report
    rows: list[dict[str, Any]] = []
    for c in report.citations:
        start, end = report.findings_span(c)
        z_mm = float((affine @ np.array([c.z_index, 0.0, 0.0, 1.0]))[2])
        rows.append(
            {
                "VolumeName": name,
                "label": c.finding_label,
                "snippet": c.snippet,
                "z_index": c.z_index,
                "z_mm": round(z_mm, 4),
                "image": c.image,
                "series": c.series,
                "form": c.form,
                "citation": report.text[c.start : c.end],
                "findings_start": start,
                "findings_end": end,
                "images": list(c.images),
                "z_indices": list(c.z_indices),
                "instance_numbering": item.instance_numbering,
                "n_slices": int(item.hu.shape[0]),
            }
        )
    return rows


def _write_item(root: Path, split: str, item: CTRateItem) -> _Rows:
    """Write the volume and return its table rows (the only thing that crosses processes)."""
    if item.hu.ndim != 3:
        raise ValueError(f"hu must be [z, y, x], got shape {item.hu.shape}")
    if len(item.labels) != len(REPORT_LABELS):
        raise ValueError(f"labels must have {len(REPORT_LABELS)} entries, got {len(item.labels)}")
    name = volume_name(split, item.patient, item.scan, item.recon)
    affine = (
        centred_affine(item.hu.shape, item.spacing)
        if item.affine is None
        else np.asarray(item.affine, dtype=np.float64)
    )
    write_volume(volume_path(root, split, item.patient, item.scan, item.recon), item.hu, affine)
    r = item.report
    return _Rows(
        report={
            "VolumeName": name,
            "ClinicalInformation_EN": r.clinical_information,
            "Technique_EN": r.technique,
            "Findings_EN": r.findings,
            "Impressions_EN": r.impressions,
        },
        labels={
            "VolumeName": name,
            **{lb: str(int(v)) for lb, v in zip(REPORT_LABELS, item.labels, strict=True)},
        },
        metadata=_metadata_row(item, name, affine),
        truth=_truth_rows(item, name, affine),
    )


def _write_tables(
    root: Path,
    split: str,
    rows: Iterable[_Rows],
    progress: Callable[[int], None] | None = None,
) -> CTRateManifest:
    reports_csv, labels_csv, metadata_csv, truth_jsonl = csv_paths(root, split)
    for p in (reports_csv, labels_csv, metadata_csv, truth_jsonl):
        p.parent.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    n_citations = 0
    with (
        reports_csv.open("w", newline="", encoding="utf-8") as f_rep,
        labels_csv.open("w", newline="", encoding="utf-8") as f_lab,
        metadata_csv.open("w", newline="", encoding="utf-8") as f_meta,
        truth_jsonl.open("w", encoding="utf-8") as f_truth,
    ):
        w_rep = _csv_writer(f_rep, REPORT_COLUMNS)
        w_lab = _csv_writer(f_lab, LABEL_COLUMNS)
        w_meta = _csv_writer(f_meta, METADATA_COLUMNS)
        for row in rows:
            w_rep.writerow(row.report)
            w_lab.writerow(row.labels)
            w_meta.writerow(row.metadata)
            for t in row.truth:
                f_truth.write(json.dumps(t, ensure_ascii=False) + "\n")
            n_citations += len(row.truth)
            names.append(row.report["VolumeName"])
            if progress is not None:
                progress(len(names))
    return CTRateManifest(
        root=Path(root),
        split=split,
        volumes=tuple(names),
        reports_csv=reports_csv,
        labels_csv=labels_csv,
        metadata_csv=metadata_csv,
        truth_jsonl=truth_jsonl,
        n_citations=n_citations,
    )


def _csv_writer(f: TextIO, columns: Sequence[str]) -> csv.DictWriter[str]:
    writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="raise")
    writer.writeheader()
    return writer


def write_ctrate(root: Path, items: Iterable[CTRateItem], split: str) -> CTRateManifest:
    """Write ``items`` (streamed, one volume in memory at a time) as a CT-RATE split."""
    root = Path(root)
    return _write_tables(root, split, (_write_item(root, split, item) for item in items))


# ---------------------------------------------------------------------------------------------
# The generator driver


@dataclass(frozen=True)
class _Task:
    root: Path
    split: str
    index: int
    patient: int
    seed: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    factory: PhantomFactory | None


def volume_seed(seed: int, index: int) -> int:
    """Seed of the ``index``-th volume: independent streams, stable across runs and workers."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)[0])


def _default_factory() -> PhantomFactory:
    """``engines.data.phantoms.generate_phantom``, looked up when first needed."""
    module = importlib.import_module("engines.data.phantoms")
    factory = getattr(module, "generate_phantom", None)
    if factory is None:
        raise RuntimeError(
            "engines.data.phantoms.generate_phantom is missing; pass phantom_factory"
        )
    return cast(PhantomFactory, factory)


def _patient_fields(patient: Mapping[str, Any], rng: random.Random) -> tuple[str, int]:
    """Sex and age from the phantom's patient record, whatever it calls them."""
    sex = patient.get("sex", patient.get("PatientSex"))
    age = patient.get("age", patient.get("PatientAge"))
    sex_text = str(sex).upper()[:1] if sex else rng.choice("MF")
    if isinstance(age, str):
        age = int("".join(ch for ch in age if ch.isdigit()) or 0)
    return (sex_text if sex_text in ("M", "F", "O") else "O"), int(age or rng.randint(25, 85))


def _synthesize_one(task: _Task) -> _Rows:
    factory = task.factory or _default_factory()
    phantom = factory(task.shape, task.spacing, seed=task.seed)
    rng = random.Random(task.seed)
    n_slices = int(phantom.hu.shape[0])
    numbering = rng.choice(("inferior", "superior"))
    series = rng.choice((2, 3, 4, 5, 201, 301))
    labels = [int(v) for v in np.asarray(phantom.labels).reshape(-1)]
    present = {lb for lb, v in zip(REPORT_LABELS, labels, strict=True) if v}
    report = write_report(
        phantom.findings,
        seed=task.seed,
        n_slices=n_slices,
        series_number=series,
        instance_number_of_z=_instance_numbering(numbering, n_slices),
        present_labels=present,
    )
    sex, age = _patient_fields(phantom.patient, rng)
    spacing = tuple(float(v) for v in phantom.spacing)
    item = CTRateItem(
        patient=task.patient,
        hu=phantom.hu,
        spacing=(spacing[0], spacing[1], spacing[2]),
        report=report,
        labels=labels,
        affine=np.asarray(phantom.affine, dtype=np.float64),
        patient_sex=sex,
        patient_age=age,
        instance_numbering=numbering,
    )
    return _write_item(task.root, task.split, item)


def _instance_numbering(numbering: str, n_slices: int) -> Callable[[int], int]:
    if numbering == "superior":
        return lambda z: n_slices - z
    return lambda z: z + 1


def _run(tasks: Sequence[_Task], workers: int) -> Iterator[_Rows]:
    if workers <= 1 or len(tasks) <= 1:
        yield from map(_synthesize_one, tasks)
        return
    with multiprocessing.get_context().Pool(min(workers, len(tasks))) as pool:
        # imap keeps index order, so the tables do not depend on which worker finished first.
        yield from pool.imap(_synthesize_one, tasks, chunksize=1)


def synthesize_ctrate(
    root: Path,
    n: int,
    seed: int,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    split: str = "train",
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
    *,
    phantom_factory: PhantomFactory | None = None,
    first_patient: int = 1,
) -> CTRateManifest:
    """Generate ``n`` phantoms with reports and write them as a CT-RATE split under ``root``.

    ``shape`` is ``(z, y, x)``, ``spacing`` ``(z, y, x)`` mm. Volume ``i`` is patient
    ``first_patient + i``, scan ``a``, reconstruction 1, made from ``volume_seed(seed, i)``; its
    report numbers images from the bottom or the top (at random, recorded in the truth) and
    cites a random series number. ``phantom_factory(shape, spacing, seed=...)`` defaults to
    ``engines.data.phantoms.generate_phantom``; with several workers it must be picklable (a
    module-level function). ``progress(done, n)`` is called in this process after each volume.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    root = Path(root)
    tasks = [
        _Task(
            root, split, i, first_patient + i, volume_seed(seed, i), shape, spacing, phantom_factory
        )
        for i in range(n)
    ]
    report_progress = None if progress is None else (lambda done: progress(done, n))
    return _write_tables(root, split, _run(tasks, workers), report_progress)
