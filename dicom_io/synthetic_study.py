"""A whole synthetic CT study as a scanner sends it: scout, chest series, and other series.

Series selection, completion and report linking are only tested honestly on studies that look
like PACS traffic: a localizer first (series 1), the chest series (series 2), sometimes a series
of another body part in the same study, files whose names say nothing about their order, and
slices numbered from the top as many scanners do. This module composes
:mod:`dicom_io.synthetic` (which owns the IODs and their validity) into such studies.

Patient sex and age are set on every object (the series writer uses fixed placeholders). With
the same arguments and ``seed`` every file is byte-for-byte identical, including its name, so
tests can write a study twice and compare.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian

from dicom_io.synthetic import (
    DEFAULT_DATETIME,
    RESCALE_INTERCEPT,
    SyntheticSeries,
    ct_datasets,
    make_uid,
)

__all__ = ["CHEST_SERIES_NUMBER", "SCOUT_SERIES_NUMBER", "SyntheticStudy", "write_study"]

SCOUT_SERIES_NUMBER: Final = 1
CHEST_SERIES_NUMBER: Final = 2
_AXIAL: Final = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
# Coronal projection, rows run left (patient), columns run down towards the feet: how a
# topogram is displayed with the head at the top.
_CORONAL: Final = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
# Stored-value scale of the scout: 10 per mm of water-equivalent path, so a 40 cm chest stays
# inside 12 bits.
_SCOUT_PER_MM: Final = 10.0
_OTHER_SLICES: Final = 8
_OTHER_SPACING_Z: Final = 5.0
_OTHER_PROTOCOLS: Final[dict[str, tuple[str, str]]] = {
    "ABDOMEN": ("Abdomen 5.0 B30f", "B30f"),
    "HEAD": ("Head 5.0 H30s", "H30s"),
    "PELVIS": ("Pelvis 5.0 B30f", "B30f"),
    "NECK": ("Neck 3.0 B30f", "B30f"),
}

Numbering = Literal["inferior", "superior"]


@dataclass(frozen=True)
class SyntheticStudy:
    """What was written. ``instance_numbers[z]`` is the chest slice's InstanceNumber at z index
    ``z`` (0 = most inferior), the mapping a report's "image 45" needs."""

    study_uid: str
    series: list[SyntheticSeries]
    chest: SyntheticSeries
    scout: SyntheticSeries | None
    non_chest: list[SyntheticSeries]
    instance_numbers: tuple[int, ...]

    def instance_number_of_z(self, z: int) -> int:
        return self.instance_numbers[z]

    def z_of_instance_number(self, instance_number: int) -> int:
        return self.instance_numbers.index(instance_number)

    def sop_uid_of_z(self, z: int) -> str:
        return self.chest.sop_uids[z]

    @property
    def paths(self) -> list[Path]:
        return [p for s in self.series for p in s.paths]


def _age_string(age: int | str) -> str:
    """DICOM AS ("063Y") from years or an AS string already formed."""
    if isinstance(age, str):
        if len(age) != 4 or not age[:3].isdigit() or age[3] not in "DWMY":
            raise ValueError(f"patient_age must be years or a DICOM AS like '063Y', got {age!r}")
        return age
    if not 0 <= age <= 999:
        raise ValueError(f"patient_age out of range: {age}")
    return f"{age:03d}Y"


def instance_numbers(n: int, numbering: Numbering) -> tuple[int, ...]:
    """InstanceNumber per z index; "superior" numbers from the top, as many chest protocols do."""
    if numbering == "inferior":
        return tuple(range(1, n + 1))
    if numbering == "superior":
        return tuple(range(n, 0, -1))
    raise ValueError(f"numbering must be 'inferior' or 'superior', got {numbering!r}")


def _centred_origin(shape: Sequence[int], spacing: Sequence[float]) -> tuple[float, float, float]:
    """The LPS origin ``ct_datasets`` uses by default (volume centred on the isocentre)."""
    nz, ny, nx = shape
    sz, sy, sx = spacing
    return (-(nx - 1) * sx / 2, -(ny - 1) * sy / 2, -(nz - 1) * sz / 2)


