"""Reports to studies: store, link, supersede, and mine once the study is whole.

A report is linked by Study Instance UID when the message carries one (exact), else by the
accession number in the configured OBR field. Reports commonly arrive before their images (the
radiologist signs while the PACS forwards), so an unmatched report is kept ``waiting`` and the
:class:`ReportLinker` loop links it when a matching study row appears; the completion monitor
wakes that loop when a study settles, polling is the safety net, and because every state is in
the database a restarted node picks up exactly where it stopped.

Mining runs only when the linked study has no series still receiving, so a citation of image
240 is not declared unresolvable while image 240 is on the wire.

Supersession is by the same accession (or Study UID when there is no accession): a corrected
report (OBR-25 = C) supersedes every earlier one, a final one supersedes finals and
preliminaries, and a late non-correction for an order that already has a correction is stored
superseded by it. History stays in the table; consumers read rows whose ``superseded_by_id`` is
null.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, exists, func, select, union
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from radfinder_node.database import Database
from radfinder_node.metrics import NodeMetrics
from radfinder_node.models import Series, SeriesState, Study
from radfinder_node.report_models import PairState, Report, ReportState, SnippetSlicePair
from radfinder_node.resolve import Resolution, resolve_references
from radfinder_node.timeutil import utcnow
from reports.hl7_parse import Message, ReportContent
from reports.mining import find_references

log = logging.getLogger("radfinder_node.linking")

_RANK = {"C": 2, "F": 1}


class ControlIdReusedError(ValueError):
    """Same (sending facility, MSH-10) as a stored report but different content."""


@dataclass(frozen=True)
class StoreOutcome:
    report_id: int
    duplicate: bool
    state: ReportState
    study_id: int | None
    superseded: tuple[int, ...]
    superseded_by: int | None


def accession_of(content: ReportContent, field: str) -> str | None:
    value = content.filler_order_number if field == "OBR-3" else content.placer_field1
    return value[:64] or None


def unlinkable_reason(content: ReportContent, field: str) -> str | None:
    """Why a report can never be linked (None when it can): neither key is present."""
    if accession_of(content, field) or content.study_uids:
        return None
    return (
        f"report cannot be linked to a study: no accession number in {field} "
        "and no Study Instance UID"
    )


def body_digest(message: Message) -> str:
    """Hash of everything after MSH: equal for a resend even if MSH-7 was regenerated."""
    sep = message.header.field_separator
    body = "\r".join(sep.join(seg) for seg in message.segments[1:])
    head = f"{message.header.message_type}^{message.header.trigger_event}|{message.header.version}"
    return hashlib.sha256(f"{head}\r{body}".encode()).hexdigest()


def _clip(value: str | None, n: int) -> str | None:
    return value[:n] if value else None


def store_report(
    db: Database,
    message: Message,
    raw: bytes,
    *,
    accession_field: str,
    peer: str | None,
    now: datetime | None = None,
    durable: bool = True,
) -> StoreOutcome:
    """Insert the report, link it or leave it waiting, supersede: one transaction.

    Idempotent on (sending facility, control id): the same message again returns the stored
    row with ``duplicate`` set; a different message under the same key raises
    ControlIdReusedError. Concurrent inserts of one key are resolved by the unique constraint.

    ``durable``: on SQLite (WAL, synchronous=NORMAL, see radfinder_node.database) a commit
    survives the process being killed but not a power loss, and unlike an instance a report has
    no spool file to recover from; so the WAL is fsynced before this returns and the AA goes
    out. PostgreSQL commits are durable by themselves.
    """
    content = message.report
    if content is None:
        raise ValueError("not an ORU^R01 report")
    now = now or utcnow()
    digest = body_digest(message)
    for _attempt in range(2):
        try:
            outcome = _store(db, message, raw, content, digest, accession_field, peer, now)
        except IntegrityError:
            # Another connection inserted the same key between our check and our commit.
            continue
        if durable and not outcome.duplicate:
            sync_sqlite_wal(db)
        return outcome
    raise RuntimeError("report insert conflicted twice")  # pragma: no cover


def sync_sqlite_wal(db: Database) -> None:
    """fsync the SQLite write-ahead log: what synchronous=FULL does at commit, for one commit
    (fsync flushes the file, whichever descriptor it is called on)."""
    url = db.engine.url
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return
    for suffix in ("-wal", ""):
        path = Path(url.database + suffix)
        if path.exists():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return


def _store(
    db: Database,
    message: Message,
    raw: bytes,
    content: ReportContent,
    digest: str,
    accession_field: str,
    peer: str | None,
    now: datetime,
) -> StoreOutcome:
    header = message.header
    with db.transaction() as session:
        existing = _existing(session, header.sending_facility, header.control_id, digest)
        if existing is not None:
            return existing
        document = content.documents[0] if content.documents else None
        report = Report(
            sending_facility=header.sending_facility[:255],
            control_id=header.control_id[:255],
            sending_application=header.sending_application[:255],
            message_datetime=_clip(header.message_datetime, 32),
            version=header.version,
            body_sha256=digest,
            accession_number=accession_of(content, accession_field),
            filler_order_number=_clip(content.filler_order_number, 64),
            placer_field1=_clip(content.placer_field1, 64),
            study_uid=content.study_uids[0] if content.study_uids else None,
            study_uids=list(content.study_uids),
            patient_id=_clip(content.patient_id, 64),
            result_status=_clip(content.result_status, 2),
            observation_datetime=_clip(content.observation_datetime, 32),
            text=content.text,
            text_source=content.text_source,
            unminable_reason=content.unminable_reason,
            document_type=document.media_type[:128] if document else None,
            document=document.data if document else None,
            raw=raw,
            peer=_clip(peer, 64),
            state=ReportState.RECEIVED,
            received_at=now,
        )
        session.add(report)
        session.flush()
        superseded = _supersede(session, report)
        _link(session, report, now)
        return StoreOutcome(
            report_id=report.id,
            duplicate=False,
            state=report.state,
            study_id=report.study_id,
            superseded=tuple(superseded),
            superseded_by=report.superseded_by_id,
        )


def _existing(session: Session, facility: str, control_id: str, digest: str) -> StoreOutcome | None:
    row = session.scalars(
        select(Report).where(
            Report.sending_facility == facility[:255], Report.control_id == control_id[:255]
        )
    ).first()
    if row is None:
        return None
    if row.body_sha256 != digest:
        raise ControlIdReusedError(
            f"control id {control_id} from {facility or '(no facility)'} was already used "
            f"for a different message (report {row.id})"
        )
    return StoreOutcome(row.id, True, row.state, row.study_id, (), row.superseded_by_id)


def _same_order(report: Report) -> Any | None:
    if report.accession_number:
        return Report.accession_number == report.accession_number
    if report.study_uid:
        return Report.study_uid == report.study_uid
    return None


def _supersede(session: Session, report: Report) -> list[int]:
    key = _same_order(report)
    if key is None:
        return []
    current = session.scalars(
        select(Report)
        .where(key, Report.id != report.id, Report.superseded_by_id.is_(None))
        .order_by(Report.id)
    ).all()
    rank = _RANK.get(report.result_status or "", 0)
    superseded: list[int] = []
    for old in current:
        if _RANK.get(old.result_status or "", 0) <= rank:
            old.superseded_by_id = report.id
            superseded.append(old.id)
        else:
            report.superseded_by_id = old.id  # a correction already exists: it stays current
    if superseded:
        log.info(
            "reports superseded",
            extra={"fields": {"by": report.id, "superseded": superseded}},
        )
    return superseded


def find_study(session: Session, study_uids: Sequence[str], accession: str | None) -> int | None:
    """The study a report belongs to: by Study Instance UID first, then by accession number."""
    if study_uids:
        found = session.scalar(
            select(Study.id).where(Study.study_uid.in_(list(study_uids))).order_by(Study.id)
        )
        if found is not None:
            return int(found)
    if accession:
        found = session.scalar(
            select(Study.id).where(Study.accession_number == accession).order_by(Study.id)
        )
        if found is not None:
            return int(found)
    return None


def _link(session: Session, report: Report, now: datetime) -> None:
    study_id = find_study(session, report.study_uids, report.accession_number)
    if study_id is None:
        report.state = ReportState.WAITING
        keys = []
        if report.accession_number:
            keys.append(f"accession {report.accession_number}")
        if report.study_uids:
            keys.append(f"study UID {', '.join(report.study_uids)}")
        report.state_reason = f"no study received yet with {' or '.join(keys)}"
        return
    report.state = ReportState.LINKED
    report.study_id = study_id
    report.linked_at = now
    report.state_reason = None


def link_waiting(db: Database, now: datetime | None = None) -> list[int]:
    """Link every waiting report whose study has arrived; returns the linked report ids."""
    now = now or utcnow()
    by_uid = (
        select(Report.id.label("report_id"), Study.id.label("study_id"))
        .join(Study, Study.study_uid == Report.study_uid)
        .where(Report.state == ReportState.WAITING)
    )
    by_accession = (
        select(Report.id.label("report_id"), Study.id.label("study_id"))
        .join(Study, Study.accession_number == Report.accession_number)
        .where(Report.state == ReportState.WAITING, Report.accession_number.is_not(None))
    )
    with db.transaction() as session:
        pairs = session.execute(union(by_uid, by_accession)).all()
    linked: list[int] = []
    for report_id in sorted({int(p.report_id) for p in pairs}):
        with db.transaction() as session:
            report = session.get(Report, report_id)
            if report is None or report.state != ReportState.WAITING:
                continue
            _link(session, report, now)
            if report.study_id is not None:
                linked.append(report_id)
                log.info("report linked", extra={"fields": report.describe()})
    return linked


def _study_settled() -> Any:
    """SQL condition: the report's study has series and none of them is still receiving."""
    has_series = exists().where(Series.study_id == Report.study_id)
    receiving = exists().where(
        Series.study_id == Report.study_id, Series.state == SeriesState.RECEIVING
    )
    return has_series & ~receiving


