"""The durable outbox: results written to disk, one row per (object, destination), sent by
C-STORE with retries, never again once the peer confirmed.

Order of durability: the object's file is fsynced under ``<data_dir>/results`` before the row
that names it commits, so a row never points at a missing file; the row turns ``sent`` in the
transaction right after the peer's success status, and only ``pending`` rows are ever sent. A
crash between the peer's confirmation and that commit sends the object once more on restart,
which the peer stores under the same SOP Instance UID (the UIDs are derived from the job's key),
so the PACS still holds one copy.

Retries back off exponentially (``base * 2**(attempt-1)``, capped), so a PACS that is down for
maintenance is not hammered, and a row gives up (``failed``, visible in status) after
``max_attempts``. A sender leases a row while it sends it, so several node processes sharing one
database never send the same row at the same time: the lease covers connecting plus the longest
wait for a response, and no C-STORE starts that could outlast it (such rows are handed back
untried, not counted as an attempt).

Delivery contract: at least once. A send is *ambiguous* when the request went out and no
response came: the DIMSE wait (``send_dimse_timeout_s``, generous because a PACS may be writing
to a slow disk) ran out, or the association ended first. The peer may hold the object, but the
node cannot know, so the row is retried and its error and the log say "the peer may have stored
it", which tells an operator this from a refused or unreachable send. A resend of a row (after
an ambiguous try or a crash before the commit) reads the same file again: same SOP Instance UID,
identical bytes. A PACS that de-duplicates by SOP Instance UID keeps one copy, one that files
every reception keeps two identical ones. (A job run again on purpose rewrites its objects
under the same UIDs; that is a new version, not a resend.)
Connecting and negotiating have their own short timeout (``send_timeout_s``), so a dead peer is
found quickly and is never ambiguous.
"""

from __future__ import annotations

import io
import logging
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath

from pydicom import Dataset, dcmread
from pydicom.filewriter import dcmwrite
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from dicom_io.scu import Destination, SendResult, send_datasets
from dicom_io.spool import atomic_write
from dicom_io.uids import is_valid_uid
from radfinder_node.database import Database
from radfinder_node.job_models import Job, JobState, OutboundObject, OutboundState
from radfinder_node.metrics import NodeMetrics
from radfinder_node.timeutil import as_utc, utcnow

log = logging.getLogger("radfinder_node.outbox")

_BATCH = 100  # rows claimed per tick; one association per destination carries them


# ----------------------------------------------------------------------------- writing


def result_path(ds: Dataset) -> PurePosixPath:
    """``<study>/<series>/<sop>.dcm``, from validated UIDs only (they become path parts)."""
    parts = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    for uid in parts:
        if not is_valid_uid(uid):
            raise ValueError(f"not a valid UID, refusing it as a path part: {uid!r}")
    return PurePosixPath(parts[0], parts[1], f"{parts[2]}.dcm")


def write_result(results_dir: Path, ds: Dataset, *, fsync: bool = True) -> PurePosixPath:
    """Write ``ds`` as a Part 10 file atomically (and durably with ``fsync``); returns its
    path relative to ``results_dir``. Rewriting the same object replaces it in one rename."""
    rel = result_path(ds)
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    atomic_write(results_dir / rel, buffer.getbuffer(), fsync=fsync)
    return rel


@dataclass(frozen=True)
class Written:
    """One written object, ready to become outbox rows."""

    kind: str
    sop_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    path: PurePosixPath

    @classmethod
    def of(cls, kind: str, ds: Dataset, path: PurePosixPath) -> Written:
        return cls(
            kind=kind,
            sop_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            study_uid=str(ds.StudyInstanceUID),
            series_uid=str(ds.SeriesInstanceUID),
            path=path,
        )


def add_outbound(
    session: Session,
    job_id: int | None,
    objects: Sequence[Written],
    destinations: Sequence[str],
    *,
    now: datetime | None = None,
) -> int:
    """One pending row per (object, destination) in the caller's transaction; returns how
    many were added. A row already sent stays sent (the peer has it); a failed one is given a
    fresh set of attempts, since the job was run again on purpose."""
    now = now or utcnow()
    added = 0
    for obj in objects:
        for dest in destinations:
            row = session.scalar(
                select(OutboundObject).where(
                    OutboundObject.sop_uid == obj.sop_uid, OutboundObject.destination == dest
                )
            )
            if row is None:
                session.add(
                    OutboundObject(
                        sop_uid=obj.sop_uid,
                        destination=dest,
                        job_id=job_id,
                        kind=obj.kind,
                        sop_class_uid=obj.sop_class_uid,
                        study_uid=obj.study_uid,
                        series_uid=obj.series_uid,
                        path=str(obj.path),
                        state=OutboundState.PENDING,
                        attempts=0,
                        next_attempt_at=now,
                        created_at=now,
                    )
                )
                added += 1
            elif row.state == OutboundState.FAILED:
                row.state = OutboundState.PENDING
                row.attempts = 0
                row.next_attempt_at = now
                row.path = str(obj.path)
    return added