def scout_image(hu: npt.NDArray[Any], spacing: Sequence[float]) -> npt.NDArray[np.float32]:
    """A frontal projection [1, rows = z from the top, columns = x] in the writer's HU-like input.

    Values are water-equivalent path length through the body (a topogram is a projection, not
    HU), offset by the rescale intercept so that the stored value is the scaled path length.
    """
    mu = np.clip((np.asarray(hu, dtype=np.float32) + 1000.0) / 1000.0, 0.0, None)
    path_mm = mu.sum(axis=1) * np.float32(spacing[1])  # [z, x]
    stored = np.clip(path_mm * _SCOUT_PER_MM, 0.0, 4095.0)
    image: npt.NDArray[np.float32] = (stored[::-1] + RESCALE_INTERCEPT)[np.newaxis].astype(
        np.float32
    )
    return image


def other_body_part_volume(
    body_part: str, rows: int, columns: int, pixel_mm: tuple[float, float]
) -> npt.NDArray[np.float32]:
    """A few slices that are plainly not a chest: an abdomen without lungs or a skull.

    Selection must reject these on their tags, not on their pixels, but the pixels should not
    look like lungs either, so a content-based check cannot pass them by accident.
    """
    y = (np.arange(rows, dtype=np.float32) - (rows - 1) / 2) * pixel_mm[0]
    x = (np.arange(columns, dtype=np.float32) - (columns - 1) / 2) * pixel_mm[1]
    yy, xx = np.meshgrid(y, x, indexing="ij")
    half = 0.45 * min(rows * pixel_mm[0], columns * pixel_mm[1])
    img = np.full((rows, columns), -1000.0, dtype=np.float32)
    if body_part == "HEAD":
        r = np.hypot(xx, yy)
        img[r <= 0.8 * half] = 1000.0  # skull
        img[r <= 0.72 * half] = 35.0  # brain
    else:
        e = (xx / half) ** 2 + (yy / (0.75 * half)) ** 2
        img[e <= 1.0] = -100.0  # subcutaneous fat
        img[e <= 0.8] = 45.0  # solid organs
    return np.repeat(img[np.newaxis], _OTHER_SLICES, axis=0)


def _file_name(seed: int | str, ds: Dataset, shuffle: bool) -> str:
    """Shuffled: a name derived from seed and SOP UID (stable, yet says nothing about order)."""
    if shuffle:
        digest = hashlib.sha256(f"{seed}\x1f{ds.SOPInstanceUID}".encode()).hexdigest()
        return digest[:20]
    return f"{int(ds.SeriesNumber):03d}/{int(ds.InstanceNumber):05d}.dcm"


def _write_series(
    out: Path,
    datasets: Iterable[Dataset],
    *,
    seed: int | str,
    shuffle: bool,
    patient_sex: str,
    patient_age: str,
    numbers: Sequence[int] | None = None,
) -> SyntheticSeries:
    sop_uids: list[str] = []
    paths: list[Path] = []
    study = series = ""
    for k, ds in enumerate(datasets):
        ds.PatientSex = patient_sex
        ds.PatientAge = patient_age
        if numbers is not None:
            ds.InstanceNumber = numbers[k]
        path = out / _file_name(seed, ds, shuffle)
        path.parent.mkdir(parents=True, exist_ok=True)
        dcmwrite(path, ds, enforce_file_format=True)
        sop_uids.append(str(ds.SOPInstanceUID))
        paths.append(path)
        study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    return SyntheticSeries(study, series, tuple(sop_uids), tuple(paths))


