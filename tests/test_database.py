"""Database layer on SQLite and on the PostgreSQL at 127.0.0.1:5432."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path, PurePosixPath

from pydicom import Dataset
from sqlalchemy import inspect, select

from dicom_io.scp import ReceivedInstance, Rejected
from dicom_io.selection import DEFAULT_SELECTION
from dicom_io.spool import StoredFile
from radfinder_node.completion import CompletionMonitor
from radfinder_node.database import Database, migrate
from radfinder_node.ingest import IngestRecorder
from radfinder_node.models import Instance, Series, SeriesState, Study
from radfinder_node.status import node_status
from radfinder_node.timeutil import utcnow

STUDY = "1.2.826.0.1.3680043.8.498.1"
CHEST = {
    "Modality": "CT",
    "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
    "BodyPartExamined": "CHEST",
    "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
    "SliceThickness": 1.0,
    "ConvolutionKernel": "B30f",
    "SeriesNumber": 2,
}


def received(series: str, sop: str, header: dict[str, object] | None = None) -> ReceivedInstance:
    rel = PurePosixPath(STUDY, series, f"{sop}.dcm")
    ds = Dataset()
    for keyword, value in (header or CHEST).items():
        setattr(ds, keyword, value)
    return ReceivedInstance(
        study_uid=STUDY,
        series_uid=series,
        sop_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        instance_number=int(sop.rsplit(".", 1)[1]),
        dataset=ds,
        stored=StoredFile(path=Path("/nonexistent") / rel, relative=rel, size=1000, replaced=False),
        calling_ae="PACS",
        peer="127.0.0.1:1",
    )


def test_migrations_create_schema_and_are_idempotent(db_url: str) -> None:
    db = Database(db_url)
    migrate(db.engine)  # second run is a no-op
    tables = set(inspect(db.engine).get_table_names())
    assert {"studies", "series", "instances", "quarantine", "alembic_version"} <= tables
    db.dispose()


def test_parallel_associations_record_one_study_one_series(db_url: str) -> None:
    db = Database(db_url)
    recorder = IngestRecorder(db)
    series = "1.2.826.0.1.3680043.8.498.2"
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            for i in range(offset, 40, 4):
                recorder.instance_stored(received(series, f"{series}.{i + 1}"))
        except BaseException as exc:  # pragma: no cover - the assertion reports it
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    recorder.instance_stored(received(series, f"{series}.1"))  # duplicate: still one row
    recorder.instance_rejected(
        Rejected("undecodable", 0xC210, PurePosixPath("x.dcm"), 10, None, "PACS", "p")
    )
    status = node_status(db)
    assert {k: status[k] for k in ("studies", "series", "instances", "quarantined")} == {
        "studies": 1,
        "series": {"receiving": 1, "complete": 0, "selected": 0, "ignored": 0},
        "instances": 40,
        "quarantined": 1,
    }
    db.dispose()


def test_completion_selection_and_late_instances(db_url: str) -> None:
    db = Database(db_url)
    recorder = IngestRecorder(db)
    thin, thick = "1.2.826.0.1.3680043.8.498.10", "1.2.826.0.1.3680043.8.498.11"
    for i in range(1, 31):
        recorder.instance_stored(received(thin, f"{thin}.{i}"))
        recorder.instance_stored(
            received(thick, f"{thick}.{i}", {**CHEST, "SliceThickness": 5.0, "SeriesNumber": 3})
        )
    busy: set[str] = {thick}
    monitor = CompletionMonitor(
        db, quiet_period_s=5, selection=DEFAULT_SELECTION, in_flight=lambda: set(busy)
    )
    assert monitor.tick() == []  # not quiet yet
    later = utcnow() + timedelta(seconds=6)
    assert monitor.tick(later) == []  # thin complete, but the study still has a busy series
    states = _states(db)
    assert states == {thin: SeriesState.COMPLETE, thick: SeriesState.RECEIVING}
    busy.clear()
    assert monitor.tick(later) == [thin]
    with db.transaction() as s:
        reasons = dict(s.execute(select(Series.series_uid, Series.state_reason)).all())
    assert _states(db) == {thin: SeriesState.SELECTED, thick: SeriesState.IGNORED}
    assert reasons[thin] and reasons[thick] and "thinner" in reasons[thick].lower()

    # a late instance reopens its series; it is decided again after the quiet period
    recorder.instance_stored(received(thick, f"{thick}.31"))
    assert _states(db)[thick] == SeriesState.RECEIVING
    assert monitor.tick(utcnow() + timedelta(seconds=6)) == []
    assert _states(db) == {thin: SeriesState.SELECTED, thick: SeriesState.IGNORED}
    with db.transaction() as s:
        assert s.scalar(select(Study.study_uid)) == STUDY
        assert len(s.scalars(select(Instance)).all()) == 61
    db.dispose()


def test_restart_resumes_pending_series(db_url: str) -> None:
    db = Database(db_url)
    series = "1.2.826.0.1.3680043.8.498.20"
    recorder = IngestRecorder(db)
    for i in range(1, 25):
        recorder.instance_stored(received(series, f"{series}.{i}"))
    db.dispose()
    reopened = Database(db_url)  # a new process would see exactly this
    monitor = CompletionMonitor(reopened, quiet_period_s=5, selection=DEFAULT_SELECTION)
    assert monitor.tick(utcnow() + timedelta(seconds=6)) == [series]
    reopened.dispose()


def _states(db: Database) -> dict[str, SeriesState]:
    with db.transaction() as s:
        return dict(s.execute(select(Series.series_uid, Series.state)).all())
