"""Ledgers as earlier revisions held them, written with plain SQL (today's store writes columns
they do not have): the migration tests' starting points."""

from __future__ import annotations

from datetime import UTC, date, datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine


async def write_0003_call(engine: AsyncEngine, *, input_tokens: int, output_tokens: int,
                          response_id: str | None = None) -> None:
    """One call of campaign `c`, session `s` (cost 1.2345e-6 USD) and its aggregates, in the
    columns revision 0003 has."""
    sqlite = engine.dialect.name == "sqlite"
    cost = 12345 if sqlite else "0.0000012345"  # SQLite keeps 1e-10 USD units
    at = "2026-11-30 10:00:00.000000" if sqlite else datetime(2026, 11, 30, 10, tzinfo=UTC)
    day = "2026-11-30" if sqlite else date(2026, 11, 30)
    row_id = "0" * 31 + "1" if sqlite else "00000000-0000-0000-0000-000000000001"
    tokens = {"input": input_tokens, "output": output_tokens}
    async with engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO usage_records (id, created_at, campaign_id, session_id, operation, "
            "input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, cost_usd, "
            "status_code, latency_ms, response_id, audio_input_tokens, audio_output_tokens, "
            "web_search_calls) VALUES (:id, :at, 'c', 's', 'responses', :input, 0, :output, 0, "
            ":cost, 200, 3, :response_id, 0, 0, 0)"),
            {"id": row_id, "cost": cost, "at": at, "response_id": response_id, **tokens})
        for table, keys, columns in (
                ("campaign_cost_aggregates", "'c', :at, :at", "campaign_id, first_seen, last_seen"),
                ("session_cost_snapshots", "'c', 's', :at, :at",
                 "campaign_id, session_id, first_seen, last_seen"),
                ("campaign_daily_costs", "'c', :day", "campaign_id, day")):
            await conn.execute(text(
                f"INSERT INTO {table} ({columns}, cost_usd, requests, input_tokens, "
                "cached_input_tokens, output_tokens, reasoning_tokens, audio_input_tokens, "
                f"audio_output_tokens) VALUES ({keys}, :cost, 1, :input, 0, :output, 0, 0, 0)"),
                {"cost": cost, "at": at, "day": day, **tokens})
