"""Migrations that add a token column (cache writes, cached audio) on a ledger written before
them: existing rows and aggregates keep their values and read as what they were priced as (the
new kind 0); totals still equal the ledger. The revision before each is read from the migration
itself (a merge may renumber it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import make_settings
from ledger_check import assert_aggregates_match_ledger, ledger_rows
from old_ledgers import write_0003_call
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


@pytest.mark.parametrize(("name", "column"), NEW_COLUMNS)
async def test_rows_written_before_a_new_token_column_survive_its_migration(empty_url, name, column):
    revision, before = _revisions(name)
    settings = make_settings(database_url=empty_url)
    await schema.upgrade(settings, before)
    engine = create_engine(settings.database)
    try:
        await write_0003_call(engine, input_tokens=50_000, output_tokens=1000)
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
