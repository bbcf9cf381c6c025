"""SQLAlchemy tables of the ledger. Table names are part of the product contract (SPEC.md)."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Dialect,
    Index,
    Integer,
    Numeric,
    String,
    TypeDecorator,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeEngine

from costing.money import ZERO, from_units, quantize, to_units
from costing.usage import MAX_ID_LENGTH, MAX_MODEL_LENGTH, MAX_TIER_LENGTH

ID_LENGTH = 128


class Money(TypeDecorator[Decimal]):
    """USD as NUMERIC(20, 10) on PostgreSQL and as integer units of 1e-10 USD on SQLite.

    SQLite's NUMERIC affinity turns decimals into binary floats; scaled integers keep every
    sum exact, so aggregates equal the ledger to the last decimal on both databases.
    """

    impl = Numeric(20, 10)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(BigInteger())
        return dialect.type_descriptor(Numeric(20, 10, asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return to_units(Decimal(value))
        return quantize(Decimal(value))

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return from_units(int(value))
        return quantize(Decimal(value))


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on both databases (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: timestamps must carry a timezone")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class TokenCounts:
    """Token columns shared by the ledger and both aggregates."""

    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    audio_input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    audio_output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cache_write_input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)  # migration 0004
    cached_audio_input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)  # migration 0006


class UsageRecord(TokenCounts, Base):
    """One row per metered request: the ledger every total is computed from."""

    __tablename__ = "usage_records"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    campaign_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    session_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    operation: Mapped[str] = mapped_column(String(32))
    request_model: Mapped[str | None] = mapped_column(String(MAX_MODEL_LENGTH))
    response_model: Mapped[str | None] = mapped_column(String(MAX_MODEL_LENGTH))
    cost_usd: Mapped[Decimal] = mapped_column(Money, default=ZERO)
    priced_by_default: Mapped[bool] = mapped_column(Boolean, default=False)
    estimated: Mapped[bool] = mapped_column(Boolean, default=False)
    streamed: Mapped[bool] = mapped_column(Boolean, default=False)
    status_code: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[int] = mapped_column(Integer)
    response_id: Mapped[str | None] = mapped_column(String(MAX_ID_LENGTH))
    api_key_hash: Mapped[str | None] = mapped_column(String(16))
    service_tier: Mapped[str | None] = mapped_column(String(MAX_TIER_LENGTH))
    web_search_calls: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (
        Index("ix_usage_records_campaign_created", "campaign_id", "created_at"),
        Index("ix_usage_records_campaign_session", "campaign_id", "session_id"),
        # Not unique: OpenAI-compatible upstreams reuse ids; the record id is the idempotency key.
        Index("ix_usage_records_response_id", "response_id"),
    )


class SessionCostSnapshot(TokenCounts, Base):
    """Running totals of one session of one campaign; kept (flagged) when the session is deleted."""

    __tablename__ = "session_cost_snapshots"

    campaign_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    cost_usd: Mapped[Decimal] = mapped_column(Money, default=ZERO)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index("ix_session_cost_snapshots_last_seen", "campaign_id", "last_seen"),
        Index("ix_session_cost_snapshots_cost", "campaign_id", "cost_usd"),
    )


class CampaignCostAggregate(TokenCounts, Base):
    """Running totals of one campaign (deleted sessions included) and its budget override."""

    __tablename__ = "campaign_cost_aggregates"

    campaign_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    cost_usd: Mapped[Decimal] = mapped_column(Money, default=ZERO)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    first_seen: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime)
    warning_usd: Mapped[Decimal | None] = mapped_column(Money)
    limit_usd: Mapped[Decimal | None] = mapped_column(Money)


class CampaignDailyCost(TokenCounts, Base):
    """Per campaign and UTC day totals, so trend reads stay O(days) however long the ledger grows."""

    __tablename__ = "campaign_daily_costs"

    campaign_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    cost_usd: Mapped[Decimal] = mapped_column(Money, default=ZERO)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)


class BudgetLease(Base):
    """A slice of a campaign's remaining budget held by one proxy process.

    Processes admit requests against their own lease without a database round trip; the sum
    of leases plus the recorded spend never exceeds the limit, which is what makes one budget
    hold across replicas. Expired leases (a crashed process) stop counting by themselves.
    """

    __tablename__ = "budget_leases"

    campaign_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    holder_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    amount_usd: Mapped[Decimal] = mapped_column(Money, default=ZERO)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class BackgroundResponse(Base):
    """Who created a background response (`background: true`): its final state, read later by
    any process (a replica, a `serve --workers N` worker), is charged to this campaign and
    session. Written off the request path when the creation is seen; rows older than
    `costing.background.OWNER_KEEP_SECONDS` are pruned."""

    __tablename__ = "background_responses"

    response_id: Mapped[str] = mapped_column(String(MAX_ID_LENGTH), primary_key=True)
    campaign_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    session_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_background_responses_created_at", "created_at"),)
