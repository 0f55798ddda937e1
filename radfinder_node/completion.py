"""Series completion and selection, driven by database state.

DICOM has no "end of series" message, so a series is complete when the quiet period has passed
since its last instance and no open association has sent to it. Because the state and the
timestamp live in the database, a restarted node finds its half-received series and completes
them on schedule. Selection runs per study once none of its series is still receiving, so the
"one series per study" preference sees every candidate.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update

from dicom_io.selection import SeriesSummary, rules_from_config, select_series
from radfinder_node.database import Database
from radfinder_node.models import Instance, Series, SeriesState, Study
from radfinder_node.timeutil import utcnow

log = logging.getLogger("radfinder_node.completion")

SeriesCallback = Callable[[str], None]


class CompletionMonitor:
    def __init__(
        self,
        db: Database,
        *,
        quiet_period_s: float,
        selection: Mapping[str, Any],
        in_flight: Callable[[], set[str]] = set,
        on_selected: SeriesCallback | None = None,
        on_study_decided: Callable[[int], None] | None = None,
    ) -> None:
        self.db = db
        self.quiet = timedelta(seconds=quiet_period_s)
        self.rules, self.preference = rules_from_config(selection)
        self.one_per_study = bool(selection.get("one_per_study", True))
        self.in_flight = in_flight
        self.on_selected = on_selected
        # Called with the study id after its series were decided (reports wait for this).
        self.on_study_decided = on_study_decided

    def tick(self, now: datetime | None = None) -> list[str]:
        """One pass: complete quiet series, then decide studies; returns newly selected UIDs."""
        self.complete_quiet_series(now or utcnow())
        return self.decide_ready_studies()

    def complete_quiet_series(self, now: datetime) -> list[str]:
        cutoff = now - self.quiet
        busy = self.in_flight()
        with self.db.transaction() as session:
            rows = session.execute(
                select(Series.id, Series.series_uid).where(
                    Series.state == SeriesState.RECEIVING, Series.last_received_at <= cutoff
                )
            ).all()
        done: list[str] = []
        for series_id, series_uid in rows:
            if series_uid in busy:
                continue
            with self.db.transaction() as session:
                # Guarded update: a late instance committed meanwhile keeps it receiving.
                result = session.execute(
                    update(Series)
                    .where(
                        Series.id == series_id,
                        Series.state == SeriesState.RECEIVING,
                        Series.last_received_at <= cutoff,
                    )
                    .values(state=SeriesState.COMPLETE, completed_at=now, state_reason=None)
                )
                if result.rowcount:  # type: ignore[attr-defined]
                    n = session.scalar(
                        select(func.count())
                        .select_from(Instance)
                        .where(Instance.series_id == series_id)
                    )
                    done.append(series_uid)
                    log.info(
                        "series complete",
                        extra={"fields": {"series_uid": series_uid, "instances": n}},
                    )
        return done

    def decide_ready_studies(self) -> list[str]:
        with self.db.transaction() as session:
            receiving = select(Series.study_id).where(Series.state == SeriesState.RECEIVING)
            study_ids = session.scalars(
                select(Series.study_id)
                .where(Series.state == SeriesState.COMPLETE, Series.study_id.not_in(receiving))
                .distinct()
            ).all()
        selected: list[str] = []
        for study_id in study_ids:
            selected += self._decide_study(study_id)
            if self.on_study_decided is not None:
                self.on_study_decided(study_id)
        for series_uid in selected:
            if self.on_selected is not None:
                self.on_selected(series_uid)
        return selected

    def _decide_study(self, study_id: int) -> list[str]:
        with self.db.transaction() as session:
            study_uid = session.scalar(select(Study.study_uid).where(Study.id == study_id))
            counts = dict(
                session.execute(
                    select(Instance.series_id, func.count())
                    .join(Series, Series.id == Instance.series_id)
                    .where(Series.study_id == study_id)
                    .group_by(Instance.series_id)
                ).all()
            )
            series = session.scalars(select(Series).where(Series.study_id == study_id)).all()
            pending = {s.series_uid: s for s in series if s.state == SeriesState.COMPLETE}
            if not pending or any(s.state == SeriesState.RECEIVING for s in series):
                return []
            # Already-decided series take part so a late series competes with the chosen one,
            # but only undecided series change state.
            summaries = [
                SeriesSummary(
                    study_uid=str(study_uid),
                    series_uid=s.series_uid,
                    n_instances=int(counts.get(s.id, 0)),
                    attributes=s.attributes,
                )
                for s in series
                if s.state != SeriesState.IGNORED or s.series_uid in pending
            ]
            decisions = select_series(
                summaries, self.rules, self.preference, one_per_study=self.one_per_study
            )
            now = utcnow()
            chosen: list[str] = []
            for decision in decisions:
                row = pending.get(decision.series_uid)
                if row is None:
                    continue
                row.state = SeriesState.SELECTED if decision.selected else SeriesState.IGNORED
                row.state_reason = decision.reason
                row.decided_at = now
                if decision.selected:
                    chosen.append(row.series_uid)
                log.info(
                    "series selected" if decision.selected else "series ignored",
                    extra={
                        "fields": {
                            "series_uid": row.series_uid,
                            "study_uid": study_uid,
                            "reason": decision.reason,
                        }
                    },
                )
            return chosen

    def run(self, stop: threading.Event, poll_s: float) -> None:
        """Loop until ``stop`` is set; errors are logged and the loop goes on."""
        while not stop.wait(poll_s):
            try:
                self.tick()
            except Exception:
                log.exception("completion pass failed")
