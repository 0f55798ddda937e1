"""Synthetic CT series written as real DICOM, for tests, demos and benchmarks.

Everything downstream (listener, spool, volume assembly, selection, SR writing) must be exercised
on objects that a validator accepts, in every transfer syntax a PACS sends, without shipping
patient data. So the objects here carry every Type 1 and Type 2 attribute of the CT Image and
Enhanced CT Image IODs and validate cleanly with dicom3tools' ``dciodvfy``.

Pixel encoding (one choice for every object written here): stored values are unsigned 16-bit with
``RescaleIntercept = -1024`` and ``RescaleSlope = 1``, i.e. ``stored = round(HU) + 1024``. That is
what most scanners send, it keeps pixel data unsigned (the one form every codec, JPEG-LS and JPEG
Lossless included, treats the same everywhere) and ``BitsStored`` is 12 whenever the volume fits
in -1024..3071 HU, else 16. HU below -1024 are clipped to -1024, as scanners do; HU above the
largest storable value (3071 for 12 bits, 64511 for 16) are clipped too.

UIDs are random (``2.25.`` + UUID4) unless a ``seed`` is given, in which case every UID is a
``2.25.`` UUID5 of the seed and what the object is (the series UID covers SOP class, series
number and description, kernel, image type, modality, shape, spacing and thickness), so tests and
benchmarks are reproducible, writing the same series twice yields the same instances (as the
DESIGN's idempotency rules expect), and two different series made from one seed never collide.
Compression never changes a UID: the same slice in any transfer syntax is the same instance.
"""

from __future__ import annotations

import heapq
import inspect
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, TypedDict, Unpack

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import dcmwrite
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

__all__ = [
    "CT_IMAGE_STORAGE",
    "DEFAULT_DATETIME",
    "ENHANCED_CT_IMAGE_STORAGE",
    "RESCALE_INTERCEPT",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "CTSeriesOptions",
    "SyntheticSeries",
    "ct_datasets",
    "enhanced_ct_dataset",
    "make_uid",
    "write_ct_series",
    "write_enhanced_ct",
]

CT_IMAGE_STORAGE: Final = UID("1.2.840.10008.5.1.4.1.1.2")
ENHANCED_CT_IMAGE_STORAGE: Final = UID("1.2.840.10008.5.1.4.1.1.2.1")
RESCALE_INTERCEPT: Final = -1024

SUPPORTED_TRANSFER_SYNTAXES: Final[tuple[UID, ...]] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEGLosslessSV1,
)
_UNCOMPRESSED: Final = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})

# A fixed default date keeps objects made with a seed byte-for-byte reproducible.
DEFAULT_DATETIME: Final = datetime(2024, 1, 2, 9, 30, 0)
# Namespace of the UUID5 UIDs; any constant works, it only has to never change.
_UID_NAMESPACE: Final = uuid.UUID("8b7c1f0e-5a0d-4f3e-9f43-6f1b2b7d5e10")
_MANUFACTURER: Final = "radfinder-node"
_MODEL: Final = "synthetic phantom"
_SOFTWARE: Final = "radfinder-node synthetic 1"
# Soft tissue (mediastinal) then lung window, the two a chest reader flips between.
_WINDOWS: Final = ((40.0, 400.0, "SOFT_TISSUE"), (-600.0, 1500.0, "LUNG"))
# SNOMED CT 51185008 "Chest" (CID 4031), the anatomic region of every frame.
_CHEST_CODE: Final = ("51185008", "SCT", "Chest")
# DCM 113691 "IEC Body Dosimetry Phantom" (CID 4052), what a body CTDIvol refers to.
_BODY_PHANTOM: Final = ("113691", "DCM", "IEC Body Dosimetry Phantom")


# Input volumes: any real numeric dtype, float HU or integer HU.
_Volume = npt.NDArray[Any]


class CTSeriesOptions(TypedDict, total=False):
    """Keyword options shared by :func:`ct_datasets` and both writers (see there for meaning)."""

    study_uid: str | None
    series_uid: str | None
    frame_of_reference_uid: str | None
    patient_id: str
    patient_name: str
    accession_number: str
    study_id: str
    study_description: str
    series_description: str
    protocol_name: str
    body_part: str
    series_number: int
    image_type: Sequence[str]
    kernel: str
    slice_thickness: float | None
    origin: tuple[float, float, float] | None
    orientation: Sequence[float]
    modality: str
    transfer_syntax: str
    study_datetime: datetime
    seed: int | str | None


