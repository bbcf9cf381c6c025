"""Migration 0004 (`background_responses`) on a ledger written before it: existing rows and
totals are kept; the new table stores and prunes creators; it downgrades back to 0003."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from alembic import command
from conftest import make_settings, pg_database
from ledger_check import assert_aggregates_match_ledger, ledger_rows
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from costing import schema
from costing.budget import make_budget
from costing.db import create_engine
from costing.records import epoch_us
from costing.settings import Settings
from costing.store import Store


@pytest.fixture
async def empty_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
        return
    async with pg_database(request.getfixturevalue("pg_cluster")) as url:
        yield url


async def _write_a_0003_row(engine: AsyncEngine) -> None:
    """One call and its aggregates as a ledger at revision 0003 held them."""
    sqlite = engine.dialect.name == "sqlite"
    cost = 12345 if sqlite else "0.0000012345"  # SQLite keeps 1e-10 USD units
    at = "2026-11-30 10:00:00.000000" if sqlite else datetime(2026, 11, 30, 10, tzinfo=UTC)
    day = "2026-11-30" if sqlite else date(2026, 11, 30)
    row_id = "0" * 31 + "1" if sqlite else "00000000-0000-0000-0000-000000000001"
    async with engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO usage_records (id, created_at, campaign_id, session_id, operation, "
            "input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, cost_usd, "
            "status_code, latency_ms, response_id, audio_input_tokens, audio_output_tokens, "
            "web_search_calls) VALUES (:id, :at, 'c', 's', 'responses', 10, 0, 5, 0, :cost, 200, 3, "
            "'resp_old', 0, 0, 0)"), {"id": row_id, "cost": cost, "at": at})
        for table, keys, columns in (
                ("campaign_cost_aggregates", "'c', :at, :at", "campaign_id, first_seen, last_seen"),
                ("session_cost_snapshots", "'c', 's', :at, :at",
                 "campaign_id, session_id, first_seen, last_seen"),
                ("campaign_daily_costs", "'c', :day", "campaign_id, day")):
            await conn.execute(text(
                f"INSERT INTO {table} ({columns}, cost_usd, requests, input_tokens, "
                "cached_input_tokens, output_tokens, reasoning_tokens, audio_input_tokens, "
                f"audio_output_tokens) VALUES ({keys}, :cost, 1, 10, 0, 5, 0, 0, 0)"),
                {"cost": cost, "at": at, "day": day})


async def _response_ids(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return list((await conn.execute(text("SELECT response_id FROM usage_records"))).scalars())


def _downgrade(connection: Connection, settings: Settings, revision: str) -> None:
    config = schema.alembic_config(settings)
    config.attributes["connection"] = connection
    command.downgrade(config, revision)


async def _tables(engine) -> set[str]:  # type: ignore[no-untyped-def]
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))


async def test_0004_keeps_earlier_rows_stores_and_prunes_creators_and_downgrades(empty_url):
    settings = make_settings(database_url=empty_url)
    await schema.upgrade(settings, "0003")
    engine = create_engine(settings.database)
    store = Store(engine, make_budget(Decimal("1"), Decimal("5")))
    try:
        await _write_a_0003_row(engine)
        await schema.upgrade(settings, "0004")
        assert await schema.current_revision(engine) == "0004"
        assert await _response_ids(engine) == ["resp_old"]
        await schema.upgrade(settings)  # the later migrations keep what 0004 made
        [row] = await ledger_rows(engine)
        assert (row.response_id, row.input_tokens, row.output_tokens) == ("resp_old", 10, 5)
        await assert_aggregates_match_ledger(engine)

        now = datetime.now(UTC)
        old = epoch_us(now - timedelta(days=8))
        await store.save_background_owners([("resp_1", "c1", "s1", epoch_us(now)),
                                            ("resp_2", "c2", "s2", old)])
        await store.save_background_owners([("resp_1", "other", "x", epoch_us(now))])  # first wins
        assert await store.background_owner("resp_1") == ("c1", "s1")
        assert await store.background_owner("resp_2") == ("c2", "s2")
        assert await store.background_owner("resp_unknown") is None
        assert await store.prune_background_owners(now - timedelta(days=7)) == 1
        assert await store.background_owner("resp_2") is None

        async with schema.migrating(engine, settings.database) as conn:
            await conn.run_sync(_downgrade, settings, "0003")
        assert await schema.current_revision(engine) == "0003"
        assert "background_responses" not in await _tables(engine)
        assert await _response_ids(engine) == ["resp_old"]
    finally:
        await engine.dispose()
