"""/costs reads include what this proxy has answered but not yet written: a tab that refreshes
right after a reply never shows the total from before it, and nothing counts twice once the
ledger has written it."""

from __future__ import annotations

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