def reports_ready_to_mine(db: Database, limit: int = 100) -> list[int]:
    with db.transaction() as session:
        ids = session.scalars(
            select(Report.id)
            .where(
                Report.state == ReportState.LINKED,
                Report.mined_at.is_(None),
                Report.superseded_by_id.is_(None),
                _study_settled(),
            )
            .order_by(Report.id)
            .limit(limit)
        ).all()
    return [int(i) for i in ids]


def mine_report(db: Database, report_id: int, spool_dir: Path) -> int:
    """Mine one linked report into snippet-slice pairs; returns how many.

    Resolution reads spool headers, so it runs in a read-only transaction and the write (pairs
    replaced, ``mined_at`` set) is a second, short one: ingest is never blocked behind file
    reads. Re-mining replaces the report's pairs (key: report, citation offset), so running
    twice leaves one set. A miner failure is recorded on the report, not retried forever.
    """
    failure: str | None = None
    resolutions: list[Resolution] = []
    with db.transaction() as session:
        report = session.get(Report, report_id)
        if report is None or report.study_id is None:
            return 0
        if report.text:
            try:
                refs = find_references(report.text)
                resolutions = resolve_references(session, report.study_id, refs, spool_dir)
            except Exception as exc:
                log.exception("snippet mining failed", extra={"fields": report.describe()})
                failure = f"mining failed: {type(exc).__name__}: {exc}"
    now = utcnow()
    by_start = {res.ref.start: res for res in reversed(resolutions)}  # first one wins
    with db.transaction() as session:
        report = session.get(Report, report_id)
        if report is None:
            return 0
        session.execute(delete(SnippetSlicePair).where(SnippetSlicePair.report_id == report_id))
        for start in sorted(by_start):
            res = by_start[start]
            ref = res.ref
            resolved = res.sop_instance_uid is not None
            session.add(
                SnippetSlicePair(
                    report_id=report_id,
                    start=ref.start,
                    end=ref.end,
                    series_number=ref.series,
                    image_number=ref.image,
                    snippet=ref.snippet,
                    state=PairState.RESOLVED if resolved else PairState.UNRESOLVED,
                    sop_uid=res.sop_instance_uid,
                    series_uid=res.series_uid,
                    z_mm=res.z_mm,
                    reason=None if resolved else (res.reason or "unresolved"),
                    created_at=now,
                )
            )
        if failure is not None:
            report.unminable_reason = failure
        report.mined_at = now
        fields = {**report.describe(), "pairs": len(by_start)}
    log.info("report mined", extra={"fields": fields})
    return len(by_start)


