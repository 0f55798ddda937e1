"""Retention on a real database (SQLite and PostgreSQL) and real files: what is old and finished
goes, everything still needed stays; the node runs it by itself, and `radfinder-node cleanup`
by hand."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from conftest import node_settings, small_phantom, storescu, wait_for
from dicom_io.selection import DEFAULT_SELECTION
from dicom_io.uids import uid_from_key
from radfinder_node import cli
from radfinder_node.database import Database
from radfinder_node.job_models import Job, JobState, OutboundObject, OutboundState
from radfinder_node.models import Instance, QuarantinedObject, Series, SeriesState, Study
from radfinder_node.node import Node
from radfinder_node.report_models import Report, ReportState
from radfinder_node.retention import Retention, RetentionPolicy
from radfinder_node.timeutil import utcnow

NOW = utcnow()
OLD = NOW - timedelta(days=20)
RECENT = NOW - timedelta(hours=2)
POLICY = RetentionPolicy(spool_days=14, results_days=30, quarantine_days=60)


def _age(path: Path, when: datetime) -> None:
    os.utime(path, (when.timestamp(), when.timestamp()))


@dataclass
class World:
    db: Database
    data: Path

    @property
    def spool(self) -> Path:
        return self.data / "spool"

    @property
    def results(self) -> Path:
        return self.data / "results"

    @property
    def quarantine(self) -> Path:
        return self.data / "quarantine"

    def retention(self, policy: RetentionPolicy = POLICY) -> Retention:
        return Retention(
            self.db,
            spool_dir=self.spool,
            results_dir=self.results,
            quarantine_dir=self.quarantine,
            policy=policy,
        )

    def study(
        self,
        name: str,
        states: Sequence[SeriesState] = (SeriesState.SELECTED,),
        *,
        received: datetime = OLD,
        job: JobState | None = JobState.DONE,
        sent: Sequence[OutboundState] = (OutboundState.SENT,),
        instances: int = 3,
    ) -> str:
        """A study with one series per state, ``instances`` spooled files each (aged like the
        rows), a job per selected series in state ``job`` and one result per entry of
        ``sent`` (one outbound row each, confirmed at ``received``)."""
        study_uid = uid_from_key(f"study/{name}")
        with self.db.transaction() as session:
            study = Study(study_uid=study_uid, created_at=received)
            session.add(study)
            session.flush()
            for s, state in enumerate(states):
                series_uid = uid_from_key(f"series/{name}/{s}")
                series = Series(
                    series_uid=series_uid,
                    study_id=study.id,
                    modality="CT",
                    state=state,
                    attributes={},
                    first_received_at=received,
                    last_received_at=received,
                    decided_at=received,
                )
                session.add(series)
                session.flush()
                for i in range(instances):
                    sop = uid_from_key(f"sop/{name}/{s}/{i}")
                    rel = f"{study_uid}/{series_uid}/{sop}.dcm"
                    path = self.spool / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(b"x" * 100)
                    _age(path, received)
                    session.add(
                        Instance(
                            sop_uid=sop,
                            series_id=series.id,
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                            transfer_syntax_uid="1.2.840.10008.1.2.1",
                            path=rel,
                            size_bytes=100,
                            received_at=received,
                        )
                    )
                if state != SeriesState.SELECTED or job is None:
                    continue
                row = Job(
                    key=f"{series_uid}/b/1",
                    series_id=series.id,
                    series_uid=series_uid,
                    bundle_name="b",
                    bundle_version="1",
                    state=job,
                    attempts=1,
                    destinations=["PACS@127.0.0.1:104"],
                    timings={},
                    created_at=received,
                    queued_at=received,
                    finished_at=received,
                )
                session.add(row)
                session.flush()
                for k, out_state in enumerate(sent):
                    self.result(session, row.id, study_uid, f"{name}/{s}/{k}", out_state, received)
        return study_uid

    def result(
        self,
        session: object,
        job_id: int | None,
        study_uid: str,
        key: str,
        state: OutboundState,
        when: datetime,
        destinations: Sequence[str] = ("PACS@127.0.0.1:104",),
    ) -> Path:
        sop, series = uid_from_key(f"result/{key}"), uid_from_key(f"result-series/{key}")
        rel = f"{study_uid}/{series}/{sop}.dcm"
        path = self.results / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"r" * 50)
        _age(path, when)
        for dest in destinations:
            session.add(  # type: ignore[attr-defined]
                OutboundObject(
                    sop_uid=sop,
                    destination=dest,
                    job_id=job_id,
                    kind="sr",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                    study_uid=study_uid,
                    series_uid=series,
                    path=rel,
                    state=state,
                    attempts=1,
                    next_attempt_at=when,
                    created_at=when,
                    sent_at=when if state == OutboundState.SENT else None,
                )
            )
        return path

    def spool_files(self, study_uid: str) -> list[Path]:
        return sorted((self.spool / study_uid).rglob("*.dcm"))


@pytest.fixture
def world(db_url: str, tmp_path: Path) -> World:
    return World(Database(db_url), tmp_path / "data")


def test_spool_goes_only_for_old_finished_studies(world: World) -> None:
    gone = {
        "done": world.study("done"),
        "ignored": world.study("ignored", [SeriesState.IGNORED, SeriesState.IGNORED]),
        "mixed": world.study("mixed", [SeriesState.SELECTED, SeriesState.IGNORED]),
    }
    kept = {
        "failed": world.study("failed", job=JobState.FAILED),
        "running": world.study("running", job=JobState.RUNNING),
        "queued": world.study("queued", job=JobState.QUEUED),
        "unsent": world.study("unsent", sent=[OutboundState.SENT, OutboundState.PENDING]),
        "send-failed": world.study("send-failed", sent=[OutboundState.FAILED]),
        "recent": world.study("recent", received=RECENT),
        "undecided": world.study("undecided", [SeriesState.SELECTED, SeriesState.COMPLETE]),
        "receiving": world.study("receiving", [SeriesState.RECEIVING]),
        "no-job": world.study("no-job", job=None),
    }
    before = {uid: world.spool_files(uid) for uid in [*gone.values(), *kept.values()]}
    assert all(len(files) >= 3 for files in before.values())

    dry = world.retention().run_once(now=NOW, dry_run=True)
    assert sorted(dry.spool_studies) == sorted(gone.values())
    assert dry.spool_files == sum(len(before[u]) for u in gone.values()) == 15
    assert dry.spool_bytes == 100 * dry.spool_files
    assert {uid: world.spool_files(uid) for uid in before} == before  # nothing touched

    report = world.retention().run_once(now=NOW)
    assert not report.dry_run and not report.errors
    assert sorted(report.spool_studies) == sorted(gone.values())
    assert (report.spool_files, report.spool_bytes) == (dry.spool_files, dry.spool_bytes)
    for uid in gone.values():
        assert not (world.spool / uid).exists()  # files and the emptied folders
    for name, uid in kept.items():
        assert world.spool_files(uid) == before[uid], name
    with world.db.transaction() as session:  # the history stays
        assert session.query(Instance).count() == sum(len(f) for f in before.values())
    # A second pass finds nothing left to do.
    assert world.retention().run_once(now=NOW).spool_files == 0


def test_a_study_with_an_unmined_report_keeps_its_spool(world: World) -> None:
    uid = world.study("reported")
    with world.db.transaction() as session:
        study_id = session.query(Study.id).filter(Study.study_uid == uid).scalar()
        report = Report(
            sending_facility="RIS",
            control_id="1",
            sending_application="RIS",
            version="2.5",
            body_sha256="0" * 64,
            study_uids=[uid],
            raw=b"MSH|",
            state=ReportState.LINKED,
            study_id=study_id,
            received_at=OLD,
        )
        session.add(report)
    assert world.retention().run_once(now=NOW).spool_studies == []
    with world.db.transaction() as session:
        session.query(Report).update({Report.mined_at: OLD})
    assert world.retention().run_once(now=NOW).spool_studies == [uid]


def test_an_instance_received_again_lately_is_not_taken_with_its_study(world: World) -> None:
    uid = world.study("resent")
    files = world.spool_files(uid)
    _age(files[0], NOW - timedelta(minutes=1))  # the PACS sent it again a minute ago
    report = world.retention().run_once(now=NOW)
    assert report.spool_files == len(files) - 1
    assert world.spool_files(uid) == [files[0]]


def test_results_go_once_every_destination_confirmed_them(world: World) -> None:
    long_ago, lately = NOW - timedelta(days=40), NOW - timedelta(days=5)
    study_uid = uid_from_key("study/results")
    with world.db.transaction() as session:
        two = ("PACS@127.0.0.1:104", "ARCHIVE@127.0.0.1:105")
        old_sent = world.result(session, None, study_uid, "a", OutboundState.SENT, long_ago, two)
        new_sent = world.result(session, None, study_uid, "b", OutboundState.SENT, lately)
        pending = world.result(session, None, study_uid, "c", OutboundState.PENDING, long_ago)
        failed = world.result(session, None, study_uid, "d", OutboundState.FAILED, long_ago)
        half = world.result(session, None, study_uid, "e", OutboundState.SENT, long_ago, two)
        session.flush()
        session.query(OutboundObject).filter(
            OutboundObject.path.like(f"%{half.name}"),
            OutboundObject.destination == two[1],
        ).update({OutboundObject.state: OutboundState.PENDING}, synchronize_session=False)
    unsent_anywhere = world.results / study_uid / "lone" / "1.2.3.dcm"  # no destination
    unsent_anywhere.parent.mkdir(parents=True)
    unsent_anywhere.write_bytes(b"only copy")
    _age(unsent_anywhere, long_ago)

    report = world.retention().run_once(now=NOW)
    assert (report.results_files, report.results_bytes) == (1, 50)
    assert not old_sent.exists() and not old_sent.parent.exists()
    for path in (new_sent, pending, failed, half, unsent_anywhere):
        assert path.is_file(), path


def test_quarantine_goes_by_age(world: World) -> None:
    old_day, new_day = world.quarantine / "20200101", world.quarantine / NOW.strftime("%Y%m%d")
    old_day.mkdir(parents=True)
    new_day.mkdir(parents=True)
    old = [old_day / "010203-aa.dcm", old_day / "010203-aa.json"]
    new = [new_day / "010203-bb.hl7", new_day / "010203-bb.json"]
    for path in (*old, *new):
        path.write_bytes(b"q" * 10)
    for path in old:
        _age(path, NOW - timedelta(days=61))
    with world.db.transaction() as session:
        session.add(
            QuarantinedObject(
                kind="dicom", reason="bad", path="20200101/010203-aa.dcm", size_bytes=10,
                received_at=NOW - timedelta(days=61),
            )
        )
    report = world.retention().run_once(now=NOW)
    assert (report.quarantine_files, report.quarantine_bytes) == (2, 20)
    assert not old_day.exists()
    assert all(p.is_file() for p in new)
    with world.db.transaction() as session:  # the record of what was rejected stays
        assert session.query(QuarantinedObject).count() == 1


def test_zero_days_keeps_everything(world: World) -> None:
    uid = world.study("forever")
    keep = RetentionPolicy(spool_days=0, results_days=0, quarantine_days=0)
    report = world.retention(keep).run_once(now=NOW + timedelta(days=3650))
    assert report.files == 0 and len(world.spool_files(uid)) == 3


def test_cleanup_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    world = World(Database(f"sqlite:///{(data / 'radfinder.db').resolve()}"), data)
    uid = world.study("cli")
    world.db.dispose()
    argv = ["cleanup", "--data-dir", str(data), "--json"]

    assert cli.main([*argv, "--dry-run"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["dry_run"] is True and dry["spool_studies"] == [uid] and dry["spool_files"] == 3
    assert len(world.spool_files(uid)) == 3

    assert cli.main(argv) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["dry_run"] is False and done["spool_files"] == 3
    assert world.spool_files(uid) == []

    assert cli.main(["cleanup", "--data-dir", str(data), "--dry-run"]) == 0
    assert "spool       would delete 0 files, 0 bytes" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.integration
def test_the_node_cleans_up_by_itself(tmp_path: Path) -> None:
    """A series nobody wants (the rules select MR only) is ignored; once older than the spool
    age (here about a second) the node's retention loop deletes its files."""
    selection = {**DEFAULT_SELECTION, "rules": [
        {"name": "mr-only", "all": [{"attribute": "Modality", "in": ["MR"]}]}
    ]}
    node = Node(
        node_settings(
            data_dir=tmp_path / "node",
            selection=selection,
            embedded_worker=False,
            retention_spool_days=1.5 / 86400,
            retention_interval_s=0.3,
        )
    )
    node.start()
    try:
        from dicom_io.synthetic import write_ct_series

        hu, spacing = small_phantom(slices=6, size=32)
        series = write_ct_series(tmp_path / "series", hu, spacing)
        assert node.port is not None
        assert storescu(node.port, series.paths[0].parent).returncode == 0
        study_dir = node.settings.spool_dir / series.study_uid
        assert study_dir.is_dir() and len(list(study_dir.rglob("*.dcm"))) == 6
        gone: Callable[[], bool] = lambda: not study_dir.exists()  # noqa: E731
        assert wait_for(gone, timeout=20)
        with node.db.transaction() as session:
            (state,) = session.query(Series.state).one()
            assert state == SeriesState.IGNORED
            assert session.query(Instance).count() == 6
    finally:
        node.stop()
