"""ORM models: the database is the source of truth for every state (DESIGN.md §1, §6)."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Enum, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)


class Base(DeclarativeBase):
    pass


class SeriesState(enum.StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    SELECTED = "selected"
    IGNORED = "ignored"


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(128))
    state: Mapped[SeriesState] = mapped_column(
        Enum(SeriesState, name="series_state", values_callable=lambda e: [m.value for m in e]),
        index=True,
    )
    state_reason: Mapped[str | None] = mapped_column(Text)
    # Header attributes of the first instance, the input of the selection rules.
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON)
    first_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text, doc="relative to the spool directory")
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    series: Mapped[Series] = relationship(back_populates="instances")


class QuarantinedObject(Base):
    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), doc="dicom | hl7")
    reason: Mapped[str] = mapped_column(Text)
    path: Mapped[str] = mapped_column(Text, doc="relative to the quarantine directory")
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sop_uid: Mapped[str | None] = mapped_column(String(128))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    peer: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[int | None] = mapped_column(Integer, doc="status we answered, e.g. 0xC210")
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
