"""The ledger writer at shutdown, on both databases: a write in flight is finished, never
cancelled halfway (a driver cancelled mid-statement can leave its connection locked, and the
final flush would then hang), and nothing handed over is lost.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal

import pytest
from conftest import make_settings
from ledger_check import ledger_rows
from sqlalchemy.engine import make_url
from test_spool_file import OLD_LINE
from test_store import entry

from costing.budget import make_budget
from costing.db import create_engine
from costing.ledger import Ledger
from costing.spool import Spool
from costing.store import Store


@asynccontextmanager
async def table_locked(database_url: str) -> AsyncIterator[None]:
    """Another client holds the ledger table, so a write waits until the block ends."""
    if database_url.startswith("sqlite"):
        other = sqlite3.connect(make_url(database_url).database, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            other.execute("COMMIT")
            other.close()
        return
    engine = create_engine(make_settings(database_url=database_url).database)
    try:
        async with engine.connect() as other:
            await other.begin()
            await other.exec_driver_sql("LOCK TABLE usage_records IN ACCESS EXCLUSIVE MODE")
            try:
                yield
            finally:
                await other.rollback()
    finally:
        await engine.dispose()


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    engine = create_engine(make_settings(database_url=database_url).database)
    try:
        yield Store(engine, make_budget(Decimal(1), Decimal(5)))
    finally:
        await engine.dispose()


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Polled: nothing signals these moments, and none is added for a test."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def batch_sizes(ledger: Ledger) -> list[int]:
    """The size of every batch the ledger writes from now on, in order."""
    sizes: list[int] = []
    ledger.listeners.append(lambda batch, _inserted, _seconds: sizes.append(len(batch)))
    return sizes


async def test_close_finishes_a_write_in_flight_instead_of_cancelling_it(database_url: str,
                                                                         store: Store) -> None:
    ledger = Ledger(store, "holder", flush_interval=0.01, batch_size=100, max_records=1000)
    ledger.start()
    writer = ledger._task
    assert writer is not None
    async with table_locked(database_url):
        for i in range(5):
            ledger.submit(entry(response_id=f"r{i}"))
        await until(ledger.writing.locked)
        closing = asyncio.create_task(ledger.close(grace_seconds=30))
        await asyncio.sleep(0.3)
        assert not closing.done()  # waiting for the write, which waits for the lock
        assert not writer.done()
    assert await asyncio.wait_for(closing, 10) == 0
    assert not writer.cancelled()
    rows = await ledger_rows(store.engine)
    assert sorted(row.response_id for row in rows) == [f"r{i}" for i in range(5)]


async def test_records_that_arrive_during_a_write_wait_for_the_next_interval(database_url: str,
                                                                              store: Store) -> None:
    """Under steady load a write is followed by a pause of one interval, not by another write of
    whatever arrived meanwhile: batches stay large and writes few."""
    ledger = Ledger(store, "holder", flush_interval=0.05, batch_size=100, max_records=1000)
    written = batch_sizes(ledger)
    ledger.start()
    async with table_locked(database_url):
        ledger.submit(entry(response_id="first"))
        await until(ledger.writing.locked)
        ledger.flush_interval = 3.0  # the wait after this write: long enough to observe
        for i in range(5):
            ledger.submit(entry(response_id=f"r{i}"))
    await until(lambda: bool(written))
    await asyncio.sleep(0.5)
    assert written == [1] and len(ledger) == 5  # still waiting, not written straight after
    assert await ledger.close() == 0
    assert written == [1, 5]


async def test_a_backlog_of_full_batches_is_written_without_waiting(store: Store) -> None:
    ledger = Ledger(store, "holder", flush_interval=30.0, batch_size=10, max_records=1000)
    written = batch_sizes(ledger)
    ledger.start()
    for i in range(25):
        ledger.submit(entry(response_id=f"r{i}"))
    await until(lambda: len(written) == 2)
    await asyncio.sleep(0.2)
    assert written == [10, 10] and len(ledger) == 5  # the part batch waits for the interval
    assert await ledger.close() == 0
    assert written == [10, 10, 5]
    assert len(await ledger_rows(store.engine)) == 25


async def test_unwritten_entries_answer_for_a_responses_tokens_until_the_database_holds_them(
        store: Store) -> None:
    """A call continuing a response answered a moment ago finds that response's tokens in the
    buffer (no query); once written, the store answers (see Store.response_tokens)."""
    ledger = Ledger(store, "holder", flush_interval=30.0, batch_size=100, max_records=1000)
    answered = entry(response_id="resp_1", input_tokens=100_000, output_tokens=500)
    answered.operation = "responses"
    guessed = entry(response_id="resp_2", input_tokens=9, output_tokens=9)
    guessed.operation, guessed.estimated = "responses", True
    for e in (answered, guessed, entry(response_id="chatcmpl-1")):
        ledger.submit(e)
    assert ledger.response_tokens("resp_1") == 100_500
    assert ledger.response_tokens("resp_2") is None  # an estimate is not what OpenAI billed
    assert ledger.response_tokens("chatcmpl-1") is None  # not a Responses object
    assert await ledger.flush_once() == 3
    assert ledger.response_tokens("resp_1") is None
    assert await store.response_tokens("resp_1") == 100_500


async def test_a_spool_left_before_cache_writes_is_replayed_into_the_ledger(store: Store, tmp_path) -> None:
    """A process of the release before cache writes died with records in its spool: the next
    start writes them (no cache writes) beside a record that has some, and the totals agree."""
    root = tmp_path / "spool"
    dead = Spool(root)
    dead.open()
    dead.append(entry("c1", "s2", input_tokens=10, output_tokens=1, cache_write_input_tokens=8))
    dead.close()
    assert dead.directory is not None
    [segment] = sorted(dead.directory.glob("*.spool"))
    segment.write_bytes(OLD_LINE + segment.read_bytes())
    live = Spool(root)
    live.open()
    ledger = Ledger(store, "holder", flush_interval=30.0, batch_size=100, max_records=1000, spool=live)
    try:
        assert await ledger.replay() == (2, 0)
    finally:
        live.close()
    rows = {row.session_id: row for row in await ledger_rows(store.engine)}
    assert (rows["s9"].cache_write_input_tokens, rows["s2"].cache_write_input_tokens) == (0, 8)
    assert rows["s9"].input_tokens == 50_000
    campaign = await store.campaign("c1")
    assert campaign is not None and campaign.totals.cache_write_input_tokens == 8
