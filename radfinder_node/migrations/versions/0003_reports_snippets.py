"""HL7 reports and snippet-slice pairs (learning loop)

Revision ID: 0003
Revises: 0002

Depends on the tables of 0001 only (reports link to studies), not on 0002's jobs and outbox.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

REPORT_STATES = ("received", "linked", "waiting")
PAIR_STATES = ("resolved", "unresolved")


def upgrade() -> None:
    op.create_table(
        "reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sending_facility", sa.String(length=255), nullable=False),
        sa.Column("control_id", sa.String(length=255), nullable=False),
        sa.Column("sending_application", sa.String(length=255), nullable=False),
        sa.Column("message_datetime", sa.String(length=32), nullable=True),
        sa.Column("version", sa.String(length=16), nullable=False),
        sa.Column("body_sha256", sa.String(length=64), nullable=False),
        sa.Column("accession_number", sa.String(length=64), nullable=True),
        sa.Column("filler_order_number", sa.String(length=64), nullable=True),
        sa.Column("placer_field1", sa.String(length=64), nullable=True),
        sa.Column("study_uid", sa.String(length=64), nullable=True),
        sa.Column("study_uids", sa.JSON(), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("result_status", sa.String(length=2), nullable=True),
        sa.Column("observation_datetime", sa.String(length=32), nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("text_source", sa.String(length=8), nullable=True),
        sa.Column("unminable_reason", sa.Text(), nullable=True),
        sa.Column("document_type", sa.String(length=128), nullable=True),
        sa.Column("document", sa.LargeBinary(), nullable=True),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("peer", sa.String(length=64), nullable=True),
        sa.Column("state", sa.Enum(*REPORT_STATES, name="report_state"), nullable=False),
        sa.Column("state_reason", sa.Text(), nullable=True),
        sa.Column("study_id", sa.Integer(), nullable=True),
        sa.Column("superseded_by_id", sa.Integer(), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("linked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("mined_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"]),
        sa.ForeignKeyConstraint(["superseded_by_id"], ["reports.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sending_facility", "control_id", name="uq_reports_sender_control_id"),
    )
    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_reports_accession_number"), ["accession_number"])
        batch_op.create_index(batch_op.f("ix_reports_study_uid"), ["study_uid"])
        batch_op.create_index(batch_op.f("ix_reports_state"), ["state"])
        batch_op.create_index(batch_op.f("ix_reports_study_id"), ["study_id"])
        batch_op.create_index(batch_op.f("ix_reports_superseded_by_id"), ["superseded_by_id"])
        batch_op.create_index(batch_op.f("ix_reports_mined_at"), ["mined_at"])

    op.create_table(
        "snippet_slice_pairs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("report_id", sa.Integer(), nullable=False),
        sa.Column("start", sa.Integer(), nullable=False),
        sa.Column("end", sa.Integer(), nullable=False),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("image_number", sa.Integer(), nullable=False),
        sa.Column("snippet", sa.Text(), nullable=False),
        sa.Column("state", sa.Enum(*PAIR_STATES, name="pair_state"), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=True),
        sa.Column("series_uid", sa.String(length=64), nullable=True),
        sa.Column("z_mm", sa.Float(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["report_id"], ["reports.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("report_id", "start", name="uq_pairs_report_start"),
    )
    with op.batch_alter_table("snippet_slice_pairs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_snippet_slice_pairs_report_id"), ["report_id"])
        batch_op.create_index(batch_op.f("ix_snippet_slice_pairs_state"), ["state"])


def downgrade() -> None:
    with op.batch_alter_table("snippet_slice_pairs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_snippet_slice_pairs_state"))
        batch_op.drop_index(batch_op.f("ix_snippet_slice_pairs_report_id"))
    op.drop_table("snippet_slice_pairs")
    with op.batch_alter_table("reports", schema=None) as batch_op:
        for column in (
            "mined_at",
            "superseded_by_id",
            "study_id",
            "state",
            "study_uid",
            "accession_number",
        ):
            batch_op.drop_index(batch_op.f(f"ix_reports_{column}"))
    op.drop_table("reports")
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        sa.Enum(name="pair_state").drop(bind, checkfirst=True)
        sa.Enum(name="report_state").drop(bind, checkfirst=True)
