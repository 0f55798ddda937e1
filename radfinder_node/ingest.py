"""Recording received instances: the application side of the C-STORE SCP.

Each instance is one transaction (study and series upserted, instance inserted once); the SCP
answers success only after it commits. Upserts use ON CONFLICT so that parallel associations
sending the same study never fail each other.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from dicom_io.scp import ReceivedInstance, Rejected
from radfinder_node.database import Database
from radfinder_node.models import Instance, QuarantinedObject, Series, SeriesState, Study
from radfinder_node.timeutil import utcnow

log = logging.getLogger("radfinder_node.ingest")


def _insert_ignore(session: Session, model: Any, values: dict[str, Any], key: str) -> None:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        stmt: Any = (
            postgresql.insert(model).values(**values).on_conflict_do_nothing(index_elements=[key])
        )
    elif dialect == "sqlite":
        stmt = sqlite.insert(model).values(**values).on_conflict_do_nothing(index_elements=[key])
    else:  # pragma: no cover - other databases: plain insert, conflicts surface as errors
        stmt = insert(model).values(**values)
    session.execute(stmt)


class IngestRecorder:
    """Implements dicom_io.scp.InstanceRecorder on the node's database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def instance_stored(self, instance: ReceivedInstance) -> None:
        now = utcnow()
        header = instance.header
        with self.db.transaction() as session:
            _insert_ignore(
                session,
                Study,
                {
                    "study_uid": instance.study_uid,
                    "patient_id": header.get("PatientID"),
                    "accession_number": header.get("AccessionNumber"),
                    "study_date": header.get("StudyDate"),
                    "study_description": _clip(header.get("StudyDescription"), 128),
                    "created_at": now,
                },
                "study_uid",
            )
            study_id = session.scalar(select(Study.id).where(Study.study_uid == instance.study_uid))
            attributes = {**header, "SOPClassUID": instance.sop_class_uid}
            _insert_ignore(
                session,
                Series,
                {
                    "series_uid": instance.series_uid,
                    "study_id": study_id,
                    "modality": header.get("Modality"),
                    "series_number": _int(header.get("SeriesNumber")),
                    "series_description": _clip(header.get("SeriesDescription"), 128),
                    "state": SeriesState.RECEIVING,
                    "attributes": attributes,
                    "first_received_at": now,
                    "last_received_at": now,
                },
                "series_uid",
            )
            row = session.execute(
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
            session.execute(update(Series).where(Series.id == row.id).values(**values))
            _insert_ignore(
                session,
                Instance,
                {
                    "sop_uid": instance.sop_uid,
                    "series_id": row.id,
                    "sop_class_uid": instance.sop_class_uid,
                    "transfer_syntax_uid": instance.transfer_syntax_uid,
                    "instance_number": instance.instance_number,
                    "path": str(instance.stored.relative),
                    "size_bytes": instance.stored.size,
                    "calling_ae": instance.calling_ae,
                    "received_at": now,
                },
                "sop_uid",
            )

    def instance_rejected(self, rejected: Rejected) -> None:
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
