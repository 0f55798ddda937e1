"""Whole synthetic studies: valid objects of every kind, the shape of PACS traffic, reproducible.

dciodvfy judges validity (an object only pydicom accepts proves nothing about PACS traffic).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.uid import RLELossless

from dicom_io.synthetic_study import SyntheticStudy, write_study
from engines.data.phantoms import basic_chest_phantom

SPACING = (5.0, 6.0, 6.0)
SHAPE = (12, 40, 40)


@pytest.fixture(scope="module")
def chest() -> npt.NDArray[np.float32]:
    return basic_chest_phantom(SHAPE, SPACING, seed=2)


def study(out: Path, hu: npt.NDArray[np.float32], **overrides: Any) -> SyntheticStudy:
    args: dict[str, Any] = {
        "seed": 42,
        "accession_number": "ACC42",
        "patient_id": "PAT42",
        "patient_name": "Test^Patient",
        "patient_sex": "F",
        "patient_age": 63,
        "with_scout": True,
        "with_non_chest": True,
        "non_chest_body_parts": ("ABDOMEN", "HEAD"),
    }
    args.update(overrides)
    return write_study(out, hu, SPACING, **args)


def dciodvfy_errors(path: Path) -> tuple[str, list[str]]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return (lines[0] if lines else ""), [ln for ln in lines if ln.startswith("Error")]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed")
def test_every_kind_of_object_validates(tmp_path: Path, chest: npt.NDArray[np.float32]) -> None:
    s = study(tmp_path, chest, shuffle=True, transfer_syntax=RLELossless)
    kinds = [s.chest, s.non_chest[0], s.non_chest[1]]
    assert s.scout is not None
    kinds.append(s.scout)
    for series in kinds:
        iod, errors = dciodvfy_errors(series.paths[0])
        assert iod == "CTImage"
        assert errors == [], (series.paths[0], errors)


def test_series_are_what_a_scanner_sends(tmp_path: Path, chest: npt.NDArray[np.float32]) -> None:
    s = study(tmp_path, chest)
    assert [len(x.paths) for x in s.series] == [1, SHAPE[0], 8, 8]
    first = {x.series_uid: pydicom.dcmread(x.paths[0]) for x in s.series}
    assert {str(ds.StudyInstanceUID) for ds in first.values()} == {s.study_uid}
    by_number = {int(ds.SeriesNumber): ds for ds in first.values()}
    assert sorted(by_number) == [1, 2, 3, 4]
    scout = by_number[1]
    assert list(scout.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert [float(v) for v in scout.ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]
    assert (scout.Rows, scout.Columns) == (SHAPE[0], SHAPE[2])
    assert by_number[2].BodyPartExamined == "CHEST"
    assert by_number[3].BodyPartExamined == "ABDOMEN"
    assert by_number[4].BodyPartExamined == "HEAD"
    for ds in first.values():
        assert ds.PatientPosition == "HFS"
        assert (ds.PatientSex, ds.PatientAge) == ("F", "063Y")
        assert (ds.AccessionNumber, ds.PatientID) == ("ACC42", "PAT42")
    # The abdomen lies below the chest, the head above.
    chest_z = [float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in s.chest.paths]
    assert float(by_number[3].ImagePositionPatient[2]) + 35 < min(chest_z)
    assert float(by_number[4].ImagePositionPatient[2]) > max(chest_z)
    # The chest pixels are the volume given.
    hu = pydicom.dcmread(s.chest.paths[3]).pixel_array.astype(np.float32) - 1024
    assert np.array_equal(hu, np.clip(np.rint(chest[3]), -1024, None))


def test_numbering_from_the_top(tmp_path: Path, chest: npt.NDArray[np.float32]) -> None:
    s = study(tmp_path, chest, numbering="superior", with_scout=False, with_non_chest=False)
    n = SHAPE[0]
    assert s.instance_numbers == tuple(range(n, 0, -1))
    for z in range(n):
        ds = pydicom.dcmread(s.chest.paths[z])
        assert str(ds.SOPInstanceUID) == s.sop_uid_of_z(z)
        assert int(ds.InstanceNumber) == s.instance_number_of_z(z) == n - z
        assert s.z_of_instance_number(int(ds.InstanceNumber)) == z
    z_of = {int(pydicom.dcmread(p).InstanceNumber): p for p in s.chest.paths}
    top = float(pydicom.dcmread(z_of[1]).ImagePositionPatient[2])
    bottom = float(pydicom.dcmread(z_of[n]).ImagePositionPatient[2])
    assert top > bottom  # image 1 is the most superior slice


def test_shuffled_names_say_nothing(tmp_path: Path, chest: npt.NDArray[np.float32]) -> None:
    s = study(tmp_path, chest, shuffle=True)
    files = sorted(p for p in tmp_path.iterdir() if p.is_file())
    assert len(files) == len(s.paths) and not any(p.is_dir() for p in tmp_path.iterdir())
    numbers = [
        (int(ds.SeriesNumber), int(ds.InstanceNumber))
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in files)
    ]
    assert numbers != sorted(numbers)
    assert all(p.suffix == "" and len(p.name) == 20 for p in files)


def test_same_seed_same_bytes(tmp_path: Path, chest: npt.NDArray[np.float32]) -> None:
    a = study(tmp_path / "a", chest, shuffle=True)
    b = study(tmp_path / "b", chest, shuffle=True)
    names_a = sorted(p.relative_to(tmp_path / "a") for p in a.paths)
    names_b = sorted(p.relative_to(tmp_path / "b") for p in b.paths)
    assert names_a == names_b
    for name in names_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other = study(tmp_path / "c", chest, seed=43, with_scout=False, with_non_chest=False)
    assert other.study_uid != a.study_uid
    assert set(other.chest.sop_uids).isdisjoint(a.chest.sop_uids)


def test_bad_arguments(tmp_path: Path, chest: npt.NDArray[np.float32]) -> None:
    with pytest.raises(ValueError, match="patient_age"):
        study(tmp_path, chest, patient_age="63 years")
    with pytest.raises(ValueError, match="numbering"):
        study(tmp_path, chest, numbering="middle")
