"""Volume assembly (dicom_io.volume): real scanner series first, then synthetic edge cases.

Real series come from ../shared/data/real (see MANIFEST.md there); synthetic ones are written
here with pydicom, small (32x32), so each rule is tested on exactly the defect it guards.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from dicom_io import volume as volume_module
from dicom_io.volume import (
    DuplicatePositionError,
    GantryTiltError,
    MissingSlicesError,
    MixedGeometryError,
    MultipleSeriesError,
    NotAnImageSeriesError,
    UnevenSpacingError,
    Volume,
    VolumeError,
    load_volume,
    load_volume_dir,
)

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / ".." / "shared" / "data" / "real"
LUNG = REAL / "lung-pet-ct-dx" / "Lung-PET-CT-Dx" / "manifest-1675442780019" / "Lung-PET-CT-Dx"
A0001 = LUNG / "Lung_Dx-A0001" / "04-04-2007-NA-Chest-07990"
A0002 = LUNG / "Lung_Dx-A0002" / "04-25-2007-NA-ThoraxAThoraxRoutine Adult-34834"
TOTALSEG = REAL / "totalsegmentator" / "example_ct_dicom"
ELSCINT = REAL / "dcm4che" / "dcm4che-test-data" / "src" / "main" / "resources"
ELSCINT_FILE = ELSCINT / "CT-JPEGLosslessSV1.dcm"
QA = REAL / "dcm_qa_ct"
PHILIPS_TILT = QA / "Philips" / "S21610"
PHILIPS_AXIAL = QA / "Philips" / "S21570" / "S2010"

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
FloatArray = npt.NDArray[np.float64]


# --------------------------------------------------------------------------- helpers


def dicom_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name != "DIRFILE")


def headers_by_uid(directory: Path) -> dict[str, Dataset]:
    out = {}
    for path in dicom_files(directory):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uid = str(ds.SOPInstanceUID) or str(ds.file_meta.MediaStorageSOPInstanceUID)
        out[uid] = ds
    return out


def index_to_lps(vol: Volume, z: float, y: float, x: float) -> FloatArray:
    return (vol.affine @ np.array([z, y, x, 1.0]))[:3]


def assert_affine_matches_headers(vol: Volume, directory: Path) -> None:
    """Every z index lands on its own slice's ImagePositionPatient, in increasing order."""
    headers = headers_by_uid(directory)
    normal = vol.affine[:3, 0] / vol.spacing[0]
    previous = -math.inf
    for z, uid in enumerate(vol.sop_instance_uids):
        ipp = np.array(headers[uid].ImagePositionPatient, dtype=np.float64)
        assert np.allclose(index_to_lps(vol, z, 0, 0), ipp, atol=1e-3)
        assert float(ipp @ normal) > previous
        previous = float(ipp @ normal)
        number = headers[uid].get("InstanceNumber")
        assert vol.instance_numbers[z] == (None if number in (None, "") else int(number))


def sitk_read(paths: Sequence[Path] | Path) -> tuple[npt.NDArray[np.float32], sitk.Image]:
    reader = sitk.ImageSeriesReader()
    if isinstance(paths, Path):
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(paths)))
    else:
        reader.SetFileNames([str(p) for p in paths])
    reader.SetOutputPixelType(sitk.sitkFloat32)
    image = reader.Execute()
    return sitk.GetArrayFromImage(image), image


def assert_same_as_sitk(vol: Volume, directory: Path) -> None:
    arr, image = sitk_read(directory)
    assert arr.shape == vol.hu.shape
    assert np.allclose(arr, vol.hu)
    assert np.allclose(image.GetOrigin(), vol.affine[:3, 3], atol=1e-4)
    assert np.allclose(image.GetSpacing()[::-1], vol.spacing, atol=1e-4)


# --------------------------------------------------------------------------- real data


LUNG_SERIES = [
    pytest.param(A0001 / "2.000000-5mm-40805", 64, 5.0, id="A0001-series2-L"),
    pytest.param(A0001 / "3.000000-5mm-41315", 64, 5.0, id="A0001-series3-B"),
    pytest.param(A0002 / "2.000000-ThoraxRoutine  8.0.0  B70f-62919", 30, 8.0, id="A0002-B70f"),
    pytest.param(A0002 / "3.000000-ThoraxRoutine  8.0.0  B40f-10983", 30, 8.0, id="A0002-B40f"),
]


