"""Orthanc as the PACS, end to end (issue 5, item 6).

A study is uploaded into a real Orthanc (REST ``POST /instances``); Orthanc pushes it to the node
(``POST /modalities/radfinder/store``), the node selects the chest series, the embedded worker
reads it with the demo bundle (ONNX Runtime), and the outbox sends the SR and the KOS back to
Orthanc's DICOM port. What Orthanc then holds is downloaded through its REST API and compared
with what the worker recorded in ``Job.result``: per label probability and presence from the SR,
the key slices' SOP Instance UIDs from the KOS, both in the source study.

The bundle is a copy of the demo bundle whose thresholds are rewritten (the first nine labels at
0, the rest at 1), so the KOS always references key slices whatever the shipped weights predict;
``bundle.toml`` is not among the files a bundle hashes, so the copy still loads.
"""

from __future__ import annotations

import shutil
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from orthanc_peer import OrthancPeer, orthanc_available
from pydicom import dcmread
from sqlalchemy import select

from conftest import REAL, ROOT, node_settings, wait_for
from radfinder_node.database import Database
from radfinder_node.job_models import Job, JobState, OutboundObject, OutboundState
from radfinder_node.models import Series, SeriesState
from radfinder_node.node import Node

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not orthanc_available(), reason="Orthanc is not installed"),
]

DEMO_BUNDLE = ROOT / "engines" / "bundles" / "demo-tiny"
A0002 = (
    REAL
    / "lung-pet-ct-dx"
    / "Lung-PET-CT-Dx"
    / "manifest-1675442780019"
    / "Lung-PET-CT-Dx"
    / "Lung_Dx-A0002"
)
ALWAYS_PRESENT = 9  # labels whose threshold the fixture sets to 0
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
MODALITY = "radfinder"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "demo-forced"
    shutil.copytree(DEMO_BUNDLE, out, ignore=shutil.ignore_patterns("*.plan", "trt-*"))
    manifest = tomllib.loads((out / "bundle.toml").read_text())
    for j, row in enumerate(manifest["labels"]):
        row["threshold"] = 0.0 if j < ALWAYS_PRESENT else 1.0
    (out / "bundle.toml").write_text(tomli_w.dumps(manifest))
    return out


@dataclass
class Site:
    orthanc: OrthancPeer
    node: Node


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, bundle: Path) -> Iterator[Site]:
    """Orthanc and a node that know each other: Orthanc pushes to the node, the node sends its
    results to Orthanc."""
    tmp = tmp_path_factory.mktemp("orthanc-e2e")
    orthanc = OrthancPeer(tmp / "orthanc").start()
    node = Node(
        node_settings(
            data_dir=tmp / "node",
            bundle_path=bundle,
            engine_runtime="onnx",
            engine_device="cpu",
            destinations=[orthanc.destination],
            send_backoff_s=0.2,
        )
    )
    try:
        node.start()
        assert node.port is not None and node.worker is not None
        orthanc.add_modality(MODALITY, node.settings.ae_title, "127.0.0.1", node.port)
        yield Site(orthanc, node)
    finally:
        node.stop()
        orthanc.stop()


def _jobs(db: Database) -> list[Job]:
    with db.transaction() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def _outbound(db: Database, job_id: int) -> list[OutboundObject]:
    with db.transaction() as session:
        return list(session.scalars(select(OutboundObject).where(OutboundObject.job_id == job_id)))


def _series(db: Database, study_uid: str) -> dict[str, Series]:
    from radfinder_node.models import Study

    with db.transaction() as session:
        rows = session.scalars(select(Series).join(Study).where(Study.study_uid == study_uid)).all()
        return {s.series_uid: s for s in rows}


def _finished_job(db: Database, series_uid: str, timeout: float = 60.0) -> Job:
    found: list[Job] = []

    def finished() -> bool:
        found[:] = [
            j
            for j in _jobs(db)
            if j.series_uid == series_uid and j.state in (JobState.DONE, JobState.FAILED)
        ]
        return bool(found)

    assert wait_for(finished, timeout=timeout, interval=0.1), [
        (j.series_uid, j.state, j.error) for j in _jobs(db)
    ]
    job = found[0]
    assert job.state == JobState.DONE, job.error
    return job


def validate(data: bytes, path: Path) -> None:
    """What the PACS holds passes dciodvfy (no errors) and dsrdump reads it."""
    if shutil.which("dciodvfy") is None or shutil.which("dsrdump") is None:
        return  # tests/test_sr.py and test_kos.py skip loudly on a host without the tools
    from test_sr import dciodvfy, dsrdump

    path.write_bytes(data)
    dciodvfy(path)
    dsrdump(path)