# ----------------------------------------------------------------------------- sending


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    base_s: float = 5.0
    max_s: float = 600.0

    def delay_s(self, attempts: int) -> float:
        """Wait after the ``attempts``-th failed try: base, 2·base, 4·base, ... up to max."""
        return float(min(self.max_s, self.base_s * 2 ** max(attempts - 1, 0)))


@dataclass
class SendReport:
    sent: int = 0
    retrying: int = 0
    failed: int = 0
    deferred: int = 0  # not started before the lease's deadline; due again at once
    ambiguous: int = 0  # of retrying + failed: no response, the peer may have it


@dataclass(frozen=True)
class _Claimed:
    id: int
    sop_uid: str
    destination: str
    path: str
    attempts: int
    job_id: int | None


class OutboxSender:
    """Sends due pending rows; ``tick`` is one pass, ``run`` loops until stopped."""

    def __init__(
        self,
        db: Database,
        results_dir: Path,
        *,
        calling_ae: str,
        timeout_s: float,
        policy: RetryPolicy,
        dimse_timeout_s: float = 120.0,
        metrics: NodeMetrics | None = None,
        tls: ssl.SSLContext | None = None,
        lease_s: float | None = None,
    ) -> None:
        self.db = db
        self.tls = tls  # for destinations marked +tls
        self.metrics = metrics if metrics is not None else NodeMetrics()
        self.results_dir = results_dir
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s
        self.dimse_timeout_s = dimse_timeout_s
        self.policy = policy
        # The longest one object can take once its C-STORE starts: the request's writes (each
        # bounded by the network timeout) and then the wait for the response.
        self.per_object_s = dimse_timeout_s + timeout_s
        # Connect and negotiate (2 x timeout_s), then room for two objects at their worst; a
        # crashed sender's rows are free again after this long. No C-STORE starts later than
        # ``lease - per_object_s`` after the claim (see _send), so the lease always holds.
        default_lease = max(60.0, 4 * timeout_s, 2 * timeout_s + 2 * self.per_object_s)
        lease = default_lease if lease_s is None else lease_s
        if lease <= 2 * timeout_s + self.per_object_s:  # else a batch might never start
            raise ValueError(
                f"lease_s ({lease:g}) must exceed connecting plus one object's longest send "
                f"({2 * timeout_s + self.per_object_s:g} s)"
            )
        self.lease = timedelta(seconds=lease)
        self._wake = threading.Event()

    def wake(self) -> None:
        """New rows were committed: look now rather than at the next poll."""
        self._wake.set()

    def _claim(self, now: datetime) -> list[_Claimed]:
        due = and_(
            OutboundObject.state == OutboundState.PENDING,
            OutboundObject.next_attempt_at <= now,
            or_(OutboundObject.lease_until.is_(None), OutboundObject.lease_until < now),
        )
        with self.db.transaction() as session:
            ids = session.scalars(
                select(OutboundObject.id)
                .where(due)
                .order_by(OutboundObject.next_attempt_at, OutboundObject.id)
                .limit(_BATCH)
            ).all()
        claimed: list[_Claimed] = []
        for row_id in ids:
            with self.db.transaction() as session:
                res = session.execute(
                    update(OutboundObject)
                    .where(OutboundObject.id == row_id, due)
                    .values(lease_until=now + self.lease)
                )
                if not res.rowcount:  # type: ignore[attr-defined]
                    continue  # another sender took it
                row = session.get_one(OutboundObject, row_id)
                claimed.append(
                    _Claimed(
                        row.id, row.sop_uid, row.destination, row.path, row.attempts, row.job_id
                    )
                )
        return claimed

    def tick(self, now: datetime | None = None) -> SendReport:
        now = now or utcnow()
        # The lease runs from ``now``; measured on the monotonic clock from before the claim,
        # the last moment a C-STORE may start and still end inside it.
        deadline = time.monotonic() + self.lease.total_seconds() - self.per_object_s
        report = SendReport()
        by_destination: dict[str, list[_Claimed]] = defaultdict(list)
        for row in self._claim(now):
            by_destination[row.destination].append(row)
        for dest, rows in by_destination.items():
            self._send(dest, rows, report, deadline)
        return report

    def _send(self, dest: str, rows: list[_Claimed], report: SendReport, deadline: float) -> None:
        t0 = time.perf_counter()
        try:
            destination = Destination.parse(dest)
        except ValueError as exc:
            results = [SendResult(r.sop_uid, None, f"bad destination: {exc}") for r in rows]
        else:
            paths = [self.results_dir / r.path for r in rows]
            results = send_datasets(
                paths,
                destination,
                calling_ae=self.calling_ae,
                timeout_s=self.timeout_s,
                dimse_timeout_s=self.dimse_timeout_s,
                tls=self.tls,
                deadline=deadline,
            )
        elapsed = time.perf_counter() - t0
        if len(results) != len(rows):  # the sender's contract is one result per item
            results = [SendResult(r.sop_uid, None, "no result from the sender") for r in rows]
        for row, result in zip(rows, results, strict=True):
            self._record(row, result, elapsed, report)
        self._note_job_send_times({r.job_id for r in rows if r.job_id is not None})

    def _record(
        self, row: _Claimed, result: SendResult, elapsed: float, report: SendReport
    ) -> None:
        now = utcnow()
        if not result.attempted:  # nothing went out: hand the row back, due at once
            with self.db.transaction() as session:
                session.execute(
                    update(OutboundObject)
                    .where(
                        OutboundObject.id == row.id,
                        OutboundObject.state == OutboundState.PENDING,
                    )
                    .values(lease_until=None)
                )
            report.deferred += 1
            return
        attempts = row.attempts + 1
        values: dict[str, object] = {
            "attempts": attempts,
            "last_status": result.status,
            "last_error": result.error,
            "lease_until": None,
        }
        if result.ok:
            values.update(state=OutboundState.SENT, sent_at=now, send_s=round(elapsed, 4))
            report.sent += 1
            event, level = "object sent", logging.INFO
        elif attempts >= self.policy.max_attempts:
            values.update(state=OutboundState.FAILED)
            report.failed += 1
            event, level = "object failed", logging.ERROR
        else:
            delay = self.policy.delay_s(attempts)
            values.update(next_attempt_at=now + timedelta(seconds=delay))
            report.retrying += 1
            event, level = "send will be retried", logging.WARNING
        if result.ambiguous:
            report.ambiguous += 1
        with self.db.transaction() as session:
            session.execute(
                update(OutboundObject)
                .where(OutboundObject.id == row.id, OutboundObject.state == OutboundState.PENDING)
                .values(**values)
            )
        self.metrics.send_result(
            row.destination, result.ok, final=values.get("state") == OutboundState.FAILED
        )
        log.log(
            level,
            event,
            extra={
                "fields": {
                    "sop_uid": row.sop_uid,
                    "destination": row.destination,
                    "attempts": attempts,
                    "status": None if result.status is None else f"0x{result.status:04X}",
                    "error": result.error,
                    # the peer may hold it: a later success can leave it two identical copies
                    "ambiguous": result.ambiguous,
                }
            },
        )

    def _note_job_send_times(self, job_ids: set[int]) -> None:
        """A job's ``send`` timing: from its results being committed to its last object sent."""
        for job_id in job_ids:
            with self.db.transaction() as session:
                pending = session.scalar(
                    select(func.count())
                    .select_from(OutboundObject)
                    .where(
                        OutboundObject.job_id == job_id,
                        OutboundObject.state != OutboundState.SENT,
                    )
                )
                job = session.get(Job, job_id)
                if pending or job is None or job.state != JobState.DONE or not job.finished_at:
                    continue
                last = session.scalar(
                    select(func.max(OutboundObject.sent_at)).where(OutboundObject.job_id == job_id)
                )
                if last is None:
                    continue
                send_s = (as_utc(last) - as_utc(job.finished_at)).total_seconds()
                job.timings = {**job.timings, "send": round(send_s, 4)}
            self.metrics.observe_stage("send", send_s)

    def run(self, stop: threading.Event, poll_s: float) -> None:
        """Loop until ``stop`` is set; errors are logged and the loop goes on."""
        while not stop.is_set():
            try:
                report = self.tick()
            except Exception:
                log.exception("outbox pass failed")
                report = SendReport()
            if not (report.sent or report.retrying or report.failed or report.deferred):
                self._wake.wait(poll_s)
                self._wake.clear()


def load_result(results_dir: Path, rel: str) -> Dataset:
    """Read a written result back (status, tests, the demo)."""
    return dcmread(results_dir / rel)