@pytest.mark.parametrize(("directory", "slices", "dz"), LUNG_SERIES)
def test_lung_pet_ct_dx_series(directory: Path, slices: int, dz: float) -> None:
    vol = load_volume_dir(directory)
    assert vol.hu.shape == (slices, 512, 512)
    assert vol.hu.dtype == np.float32
    assert vol.spacing[0] == pytest.approx(dz, abs=1e-3)
    assert len(set(vol.sop_instance_uids)) == slices
    assert_affine_matches_headers(vol, directory)
    # A chest CT: air outside the body, soft tissue and bone inside.
    assert vol.hu.min() <= -1000
    assert 1000 < vol.hu.max() < 4000
    assert np.mean((vol.hu > -100) & (vol.hu < 100)) > 0.05
    assert np.mean(vol.hu < -500) > 0.2


def test_lung_two_kernels_share_one_z_grid() -> None:
    first = load_volume_dir(A0001 / "2.000000-5mm-40805")
    second = load_volume_dir(A0001 / "3.000000-5mm-41315")
    assert np.allclose(first.affine, second.affine)
    assert first.sop_instance_uids != second.sop_instance_uids


def test_lung_hu_equal_simpleitk() -> None:
    directory = A0002 / "2.000000-ThoraxRoutine  8.0.0  B70f-62919"
    assert_same_as_sitk(load_volume_dir(directory), directory)


def test_study_directory_with_two_series_needs_a_choice() -> None:
    with pytest.raises(MultipleSeriesError) as err:
        load_volume_dir(A0001)
    assert "2 series" in err.value.reason
    assert sorted(err.value.series.values()) == [64, 64]
    chosen = sorted(err.value.series)[0]
    vol = load_volume_dir(A0001, series_uid=chosen)
    assert vol.hu.shape[0] == 64
    with pytest.raises(VolumeError, match="not under"):
        load_volume_dir(A0001, series_uid="1.2.3.4")


def test_totalsegmentator_jpeg2000_overlapping_empty_sop_class() -> None:
    files = dicom_files(TOTALSEG)
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert header.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert header.SOPClassUID == ""  # the quirk this series is here for
    assert float(header.SliceThickness) == 3.0
    vol = load_volume(list(reversed(files)))
    assert vol.hu.shape == (20, 512, 512)
    assert vol.spacing[0] == pytest.approx(2.0)  # from positions, not the 3 mm thickness
    # Empty SOPInstanceUID too: the per-z UIDs come from the file meta.
    assert all(uid.startswith("1.3.12.2.1107.5.1.4.60064.") for uid in vol.sop_instance_uids)
    assert_affine_matches_headers(vol, TOTALSEG)
    assert_same_as_sitk(vol, TOTALSEG)


def test_elscint_single_slice_jpeg_lossless() -> None:
    vol = load_volume([ELSCINT_FILE])
    ds = pydicom.dcmread(ELSCINT_FILE)
    assert vol.hu.shape == (1, 512, 512)
    assert vol.spacing == pytest.approx((float(ds.SliceThickness), 0.488281, 0.488281))
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.array_equal(vol.hu[0], expected.astype(np.float32))
    assert np.allclose(sitk_read([ELSCINT_FILE])[0], vol.hu)
    # Plausible HU: air around the head, bone at most a few thousand.
    assert vol.hu.min() >= -1024
    assert vol.hu.max() < 4000
    assert np.mean(vol.hu < -900) > 0.2
    assert np.allclose(index_to_lps(vol, 0, 0, 0), ds.ImagePositionPatient)


def test_elscint_directory_single_slice() -> None:
    assert load_volume_dir(ELSCINT).hu.shape == (1, 512, 512)


def test_ge_tilted_uneven_series_is_rejected() -> None:
    with pytest.raises((GantryTiltError, UnevenSpacingError)) as err:
        load_volume_dir(QA / "GE")
    assert isinstance(err.value, GantryTiltError)
    assert err.value.angle_deg == pytest.approx(18.5, abs=0.05)
    # Both defects are named: dcm2niix's notes list tilt and 1.14/4.22/7.38 mm gaps.
    assert "tilt" in err.value.reason
    assert "uneven slice spacing" in err.value.reason