@dataclass(frozen=True)
class SyntheticSeries:
    """What was made, so a test can find it again; ``paths`` is empty for in-memory datasets."""

    study_uid: str
    series_uid: str
    sop_uids: tuple[str, ...]
    paths: tuple[Path, ...] = ()


def make_uid(seed: int | str | None = None, *parts: object) -> str:
    """A ``2.25.`` UID: random without a seed, else derived from the seed and ``parts``.

    Derivation (UUID5, PS3.5 B.2) rather than a counter so that a UID depends only on what the
    object is, never on what else was generated before it.
    """
    if seed is None:
        return f"2.25.{uuid.uuid4().int}"
    name = "\x1f".join(str(p) for p in (seed, *parts))
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


@dataclass(frozen=True)
class _Geometry:
    """Where each slice is in patient space; derived once so files and frames agree."""

    rows: int
    columns: int
    spacing: tuple[float, float, float]
    orientation: tuple[float, ...]
    normal: npt.NDArray[np.float64]
    origin: npt.NDArray[np.float64]

    def position(self, k: int) -> list[float]:
        pos = self.origin + k * self.spacing[0] * self.normal
        return [_ds_float(v) for v in pos]

    def slice_location(self, k: int) -> float:
        return _ds_float(float(np.dot(self.origin, self.normal)) + k * self.spacing[0])


@dataclass(frozen=True)
class _Params:
    """Validated options; one place turns keyword arguments into what the modules need."""

    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    patient_id: str
    patient_name: str
    accession_number: str
    study_id: str
    study_description: str
    series_description: str
    protocol_name: str
    body_part: str
    series_number: int
    image_type: tuple[str, ...]
    kernel: str
    slice_thickness: float
    modality: str
    transfer_syntax: UID
    study_datetime: datetime
    seed: int | str | None
    bits_stored: int


def _ds_float(v: float) -> float:
    """Round to what a DS value can carry (16 characters) so dcmwrite never has to refuse."""
    r = round(float(v), 6)
    return 0.0 if r == 0 else r


def _as_volume(hu: npt.ArrayLike) -> _Volume:
    arr = np.asarray(hu)
    if arr.ndim != 3 or 0 in arr.shape:
        raise ValueError(f"hu must be a non-empty [z, y, x] array, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"hu must be numeric, got dtype {arr.dtype}")
    return arr


def _geometry(
    shape: tuple[int, ...],
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float] | None,
    orientation: Sequence[float],
) -> _Geometry:
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive (z, y, x) mm values, got {spacing}")
    if len(orientation) != 6:
        raise ValueError(f"orientation must have six direction cosines, got {orientation}")
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:], dtype=np.float64)
    if abs(np.linalg.norm(row) - 1) > 1e-4 or abs(np.linalg.norm(col) - 1) > 1e-4:
        raise ValueError(f"orientation vectors must be unit length, got {orientation}")
    if abs(float(np.dot(row, col))) > 1e-4:
        raise ValueError(f"orientation vectors must be orthogonal, got {orientation}")
    normal = np.cross(row, col)
    nz, ny, nx = shape
    sz, sy, sx = spacing
    if origin is None:
        # Centre the volume on the scanner isocentre, as a reconstruction usually is.
        start = -(row * (nx - 1) * sx + col * (ny - 1) * sy + normal * (nz - 1) * sz) / 2
    else:
        start = np.asarray(origin, dtype=np.float64)
    return _Geometry(
        rows=ny,
        columns=nx,
        spacing=(float(sz), float(sy), float(sx)),
        orientation=tuple(_ds_float(v) for v in orientation),
        normal=normal,
        origin=start,
    )


def _bits_stored(arr: _Volume) -> int:
    """12 bits when the data fit (most CT), 16 otherwise; the IODs allow only these two."""
    return 12 if float(np.max(arr)) - RESCALE_INTERCEPT <= 4095 else 16


def _stored(slice_hu: _Volume, bits: int) -> npt.NDArray[np.uint16]:
    """HU to stored values; clipping is deliberate, see the module docstring."""
    top = (1 << bits) - 1
    if np.issubdtype(slice_hu.dtype, np.floating):
        # float32 holds every integer a 16-bit store can, and is half the work of float64.
        vals = np.rint(slice_hu.astype(np.promote_types(slice_hu.dtype, np.float32)))
    else:
        vals = slice_hu.astype(np.int64)
    vals -= RESCALE_INTERCEPT
    np.clip(vals, 0, top, out=vals)
    out: npt.NDArray[np.uint16] = vals.astype(np.uint16)
    return out


