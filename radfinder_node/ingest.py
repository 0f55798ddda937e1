"""Recording received instances: the application side of the C-STORE SCP.

Each instance is one transaction (study and series upserted, instance inserted once); the SCP
answers success only after it commits. Upserts use ON CONFLICT so that parallel associations
sending the same study never fail each other.

A series' ``last_received_at`` starts its quiet period (radfinder_node.completion), which only
runs once no open association has sent to it. So while the association that sent a series
stays open, keeping that timestamp exact on every instance buys nothing: the recorder touches
it at most every TOUCH_REFRESH_S there (one UPDATE less in most instances' transactions), and
when the association ends, before its series leave the in-flight set, it writes the time of
their last instance (``association_closed``). A crash in between leaves it at most
TOUCH_REFRESH_S behind.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, event, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from dicom_io.scp import ReceivedInstance, Rejected
from radfinder_node.database import Database
from radfinder_node.metrics import NodeMetrics
from radfinder_node.models import Instance, QuarantinedObject, Series, SeriesState, Study
from radfinder_node.timeutil import utcnow

log = logging.getLogger("radfinder_node.ingest")

# The longest a receiving series' last_received_at lags behind, while its association is open.
TOUCH_REFRESH_S = 1.0


def _insert_ignore(dialect: str, model: Any, key: str) -> Any:
    """INSERT that leaves an existing row (same ``key``) alone: receiving twice keeps one."""
    if dialect == "postgresql":
        return postgresql.insert(model).on_conflict_do_nothing(index_elements=[key])
    if dialect == "sqlite":
        return sqlite.insert(model).on_conflict_do_nothing(index_elements=[key])
    return insert(model)  # pragma: no cover - other databases: conflicts surface as errors


class _WarmConnections:
    """Connections the recorder keeps between instances, most recently used first.

    A SQLite connection keeps a page cache that is thrown away whenever it starts a
    transaction after another connection wrote. The engine's pool hands its connections out
    in turn (FIFO), so with the node's other threads having opened a few, every instance ran
    on a connection whose cache another had just invalidated, and re-read its pages; the pool
    checkout itself cost as much again. Measured in the listener: pool checkout and first
    statement 0.32 ms an instance, 0.19 ms with the last-used connection kept. Reusing it (one
    per concurrent association, at most ``keep`` idle) keeps its cache valid, since its own
    commits do not invalidate it.
    """

    def __init__(self, engine: Engine, keep: int = 4) -> None:
        self._engine = engine
        self._keep = keep
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        # Database.dispose() (the node stopping) must not leave connections open behind it.
        event.listen(engine, "engine_disposed", lambda _engine: self.close())

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A transaction on a warm connection: committed on success, rolled back on error."""
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._engine.connect()
        ok = False
        try:
            with conn.begin():
                yield conn
            ok = True
        finally:
            keep = ok and not conn.invalidated
            if keep:
                with self._lock:
                    keep = len(self._idle) < self._keep
                    if keep:
                        self._idle.append(conn)
            if not keep:
                conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class IngestRecorder:
    """Implements dicom_io.scp.InstanceRecorder on the node's database.

    The hot path (every instance of a series after its first) is one statement and a commit:
    insert the instance; and, at most every TOUCH_REFRESH_S or when its association did not
    vouch that the series is open (ReceivedInstance.series_open), touch the series' last-
    received time while it is still receiving, which also finds a series that must be
    reopened. Series ids are cached; the cache is only a shortcut, every write is checked.
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
        self._touched: dict[str, float] = {}  # series uid -> monotonic time of its last touch
        # series uid -> time of its latest instance whose touch was skipped
        self._untouched: dict[str, datetime] = {}
        self._lock = threading.Lock()
        # SQLite only: a server database has no per-connection cache to keep warm, and
        # connections held outside the pool would miss its pre-ping.
        self._warm = _WarmConnections(db.engine) if dialect == "sqlite" else None

    def close(self) -> None:
        """Give the connections kept between instances back to the engine."""
        if self._warm is not None:
            self._warm.close()

    def instance_stored(self, instance: ReceivedInstance) -> None:
        now = utcnow()
        tick = time.monotonic()
        uid = instance.series_uid
        with self._lock:
            series_id = self._series_ids.get(uid)
            skip_touch = (
                instance.series_open
                and series_id is not None
                and tick - self._touched.get(uid, float("-inf")) < TOUCH_REFRESH_S
            )
        with self._warm.begin() if self._warm is not None else self.db.engine.begin() as conn:
            touched = skip_touch or (
                series_id is not None
                and bool(conn.execute(self._touch, {"sid": series_id, "now": now}).rowcount)
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
            if skip_touch:
                self._untouched[uid] = max(now, self._untouched.get(uid, now))
            else:
                self._touched[uid] = tick
                self._untouched.pop(uid, None)
            self._series_ids[uid] = series_id
            self._series_ids.move_to_end(uid)
            while len(self._series_ids) > self.CACHE_SIZE:
                old, _ = self._series_ids.popitem(last=False)
                self._touched.pop(old, None)

    def association_closed(self, series_uids: set[str]) -> None:
        """Give the association's series the time of their last instance where the hot path
        left it behind (see the module docstring)."""
        with self._lock:
            due = {uid: self._untouched.pop(uid) for uid in series_uids if uid in self._untouched}
        if not due:
            return
        with self.db.engine.begin() as conn:
            for uid, at in due.items():
                conn.execute(
                    update(Series)
                    .where(
                        Series.series_uid == uid,
                        Series.state == SeriesState.RECEIVING,
                        Series.last_received_at < at,
                    )
                    .values(last_received_at=at)
                )

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
