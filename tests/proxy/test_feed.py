"""The live feed, /costs/events, through the real proxy with the real openai SDK: one usage event
per call equal to the ledger, budget events, resume, slow subscribers, many subscribers, other
replicas' calls, the access rule."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from decimal import Decimal
from typing import Any
from unittest import mock

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request
from ledger_check import ledger_rows
from sse_client import EventReader

from costing.money import format_usd
from costing.usage import Operation, Reported, RequestFacts, Usage
from proxy.errors import ProxyError
from proxy.feed import check_events_access, page_handler, send_chunks
from proxy.state import FEED, METER

HELLO = [{"role": "user", "content": "hello"}]


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 (a condition of the proxy's state, not an event)
            await asyncio.sleep(0.02)


async def _chat(proxy: Any, campaign: str = "c1", session: str = "s1", **kwargs: Any) -> Any:
    return await proxy.client(campaign=campaign, session=session).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HELLO, **kwargs)


async def test_one_usage_event_per_call_in_order_equal_to_the_ledger(proxy, fake):
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/costs/events") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        reader = EventReader(response)
        plan = [("c1", "s1", False), ("c1", "s2", True), ("c2", "s1", False), ("c1", "s1", True),
                ("c1", "s2", False)]
        headers = []
        for campaign, session, stream in plan:
            if stream:
                chunks = await proxy.client(campaign=campaign, session=session).chat.completions.create(
                    model="gpt-4o-mini", messages=HELLO, stream=True)
                async for _ in chunks:
                    pass
                headers.append(None)
            else:
                raw = await _chat(proxy, campaign, session)
                headers.append(raw.headers)
        events = await reader.events(len(plan), kinds=("usage",))
    await proxy.flush()
    rows = sorted(await ledger_rows(proxy.engine), key=lambda r: r.id.int)
    assert len(rows) == len(plan)
    campaign_sums: dict[str, Decimal] = {}
    session_sums: dict[tuple[str, str], Decimal] = {}
    ids = []
    for event, row, (campaign, session, _stream), sent in zip(events, rows, plan, headers, strict=True):
        data = event.data
        assert set(data) == {"campaign_id", "session_id", "model", "cost_usd", "tokens", "estimated",
                             "at", "campaign_cost_usd", "session_cost_usd", "budget_status"}
        assert (data["campaign_id"], data["session_id"]) == (campaign, session) == (row.campaign_id,
                                                                                   row.session_id)
        assert Decimal(data["cost_usd"]) == row.cost_usd
        assert data["model"] == (row.response_model or row.request_model)
        assert data["tokens"] == {"input": row.input_tokens, "cached_input": row.cached_input_tokens,
                                  "output": row.output_tokens, "reasoning": row.reasoning_tokens,
                                  "audio_input": row.audio_input_tokens,
                                  "audio_output": row.audio_output_tokens,
                                  "cache_write_input": row.cache_write_input_tokens,
                                  "cached_audio_input": row.cached_audio_input_tokens}
        assert data["estimated"] is row.estimated is False
        assert data["at"] == row.created_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        campaign_sums[campaign] = campaign_sums.get(campaign, Decimal(0)) + row.cost_usd
        session_sums[(campaign, session)] = session_sums.get((campaign, session), Decimal(0)) + row.cost_usd
        assert Decimal(data["campaign_cost_usd"]) == campaign_sums[campaign]
        assert Decimal(data["session_cost_usd"]) == session_sums[(campaign, session)]
        assert data["budget_status"] == "ok"
        if sent is not None:  # the event says what the response's headers said
            assert data["campaign_cost_usd"] == sent["X-Campaign-Cost-USD"]
            assert data["session_cost_usd"] == sent["X-Session-Cost-USD"]
            assert data["cost_usd"] == sent["X-Request-Cost-USD"]
        ids.append(event.id)
    assert len(set(ids)) == len(ids)
    assert [int(i.rsplit("-", 1)[1]) for i in ids] == sorted(int(i.rsplit("-", 1)[1]) for i in ids)


async def test_a_campaign_filter_and_an_estimated_stream(proxy, fake):
    async with aiohttp.ClientSession() as http, \
            http.get(f"{proxy.url}/costs/events?campaign_id=mine") as response:
        reader = EventReader(response)
        await _chat(proxy, "other")
        fake.behaviour.omit_usage = True
        stream = await proxy.client(campaign="mine").chat.completions.create(
            model="gpt-4o-mini", messages=HELLO, stream=True)
        async for _ in stream:
            pass
        (event,) = await reader.events(1)
    assert event.data["campaign_id"] == "mine" and event.data["estimated"] is True
    async with aiohttp.ClientSession() as http, \
            http.get(f"{proxy.url}/costs/events?campaign_id=bad id") as response:
        assert response.status == 400
        assert (await response.json())["error"]["param"] == "campaign_id"


async def test_budget_events_at_warning_and_exceeded_and_back_after_a_budget_change(proxy, fake):
    fake.behaviour.prompt_tokens, fake.behaviour.completion_tokens = 1000, 1000
    one_call = Decimal("0.00075")  # gpt-4o-mini: 1,000 in at 0.15/M + 1,000 out at 0.60/M
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{proxy.url}/costs/campaigns/c1/budget",
                            json={"warning_usd": str(one_call * 2), "limit_usd": str(one_call * 3)}) as r:
            assert r.status == 200
        async with http.get(f"{proxy.url}/costs/events?campaign_id=c1") as response:
            reader = EventReader(response)
            for _ in range(3):
                await _chat(proxy, max_tokens=1000)
            events = await reader.events(5)
            assert [(e.event, e.data.get("budget_status") or e.data["status"]) for e in events] == [
                ("usage", "ok"), ("usage", "warning"), ("budget", "warning"), ("usage", "exceeded"),
                ("budget", "exceeded")]
            budget = events[-1].data
            assert budget == {"campaign_id": "c1", "warning_usd": format_usd(one_call * 2),
                              "limit_usd": format_usd(one_call * 3), "spent_usd": format_usd(one_call * 3),
                              "remaining_usd": "0.00", "status": "exceeded"}
            with pytest.raises(Exception, match="429"):
                await _chat(proxy)
            async with http.get(f"{proxy.url}/costs/campaigns/c1") as r:
                assert (await r.json())["budget"] == {**{k: v for k, v in budget.items()
                                                         if k != "campaign_id"}, "source": "override"}
            async with http.delete(f"{proxy.url}/costs/campaigns/c1/budget") as r:
                assert r.status == 200
            (back,) = await reader.events(1)
            assert back.event == "budget"
            assert back.data == {"campaign_id": "c1", "warning_usd": "1.00", "limit_usd": "5.00",
                                 "spent_usd": format_usd(one_call * 3),
                                 "remaining_usd": format_usd(5 - one_call * 3),
                                 "status": "ok"}


async def test_resume_with_last_event_id_and_resync_outside_the_window(start_proxy, fake):
    proxy = await start_proxy(live_buffer_events=5)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/costs/events") as response:
            reader = EventReader(response)
            await _chat(proxy)
            (first,) = await reader.events(1)
        for session in ("a", "b"):
            await _chat(proxy, session=session)
        async with http.get(f"{proxy.url}/costs/events", headers={"Last-Event-ID": first.id}) as response:
            missed = await EventReader(response).events(2)
        assert [e.data["session_id"] for e in missed] == ["a", "b"]
        assert [e.event for e in missed] == ["usage", "usage"]
        for i in range(6):  # more than the window holds
            await _chat(proxy, session=f"x{i}")
        async with http.get(f"{proxy.url}/costs/events", headers={"Last-Event-ID": first.id}) as response:
            reader = EventReader(response)
            (resync,) = await reader.events(1)
            assert resync.event == "resync" and "window" in resync.data["reason"]
            await _chat(proxy, session="after")
            (after,) = await reader.events(1)
            assert after.data["session_id"] == "after"
        for stale in ("deadbeef-1", "garbage"):  # another process's (or epoch's) id, or none at all
            async with http.get(f"{proxy.url}/costs/events", headers={"Last-Event-ID": stale}) as r:
                assert (await EventReader(r).events(1))[0].event == "resync"


async def test_a_resume_that_missed_more_than_a_queue_gets_all_of_them_then_live_ones(start_proxy, fake):
    proxy = await start_proxy(live_queue_events=3, live_buffer_events=100)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/costs/events") as response:
            reader = EventReader(response)
            await _chat(proxy)
            (first,) = await reader.events(1)
        for i in range(12):  # four queues' worth, all still held by the ring
            await _chat(proxy, session=f"m{i}")
        async with http.get(f"{proxy.url}/costs/events", headers={"Last-Event-ID": first.id}) as response:
            reader = EventReader(response)
            missed = await reader.events(12, kinds=("usage", "resync"))
            await _chat(proxy, session="after")
            (after,) = await reader.events(1, kinds=("usage", "resync"))
    assert [e.data["session_id"] for e in missed] == [f"m{i}" for i in range(12)]
    epoch, n = first.id.rsplit("-", 1)
    assert [e.id for e in missed] == [f"{epoch}-{int(n) + 1 + i}" for i in range(12)]
    assert after.event == "usage" and after.data["session_id"] == "after"


def test_a_backlog_is_sent_in_bounded_writes_in_order():
    frames = [bytes([65 + i % 26]) * 1000 for i in range(200)]
    chunks = list(send_chunks(frames, size=10_000))
    assert b"".join(chunks) == b"".join(frames)
    assert len(chunks) == 20 and all(len(c) <= 10_000 for c in chunks)
    assert list(send_chunks([b"a", b"b"])) == [b"ab"] and list(send_chunks([])) == []


async def test_a_comment_line_keeps_the_stream_alive(start_proxy, fake):
    proxy = await start_proxy(live_heartbeat_seconds=0.1)
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/costs/events") as response:
        assert await response.content.readuntil(b"\n\n") == b"retry: 2000\n\n"
        async with asyncio.timeout(5):
            assert await response.content.readuntil(b"\n\n") == b": keep-alive\n\n"


def _stalled_subscriber(url: str) -> socket.socket:
    """A subscriber that reads nothing: a raw socket with a small receive buffer."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(f"GET /costs/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return sock


