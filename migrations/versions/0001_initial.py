"""Initial schema: ledger, session snapshots, campaign aggregates, daily rollup, budget leases.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from costing.models import Money, UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _tokens() -> list[sa.Column]:
    return [
        sa.Column(name, sa.BigInteger(), nullable=False, server_default="0")
        for name in ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens")
    ]


def upgrade() -> None:
    op.create_table(
        "usage_records",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("campaign_id", sa.String(128), nullable=False),
        sa.Column("session_id", sa.String(128), nullable=False),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("request_model", sa.String(200)),
        sa.Column("response_model", sa.String(200)),
        *_tokens(),
        sa.Column("cost_usd", Money(), nullable=False, server_default="0"),
        sa.Column("priced_by_default", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("estimated", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("streamed", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("latency_ms", sa.Integer(), nullable=False),
        sa.Column("response_id", sa.String(255)),
        sa.Column("api_key_hash", sa.String(16)),
        sa.UniqueConstraint("response_id", name="uq_usage_records_response_id"),
    )
    op.create_index("ix_usage_records_campaign_created", "usage_records", ["campaign_id", "created_at"])
    op.create_index("ix_usage_records_campaign_session", "usage_records", ["campaign_id", "session_id"])

    op.create_table(
        "session_cost_snapshots",
        sa.Column("campaign_id", sa.String(128), primary_key=True),
        sa.Column("session_id", sa.String(128), primary_key=True),
        sa.Column("cost_usd", Money(), nullable=False, server_default="0"),
        sa.Column("requests", sa.BigInteger(), nullable=False, server_default="0"),
        *_tokens(),
        sa.Column("first_seen", UTCDateTime(), nullable=False),
        sa.Column("last_seen", UTCDateTime(), nullable=False),
        sa.Column("deleted_at", UTCDateTime()),
    )
    op.create_index("ix_session_cost_snapshots_last_seen", "session_cost_snapshots",
                    ["campaign_id", "last_seen"])
    op.create_index("ix_session_cost_snapshots_cost", "session_cost_snapshots",
                    ["campaign_id", "cost_usd"])

    op.create_table(
        "campaign_cost_aggregates",
        sa.Column("campaign_id", sa.String(128), primary_key=True),
        sa.Column("cost_usd", Money(), nullable=False, server_default="0"),
        sa.Column("requests", sa.BigInteger(), nullable=False, server_default="0"),
        *_tokens(),
        sa.Column("first_seen", UTCDateTime()),
        sa.Column("last_seen", UTCDateTime()),
        sa.Column("warning_usd", Money()),
        sa.Column("limit_usd", Money()),
    )

    op.create_table(
        "campaign_daily_costs",
        sa.Column("campaign_id", sa.String(128), primary_key=True),
        sa.Column("day", sa.Date(), primary_key=True),
        sa.Column("cost_usd", Money(), nullable=False, server_default="0"),
        sa.Column("requests", sa.BigInteger(), nullable=False, server_default="0"),
        *_tokens(),
    )

    op.create_table(
        "budget_leases",
        sa.Column("campaign_id", sa.String(128), primary_key=True),
        sa.Column("holder_id", sa.String(64), primary_key=True),
        sa.Column("amount_usd", Money(), nullable=False, server_default="0"),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    for table in ("budget_leases", "campaign_daily_costs", "campaign_cost_aggregates",
                  "session_cost_snapshots", "usage_records"):
        op.drop_table(table)
