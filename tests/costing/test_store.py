"""The store's ledger write, on both databases: what goes in comes back out exactly, retries
and duplicate response ids never count twice, and every aggregate equals the ledger.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from conftest import make_settings
from hypothesis import given
from hypothesis import strategies as st
from ledger_check import assert_aggregates_match_ledger, ledger_rows
from sqlalchemy import event, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from costing.budget import make_budget
from costing.db import create_engine
from costing.models import SessionCostSnapshot
from costing.money import to_units
from costing.records import UsageEntry, epoch_us
from costing.store import Store, _sqlite_chunks
from costing.usage import Usage


def entry(campaign: str = "c1", session: str = "s1", *, response_id: str | None = None,
          cost: str = "0.0000540000", at: datetime | None = None, **usage: int) -> UsageEntry:
    return UsageEntry(
        campaign_id=campaign, session_id=session, operation="chat.completions",
        request_model="gpt-4o-mini", response_model="gpt-4o-mini-2024-07-18",
        usage=Usage(**usage) if usage else Usage(120, 20, 60, 10), cost_units=to_units(Decimal(cost)),
        priced_by_default=False, estimated=False, streamed=True, status_code=200, latency_ms=7,
        created_us=epoch_us(at or datetime.now(UTC)), response_id=response_id,
        api_key_hash="0123456789ab")


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(make_settings(database_url=database_url).database)
    yield engine
    await engine.dispose()


@pytest.fixture
def store(engine: AsyncEngine) -> Store:
    return Store(engine, make_budget(Decimal(1), Decimal(5)))


async def test_every_field_of_an_entry_reads_back_exactly(store: Store, engine: AsyncEngine) -> None:
    at = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)  # zero microseconds: the format must keep them
    written = entry(response_id="chatcmpl-1", at=at, cost="0.1234567891")
    assert await store.write_batch([written], "holder") == [written]
    [row] = await ledger_rows(engine)
    assert (row.id.int, row.id.version, row.created_at, row.campaign_id, row.session_id,
            row.operation) == (written.id, 7, at, "c1", "s1", "chat.completions")
    assert (row.request_model, row.response_model, row.cost_usd, row.response_id, row.api_key_hash) == (
        "gpt-4o-mini", "gpt-4o-mini-2024-07-18", Decimal("0.1234567891"), "chatcmpl-1", "0123456789ab")
    assert (row.input_tokens, row.cached_input_tokens, row.output_tokens, row.reasoning_tokens) == (
        120, 20, 60, 10)
    assert (row.priced_by_default, row.estimated, row.streamed, row.status_code, row.latency_ms) == (
        False, False, True, 200, 7)


async def test_a_retried_batch_counts_once(store: Store, engine: AsyncEngine) -> None:
    batch = [entry(response_id=f"r{i}") for i in range(5)] + [entry(response_id=None)]
    assert len(await store.write_batch(batch, "h")) == 6
    assert await store.write_batch(batch, "h") == []
    assert len(await ledger_rows(engine)) == 6
    sums = await assert_aggregates_match_ledger(engine)
    assert sums["c1"][:2] == (Decimal("0.0000540000") * 6, 6)


async def test_only_a_batch_with_known_records_asks_which_rows_went_in(store: Store,
                                                                      engine: AsyncEngine) -> None:
    """Returning the inserted ids costs about a tenth of a batch's write, so a batch of new
    records only counts its rows; one holding a known record is written again, returning ids,
    and only its new records count."""
    statements: list[str] = []
    event.listen(engine.sync_engine, "before_cursor_execute",
                 lambda _c, _cur, statement, *_args: statements.append(statement))
    fresh = [entry(response_id=f"r{i}") for i in range(3)]
    assert await store.write_batch(fresh, "h") == fresh
    inserts = [s for s in statements if s.startswith("INSERT INTO usage_records")]
    assert inserts and not any("RETURNING" in s for s in inserts)
    statements.clear()
    again = [fresh[0], entry(response_id="r9")]
    assert await store.write_batch(again, "h") == [again[1]]
    inserts = [s for s in statements if s.startswith("INSERT INTO usage_records")]
    assert "RETURNING" not in inserts[0] and "RETURNING" in inserts[-1]
    # Known records come in runs: later batches return ids at once (one insert, not two) until
    # a batch has no known record.
    new = [entry() for _ in range(3)]
    for batch, inserted, returning in (([fresh[1], new[0]], [new[0]], True),
                                       ([new[1]], [new[1]], True),
                                       ([new[2]], [new[2]], False)):
        statements.clear()
        assert await store.write_batch(batch, "h") == inserted
        inserts = [s for s in statements if s.startswith("INSERT INTO usage_records")]
        assert len(inserts) == 1 and ("RETURNING" in inserts[0]) == returning
    await assert_aggregates_match_ledger(engine)


async def test_a_reused_response_id_is_a_row_of_its_own(store: Store, engine: AsyncEngine) -> None:
    """OpenAI-compatible upstreams reuse response ids (Ollama mints `chatcmpl-<0..998>`): every
    distinct call is its own row and its own increment; only the record id is idempotent."""
    await store.write_batch([entry("c1", response_id="chatcmpl-123")], "h")
    inserted = await store.write_batch([entry("c2", response_id="chatcmpl-123"),
                                        entry("c2", response_id="chatcmpl-123"),
                                        entry("c1", response_id="other")], "h")
    assert [(e.campaign_id, e.response_id) for e in inserted] == [
        ("c2", "chatcmpl-123"), ("c2", "chatcmpl-123"), ("c1", "other")]
    assert len(await ledger_rows(engine)) == 4
    sums = await assert_aggregates_match_ledger(engine)
    assert sums["c2"][1] == 2 and sums["c1"][1] == 2


async def test_a_responses_calls_recorded_tokens_are_found_by_its_response_id(store: Store) -> None:
    """What a call continuing that response (`previous_response_id`) reserves as earlier
    context: its input + output tokens as the upstream reported them. Estimated rows, rows of
    other operations and unknown ids give nothing; a reused id gives its largest row."""
    def responses(response_id: str, input_tokens: int, output_tokens: int, *,
                  estimated: bool = False) -> UsageEntry:
        e = entry(response_id=response_id, **{"input_tokens": input_tokens,
                                               "output_tokens": output_tokens})
        e.operation, e.estimated = "responses", estimated
        return e

    await store.write_batch([
        responses("resp_1", 100_000, 500),
        responses("resp_2", 7, 3), responses("resp_2", 70, 30),
        responses("resp_3", 900_000, 9, estimated=True),
        entry(response_id="chatcmpl-1", input_tokens=40, output_tokens=2),
    ], "h")
    assert await store.response_tokens("resp_1") == 100_500
    assert await store.response_tokens("resp_2") == 100
    assert await store.response_tokens("resp_3") is None
    assert await store.response_tokens("chatcmpl-1") is None
    assert await store.response_tokens("resp_unknown") is None


async def test_a_large_mixed_batch_keeps_aggregates_equal_to_the_ledger(store: Store,
                                                                       engine: AsyncEngine) -> None:
    start = datetime(2026, 11, 24, 23, 59, 59, 999_000, tzinfo=UTC)  # spans a UTC midnight
    batch = [entry(f"c{i % 7}", f"s{i % 13}", response_id=f"r{i}", cost=f"0.{i:010d}",
                   at=start + timedelta(milliseconds=i), input_tokens=i, output_tokens=2 * i)
             for i in range(2500)]  # more rows than one SQLite statement takes
    assert len(await store.write_batch(batch, "h")) == 2500
    sums = await assert_aggregates_match_ledger(engine)
    assert sum(s[0] for s in sums.values()) == sum(Decimal(f"0.{i:010d}") for i in range(2500))
    async with engine.connect() as conn:
        first, last = (await conn.execute(
            select(SessionCostSnapshot.first_seen, SessionCostSnapshot.last_seen)
            .where(SessionCostSnapshot.campaign_id == "c0", SessionCostSnapshot.session_id == "s0"))).one()
    assert first == start and last == start + timedelta(milliseconds=max(
        i for i in range(2500) if i % 7 == 0 and i % 13 == 0))


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_sqlite_timestamps_are_stored_as_sqlalchemy_stores_them(engine: AsyncEngine,
                                                                     store: Store) -> None:
    """Range queries compare the stored text, so the fast path must write SQLAlchemy's format."""
    # Before 1970 first (its second is -1), the same second, the next microsecond, back a second
    # (out of order), another hour given in another zone, a second later at 999999 microseconds.
    moments = [datetime(1969, 12, 31, 23, 59, 59, 500_000, tzinfo=UTC),
               datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
               datetime(2026, 1, 2, 3, 4, 4, 10, tzinfo=UTC),
               datetime(2026, 1, 2, 5, 4, 5, 6, tzinfo=timezone(timedelta(hours=1))),
               datetime(2026, 1, 2, 3, 4, 6, 999_999, tzinfo=UTC)]
    await store.write_batch([entry(at=m) for m in moments], "h")
    async with engine.connect() as conn:
        query = text("SELECT created_at FROM usage_records ORDER BY rowid")
        stored = [r[0] for r in await conn.execute(query)]
        processor = conn.dialect.type_descriptor(SessionCostSnapshot.__table__.c.first_seen.type.impl)
    expected = [processor.bind_processor(engine.dialect)(m.astimezone(UTC).replace(tzinfo=None))
                for m in moments]
    assert stored == expected