def _read_all(sock: socket.socket) -> bytes:
    sock.settimeout(20)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


async def test_a_subscriber_that_reads_nothing_is_dropped_with_resync_and_slows_nothing(start_proxy, fake):
    proxy = await start_proxy(live_queue_events=2000, live_buffer_events=1000,
                              ledger_flush_interval_seconds=0.05)
    feed, meter = proxy.app[FEED], proxy.app[METER]
    stalled = _stalled_subscriber(proxy.url)
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/costs/events") as response:
        reader = EventReader(response)
        await until(lambda: len(feed.subscribers) == 2)
        await _chat(proxy, session="real")  # one real call proves the path
        (real,) = await reader.events(1)
        assert real.data["session_id"] == "real"
        # 5,000 calls through the meter (admission, pricing, ledger, feed) as the handler makes
        # them, while the stalled subscriber reads nothing; the reading one keeps up.
        facts = RequestFacts(model="gpt-4o-mini", stream=False, include_usage=False, prompt_tokens=10,
                             max_output_tokens=10)
        reported = Reported(Usage(10, 0, 10, 0), "gpt-4o-mini", None)
        received: list[Any] = []

        async def read() -> None:
            while len(received) < 5000:
                received.extend(await reader.events(1, kinds=("usage", "resync")))

        reading = asyncio.create_task(read())
        for i in range(5000):
            ticket = (meter.admit_now("c1", "load", Operation.CHAT, facts, None)
                      or await meter.admit("c1", "load", Operation.CHAT, facts, None))
            meter.record(ticket, reported, status=200, streamed=False)
            if i % 10 == 0:
                await asyncio.sleep(0)  # requests interleave with the event loop's other work
            if i % 100 == 99:  # paced so the reading subscriber keeps up on any machine: its
                # stream is written every 50 ms, and a fast one makes 2,000 calls in less
                await until(lambda made=i: len(received) >= made - 500)
        await asyncio.wait_for(reading, 60)
    assert [e.event for e in received] == ["usage"] * 5000
    costs = [Decimal(e.data["campaign_cost_usd"]) for e in received]
    assert costs == sorted(costs) and len(set(costs)) == 5000
    # The stalled subscriber was dropped from the fan-out with a bounded queue: the proxy did
    # not hold 5,000 events for it, and its stream ends with resync.
    assert feed.dropped == 1
    await until(lambda: not feed.subscribers)
    body = await asyncio.to_thread(_read_all, stalled)
    stalled.close()
    assert body.endswith(b"\n\n\r\n0\r\n\r\n")  # the last event, then the stream's proper end
    last_event = body.removesuffix(b"\n\n\r\n0\r\n\r\n").rsplit(b"\n\n", 1)[-1]
    assert b"event: resync" in last_event and b"fell behind" in last_event
    assert body.count(b"event: usage") < 5000
    await proxy.flush()
    assert len(await ledger_rows(proxy.engine)) == 5001


