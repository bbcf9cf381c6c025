"""Migration 0004 (`background_responses`) on a ledger written before it: existing rows and
totals are kept; the new table stores and prunes creators; it downgrades back to 0003."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from alembic import command
from conftest import make_settings
from ledger_check import assert_aggregates_match_ledger, ledger_rows
from old_ledgers import write_0003_call
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from costing import schema
from costing.budget import make_budget
from costing.db import create_engine
from costing.records import epoch_us
from costing.settings import Settings
from costing.store import Store


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
        await write_0003_call(engine, input_tokens=10, output_tokens=5, response_id="resp_old")
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
