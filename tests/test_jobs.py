"""Jobs in the database (SQLite and PostgreSQL): creation, guarded state transitions, the
reconciler, the migration; and a job whose message was purged from the embedded broker, found
again by the reconciler and run by a real worker."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from celery import Celery  # type: ignore[import-untyped]
from sqlalchemy import inspect
from test_worker import job_rows, micro_bundle, wait_job

from conftest import node_settings, small_phantom, storescu, wait_for
from dicom_io.uids import is_valid_uid
from radfinder_node.celery_app import EmbeddedWorker, create_app
from radfinder_node.database import MIGRATIONS, Database
from radfinder_node.job_models import Job, JobState
from radfinder_node.jobs import (
    BundleMissingError,
    BundleRef,
    JobSubmitter,
    OutputUIDs,
    claim_job,
    create_job,
    job_key,
    mark_done,
    mark_retry,
    publish,
    read_bundle_ref,
)
from radfinder_node.models import Base, Series, SeriesState, Study
from radfinder_node.node import Node
from radfinder_node.reconciler import Reconciler
from radfinder_node.timeutil import utcnow

__all__ = ["micro_bundle"]  # the session fixture, shared with test_worker

BUNDLE = BundleRef("radfinder-micro", "0.1.0+step3")


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    yield database
    database.dispose()


@pytest.fixture
def app(tmp_path: Path, db: Database) -> Iterator[Celery]:
    """A Celery app on a private embedded broker (SQLite), bound to ``db``."""
    celery = create_app(node_settings(data_dir=tmp_path / "node", database_url=db.url), db)
    yield celery
    celery.close()


def queued_messages(app: Celery) -> int:
    with app.connection_for_write() as conn:
        ok = conn.default_channel.queue_declare(app.conf.task_default_queue, passive=True)
        return int(ok.message_count)


def add_series(db: Database, uid: str, *, selected_ago: timedelta | None = None) -> None:
    now = utcnow()
    with db.transaction() as session:
        study = Study(study_uid=f"{uid}.1", created_at=now)
        session.add(study)
        session.flush()
        session.add(
            Series(
                series_uid=uid,
                study_id=study.id,
                modality="CT",
                state=SeriesState.SELECTED,
                attributes={},
                first_received_at=now,
                last_received_at=now,
                decided_at=now - (selected_ago or timedelta()),
            )
        )


def job(db: Database, job_id: int) -> Job:
    with db.transaction() as session:
        return session.get_one(Job, job_id)


def test_create_job_is_idempotent_per_series_and_bundle(db: Database) -> None:
    add_series(db, "1.2.3.4")
    first = create_job(db, "1.2.3.4", BUNDLE, ["PACS@127.0.0.1:104"])
    assert first[1] is True
    assert create_job(db, "1.2.3.4", BUNDLE, []) == (first[0], False)
    other = create_job(db, "1.2.3.4", BundleRef(BUNDLE.name, "0.2.0"), [])
    assert other[1] is True and other[0] != first[0]
    row = job(db, first[0])
    assert row.key == job_key("1.2.3.4", BUNDLE) == "1.2.3.4/radfinder-micro/0.1.0+step3"
    assert (row.state, row.attempts, row.destinations) == (
        JobState.QUEUED,
        0,
        ["PACS@127.0.0.1:104"],
    )
    with pytest.raises(LookupError):
        create_job(db, "9.9.9", BUNDLE, [])


def test_output_uids_are_derived_from_the_key() -> None:
    a = OutputUIDs.for_key(job_key("1.2.3", BUNDLE))
    assert a == OutputUIDs.for_key(job_key("1.2.3", BUNDLE))
    uids = [a.sr_series, a.sr_sop, a.kos_series, a.kos_sop]
    assert len(set(uids)) == 4 and all(is_valid_uid(u) and u.startswith("2.25.") for u in uids)
    assert OutputUIDs.for_key(job_key("1.2.4", BUNDLE)).sr_sop != a.sr_sop


def test_transitions_are_guarded(db: Database) -> None:
    add_series(db, "1.2.3.5")
    job_id, _ = create_job(db, "1.2.3.5", BUNDLE, [])
    first = claim_job(db, job_id, "w1@host", stale_after_s=60)
    assert first is not None and first.attempt == 1
    assert claim_job(db, job_id, "w2@host", stale_after_s=60) is None  # a duplicate message
    # After the job timeout a second worker takes it over; the first can no longer finish it.
    later = utcnow() + timedelta(seconds=61)
    second = claim_job(db, job_id, "w2@host", stale_after_s=60, now=later)
    assert second is not None and second.attempt == 2
    with db.transaction() as session:
        assert not mark_done(session, first, {}, {"x": 1})
    assert not mark_retry(db, first, "late")
    with db.transaction() as session:
        assert mark_done(session, second, {"infer": 0.5}, {"x": 2})
    row = job(db, job_id)
    assert (row.state, row.attempts, row.worker, row.result) == (
        JobState.DONE,
        2,
        "w2@host",
        {"x": 2},
    )
    assert claim_job(db, job_id, "w3@host", stale_after_s=60, now=later + timedelta(days=1)) is None


def test_retry_puts_the_job_back(db: Database) -> None:
    add_series(db, "1.2.3.6")
    job_id, _ = create_job(db, "1.2.3.6", BUNDLE, [])
    claimed = claim_job(db, job_id, "w1@host", stale_after_s=60)
    assert claimed is not None and mark_retry(db, claimed, "OSError: disk")
    row = job(db, job_id)
    assert (row.state, row.error, row.task_id) == (JobState.QUEUED, "OSError: disk", None)
    again = claim_job(db, job_id, "w1@host", stale_after_s=60)
    assert again is not None and again.attempt == 2


def test_reconciler_resends_unpublished_and_recovers_lost_workers(
    db: Database, app: Celery
) -> None:
    for uid in ("1.2.7.1", "1.2.7.2", "1.2.7.3"):
        add_series(db, uid)
    unpublished, _ = create_job(db, "1.2.7.1", BUNDLE, [])  # as if the node died before publish
    lost, _ = create_job(db, "1.2.7.2", BUNDLE, [])
    spent, _ = create_job(db, "1.2.7.3", BUNDLE, [])
    assert claim_job(db, lost, "w1@host", stale_after_s=60) is not None
    t0 = utcnow()
    for n in range(2):  # two attempts used, both lost with their worker
        at = t0 + timedelta(milliseconds=n)
        assert claim_job(db, spent, "w1@host", stale_after_s=0, now=at) is not None
    reconciler = Reconciler(
        db, app, job_timeout_s=60, queued_stale_s=600, max_attempts=2, unpublished_grace_s=5
    )
    assert not reconciler.tick()  # nothing is stale yet
    report = reconciler.tick(utcnow() + timedelta(seconds=61))
    assert report.resent == [unpublished]
    assert report.requeued == [lost]
    assert report.failed == [spent]
    assert queued_messages(app) == 2
    assert job(db, lost).state == JobState.QUEUED and job(db, lost).task_id is not None
    assert "worker lost" in (job(db, lost).error or "")
    assert job(db, spent).state == JobState.FAILED
    assert "2 attempts" in (job(db, spent).error or "")
    # Published just now: not re-sent again until it has been queued for queued_stale_s.
    assert not reconciler.tick(utcnow() + timedelta(seconds=61)).resent
    assert reconciler.tick(utcnow() + timedelta(seconds=601)).resent == [unpublished, lost]


def test_reconciler_recovers_jobs_of_a_dead_embedded_worker(db: Database, app: Celery) -> None:
    for uid in ("1.2.8.1", "1.2.8.2"):
        add_series(db, uid)
    dead, _ = create_job(db, "1.2.8.1", BUNDLE, [])
    other_host, _ = create_job(db, "1.2.8.2", BUNDLE, [])
    claim_job(db, dead, "embedded-111@nodehost", stale_after_s=60)
    claim_job(db, other_host, "embedded-111@otherhost", stale_after_s=60)
    reconciler = Reconciler(db, app, job_timeout_s=600, queued_stale_s=600, max_attempts=3)
    report = reconciler.recover_dead_workers("nodehost", alive="embedded-222@nodehost")
    assert report.requeued == [dead]
    assert job(db, other_host).state == JobState.RUNNING


def test_reconciler_creates_jobs_for_selected_series_without_one(
    db: Database, app: Celery
) -> None:
    add_series(db, "1.2.9.1")
    add_series(db, "1.2.9.2", selected_ago=timedelta(days=3))  # history: left alone
    submitter = JobSubmitter(db, app, BUNDLE, ["PACS@127.0.0.1:104"])
    reconciler = Reconciler(
        db, app, job_timeout_s=600, queued_stale_s=600, max_attempts=3, submitter=submitter
    )
    report = reconciler.tick()
    assert len(report.created) == 1
    assert [j.series_uid for j in job_rows(db)] == ["1.2.9.1"]
    assert job_rows(db)[0].task_id is not None and queued_messages(app) == 1
    assert not reconciler.tick().created


def test_publish_to_an_unreachable_broker_leaves_the_job_queued(
    db: Database, tmp_path: Path
) -> None:
    add_series(db, "1.2.10.1")
    settings = node_settings(
        data_dir=tmp_path / "n", database_url=db.url, broker_url="redis://127.0.0.1:1/0"
    )
    celery = create_app(settings, db)
    celery.conf.broker_connection_max_retries = 0
    celery.conf.broker_transport_options = {"max_retries": 0}
    job_id, _ = create_job(db, "1.2.10.1", BUNDLE, [])
    assert publish(db, celery, job_id) is None
    row = job(db, job_id)
    assert (row.state, row.task_id, row.published_at) == (JobState.QUEUED, None, None)
    celery.close()


def test_bundle_ref(tmp_path: Path) -> None:
    with pytest.raises(BundleMissingError, match=r"bundle\.toml missing"):
        read_bundle_ref(tmp_path)
    (tmp_path / "bundle.toml").write_text('name = "x"\n')
    with pytest.raises(BundleMissingError, match="non-empty"):
        read_bundle_ref(tmp_path)
    (tmp_path / "bundle.toml").write_text('name = "x"\nversion = "1"\n')
    assert read_bundle_ref(tmp_path) == BundleRef("x", "1")


def test_migration_down_and_up(db: Database) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    assert not {"jobs", "outbound_objects"} & set(inspect(db.engine).get_table_names())
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    assert {"jobs", "outbound_objects"} <= set(inspect(db.engine).get_table_names())
    # The hand-written revision and the ORM classes describe the same tables.
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert not [d for d in diff if "jobs" in str(d) or "outbound_objects" in str(d)]


def test_cli_destinations_and_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from radfinder_node.cli import _settings, build_parser, main

    args = build_parser().parse_args(
        ["serve", "--data-dir", str(tmp_path), "--destination", "PACS@10.0.0.5:104",
         "--destination", "ARCHIVE@[::1]:11112"]
    )
    settings = _settings(args, destinations=args.destination)
    assert settings.destinations == ["PACS@10.0.0.5:104", "ARCHIVE@[::1]:11112"]
    assert main(["serve", "--data-dir", str(tmp_path), "--destination", "no-port"]) == 2
    assert "AE@HOST:PORT" in capsys.readouterr().err

    db = Database(f"sqlite:///{tmp_path / 'radfinder.db'}")
    add_series(db, "1.2.11.1")
    create_job(db, "1.2.11.1", BUNDLE, [])
    db.dispose()
    assert main(["status", "--data-dir", str(tmp_path), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["jobs"] == {"queued": 1, "running": 0, "done": 0, "failed": 0}
    assert status["outbox"] == {"pending": 0, "sent": 0, "failed": 0}
    assert main(["status", "--data-dir", str(tmp_path)]) == 0
    assert "jobs queued       1" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.integration
def test_reconciler_requeues_a_job_whose_message_was_purged(
    micro_bundle: Path, tmp_path: Path
) -> None:
    """The node publishes the job to its embedded broker, the queue is purged (a broker that
    lost its messages), the reconciler sends it again, and a real worker runs it."""
    hu, spacing = small_phantom()
    from dicom_io.synthetic import write_ct_series

    series = write_ct_series(tmp_path / "series", hu, spacing)
    node = Node(
        node_settings(data_dir=tmp_path / "node", bundle_path=micro_bundle, embedded_worker=False)
    )
    node.start()
    worker: EmbeddedWorker | None = None
    try:
        assert node.port is not None and node.worker is None
        assert storescu(node.port, series.paths[0].parent).returncode == 0
        queued = wait_job(node.db, series.series_uid, {JobState.QUEUED})
        assert wait_for(lambda: queued_messages(node.celery) == 1)
        with node.celery.connection_for_write() as conn:
            assert conn.default_channel.queue_purge(node.settings.queue) == 1
        assert queued_messages(node.celery) == 0

        stale = timedelta(seconds=node.settings.job_queued_stale_s + 1)
        report = node.reconciler.tick(utcnow() + stale)
        assert report.resent == [queued.id]
        assert queued_messages(node.celery) == 1

        worker = EmbeddedWorker(node.celery, queue=node.settings.queue, hostname="late@test")
        assert worker.start()
        done = wait_job(node.db, series.series_uid, {JobState.DONE, JobState.FAILED})
        assert done.state == JobState.DONE and done.attempts == 1 and done.worker == "late@test"
        assert queued_messages(node.celery) == 0
        assert done.result is not None and len(done.result["objects"]) == 2
    finally:
        if worker is not None:
            worker.stop()
        node.stop()
