"""retraining export watermark: which report went to which export destination

Revision ID: 0004
Revises: 0003

One row per (destination, report): the export's watermark is the set of reports a destination
has, not a single timestamp, so a report mined while an export runs is never skipped (see
radfinder_node.export).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

EXPORT_STATES = ("exported", "skipped")


def upgrade() -> None:
    op.create_table(
        "exported_reports",
        sa.Column("destination", sa.String(length=1024), nullable=False),
        sa.Column("report_id", sa.Integer(), nullable=False),
        sa.Column("mined_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.Enum(*EXPORT_STATES, name="export_state"), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("manifest", sa.String(length=255), nullable=True),
        sa.Column("exported_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["report_id"], ["reports.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("destination", "report_id"),
    )
    with op.batch_alter_table("exported_reports", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_exported_reports_report_id"), ["report_id"])


def downgrade() -> None:
    with op.batch_alter_table("exported_reports", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_exported_reports_report_id"))
    op.drop_table("exported_reports")
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        sa.Enum(name="export_state").drop(bind, checkfirst=True)
