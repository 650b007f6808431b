"""The outcomes table: one row per decision and its outcome.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "outcomes",
        sa.Column("decision_id", sa.String(400), primary_key=True),
        sa.Column("claim", sa.String(320), nullable=False),
        sa.Column("claim_uid", sa.String(64), nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("substrate", sa.String(16)),
        sa.Column("request", sa.JSON),
        sa.Column("nodes", sa.JSON),
        sa.Column("readings", sa.JSON),
        sa.Column("fingerprints", sa.JSON),
        sa.Column("thresholds", sa.JSON),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("verdict", sa.String(32), nullable=False),
        sa.Column("evidence", sa.JSON),
        sa.Column("headroom", sa.JSON),
        sa.Column("outcome_at", sa.DateTime(timezone=True)),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("outcomes_claim_uid", "outcomes", ["claim_uid"])
    op.create_index("outcomes_decided_at", "outcomes", ["decided_at"])


def downgrade() -> None:
    op.drop_index("outcomes_decided_at", table_name="outcomes")
    op.drop_index("outcomes_claim_uid", table_name="outcomes")
    op.drop_table("outcomes")
