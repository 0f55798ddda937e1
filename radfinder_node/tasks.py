"""The inference task: series → volume → engine → prediction → findings → SR + KOS → outbox.

A message carries only a job id; everything else comes from the database, so a duplicate or
re-sent message is harmless: ``claim_job`` lets one attempt through, and the attempt that
finishes writes objects whose UIDs are derived from the job's key (a second run rewrites the
same files, and ``add_outbound`` keeps one row per object and destination).

Errors that another attempt would repeat (a series that cannot be assembled, a bundle that does
not match, findings that do not fit) fail the job at once with the reason; anything else (disk,
database, network) puts it back in the queue until ``job_max_attempts``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery, Task  # type: ignore[import-untyped]
from pydicom import Dataset, dcmread
from sqlalchemy import select

from dicom_io.geometry import VolumeError
from dicom_io.uids import uid_from_key
from radfinder_node.celery_app import TASK_INFER, current_worker_name
from radfinder_node.config import Settings
from radfinder_node.database import Database
from radfinder_node.jobs import (
    BundleRef,
    ClaimedJob,
    OutputUIDs,
    claim_job,
    locate_bundle,
    mark_done,
    mark_failed,
    mark_retry,
    publish,
    worker_name,
)
from radfinder_node.metrics import NodeMetrics, process_metrics
from radfinder_node.models import Instance
from radfinder_node.outbox import Written, add_outbound, write_result

log = logging.getLogger("radfinder_node.tasks")

SR_SERIES_NUMBER = 9901
KOS_SERIES_NUMBER = 9902
# Errors a second attempt would repeat: bad series, bad bundle, findings that do not fit.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (VolumeError, ValueError, LookupError)
# Test hook, not a setting (tests/test_netns_workers.py): every job waits this many seconds
# once claimed, so a test can kill its worker mid-job. Unset everywhere else.
HOLD_ENV = "RADFINDER_TEST_JOB_HOLD_S"


class BundleMismatchError(ValueError):
    """The worker serves another bundle than the job asks for."""


class _LostJob(Exception):
    """This attempt no longer owns the job (a stale takeover finished first)."""


@dataclass
class JobOutcome:
    job_id: int
    state: str  # done | failed | retry | skipped
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    result: dict[str, Any] | None = None


class _Stages:
    """Per-stage wall time in seconds, for the job row and the benchmark."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(
                self.timings.get(name, 0.0) + time.perf_counter() - t0, 4
            )


