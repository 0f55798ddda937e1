"""The synthetic world from the command line (`radfinder-node synth ...`).

This module only composes the libraries: phantoms and reports from ``engines.data``, DICOM from
``dicom_io``, HL7 from ``reports``. A study's seed fixes everything about it (anatomy, findings,
report, UIDs, accession number), so ``synth dicom`` and ``synth hl7`` with the same seed describe
the same studies and an end-to-end test can send one and report on the other.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from dicom_io.synthetic import make_uid
from dicom_io.synthetic_study import write_study
from engines.data.ctrate import volume_seed
from engines.data.phantoms import Phantom, generate_phantom
from engines.data.reports import Report, write_report
from reports.hl7_writer import oru_r01

ProgressFn = Callable[[int, int], None]
BASE_DATETIME = datetime(2026, 1, 5, 8, 0, 0)


@dataclass(frozen=True)
class Case:
    """Identity of the ``index``-th synthetic study of a seed."""

    index: int
    seed: int
    accession_number: str
    patient_id: str
    patient_name: str
    study_datetime: datetime

    @property
    def study_uid(self) -> str:
        return make_uid(self.seed, "study", self.accession_number)


def case(seed: int, index: int) -> Case:
    s = volume_seed(seed, index)
    return Case(
        index=index,
        seed=s,
        accession_number=f"SYN{s % 10**9:09d}",
        patient_id=f"SYNTH{s % 10**6:06d}",
        patient_name=f"Synthetic^Patient{index:04d}",
        study_datetime=BASE_DATETIME + timedelta(minutes=17 * index),
    )


def _report(c: Case, phantom: Phantom, spacing: tuple[float, float, float]) -> Report:
    """The report of a case; slices are numbered from the bottom (instance = z + 1), as
    ``write_study`` numbers them by default, so DICOM and HL7 outputs agree."""
    return write_report(
        phantom.findings,
        seed=c.seed,
        n_slices=phantom.hu.shape[0],
        series_number=2,
        instance_number_of_z=lambda z: z + 1,
        present_labels=[f.label for f in phantom.findings],
        slice_thickness_mm=spacing[0],
    )


def synth_dicom(
    out: Path,
    n: int,
    seed: int,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    *,
    transfer_syntax: str = "1.2.840.10008.1.2.1",
    shuffle: bool = False,
    with_scout: bool = False,
    with_non_chest: bool = False,
    progress: ProgressFn | None = None,
) -> list[dict[str, Any]]:
    """Studies as DICOM files (``study_NNNN/dicom/``), each with ``report.txt`` and ``truth.json``
    (findings, citations, and the SOP Instance UID of every key and cited slice)."""
    out.mkdir(parents=True, exist_ok=True)
    manifest: list[dict[str, Any]] = []
    for i in range(n):
        c = case(seed, i)
        phantom = generate_phantom(shape, spacing, seed=c.seed)
        study_dir = out / f"study_{i:04d}"
        study = write_study(
            study_dir / "dicom",
            phantom.hu,
            spacing,
            seed=c.seed,
            accession_number=c.accession_number,
            patient_id=c.patient_id,
            patient_name=c.patient_name,
            patient_sex=str(phantom.patient.get("sex", "O")),
            patient_age=int(phantom.patient.get("age", 50)),
            study_datetime=c.study_datetime,
            transfer_syntax=transfer_syntax,
            shuffle=shuffle,
            with_scout=with_scout,
            with_non_chest=with_non_chest,
        )
        report = _report(c, phantom, spacing)
        assert all(study.instance_number_of_z(z) == z + 1 for z in (0, shape[0] - 1))
        (study_dir / "report.txt").write_text(report.text)
        truth = {
            "study_uid": study.study_uid,
            "accession_number": c.accession_number,
            "labels": {f.label: 1 for f in phantom.findings},
            "findings": [
                {
                    "label": f.label,
                    "side": f.side,
                    "lobe": f.lobe,
                    "size_mm": f.size_mm,
                    "center_voxel": list(f.center_voxel),
                    "center_mm": list(f.center_mm),
                    "z_extent": list(f.z_extent),
                    "key_sop_uid": study.sop_uid_of_z(f.center_voxel[0]),
                }
                for f in phantom.findings
            ],
            "citations": [
                {
                    "label": cit.finding_label,
                    "start": cit.start,
                    "end": cit.end,
                    "series": cit.series,
                    "image": cit.image,
                    "z_index": cit.z_index,
                    "sop_uid": study.sop_uid_of_z(cit.z_index),
                    "snippet": cit.snippet,
                }
                for cit in report.citations
            ],
        }
        (study_dir / "truth.json").write_text(json.dumps(truth, indent=1))
        manifest.append(
            {
                "study": study_dir.name,
                "study_uid": study.study_uid,
                "accession_number": c.accession_number,
                "series": len(study.series),
                "findings": [f.label for f in phantom.findings],
            }
        )
        if progress is not None:
            progress(i + 1, n)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def synth_hl7(
    out: Path,
    n: int,
    seed: int,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    *,
    progress: ProgressFn | None = None,
) -> list[Path]:
    """ORU^R01 reports for the studies ``synth dicom`` writes with the same seed and size."""
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for i in range(n):
        c = case(seed, i)
        report = _report(c, generate_phantom(shape, spacing, seed=c.seed), spacing)
        message = oru_r01(
            {
                "clinical_information": report.clinical_information,
                "technique": report.technique,
                "findings": report.findings,
                "impressions": report.impressions,
            },
            accession_number=c.accession_number,
            patient_id=c.patient_id,
            patient_name=c.patient_name,
            study_uid=c.study_uid,
            placer_order=f"PO{c.accession_number}",
            filler_order=None,
            observation_datetime=c.study_datetime + timedelta(hours=2),
            sending_facility="SYNTHRIS",
            control_id=f"MSG{c.seed:010d}",
        )
        path = out / f"{i:04d}_{c.accession_number}.hl7"
        path.write_bytes(message)
        paths.append(path)
        if progress is not None:
            progress(i + 1, n)
    return paths


def synth_preview(
    out_png: Path, seed: int, shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> Path:
    """A montage with every finding at its key slice, to judge realism at a glance."""
    from engines.data.labels import LABELS
    from engines.data.preview import preview_montage

    phantom = generate_phantom(shape, spacing, seed=seed, labels=list(LABELS))
    return preview_montage(phantom, out_png)