def test_philips_tilted_series_is_rejected() -> None:
    with pytest.raises(GantryTiltError) as err:
        load_volume_dir(PHILIPS_TILT / "S2010")
    assert err.value.angle_deg == pytest.approx(18.5, abs=0.05)
    assert "18.50 degrees" in err.value.reason
    assert "-18.5" in err.value.reason  # the header's own (signed) value is quoted


def test_philips_plain_axial_series_loads() -> None:
    vol = load_volume_dir(PHILIPS_AXIAL)  # the DIRFILE (a DICOMDIR) beside it is ignored
    assert vol.hu.shape == (28, 512, 512)
    assert vol.spacing[0] == pytest.approx(5.0)
    assert_affine_matches_headers(vol, PHILIPS_AXIAL)


def test_philips_scout_is_not_a_volume() -> None:
    with pytest.raises(NotAnImageSeriesError, match="localizer"):
        load_volume_dir(PHILIPS_TILT / "S1000")


def test_philips_exam_summary_is_not_a_volume() -> None:
    with pytest.raises(NotAnImageSeriesError, match="Secondary Capture"):
        load_volume_dir(PHILIPS_TILT / "S4010")


def test_philips_exam_with_scout_summary_and_axial_lists_series() -> None:
    with pytest.raises(MultipleSeriesError, match="3 series"):
        load_volume_dir(PHILIPS_TILT)


def test_mixing_a_scout_file_into_a_series_is_an_error() -> None:
    paths = [*dicom_files(PHILIPS_AXIAL), PHILIPS_TILT / "S1000" / "I10"]
    with pytest.raises(MultipleSeriesError):
        load_volume(paths)


# --------------------------------------------------------------------------- synthetic series


def stored_values(n: int, size: int, seed: int = 0) -> npt.NDArray[np.int16]:
    rng = np.random.default_rng(seed)
    return rng.integers(-1024, 2000, size=(n, size, size)).astype(np.int16)


def ct_slice(
    pixels: npt.NDArray[np.integer],
    position: Sequence[float],
    *,
    series_uid: str,
    number: int | None = 1,
    orientation: Sequence[float] = AXIAL,
    pixel_spacing: Sequence[float] = (0.7, 0.7),
    slope: float = 1.0,
    intercept: float = -1024.0,
    sop_class: str = CTImageStorage,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    bits_stored: int = 16,
    thickness: float | None = 1.0,
) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.ImageType = list(image_type)
    ds.Modality = "CT"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 3
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.2"
    if number is not None:
        ds.InstanceNumber = number
    ds.ImagePositionPatient = [round(float(v), 6) for v in position]
    ds.ImageOrientationPatient = [round(float(v), 6) for v in orientation]
    ds.PixelSpacing = list(pixel_spacing)
    if thickness is not None:
        ds.SliceThickness = thickness
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelData = pixels.tobytes()
    return ds