async def test_200_subscribers_at_once_and_503_past_the_cap(start_proxy, fake):
    proxy = await start_proxy(live_max_subscribers=200)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        responses = await asyncio.gather(*(http.get(f"{proxy.url}/costs/events") for _ in range(200)))
        try:
            assert all(r.status == 200 for r in responses)
            async with http.get(f"{proxy.url}/costs/events") as refused:
                assert refused.status == 503
                assert refused.headers["Retry-After"]
                error = (await refused.json())["error"]
                assert error["code"] == "too_many_subscribers" and "LIVE_MAX_SUBSCRIBERS" in error["message"]
            await _chat(proxy)
            events = await asyncio.gather(*(EventReader(r).events(1) for r in responses))
            assert {e[0].id for e in events} == {events[0][0].id}
            assert all(e[0].data["session_id"] == "s1" for e in events)
        finally:
            for r in responses:
                r.close()
    feed = proxy.app[FEED]
    await until(lambda: not feed.subscribers)


async def test_calls_of_another_replica_on_the_same_database_arrive(start_proxy, fake):
    watching = await start_proxy(live_poll_interval_seconds=0.05)
    other = await start_proxy()
    async with aiohttp.ClientSession() as http, http.get(f"{watching.url}/costs/events") as response:
        reader = EventReader(response)
        await _chat(watching, session="here")
        await _chat(other, session="there")
        await _chat(other, session="there")
        events = await reader.events(3, within=15)
    by_session = sorted((e.data["session_id"], e.data["session_cost_usd"], e.data["campaign_cost_usd"])
                        for e in events)
    assert [s for s, _, _ in by_session] == ["here", "there", "there"]
    await other.flush()
    await watching.flush()
    rows = sorted(await ledger_rows(watching.engine), key=lambda r: r.id.int)
    there = [r.cost_usd for r in rows if r.session_id == "there"]
    assert [Decimal(c) for _, c, _ in by_session[1:]] == [there[0], there[0] + there[1]]
    # Exactly three: this replica's own call came once, not again from the ledger.
    await asyncio.sleep(0.3)
    assert reader._buffer.count(b"event: usage") == 0