def round_trip(
    site: Site, files: list[Path], study_uid: str, chest_series_uid: str, workdir: Path
) -> Job:
    """Upload, push, wait for the results in Orthanc, and check them against the job."""
    from dicom_io.kos import kos_referenced_sop_uids
    from dicom_io.sr import read_sr_probabilities

    orthanc, node = site.orthanc, site.node
    answers = orthanc.upload(files)
    study_ids = {a["ParentStudy"] for a in answers}
    assert len(study_ids) == 1
    (study_id,) = study_ids
    report = orthanc.store_to_modality(MODALITY, [study_id])
    assert report["InstancesCount"] == len(files) and report["FailedInstancesCount"] == 0, report

    job = _finished_job(node.db, chest_series_uid)
    # One job for the study: every other series it holds was decided against.
    series = _series(node.db, study_uid)
    assert [j.series_uid for j in _jobs(node.db) if j.series_uid in series] == [chest_series_uid]
    assert series[chest_series_uid].state == SeriesState.SELECTED
    for uid, s in series.items():
        if uid != chest_series_uid:
            assert s.state == SeriesState.IGNORED and s.state_reason

    assert job.result is not None
    objects = {o["kind"]: o for o in job.result["objects"]}
    assert set(objects) == {"sr", "kos"}
    uids = [o["sop_uid"] for o in objects.values()]
    assert wait_for(lambda: orthanc.has_instances(uids), timeout=30, interval=0.1), [
        (r.kind, r.state, r.attempts, r.last_error) for r in _outbound(node.db, job.id)
    ]
    # The row turns sent in the transaction right after Orthanc's success status.
    assert wait_for(
        lambda: all(r.state == OutboundState.SENT for r in _outbound(node.db, job.id)),
        timeout=10,
    )
    rows = _outbound(node.db, job.id)
    assert sorted(r.sop_uid for r in rows) == sorted(uids)
    assert all(r.attempts == 1 and r.destination == orthanc.destination for r in rows)

    # Both arrived in the source study, each in its own new series.
    in_study = {i["MainDicomTags"]["SOPInstanceUID"]: i for i in orthanc.study_instances(study_uid)}
    assert set(uids) <= set(in_study)
    assert len(in_study) == len(files) + 2
    source_series = {
        in_study[dcmread(f, stop_before_pixels=True).SOPInstanceUID]["ParentSeries"] for f in files
    }
    result_series = {in_study[uid]["ParentSeries"] for uid in uids}
    assert len(result_series) == 2 and not result_series & source_series

    expected: dict[str, dict[str, Any]] = {row["label"]: row for row in job.result["findings"]}
    sr = orthanc.dataset(objects["sr"]["sop_uid"])
    validate(orthanc.instance_file(in_study[sr.SOPInstanceUID]["ID"]), workdir / "sr.dcm")
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    assert sr.StudyInstanceUID == study_uid
    assert sr.SeriesInstanceUID == objects["sr"]["series_uid"]
    got = read_sr_probabilities(sr)
    assert list(got) == list(expected)
    for label, (probability, present) in got.items():
        assert probability == pytest.approx(expected[label]["probability"], abs=1e-9), label
        assert present == expected[label]["present"], label
    assert sum(present for _, present in got.values()) >= ALWAYS_PRESENT

    kos = orthanc.dataset(objects["kos"]["sop_uid"])
    validate(orthanc.instance_file(in_study[kos.SOPInstanceUID]["ID"]), workdir / "kos.dcm")
    assert kos.SOPClassUID == KEY_OBJECT_SELECTION
    assert kos.StudyInstanceUID == study_uid
    key_uids = {row["key_sop_instance_uid"] for row in expected.values() if row["present"]}
    assert None not in key_uids
    referenced = kos_referenced_sop_uids(kos)
    assert set(referenced) == key_uids and len(referenced) == len(key_uids)
    # Every key slice is an image of the chest series Orthanc holds.
    for uid in key_uids:
        assert uid in in_study
        assert in_study[uid]["ParentSeries"] == orthanc.lookup(chest_series_uid)[0]["ID"]
    return job


def test_synthetic_chest_study_round_trip(site: Site, tmp_path: Path) -> None:
    from dicom_io.synthetic_study import write_study
    from engines.data.phantoms import generate_phantom

    spacing = (7.5, 2.8, 2.8)
    phantom = generate_phantom((40, 128, 128), spacing, seed=11)
    study = write_study(
        tmp_path / "study",
        phantom.hu,
        spacing,
        seed=11,
        accession_number="E2E0001",
        patient_id="E2E0001",
        patient_name="Orthanc^RoundTrip",
        with_scout=True,
        with_non_chest=True,
        shuffle=True,
    )
    job = round_trip(site, study.paths, study.study_uid, study.chest.series_uid, tmp_path)
    assert job.result is not None and job.result["slices"] == 40
    assert job.attempts == 1

    # Orthanc pushing the study again changes nothing: no second job, no second copy.
    held = site.orthanc.count_instances()
    study_id = site.orthanc.study_id(study.study_uid)
    assert study_id is not None
    report = site.orthanc.store_to_modality(MODALITY, [study_id])
    assert report["FailedInstancesCount"] == 0
    wait_for(lambda: False, timeout=3 * site.node.settings.quiet_period_s + 1.0)
    assert [j.id for j in _jobs(site.node.db) if j.series_uid == study.chest.series_uid] == [job.id]
    assert site.orthanc.count_instances() == held
    assert all(r.attempts == 1 for r in _outbound(site.node.db, job.id))


def test_real_chest_ct_a0002_round_trip(site: Site, tmp_path: Path) -> None:
    """Lung-PET-CT-Dx A0002 (Siemens, 30 x 8 mm, B70f and B40f): the default rules select the
    soft-kernel series (BodyPartExamined CHEST, ORIGINAL/PRIMARY axial, 30 slices >= 20), so
    no rule needs changing."""
    files = sorted(A0002.glob("*/*/*.dcm"))
    if len(files) != 60:
        pytest.skip(f"real data missing: {len(files)} files under {A0002}")
    by_kernel: dict[str, tuple[str, str]] = {}
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        by_kernel[str(ds.ConvolutionKernel)] = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
    assert set(by_kernel) == {"B40f", "B70f"}
    study_uid, chest = by_kernel["B40f"]
    job = round_trip(site, files, study_uid, chest, tmp_path)
    assert job.result is not None and job.result["slices"] == 30
    reason = _series(site.node.db, study_uid)[by_kernel["B70f"][1]].state_reason
    assert reason is not None and "B70f" in reason
