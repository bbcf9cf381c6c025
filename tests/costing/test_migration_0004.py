"""Migration 0004 (`background_responses`) on a ledger written before it: existing rows and
totals are kept; the new table stores and prunes creators; it downgrades back to 0003."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from alembic import command
from conftest import make_settings, pg_database
from ledger_check import assert_aggregates_match_ledger, ledger_rows
from sqlalchemy import Connection, inspect

from costing import schema
from costing.budget import make_budget
from costing.db import create_engine
from costing.records import UsageEntry, epoch_us
from costing.settings import Settings
from costing.store import Store
from costing.usage import Usage


@pytest.fixture
async def empty_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
        return
    async with pg_database(request.getfixturevalue("pg_cluster")) as url:
        yield url


def _entry() -> UsageEntry:
    return UsageEntry("c", "s", "responses", "gpt-4o-mini", "gpt-4o-mini", Usage(10, 0, 5, 0), 12345,
                      False, False, False, 200, 3, epoch_us(datetime.now(UTC)), "resp_old")


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
        await store.write_batch([_entry()], "holder")
        await schema.upgrade(settings)
        assert await schema.current_revision(engine) == "0004"
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
        [row] = await ledger_rows(engine)
        assert row.response_id == "resp_old"
    finally:
        await engine.dispose()