def _params(
    arr: _Volume,
    spacing: tuple[float, float, float],
    sop_class: UID,
    *,
    study_uid: str | None,
    series_uid: str | None,
    frame_of_reference_uid: str | None,
    patient_id: str,
    patient_name: str,
    accession_number: str,
    study_id: str,
    study_description: str,
    series_description: str,
    protocol_name: str,
    body_part: str,
    series_number: int,
    image_type: Sequence[str],
    kernel: str,
    slice_thickness: float | None,
    modality: str,
    transfer_syntax: str,
    study_datetime: datetime,
    seed: int | str | None,
) -> _Params:
    ts = UID(transfer_syntax)
    if ts not in SUPPORTED_TRANSFER_SYNTAXES:
        names = ", ".join(f"{u} ({u.name})" for u in SUPPORTED_TRANSFER_SYNTAXES)
        raise ValueError(f"unsupported transfer syntax {ts}; use one of {names}")
    if isinstance(image_type, str) or len(image_type) < 2:
        raise ValueError(f"image_type needs at least two values, got {image_type!r}")
    study = study_uid or make_uid(seed, "study")
    # Everything that makes two series of one seed different goes into the series UID, so a
    # test that writes a thin and a thick series (or classic and enhanced) gets two series.
    series = series_uid or make_uid(
        seed,
        study,
        "series",
        sop_class,
        series_number,
        series_description,
        kernel,
        "\\".join(image_type),
        modality,
        arr.shape,
        tuple(float(v) for v in spacing),
        slice_thickness,
    )
    frame = frame_of_reference_uid or make_uid(seed, study, "frame-of-reference")
    return _Params(
        study_uid=study,
        series_uid=series,
        frame_of_reference_uid=frame,
        patient_id=patient_id,
        patient_name=patient_name,
        accession_number=accession_number,
        study_id=study_id,
        study_description=study_description,
        series_description=series_description,
        protocol_name=protocol_name,
        body_part=body_part,
        series_number=series_number,
        image_type=tuple(image_type),
        kernel=kernel,
        slice_thickness=float(spacing[0] if slice_thickness is None else slice_thickness),
        modality=modality,
        transfer_syntax=ts,
        study_datetime=study_datetime,
        seed=seed,
        bits_stored=_bits_stored(arr),
    )


# ---------------------------------------------------------------------------------------------
# Modules shared by both IODs