async def test_an_entry_given_twice_in_one_batch_is_one_row_and_one_increment(store: Store,
                                                                              engine: AsyncEngine) -> None:
    twice = entry(response_id=None)
    assert len(await store.write_batch([twice, twice, entry(response_id=None)], "h")) == 2
    assert len(await ledger_rows(engine)) == 2
    sums = await assert_aggregates_match_ledger(engine)
    assert sums["c1"][1] == 2


@given(st.integers(min_value=0, max_value=100_000))
def test_sqlite_statements_come_in_few_sizes(count: int) -> None:
    """Few distinct statement texts keep sqlite3's per-connection statement cache small."""
    sizes = _sqlite_chunks(count)
    assert sum(sizes) == count
    assert all(size & (size - 1) == 0 and size <= 256 for size in sizes)
    assert len(set(sizes)) <= 9


async def test_cache_writes_are_stored_summed_and_read_back(store: Store, engine: AsyncEngine) -> None:
    at = datetime(2026, 11, 25, 12, tzinfo=UTC)
    writes = entry(at=at, input_tokens=50_000, cached_input_tokens=1000, output_tokens=1000,
                   cache_write_input_tokens=48_000)
    plain = entry(session="s2", at=at, input_tokens=10, output_tokens=1)
    await store.write_batch([writes, plain], "h")
    rows = {row.session_id: row for row in await ledger_rows(engine)}
    assert (rows["s1"].cache_write_input_tokens, rows["s2"].cache_write_input_tokens) == (48_000, 0)
    await assert_aggregates_match_ledger(engine)
    campaign = await store.campaign("c1")
    session = await store.session("c1", "s1")
    [day] = await store.daily("c1", at.date(), at.date())
    assert campaign is not None and session is not None
    assert (campaign.totals.cache_write_input_tokens, session.totals.cache_write_input_tokens,
            day.totals.cache_write_input_tokens) == (48_000, 48_000, 48_000)
    [remote] = await store.usage_with_totals([writes.id], max(writes.id, plain.id) + 1)
    assert remote.entry.usage == writes.usage
