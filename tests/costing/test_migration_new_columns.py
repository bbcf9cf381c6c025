"""Migrations that add a token column (cache writes, cached audio) on a ledger written before
them: existing rows and aggregates keep their values and read as what they were priced as (the
new kind 0); totals still equal the ledger. The revision before each is read from the migration
itself (a merge may renumber it)."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from conftest import make_settings, pg_database
from ledger_check import assert_aggregates_match_ledger, ledger_rows
from sqlalchemy import text

from costing import schema
from costing.db import create_engine

VERSIONS = Path(__file__).resolve().parents[2] / "migrations" / "versions"


# The migration's file name ending, and the column it adds.
NEW_COLUMNS = [("cache_write_tokens", "cache_write_input_tokens"),
               ("cached_audio_tokens", "cached_audio_input_tokens")]


def _revisions(name: str) -> tuple[str, str]:
    """(the migration's revision, the one it follows)."""
    [path] = VERSIONS.glob(f"*_{name}.py")
    spec = importlib.util.spec_from_file_location(f"{name}_migration", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.revision, module.down_revision


@pytest.fixture
async def empty_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
        return
    async with pg_database(request.getfixturevalue("pg_cluster")) as url:
        yield url


@pytest.mark.parametrize(("name", "column"), NEW_COLUMNS)
async def test_rows_written_before_a_new_token_column_survive_its_migration(empty_url, name, column):
    revision, before = _revisions(name)
    settings = make_settings(database_url=empty_url)
    await schema.upgrade(settings, before)
    engine = create_engine(settings.database)
    sqlite = engine.dialect.name == "sqlite"
    cost = 12345 if sqlite else "0.0000012345"  # SQLite keeps 1e-10 USD units
    at = "2026-11-30 10:00:00.000000" if sqlite else datetime(2026, 11, 30, 10, tzinfo=UTC)
    day = "2026-11-30" if sqlite else date(2026, 11, 30)
    row_id = "0" * 31 + "1" if sqlite else "00000000-0000-0000-0000-000000000001"
    try:
        async with engine.begin() as conn:
            await conn.execute(text(
                "INSERT INTO usage_records (id, created_at, campaign_id, session_id, operation, "
                "input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, cost_usd, "
                "status_code, latency_ms, audio_input_tokens, audio_output_tokens, web_search_calls) "
                "VALUES (:id, :at, 'c', 's', 'responses', 50000, 0, 1000, 0, :cost, 200, 3, 0, 0, 0)"),
                {"id": row_id, "cost": cost, "at": at})
            for table, keys, columns in (
                    ("campaign_cost_aggregates", "'c', :at, :at", "campaign_id, first_seen, last_seen"),
                    ("session_cost_snapshots", "'c', 's', :at, :at",
                     "campaign_id, session_id, first_seen, last_seen"),
                    ("campaign_daily_costs", "'c', :day", "campaign_id, day")):
                await conn.execute(text(
                    f"INSERT INTO {table} ({columns}, cost_usd, requests, input_tokens, "
                    "cached_input_tokens, output_tokens, reasoning_tokens, audio_input_tokens, "
                    f"audio_output_tokens) VALUES ({keys}, :cost, 1, 50000, 0, 1000, 0, 0, 0)"),
                    {"cost": cost, "at": at, "day": day})
        await schema.upgrade(settings)
        assert await schema.current_revision(engine) == schema.head_revision(settings)
        [row] = await ledger_rows(engine)
        assert (row.input_tokens, row.output_tokens, getattr(row, column)) == (50_000, 1000, 0)
        await assert_aggregates_match_ledger(engine)  # the aggregates' new column is 0 too
        async with engine.connect() as conn:
            for table in ("campaign_cost_aggregates", "session_cost_snapshots", "campaign_daily_costs"):
                assert (await conn.scalar(text(f"SELECT {column} FROM {table}"))) == 0
    finally:
        await engine.dispose()
    assert revision != before
