"""The retraining export: studies in over C-STORE, reports over MLLP, `radfinder-node export`
out, read by the training dataset and trained on for a step; de-identification; the watermark.

Studies are phantoms of engines.data.phantoms written by dicom_io.synthetic_study; reports are
engines.data.reports.write_report of the same phantom, whose truth says which slice every
citation points at, with a header line of identifiers and dates in front. So a passing round
trip means the snippet's z in the manifest is where the finding truly is, and no identifier of
the DICOM header or the HL7 message survived anywhere in the export folder.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import func, select
from test_hl7_listener import MllpClient, msa

from conftest import node_settings, storescu, wait_for
from dicom_io.synthetic_study import SyntheticStudy, write_study
from engines.data.phantoms import Phantom, generate_phantom
from engines.data.reports import Report as GeneratedReport
from engines.data.reports import write_report
from engines.manifest import ManifestError, ManifestRow, read_manifest
from radfinder_node.config import Settings
from radfinder_node.database import MIGRATIONS, Database
from radfinder_node.deid import (
    Identifiers,
    Pseudonymizer,
    identifiers_from_dicom,
    identifiers_from_hl7,
    load_secret,
    scrub_text,
    shift_dates,
)
from radfinder_node.export import ExportedReport, export, parse_since
from radfinder_node.export_schedule import BEAT_ENTRY, TASK_EXPORT, beat_schedule
from radfinder_node.models import Base, Instance, Series, SeriesState
from radfinder_node.node import Node
from radfinder_node.report_models import Report
from reports.hl7_parse import parse_message
from reports.hl7_writer import oru_r01
from reports.manifest_writer import (
    ManifestEntry,
    ManifestWriteError,
    SnippetEntry,
    manifest_text,
)

SHAPE = (32, 64, 64)
SPACING = (3.0, 5.0, 5.0)
LABELS = ("Lung nodule", "Pleural effusion", "Atelectasis")
PATIENT_ID = "MRN99173"
PATIENT_NAME = "Quixotez^Araminta"
BIRTH = date(1950, 3, 2)


# ---------------------------------------------------------------------------------------------
# The synthetic patient


@dataclass(frozen=True)
class Case:
    """One study of the patient: what was sent, and where every citation truly points."""

    seed: int
    accession: str
    phantom: Phantom
    study: SyntheticStudy
    report: GeneratedReport
    text: str
    comparison: date
    origin: tuple[float, float, float]

    def truth_z(self) -> list[float]:
        """Patient z (mm) of every cited image, in citation order."""
        return [self.origin[2] + z * SPACING[0] for c in self.report.citations for z in c.z_indices]


def make_case(root: Path, seed: int, accession: str, comparison: date) -> Case:
    phantom = generate_phantom(SHAPE, SPACING, seed=seed, labels=list(LABELS))
    origin = (
        float(phantom.affine[0, 3]),
        float(phantom.affine[1, 3]),
        float(phantom.affine[2, 3]),
    )
    study = write_study(
        root / f"study{seed}",
        phantom.hu,
        SPACING,
        seed=seed,
        accession_number=accession,
        patient_id=PATIENT_ID,
        patient_name=PATIENT_NAME,
        origin=origin,
        numbering="superior",
    )
    report = write_report(
        phantom.findings,
        seed=seed,
        n_slices=SHAPE[0],
        series_number=2,
        instance_number_of_z=study.instance_number_of_z,
        cite_probability=1.0,
        slice_thickness_mm=SPACING[0],
    )
    header = (
        f"Patient: QUIXOTEZ, Araminta, {PATIENT_ID}, born {BIRTH:%d.%m.%Y}; "
        f"accession {accession}; callback Tel.: +49 761 270-55512.\n"
        f"Comparison: CT of {comparison:%d.%m.%Y}.\n"
    )
    return Case(seed, accession, phantom, study, report, header + report.text, comparison, origin)


def send_study(node: Node, case: Case, root: Path) -> None:
    assert node.port is not None
    out = storescu(node.port, root / f"study{case.seed}")
    assert out.returncode == 0, out.stderr

    def selected() -> bool:
        with node.db.transaction() as s:
            state = s.scalar(
                select(Series.state).where(Series.series_uid == case.study.chest.series_uid)
            )
            return bool(state == SeriesState.SELECTED)

    assert wait_for(selected, timeout=60)


def send_report(node: Node, case: Case, control_id: str) -> None:
    message = oru_r01(
        case.text,
        accession_number=case.accession,
        patient_id=PATIENT_ID,
        patient_name=PATIENT_NAME,
        study_uid=case.study.study_uid,
        placer_order=f"PO{case.accession}",
        filler_order=None,
        observation_datetime=datetime(2026, 1, 5, 10, 0) + timedelta(days=case.seed),
        sending_facility="HOSP",
        control_id=control_id,
        patient_birth_date=BIRTH,
    )
    assert node.hl7_port
    client = MllpClient(node.hl7_port)
    try:
        code, _, err = msa(client.send(message))
    finally:
        client.close()
    assert code == "AA", err

    def mined() -> bool:
        with node.db.transaction() as s:
            return (
                s.scalar(select(Report.mined_at).where(Report.control_id == control_id)) is not None
            )

    assert wait_for(mined, timeout=60)


def run_cli(node: Node, out: Path, *extra: str) -> dict[str, Any]:
    """`radfinder-node export` as a site runs it: its own process, the node's data dir."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "radfinder_node.cli",
            "export",
            "--data-dir",
            str(node.settings.data_dir),
            "--out",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "RADFINDER_DATABASE_URL": node.db.url,
            "RADFINDER_LOG_JSON": "true",
        },
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def export_bytes(out: Path) -> Iterator[tuple[Path, bytes]]:
    """Every file of the export, NIfTI volumes decompressed."""
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        data = path.read_bytes()
        yield path, gzip.decompress(data) if path.name.endswith(".gz") else data


