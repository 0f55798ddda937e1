"""The reconciler: the database says which jobs should be moving; it re-sends those whose
message was lost (DESIGN.md §1).

A message is lost when a broker restarts without persistence, when a worker dies holding a
message the transport does not redeliver (the embedded SQLite transport, a Redis visibility
timeout still running), or when the node crashed between committing a job and publishing it.
None of that is visible to the broker's client, all of it is visible in the jobs table:

* queued, never published (``published_at`` empty) for longer than a grace period, or
  published longer ago than ``queued_stale_s``: publish again;
* running for longer than ``job_timeout_s``: the worker is gone; back to queued and publish,
  or failed once it has used its attempts (a series that kills the worker every time must not
  loop forever);
* selected series of the last day without any job (the node died between selecting and
  creating the job): create it. Older selections are left alone, so installing a first bundle
  does not queue a site's whole history.

Re-sending is always safe: a worker claims a job with a guarded update, so a duplicate message
finds nothing to do.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from celery import Celery  # type: ignore[import-untyped]
from sqlalchemy import and_, or_, select, update

from radfinder_node.database import Database
from radfinder_node.job_models import Job, JobState
from radfinder_node.jobs import JobSubmitter, publish
from radfinder_node.models import Series, SeriesState
from radfinder_node.timeutil import utcnow

log = logging.getLogger("radfinder_node.reconciler")

ORPHAN_LOOKBACK = timedelta(days=1)


@dataclass
class ReconcileReport:
    resent: list[int] = field(default_factory=list)
    requeued: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    created: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.resent or self.requeued or self.failed or self.created)


class Reconciler:
    def __init__(
        self,
        db: Database,
        app: Celery,
        *,
        job_timeout_s: float,
        queued_stale_s: float,
        max_attempts: int,
        unpublished_grace_s: float = 10.0,
        submitter: JobSubmitter | None = None,
    ) -> None:
        self.db = db
        self.app = app
        self.job_timeout = timedelta(seconds=job_timeout_s)
        self.queued_stale = timedelta(seconds=queued_stale_s)
        self.unpublished_grace = timedelta(seconds=unpublished_grace_s)
        self.max_attempts = max_attempts
        self.submitter = submitter

    def tick(self, now: datetime | None = None) -> ReconcileReport:
        now = now or utcnow()
        report = ReconcileReport()
        self._resend_queued(now, report)
        self._recover_running(
            and_(Job.state == JobState.RUNNING, Job.started_at < now - self.job_timeout),
            "running past the job timeout: worker lost",
            report,
        )
        self._create_missing(now, report)
        if report:
            log.info(
                "reconciled",
                extra={
                    "fields": {
                        "resent": report.resent,
                        "requeued": report.requeued,
                        "failed": report.failed,
                        "created": report.created,
                    }
                },
            )
        return report

    def recover_dead_workers(self, host: str, alive: str) -> ReconcileReport:
        """Jobs left running by an earlier embedded worker on ``host`` (not ``alive``, the
        current one): that process is gone, so they need not wait for the job timeout."""
        report = ReconcileReport()
        self._recover_running(
            and_(
                Job.state == JobState.RUNNING,
                Job.worker.like(f"embedded-%@{host}"),
                Job.worker != alive,
            ),
            "the embedded worker that ran it stopped",
            report,
        )
        if report:
            log.warning(
                "jobs of a stopped worker recovered",
                extra={"fields": {"requeued": report.requeued, "failed": report.failed}},
            )
        return report

    def recover_worker(self, name: str) -> ReconcileReport:
        """Jobs left running under ``name`` by an earlier process of a worker that is starting
        again now (a restarted ``gpu0@host`` runs nothing yet)."""
        report = ReconcileReport()
        self._recover_running(
            and_(Job.state == JobState.RUNNING, Job.worker == name),
            "its worker restarted",
            report,
        )
        return report

    def _resend_queued(self, now: datetime, report: ReconcileReport) -> None:
        lost = or_(
            and_(Job.published_at.is_(None), Job.queued_at < now - self.unpublished_grace),
            Job.published_at < now - self.queued_stale,
        )
        with self.db.transaction() as session:
            ids = session.scalars(
                select(Job.id).where(Job.state == JobState.QUEUED, lost).order_by(Job.id)
            ).all()
        for job_id in ids:
            if publish(self.db, self.app, job_id) is not None:
                report.resent.append(job_id)

    def _recover_running(self, where: object, reason: str, report: ReconcileReport) -> None:
        with self.db.transaction() as session:
            rows = session.execute(
                select(Job.id, Job.attempts).where(where).order_by(Job.id)  # type: ignore[arg-type]
            ).all()
        for job_id, attempts in rows:
            give_up = attempts >= self.max_attempts
            values: dict[str, object] = (
                {
                    "state": JobState.FAILED,
                    "error": f"{reason} ({attempts} attempts)",
                    "finished_at": utcnow(),
                }
                if give_up
                else {
                    "state": JobState.QUEUED,
                    "error": reason,
                    "queued_at": utcnow(),
                    "task_id": None,
                    "published_at": None,
                }
            )
            with self.db.transaction() as session:
                res = session.execute(
                    update(Job)
                    .where(
                        Job.id == job_id, Job.state == JobState.RUNNING, Job.attempts == attempts
                    )
                    .values(**values)
                )
                if not res.rowcount:  # type: ignore[attr-defined]
                    continue  # it finished (or was taken) meanwhile
            if give_up:
                report.failed.append(job_id)
            else:
                report.requeued.append(job_id)
                publish(self.db, self.app, job_id)

    def _create_missing(self, now: datetime, report: ReconcileReport) -> None:
        if self.submitter is None:
            return
        with self.db.transaction() as session:
            uids = session.scalars(
                select(Series.series_uid).where(
                    Series.state == SeriesState.SELECTED,
                    Series.decided_at >= now - ORPHAN_LOOKBACK,
                    ~select(Job.id).where(Job.series_id == Series.id).exists(),
                )
            ).all()
        for uid in uids:
            report.created.append(self.submitter(uid))

    def run(self, stop: threading.Event, interval_s: float) -> None:
        """Loop until ``stop`` is set; errors are logged and the loop goes on."""
        while not stop.wait(interval_s):
            try:
                self.tick()
            except Exception:
                log.exception("reconcile pass failed")
