"""Counts for `radfinder-node status`: what the node holds, from the database."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from radfinder_node.database import Database
from radfinder_node.models import Instance, QuarantinedObject, Series, SeriesState, Study


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
        }
