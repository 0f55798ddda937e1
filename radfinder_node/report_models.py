"""ORM models of the learning loop: reports received over HL7 and the snippet-slice pairs mined
from them (DESIGN.md §6).

A report's identity is the sender's (sending facility, MSH-10 control id), so a resend after a
crash finds its row instead of adding one. The raw message is kept with the row: the database
is the record of what was acknowledged, and a parser improved later can re-read it. A corrected
report does not overwrite the one it corrects; ``superseded_by_id`` points forward, so history
stays and every consumer reads only reports whose pointer is null.
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
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from radfinder_node.models import UID, Base, Study


class ReportState(enum.StrEnum):
    RECEIVED = "received"  # inside the receiving transaction only: linking runs before commit
    LINKED = "linked"
    WAITING = "waiting"  # for its study: linked when the study arrives


class PairState(enum.StrEnum):
    RESOLVED = "resolved"
    UNRESOLVED = "unresolved"


def _values(e: type[enum.Enum]) -> list[str]:
    return [str(m.value) for m in e]


class Report(Base):
    __tablename__ = "reports"
    __table_args__ = (
        UniqueConstraint("sending_facility", "control_id", name="uq_reports_sender_control_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sending_facility: Mapped[str] = mapped_column(String(255), doc="MSH-4 as sent")
    control_id: Mapped[str] = mapped_column(String(255), doc="MSH-10")
    sending_application: Mapped[str] = mapped_column(String(255), doc="MSH-3 as sent")
    message_datetime: Mapped[str | None] = mapped_column(String(32), doc="MSH-7")
    version: Mapped[str] = mapped_column(String(16), doc="MSH-12")
    body_sha256: Mapped[str] = mapped_column(
        String(64), doc="hash of the segments after MSH: tells a resend from a reused control id"
    )
    accession_number: Mapped[str | None] = mapped_column(
        String(64), index=True, doc="the configured accession field's value, used for linking"
    )
    filler_order_number: Mapped[str | None] = mapped_column(String(64), doc="OBR-3")
    placer_field1: Mapped[str | None] = mapped_column(String(64), doc="OBR-18")
    study_uid: Mapped[str | None] = mapped_column(UID, index=True, doc="first one carried")
    study_uids: Mapped[list[str]] = mapped_column(JSON, doc="every Study Instance UID carried")
    patient_id: Mapped[str | None] = mapped_column(String(64), doc="PID-3")
    result_status: Mapped[str | None] = mapped_column(String(2), doc="OBR-25: F, C, P ...")
    observation_datetime: Mapped[str | None] = mapped_column(String(32), doc="OBR-7")
    text: Mapped[str | None] = mapped_column(Text, doc="report text; null when not minable")
    text_source: Mapped[str | None] = mapped_column(String(8), doc="obx | cda")
    unminable_reason: Mapped[str | None] = mapped_column(Text)
    document_type: Mapped[str | None] = mapped_column(String(128), doc="first ED document")
    document: Mapped[bytes | None] = mapped_column(LargeBinary, doc="its decoded bytes")
    raw: Mapped[bytes] = mapped_column(LargeBinary, doc="the message as received")
    peer: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[ReportState] = mapped_column(
        Enum(ReportState, name="report_state", values_callable=_values), index=True
    )
    state_reason: Mapped[str | None] = mapped_column(Text)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    superseded_by_id: Mapped[int | None] = mapped_column(ForeignKey("reports.id"), index=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    linked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    mined_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), index=True, doc="null until snippet mining ran"
    )

    study: Mapped[Study | None] = relationship()
    pairs: Mapped[list[SnippetSlicePair]] = relationship(
        back_populates="report", cascade="all, delete-orphan"
    )

    def describe(self) -> dict[str, Any]:
        """Log fields that identify the report without PHI: no text, no patient or accession
        number (PS3.15 counts those as identifying); ``report_id`` leads to them in the database."""
        return {
            "report_id": self.id,
            "sending_facility": self.sending_facility,
            "control_id": self.control_id,
            "study_uid": self.study_uid,
            "state": self.state.value,
        }


class SnippetSlicePair(Base):
    __tablename__ = "snippet_slice_pairs"
    __table_args__ = (UniqueConstraint("report_id", "start", name="uq_pairs_report_start"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("reports.id", ondelete="CASCADE"), index=True)
    start: Mapped[int] = mapped_column(Integer, doc="citation offset in Report.text")
    end: Mapped[int] = mapped_column(Integer)
    series_number: Mapped[int | None] = mapped_column(Integer)
    image_number: Mapped[int] = mapped_column(Integer)
    snippet: Mapped[str] = mapped_column(Text, doc="the finding's clause, citation removed")
    state: Mapped[PairState] = mapped_column(
        Enum(PairState, name="pair_state", values_callable=_values), index=True
    )
    sop_uid: Mapped[str | None] = mapped_column(UID)
    series_uid: Mapped[str | None] = mapped_column(UID)
    z_mm: Mapped[float | None] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(Text, doc="why it is unresolved")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    report: Mapped[Report] = relationship(back_populates="pairs")