def save(ds: Dataset, path: Path, syntax: str = ExplicitVRLittleEndian) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if syntax == ExplicitVRBigEndian:
        # pydicom writes big endian only on request and never swaps pixel bytes itself.
        ds.PixelData = ds.pixel_array.byteswap().tobytes()
        ds.file_meta.TransferSyntaxUID = syntax
        ds.preamble = b"\0" * 128  # Part 10 form; enforce_file_format refuses force_encoding
        dcmwrite(path, ds, implicit_vr=False, little_endian=False, force_encoding=True)
        return path
    if syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        ds.compress(syntax, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(
    directory: Path,
    n: int = 10,
    *,
    size: int = 32,
    z: Sequence[float] | None = None,
    slopes: Sequence[float] | None = None,
    intercepts: Sequence[float] | None = None,
    syntax: str = ExplicitVRLittleEndian,
    series_uid: str | None = None,
    pixels: npt.NDArray[np.integer] | None = None,
    **slice_options: object,
) -> tuple[list[Path], npt.NDArray[np.float32]]:
    """Write an axial series (slice k at z[k]); return the paths and the expected HU by k."""
    directory.mkdir(parents=True, exist_ok=True)
    zs = list(z) if z is not None else [10.0 + 2.5 * k for k in range(n)]
    raw = pixels if pixels is not None else stored_values(len(zs), size)
    slopes = list(slopes) if slopes is not None else [1.0] * len(zs)
    intercepts = list(intercepts) if intercepts is not None else [-1024.0] * len(zs)
    uid = series_uid or generate_uid()
    paths, expected = [], []
    for k, zk in enumerate(zs):
        ds = ct_slice(
            raw[k],
            (-11.0, -12.0, zk),
            series_uid=uid,
            number=k + 1,
            slope=slopes[k],
            intercept=intercepts[k],
            **slice_options,  # type: ignore[arg-type]
        )
        paths.append(save(ds, directory / f"slice{k:03d}.dcm", syntax))
        expected.append(raw[k].astype(np.float64) * slopes[k] + intercepts[k])
    return paths, np.array(expected, dtype=np.float32)


def test_synthetic_series_loads_with_geometry(tmp_path: Path) -> None:
    paths, expected = write_series(tmp_path, 10)
    vol = load_volume(paths)
    assert np.array_equal(vol.hu, expected)
    assert vol.spacing == pytest.approx((2.5, 0.7, 0.7))
    assert np.allclose(vol.affine[:3, 3], (-11.0, -12.0, 10.0))
    assert np.allclose(index_to_lps(vol, 9, 31, 1), (-11.0 + 0.7, -12.0 + 31 * 0.7, 32.5))
    assert vol.instance_numbers == tuple(range(1, 11))
    geometry = vol.geometry()
    assert json.loads(json.dumps(geometry)) == geometry
    assert geometry["shape"] == [10, 32, 32]
    assert geometry["slice_count"] == 10
    assert geometry["first_sop_uid"] == vol.sop_instance_uids[0]
    assert geometry["last_sop_uid"] == vol.sop_instance_uids[-1]
    assert geometry["orientation"] == pytest.approx(list(AXIAL))
    assert geometry["origin"] == pytest.approx([-11.0, -12.0, 10.0])
    assert np.allclose(geometry["affine"], vol.affine)


def test_shuffled_file_order_is_sorted_by_position(tmp_path: Path) -> None:
    paths, expected = write_series(tmp_path, 10)
    reference = load_volume(paths)
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(len(paths))
        vol = load_volume([paths[int(i)] for i in order])
        assert np.array_equal(vol.hu, expected)
        assert vol.sop_instance_uids == reference.sop_instance_uids


def test_sorting_uses_position_not_instance_number(tmp_path: Path) -> None:
    # Instance numbers run head to feet here; z order must still be by position.
    paths, expected = write_series(tmp_path, 6, z=[50.0 - 5 * k for k in range(6)])
    vol = load_volume(paths)
    assert np.array_equal(vol.hu, expected[::-1])
    assert vol.instance_numbers == (6, 5, 4, 3, 2, 1)
    assert vol.affine[2, 3] == pytest.approx(25.0)


def test_missing_slice(tmp_path: Path) -> None:
    paths, _ = write_series(tmp_path, 10)
    with pytest.raises(MissingSlicesError) as err:
        load_volume(paths[:4] + paths[5:])
    assert "missing" in err.value.reason
    assert "5.000 mm" in err.value.reason


def test_uneven_spacing(tmp_path: Path) -> None:
    paths, _ = write_series(tmp_path, z=[0, 2, 4, 6, 7, 9, 11, 13.5])
    with pytest.raises(UnevenSpacingError, match="uneven"):
        load_volume(paths)


def test_spacing_tolerance_is_relative(tmp_path: Path) -> None:
    paths, _ = write_series(tmp_path, z=[0, 2, 4, 6.05, 8.05, 10.05])
    with pytest.raises(UnevenSpacingError):
        load_volume(paths)  # 0.05 mm is 2.5 % of 2 mm
    assert load_volume(paths, spacing_tolerance=0.05).spacing[0] == pytest.approx(2.0)


def test_duplicate_position_with_different_uids(tmp_path: Path) -> None:
    paths, _ = write_series(tmp_path, z=[0, 2, 4, 4, 6])
    with pytest.raises(DuplicatePositionError, match="share a position"):
        load_volume(paths)


def test_same_instance_twice_is_not_a_duplicate(tmp_path: Path) -> None:
    paths, expected = write_series(tmp_path, 5)
    vol = load_volume([*paths, paths[2]])
    assert np.array_equal(vol.hu, expected)


def test_mixed_orientation(tmp_path: Path) -> None:
    paths, _ = write_series(tmp_path / "a", 6)
    odd = ct_slice(
        stored_values(1, 32)[0],
        (-11.0, -12.0, 25.0),
        series_uid=str(pydicom.dcmread(paths[0]).SeriesInstanceUID),
        orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
    )
    with pytest.raises(MixedGeometryError, match="orientation"):
        load_volume([*paths, save(odd, tmp_path / "odd.dcm")])


def test_mixed_matrix_size(tmp_path: Path) -> None:
    paths, _ = write_series(tmp_path / "a", 6)
    uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
    odd = ct_slice(stored_values(1, 16)[0], (-11.0, -12.0, 25.0), series_uid=uid)
    with pytest.raises(MixedGeometryError, match="matrix size"):
        load_volume([*paths, save(odd, tmp_path / "odd.dcm")])


def test_mixed_pixel_spacing(tmp_path: Path) -> None:
    paths, _ = write_series(tmp_path / "a", 6)
    uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
    odd = ct_slice(
        stored_values(1, 32)[0], (-11.0, -12.0, 25.0), series_uid=uid, pixel_spacing=(0.8, 0.8)
    )
    with pytest.raises(MixedGeometryError, match="PixelSpacing"):
        load_volume([*paths, save(odd, tmp_path / "odd.dcm")])


def test_synthetic_gantry_tilt(tmp_path: Path) -> None:
    tilt = math.radians(12.0)
    orientation = (1.0, 0.0, 0.0, 0.0, math.cos(tilt), -math.sin(tilt))
    raw = stored_values(8, 32)
    uid = generate_uid()
    paths = [
        save(
            ct_slice(raw[k], (0.0, 0.0, 3.0 * k), series_uid=uid, orientation=orientation),
            tmp_path / f"{k}.dcm",
        )
        for k in range(8)
    ]
    with pytest.raises(GantryTiltError) as err:
        load_volume(paths)
    assert err.value.angle_deg == pytest.approx(12.0, abs=0.01)


def test_oblique_stack_along_its_normal_is_not_tilt(tmp_path: Path) -> None:
    """A rotated slice plane is fine as long as slices step along their own normal."""
    angle = math.radians(20.0)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, math.cos(angle), -math.sin(angle)])
    normal = np.cross(row, col)
    raw = stored_values(6, 32)
    uid = generate_uid()
    paths = [
        save(
            ct_slice(raw[k], 2.0 * k * normal, series_uid=uid, orientation=(*row, *col)),
            tmp_path / f"{k}.dcm",
        )
        for k in range(6)
    ]
    vol = load_volume(paths)
    assert vol.spacing[0] == pytest.approx(2.0)
    assert np.allclose(index_to_lps(vol, 5, 0, 0), 10.0 * normal, atol=1e-4)
    assert np.allclose(index_to_lps(vol, 0, 1, 0), 0.7 * col, atol=1e-6)


