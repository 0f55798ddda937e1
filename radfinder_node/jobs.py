"""Inference jobs: created when a series is selected, moved through their states by guarded
updates (DESIGN.md §6: queued → running → done | failed).

The row is committed before its message is published, so a crash in between leaves a queued
job without a message, which the reconciler finds and sends. Every transition is one UPDATE
whose WHERE clause states the state it leaves, so a duplicate message, a reconciler re-send or
a second worker can never move a job twice: the loser's update matches no row.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from celery import Celery  # type: ignore[import-untyped]
from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicom_io.uids import uid_from_key
from radfinder_node.celery_app import send_infer
from radfinder_node.database import Database
from radfinder_node.job_models import Job, JobState
from radfinder_node.models import Series
from radfinder_node.timeutil import as_utc, utcnow

log = logging.getLogger("radfinder_node.jobs")


class BundleMissingError(FileNotFoundError):
    """No readable bundle.toml where the configuration points."""


@dataclass(frozen=True)
class BundleRef:
    """Which model a job asks for: half of the job's key."""

    name: str
    version: str


def read_bundle_ref(path: Path) -> BundleRef:
    """Name and version from ``bundle.toml``, without loading the model (the node needs only
    these to key jobs; the worker validates the whole bundle when it loads it)."""
    toml = Path(path) / "bundle.toml"
    try:
        manifest = tomllib.loads(toml.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BundleMissingError(f"no model bundle at {path} (bundle.toml missing)") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BundleMissingError(f"cannot read {toml}: {exc}") from exc
    name, version = manifest.get("name"), manifest.get("version")
    if not isinstance(name, str) or not isinstance(version, str) or not name or not version:
        raise BundleMissingError(f"{toml}: name and version must be non-empty strings")
    return BundleRef(name, version)


def locate_bundle(bundle_path: Path, ref: BundleRef) -> Path | None:
    """The directory holding bundle ``ref``: the configured one, or a version installed beside
    it (``bundles/radfinder-1.2`` next to ``bundles/radfinder-1.3``, with ``bundle_path`` a
    symlink switched from one to the other). Jobs queued before an upgrade keep the version
    they were created for, so they run on it instead of failing; None when it is nowhere."""
    path = Path(bundle_path)
    with contextlib.suppress(BundleMissingError):
        if read_bundle_ref(path) == ref:
            return path.resolve()
    parent = path.resolve().parent
    try:
        siblings = sorted(p for p in parent.iterdir() if p.is_dir())
    except OSError:
        return None
    for candidate in siblings:
        with contextlib.suppress(BundleMissingError):
            if read_bundle_ref(candidate) == ref:
                return candidate.resolve()
    return None


def job_key(series_uid: str, bundle: BundleRef) -> str:
    return f"{series_uid}/{bundle.name}/{bundle.version}"


@dataclass(frozen=True)
class OutputUIDs:
    """The UIDs of everything a job writes, derived from its key (DESIGN.md §6)."""

    sr_series: str
    sr_sop: str
    kos_series: str
    kos_sop: str

    @classmethod
    def for_key(cls, key: str) -> OutputUIDs:
        return cls(
            sr_series=uid_from_key(f"{key}/sr-series"),
            sr_sop=uid_from_key(f"{key}/sr"),
            kos_series=uid_from_key(f"{key}/kos-series"),
            kos_sop=uid_from_key(f"{key}/kos"),
        )


def worker_name(prefix: str = "embedded") -> str:
    """``prefix@host:pid``: names a worker process, so a restarted node knows its dead jobs."""
    return f"{prefix}@{socket.gethostname()}:{os.getpid()}"


# ----------------------------------------------------------------------------- creation


def create_job(
    db: Database,
    series_uid: str,
    bundle: BundleRef,
    destinations: Sequence[str],
    *,
    now: datetime | None = None,
) -> tuple[int, bool]:
    """``(job id, created)``; an existing job for the same key is returned untouched."""
    key = job_key(series_uid, bundle)
    now = now or utcnow()
    with db.transaction() as session:
        existing = session.scalar(select(Job.id).where(Job.key == key))
        if existing is not None:
            return int(existing), False
        series_id = session.scalar(select(Series.id).where(Series.series_uid == series_uid))
        if series_id is None:
            raise LookupError(f"no series {series_uid} in the database")
    try:
        with db.transaction() as session:
            job = Job(
                key=key,
                series_id=series_id,
                series_uid=series_uid,
                bundle_name=bundle.name,
                bundle_version=bundle.version,
                state=JobState.QUEUED,
                attempts=0,
                destinations=list(destinations),
                timings={},
                created_at=now,
                queued_at=now,
            )
            session.add(job)
            session.flush()
            job_id = int(job.id)
    except IntegrityError:  # created concurrently by another process: theirs stands
        with db.transaction() as session:
            return int(session.scalar(select(Job.id).where(Job.key == key)) or 0), False
    log.info(
        "job created",
        extra={"fields": {"job_id": job_id, "series_uid": series_uid, "key": key}},
    )
    return job_id, True


def publish(db: Database, app: Celery, job_id: int, *, countdown: float = 0.0) -> str | None:
    """Send the job's message and record its id; None (logged) when the broker refused.

    A job whose publish failed stays queued without a task id, and the reconciler sends it.
    """
    try:
        task_id = send_infer(app, job_id, countdown=countdown)
    except Exception as exc:
        log.error(
            "cannot publish job",
            extra={"fields": {"job_id": job_id, "error": f"{type(exc).__name__}: {exc}"}},
        )
        return None
    with db.transaction() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(task_id=task_id, published_at=utcnow())
        )
    return task_id


