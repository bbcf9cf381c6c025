"""/costs reads include what this proxy has answered but not yet written: a tab that refreshes
right after a reply never shows the total from before it, and nothing counts twice once the
ledger has written it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal

import aiohttp
from ledger_check import assert_aggregates_match_ledger

HELLO = [{"role": "user", "content": "hello"}]


async def _json(http: aiohttp.ClientSession, url: str) -> dict:
    async with http.get(url) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def _views(http: aiohttp.ClientSession, base: str) -> dict[str, dict]:
    today = datetime.now(UTC).date().isoformat()
    return {
        "campaign": await _json(http, f"{base}/costs/campaigns/rw"),
        "campaigns": await _json(http, f"{base}/costs/campaigns"),
        "sessions": await _json(http, f"{base}/costs/campaigns/rw/sessions?include_deleted=true"),
        "session": await _json(http, f"{base}/costs/campaigns/rw/sessions/s1"),
        "daily": await _json(http, f"{base}/costs/campaigns/rw/daily?from={today}&to={today}"),
    }


async def test_costs_right_after_a_response_include_it(start_proxy, fake):
    # The ledger would not write for a minute: every figure below comes from its buffer.
    proxy = await start_proxy(ledger_flush_interval_seconds=60)
    async with aiohttp.ClientSession() as http:
        first = await proxy.client(campaign="rw", session="s1").chat.completions.with_raw_response.create(
            model="gpt-4o", messages=HELLO)
        assert len(proxy.ledger) == 1  # answered, not written
        cost = Decimal(first.headers["X-Request-Cost-USD"])
        views = await _views(http, proxy.url)
        campaign = views["campaign"]
        assert Decimal(campaign["cost_usd"]) == cost == Decimal(first.headers["X-Campaign-Cost-USD"])
        assert campaign["requests"] == 1 and campaign["session_count"] == 1
        assert campaign["budget"]["spent_usd"] == campaign["cost_usd"]
        assert campaign["tokens"]["input"] > 0 and campaign["last_seen"] is not None
        listed = {c["campaign_id"]: c for c in views["campaigns"]["campaigns"]}
        assert listed["rw"] == campaign
        assert [s["session_id"] for s in views["sessions"]["sessions"]] == ["s1"]
        assert views["sessions"]["sessions"][0] == views["session"]
        assert Decimal(views["session"]["cost_usd"]) == cost and views["session"]["requests"] == 1
        assert Decimal(views["daily"]["days"][0]["cost_usd"]) == cost

        # A second call, in a new session: still nothing written, both counted.
        second = await proxy.client(campaign="rw", session="s2").chat.completions.with_raw_response.create(
            model="gpt-4o", messages=HELLO)
        total = cost + Decimal(second.headers["X-Request-Cost-USD"])
        views = await _views(http, proxy.url)
        assert Decimal(views["campaign"]["cost_usd"]) == total
        assert views["campaign"]["requests"] == 2 and views["campaign"]["session_count"] == 2
        assert {s["session_id"] for s in views["sessions"]["sessions"]} == {"s1", "s2"}
        assert Decimal(views["daily"]["days"][0]["cost_usd"]) == total

        # Once written, the same figures, not twice.
        assert await proxy.ledger.flush_once() == 2
        assert len(proxy.ledger) == 0
        written = await _views(http, proxy.url)
        assert written == views
        sums = await assert_aggregates_match_ledger(proxy.engine)
        assert sums["rw"][0] == total

        # A call in a session already written adds to it (stored plus pending).
        third = await proxy.client(campaign="rw", session="s1").chat.completions.with_raw_response.create(
            model="gpt-4o", messages=HELLO)
        views = await _views(http, proxy.url)
        assert Decimal(views["session"]["cost_usd"]) == cost + Decimal(third.headers["X-Request-Cost-USD"])
        assert views["session"]["requests"] == 2 and views["campaign"]["session_count"] == 2
        assert Decimal(views["campaign"]["cost_usd"]) == Decimal(third.headers["X-Campaign-Cost-USD"])


async def _session_views(http: aiohttp.ClientSession, base: str, queries: list[str]) -> dict[str, list]:
    views = {}
    for query in queries:
        listed = await _json(http, f"{base}/costs/campaigns/rw/sessions?{query}")
        views[query] = [(s["session_id"], s["cost_usd"], s["requests"], s["deleted_at"])
                        for s in listed["sessions"]]
    return views


async def test_a_pending_call_of_a_session_beyond_the_page_adds_to_its_stored_totals(start_proxy, fake):
    """Sessions `old` (3 calls), `mid` (2), `new` (1) are written; one more call in `old` is not:
    every page of the list right after it says what it says once the call is written."""
    proxy = await start_proxy(ledger_flush_interval_seconds=60)
    for session, calls in (("old", 3), ("mid", 2), ("new", 1)):
        for _ in range(calls):
            await proxy.client(campaign="rw", session=session).chat.completions.create(
                model="gpt-4o-mini", messages=HELLO)
        await proxy.ledger.flush_once()
    await proxy.client(campaign="rw", session="old").chat.completions.create(model="gpt-4o-mini",
                                                                             messages=HELLO)
    assert len(proxy.ledger) == 1
    queries = ["limit=1", "limit=2", "order=cost&limit=1", "order=first_seen&limit=1", ""]
    async with aiohttp.ClientSession() as http:
        right_after = await _session_views(http, proxy.url, queries)
        await proxy.ledger.flush_once()
        assert right_after == await _session_views(http, proxy.url, queries)
    assert right_after["limit=1"][0][:3] == ("old", right_after[""][0][1], 4)


async def test_a_call_in_a_deleted_session_revives_it_at_once(start_proxy, fake):
    """Read right after the reviving call (not written yet): the session is live again in every
    view, and the campaign's deleted-session figures no longer count it, as once written."""
    proxy = await start_proxy(ledger_flush_interval_seconds=60)
    client = proxy.client(campaign="rw", session="gone")
    await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    await proxy.client(campaign="rw", session="keep").chat.completions.create(model="gpt-4o-mini",
                                                                              messages=HELLO)
    async with aiohttp.ClientSession() as http:
        async with http.delete(f"{proxy.url}/costs/campaigns/rw/sessions/gone") as response:
            assert response.status == 200
        assert (await _json(http, f"{proxy.url}/costs/campaigns/rw"))["deleted_session_count"] == 1
        await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        assert len(proxy.ledger) == 1

        async def views() -> tuple[dict, dict[str, list], dict]:
            campaign = await _json(http, f"{proxy.url}/costs/campaigns/rw")
            listed = await _session_views(http, proxy.url, ["", "include_deleted=true"])
            return campaign, listed, await _json(http, f"{proxy.url}/costs/campaigns/rw/sessions/gone")

        right_after = await views()
        await proxy.ledger.flush_once()
        assert right_after == await views()
    campaign, listed, gone = right_after
    assert (campaign["deleted_session_count"], campaign["deleted_sessions_cost_usd"]) == (0, "0.00")
    assert gone["deleted_at"] is None and gone["requests"] == 2
    assert sorted(s for s, *_ in listed[""]) == ["gone", "keep"]


async def test_the_session_header_includes_the_other_replicas_calls(start_proxy, fake):
    """Two processes on one database (replicas, or `serve --workers 2`), a session's calls landing
    on either: each answer's X-Session-Cost-USD is the session's whole total, as /costs says once
    written, not this process's share of it."""
    a = await start_proxy()
    b = await start_proxy()
    total = Decimal(0)
    for proxy in (a, b, a, b, a):
        answer = await proxy.client(campaign="rw", session="s1").chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=HELLO)
        total += Decimal(answer.headers["X-Request-Cost-USD"])
        assert Decimal(answer.headers["X-Session-Cost-USD"]) == total
        await a.flush()
        await b.flush()
        await asyncio.sleep(1.1)  # the other process's stored total is read again after 1 s
    totals = await assert_aggregates_match_ledger(a.engine)
    assert totals["rw"][0] == total
