"""Cached audio input in the ledger: `cached_audio_input_tokens` (part of cached_input_tokens,
billed at the model's cached audio price: gpt-realtime-mini's is $0.30 per 1M, its cached text
$0.06) in `usage_records` and the aggregates, so every cost can be recomputed from its row and
/costs totals stay O(1) reads equal to the ledger. Existing rows get 0, which is what they were
priced as (all cached input at the cached text price).

Self-contained (one column, its own names): a merge may renumber it, nothing else changes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMN = "cached_audio_input_tokens"
TABLES = ("usage_records", "session_cost_snapshots", "campaign_cost_aggregates", "campaign_daily_costs")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column(COLUMN, sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    for table in reversed(TABLES):
        with op.batch_alter_table(table) as batch:
            batch.drop_column(COLUMN)