class ReportLinker:
    """The loop that links waiting reports and mines linked ones (a thread of the node)."""

    def __init__(self, db: Database, spool_dir: Path, metrics: NodeMetrics | None = None) -> None:
        self.db = db
        self.spool_dir = spool_dir
        self.metrics = metrics if metrics is not None else NodeMetrics()
        self._wake = threading.Event()

    def wake(self, *_args: object) -> None:
        """Run a pass now (a report was stored, a study settled); safe from any thread."""
        self._wake.set()

    def tick(self) -> tuple[list[int], int]:
        linked = link_waiting(self.db)
        mined = 0
        for report_id in reports_ready_to_mine(self.db):
            mine_report(self.db, report_id, self.spool_dir)
            mined += 1
            self.metrics.report_mined(self._pair_states(report_id))
        return linked, mined

    def _pair_states(self, report_id: int) -> list[str]:
        with self.db.transaction() as session:
            states = session.scalars(
                select(SnippetSlicePair.state).where(SnippetSlicePair.report_id == report_id)
            ).all()
        return [PairState(s).value for s in states]

    def pending(self) -> int:
        with self.db.transaction() as session:
            return int(
                session.scalar(
                    select(func.count())
                    .select_from(Report)
                    .where(Report.state == ReportState.LINKED, Report.mined_at.is_(None))
                )
                or 0
            )

    def run(self, stop: threading.Event, poll_s: float) -> None:
        """Loop until ``stop`` is set; errors are logged and the loop goes on."""
        while not stop.is_set():
            self._wake.wait(poll_s)
            self._wake.clear()
            if stop.is_set():
                break
            try:
                self.tick()
            except Exception:
                log.exception("report linking pass failed")
