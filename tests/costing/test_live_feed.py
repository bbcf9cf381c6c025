"""The live feed's rules without a server: ids and resume, bounded queues, status changes, and
the running totals of other processes' rows."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from costing.budget import make_budget, status_units
from costing.feed import Feed, SeenIds, TooManySubscribers, at_text
from costing.records import UsageEntry, from_epoch_us
from costing.usage import Usage

BUDGET = make_budget(Decimal("1.00"), Decimal("2.00"))
DOLLAR = 10**10  # money units


def entry(cost: int, campaign: str = "c1", session: str = "s1", record_id: int = 0) -> UsageEntry:
    made = UsageEntry(campaign, session, "chat", "gpt-4o-mini", "gpt-4o-mini", Usage(10, 0, 5, 0), cost,
                      False, False, False, 200, 3, 1_764_547_200_000_000)
    if record_id:
        made.id = record_id
    return made


def data(frame: bytes) -> dict:
    return orjson.loads(frame.split(b"data: ", 1)[1])


async def test_usage_then_budget_events_only_when_the_status_changes():
    feed = Feed(buffer_events=100, queue_events=100, max_subscribers=5)
    sub = feed.subscribe(None, None)
    spent = 0
    for cost in (DOLLAR // 2, DOLLAR // 2, DOLLAR // 4, DOLLAR):
        spent += cost
        feed.usage(entry(cost), spent, BUDGET, spent)
    frames = await sub.take()
    kinds = [f.split(b"event: ", 1)[1].split(b"\n", 1)[0] for f in frames]
    assert kinds == [b"usage", b"usage", b"budget", b"usage", b"usage", b"budget"]
    assert [data(f)["status"] for f in frames if b"event: budget" in f] == ["warning", "exceeded"]
    assert data(frames[-1]) == {"campaign_id": "c1", "warning_usd": "1.00", "limit_usd": "2.00",
                                "spent_usd": "2.25", "remaining_usd": "0.00", "status": "exceeded"}
    assert status_units(DOLLAR - 1, BUDGET) == "ok" and status_units(DOLLAR, BUDGET) == "warning"


async def test_ids_resume_within_the_window_else_resync():
    feed = Feed(buffer_events=3, queue_events=100, max_subscribers=50)
    first = feed.subscribe(None, None)
    for i in range(2):
        feed.usage(entry(1, session=f"s{i}"), 1, BUDGET, 1)
    ids = [f.split(b"\n", 1)[0].removeprefix(b"id: ").decode() for f in await first.take()]
    assert ids == [f"{feed.epoch}-1", f"{feed.epoch}-2"]

    async def resumed(last_event_id: str) -> list[str]:
        frames = await feed.subscribe(None, last_event_id).take()
        return ["resync" if b"event: resync" in f else data(f)["session_id"] for f in frames]

    assert await resumed(ids[0]) == ["s1"]
    with pytest.raises(TimeoutError):  # nothing of campaign "other" is owed: its writer waits
        await asyncio.wait_for(feed.subscribe("other", ids[0]).take(), 0.05)
    for i in range(3):
        feed.usage(entry(1, session=f"t{i}"), 1, BUDGET, 1)
    assert await resumed(ids[0]) == ["resync"]  # seq 2 fell out of a window of 3
    assert await resumed(f"{feed.epoch}-2") == ["t0", "t1", "t2"]
    assert await resumed(f"{feed.epoch}-99") == ["resync"]
    assert await resumed("cafebabe-4") == ["resync"]


async def test_a_resume_gets_every_missed_event_the_ring_holds_however_many_the_queue_takes():
    feed = Feed(buffer_events=100, queue_events=3, max_subscribers=5)
    first = feed.subscribe(None, None)
    feed.usage(entry(1, session="seen"), 1, BUDGET, 1)
    (seen,) = await first.take()
    feed.unsubscribe(first)
    for i in range(20):  # missed: far more than a queue holds, all still in the ring
        feed.usage(entry(1, session=f"m{i}"), 1, BUDGET, 1)
    last_id = seen.split(b"\n", 1)[0].removeprefix(b"id: ").decode()
    resumed = feed.subscribe(None, last_id)
    # Live events before its writer first takes: the backlog does not count against the bound.
    feed.usage(entry(1, session="live0"), 1, BUDGET, 1)
    feed.usage(entry(1, session="live1"), 1, BUDGET, 1)
    assert feed.subscribers == [resumed] and feed.dropped == 0
    frames = await resumed.take()
    assert [data(f)["session_id"] for f in frames] == [f"m{i}" for i in range(20)] + ["live0", "live1"]
    assert [int(f.split(b"\n", 1)[0].rsplit(b"-", 1)[1]) for f in frames] == list(range(2, 24))
    # Once taken, the queue's bound holds again for what comes next.
    for i in range(4):
        feed.usage(entry(1, session=f"late{i}"), 1, BUDGET, 1)
    assert resumed.closed and feed.dropped == 1
    assert b"event: resync" in (await resumed.take())[0]


async def test_a_full_queue_drops_the_subscriber_with_resync_and_spares_the_others():
    feed = Feed(buffer_events=100, queue_events=3, max_subscribers=5)
    slow, fast = feed.subscribe(None, None), feed.subscribe(None, None)
    for i in range(3):
        feed.usage(entry(1), i + 1, BUDGET, i + 1)
    assert len(await fast.take()) == 3
    feed.usage(entry(1), 4, BUDGET, 4)
    assert feed.subscribers == [fast] and feed.dropped == 1 and slow.closed
    frames = await slow.take()
    assert len(frames) == 1 and b"event: resync" in frames[0]
    assert await slow.take() == []  # then the stream ends
    assert len(await fast.take()) == 1


async def test_nobody_listening_costs_nothing_and_a_new_epoch_follows():
    feed = Feed(buffer_events=10, queue_events=10, max_subscribers=1, linger_seconds=0.01)
    assert not feed.live
    sub = feed.subscribe("c1", None)
    with pytest.raises(TooManySubscribers, match="at most 1"):
        feed.subscribe(None, None)
    epoch = feed.epoch
    feed.unsubscribe(sub)
    assert feed.live  # lingers, so a reconnect resumes
    await asyncio.sleep(0.05)
    assert not feed.live and feed.epoch != epoch and not feed.ring


def test_seen_ids_forget_what_falls_outside_the_window_and_count_what_is_written():
    seen = SeenIds()
    for i in (9, 1, 5, 2):  # published out of order: other processes' rows come later
        seen.add(i << 80)
    own = [entry(1, record_id=(i << 80)) for i in (3, 6, 7)]
    for e in own:
        seen.add(e.id, written=False)
    assert seen.written == 4
    seen.on_flushed(own[:2], own[:1], 0.01)  # a batch is written (one of it known already)
    assert seen.written == 6
    seen.on_dropped(own[2])  # refused by the database: never written
    assert seen.written == 7 and len(seen) == 7
    seen.keep_within(5 << 80, 9 << 80)
    assert (1 << 80) not in seen and (5 << 80) in seen and (9 << 80) not in seen
    assert len(seen) == 3 and seen.written == 3


@given(st.integers(min_value=0, max_value=253_402_300_799_999_999))  # up to 9999-12-31
def test_an_event_time_is_rendered_as_costs_renders_it(created_us):
    expected = from_epoch_us(created_us).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert at_text(created_us) == expected


README = Path(__file__).resolve().parents[2] / "README.md"


async def test_the_readme_example_events_have_the_shape_of_real_ones():
    readme = README.read_text()
    section = readme[readme.index("`GET /costs/events[?campaign_id=c1]` is the feed"):]
    lines = section[section.index("```\n") + 4:].split("```", 1)[0].splitlines()
    examples = {name.removeprefix("event: "): orjson.loads(body.removeprefix("data: "))
                for name, body in zip(lines[1::4], lines[2::4], strict=True)}
    feed = Feed(buffer_events=10, queue_events=10, max_subscribers=1)
    sub = feed.subscribe(None, None)
    feed.usage(entry(2 * DOLLAR), 2 * DOLLAR, BUDGET, 2 * DOLLAR)  # over the limit: usage, budget
    frames = await sub.take()
    real = {f.split(b"event: ", 1)[1].split(b"\n", 1)[0].decode(): data(f) for f in frames}

    def shape(value: object) -> object:
        return {k: shape(v) for k, v in value.items()} if isinstance(value, dict) else type(value)

    assert shape(examples) == shape(real)


async def test_a_filtered_subscriber_takes_its_campaigns_events_and_its_bound_counts_all_events():
    feed = Feed(buffer_events=100, queue_events=3, max_subscribers=5)
    mine = feed.subscribe("c2", None)
    feed.usage(entry(1, campaign="c1"), 1, BUDGET, 1)
    feed.usage(entry(1, campaign="c2"), 1, BUDGET, 1)
    feed.usage(entry(1, campaign="c1"), 2, BUDGET, 2)
    assert [data(f)["campaign_id"] for f in await mine.take()] == ["c2"]
    for _ in range(4):  # a writer that takes nothing while more than its bound of calls pass
        feed.usage(entry(1, campaign="c1"), 1, BUDGET, 1)
    assert mine.closed and mine.resync and feed.dropped == 1
    assert [b"event: resync" in f for f in await mine.take()] == [True]


async def test_a_waiting_writer_is_woken_by_an_event_a_heartbeat_or_the_end():
    feed = Feed(buffer_events=100, queue_events=100, max_subscribers=5)
    a, b = feed.subscribe(None, None), feed.subscribe("c1", None)
    waiting = [asyncio.ensure_future(s.take()) for s in (a, b)]
    await asyncio.sleep(0)
    feed.usage(entry(1), 1, BUDGET, 1)
    assert [len(f) for f in await asyncio.gather(*waiting)] == [1, 1]
    waiting = [asyncio.ensure_future(s.take()) for s in (a, b)]
    await asyncio.sleep(0)
    feed.heartbeat()
    assert await asyncio.gather(*waiting) == [[b": keep-alive\n\n"]] * 2
    waiting = [asyncio.ensure_future(s.take()) for s in (a, b)]
    await asyncio.sleep(0)
    feed.close()
    assert await asyncio.gather(*waiting) == [[], []]
