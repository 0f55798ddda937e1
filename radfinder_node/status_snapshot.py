"""What the status page shows, read from the database in one short read-only transaction.

The page renderer (``status_page``) is pure and takes this snapshot; keeping the queries here
means the HTML can be tested without a database and the queries without parsing HTML. Every
list is bounded (the newest ``limit`` rows), so the page costs the same on day one and after a
year of studies. Patient names are never stored; patient IDs are not read.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from radfinder_node.database import Database
from radfinder_node.job_models import Job, JobState, OutboundObject, OutboundState
from radfinder_node.models import Instance, QuarantinedObject, Series, Study
from radfinder_node.report_models import PairState, Report, SnippetSlicePair
from radfinder_node.status import node_status
from radfinder_node.timeutil import as_utc, utcnow


@dataclass(frozen=True)
class SeriesRow:
    series_uid: str
    number: int | None
    description: str | None
    modality: str | None
    state: str
    reason: str | None
    instances: int


@dataclass(frozen=True)
class StudyRow:
    study_uid: str
    accession: str | None
    study_date: str | None
    description: str | None
    received_at: datetime
    series: tuple[SeriesRow, ...]
    job_states: tuple[str, ...]


@dataclass(frozen=True)
class FindingRow:
    label: str
    probability: float
    threshold: float
    key_sop_uid: str | None
    key_z_mm: float | None


@dataclass(frozen=True)
class JobRow:
    id: int
    series_uid: str
    study_uid: str | None
    bundle: str
    state: str
    attempts: int
    worker: str | None
    timings: dict[str, float]
    error: str | None
    queued_at: datetime
    finished_at: datetime | None
    findings: tuple[FindingRow, ...]  # present findings only, most probable first
    labels_total: int


@dataclass(frozen=True)
class OutboundRow:
    sop_uid: str
    kind: str
    destination: str
    state: str
    attempts: int
    status: int | None
    error: str | None
    created_at: datetime
    sent_at: datetime | None


@dataclass(frozen=True)
class ReportRow:
    id: int
    received_at: datetime
    sending_facility: str
    control_id: str
    accession: str | None
    result_status: str | None
    state: str
    reason: str | None
    superseded: bool
    pairs_resolved: int
    pairs_total: int
    mined: bool


@dataclass(frozen=True)
class QuarantineRow:
    kind: str
    reason: str
    received_at: datetime
    sop_uid: str | None
    calling_ae: str | None
    peer: str | None
    status: int | None
    size_bytes: int


@dataclass(frozen=True)
class Snapshot:
    taken_at: datetime
    counts: dict[str, Any]
    studies: tuple[StudyRow, ...] = ()
    jobs: tuple[JobRow, ...] = ()
    outbox: tuple[OutboundRow, ...] = ()
    reports: tuple[ReportRow, ...] = ()
    quarantine: tuple[QuarantineRow, ...] = ()
    failed_jobs: tuple[JobRow, ...] = ()
    failed_sends: tuple[OutboundRow, ...] = ()
    engine: dict[str, str] = field(default_factory=dict)
    hl7_acks: dict[str, int] = field(default_factory=dict)


def take_snapshot(db: Database, *, limit: int = 20) -> Snapshot:
    """The newest ``limit`` rows of each kind, and the node's counts."""
    counts = node_status(db)
    with db.transaction() as session:
        return Snapshot(
            taken_at=utcnow(),
            counts=counts,
            studies=_studies(session, limit),
            jobs=_jobs(session, limit, failed_only=False),
            outbox=_outbox(session, limit, problems_only=False),
            reports=_reports(session, limit),
            quarantine=_quarantine(session, limit),
            failed_jobs=_jobs(session, limit, failed_only=True),
            failed_sends=_outbox(session, limit, problems_only=True),
        )


def _studies(session: Session, limit: int) -> tuple[StudyRow, ...]:
    studies = (
        session.execute(
            select(Study).order_by(Study.created_at.desc(), Study.id.desc()).limit(limit)
        )
        .scalars()
        .all()
    )
    if not studies:
        return ()
    ids = [s.id for s in studies]
    series_by_study: dict[int, list[SeriesRow]] = defaultdict(list)
    rows = session.execute(
        select(Series, func.count(Instance.id))
        .outerjoin(Instance, Instance.series_id == Series.id)
        .where(Series.study_id.in_(ids))
        .group_by(Series.id)
        .order_by(Series.series_number, Series.id)
    ).all()
    for series, n in rows:
        series_by_study[series.study_id].append(
            SeriesRow(
                series_uid=series.series_uid,
                number=series.series_number,
                description=series.series_description,
                modality=series.modality,
                state=series.state.value,
                reason=series.state_reason,
                instances=int(n),
            )
        )
    jobs_by_study: dict[int, list[str]] = defaultdict(list)
    for study_id, state in session.execute(
        select(Series.study_id, Job.state)
        .join(Job, Job.series_id == Series.id)
        .where(Series.study_id.in_(ids))
        .order_by(Job.id)
    ).all():
        jobs_by_study[study_id].append(JobState(state).value)
    return tuple(
        StudyRow(
            study_uid=s.study_uid,
            accession=s.accession_number,
            study_date=s.study_date,
            description=s.study_description,
            received_at=as_utc(s.created_at),
            series=tuple(series_by_study[s.id]),
            job_states=tuple(jobs_by_study[s.id]),
        )
        for s in studies
    )