def identifying_strings(cases: list[Case]) -> list[str]:
    out = [PATIENT_ID, "Quixotez", "Araminta", "19500302", "02.03.1950", "1950-03-02", "55512"]
    for c in cases:
        out += [c.accession, f"PO{c.accession}", c.study.study_uid, c.study.chest.series_uid]
        out += list(c.study.chest.sop_uids)
        out.append(f"{c.comparison:%d.%m.%Y}")
    return out


def rows_of(manifest: Path) -> list[ManifestRow]:
    return list(read_manifest(manifest))


@pytest.fixture
def export_node(db_url: str, make_node: Callable[..., Node]) -> Node:
    """A node on both databases; the database is set up first so it outlives the node."""
    return make_node(database_url=db_url, embedded_worker=False)


# ---------------------------------------------------------------------------------------------
# The round trip


@pytest.mark.slow
@pytest.mark.integration
def test_export_round_trip_trains_and_is_incremental(
    export_node: Node,
    tmp_path: Path,
    tower: Any,
) -> None:
    node = export_node
    out = tmp_path / "export"
    first = make_case(tmp_path, 11, "ACC55821", date(2025, 1, 5))
    send_study(node, first, tmp_path)
    send_report(node, first, "R1")

    result = run_cli(node, out, "--since", "last")
    assert result["rows"] == 1 and result["deid"] and result["skipped"] == []
    manifest = Path(result["manifest"])
    [row] = rows_of(manifest)

    # Snippets: every citation, at the z of the slice the finding truly is on.
    truth = first.truth_z()
    assert len(truth) >= 2
    got = sorted(s.z_mm for s in row.snippets)
    assert len(got) == len(truth)
    for z, t in zip(got, sorted(truth), strict=True):
        assert abs(z - t) <= SPACING[0] / 2, (got, truth)
    assert all(s.sop_instance_uid and s.sop_instance_uid.startswith("2.25.") for s in row.snippets)
    assert all("image" not in s.text.lower() for s in row.snippets)

    # Geometry: NIfTI in patient space, the affine of the DICOM series.
    assert row.volume_format == "ctrate-nifti" and row.spacing == pytest.approx(SPACING)
    assert row.affine is not None
    assert row.affine[2][0] == pytest.approx(SPACING[0])
    assert row.affine[2][3] == pytest.approx(first.origin[2])
    assert row.labels == (-1,) * 18 and row.source == "node"

    # De-identification: no identifier anywhere; the comparison date moved by the patient's
    # shift; the pseudonyms are the keyed ones.
    pz = Pseudonymizer(load_secret(None, node.settings.data_dir))
    patient = pz.patient(PATIENT_ID)
    shift = pz.shift_days(patient)
    assert -365 <= shift <= -1
    assert f"{first.comparison + timedelta(days=shift):%d.%m.%Y}" in row.report
    assert "[birth date]" in row.report and "[name]" in row.report and "[phone]" in row.report
    assert row.volume_id == pz.uid(first.study.chest.series_uid)
    assert row.volume_path == f"volumes/{patient}/{row.volume_id}.nii.gz"
    for path, data in export_bytes(out):
        for secret in identifying_strings([first]):
            assert secret.lower().encode() not in data.lower(), (secret, path)

    # The training loader reads it, and one training step runs on it.
    from engines.datasets import ManifestDataset
    from engines.training import train
    from model_fixtures import MICRO

    dataset = ManifestDataset.from_manifest(manifest, MICRO.space, max_shift=(0, 0, 0))
    sample = dataset[0]
    assert sample.image.shape == (1, *MICRO.space.shape)
    assert len(sample.snippets) >= 1
    run = train(
        MICRO,
        dataset,
        tmp_path / "run",
        steps=1,
        batch=1,
        accum=1,
        progress=False,
        warmup_steps=0,
        text_tower=tower,
    )
    assert run.step == 1
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["step"] == 1 and metrics["loss"] == pytest.approx(metrics["loss"])

    # Again: nothing new, nothing written.
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    again = run_cli(node, out, "--since", "last")
    assert again["rows"] == 0 and again["manifest"] is None
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before

    # A follow-up study of the same patient: only its report is exported, with the same shift.
    second = make_case(tmp_path, 12, "ACC55822", date(2025, 6, 20))
    send_study(node, second, tmp_path)
    send_report(node, second, "R2")
    third = run_cli(node, out)
    assert third["rows"] == 1 and third["manifest"] != result["manifest"]
    [row2] = rows_of(Path(third["manifest"]))
    assert row2.volume_id == pz.uid(second.study.chest.series_uid) != row.volume_id
    assert row2.volume_path.startswith(f"volumes/{patient}/")
    assert f"{second.comparison + timedelta(days=shift):%d.%m.%Y}" in row2.report
    got2 = sorted(s.z_mm for s in row2.snippets)
    for z, t in zip(got2, sorted(second.truth_z()), strict=True):
        assert abs(z - t) <= SPACING[0] / 2
    for path, data in export_bytes(out):
        for secret in identifying_strings([first, second]):
            assert secret.lower().encode() not in data.lower(), (secret, path)

    # Both manifests together are one training set: paths are relative to the folder.
    merged = out / "all.jsonl"
    merged.write_text("".join(p.read_text() for p in sorted(out.glob("manifest-*.jsonl"))))
    assert len(ManifestDataset.from_manifest(merged, MICRO.space)) == 2

    # --since DATE re-exports both into a fresh folder; --no-deid keeps identifiers.
    plain = run_cli(node, tmp_path / "plain", "--since", "2000-01-01", "--no-deid")
    assert plain["rows"] == 2 and plain["manifest"].endswith("-identified.jsonl")
    ids = {r.volume_id for r in rows_of(Path(plain["manifest"]))}
    assert ids == {first.study.chest.series_uid, second.study.chest.series_uid}
    with node.db.transaction() as s:
        assert s.scalar(select(func.count()).select_from(ExportedReport)) == 4


