"""Counts for `radfinder-node status`: what the node holds, from the database."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from radfinder_node.database import Database
from radfinder_node.job_models import Job, JobState, OutboundObject, OutboundState
from radfinder_node.models import Instance, QuarantinedObject, Series, SeriesState, Study
from radfinder_node.report_models import PairState, Report, ReportState, SnippetSlicePair

LAST_ERRORS = 5


def node_status(db: Database) -> dict[str, Any]:
    with db.transaction() as session:
        by_state = dict(
            session.execute(select(Series.state, func.count()).group_by(Series.state)).all()
        )
        return {
            "studies": session.scalar(select(func.count()).select_from(Study)) or 0,
            "series": {state.value: int(by_state.get(state, 0)) for state in SeriesState},
            "instances": session.scalar(select(func.count()).select_from(Instance)) or 0,
            "quarantined": session.scalar(select(func.count()).select_from(QuarantinedObject)) or 0,
            **inference_status(db),
            **report_status(db),
        }


def inference_status(db: Database) -> dict[str, Any]:
    """Jobs and outbound objects by state, and the newest errors of each (what an operator
    needs to see that a PACS is down or a series keeps failing)."""
    with db.transaction() as session:
        jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        outbox = dict(
            session.execute(
                select(OutboundObject.state, func.count()).group_by(OutboundObject.state)
            ).all()
        )
        job_errors = session.execute(
            select(Job.id, Job.series_uid, Job.state, Job.attempts, Job.error)
            .where(Job.error.is_not(None))
            .order_by(Job.queued_at.desc(), Job.id.desc())
            .limit(LAST_ERRORS)
        ).all()
        send_errors = session.execute(
            select(
                OutboundObject.sop_uid,
                OutboundObject.destination,
                OutboundObject.state,
                OutboundObject.attempts,
                OutboundObject.last_status,
                OutboundObject.last_error,
            )
            .where(OutboundObject.last_error.is_not(None))
            .order_by(OutboundObject.next_attempt_at.desc(), OutboundObject.id.desc())
            .limit(LAST_ERRORS)
        ).all()
    return {
        "jobs": {state.value: int(jobs.get(state, 0)) for state in JobState},
        "outbox": {state.value: int(outbox.get(state, 0)) for state in OutboundState},
        "last_errors": {
            "jobs": [
                {
                    "job_id": r.id,
                    "series_uid": r.series_uid,
                    "state": JobState(r.state).value,
                    "attempts": r.attempts,
                    "error": r.error,
                }
                for r in job_errors
            ],
            "outbox": [
                {
                    "sop_uid": r.sop_uid,
                    "destination": r.destination,
                    "state": OutboundState(r.state).value,
                    "attempts": r.attempts,
                    "status": None if r.last_status is None else f"0x{r.last_status:04X}",
                    "error": r.last_error,
                }
                for r in send_errors
            ],
        },
    }


def report_status(db: Database) -> dict[str, Any]:
    """Reports by state (superseded ones counted apart: they are history, not work) and the
    snippet-slice pairs mined from them."""
    with db.transaction() as session:
        current = dict(
            session.execute(
                select(Report.state, func.count())
                .where(Report.superseded_by_id.is_(None))
                .group_by(Report.state)
            ).all()
        )
        superseded = session.scalar(
            select(func.count()).select_from(Report).where(Report.superseded_by_id.is_not(None))
        )
        unmined = session.scalar(
            select(func.count())
            .select_from(Report)
            .where(
                Report.state == ReportState.LINKED,
                Report.mined_at.is_(None),
                Report.superseded_by_id.is_(None),
            )
        )
        pairs = dict(
            session.execute(
                select(SnippetSlicePair.state, func.count()).group_by(SnippetSlicePair.state)
            ).all()
        )
    return {
        "reports": {
            **{state.value: int(current.get(state, 0)) for state in ReportState},
            "superseded": int(superseded or 0),
            "linked_not_mined": int(unmined or 0),
        },
        "snippet_pairs": {state.value: int(pairs.get(state, 0)) for state in PairState},
    }