class JobSubmitter:
    """The completion monitor's ``on_selected``: one job per selected series, then a message.

    Given the bundle's directory rather than a fixed name and version, it reads ``bundle.toml``
    for every series (a small file), so a bundle upgraded while the node runs is asked for by
    the next job: an upgrade needs no restart of the node.
    """

    def __init__(
        self, db: Database, app: Celery, bundle: BundleRef | Path, destinations: Sequence[str]
    ) -> None:
        self.db = db
        self.app = app
        self._bundle = bundle
        self.destinations = list(destinations)

    @property
    def bundle(self) -> BundleRef:
        """The bundle new jobs ask for; BundleMissingError when none is installed."""
        if isinstance(self._bundle, BundleRef):
            return self._bundle
        return read_bundle_ref(self._bundle)

    def __call__(self, series_uid: str) -> int:
        job_id, created = create_job(self.db, series_uid, self.bundle, self.destinations)
        if created:
            publish(self.db, self.app, job_id)
        return job_id


# ----------------------------------------------------------------------------- transitions


@dataclass(frozen=True)
class ClaimedJob:
    """What a worker needs to run a job; ``attempt`` guards its later updates."""

    id: int
    key: str
    series_id: int
    series_uid: str
    bundle: BundleRef
    destinations: tuple[str, ...]
    attempt: int
    created_at: datetime
    queued_at: datetime
    started_at: datetime


def claim_job(
    db: Database, job_id: int, worker: str, *, stale_after_s: float, now: datetime | None = None
) -> ClaimedJob | None:
    """queued → running (or take over a running job older than ``stale_after_s``).

    None when the job is done, failed, unknown or running elsewhere: the message is a duplicate.
    """
    now = now or utcnow()
    stale = now - timedelta(seconds=stale_after_s)
    with db.transaction() as session:
        result = session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                or_(
                    Job.state == JobState.QUEUED,
                    and_(Job.state == JobState.RUNNING, Job.started_at < stale),
                ),
            )
            .values(
                state=JobState.RUNNING,
                attempts=Job.attempts + 1,
                started_at=now,
                worker=worker[:128],
            )
        )
        if not result.rowcount:  # type: ignore[attr-defined]
            return None
        job = session.get_one(Job, job_id)
        return ClaimedJob(
            id=job.id,
            key=job.key,
            series_id=job.series_id,
            series_uid=job.series_uid,
            bundle=BundleRef(job.bundle_name, job.bundle_version),
            destinations=tuple(job.destinations),
            attempt=job.attempts,
            created_at=as_utc(job.created_at),
            queued_at=as_utc(job.queued_at),
            started_at=now,
        )


def _mine(job: ClaimedJob) -> Any:
    return and_(
        Job.id == job.id, Job.state == JobState.RUNNING, Job.attempts == job.attempt
    )


def mark_done(
    session: Session,
    job: ClaimedJob,
    timings: dict[str, float],
    result: dict[str, Any],
    *,
    now: datetime | None = None,
) -> bool:
    """running → done inside the caller's transaction; False if this attempt lost the job."""
    res = session.execute(
        update(Job)
        .where(_mine(job))
        .values(
            state=JobState.DONE,
            timings=timings,
            result=result,
            error=None,
            finished_at=now or utcnow(),
        )
    )
    return bool(res.rowcount)  # type: ignore[attr-defined]


def mark_failed(
    db: Database, job: ClaimedJob, error: str, timings: dict[str, float] | None = None
) -> bool:
    """running → failed: an error that another attempt would repeat (bad series, bad bundle)."""
    values: dict[str, Any] = {
        "state": JobState.FAILED,
        "error": error,
        "finished_at": utcnow(),
    }
    if timings is not None:
        values["timings"] = timings
    with db.transaction() as session:
        res = session.execute(update(Job).where(_mine(job)).values(**values))
        return bool(res.rowcount)  # type: ignore[attr-defined]


def mark_retry(db: Database, job: ClaimedJob, error: str) -> bool:
    """running → queued after a transient error; the caller sends the message again."""
    with db.transaction() as session:
        res = session.execute(
            update(Job)
            .where(_mine(job))
            .values(
                state=JobState.QUEUED,
                error=error,
                queued_at=utcnow(),
                task_id=None,
                published_at=None,
            )
        )
        return bool(res.rowcount)  # type: ignore[attr-defined]


def requeue(db: Database, app: Celery, job_id: int, *, reason: str) -> bool:
    """failed or done → queued, and send it: an operator's explicit re-run."""
    with db.transaction() as session:
        res = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.in_([JobState.FAILED, JobState.DONE]))
            .values(
                state=JobState.QUEUED,
                queued_at=utcnow(),
                attempts=0,
                task_id=None,
                published_at=None,
            )
        )
        if not res.rowcount:  # type: ignore[attr-defined]
            return False
    log.info("job re-queued", extra={"fields": {"job_id": job_id, "reason": reason}})
    publish(db, app, job_id)
    return True
