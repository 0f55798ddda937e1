"""Volume assembly: dicom_io.volume against SimpleITK's ImageSeriesReader on the same files.

Writes one 300-slice 512x512 signed 16-bit CT series (explicit VR little endian, headers like
a scanner's: patient/study/series/equipment/CT image modules, a referenced-image sequence) to
a temporary directory, then times, warm cache, best of N interleaved runs each:

* ours:      ``load_volume_dir(dir)``: scan, header pass, sort/validate, pixels -> float32 HU
* SimpleITK: ``GetGDCMSeriesFileNames(dir)`` + ``ImageSeriesReader`` (float32 output) +
             ``GetArrayFromImage``: the same work, directory in, float32 HU array out

and checks that both give the same HU array. The generator is here rather than in
``dicom_io.synthetic`` so that the benchmark's input does not move when that module changes.

Run: ``.venv/bin/python bench/volume.py [--slices 300] [--size 512] [--runs 5]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dicom_io.volume import load_volume_dir

Int16Array = npt.NDArray[np.int16]
Float32Array = npt.NDArray[np.float32]


def _uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def phantom_slice(k: int, n: int, size: int, rng: np.random.Generator) -> Int16Array:
    """A chest-like slice in stored values (HU + 1024): body, two lungs, spine, noise.

    Noise matters: constant images would compress and cache unrealistically well.
    """
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    hu[(x / 0.42) ** 2 + (y / 0.32) ** 2 < 1] = 40.0
    lung_r = 0.13 + 0.05 * np.sin(np.pi * k / max(n - 1, 1))
    for cx in (-0.17, 0.17):
        hu[((x - cx) / lung_r) ** 2 + (y / (lung_r * 1.5)) ** 2 < 1] = -850.0
    hu[(x / 0.04) ** 2 + ((y - 0.2) / 0.04) ** 2 < 1] = 700.0
    hu += rng.normal(0.0, 15.0, hu.shape).astype(np.float32)
    return np.clip(np.rint(hu) + 1024, -2048, 4095).astype(np.int16)


def series_template(size: int, study: str, series: str, frame: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    for attr in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        setattr(ds, attr, "20240102")
    for attr in ("StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime"):
        setattr(ds, attr, "093000")
    ds.AccessionNumber = "ACC0001"
    ds.Modality = "CT"
    ds.Manufacturer = "BENCH"
    ds.InstitutionName = "Benchmark Hospital"
    ds.ReferringPhysicianName = "Ref^Doctor"
    ds.StationName = "CT01"
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = "Chest 1.0 B30f"
    ds.ManufacturerModelName = "Bench CT 64"
    ds.ReferencedImageSequence = DicomSequence(
        [_ref_item(CTImageStorage, _uid()), _ref_item(CTImageStorage, _uid())]
    )
    ds.PatientName = "Bench^Patient"
    ds.PatientID = "BENCH001"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.PatientAge = "064Y"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = 1.0
    ds.KVP = 120
    ds.DataCollectionDiameter = 500
    ds.SoftwareVersions = "bench 1"
    ds.ProtocolName = "Chest routine"
    ds.ReconstructionDiameter = 350
    ds.DistanceSourceToDetector = 1085.6
    ds.DistanceSourceToPatient = 595
    ds.GantryDetectorTilt = 0
    ds.TableHeight = 150
    ds.RotationDirection = "CW"
    ds.ExposureTime = 500
    ds.XRayTubeCurrent = 200
    ds.Exposure = 100
    ds.FilterType = "BODY"
    ds.GeneratorPower = 24
    ds.FocalSpots = 1.2
    ds.ConvolutionKernel = "B30f"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = frame
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = size
    ds.Columns = size
    ds.PixelSpacing = [0.68359375, 0.68359375]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = [40, -600]
    ds.WindowWidth = [400, 1500]
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    return ds


def _ref_item(sop_class: str, sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_uid
    return item


def write_series(directory: Path, slices: int, size: int) -> None:
    """Write the series in shuffled file order, as a PACS export often names files."""
    rng = np.random.default_rng(0)
    template = series_template(size, _uid(), _uid(), _uid())
    for k in rng.permutation(slices):
        ds = Dataset()
        ds.update(template)
        sop = _uid()
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = int(k) + 1
        z = -300.0 + float(k) * 1.0
        ds.ImagePositionPatient = [-175.0, -175.0, z]
        ds.SliceLocation = z
        ds.PixelData = phantom_slice(int(k), slices, size, rng).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(directory / f"IM{rng.integers(1 << 30):010d}.dcm", enforce_file_format=True)


def read_ours(directory: Path) -> Float32Array:
    return load_volume_dir(directory).hu


def read_sitk(directory: Path) -> Float32Array:
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    reader.SetOutputPixelType(sitk.sitkFloat32)
    arr: Float32Array = sitk.GetArrayFromImage(reader.Execute())
    return arr


def run_times(
    readers: dict[str, Callable[[Path], Float32Array]], directory: Path, runs: int
) -> dict[str, list[float]]:
    """Interleave the readers so drift (thermal, other load) hits both equally."""
    times: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(runs):
        for name, read in readers.items():
            start = time.perf_counter()
            read(directory)
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"  {name:9s} runs: " + ", ".join(f"{v:.3f}" for v in values))
    return times


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, nproc {os.cpu_count()}, {cpu_model()}")
    versions = f"numpy {np.__version__}, SimpleITK {sitk.Version.VersionString()}"
    print(f"python {platform.python_version()}, {versions}")
    with tempfile.TemporaryDirectory(prefix="bench-volume-") as tmp:
        directory = Path(tmp)
        start = time.perf_counter()
        write_series(directory, args.slices, args.size)
        os.sync()  # let writeback finish, so neither reader competes with it
        shape = f"{args.slices} x {args.size}x{args.size}"
        print(f"wrote {shape} int16 slices in {time.perf_counter() - start:.1f} s")
        ours, theirs = read_ours(directory), read_sitk(directory)  # warm the page cache
        same = ours.shape == theirs.shape and bool(np.array_equal(ours, theirs))
        print(f"same HU array: {same} (shape {ours.shape}, dtype {ours.dtype}/{theirs.dtype})")
        del ours, theirs
        times = run_times({"ours": read_ours, "SimpleITK": read_sitk}, directory, args.runs)
    for label, pick in (("best", min), ("median", statistics.median)):
        a, b = pick(times["ours"]), pick(times["SimpleITK"])
        print(
            f"{label} of {args.runs}: ours {a:.3f} s, SimpleITK {b:.3f} s, "
            f"ratio ours/SimpleITK {a / b:.2f}"
        )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
