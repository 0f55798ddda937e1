"""ORM models of the inference service: jobs and outbound objects (DESIGN.md §6).

They live beside, not inside, ``models.py`` so the ingest schema and the inference schema can
be read (and migrated, revision 0002) separately; both share one ``Base`` and one database.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from radfinder_node.models import UID, Base


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class OutboundState(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


def _values(e: type[enum.Enum]) -> list[str]:
    return [str(m.value) for m in e]


class Job(Base):
    """One inference of one series by one bundle version; ``key`` derives the output UIDs."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("series_id", "bundle_name", "bundle_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    series_uid: Mapped[str] = mapped_column(UID)
    bundle_name: Mapped[str] = mapped_column(String(64))
    bundle_version: Mapped[str] = mapped_column(String(64))
    state: Mapped[JobState] = mapped_column(
        Enum(JobState, name="job_state", values_callable=_values), index=True
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    # Where the results go, fixed when the job is created (the node's destinations then).
    destinations: Mapped[list[str]] = mapped_column(JSON)
    # Seconds per stage: queue, load, preprocess, infer, findings, write, send.
    timings: Mapped[dict[str, float]] = mapped_column(JSON)
    # Per label: probability, present, key SOP Instance UID and z; plus the written objects.
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    task_id: Mapped[str | None] = mapped_column(String(64), doc="last message sent for it")
    published_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), doc="when that message was sent"
    )
    worker: Mapped[str | None] = mapped_column(String(128), doc="worker of the last attempt")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    queued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class OutboundObject(Base):
    """One written object for one destination; sent once the peer confirmed, never again."""

    __tablename__ = "outbound_objects"
    __table_args__ = (UniqueConstraint("sop_uid", "destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_uid: Mapped[str] = mapped_column(UID)
    destination: Mapped[str] = mapped_column(String(100), doc="AE@HOST:PORT")
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8), doc="sr | kos")
    sop_class_uid: Mapped[str] = mapped_column(UID)
    study_uid: Mapped[str] = mapped_column(UID)
    series_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text, doc="relative to the results directory")
    state: Mapped[OutboundState] = mapped_column(
        Enum(OutboundState, name="outbound_state", values_callable=_values), index=True
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status: Mapped[int | None] = mapped_column(Integer, doc="DIMSE status, e.g. 0xA700")
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    # A sender holds a row while it sends it, so two senders never send one object at once.
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    send_s: Mapped[float | None] = mapped_column(Float, doc="duration of the successful send")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
