"""Assemble a CT series into a Hounsfield volume (DESIGN.md §3, "Volume").

Two passes, because most of the cost of a series is pixel bytes and most of the reasons to
reject one are in headers: pass 1 reads headers only (``stop_before_pixels``), sorts and
validates the geometry; pass 2 writes pixels into one preallocated float32 array. Native
little-endian pixel data, the common case from a PACS, is read straight from the file offset
found in pass 1 (no second header parse); everything else (JPEG Lossless, JPEG-LS, JPEG 2000,
RLE, deflate, big endian) goes through pydicom's pixel handlers.

Decisions callers rely on:

* z order is increasing position along the slice normal (row x column cosines), as in ITK.
* z spacing comes from positions (median gap), never SliceThickness; overlapping slices
  (3 mm thick every 2 mm) give 2 mm. A single slice is a valid 1-slice volume whose z spacing
  is SliceThickness, else SpacingBetweenSlices (else it is rejected): nothing else says.
* ``spacing_tolerance`` is relative to the median gap, with an absolute floor of
  :data:`dicom_io.geometry.POSITION_EPS_MM` because positions are written as rounded decimals.
* Enhanced / Legacy Converted Enhanced CT (multi-frame) is read per frame from the functional
  groups; every z index then carries that one instance's SOP Instance UID and InstanceNumber.
* An empty SOPClassUID (0008,0016) or SOPInstanceUID (0008,0018), as in anonymised exports,
  falls back to the file meta MediaStorageSOPClassUID / MediaStorageSOPInstanceUID.
* Localizers, secondary captures and other non-CT objects are never mixed in: they raise
  :class:`NotAnImageSeriesError` rather than being skipped, so a caller cannot get a volume
  that silently lacks or contains an object it did not expect. DICOMDIR files and files
  without the Part 10 "DICM" prefix are ignored when scanning a directory.
* Pixel padding values are left as they are (after rescale); windowing is the model's job.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from dicom_io.geometry import (
    DuplicatePositionError,
    GantryTiltError,
    MissingSlicesError,
    MixedGeometryError,
    MultipleSeriesError,
    NotAnImageSeriesError,
    StackGeometry,
    UnevenSpacingError,
    VolumeError,
    check_uniform,
    stack_geometry,
)

__all__ = [
    "DuplicatePositionError",
    "GantryTiltError",
    "MissingSlicesError",
    "MixedGeometryError",
    "MultipleSeriesError",
    "NotAnImageSeriesError",
    "UnevenSpacingError",
    "Volume",
    "VolumeError",
    "load_volume",
    "load_volume_dir",
]

PathLike = str | os.PathLike[str]
FloatArray = npt.NDArray[np.float64]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
_CT_CLASSES = frozenset({CT_IMAGE_STORAGE, ENHANCED_CT_STORAGE, LEGACY_ENHANCED_CT_STORAGE})
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
_NATIVE_LE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})
_PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")  # little, big endian
_OTHER_PIXEL_TAGS = (b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00", b"\x7f\xe0\x00\x08")
_MEDIA_DIRECTORY_MARK = "<DICOMDIR>"  # sop_uid of a DICOMDIR record: skipped when scanning


@dataclass(frozen=True, eq=False)
class Volume:
    """A CT volume in HU with the geometry and provenance the engines and SR writer need."""

    hu: npt.NDArray[np.float32]  # [z, y, x]
    spacing: tuple[float, float, float]  # mm (z, y, x)
    affine: FloatArray  # (z, y, x, 1) index -> LPS mm
    sop_instance_uids: tuple[str, ...]
    instance_numbers: tuple[int | None, ...]

    def __post_init__(self) -> None:
        z = self.hu.shape[0] if self.hu.ndim == 3 else -1
        if z < 1 or len(self.sop_instance_uids) != z or len(self.instance_numbers) != z:
            raise ValueError("hu must be [z, y, x] with one UID and instance number per z")
        if self.affine.shape != (4, 4):
            raise ValueError("affine must be 4x4")

    def geometry(self) -> dict[str, Any]:
        """A JSON-able summary, for logs, job records and the CLI."""
        a = self.affine
        spacing = np.asarray(self.spacing)
        return {
            "shape": [int(n) for n in self.hu.shape],
            "spacing": [float(s) for s in self.spacing],
            "affine": [[float(v) for v in row] for row in a],
            "slice_count": int(self.hu.shape[0]),
            "first_sop_uid": self.sop_instance_uids[0],
            "last_sop_uid": self.sop_instance_uids[-1],
            "orientation": [float(v) for v in (*a[:3, 2] / spacing[2], *a[:3, 1] / spacing[1])],
            "normal": [float(v) for v in a[:3, 0] / spacing[0]],
            "origin": [float(v) for v in a[:3, 3]],
        }


@dataclass(frozen=True, slots=True)
class _Frame:
    """One candidate z slice: a single-frame instance or one frame of a multi-frame one."""

    frame: int
    position: tuple[float, ...]
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, ...]
    slope: float
    intercept: float


@dataclass(frozen=True, slots=True)
class _Instance:
    """What pass 1 learns from one file's header; ``problem`` says why it is not a CT slice."""

    path: str
    sop_uid: str
    series_uid: str
    instance_number: int | None
    problem: str | None
    transfer_syntax: str
    rows: int
    cols: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    pixel_offset: int | None  # file offset of native LE pixel bytes (fast path)
    frames: tuple[_Frame, ...]
    z_fallback: float | None  # spacing for a lone slice
    gantry_tilt: float | None

    def label(self, frame: int) -> str:
        name = Path(self.path).name
        if len(self.frames) > 1:
            return f"{name} frame {frame + 1}"
        return name if self.instance_number is None else f"{name} (#{self.instance_number})"