def test_per_slice_rescale(tmp_path: Path) -> None:
    slopes = [1.0, 0.5, 2.0, 1.0, 0.25, 1.0]
    intercepts = [-1024.0, -1000.0, -2048.0, 0.0, -512.5, -1024.0]
    paths, expected = write_series(tmp_path, 6, slopes=slopes, intercepts=intercepts)
    vol = load_volume(paths)
    assert np.allclose(vol.hu, expected)
    assert not np.allclose(vol.hu[1], vol.hu[2])


def test_overlapping_slices_take_spacing_from_positions(tmp_path: Path) -> None:
    paths, _ = write_series(tmp_path, 6, z=[2.0 * k for k in range(6)], thickness=3.0)
    assert load_volume(paths).spacing[0] == pytest.approx(2.0)


@pytest.mark.parametrize(
    "syntax",
    [
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
        RLELossless,
        JPEGLSLossless,
        JPEG2000Lossless,
    ],
)
def test_other_transfer_syntaxes_decode_identically(tmp_path: Path, syntax: str) -> None:
    plain, expected = write_series(tmp_path / "plain", 5)
    other, _ = write_series(tmp_path / "other", 5, syntax=syntax, pixels=stored_values(5, 32))
    assert pydicom.dcmread(other[0]).file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(load_volume(other).hu, load_volume(plain).hu)
    assert np.array_equal(load_volume(other).hu, expected)