class WorkerContext:
    """What a worker process needs to run jobs: settings, the database (opened on first use
    unless the embedding node lends its own) and the process-wide engine cache."""

    def __init__(self, settings: Settings, db: Database | None = None) -> None:
        self.settings = settings
        self._db = db
        self._lock = threading.Lock()
        self.app: Celery | None = None
        # Called after a job commits its outbox rows (the embedding node wakes its sender).
        self.on_done: Callable[[], None] | None = None
        # Stage times and outcomes; the embedding node lends its own registry.
        self.metrics: NodeMetrics = process_metrics()

    @property
    def db(self) -> Database:
        with self._lock:
            if self._db is None:
                self._db = Database(self.settings.effective_database_url)
            return self._db

    def run_job(self, job_id: int, worker: str | None = None) -> JobOutcome:
        """Run one job to its end state; safe to call for any job id, any number of times."""
        outcome = self._run_job(job_id, worker)
        self.metrics.job_finished(outcome.state, outcome.timings)
        return outcome

    def _run_job(self, job_id: int, worker: str | None) -> JobOutcome:
        s = self.settings
        worker = worker or worker_name("direct")
        job = claim_job(self.db, job_id, worker, stale_after_s=s.job_timeout_s)
        if job is None:
            log.info("job not claimable (duplicate message)", extra={"fields": {"job_id": job_id}})
            return JobOutcome(job_id, "skipped")
        stages = _Stages()
        stages.timings["queue"] = round((job.started_at - job.queued_at).total_seconds(), 4)
        log.info(
            "job started",
            extra={"fields": {"job_id": job.id, "attempt": job.attempt, "worker": worker}},
        )
        try:
            result = self._execute(job, stages)
        except _LostJob:
            log.warning("job taken over by another attempt", extra={"fields": {"job_id": job.id}})
            return JobOutcome(job.id, "skipped", timings=stages.timings)
        except PERMANENT_ERRORS as exc:
            error = f"{type(exc).__name__}: {exc}"
            mark_failed(self.db, job, error, stages.timings)
            log.error("job failed", extra={"fields": {"job_id": job.id, "error": error}})
            return JobOutcome(job.id, "failed", error, stages.timings)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.exception("job attempt failed", extra={"fields": {"job_id": job.id}})
            if job.attempt >= s.job_max_attempts:
                mark_failed(self.db, job, f"{error} (after {job.attempt} attempts)", stages.timings)
                return JobOutcome(job.id, "failed", error, stages.timings)
            if mark_retry(self.db, job, error) and self.app is not None:
                publish(self.db, self.app, job.id, countdown=min(60.0, 5.0 * job.attempt))
            return JobOutcome(job.id, "retry", error, stages.timings)
        log.info(
            "job done",
            extra={"fields": {"job_id": job.id, "timings": stages.timings}},
        )
        if self.on_done is not None:
            self.on_done()
        return JobOutcome(job.id, "done", None, stages.timings, result)

    def _execute(self, job: ClaimedJob, stages: _Stages) -> dict[str, Any]:
        # Imported here: torch and highdicom take seconds to import, and a node whose worker
        # never runs a job (or runs elsewhere) should not pay that at start.
        from dicom_io.kos import build_kos
        from dicom_io.results import AlgorithmInfo
        from dicom_io.sr import build_sr
        from dicom_io.volume import load_volume
        from radfinder_node import engine_cache
        from radfinder_node.findings import findings_from_prediction, findings_summary

        s = self.settings
        hold_s = float(os.environ.get(HOLD_ENV) or 0)
        if hold_s > 0:
            with stages("hold"):
                time.sleep(hold_s)
        with stages("engine"):
            engine = engine_cache.get_engine(s.bundle_path, s.engine_runtime, s.engine_device)
        if BundleRef(engine.bundle.name, engine.bundle.version) != job.bundle:
            # Upgraded since this process loaded it (in place or by a switched symlink), or a
            # job queued before the upgrade: load the version the job asks for, wherever it is
            # installed, in the cached engine's place (between jobs, no restart).
            with stages("engine"):
                source = locate_bundle(s.bundle_path, job.bundle)
                if source is not None:
                    engine = engine_cache.get_engine(
                        s.bundle_path, s.engine_runtime, s.engine_device,
                        reload=True, source=source,
                    )
        bundle = engine.bundle
        self.metrics.set_engine(**engine.describe(), loaded=True)
        if BundleRef(bundle.name, bundle.version) != job.bundle:
            raise BundleMismatchError(
                f"job wants {job.bundle.name} {job.bundle.version}, this worker serves "
                f"{bundle.name} {bundle.version} ({s.bundle_path})"
            )
        with stages("load"):
            paths = self._instance_paths(job)
            volume = load_volume(paths)
            evidence = [dcmread(p, stop_before_pixels=True) for p in paths]
        with stages("preprocess"):
            model_input = engine.prepare(volume.hu, volume.spacing, volume.affine)
        with stages("infer"):
            prediction = engine.predict(model_input)
        with stages("findings"):
            findings = findings_from_prediction(
                prediction, model_input, bundle.labels, volume.sop_instance_uids
            )
        with stages("write"):
            uids = OutputUIDs.for_key(job.key)
            algorithm = AlgorithmInfo(
                name=bundle.name,
                version=bundle.version,
                parameters={"runtime": type(engine).runtime, "preset": bundle.preset.name},
            )
            # The job's creation time as content time: a second run writes the same bytes.
            when = job.created_at.astimezone(dt.UTC).replace(tzinfo=None)
            objects: list[tuple[str, Dataset]] = [
                (
                    "sr",
                    build_sr(
                        findings,
                        evidence,
                        algorithm,
                        series_uid=uids.sr_series,
                        sop_uid=uids.sr_sop,
                        series_number=SR_SERIES_NUMBER,
                        device_observer_uid=uid_from_key(f"device/{bundle.name}"),
                        content_datetime=when,
                    ),
                )
            ]
            kos = build_kos(
                findings,
                evidence,
                series_uid=uids.kos_series,
                sop_uid=uids.kos_sop,
                series_number=KOS_SERIES_NUMBER,
                algorithm=algorithm,
                content_datetime=when,
            )
            if kos is not None:
                objects.append(("kos", kos))
            written = [
                Written.of(kind, ds, write_result(s.results_dir, ds, fsync=s.fsync))
                for kind, ds in objects
            ]
        result: dict[str, Any] = {
            "bundle": {"name": bundle.name, "version": bundle.version},
            "runtime": type(engine).runtime,
            "slices": len(paths),
            "findings": findings_summary(findings),
            "objects": [
                {"kind": w.kind, "sop_uid": w.sop_uid, "series_uid": w.series_uid,
                 "path": str(w.path)}
                for w in written
            ],
        }
        with self.db.transaction() as session:
            if not mark_done(session, job, stages.timings, result):
                raise _LostJob
            add_outbound(session, job.id, written, job.destinations)
        return result

    def _instance_paths(self, job: ClaimedJob) -> list[Path]:
        with self.db.transaction() as session:
            rels = session.scalars(
                select(Instance.path)
                .where(Instance.series_id == job.series_id)
                .order_by(Instance.id)
            ).all()
        if not rels:
            raise LookupError(f"series {job.series_uid} has no stored instances")
        return [self.settings.spool_dir / rel for rel in rels]


def register_tasks(app: Celery, settings: Settings, db: Database | None = None) -> WorkerContext:
    """Bind the inference task to ``app`` with its own context; returns the context."""
    context = WorkerContext(settings, db)
    context.app = app

    @app.task(  # type: ignore[untyped-decorator]
        name=TASK_INFER,
        shared=False,  # shared tasks join every app made later, with this app's context
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
    )
    def infer(self: Task, job_id: int) -> dict[str, Any]:
        worker = current_worker_name() or str(self.request.hostname or "")
        outcome = context.run_job(int(job_id), worker=worker)
        return {"job_id": outcome.job_id, "state": outcome.state, "error": outcome.error}

    _contexts[app] = context
    return context


_contexts: weakref.WeakKeyDictionary[Celery, WorkerContext] = weakref.WeakKeyDictionary()


def context_of(app: Celery) -> WorkerContext:
    """The context ``register_tasks`` bound to ``app`` (to run a job without a broker)."""
    return _contexts[app]