async def test_the_access_rule_is_the_one_of_costs_with_the_token_also_as_a_query(start_proxy, fake):
    open_proxy = await start_proxy()
    transport = mock.Mock()  # a remote peer, as aiohttp would see it behind a real socket
    transport.get_extra_info.side_effect = lambda name, default=None: (
        ("203.0.113.9", 40000) if name == "peername" else default)
    request = make_mocked_request("GET", "/costs/events", app=open_proxy.app, transport=transport)
    with pytest.raises(ProxyError) as refused:
        check_events_access(request)
    assert refused.value.status == 403 and refused.value.code == "costs_loopback_only"
    for path in ("/", "/page/app.js"):
        request = make_mocked_request("GET", path, app=open_proxy.app, transport=transport)
        response = await page_handler("index.html")(request)
        assert response.status == 403

    proxy = await start_proxy(costs_api_token="s3cret-token")
    async with aiohttp.ClientSession() as http:
        for headers, query, status in (({}, "", 401), ({}, "?token=wrong", 401),
                                       ({"Authorization": "Bearer wrong"}, "", 401),
                                       ({"Authorization": "Bearer s3cret-token"}, "", 200),
                                       ({}, "?token=s3cret-token", 200)):
            async with http.get(f"{proxy.url}/costs/events{query}", headers=headers) as response:
                assert response.status == status, (headers, query)
                if status == 401:
                    assert (await response.json())["error"]["code"] == "invalid_costs_token"
        # The token in the query opens the feed only, not the rest of /costs.
        async with http.get(f"{proxy.url}/costs/campaigns?token=s3cret-token") as response:
            assert response.status == 401
        # With a token the page itself loads (it holds no data) and asks for the token.
        async with http.get(f"{proxy.url}/") as response:
            assert response.status == 200 and "text/html" in response.headers["Content-Type"]
            assert 'id="token-form"' in await response.text()


