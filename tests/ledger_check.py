"""Recomputes every aggregate from `usage_records` and compares, to the last decimal."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from costing.models import CampaignCostAggregate, CampaignDailyCost, SessionCostSnapshot, UsageRecord

R = UsageRecord
SUMS = (func.sum(R.cost_usd), func.count(), func.sum(R.input_tokens), func.sum(R.cached_input_tokens),
        func.sum(R.output_tokens), func.sum(R.reasoning_tokens), func.sum(R.audio_input_tokens),
        func.sum(R.audio_output_tokens), func.sum(R.cache_write_input_tokens),
        func.sum(R.cached_audio_input_tokens))


def _norm(values: Any) -> tuple[Any, ...]:
    cost, *counts = values
    return (Decimal(cost or 0).quantize(Decimal("1e-10")), *(int(c or 0) for c in counts))


def _stored(row: Any) -> tuple[Any, ...]:
    return _norm((row.cost_usd, row.requests, row.input_tokens, row.cached_input_tokens,
                  row.output_tokens, row.reasoning_tokens, row.audio_input_tokens,
                  row.audio_output_tokens, row.cache_write_input_tokens, row.cached_audio_input_tokens))


async def ledger_rows(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(select(R).order_by(R.created_at))).all())


async def assert_aggregates_match_ledger(engine: AsyncEngine) -> dict[str, tuple[Any, ...]]:
    """Campaign, session and daily totals equal the ledger's sums exactly; returns campaign sums.

    All reads see one snapshot, so a batch committing meanwhile cannot fake a mismatch.
    """
    async with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            await conn.execution_options(isolation_level="REPEATABLE READ")
        by_campaign = {r[0]: _norm(r[1:]) for r in await conn.execute(
            select(R.campaign_id, *SUMS).group_by(R.campaign_id))}
        by_session = {(r[0], r[1]): _norm(r[2:]) for r in await conn.execute(
            select(R.campaign_id, R.session_id, *SUMS).group_by(R.campaign_id, R.session_id))}
        campaigns = {r.campaign_id: _stored(r) for r in await conn.execute(
            select(CampaignCostAggregate).where(CampaignCostAggregate.requests > 0))}
        sessions = {(r.campaign_id, r.session_id): _stored(r)
                    for r in await conn.execute(select(SessionCostSnapshot))}
        daily_rows = list(await conn.execute(select(CampaignDailyCost)))
        records = list(await conn.execute(select(R.campaign_id, R.created_at, R.cost_usd,
                                                  R.audio_input_tokens, R.audio_output_tokens,
                                                  R.cache_write_input_tokens,
                                                  R.cached_audio_input_tokens)))
    assert campaigns == by_campaign
    assert sessions == by_session
    by_day: dict[tuple[str, Any], tuple[Decimal, int, int, int, int]] = {}
    for campaign_id, created, cost, audio_in, audio_out, writes, cached_audio in records:
        key = (campaign_id, created.date())
        known = by_day.get(key, (Decimal(0), 0, 0, 0, 0))
        by_day[key] = (known[0] + cost, known[1] + audio_in, known[2] + audio_out, known[3] + writes,
                       known[4] + cached_audio)
    assert {(r.campaign_id, r.day): (r.cost_usd, r.audio_input_tokens, r.audio_output_tokens,
                                     r.cache_write_input_tokens, r.cached_audio_input_tokens)
            for r in daily_rows} == by_day
    return by_campaign
