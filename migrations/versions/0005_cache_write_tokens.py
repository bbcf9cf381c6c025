"""Prompt-cache writes in the ledger: `cache_write_input_tokens` (part of input_tokens, billed at
the model's cache-write price) in `usage_records` and the aggregates, so /costs totals stay O(1)
reads and equal to the ledger. Existing rows get 0, which is what they were priced as (every
input token not read from the cache at the input price).

Self-contained (one column, its own names): a merge may renumber it, nothing else changes.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMN = "cache_write_input_tokens"
TABLES = ("usage_records", "session_cost_snapshots", "campaign_cost_aggregates", "campaign_daily_costs")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column(COLUMN, sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    for table in reversed(TABLES):
        with op.batch_alter_table(table) as batch:
            batch.drop_column(COLUMN)