async def test_an_earlier_background_row_is_not_replayed_as_a_new_call_of_another_replica(
        start_proxy, fake):
    """A background response's final state has an id derived from the response (not made from
    the time), so it must not look like a call of the last seconds to another replica's feed."""
    fake.behaviour.background_polls = 0
    watching = await start_proxy(live_poll_interval_seconds=0.05)
    other = await start_proxy()
    client = other.client(campaign="bg", session="old")
    created = await client.responses.create(model="gpt-4o-mini", input="hi", background=True)
    await client.responses.retrieve(created.id)
    await other.flush()
    async with aiohttp.ClientSession() as http, http.get(f"{watching.url}/costs/events") as response:
        reader = EventReader(response)
        await _chat(other, campaign="bg", session="new")
        [event] = await reader.events(1, within=15)
        await asyncio.sleep(0.5)  # ten more polls
    assert event.data["session_id"] == "new"
    assert reader._buffer.count(b"event: usage") == 0


async def test_another_replicas_calls_carry_the_totals_right_after_them(start_proxy, fake):
    """Replicas A and B on one database take turns in one session (a load balancer); a subscriber
    on A: each of B's events (built from the ledger) carries the campaign's and session's totals
    right after that call, the ledger's running sums in record order, none of A's later calls."""
    a = await start_proxy(live_poll_interval_seconds=1.0)
    b = await start_proxy()
    async with aiohttp.ClientSession() as http, http.get(f"{a.url}/costs/events") as response:
        reader = EventReader(response)
        for _ in range(4):
            await _chat(b, campaign="rep")
            await _chat(a, campaign="rep")
            await asyncio.sleep(0.2)
        events = await reader.events(8, within=15)
    await a.flush()
    await b.flush()
    rows = sorted(await ledger_rows(a.engine), key=lambda r: r.id.int)
    assert len(rows) == 8
    right_after: dict[str, tuple[str, str]] = {}  # B's calls (every other row, from the first)
    total = Decimal(0)
    for index, row in enumerate(rows):
        total += row.cost_usd
        if index % 2 == 0:
            at = row.created_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
            right_after[at] = (format_usd(total), format_usd(total))
    seen = {e.data["at"]: (e.data["campaign_cost_usd"], e.data["session_cost_usd"])
            for e in events if e.data["at"] in right_after}
    assert seen == right_after