def _file_meta(sop_class: UID, sop_instance: str, ts: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "RADFINDER_SYN1"
    return meta


def _common_modules(ds: Dataset, p: _Params, geo: _Geometry) -> None:
    """Patient, General Study, Patient Study, General Series, Frame of Reference, Equipment."""
    date = p.study_datetime.strftime("%Y%m%d")
    time = p.study_datetime.strftime("%H%M%S")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = date
    ds.SeriesDate = date
    ds.ContentDate = date
    ds.StudyTime = time
    ds.SeriesTime = time
    ds.ContentTime = time
    ds.AccessionNumber = p.accession_number
    ds.Modality = p.modality
    ds.Manufacturer = _MANUFACTURER
    ds.InstitutionName = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = p.study_description
    ds.SeriesDescription = p.series_description
    ds.ManufacturerModelName = _MODEL
    ds.PatientName = p.patient_name
    ds.PatientID = p.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientAge = "050Y"
    ds.BodyPartExamined = p.body_part
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = _SOFTWARE
    ds.ProtocolName = p.protocol_name
    ds.PatientPosition = "HFS"
    if not p.body_part:
        # Laterality is Type 2C on a paired body part; unknown body part, so send it empty.
        ds.Laterality = ""
    ds.StudyInstanceUID = p.study_uid
    ds.SeriesInstanceUID = p.series_uid
    ds.StudyID = p.study_id
    ds.SeriesNumber = p.series_number
    ds.FrameOfReferenceUID = p.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Rows = geo.rows
    ds.Columns = geo.columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = p.bits_stored
    ds.HighBit = p.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"


def _acquisition_values(p: _Params, geo: _Geometry) -> dict[str, float]:
    """Plausible scanner settings for a chest protocol; validators need them, nothing reads them."""
    fov = max(geo.rows * geo.spacing[1], geo.columns * geo.spacing[2])
    return {
        "kvp": 120.0,
        "ma": 200.0,
        "exposure_ms": 500.0,
        "fov": _ds_float(fov),
        "pitch": 1.0,
        "collimation": 38.4,
        "revolution_s": 0.5,
    }


def _windows(ds: Dataset) -> None:
    ds.WindowCenter = [w[0] for w in _WINDOWS]
    ds.WindowWidth = [w[1] for w in _WINDOWS]
    ds.WindowCenterWidthExplanation = [w[2] for w in _WINDOWS]


# ---------------------------------------------------------------------------------------------
# CT Image Storage, one file per slice


def _ct_template(p: _Params, geo: _Geometry) -> Dataset:
    """Everything constant across the slices of a series, built once."""
    acq = _acquisition_values(p, geo)
    ds = Dataset()
    _common_modules(ds, p, geo)
    ds.ImageType = list(p.image_type)
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.AcquisitionDate = ds.StudyDate
    ds.AcquisitionTime = ds.StudyTime
    ds.SliceThickness = _ds_float(p.slice_thickness)
    ds.KVP = acq["kvp"]
    ds.DataCollectionDiameter = 500.0
    ds.ReconstructionDiameter = acq["fov"]
    ds.GantryDetectorTilt = 0.0
    ds.TableHeight = 150.0
    ds.RotationDirection = "CW"
    ds.ExposureTime = int(acq["exposure_ms"])
    ds.XRayTubeCurrent = int(acq["ma"])
    ds.Exposure = int(acq["ma"] * acq["revolution_s"])
    ds.ConvolutionKernel = p.kernel
    ds.RevolutionTime = acq["revolution_s"]
    ds.SingleCollimationWidth = 0.6
    ds.TotalCollimationWidth = acq["collimation"]
    ds.SpiralPitchFactor = acq["pitch"]
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = list(geo.orientation)
    ds.PixelSpacing = [_ds_float(geo.spacing[1]), _ds_float(geo.spacing[2])]
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1
    if "LOCALIZER" not in p.image_type:
        # A localizer is a projection, not HU; dciodvfy flags HU there and knows no other term
        # for CT ("US" draws a warning), so localizers go without.
        ds.RescaleType = "HU"
    _windows(ds)
    return ds


def _ct_slice(
    template: Dataset,
    p: _Params,
    geo: _Geometry,
    k: int,
    pixels: npt.NDArray[np.uint16],
) -> Dataset:
    ds = Dataset()
    # Fresh elements per slice (not shared with the template) so a caller that edits one
    # slice cannot silently edit the others.
    for elem in template:
        ds.add_new(elem.tag, elem.VR, _copy_value(elem.value))
    sop_uid = make_uid(p.seed, p.series_uid, "instance", k + 1)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = geo.position(k)
    ds.SliceLocation = geo.slice_location(k)
    ds.file_meta = _file_meta(CT_IMAGE_STORAGE, sop_uid, p.transfer_syntax)
    _set_pixels(ds, pixels, p.transfer_syntax, p.bits_stored)
    return ds


def _copy_value(value: object) -> object:
    """Multi-valued elements are the only mutable values a template holds."""
    return list(value) if isinstance(value, MultiValue | list) else value


def _set_pixels(ds: Dataset, pixels: npt.NDArray[np.uint16], ts: UID, bits: int) -> None:
    """Native or encapsulated Pixel Data; ``pixels`` is one frame [y, x] or frames [n, y, x]."""
    if ts in _UNCOMPRESSED:
        ds.file_meta.TransferSyntaxUID = ts
        ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
        ds["PixelData"].VR = "OW"
        return
    if ts == JPEGLosslessSV1:
        # pydicom has no encoder for this syntax and no installed plugin adds one, yet PACS
        # commonly send it; the small encoder below covers it.
        frames = pixels.reshape(-1, *pixels.shape[-2:])
        ds.PixelData = encapsulate([_jpeg_lossless_sv1(f, bits) for f in frames])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = ts
        return
    ds.compress(ts, pixels, generate_instance_uid=False)


def ct_datasets(
    hu: npt.ArrayLike,
    spacing: tuple[float, float, float],
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    patient_id: str = "SYNTH0001",
    patient_name: str = "Synthetic^Patient",
    accession_number: str = "",
    study_id: str = "1",
    study_description: str = "CT CHEST",
    series_description: str = "Chest 1.0 B30f",
    protocol_name: str = "Chest routine",
    body_part: str = "CHEST",
    series_number: int = 2,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    kernel: str = "B30f",
    slice_thickness: float | None = None,
    origin: tuple[float, float, float] | None = None,
    orientation: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    modality: str = "CT",
    transfer_syntax: str = ExplicitVRLittleEndian,
    study_datetime: datetime = DEFAULT_DATETIME,
    seed: int | str | None = None,
) -> Iterator[Dataset]:
    """CT Image Storage datasets (with file meta), one per z index of ``hu`` ([z, y, x], HU).

    ``spacing`` is (z, y, x) in mm; ``origin`` the LPS position of the first slice's first pixel
    (default: volume centred on the isocentre); slice k lies at ``origin + k * spacing_z`` along
    the normal of ``orientation``. A generator, so a 300-slice series never needs 300 datasets
    in memory at once. Raises ValueError on bad shape, geometry or transfer syntax before the
    first slice.
    """
    arr = _as_volume(hu)
    geo = _geometry(arr.shape, spacing, origin, orientation)
    p = _params(
        arr,
        spacing,
        CT_IMAGE_STORAGE,
        study_uid=study_uid,
        series_uid=series_uid,
        frame_of_reference_uid=frame_of_reference_uid,
        patient_id=patient_id,
        patient_name=patient_name,
        accession_number=accession_number,
        study_id=study_id,
        study_description=study_description,
        series_description=series_description,
        protocol_name=protocol_name,
        body_part=body_part,
        series_number=series_number,
        image_type=image_type,
        kernel=kernel,
        slice_thickness=slice_thickness,
        modality=modality,
        transfer_syntax=transfer_syntax,
        study_datetime=study_datetime,
        seed=seed,
    )
    return _iter_slices(arr, p, geo)


def _iter_slices(arr: _Volume, p: _Params, geo: _Geometry) -> Iterator[Dataset]:
    template = _ct_template(p, geo)
    for k in range(arr.shape[0]):
        yield _ct_slice(template, p, geo, k, _stored(arr[k], p.bits_stored))


def write_ct_series(
    out_dir: str | Path,
    hu: npt.ArrayLike,
    spacing: tuple[float, float, float],
    **options: Unpack[CTSeriesOptions],
) -> SyntheticSeries:
    """Write one ``<SOPInstanceUID>.dcm`` Part 10 file per slice into ``out_dir`` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sop_uids: list[str] = []
    paths: list[Path] = []
    study = series = ""
    for ds in ct_datasets(hu, spacing, **options):
        path = out / f"{ds.SOPInstanceUID}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        sop_uids.append(str(ds.SOPInstanceUID))
        paths.append(path)
        study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    return SyntheticSeries(study, series, tuple(sop_uids), tuple(paths))


# ---------------------------------------------------------------------------------------------
# Enhanced CT Image Storage, one multi-frame file


def _item(**elements: object) -> Dataset:
    """A sequence item from keyword=value pairs; keeps the functional groups readable."""
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def _seq(*items: Dataset) -> DicomSequence:
    return DicomSequence(list(items))


def _enhanced_image_type(image_type: tuple[str, ...]) -> list[str]:
    """Enhanced CT needs exactly four values; value 3 AXIAL of the classic IOD becomes VOLUME."""
    if image_type[1] != "PRIMARY":
        raise ValueError(
            f"Enhanced CT allows only PRIMARY as value 2 of ImageType, got {image_type[1]!r}"
        )
    values = list(image_type[:4])
    if len(values) > 2 and values[2] == "AXIAL":
        values[2] = "VOLUME"
    while len(values) < 3:
        values.append("VOLUME")
    if len(values) < 4:
        values.append("NONE")
    return values


def _kernel_group(kernel: str) -> str:
    """A coarse ConvolutionKernelGroup (Type 1 in Enhanced CT) from the kernel name."""
    k = kernel.upper()
    if any(tag in k for tag in ("LUNG", "BONE", "SHARP")) or k[:1] in {"L", "D", "E", "Y"}:
        return "LUNG"
    digits = "".join(c for c in k if c.isdigit())
    if digits and int(digits[:2]) >= 50:
        return "LUNG"
    return "SOFT_TISSUE"


def _shared_groups(p: _Params, geo: _Geometry, frame_type: list[str]) -> Dataset:
    acq = _acquisition_values(p, geo)
    original = frame_type[0] == "ORIGINAL"
    code, scheme, meaning = _CHEST_CODE
    group = _item(
        PixelMeasuresSequence=_seq(
            _item(
                PixelSpacing=[_ds_float(geo.spacing[1]), _ds_float(geo.spacing[2])],
                SliceThickness=_ds_float(p.slice_thickness),
            )
        ),
        PlaneOrientationSequence=_seq(_item(ImageOrientationPatient=list(geo.orientation))),
        PixelValueTransformationSequence=_seq(
            _item(RescaleIntercept=RESCALE_INTERCEPT, RescaleSlope=1, RescaleType="HU")
        ),
        FrameVOILUTSequence=_seq(
            _item(
                WindowCenter=[w[0] for w in _WINDOWS],
                WindowWidth=[w[1] for w in _WINDOWS],
                WindowCenterWidthExplanation=[w[2] for w in _WINDOWS],
            )
        ),
        FrameAnatomySequence=_seq(
            _item(
                AnatomicRegionSequence=_seq(
                    _item(CodeValue=code, CodingSchemeDesignator=scheme, CodeMeaning=meaning)
                ),
                FrameLaterality="U",
            )
        ),
        IrradiationEventIdentificationSequence=_seq(
            _item(IrradiationEventUID=make_uid(p.seed, p.series_uid, "irradiation-event"))
        ),
        CTImageFrameTypeSequence=_seq(
            _item(
                FrameType=frame_type,
                PixelPresentation="MONOCHROME",
                VolumetricProperties="VOLUME",
                VolumeBasedCalculationTechnique="NONE",
            )
        ),
        CTReconstructionSequence=_seq(
            _item(
                ReconstructionAlgorithm="FILTER_BACK_PROJ",
                ConvolutionKernel=p.kernel,
                ConvolutionKernelGroup=_kernel_group(p.kernel),
                ReconstructionDiameter=acq["fov"],
                ReconstructionPixelSpacing=[
                    _ds_float(geo.spacing[1]),
                    _ds_float(geo.spacing[2]),
                ],
                ReconstructionAngle=360.0,
                ImageFilter="NONE",
            )
        ),
    )
    if original:
        # The acquisition macros are conditional on ORIGINAL frames; derived frames omit them.
        group.CTAcquisitionTypeSequence = _seq(
            _item(AcquisitionType="SPIRAL", ConstantVolumeFlag="NO", FluoroscopyFlag="NO")
        )
        group.CTAcquisitionDetailsSequence = _seq(
            _item(
                DataCollectionDiameter=500.0,
                RevolutionTime=acq["revolution_s"],
                SingleCollimationWidth=0.6,
                TotalCollimationWidth=acq["collimation"],
                TableHeight=150.0,
                GantryDetectorTilt=0.0,
                RotationDirection="CW",
            )
        )
        group.CTTableDynamicsSequence = _seq(
            _item(
                TableSpeed=_ds_float(acq["pitch"] * acq["collimation"] / acq["revolution_s"]),
                TableFeedPerRotation=_ds_float(acq["pitch"] * acq["collimation"]),
                SpiralPitchFactor=acq["pitch"],
            )
        )
        group.CTGeometrySequence = _seq(
            _item(DistanceSourceToDetector=1085.6, DistanceSourceToDataCollectionCenter=595.0)
        )
        group.CTExposureSequence = _seq(
            _item(
                ExposureTimeInms=acq["exposure_ms"],
                XRayTubeCurrentInmA=acq["ma"],
                ExposureInmAs=_ds_float(acq["ma"] * acq["revolution_s"]),
                ExposureModulationType="NONE",
                CTDIvol=8.0,
                CTDIPhantomTypeCodeSequence=_seq(
                    _item(
                        CodeValue=_BODY_PHANTOM[0],
                        CodingSchemeDesignator=_BODY_PHANTOM[1],
                        CodeMeaning=_BODY_PHANTOM[2],
                    )
                ),
            )
        )
        group.CTXRayDetailsSequence = _seq(
            _item(KVP=acq["kvp"], FocalSpots=[1.2], FilterType="BODY", FilterMaterial=["AL"])
        )
    return group


def _per_frame_group(p: _Params, geo: _Geometry, k: int, original: bool) -> Dataset:
    when = p.study_datetime.strftime("%Y%m%d%H%M%S")
    position = geo.position(k)
    group = _item(
        FrameContentSequence=_seq(
            _item(
                FrameAcquisitionNumber=1,
                FrameReferenceDateTime=when,
                FrameAcquisitionDateTime=when,
                FrameAcquisitionDuration=500.0,
                StackID="1",
                InStackPositionNumber=k + 1,
                DimensionIndexValues=[1, k + 1],
            )
        ),
        PlanePositionSequence=_seq(_item(ImagePositionPatient=position)),
    )
    if original:
        centre = [position[0], position[1], position[2]]
        group.CTPositionSequence = _seq(
            _item(
                TablePosition=_ds_float(position[2]),
                ReconstructionTargetCenterPatient=centre,
                DataCollectionCenterPatient=centre,
            )
        )
    return group


def _dimensions(ds: Dataset, organisation_uid: str) -> None:
    """Stack + in-stack position, the usual dimensions of a single volume."""
    ds.DimensionOrganizationSequence = _seq(_item(DimensionOrganizationUID=organisation_uid))
    ds.DimensionOrganizationType = "3D"
    frame_content = 0x00209111  # FrameContentSequence
    ds.DimensionIndexSequence = _seq(
        _item(
            DimensionOrganizationUID=organisation_uid,
            DimensionIndexPointer=0x00209056,  # StackID
            FunctionalGroupPointer=frame_content,
            DimensionDescriptionLabel="Stack ID",
        ),
        _item(
            DimensionOrganizationUID=organisation_uid,
            DimensionIndexPointer=0x00209057,  # InStackPositionNumber
            FunctionalGroupPointer=frame_content,
            DimensionDescriptionLabel="In-Stack Position Number",
        ),
    )


def enhanced_ct_dataset(
    hu: npt.ArrayLike,
    spacing: tuple[float, float, float],
    **options: Unpack[CTSeriesOptions],
) -> Dataset:
    """One Enhanced CT Image Storage dataset holding every slice of ``hu`` as a frame.

    Same options and geometry as :func:`ct_datasets`. Frame k sits where slice k would. The
    shared functional groups carry what is constant (pixel measures, orientation, rescale,
    windows, anatomy, frame type and the CT acquisition macros), the per-frame groups carry
    position and frame content, which is how enhanced readers expect a volume.
    """
    arr = _as_volume(hu)
    merged = {**_ct_defaults(), **options}
    geo = _geometry(arr.shape, spacing, merged.pop("origin"), merged.pop("orientation"))
    p = _params(arr, spacing, ENHANCED_CT_IMAGE_STORAGE, **merged)
    frame_type = _enhanced_image_type(p.image_type)
    original = frame_type[0] == "ORIGINAL"
    sop_uid = make_uid(p.seed, p.series_uid, "enhanced-instance", 1)

    ds = Dataset()
    _common_modules(ds, p, geo)
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = frame_type
    ds.InstanceNumber = 1
    ds.AcquisitionNumber = 1
    ds.ContentQualification = "RESEARCH"
    # Image-level copies of the frame description (Common CT/MR Image Description macro).
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionContextSequence = DicomSequence([])
    if original:
        ds.AcquisitionDateTime = p.study_datetime.strftime("%Y%m%d%H%M%S")
        ds.AcquisitionDuration = 0.5 * arr.shape[0]
    ds.NumberOfFrames = arr.shape[0]
    _dimensions(ds, make_uid(p.seed, p.series_uid, "dimension-organisation"))
    ds.SharedFunctionalGroupsSequence = _seq(_shared_groups(p, geo, frame_type))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(
        [_per_frame_group(p, geo, k, original) for k in range(arr.shape[0])]
    )
    ds.file_meta = _file_meta(ENHANCED_CT_IMAGE_STORAGE, sop_uid, p.transfer_syntax)
    pixels = np.stack([_stored(arr[k], p.bits_stored) for k in range(arr.shape[0])])
    _set_pixels(ds, pixels, p.transfer_syntax, p.bits_stored)
    return ds


def _ct_defaults() -> dict[str, Any]:
    """The keyword defaults of :func:`ct_datasets`, so the enhanced writer cannot drift."""
    return {
        name: param.default
        for name, param in inspect.signature(ct_datasets).parameters.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY
    }


def write_enhanced_ct(
    out_path: str | Path,
    hu: npt.ArrayLike,
    spacing: tuple[float, float, float],
    **options: Unpack[CTSeriesOptions],
) -> SyntheticSeries:
    """Write :func:`enhanced_ct_dataset` as one Part 10 file at ``out_path``."""
    ds = enhanced_ct_dataset(hu, spacing, **options)
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(path, ds, enforce_file_format=True)
    return SyntheticSeries(
        str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), (str(ds.SOPInstanceUID),), (path,)
    )


# ---------------------------------------------------------------------------------------------
# JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14, Selection Value 1)
#
# ITU-T T.81 Annex H with predictor 1 (left neighbour) and a per-frame optimal Huffman table
# (Annex K.2). Vectorised with numpy; a 512x512 frame takes tens of milliseconds.


def _jpeg_lossless_sv1(frame: npt.NDArray[np.uint16], precision: int) -> bytes:
    """Encode one frame; round-trips exactly through libjpeg (pylibjpeg) and dcmtk."""
    rows, cols = frame.shape
    ssss, extra, extra_len = _jpeg_differences(frame.astype(np.int64), precision)
    bits, huffval = _optimal_huffman(np.bincount(ssss, minlength=17))
    code, code_len = _canonical_codes(bits, huffval)
    value = (code[ssss] << extra_len) | extra
    length = code_len[ssss] + extra_len
    scan = _pack_bits(value, length)
    header = bytearray(b"\xff\xd8")
    header += b"\xff\xc3" + _u16(11) + bytes([precision]) + _u16(rows) + _u16(cols)
    header += bytes([1, 1, 0x11, 0])
    header += b"\xff\xc4" + _u16(2 + 1 + 16 + len(huffval)) + bytes([0x00])
    header += bytes(bits[1:17]) + bytes(huffval)
    header += b"\xff\xda" + _u16(8) + bytes([1, 1, 0x00, 1, 0, 0])
    return bytes(header) + scan + b"\xff\xd9"


def _u16(v: int) -> bytes:
    return int(v).to_bytes(2, "big")


def _jpeg_differences(
    x: npt.NDArray[np.int64], precision: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Per-sample category SSSS and the additional bits (T.81 H.1.2, F.1.2.1.1)."""
    pred = np.empty_like(x)
    pred[:, 1:] = x[:, :-1]  # Ra, predictor 1
    pred[1:, 0] = x[:-1, 0]  # first column predicts from above
    pred[0, 0] = 1 << (precision - 1)
    diff = ((x - pred) & 0xFFFF).ravel()
    diff = np.where(diff > 0x8000, diff - 0x10000, diff)  # modulo 2^16 into -32767..32768
    magnitude = np.abs(diff)
    ssss = np.frexp(magnitude.astype(np.float64))[1].astype(np.int64)  # bit length; 0 for 0
    extra_len = np.where(ssss == 16, 0, ssss)
    mask = (np.int64(1) << extra_len) - 1
    extra = np.where(diff < 0, diff - 1, diff) & mask
    return ssss, extra, extra_len


def _optimal_huffman(counts: npt.NDArray[np.int64]) -> tuple[list[int], list[int]]:
    """BITS and HUFFVAL of an optimal table limited to 16-bit codes (T.81 K.2, as libjpeg)."""
    n = len(counts)
    freq = [int(c) for c in counts] + [1]  # the reserved symbol keeps all-ones codes unused
    size = [0] * (n + 1)
    others = [-1] * (n + 1)
    heap = [(f, -i) for i, f in enumerate(freq) if f > 0]
    heapq.heapify(heap)
    while len(heap) > 1:
        f1, c1 = heapq.heappop(heap)
        f2, c2 = heapq.heappop(heap)
        v1, v2 = -c1, -c2
        heapq.heappush(heap, (f1 + f2, -v1 if v1 < v2 else -v2))
        # Merge the two chains (K.2 Figure K.1): every member of both gets one more bit.
        a, b = (v1, v2) if v1 < v2 else (v2, v1)
        size[a] += 1
        while others[a] >= 0:
            a = others[a]
            size[a] += 1
        others[a] = b
        size[b] += 1
        while others[b] >= 0:
            b = others[b]
            size[b] += 1
    bits = [0] * 33
    for s in size:
        if s:
            bits[s] += 1
    for i in range(32, 16, -1):  # K.2 Figure K.3: no code longer than 16 bits
        while bits[i] > 0:
            j = i - 2
            while bits[j] == 0:
                j -= 1
            bits[i] -= 2
            bits[i - 1] += 1
            bits[j + 1] += 2
            bits[j] -= 1
    i = 16
    while bits[i] == 0:
        i -= 1
    bits[i] -= 1  # drop the reserved symbol, which has the longest code
    order = sorted((size[s], s) for s in range(n) if size[s] > 0)
    return bits[:17], [s for _, s in order]


def _canonical_codes(
    bits: list[int], huffval: list[int]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Code and length per symbol from BITS/HUFFVAL (T.81 Annex C)."""
    code_of = np.zeros(17, dtype=np.int64)
    len_of = np.zeros(17, dtype=np.int64)
    code = 0
    k = 0
    for length in range(1, 17):
        for _ in range(bits[length]):
            code_of[huffval[k]] = code
            len_of[huffval[k]] = length
            code += 1
            k += 1
        code <<= 1
    return code_of, len_of


def _pack_bits(value: npt.NDArray[np.int64], length: npt.NDArray[np.int64]) -> bytes:
    """Concatenate variable-length codes MSB first, pad with ones, stuff 0x00 after 0xFF."""
    ends = np.cumsum(length)
    total = int(ends[-1]) if len(ends) else 0
    owner = np.repeat(np.arange(len(length)), length)
    shift = ends[owner] - 1 - np.arange(total)
    stream = ((value[owner] >> shift) & 1).astype(np.uint8)
    pad = (-total) % 8
    if pad:
        stream = np.concatenate([stream, np.ones(pad, dtype=np.uint8)])
    packed = np.packbits(stream)
    ff = np.flatnonzero(packed == 0xFF)
    if len(ff):
        packed = np.insert(packed, ff + 1, 0)
    return packed.tobytes()
