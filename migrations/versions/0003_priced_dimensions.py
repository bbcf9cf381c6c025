"""Every billed dimension in the ledger: the service tier that served a call, its audio tokens
and web searches (`usage_records`), and audio tokens in the aggregates, so /costs totals stay
O(1) reads and equal to the ledger. Existing rows get 0 / NULL (no audio, no searches, tier
unknown), which is what they were priced as.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AUDIO = ("audio_input_tokens", "audio_output_tokens")
AGGREGATES = ("usage_records", "session_cost_snapshots", "campaign_cost_aggregates", "campaign_daily_costs")


def upgrade() -> None:
    for table in AGGREGATES:
        with op.batch_alter_table(table) as batch:
            for name in AUDIO:
                batch.add_column(sa.Column(name, sa.BigInteger(), nullable=False, server_default="0"))
    with op.batch_alter_table("usage_records") as batch:
        batch.add_column(sa.Column("service_tier", sa.String(32)))
        batch.add_column(sa.Column("web_search_calls", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_column("web_search_calls")
        batch.drop_column("service_tier")
    for table in reversed(AGGREGATES):
        with op.batch_alter_table(table) as batch:
            for name in reversed(AUDIO):
                batch.drop_column(name)