@pytest.mark.integration
def test_a_series_that_cannot_be_assembled_is_skipped_with_its_reason(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = make_node(embedded_worker=False)
    case = make_case(tmp_path, 21, "ACC77001", date(2025, 2, 1))
    # Lose a slice in the middle: the series cannot be assembled without guessing.
    case.study.chest.paths[SHAPE[0] // 2].unlink()
    assert node.port is not None
    assert storescu(node.port, tmp_path / "study21").returncode == 0

    def settled() -> bool:
        with node.db.transaction() as s:
            state = s.scalar(
                select(Series.state).where(Series.series_uid == case.study.chest.series_uid)
            )
            return state is not None and state != SeriesState.RECEIVING

    assert wait_for(settled, timeout=60)
    send_report(node, case, "S1")
    secret = load_secret(None, node.settings.data_dir)
    out = tmp_path / "out"
    result = export(
        node.db, spool_dir=node.settings.spool_dir, out_dir=out, deid=True, secret=secret
    )
    assert result.rows == 0 and result.manifest is None
    [skip] = result.skipped
    assert "cannot be assembled" in skip["reason"] and "missing" in skip["reason"].lower()
    with node.db.transaction() as s:
        row = s.scalars(select(ExportedReport)).one()
        assert row.state == "skipped" and row.reason == skip["reason"]
    # Recorded: not retried by "last", retried by a date.
    again = export(node.db, spool_dir=node.settings.spool_dir, out_dir=out, secret=secret)
    assert again.skipped == []
    dated = export(
        node.db,
        spool_dir=node.settings.spool_dir,
        out_dir=out,
        secret=secret,
        since=parse_since("2000-01-01"),
    )
    assert len(dated.skipped) == 1


# ---------------------------------------------------------------------------------------------
# The manifest writer against the engines' reader


def test_manifest_writer_output_is_read_by_engines(tmp_path: Path) -> None:
    affine = [[0, 0, 0.7, -100], [0, 0.7, 0, -90], [1.5, 0, 0, -200.25], [0, 0, 0, 1]]
    entries = [
        ManifestEntry(
            volume_id="2.25.1",
            volume_path="volumes/a.nii.gz",
            volume_format="ctrate-nifti",
            spacing=(1.5, 0.7, 0.7),
            report="Findings: Kleiner Rundherd (Serie 2, Bild 45). No effusion.",
            snippets=(
                SnippetEntry("Kleiner Rundherd", -132.75, "2.25.9"),
                SnippetEntry("Nodule", 10.0, label="Lung nodule"),
            ),
            affine=affine,
            rescale=(1.0, -1024.0),
            geometry_source="dicom",
            source="node",
        ),
        ManifestEntry(
            volume_id="v2",
            volume_path="v2.npz",
            volume_format="npz",
            spacing=(3, 2.5, 2.5),
            report="",
            labels=(1, 0, -1) * 6,
            split="valid",
        ),
    ]
    path = tmp_path / "m.jsonl"
    path.write_text(manifest_text(entries), encoding="utf-8")
    rows = rows_of(path)
    assert [r.volume_id for r in rows] == ["2.25.1", "v2"]
    a, b = rows
    assert a.snippets[0].text == "Kleiner Rundherd" and a.snippets[0].z_mm == -132.75
    assert a.snippets[0].sop_instance_uid == "2.25.9" and a.snippets[1].label == "Lung nodule"
    assert a.affine is not None and a.affine[2] == (1.5, 0.0, 0.0, -200.25)
    assert a.rescale == (1.0, -1024.0) and a.labels == (-1,) * 18 and a.split is None
    assert b.labels == (1, 0, -1) * 6 and b.split == "valid" and b.affine is None
    # What the reader would refuse, the writer refuses first.
    for bad in (
        {"labels": (1,) * 17},
        {"labels": (2,) * 18},
        {"spacing": (1.5, 0.0, 0.7)},
        {"spacing": (float("nan"), 1, 1)},
        {"volume_format": "dicom"},
        {"affine": [[0, 0, 0, 0]] * 3 + [[0, 0, 0, 1]]},
        {"rescale": (0.0, -1024.0)},
        {"snippets": (SnippetEntry(" ", 1.0),)},
        {"snippets": (SnippetEntry("x", float("inf")),)},
    ):
        fields = {**entries[0].__dict__, **bad}
        with pytest.raises(ManifestWriteError):
            manifest_text([ManifestEntry(**fields)])
    # And a label name the writer cannot check is caught by the reader, with the line.
    path.write_text(
        manifest_text(
            [
                ManifestEntry(
                    **{
                        **entries[0].__dict__,
                        "snippets": (SnippetEntry("x", 1.0, label="Broken arm"),),
                    }
                )
            ]
        )
    )
    with pytest.raises(ManifestError, match=r"m\.jsonl:1"):
        rows_of(path)


# ---------------------------------------------------------------------------------------------
# De-identification


def test_pseudonyms_are_stable_keyed_and_well_formed(tmp_path: Path) -> None:
    secret = load_secret(None, tmp_path)
    assert (tmp_path / "deid_secret").stat().st_mode & 0o777 == 0o600
    assert load_secret(None, tmp_path) == secret  # created once, then read
    assert load_secret("configured-secret-of-the-site-0123", tmp_path) != secret
    a, b = Pseudonymizer(secret), Pseudonymizer(b"another secret of at least 16 bytes")
    assert a.patient("P1") == a.patient("P1") != b.patient("P1") != a.patient("P2")
    uid = a.uid("1.2.826.0.1.3680043.8.498.1")
    assert (
        uid.startswith("2.25.") and len(uid) <= 64 and uid == a.uid("1.2.826.0.1.3680043.8.498.1")
    )
    shifts = {a.shift_days(a.patient(f"P{i}")) for i in range(300)}
    assert min(shifts) >= -365 and max(shifts) <= -1 and len(shifts) > 100
    (tmp_path / "short" / "deid_secret").parent.mkdir()
    (tmp_path / "short" / "deid_secret").write_text("abc")
    with pytest.raises(ValueError, match="no usable secret"):
        load_secret(None, tmp_path / "short")


def test_dates_shift_in_their_own_format() -> None:
    text = (
        "CT of 05.01.2025, 2025-01-05, 20250105, 1/5/2025, 15/1/2025, 5 January 2025, "
        "20.06.2025, 11/20/2024, 3.1.2025, "
        "January 5, 2025, 5. Januar 2025, Jan. 5, 2025 and 3. Mär. 2024. "
        "Not dates: 2025, 12/2024, 31.02.2025, 1.2.3.4, 17 mm, T4, segment 6, Im: 86/232."
    )
    out = shift_dates(text, -10, frozenset({date(2024, 3, 3)}))
    assert out == (
        "CT of 26.12.2024, 2024-12-26, 20241226, 12/26/2024, 5/1/2025, 26 December 2024, "
        "10.06.2025, 11/10/2024, 24.12.2024, "
        "December 26, 2024, 26. Dezember 2024, Dec. 26, 2024 and [birth date]. "
        "Not dates: 2025, 12/2024, 31.02.2025, 1.2.3.4, 17 mm, T4, segment 6, Im: 86/232."
    )


def test_scrub_removes_identifiers_and_keeps_the_medicine() -> None:
    header = {
        "PatientName": ["Doe^Jane^Marie"],
        "OtherPatientNames": ["Smith^Jane"],
        "PatientID": ["P600123"],
        "AccessionNumber": ["ACC600"],
        "PatientBirthDate": ["19500302"],
        "StudyInstanceUID": ["1.2.826.0.1.3680043.8.498.600"],
        "InstitutionName": ["St. Elsewhere Hospital"],
        "PatientAddress": ["12 Baker Street^^Springfield^^79100"],
        "ReferringPhysicianName": ["House^Gregory"],
        "PatientTelephoneNumbers": ["+49 761 270-12345"],
    }
    ids = identifiers_from_dicom(header)
    text = (
        "Patient DOE, Jane M. (P600123, ACC600), born 1950-03-02, 12 Baker Street, Springfield "
        "79100. UID 1.2.826.0.1.3680043.8.498.600 and 1.2.3.4.5.6. St. Elsewhere Hospital. "
        "Referred by Dr. House; read by Prof. Dr. med. Hans Mueller. Tel. 0761 270 12345, "
        "+49 (761) 270-12345, jane.doe@example.org. Prior CT 05.01.2025.\n"
        "A 7 mm nodule in the right lower lobe (series 2, image 45; Se: 3, Im: 86/232). "
        "Compression of T4; segment 6; 3 nodules. MR of the head."
    )
    out = scrub_text(text, ids, -10)
    for gone in (
        "Doe",
        "Jane",
        "Smith",
        "P600123",
        "ACC600",
        "1950",
        "Baker",
        "Springfield",
        "79100",
        "3680043",
        "1.2.3.4.5.6",
        "Elsewhere",
        "House",
        "Mueller",
        "12345",
        "example.org",
        "05.01.2025",
    ):
        assert gone.lower() not in out.lower(), (gone, out)
    for kept in (
        "7 mm nodule in the right lower lobe (series 2, image 45; Se: 3, Im: 86/232)",
        "Compression of T4; segment 6; 3 nodules. MR of the head.",
        "Prior CT 26.12.2024",
        "[birth date]",
    ):
        assert kept in out, (kept, out)


def test_identifiers_from_an_hl7_message() -> None:
    raw = oru_r01(
        "text",
        accession_number="ACC1",
        patient_id="PID77",
        patient_name="O'Brien^Siobhan",
        study_uid="1.2.3",
        placer_order="PO1",
        filler_order="FO1",
        observation_datetime=datetime(2026, 1, 5, 10, 0),
        sending_facility="HOSP",
        control_id="C1",
        patient_birth_date=date(1961, 7, 8),
    )
    ids = identifiers_from_hl7(parse_message(raw))
    assert {"PID77", "ACC1", "PO1", "FO1"} <= ids.ids
    assert {"O'Brien", "Siobhan"} <= ids.names
    assert ids.birth_dates == frozenset({date(1961, 7, 8)})
    assert scrub_text("Mrs O'Brien, PID77.", ids | Identifiers(), -1) == "Mrs [name], [id]."


def test_parse_since() -> None:
    assert parse_since("last") is None
    assert parse_since("2026-01-31") == datetime.fromisoformat("2026-01-31T00:00:00+00:00")
    assert parse_since("2026-01-31T02:00+01:00") == datetime.fromisoformat(
        "2026-01-31T01:00:00+00:00"
    )
    with pytest.raises(ValueError, match="--since"):
        parse_since("yesterday")


# ---------------------------------------------------------------------------------------------
# The nightly schedule and the task


def test_beat_schedule_follows_the_configuration(tmp_path: Path) -> None:
    from radfinder_node.celery_app import create_app

    settings = node_settings(data_dir=tmp_path, export_time="03:45")
    app = create_app(settings)
    entry = app.conf.beat_schedule[BEAT_ENTRY]
    assert entry["task"] == TASK_EXPORT and entry["options"]["queue"] == settings.queue
    assert entry["schedule"].hour == {3} and entry["schedule"].minute == {45}
    assert TASK_EXPORT in app.tasks
    app.close()
    assert beat_schedule(node_settings(data_dir=tmp_path, export_nightly=False)) == {}
    for bad in ("24:00", "2:00", "02:60", "noon"):
        with pytest.raises(ValueError, match="export_time"):
            node_settings(data_dir=tmp_path, export_time=bad)
    shown = Settings(data_dir=tmp_path, deid_secret="s3cret-value").model_dump(mode="json")
    assert shown["deid_secret"] != "s3cret-value"  # `config show` never prints it


@pytest.mark.slow
@pytest.mark.integration
def test_the_task_runs_the_export_on_a_worker(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    """Beat sends a message; a worker runs it. Here the message is sent by hand to the node's
    embedded worker over the embedded broker, and the export lands in export_dir."""
    node = make_node(export_dir=tmp_path / "nightly")
    assert node.worker is not None and node.beat is not None
    case = make_case(tmp_path, 31, "ACC88001", date(2025, 3, 1))
    send_study(node, case, tmp_path)
    send_report(node, case, "N1")
    node.celery.send_task(TASK_EXPORT, queue=node.settings.queue)
    assert wait_for(lambda: any((tmp_path / "nightly").glob("manifest-*.jsonl")), timeout=120)
    [manifest] = (tmp_path / "nightly").glob("manifest-*.jsonl")
    [row] = rows_of(manifest)
    assert len(row.snippets) == len(case.truth_z())


# ---------------------------------------------------------------------------------------------
# Migration


def test_migration_0004_matches_the_model_and_downgrades(db_url: str) -> None:
    db = Database(db_url)
    try:
        with db.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert [d for d in diff if "exported_reports" in str(d)] == []
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        for target in ("0003", "head"):
            with db.engine.begin() as conn:
                cfg.attributes["connection"] = conn
                (command.downgrade if target == "0003" else command.upgrade)(cfg, target)
        with db.transaction() as s:
            assert s.scalar(select(func.count()).select_from(ExportedReport)) == 0
            assert s.scalar(select(func.count()).select_from(Instance)) == 0
    finally:
        db.dispose()
