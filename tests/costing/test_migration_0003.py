"""Migration 0003 on a ledger written before it: existing rows keep their values and read as
what they were priced as (no audio, no searches, tier unknown); totals still equal the ledger."""

from __future__ import annotations

from datetime import UTC, date, datetime

from conftest import make_settings
from ledger_check import assert_aggregates_match_ledger, ledger_rows
from sqlalchemy import text

from costing import schema
from costing.db import create_engine


async def test_rows_written_before_0003_survive_it(empty_url):
    settings = make_settings(database_url=empty_url)
    await schema.upgrade(settings, "0002")
    engine = create_engine(settings.database)
    sqlite = engine.dialect.name == "sqlite"
    cost = 12345 if sqlite else "0.0000012345"  # SQLite keeps 1e-10 USD units
    row_id = "0" * 31 + "1" if sqlite else "00000000-0000-0000-0000-000000000001"
    try:
        async with engine.begin() as conn:
            await conn.execute(text(
                "INSERT INTO usage_records (id, created_at, campaign_id, session_id, operation, "
                "input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, cost_usd, "
                "status_code, latency_ms) VALUES (:id, :at, 'c', 's', 'chat.completions', 10, 0, 5, 0, "
                ":cost, 200, 3)"), {"id": row_id, "cost": cost,
                                    "at": "2026-11-30 10:00:00.000000" if sqlite else _at()})
            for table, keys in (("campaign_cost_aggregates", "'c'"), ("session_cost_snapshots", "'c', 's'"),
                                ("campaign_daily_costs", "'c', :day")):
                columns = {"campaign_cost_aggregates": "campaign_id, first_seen, last_seen",
                           "session_cost_snapshots": "campaign_id, session_id, first_seen, last_seen",
                           "campaign_daily_costs": "campaign_id, day"}[table]
                seen = ", :at, :at" if table != "campaign_daily_costs" else ""
                await conn.execute(text(
                    f"INSERT INTO {table} ({columns}, cost_usd, requests, input_tokens, "
                    f"cached_input_tokens, output_tokens, reasoning_tokens) "
                    f"VALUES ({keys}{seen}, :cost, 1, 10, 0, 5, 0)"),
                    {"cost": cost, "at": "2026-11-30 10:00:00.000000" if sqlite else _at(),
                     "day": "2026-11-30" if sqlite else _day()})
        await schema.upgrade(settings)
        [row] = await ledger_rows(engine)
        assert (row.service_tier, row.audio_input_tokens, row.audio_output_tokens, row.web_search_calls) == (
            None, 0, 0, 0)
        assert (row.input_tokens, row.output_tokens) == (10, 5)
        await assert_aggregates_match_ledger(engine)
    finally:
        await engine.dispose()


def _at() -> datetime:  # asyncpg wants datetimes and dates as such
    return datetime(2026, 11, 30, 10, tzinfo=UTC)


def _day() -> date:
    return date(2026, 11, 30)
