"""Creators of background responses (`background: true`), shared by every process on the
database: a final state read by a replica or worker that did not see the creation is charged to
the campaign and session that created it, not to the reader's. A new table only: existing rows
are untouched. Rows are pruned by the proxy after a few days (costing.background).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from costing.models import UTCDateTime

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "background_responses",
        sa.Column("response_id", sa.String(255), primary_key=True),
        sa.Column("campaign_id", sa.String(128), nullable=False),
        sa.Column("session_id", sa.String(128), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_background_responses_created_at", "background_responses", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_background_responses_created_at", table_name="background_responses")
    op.drop_table("background_responses")