def _findings(result: dict[str, Any] | None) -> tuple[tuple[FindingRow, ...], int]:
    rows = (result or {}).get("findings") or []
    present = [
        FindingRow(
            label=str(r["label"]),
            probability=float(r["probability"]),
            threshold=float(r["threshold"]),
            key_sop_uid=r.get("key_sop_instance_uid"),
            key_z_mm=None if r.get("key_z_mm") is None else float(r["key_z_mm"]),
        )
        for r in rows
        if r.get("present")
    ]
    present.sort(key=lambda f: -f.probability)
    return tuple(present), len(rows)


def _jobs(session: Session, limit: int, *, failed_only: bool) -> tuple[JobRow, ...]:
    query = (
        select(Job, Study.study_uid)
        .join(Series, Series.id == Job.series_id)
        .join(Study, Study.id == Series.study_id)
        .order_by(Job.queued_at.desc(), Job.id.desc())
        .limit(limit)
    )
    if failed_only:
        query = query.where(Job.state == JobState.FAILED)
    out: list[JobRow] = []
    for job, study_uid in session.execute(query).all():
        findings, total = _findings(job.result)
        out.append(
            JobRow(
                id=job.id,
                series_uid=job.series_uid,
                study_uid=study_uid,
                bundle=f"{job.bundle_name} {job.bundle_version}",
                state=JobState(job.state).value,
                attempts=job.attempts,
                worker=job.worker,
                timings=dict(job.timings or {}),
                error=job.error,
                queued_at=as_utc(job.queued_at),
                finished_at=None if job.finished_at is None else as_utc(job.finished_at),
                findings=findings,
                labels_total=total,
            )
        )
    return tuple(out)


def _outbox(session: Session, limit: int, *, problems_only: bool) -> tuple[OutboundRow, ...]:
    query = select(OutboundObject).order_by(
        OutboundObject.created_at.desc(), OutboundObject.id.desc()
    )
    if problems_only:
        query = query.where(
            or_(
                OutboundObject.state == OutboundState.FAILED,
                OutboundObject.last_error.is_not(None)
                & (OutboundObject.state == OutboundState.PENDING),
            )
        )
    return tuple(
        OutboundRow(
            sop_uid=o.sop_uid,
            kind=o.kind,
            destination=o.destination,
            state=OutboundState(o.state).value,
            attempts=o.attempts,
            status=o.last_status,
            error=o.last_error,
            created_at=as_utc(o.created_at),
            sent_at=None if o.sent_at is None else as_utc(o.sent_at),
        )
        for o in session.scalars(query.limit(limit)).all()
    )


def _reports(session: Session, limit: int) -> tuple[ReportRow, ...]:
    # Only the columns shown: the raw message and embedded documents stay in the database.
    reports = session.execute(
        select(
            Report.id,
            Report.received_at,
            Report.sending_facility,
            Report.control_id,
            Report.accession_number,
            Report.result_status,
            Report.state,
            Report.state_reason,
            Report.superseded_by_id,
            Report.mined_at,
        )
        .order_by(Report.received_at.desc(), Report.id.desc())
        .limit(limit)
    ).all()
    ids = [r.id for r in reports]
    pairs: dict[int, dict[str, int]] = defaultdict(dict)
    if ids:
        for report_id, state, n in session.execute(
            select(SnippetSlicePair.report_id, SnippetSlicePair.state, func.count())
            .where(SnippetSlicePair.report_id.in_(ids))
            .group_by(SnippetSlicePair.report_id, SnippetSlicePair.state)
        ).all():
            pairs[report_id][PairState(state).value] = int(n)
    return tuple(
        ReportRow(
            id=r.id,
            received_at=as_utc(r.received_at),
            sending_facility=r.sending_facility,
            control_id=r.control_id,
            accession=r.accession_number,
            result_status=r.result_status,
            state=r.state.value,
            reason=r.state_reason,
            superseded=r.superseded_by_id is not None,
            pairs_resolved=pairs[r.id].get(PairState.RESOLVED.value, 0),
            pairs_total=sum(pairs[r.id].values()),
            mined=r.mined_at is not None,
        )
        for r in reports
    )


def _quarantine(session: Session, limit: int) -> tuple[QuarantineRow, ...]:
    return tuple(
        QuarantineRow(
            kind=q.kind,
            reason=q.reason,
            received_at=as_utc(q.received_at),
            sop_uid=q.sop_uid,
            calling_ae=q.calling_ae,
            peer=q.peer,
            status=q.status,
            size_bytes=q.size_bytes,
        )
        for q in session.scalars(
            select(QuarantinedObject)
            .order_by(QuarantinedObject.received_at.desc(), QuarantinedObject.id.desc())
            .limit(limit)
        ).all()
    )