def test_unused_high_bits_are_ignored_like_pydicom(tmp_path: Path) -> None:
    """12 bits stored in 16: the native fast path masks like the pydicom decoders do."""
    clean = np.random.default_rng(1).integers(0, 4096, size=(4, 32, 32)).astype(np.uint16)
    dirty = clean | np.uint16(0xA000)  # garbage above bit 11
    paths, _ = write_series(tmp_path / "n", 4, pixels=dirty, bits_stored=12)
    rle, _ = write_series(tmp_path / "r", 4, pixels=dirty, bits_stored=12, syntax=RLELossless)
    expected = clean.astype(np.float32) - 1024
    assert np.array_equal(load_volume(paths).hu, expected)
    assert np.array_equal(load_volume(rle).hu, expected)
    for path in paths:
        assert pydicom.dcmread(path).pixel_array.max() < 4096


def test_empty_sop_class_falls_back_to_file_meta(tmp_path: Path) -> None:
    paths, expected = write_series(tmp_path, 4)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ""
        ds.save_as(path)
    assert np.array_equal(load_volume(paths).hu, expected)


def test_localizer_in_the_series_is_an_error(tmp_path: Path) -> None:
    paths, _ = write_series(tmp_path / "a", 5)
    uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
    scout = ct_slice(
        stored_values(1, 32)[0],
        (-11.0, -12.0, 99.0),
        series_uid=uid,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    save(scout, tmp_path / "a" / "scout.dcm")
    with pytest.raises(NotAnImageSeriesError, match="localizer"):
        load_volume_dir(tmp_path / "a")


def test_secondary_capture_and_missing_pixels_are_not_images(tmp_path: Path) -> None:
    uid = generate_uid()
    sc = ct_slice(
        stored_values(1, 32)[0], (0, 0, 0), series_uid=uid, sop_class=SecondaryCaptureImageStorage
    )
    with pytest.raises(NotAnImageSeriesError, match="Secondary Capture"):
        load_volume([save(sc, tmp_path / "sc.dcm")])
    bare = ct_slice(stored_values(1, 32)[0], (0, 0, 0), series_uid=uid)
    del bare.PixelData
    with pytest.raises(NotAnImageSeriesError, match="no Pixel Data"):
        load_volume([save(bare, tmp_path / "bare.dcm")])


def test_directory_ignores_non_dicom_files(tmp_path: Path) -> None:
    _, expected = write_series(tmp_path / "s" / "nested", 5)
    (tmp_path / "s" / "README.txt").write_text("not DICOM")
    (tmp_path / "s" / "nested" / "notes.xml").write_text("<a/>")
    assert np.array_equal(load_volume_dir(tmp_path / "s").hu, expected)


def test_directory_with_two_series(tmp_path: Path) -> None:
    write_series(tmp_path / "one", 4)
    _, expected = write_series(tmp_path / "two", 5, series_uid="1.2.826.0.1.3680043.8.498.77")
    with pytest.raises(MultipleSeriesError, match="2 series") as err:
        load_volume_dir(tmp_path)
    assert err.value.series["1.2.826.0.1.3680043.8.498.77"] == 5
    vol = load_volume_dir(tmp_path, series_uid="1.2.826.0.1.3680043.8.498.77")
    assert np.array_equal(vol.hu, expected)


def test_empty_inputs(tmp_path: Path) -> None:
    with pytest.raises(NotAnImageSeriesError):
        load_volume_dir(tmp_path)
    with pytest.raises(NotAnImageSeriesError):
        load_volume([])


def test_single_slice_spacing_from_thickness(tmp_path: Path) -> None:
    paths, _ = write_series(tmp_path / "a", 1, thickness=1.25)
    assert load_volume(paths).spacing[0] == pytest.approx(1.25)
    bare, _ = write_series(tmp_path / "b", 1, thickness=None)
    with pytest.raises(VolumeError, match="z spacing unknown"):
        load_volume(bare)


def enhanced_ct(
    raw: npt.NDArray[np.int16], z: Sequence[float], intercepts: Sequence[float | None]
) -> Dataset:
    """Enhanced CT, frames in the given z order; a None intercept uses the shared group."""
    ds = Dataset()
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.Modality = "CT"
    ds.InstanceNumber = 7
    ds.NumberOfFrames = len(z)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = raw.shape[1:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([_item(PixelSpacing=[0.5, 0.6])])
    shared.PlaneOrientationSequence = DicomSequence([_item(ImageOrientationPatient=list(AXIAL))])
    shared.PixelValueTransformationSequence = DicomSequence(
        [_item(RescaleSlope=1, RescaleIntercept=-1024, RescaleType="HU")]
    )
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for zk, intercept in zip(z, intercepts, strict=True):
        group = _item(PlanePositionSequence=DicomSequence([_item(ImagePositionPatient=[5, 6, zk])]))
        if intercept is not None:
            transform = _item(RescaleSlope=1, RescaleIntercept=intercept, RescaleType="HU")
            group.PixelValueTransformationSequence = DicomSequence([transform])
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.PixelData = raw.tobytes()
    return ds


def _item(**values: object) -> Dataset:
    item = Dataset()
    for key, value in values.items():
        setattr(item, key, value)
    return item


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless])
def test_enhanced_ct_multiframe(tmp_path: Path, syntax: str) -> None:
    raw = stored_values(6, 32)
    z = [4.0, 0.0, 10.0, 2.0, 8.0, 6.0]  # frames stored out of order
    intercepts: list[float | None] = [None, -1000.0, None, None, -1000.0, None]
    path = save(enhanced_ct(raw, z, intercepts), tmp_path / "enhanced.dcm", syntax)
    vol = load_volume([path])
    order = np.argsort(z)
    expected = np.array(
        [raw[i].astype(np.float32) + (intercepts[i] or -1024.0) for i in order], np.float32
    )
    assert np.array_equal(vol.hu, expected)
    assert vol.spacing == pytest.approx((2.0, 0.5, 0.6))
    assert np.allclose(vol.affine[:3, 3], (5.0, 6.0, 0.0))
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    assert vol.sop_instance_uids == (uid,) * 6
    assert vol.instance_numbers == (7,) * 6