def write_study(
    out_dir: str | Path,
    hu: npt.ArrayLike,
    spacing: tuple[float, float, float],
    *,
    seed: int | str,
    accession_number: str,
    patient_id: str,
    patient_name: str,
    patient_sex: str = "O",
    patient_age: int | str = 50,
    study_datetime: datetime = DEFAULT_DATETIME,
    transfer_syntax: str = ExplicitVRLittleEndian,
    shuffle: bool = False,
    with_scout: bool = False,
    with_non_chest: bool = False,
    non_chest_body_parts: Sequence[str] = ("ABDOMEN",),
    numbering: Numbering = "inferior",
    origin: tuple[float, float, float] | None = None,
    study_description: str = "CT THORAX",
    chest_series_description: str = "Chest 1.0 B30f",
    kernel: str = "B30f",
) -> SyntheticStudy:
    """Write a study into ``out_dir``: chest series 2, optional scout 1 and other series 3, 4...

    ``hu`` is the chest volume [z, y, x] (z 0 = most inferior) and ``origin`` the LPS position
    of its first voxel (default: centred, as :func:`dicom_io.synthetic.ct_datasets`). Files go to
    ``<series number>/<instance number>.dcm``, or with ``shuffle`` to flat names that carry no
    order. ``numbering="superior"`` numbers the chest slices from the top.
    """
    arr = np.asarray(hu)
    if arr.ndim != 3:
        raise ValueError(f"hu must be [z, y, x], got shape {arr.shape}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    study_uid = make_uid(seed, "study", accession_number)
    chest_origin = origin or _centred_origin(arr.shape, spacing)
    numbers = instance_numbers(arr.shape[0], numbering)
    sex, age = patient_sex, _age_string(patient_age)
    common: dict[str, Any] = {
        "study_uid": study_uid,
        "patient_id": patient_id,
        "patient_name": patient_name,
        "accession_number": accession_number,
        "study_description": study_description,
        "study_datetime": study_datetime,
        "transfer_syntax": transfer_syntax,
        "seed": seed,
    }
    written: list[SyntheticSeries] = []
    scout: SyntheticSeries | None = None
    if with_scout:
        top = (
            chest_origin[0],
            chest_origin[1] + (arr.shape[1] - 1) * spacing[1] / 2,
            chest_origin[2] + (arr.shape[0] - 1) * spacing[0],
        )
        scout = _write_series(
            out,
            ct_datasets(
                scout_image(arr, spacing),
                (1.0, spacing[0], spacing[2]),
                series_number=SCOUT_SERIES_NUMBER,
                series_description="Topogram 0.6 T20s",
                protocol_name="Chest routine",
                image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                kernel="T20s",
                slice_thickness=0.6,
                orientation=_CORONAL,
                origin=top,
                **common,
            ),
            seed=seed,
            shuffle=shuffle,
            patient_sex=sex,
            patient_age=age,
        )
        written.append(scout)
    chest = _write_series(
        out,
        ct_datasets(
            arr,
            spacing,
            series_number=CHEST_SERIES_NUMBER,
            series_description=chest_series_description,
            kernel=kernel,
            orientation=_AXIAL,
            origin=chest_origin,
            **common,
        ),
        seed=seed,
        shuffle=shuffle,
        patient_sex=sex,
        patient_age=age,
        numbers=numbers,
    )
    written.append(chest)
    others: list[SyntheticSeries] = []
    if with_non_chest:
        for i, part in enumerate(non_chest_body_parts):
            others.append(
                _write_other(
                    out,
                    part,
                    CHEST_SERIES_NUMBER + 1 + i,
                    arr.shape,
                    spacing,
                    chest_origin,
                    common,
                    seed=seed,
                    shuffle=shuffle,
                    sex=sex,
                    age=age,
                )
            )
        written += others
    return SyntheticStudy(study_uid, written, chest, scout, others, numbers)


def _write_other(
    out: Path,
    body_part: str,
    series_number: int,
    chest_shape: Sequence[int],
    spacing: Sequence[float],
    chest_origin: tuple[float, float, float],
    common: dict[str, Any],
    *,
    seed: int | str,
    shuffle: bool,
    sex: str,
    age: str,
) -> SyntheticSeries:
    """A short series of another body part, above (head, neck) or below (abdomen) the chest."""
    part = body_part.upper()
    description, kernel = _OTHER_PROTOCOLS.get(part, (f"{part.title()} 5.0 B30f", "B30f"))
    rows, columns = int(chest_shape[1]), int(chest_shape[2])
    volume = other_body_part_volume(part, rows, columns, (spacing[1], spacing[2]))
    extent = (_OTHER_SLICES - 1) * _OTHER_SPACING_Z
    chest_top = chest_origin[2] + (chest_shape[0] - 1) * spacing[0]
    above = part in ("HEAD", "NECK")
    z0 = chest_top + 50.0 if above else chest_origin[2] - 20.0 - extent
    return _write_series(
        out,
        ct_datasets(
            volume,
            (_OTHER_SPACING_Z, spacing[1], spacing[2]),
            series_number=series_number,
            series_description=description,
            protocol_name=f"{part.title()} routine",
            body_part=part,
            kernel=kernel,
            orientation=_AXIAL,
            origin=(chest_origin[0], chest_origin[1], z0),
            **common,
        ),
        seed=seed,
        shuffle=shuffle,
        patient_sex=sex,
        patient_age=age,
    )
