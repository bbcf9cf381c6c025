"""usage_records.response_id is indexed, no longer unique: OpenAI-compatible upstreams reuse
response ids (Ollama mints `chatcmpl-<0..998>`), and every distinct call is its own row.
Idempotency is on the proxy's own record id (the primary key). Existing rows are kept.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_constraint("uq_usage_records_response_id", type_="unique")
    op.create_index("ix_usage_records_response_id", "usage_records", ["response_id"])


def downgrade() -> None:
    # Not reversible without losing rows: reused ids would violate the old constraint.
    raise NotImplementedError("0002 cannot be downgraded: response ids may now repeat")