def test_enhanced_ct_missing_frame(tmp_path: Path) -> None:
    raw = stored_values(4, 32)
    path = save(enhanced_ct(raw, [0.0, 2.0, 6.0, 8.0], [None] * 4), tmp_path / "e.dcm")
    with pytest.raises(MissingSlicesError):
        load_volume([path])


def test_errors_carry_a_reason() -> None:
    for cls in (
        NotAnImageSeriesError,
        MixedGeometryError,
        MissingSlicesError,
        UnevenSpacingError,
        DuplicatePositionError,
    ):
        err = cls("why")
        assert isinstance(err, VolumeError)
        assert err.reason == "why" == str(err)
    tilt = GantryTiltError("tilted", 3.0)
    assert isinstance(tilt, VolumeError)
    assert tilt.angle_deg == 3.0


def test_library_stays_below_the_application() -> None:
    code = (
        "import sys, dicom_io.volume; "
        "bad = [m for m in ('torch', 'radfinder_node', 'engines', 'reports') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_native_pixels_skip_the_decoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syntax: str
) -> None:
    """Uncompressed little endian is read at the pass-1 offset; that is where the speed is."""
    paths, expected = write_series(tmp_path, 4, syntax=syntax)

    def refuse(*_: object) -> None:
        raise AssertionError("generic decoder used for native pixel data")

    monkeypatch.setattr(volume_module, "_read_decoded", refuse)
    assert np.array_equal(load_volume(paths).hu, expected)


def test_unreadable_inputs_are_volume_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a DICOM file at all\n" * 20)
    with pytest.raises(NotAnImageSeriesError):
        load_volume([text])
    with pytest.raises(VolumeError, match="cannot read"):
        load_volume([tmp_path / "absent.dcm"])
    with pytest.raises(VolumeError, match="not a directory"):
        load_volume_dir(tmp_path / "absent")


def test_truncated_pixel_data(tmp_path: Path) -> None:
    paths, _ = write_series(tmp_path, 3)
    paths[1].write_bytes(paths[1].read_bytes()[:-100])
    with pytest.raises(VolumeError):
        load_volume(paths)
