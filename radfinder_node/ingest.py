"""Recording received instances: the application side of the C-STORE SCP.

Each instance is one transaction (study and series upserted, instance inserted once); the SCP
answers success only after it commits. Upserts use ON CONFLICT so that parallel associations
sending the same study never fail each other.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from dicom_io.scp import ReceivedInstance, Rejected
from radfinder_node.database import Database
from radfinder_node.metrics import NodeMetrics
from radfinder_node.models import Instance, QuarantinedObject, Series, SeriesState, Study
from radfinder_node.timeutil import utcnow

log = logging.getLogger("radfinder_node.ingest")


def _insert_ignore(dialect: str, model: Any, key: str) -> Any:
    """INSERT that leaves an existing row (same ``key``) alone: receiving twice keeps one."""
    if dialect == "postgresql":
        return postgresql.insert(model).on_conflict_do_nothing(index_elements=[key])
    if dialect == "sqlite":
        return sqlite.insert(model).on_conflict_do_nothing(index_elements=[key])
    return insert(model)  # pragma: no cover - other databases: conflicts surface as errors


class IngestRecorder:
    """Implements dicom_io.scp.InstanceRecorder on the node's database.

    The hot path (every instance of a series after its first) is two statements and a commit:
    touch the series' last-received time while it is still receiving, insert the instance.
    Series ids are cached; the cache is only a shortcut, every write is still checked.
    """

    CACHE_SIZE = 4096

    def __init__(self, db: Database, metrics: NodeMetrics | None = None) -> None:
        self.db = db
        self.metrics = metrics if metrics is not None else NodeMetrics()
        dialect = db.engine.dialect.name
        self._insert_study = _insert_ignore(dialect, Study, "study_uid")
        self._insert_series = _insert_ignore(dialect, Series, "series_uid")
        self._insert_instance = _insert_ignore(dialect, Instance, "sop_uid")
        self._touch = (
            update(Series)
            .where(Series.id == bindparam("sid"), Series.state == SeriesState.RECEIVING)
            .values(last_received_at=bindparam("now"))
        )
        self._series_ids: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def instance_stored(self, instance: ReceivedInstance) -> None:
        now = utcnow()
        with self._lock:
            series_id = self._series_ids.get(instance.series_uid)
        with self.db.engine.begin() as conn:
            touched = series_id is not None and bool(
                conn.execute(self._touch, {"sid": series_id, "now": now}).rowcount
            )
            if not touched:
                series_id = self._upsert_series(conn, instance, now)
            conn.execute(
                self._insert_instance,
                {
                    "sop_uid": instance.sop_uid,
                    "series_id": series_id,
                    "sop_class_uid": instance.sop_class_uid,
                    "transfer_syntax_uid": instance.transfer_syntax_uid,
                    "instance_number": instance.instance_number,
                    "path": str(instance.stored.relative),
                    "size_bytes": instance.stored.size,
                    "calling_ae": instance.calling_ae,
                    "received_at": now,
                },
            )
        assert series_id is not None
        self.metrics.instance_stored(instance.stored.size)
        with self._lock:
            self._series_ids[instance.series_uid] = series_id
            self._series_ids.move_to_end(instance.series_uid)
            while len(self._series_ids) > self.CACHE_SIZE:
                self._series_ids.popitem(last=False)

    def _upsert_series(self, conn: Connection, instance: ReceivedInstance, now: datetime) -> int:
        """First instance of a series (or a late one after its decision): create or reopen."""
        header = instance.header
        conn.execute(
            self._insert_study,
            {
                "study_uid": instance.study_uid,
                "patient_id": _clip(header.get("PatientID"), 64),
                "accession_number": _clip(header.get("AccessionNumber"), 64),
                "study_date": _clip(header.get("StudyDate"), 8),
                "study_description": _clip(header.get("StudyDescription"), 128),
                "created_at": now,
            },
        )
        study_id = conn.scalar(select(Study.id).where(Study.study_uid == instance.study_uid))
        conn.execute(
            self._insert_series,
            {
                "series_uid": instance.series_uid,
                "study_id": study_id,
                "modality": _clip(header.get("Modality"), 16),
                "series_number": _int(header.get("SeriesNumber")),
                "series_description": _clip(header.get("SeriesDescription"), 128),
                "state": SeriesState.RECEIVING,
                "attributes": {**header, "SOPClassUID": instance.sop_class_uid},
                "first_received_at": now,
                "last_received_at": now,
            },
        )
        row = conn.execute(
            select(Series.id, Series.state).where(Series.series_uid == instance.series_uid)
        ).one()
        values: dict[str, Any] = {"last_received_at": now}
        if row.state != SeriesState.RECEIVING:
            # A late instance reopens the series: completion and selection run again.
            values |= {
                "state": SeriesState.RECEIVING,
                "state_reason": f"late instance after {row.state.value}",
                "completed_at": None,
                "decided_at": None,
            }
            log.info(
                "series reopened",
                extra={"fields": {"series_uid": instance.series_uid, "was": row.state.value}},
            )
        conn.execute(update(Series).where(Series.id == row.id).values(**values))
        return int(row.id)

    def instance_rejected(self, rejected: Rejected) -> None:
        self.metrics.instances_rejected.inc()
        with self.db.transaction() as session:
            session.add(
                QuarantinedObject(
                    kind="dicom",
                    reason=rejected.reason,
                    path=str(rejected.path) if rejected.path else "",
                    size_bytes=rejected.size,
                    sop_uid=_clip(rejected.sop_uid, 128),
                    calling_ae=rejected.calling_ae,
                    peer=rejected.peer,
                    status=rejected.status,
                    received_at=utcnow(),
                )
            )


def _clip(value: Any, n: int) -> str | None:
    return None if value is None else str(value)[:n]


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