# --------------------------------------------------------------------------- public API


def load_volume(
    paths: Sequence[PathLike],
    *,
    spacing_tolerance: float = 0.01,
    tilt_tolerance_deg: float = 0.1,
) -> Volume:
    """Load the files of one CT series as a volume, or raise a :class:`VolumeError`.

    ``spacing_tolerance``: allowed deviation of each gap from the median gap, relative to it
    (0.01 = 1 %), never less than 0.01 mm. ``tilt_tolerance_deg``: largest angle between the
    stacking direction and the slice normal accepted as "not tilted".
    """
    instances = [_read_given(os.fspath(p)) for p in paths]
    return _assemble(instances, spacing_tolerance, tilt_tolerance_deg)


def load_volume_dir(
    directory: PathLike,
    *,
    series_uid: str | None = None,
    spacing_tolerance: float = 0.01,
    tilt_tolerance_deg: float = 0.1,
) -> Volume:
    """Load the one series under ``directory`` (recursively), or the one named by UID.

    Several series without ``series_uid`` is an error listing them, not a guess. Files
    without the Part 10 prefix and DICOMDIRs are skipped; a file that claims to be DICOM but
    cannot be parsed is an error, since it may be one of the series' slices.
    """
    instances = _scan_directory(Path(directory))
    if not instances:
        raise NotAnImageSeriesError(f"no DICOM instances under {directory}")
    chosen = _select_series(instances, series_uid, str(directory))
    return _assemble(chosen, spacing_tolerance, tilt_tolerance_deg)


# --------------------------------------------------------------------------- pass 1: headers


def _scan_directory(directory: Path) -> list[_Instance]:
    if not directory.is_dir():
        raise VolumeError(f"not a directory: {directory}")
    found: list[_Instance] = []
    for path in _walk_files(directory):
        try:
            inst = _read_header(path, force=False)
        except InvalidDicomError:
            continue  # not a Part 10 file (README, CSV, XML annotations ...)
        if inst.sop_uid != _MEDIA_DIRECTORY_MARK:
            found.append(inst)
    return found


def _walk_files(directory: Path) -> Iterable[str]:
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            yield os.path.join(root, name)


def _select_series(
    instances: list[_Instance], series_uid: str | None, where: str
) -> list[_Instance]:
    groups = _group_by_series(instances)
    if series_uid is not None:
        if series_uid not in groups:
            raise VolumeError(
                f"series {series_uid} not under {where}; found: {_describe_series(groups)}"
            )
        return groups[series_uid]
    if len(groups) > 1:
        raise MultipleSeriesError(
            f"{where} holds {len(groups)} series, pass series_uid to choose one: "
            f"{_describe_series(groups)}",
            {uid: len(members) for uid, members in groups.items()},
        )
    return instances


def _group_by_series(instances: Iterable[_Instance]) -> dict[str, list[_Instance]]:
    groups: dict[str, list[_Instance]] = {}
    for inst in instances:
        groups.setdefault(inst.series_uid, []).append(inst)
    return groups


def _describe_series(groups: dict[str, list[_Instance]]) -> str:
    return "; ".join(
        f"{uid or '<no SeriesInstanceUID>'} ({_series_label(members[0].path)}, "
        f"{len(members)} files)"
        for uid, members in groups.items()
    )


def _series_label(path: str) -> str:
    """Modality, number, description and SOP class, for error messages only.

    Read again on demand rather than kept from pass 1, where converting descriptions (with
    their character sets) for every file would cost time on the path that succeeds.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # a label is best effort; the caller is already reporting an error
        return "unreadable"
    sop_class = _sop_class(_Header(ds))
    return " ".join(
        [
            str(ds.get("Modality", "") or "?"),
            f"series {ds.get('SeriesNumber', '?')}",
            repr(str(ds.get("SeriesDescription", "") or "")),
            UID(sop_class).name if sop_class else "no SOP class",
        ]
    )


def _read_given(path: str) -> _Instance:
    """A file the caller named is read even without the Part 10 prefix, and never skipped."""
    try:
        return _read_header(path, force=True)
    except InvalidDicomError as exc:
        raise NotAnImageSeriesError(f"{path} is not a DICOM file: {exc}") from exc


def _read_header(path: str, *, force: bool) -> _Instance:
    """Parse one file's header and find where its pixel bytes start, without reading them."""
    try:
        with open(path, "rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=force)
            pixel_tell = fp.tell()
            pixel_head = fp.read(12)
    except InvalidDicomError:
        raise
    except OSError as exc:
        raise VolumeError(f"cannot read {path}: {exc}") from exc
    except Exception as exc:  # pydicom raises many types on corrupt headers
        raise VolumeError(f"cannot parse DICOM header of {path}: {exc}") from exc
    header = _Header(ds)
    sop_class = _sop_class(header)
    if sop_class == _MEDIA_DIRECTORY:
        return _directory_record(path)
    try:
        return _instance_from_header(path, header, sop_class, pixel_tell, pixel_head)
    except (AttributeError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise NotAnImageSeriesError(f"{path}: malformed image attributes ({exc})") from exc


class _Header:
    """The few values pass 1 needs, decoded straight from the raw element bytes.

    pydicom converts values lazily, and converting the ~25 we need through its generic
    machinery costs as much as parsing the whole file. Text and US values of a little-endian
    dataset are decoded here; elements pydicom has already converted (file meta, character
    set) and big-endian datasets go through pydicom.
    """

    __slots__ = ("ds", "raw_ok")

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self.raw_ok = ds.original_encoding[1] is not False

    def strings(self, keyword: str) -> list[str]:
        tag = _tag(keyword)
        elem = self.ds.get_item(tag)
        if elem is None or elem.value is None:
            return []
        if self.raw_ok and isinstance(elem, RawDataElement):
            text = bytes(elem.value).decode("latin-1").strip(" \0")
            return [part.strip(" \0") for part in text.split("\\")] if text else []
        return [str(v).strip() for v in _as_list(self.ds[tag].value)]

    def string(self, keyword: str) -> str:
        return "\\".join(self.strings(keyword))

    def floats(self, keyword: str) -> list[float]:
        return [float(s) for s in self.strings(keyword)]

    def number(self, keyword: str) -> float | None:
        values = [s for s in self.strings(keyword) if s]
        return float(values[0]) if values else None

    def integer(self, keyword: str) -> int | None:
        """An IS value (InstanceNumber, NumberOfFrames); absent or empty is None."""
        value = self.number(keyword)
        return None if value is None else int(value)

    def ushort(self, keyword: str, default: int) -> int:
        tag = _tag(keyword)
        elem = self.ds.get_item(tag)
        if elem is None or elem.value in (None, b"", ""):
            return default
        if self.raw_ok and isinstance(elem, RawDataElement):
            return int.from_bytes(bytes(elem.value)[:2], "little")
        return int(self.ds[tag].value)


_TAGS: dict[str, int] = {}


def _tag(keyword: str) -> int:
    tag = _TAGS.get(keyword)
    if tag is None:
        found = tag_for_keyword(keyword)
        if found is None:
            raise KeyError(keyword)
        tag = _TAGS[keyword] = int(found)
    return tag


def _directory_record(path: str) -> _Instance:
    return _Instance(
        path=path,
        sop_uid=_MEDIA_DIRECTORY_MARK,
        series_uid="",
        instance_number=None,
        problem="a DICOMDIR, not an image",
        transfer_syntax="",
        rows=0,
        cols=0,
        bits_allocated=0,
        bits_stored=0,
        signed=False,
        pixel_offset=None,
        frames=(),
        z_fallback=None,
        gantry_tilt=None,
    )


def _sop_class(header: _Header) -> str:
    """SOPClassUID, or the file meta's when the dataset's is empty (a real-world quirk)."""
    return header.string("SOPClassUID") or _meta_value(header.ds, "MediaStorageSOPClassUID")


def _sop_instance_uid(header: _Header) -> str:
    return header.string("SOPInstanceUID") or _meta_value(header.ds, "MediaStorageSOPInstanceUID")


def _meta_value(ds: Dataset, keyword: str) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get(keyword, "") or "").strip() if meta is not None else ""


def _transfer_syntax(ds: Dataset) -> str:
    ts = _meta_value(ds, "TransferSyntaxUID")
    if ts:
        return ts
    return "1.2.840.10008.1.2" if ds.original_encoding[0] else "1.2.840.10008.1.2.1"


def _instance_from_header(
    path: str, header: _Header, sop_class: str, pixel_tell: int, pixel_head: bytes
) -> _Instance:
    ts = _transfer_syntax(header.ds)
    deflated = UID(ts).is_deflated
    problem = _problem(header, sop_class, pixel_head, deflated)
    frames: tuple[_Frame, ...] = ()
    if problem is None:
        frames = _frames(header, sop_class)
        problem = None if frames else "no ImagePositionPatient/ImageOrientationPatient"
    rows, cols = header.ushort("Rows", 0), header.ushort("Columns", 0)
    bits_allocated = header.ushort("BitsAllocated", 16)
    offset = None
    if problem is None and ts in _NATIVE_LE and not deflated:
        pixels = rows * cols * len(frames)
        offset = _native_pixel_offset(pixel_tell, pixel_head, pixels, bits_allocated)
    return _Instance(
        path=path,
        sop_uid=_sop_instance_uid(header),
        series_uid=header.string("SeriesInstanceUID"),
        instance_number=header.integer("InstanceNumber"),
        problem=problem,
        transfer_syntax=ts,
        rows=rows,
        cols=cols,
        bits_allocated=bits_allocated,
        bits_stored=header.ushort("BitsStored", bits_allocated),
        signed=header.ushort("PixelRepresentation", 0) == 1,
        pixel_offset=offset,
        frames=frames,
        z_fallback=_z_fallback(header),
        gantry_tilt=header.number("GantryDetectorTilt"),
    )


def _problem(header: _Header, sop_class: str, pixel_head: bytes, deflated: bool) -> str | None:
    """Why this object is not a CT slice we can stack, or None if it is one."""
    if not sop_class:
        return "no SOP Class UID in the dataset or the file meta"
    if sop_class not in _CT_CLASSES:
        return f"SOP class {UID(sop_class).name} ({sop_class}) is not a CT image"
    image_type = [s.upper() for s in header.strings("ImageType")]
    if "LOCALIZER" in image_type:
        return "a localizer (scout), ImageType " + "\\".join(image_type)
    if not _sop_instance_uid(header):
        return "no SOP Instance UID"
    samples = header.ushort("SamplesPerPixel", 1)
    if samples != 1:
        return f"SamplesPerPixel {samples}: not a grayscale CT image"
    if not deflated and pixel_head[:4] not in _PIXEL_DATA_TAGS:
        if pixel_head[:4] in _OTHER_PIXEL_TAGS:
            return "float pixel data, not stored CT values"
        return "no Pixel Data"
    if header.ushort("Rows", 0) < 1 or header.ushort("Columns", 0) < 1:
        return "no Rows/Columns"
    return None


def _native_pixel_offset(tell: int, head: bytes, pixels: int, bits: int) -> int | None:
    """Offset of the pixel bytes if the element header is what we expect, else None.

    The element is parsed from its bytes (explicit VR has 'OW'/'OB' and two reserved bytes)
    and its length is checked against Rows x Columns x frames, so a mislabeled transfer
    syntax falls back to pydicom instead of reading the wrong bytes.
    """
    if bits not in (8, 16, 32) or len(head) < 8:
        return None
    explicit = head[4:6] in (b"OW", b"OB") and head[6:8] == b"\0\0"
    length_bytes = head[8:12] if explicit else head[4:8]
    if len(length_bytes) < 4:
        return None
    length = int.from_bytes(length_bytes, "little")
    expected = pixels * bits // 8
    if length not in (expected, expected + 1):
        return None
    return tell + (12 if explicit else 8)


def _frames(header: _Header, sop_class: str) -> tuple[_Frame, ...]:
    if sop_class == CT_IMAGE_STORAGE and "PerFrameFunctionalGroupsSequence" not in header.ds:
        frame = _single_frame(header)
        return () if frame is None else (frame,)
    return _functional_group_frames(header.ds)


def _single_frame(header: _Header) -> _Frame | None:
    ipp, iop = header.floats("ImagePositionPatient"), header.floats("ImageOrientationPatient")
    if not ipp or not iop:
        return None
    return _Frame(
        frame=0,
        position=_floats(ipp, 3, "ImagePositionPatient"),
        orientation=_floats(iop, 6, "ImageOrientationPatient"),
        pixel_spacing=_floats(header.floats("PixelSpacing"), 2, "PixelSpacing"),
        slope=_or_default(header.number("RescaleSlope"), 1.0),
        intercept=_or_default(header.number("RescaleIntercept"), 0.0),
    )


def _functional_group_frames(ds: Dataset) -> tuple[_Frame, ...]:
    """Per-frame geometry and rescale of a multi-frame CT, per frame first, then shared."""
    shared = _shared_group(ds)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    count = int(ds.get("NumberOfFrames", len(per_frame)) or 1)
    frames = []
    for i in range(count):
        group = per_frame[i] if i < len(per_frame) else Dataset()
        ipp = _group_value(group, shared, "PlanePositionSequence", "ImagePositionPatient")
        iop = _group_value(group, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        if not ipp or not iop:
            return ()
        frames.append(_group_frame(i, group, shared, ipp, iop))
    return tuple(frames)


def _group_frame(i: int, group: Dataset, shared: Dataset, ipp: Any, iop: Any) -> _Frame:
    spacing = _group_value(group, shared, "PixelMeasuresSequence", "PixelSpacing")
    slope = _group_value(group, shared, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _group_value(group, shared, "PixelValueTransformationSequence", "RescaleIntercept")
    return _Frame(
        frame=i,
        position=_floats(_as_list(ipp), 3, "ImagePositionPatient"),
        orientation=_floats(_as_list(iop), 6, "ImageOrientationPatient"),
        pixel_spacing=_floats(_as_list(spacing), 2, "PixelSpacing"),
        slope=_or_default(_float_or_none(slope), 1.0),
        intercept=_or_default(_float_or_none(intercept), 0.0),
    )


def _group_value(group: Dataset, shared: Dataset, sequence: str, keyword: str) -> Any:
    for source in (group, shared):
        items = source.get(sequence)
        if items and keyword in items[0]:
            return items[0].get(keyword)
    return None


def _z_fallback(header: _Header) -> float | None:
    """SliceThickness, else SpacingBetweenSlices: only ever used for a lone slice.

    Thickness first because it is the physical extent of the one slice we have; spacing
    between slices describes neighbours that are not there (the Elscint sample says 99 mm).
    """
    measures = _shared_group(header.ds).get("PixelMeasuresSequence")
    candidates = [
        _float_or_none(measures[0].get("SliceThickness")) if measures else None,
        header.number("SliceThickness"),
        header.number("SpacingBetweenSlices"),
    ]
    return next((v for v in candidates if v is not None and v > 0), None)


def _shared_group(ds: Dataset) -> Dataset:
    items = ds.get("SharedFunctionalGroupsSequence")
    return items[0] if items else Dataset()


def _floats(values: Sequence[Any], n: int, name: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if len(out) != n:
        raise ValueError(f"{name} has {len(out)} values, expected {n}")
    return out


def _or_default(value: float | None, default: float) -> float:
    return default if value is None else value


def _as_list(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes | int | float):
        return [value]
    return list(value)


def _float_or_none(value: Any) -> float | None:
    if value is None or value == "":
        return None
    return float(value)


# --------------------------------------------------------------------------- assembly


def _assemble(instances: list[_Instance], spacing_tolerance: float, tilt_deg: float) -> Volume:
    if not instances:
        raise NotAnImageSeriesError("no DICOM files given")
    instances = _unique_instances(instances)
    _check_one_series(instances)
    _check_all_images(instances)
    slots = [(inst, frame) for inst in instances for frame in inst.frames]
    labels = [inst.label(frame.frame) for inst, frame in slots]
    check_uniform(
        np.array([f.orientation for _, f in slots], dtype=np.float64),
        np.array([f.pixel_spacing for _, f in slots], dtype=np.float64),
        np.array([(i.rows, i.cols) for i, _ in slots], dtype=np.int64),
        labels,
    )
    geometry = _stack(instances, slots, labels, spacing_tolerance, tilt_deg)
    ordered = [slots[int(i)] for i in geometry.order]
    hu = _read_pixels(ordered)
    return Volume(
        hu=hu,
        spacing=geometry.spacing,
        affine=geometry.affine(),
        sop_instance_uids=tuple(inst.sop_uid for inst, _ in ordered),
        instance_numbers=tuple(inst.instance_number for inst, _ in ordered),
    )


def _stack(
    instances: list[_Instance],
    slots: list[tuple[_Instance, _Frame]],
    labels: list[str],
    spacing_tolerance: float,
    tilt_deg: float,
) -> StackGeometry:
    first = slots[0][1]
    positions = np.array([f.position for _, f in slots], dtype=np.float64)
    try:
        return stack_geometry(
            positions,
            first.orientation,
            (first.pixel_spacing[0], first.pixel_spacing[1]),
            labels,
            spacing_tolerance=spacing_tolerance,
            tilt_tolerance_deg=tilt_deg,
            single_slice_spacing=slots[0][0].z_fallback,
        )
    except GantryTiltError as exc:
        tilt = instances[0].gantry_tilt
        if tilt is None:
            raise
        reason = f"{exc.reason}; GantryDetectorTilt (0018,1120) is {tilt:g}"
        raise GantryTiltError(reason, exc.angle_deg) from None


def _unique_instances(instances: list[_Instance]) -> list[_Instance]:
    """Drop repeated copies of one instance (the same object stored twice is not an error)."""
    seen: dict[str, _Instance] = {}
    out = []
    for inst in instances:
        if inst.sop_uid == _MEDIA_DIRECTORY_MARK:
            raise NotAnImageSeriesError(f"{inst.path} is a DICOMDIR, not an image")
        prior = seen.get(inst.sop_uid) if inst.sop_uid else None
        if prior is None:
            seen[inst.sop_uid] = inst
            out.append(inst)
        elif [f.position for f in prior.frames] != [f.position for f in inst.frames]:
            raise DuplicatePositionError(
                f"SOP Instance UID {inst.sop_uid} is in {prior.path} and {inst.path} "
                "with different positions"
            )
    return out


def _check_one_series(instances: list[_Instance]) -> None:
    groups = _group_by_series(instances)
    if len(groups) > 1:
        raise MultipleSeriesError(
            f"the files belong to {len(groups)} series: {_describe_series(groups)}",
            {uid: len(members) for uid, members in groups.items()},
        )


def _check_all_images(instances: list[_Instance]) -> None:
    bad = [inst for inst in instances if inst.problem is not None]
    if bad:
        first = bad[0]
        raise NotAnImageSeriesError(
            f"{len(bad)} of {len(instances)} objects are not CT image slices; "
            f"{Path(first.path).name}: {first.problem}"
        )


# --------------------------------------------------------------------------- pass 2: pixels


def _read_pixels(ordered: list[tuple[_Instance, _Frame]]) -> npt.NDArray[np.float32]:
    first = ordered[0][0]
    hu = np.empty((len(ordered), first.rows, first.cols), dtype=np.float32)
    by_file: dict[str, list[tuple[int, _Frame]]] = {}
    instances: dict[str, _Instance] = {}
    for z, (inst, frame) in enumerate(ordered):
        by_file.setdefault(inst.path, []).append((z, frame))
        instances[inst.path] = inst
    for path, targets in by_file.items():
        inst = instances[path]
        if inst.pixel_offset is not None:
            _read_native(inst, targets, hu)
        else:
            _read_decoded(inst, targets, hu)
    return hu


def _native_dtype(inst: _Instance) -> np.dtype[Any]:
    kind = "i" if inst.signed else "u"
    return np.dtype(f"<{kind}{inst.bits_allocated // 8}")


def _read_native(
    inst: _Instance, targets: list[tuple[int, _Frame]], hu: npt.NDArray[np.float32]
) -> None:
    """Read raw little-endian frames at the offset pass 1 found; no header parse, one copy."""
    assert inst.pixel_offset is not None
    dtype = _native_dtype(inst)
    buf = np.empty((inst.rows, inst.cols), dtype=dtype)
    frame_bytes = buf.nbytes
    view = buf.data.cast("B")
    with open(inst.path, "rb", buffering=0) as fp:
        for z, frame in targets:
            fp.seek(inst.pixel_offset + frame.frame * frame_bytes)
            if fp.readinto(view) != frame_bytes:
                raise VolumeError(f"{inst.path}: pixel data shorter than Rows x Columns")
            _store(_fix_unused_bits(buf, inst), frame, hu[z])


def _read_decoded(
    inst: _Instance, targets: list[tuple[int, _Frame]], hu: npt.NDArray[np.float32]
) -> None:
    """Decode through pydicom's handlers: compressed and otherwise unusual pixel data."""
    try:
        ds = pydicom.dcmread(inst.path, force=True)
        if "PixelData" not in ds:
            raise NotAnImageSeriesError(f"{inst.path}: no Pixel Data")
        arr = ds.pixel_array
    except VolumeError:
        raise
    except Exception as exc:  # decoder plugins raise their own types
        name = UID(inst.transfer_syntax).name
        raise VolumeError(f"cannot decode pixel data of {inst.path} ({name}): {exc}") from exc
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    expected = (len(inst.frames), inst.rows, inst.cols)
    if arr.shape != expected:
        raise VolumeError(f"{inst.path}: decoded pixels {arr.shape}, expected {expected}")
    for z, frame in targets:
        _store(arr[frame.frame], frame, hu[z])


def _fix_unused_bits(buf: npt.NDArray[Any], inst: _Instance) -> npt.NDArray[Any]:
    """Mask (unsigned) or sign-extend (signed) values when BitsStored < BitsAllocated.

    Mirrors what pydicom does for native data, so both paths give identical values.
    """
    shift = inst.bits_allocated - inst.bits_stored
    if 0 < shift < inst.bits_allocated:
        np.left_shift(buf, shift, out=buf)
        np.right_shift(buf, shift, out=buf)
    return buf


def _store(raw: npt.NDArray[Any], frame: _Frame, out: npt.NDArray[np.float32]) -> None:
    """HU = stored * slope + intercept, written straight into the volume's slice."""
    if frame.slope == 1.0:
        np.add(raw, np.float32(frame.intercept), out=out, casting="unsafe")
    else:
        np.multiply(raw, np.float32(frame.slope), out=out, casting="unsafe")
        out += np.float32(frame.intercept)
