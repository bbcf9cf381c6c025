"""Realtime API over WebSocket through the real proxy: the `openai` SDK's `realtime.connect` and
aiohttp's WebSocket client against the loopback fake upstream's Realtime endpoint.

Frames relayed unchanged both ways, one ledger row per `response.done` at its exact price (audio
tokens at audio prices), the budget asked at the upgrade and before each `response.create`,
client keys kept from the upstream, and both sides' closes passed on without leaving tasks.
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import Proxy, free_port, make_settings
from fakeupstream import realtime_usage
from ledger_check import assert_aggregates_match_ledger, ledger_rows
from prometheus_client import CollectorRegistry

from costing.db import create_engine
from costing.money import to_units
from costing.pricing import PriceTable
from proxy import realtime

HEADERS = {"X-Campaign-Id": "c1", "X-Session-Id": "s1"}
SERVER_KEY = "sk-server-secret-0123"
CLIENT_KEY = "pk-alpha-7f3c9e1b2d4a"


def prices() -> PriceTable:
    return PriceTable.load(default_per_1k_prompt=Decimal("0.00015"),
                           default_per_1k_completion=Decimal("0.0006"))


def expected_cost(model: str, text_in: int = 20, audio_in: int = 30, cached_text: int = 5,
                  cached_audio: int = 10, text_out: int = 7, audio_out: int = 40) -> Decimal:
    """What OpenAI bills for one response, from the price data: each kind at its own price."""
    price = prices().quote(model).price
    assert not prices().quote(model).priced_by_default and price.audio_input is not None
    assert price.audio_output is not None
    dollars = ((text_in - cached_text) * price.input + (cached_text + cached_audio) * price.cached_input
               + (audio_in - cached_audio) * price.audio_input + text_out * price.output
               + audio_out * price.audio_output) / Decimal(1_000_000)
    return dollars.quantize(Decimal("1e-10"))


def socket_url(proxy: Any, model: str = "gpt-realtime") -> str:
    return f"ws://127.0.0.1:{proxy.port}/v1/realtime?model={model}"


async def events_until(ws: aiohttp.ClientWebSocketResponse, kind: str) -> list[dict[str, Any]]:
    seen = []
    while True:
        message = await asyncio.wait_for(ws.receive(), 10)
        assert message.type is aiohttp.WSMsgType.TEXT, message
        event = orjson.loads(message.data)
        seen.append(event)
        if event["type"] == kind:
            return seen


def realtime_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "realtime-upstream" and not t.done()]


async def no_realtime_tasks_left() -> None:
    for _ in range(100):
        if not realtime_tasks():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"tasks left behind: {realtime_tasks()}")


async def test_the_sdks_realtime_connect_works_through_the_proxy_and_each_response_is_a_row(proxy, fake):
    async with proxy.client().realtime.connect(model="gpt-realtime") as connection:
        created = await asyncio.wait_for(connection.recv(), 10)
        assert created.type == "session.created"
        for _ in range(2):
            await connection.response.create()
            async for event in connection:
                if event.type == "response.done":
                    break
    await proxy.flush()
    rows = await ledger_rows(proxy.engine)
    assert len(rows) == 2
    for row in rows:
        assert (row.campaign_id, row.session_id, row.operation) == ("c1", "s1", "realtime")
        assert (row.request_model, row.response_model) == ("gpt-realtime", "gpt-realtime")
        assert (row.input_tokens, row.cached_input_tokens, row.output_tokens) == (50, 15, 47)
        assert (row.audio_input_tokens, row.audio_output_tokens) == (20, 40)
        assert row.cost_usd == expected_cost("gpt-realtime")
        assert row.streamed and not row.estimated and not row.priced_by_default
    assert {row.response_id for row in rows} == {"resp_1", "resp_2"}
    await assert_aggregates_match_ledger(proxy.engine)
    seen = fake.requests[0]
    assert seen.query == "model=gpt-realtime"
    assert "X-Campaign-Id" not in seen.headers and seen.headers["Authorization"] == "Bearer sk-test-key"


@pytest.mark.parametrize("model", ["gpt-4o-realtime-preview-2024-12-17", "gpt-4o-mini-realtime-preview"])
async def test_the_session_model_prices_each_response(proxy, fake, model):
    async with aiohttp.ClientSession() as http, http.ws_connect(
            socket_url(proxy, "gpt-realtime"), headers=HEADERS) as ws:
        await events_until(ws, "session.created")
        await ws.send_str(orjson.dumps({"type": "session.update", "session": {"model": model}}).decode())
        await events_until(ws, "session.updated")
        await ws.send_str('{"type":"response.create"}')
        await events_until(ws, "response.done")
    await proxy.flush()
    [row] = await ledger_rows(proxy.engine)
    assert row.response_model == model and row.cost_usd == expected_cost(model)


async def test_frames_are_relayed_unchanged_both_ways_and_recorded_before_the_done_goes_out(proxy, fake):
    sent_text = ['{"type":"conversation.item.create",  "item": {"text":"Le dragon \\u00e9veill\\u00e9 🐉"}}',
                 '{ "type" : "input_audio_buffer.append", "audio": "AAAA" }']
    sent_binary = [bytes(range(256)), b"\x00" * 70_000]
    received: list[str | bytes] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(socket_url(proxy), headers=HEADERS,
                                                                  max_msg_size=0) as ws:
        for text in sent_text:
            await ws.send_str(text)
        for blob in sent_binary:
            await ws.send_bytes(blob)
        await ws.send_str('{"type":"response.create"}')
        while True:
            message = await asyncio.wait_for(ws.receive(), 10)
            received.append(message.data)
            if message.type is aiohttp.WSMsgType.TEXT and '"response.done"' in message.data:
                # Spooled before it was relayed: the campaign's spend counts it already.
                assert proxy.gate.views["c1"].total_spent == to_units(expected_cost("gpt-realtime"))
                break
    assert fake.realtime_received[:4] == [*sent_text, *sent_binary]
    assert received == fake.realtime_sent
    assert sum(isinstance(frame, bytes) for frame in received) == 2
    await no_realtime_tasks_left()


async def test_a_campaign_at_its_limit_is_refused_429_before_the_upgrade(proxy, fake):
    async with aiohttp.ClientSession() as http:
        put = await http.put(f"{proxy.url}/costs/campaigns/c1/budget",
                             json={"warning_usd": "0", "limit_usd": "0"})
        assert put.status == 200
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await http.ws_connect(socket_url(proxy), headers=HEADERS)
        assert caught.value.status == 429
        async with http.get(f"{proxy.url}/v1/realtime?model=gpt-realtime", headers={
                **HEADERS, "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as response:
            assert response.status == 429 and response.headers["x-should-retry"] == "false"
            assert (await response.json())["error"]["code"] == "budget_exceeded"
    assert fake.requests == []


async def test_past_the_limit_mid_session_a_response_create_gets_an_error_event_and_the_socket_stays(
        proxy, fake):
    async with aiohttp.ClientSession() as http:
        limit = str(expected_cost("gpt-realtime") / 2)
        put = await http.put(f"{proxy.url}/costs/campaigns/c1/budget",
                             json={"warning_usd": "0", "limit_usd": limit})
        assert put.status == 200
        async with http.ws_connect(socket_url(proxy), headers=HEADERS) as ws:
            await events_until(ws, "session.created")
            await ws.send_str('{"type":"response.create"}')
            await events_until(ws, "response.done")  # admitted under the limit, billed past it
            await ws.send_str('{"type":"response.create","event_id":"evt_2"}')
            [error] = await events_until(ws, "error")
            assert error["error"]["code"] == "budget_exceeded"
            assert error["error"]["event_id"] == "evt_2" and "c1" in error["error"]["message"]
            await ws.send_str('{"type":"session.update","session":{}}')  # still open, still relayed
            await events_until(ws, "session.updated")
    creates = [f for f in fake.realtime_received if isinstance(f, str) and "response.create" in f]
    assert len(creates) == 1
    await proxy.flush()
    assert len(await ledger_rows(proxy.engine)) == 1


ESCAPED_CREATES: list[str | bytes] = [
    '{"type":"response\\u002ecreate","event_id":"evt_dot"}',
    '{"type":"\\u0072esponse.create","event_id":"evt_r"}',
    '{"type":"response.creat\\u0065","event_id":"evt_e","response":{"instructions":"a\\/b"}}',
    '{"\\u0074ype":"response.create","event_id":"evt_key"}',
    b'{"type":"response.create","event_id":"evt_binary"}',
    b'{"type":"response\\u002ecreate","event_id":"evt_binary_escaped"}',
    '\ufeff{"type":"response\\u002ecreate"}',  # no JSON orjson reads: a laxer parser might
]


async def test_at_the_limit_a_response_create_in_any_encoding_is_refused(proxy, fake):
    """JSON escapes spell `response.create` without its plain text, and a binary frame may hold
    the same event: each is refused at the limit, and never reaches the upstream."""
    async with aiohttp.ClientSession() as http, http.ws_connect(socket_url(proxy), headers=HEADERS) as ws:
        await events_until(ws, "session.created")
        put = await http.put(f"{proxy.url}/costs/campaigns/c1/budget",
                             json={"warning_usd": "0", "limit_usd": "0"})
        assert put.status == 200
        for frame in ESCAPED_CREATES:
            await (ws.send_str(frame) if isinstance(frame, str) else ws.send_bytes(frame))
        # Escapes in other events cost a decode, nothing more: relayed unchanged.
        update = '{"type":"session.update","session":{"instructions":"line\\none \\u00e9"}}'
        await ws.send_str(update)
        events = await events_until(ws, "session.updated")
    errors = [e["error"] for e in events if e["type"] == "error"]
    assert [e["code"] for e in errors] == ["budget_exceeded"] * len(ESCAPED_CREATES)
    assert [e["event_id"] for e in errors] == ["evt_dot", "evt_r", "evt_e", "evt_key", "evt_binary",
                                               "evt_binary_escaped", None]
    assert fake.realtime_received == [update]
    assert not [e for e in events if e["type"].startswith("response.")]


async def test_under_the_limit_escaped_and_binary_frames_go_on_unchanged(proxy, fake):
    async with aiohttp.ClientSession() as http, http.ws_connect(socket_url(proxy), headers=HEADERS) as ws:
        await events_until(ws, "session.created")
        await ws.send_str(ESCAPED_CREATES[0])
        await events_until(ws, "response.done")
        await ws.send_bytes(ESCAPED_CREATES[4])
        await asyncio.wait_for(ws.receive(), 10)  # the fake echoes binary frames
    assert fake.realtime_received == ESCAPED_CREATES[0:1] + ESCAPED_CREATES[4:5]


async def test_a_response_the_upstream_starts_at_the_limit_is_cancelled(proxy, fake):
    """Server VAD: the upstream starts responses by itself; at the limit they are cancelled."""
    hold = fake.behaviour.realtime_hold = asyncio.Event()
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(socket_url(proxy), headers=HEADERS) as ws:
            await events_until(ws, "session.created")
            await ws.send_str('{"type":"response.create"}')  # admitted: the campaign is under it
            await events_until(ws, "response.created")
            put = await http.put(f"{proxy.url}/costs/campaigns/c1/budget",
                                 json={"warning_usd": "0", "limit_usd": "0"})
            assert put.status == 200
            hold.set()
            await events_until(ws, "response.done")
            fake.behaviour.realtime_hold = asyncio.Event()
            # As server VAD would: the upstream starts a response the client never asked for.
            await ws.send_str('{"type":"fake.vad"}')
            events = await events_until(ws, "response.done")
    assert [e["error"]["code"] for e in events if e["type"] == "error"] == ["budget_exceeded"]
    assert events[-1]["response"]["status"] == "cancelled"
    assert any(isinstance(f, str) and '"response.cancel"' in f for f in fake.realtime_received)


async def test_the_client_key_never_reaches_the_upstream(start_proxy, fake):
    proxy = await start_proxy(proxy_api_keys=CLIENT_KEY, openai_api_key=SERVER_KEY)
    protocols = ("realtime", f"openai-insecure-api-key.{CLIENT_KEY}", "openai-beta.realtime-v1")
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(socket_url(proxy), headers={
                **HEADERS, "Authorization": f"Bearer {CLIENT_KEY}"}) as ws:
            await events_until(ws, "session.created")
        async with http.ws_connect(socket_url(proxy), headers=HEADERS, protocols=protocols) as ws:
            assert ws.protocol == "realtime"  # a browser: the key in a subprotocol
            await events_until(ws, "session.created")
        for bad in ((f"openai-insecure-api-key.{CLIENT_KEY}x",), ()):
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                await http.ws_connect(socket_url(proxy), headers=HEADERS, protocols=bad)
            assert caught.value.status == 401
    assert len(fake.requests) == 2
    for seen in fake.requests:
        assert seen.headers["Authorization"] == f"Bearer {SERVER_KEY}"
        assert CLIENT_KEY not in str(seen.headers)
    assert "openai-beta.realtime-v1" in fake.requests[1].headers["Sec-WebSocket-Protocol"]


async def test_without_proxy_keys_a_browsers_key_goes_upstream_as_sent(start_proxy, fake):
    proxy = await start_proxy(openai_api_key=SERVER_KEY)
    protocols = ("realtime", "openai-insecure-api-key.sk-user-key")
    async with aiohttp.ClientSession() as http, http.ws_connect(
            socket_url(proxy), headers=HEADERS, protocols=protocols) as ws:
        await events_until(ws, "session.created")
    [seen] = fake.requests
    assert "openai-insecure-api-key.sk-user-key" in seen.headers["Sec-WebSocket-Protocol"]
    assert "Authorization" not in seen.headers  # the client's own key, not the server's beside it


async def test_a_client_leaving_mid_response_cancels_it_and_its_usage_is_recorded(proxy, fake):
    fake.behaviour.realtime_hold = asyncio.Event()
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(socket_url(proxy), headers=HEADERS)
        await events_until(ws, "session.created")
        await ws.send_str('{"type":"response.create"}')
        await events_until(ws, "response.output_text.delta")
        await ws.close(code=4001, message=b"table closed")
    await asyncio.wait_for(fake.realtime_closed.wait(), 10)
    assert any(isinstance(f, str) and '"response.cancel"' in f for f in fake.realtime_received)
    assert fake.realtime_closes == [(4001, "table closed")]
    await no_realtime_tasks_left()
    await proxy.flush()
    [row] = await ledger_rows(proxy.engine)
    assert (row.input_tokens, row.output_tokens, row.response_id) == (3, 1, "resp_1")
    assert row.cost_usd == expected_cost("gpt-realtime", text_in=3, audio_in=0, cached_text=0,
                                         cached_audio=0, text_out=1, audio_out=0)


async def test_the_upstream_closing_closes_the_client_with_its_code(proxy, fake):
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(socket_url(proxy), headers=HEADERS)
        await events_until(ws, "session.created")
        await ws.send_str('{"type":"response.create"}')
        await events_until(ws, "response.done")
        await ws.send_str('{"type":"fake.close","code":4000,"reason":"session expired"}')
        message = await asyncio.wait_for(ws.receive(), 10)
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert (message.data, message.extra) == (4000, "session expired")
        await ws.close()
    await no_realtime_tasks_left()
    await proxy.flush()
    assert len(await ledger_rows(proxy.engine)) == 1


async def test_an_upstream_that_stops_reading_ends_the_relay(proxy, fake, monkeypatch):
    """Sends to it block: past SEND_SECONDS its connection is dropped and the client closed with
    1011, though the client, blocked too, never sends a close of its own."""
    monkeypatch.setattr(realtime, "SEND_SECONDS", 0.5)
    stall = fake.behaviour.realtime_stall = asyncio.Event()
    append = orjson.dumps({"type": "input_audio_buffer.append", "audio": "A" * 256 * 1024}).decode()

    async def pump(ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            await ws.send_str(append)

    try:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(socket_url(proxy), headers=HEADERS)
            await events_until(ws, "session.created")
            sending = asyncio.create_task(pump(ws))
            message = await asyncio.wait_for(ws.receive(), 20)
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
            assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, 1011)
            await no_realtime_tasks_left()
    finally:
        stall.set()


async def until_closed(ws: aiohttp.ClientWebSocketResponse) -> tuple[list[dict[str, Any]], aiohttp.WSMessage]:
    """The events received, then the message that ended the socket."""
    events = []
    while True:
        message = await ws.receive()
        if message.type is not aiohttp.WSMsgType.TEXT:
            return events, message
        events.append(orjson.loads(message.data))


async def test_a_shutdown_records_running_responses_and_closes_sockets_with_1001(database_url, fake):
    """Stopping the app: the response running is cancelled and its usage recorded, both sockets
    closed with 1001 (going away) at once, not when the shutdown timeout cuts them (1006)."""
    settings = make_settings(database_url=database_url, upstream_base_url=fake.url,
                             proxy_port=free_port(), shutdown_timeout_seconds=10)
    proxy = Proxy(settings, CollectorRegistry())
    await proxy.start()
    fake.behaviour.realtime_hold = asyncio.Event()
    async with aiohttp.ClientSession() as http:
        idle = await http.ws_connect(socket_url(proxy), headers=HEADERS)
        busy = await http.ws_connect(socket_url(proxy), headers=HEADERS)
        await events_until(idle, "session.created")
        await events_until(busy, "session.created")
        await busy.send_str('{"type":"response.create"}')
        await events_until(busy, "response.output_text.delta")
        started = time.monotonic()
        stopping = asyncio.create_task(proxy.stop())
        (_, idle_end), (events, busy_end) = await asyncio.wait_for(
            asyncio.gather(until_closed(idle), until_closed(busy)), 20)
        elapsed = time.monotonic() - started
        await asyncio.wait_for(stopping, 20)
    assert (idle_end.type, idle_end.data) == (aiohttp.WSMsgType.CLOSE, 1001)
    assert (busy_end.type, busy_end.data) == (aiohttp.WSMsgType.CLOSE, 1001)
    assert elapsed < 3, elapsed  # the runner's shutdown timeout is 5 s, the settings' 10 s
    assert events[-1]["type"] == "response.done" and events[-1]["response"]["status"] == "cancelled"
    assert sorted(fake.realtime_closes) == [(1001, ""), (1001, "")]
    assert not realtime_tasks()
    engine = create_engine(settings.database)
    try:
        [row] = await ledger_rows(engine)
    finally:
        await engine.dispose()
    assert (row.response_id, row.input_tokens, row.output_tokens) == ("resp_1", 3, 1)


def test_realtime_usage_counts_cached_audio_once():
    from costing.usage import realtime_usage as parse

    usage = parse(realtime_usage())
    assert usage is not None
    assert (usage.input_tokens, usage.cached_input_tokens, usage.audio_input_tokens) == (50, 15, 20)
    assert (usage.output_tokens, usage.audio_output_tokens) == (47, 40)
    assert usage.cached_audio_input_tokens == 10  # part of the cached 15
    assert parse(None) is None


async def test_each_response_done_is_a_span_in_the_callers_trace(start_proxy, fake):
    from otlpreceiver import OTLPReceiver

    trace, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with OTLPReceiver() as receiver:
        proxy = await start_proxy(otel_exporter_otlp_endpoint=receiver.url, otel_bsp_schedule_delay=20)
        async with aiohttp.ClientSession() as http, http.ws_connect(socket_url(proxy), headers={
                **HEADERS, "traceparent": f"00-{trace}-{parent}-01"}) as ws:
            for _ in range(2):
                await ws.send_str('{"type":"response.create"}')
                await events_until(ws, "response.done")
        spans = await receiver.wait_for(2)
    assert "traceparent" not in fake.requests[0].headers  # the caller's never goes upstream
    for got in spans:
        assert got.span.name == "chat gpt-realtime"
        assert (got.span.trace_id.hex(), got.span.parent_span_id.hex()) == (trace, parent)
        attrs = got.attributes
        assert attrs["openai.api.type"] == "realtime"
        assert attrs["gen_ai.response.finish_reasons"] == ["completed"]
        assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"]) == (50, 47)
        assert attrs["llm_proxy.cost.usd"] == pytest.approx(float(expected_cost("gpt-realtime")))
    assert {got.attributes["gen_ai.response.id"] for got in spans} == {"resp_1", "resp_2"}


async def test_refusals_at_the_upgrade_and_in_the_socket_are_spans_too(start_proxy, fake):
    from otlpreceiver import OTLPReceiver

    async with OTLPReceiver() as receiver, aiohttp.ClientSession() as http:
        proxy = await start_proxy(otel_exporter_otlp_endpoint=receiver.url, otel_bsp_schedule_delay=20)
        limit = str(expected_cost("gpt-realtime") / 2)
        await http.put(f"{proxy.url}/costs/campaigns/c1/budget",
                       json={"warning_usd": "0", "limit_usd": limit})
        async with http.ws_connect(socket_url(proxy), headers=HEADERS) as ws:
            await ws.send_str('{"type":"response.create"}')
            await events_until(ws, "response.done")  # billed past the limit
            await ws.send_str('{"type":"response.create"}')
            await events_until(ws, "error")  # refused in the socket
        with pytest.raises(aiohttp.WSServerHandshakeError):  # refused at the upgrade
            await http.ws_connect(socket_url(proxy), headers=HEADERS)
        spans = await receiver.wait_for(3)
    refused = [got for got in spans if got.attributes.get("error.type") == "budget_exceeded"]
    assert len(refused) == 2
    for got in refused:
        assert got.span.name == "chat gpt-realtime"
        assert got.attributes["http.response.status_code"] == 429
        assert got.attributes["llm_proxy.campaign.id"] == "c1"


async def test_a_ledger_that_cannot_take_records_refuses_a_response_and_the_socket_stays(
        start_proxy, fake):
    """Fail-closed with a failing ledger, a `response.create` is refused with an error event, as
    an HTTP call gets its 503; the socket is not torn down."""
    proxy = await start_proxy(budget_fail_closed=True)
    async with aiohttp.ClientSession() as http, http.ws_connect(socket_url(proxy), headers=HEADERS) as ws:
        await events_until(ws, "session.created")
        proxy.ledger.healthy = False  # as after a failed write
        try:
            await ws.send_str('{"type":"response.create","event_id":"evt_1"}')
            [error] = await events_until(ws, "error")
            assert error["error"]["code"] == "cost_ledger_unavailable"
            assert error["error"]["event_id"] == "evt_1"
        finally:
            proxy.ledger.healthy = True
        await ws.send_str('{"type":"response.create"}')  # the socket still works
        await events_until(ws, "response.done")
    creates = [f for f in fake.realtime_received if isinstance(f, str) and "response.create" in f]
    assert len(creates) == 1


async def _costs_and_metrics_equal_the_ledger(proxy: Any, campaign: str = "c1") -> None:
    """/costs and /metrics of the campaign: its cost and token kinds, as the ledger sums them."""
    from test_metrics import _scrape

    rows = [r for r in await ledger_rows(proxy.engine) if r.campaign_id == campaign]
    url = f"{proxy.url}/costs/campaigns/{campaign}"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        body = await response.json()
    assert Decimal(body["cost_usd"]) == sum(r.cost_usd for r in rows)
    samples = await _scrape(proxy)
    cost = sum(v for (n, labels), v in samples.items()
               if n == "llm_cost_usd_total" and ("campaign", campaign) in labels)
    assert cost == pytest.approx(float(sum(r.cost_usd for r in rows)), rel=1e-12)
    for kind in body["tokens"]:
        column = {"input": "input_tokens", "output": "output_tokens", "reasoning": "reasoning_tokens"}.get(
            kind, f"{kind}_tokens")
        stored = sum(getattr(r, column) for r in rows)
        assert body["tokens"][kind] == stored, kind
        assert sum(v for (n, labels), v in samples.items() if n == "llm_tokens_total"
                   and ("campaign", campaign) in labels and ("type", kind) in labels) == stored, kind
    by_operation = {op: sum(v for (n, labels), v in samples.items() if n == "llm_requests_total"
                            and ("campaign", campaign) in labels and ("operation", op) in labels)
                    for op in {r.operation for r in rows}}
    assert by_operation == {op: sum(1 for r in rows if r.operation == op) for op in by_operation}


def transcription_cost(model: str, text_in: int = 4, audio_in: int = 120, text_out: int = 25) -> Decimal:
    """What genai-prices itself charges for a transcription's tokens (audio in, text out)."""
    import genai_prices

    usage = genai_prices.Usage(input_tokens=text_in + audio_in, input_audio_tokens=audio_in,
                               output_tokens=text_out)
    price = genai_prices.calc_price(usage, model, provider_id="openai").total_price
    return price.quantize(Decimal("1e-10"))


@pytest.mark.parametrize(("model", "echoed"), [("gpt-4o-transcribe", True), ("gpt-4o-mini-transcribe", True),
                                               ("gpt-4o-mini-transcribe", False)])
async def test_an_input_audio_transcription_is_a_row_at_the_transcription_models_price(proxy, fake, model,
                                                                                       echoed):
    """Its own usage, its own model (the server's echo of the session, else the client's
    session.update), spooled before its event is relayed; /costs and /metrics count it."""
    fake.behaviour.realtime_echo_transcription = echoed
    expected = transcription_cost(model)
    assert expected == (4 * prices().quote(model).price.input + 120 * prices().quote(model).price.audio_input
                        + 25 * prices().quote(model).price.output) / Decimal(1_000_000)
    async with aiohttp.ClientSession() as http, http.ws_connect(socket_url(proxy), headers=HEADERS) as ws:
        await events_until(ws, "session.created")
        await ws.send_str(orjson.dumps({"type": "session.update", "session": {
            "input_audio_transcription": {"model": model}}}).decode())
        [*_, updated] = await events_until(ws, "session.updated")
        assert ("input_audio_transcription" in updated["session"]) is echoed
        await ws.send_str('{"type":"input_audio_buffer.append","audio":"AAAA"}')
        await ws.send_str('{"type":"input_audio_buffer.commit"}')
        await events_until(ws, "conversation.item.input_audio_transcription.completed")
        assert proxy.gate.views["c1"].total_spent == to_units(expected)  # spooled before relayed
        await ws.send_str('{"type":"response.create"}')
        await events_until(ws, "response.done")
    await proxy.flush()
    rows = await ledger_rows(proxy.engine)
    [heard] = [r for r in rows if r.operation == "realtime.transcription"]
    [answered] = [r for r in rows if r.operation == "realtime"]
    assert (heard.response_model, heard.response_id, heard.campaign_id, heard.session_id) == (
        model, "item_1", "c1", "s1")
    assert (heard.input_tokens, heard.audio_input_tokens, heard.output_tokens) == (124, 120, 25)
    assert heard.cost_usd == expected and not heard.priced_by_default and heard.streamed
    assert answered.cost_usd == expected_cost("gpt-realtime")
    await assert_aggregates_match_ledger(proxy.engine)
    await _costs_and_metrics_equal_the_ledger(proxy)


async def test_a_whisper_transcription_is_a_row_at_cost_0_priced_by_default(proxy, fake):
    """whisper-1 reports a duration and is billed per minute, which no token price covers."""
    async with aiohttp.ClientSession() as http, http.ws_connect(socket_url(proxy), headers=HEADERS) as ws:
        await events_until(ws, "session.created")
        await ws.send_str(orjson.dumps({"type": "session.update", "session": {
            "input_audio_transcription": {"model": "whisper-1"}}}).decode())
        await events_until(ws, "session.updated")
        await ws.send_str('{"type":"input_audio_buffer.commit"}')
        [*_, done] = await events_until(ws, "conversation.item.input_audio_transcription.completed")
        assert done["usage"] == {"type": "duration", "seconds": 2.4}
    await proxy.flush()
    [row] = await ledger_rows(proxy.engine)
    assert (row.operation, row.response_model, row.cost_usd, row.priced_by_default) == (
        "realtime.transcription", "whisper-1", 0, True)
    assert (row.input_tokens, row.output_tokens) == (0, 0)


async def test_without_transcription_a_commit_is_no_row(proxy, fake):
    async with aiohttp.ClientSession() as http, http.ws_connect(socket_url(proxy), headers=HEADERS) as ws:
        await events_until(ws, "session.created")
        await ws.send_str('{"type":"input_audio_buffer.commit"}')
        await events_until(ws, "input_audio_buffer.committed")
    await proxy.flush()
    assert await ledger_rows(proxy.engine) == []


def test_a_transcriptions_usage_is_audio_in_and_text_out():
    from fakeupstream import transcription_usage

    from costing.usage import transcription_usage as parse

    usage = parse(transcription_usage())
    assert usage is not None
    assert (usage.input_tokens, usage.audio_input_tokens, usage.cached_input_tokens, usage.output_tokens) == (
        124, 120, 0, 25)
    assert parse({"type": "duration", "seconds": 3.2}) == parse({})
    assert parse(None) is None


async def test_cached_audio_is_priced_at_the_cached_audio_price(proxy, fake):
    """gpt-realtime-mini: cached audio $0.30 per 1M, cached text $0.06; the row keeps the split
    (cached_audio_input_tokens), so its cost is recomputed from it, as /costs and /metrics count it."""
    import genai_prices

    fake.behaviour.realtime_usage = realtime_usage(cached_audio=1000, audio_in=3000)
    async with aiohttp.ClientSession() as http, http.ws_connect(
            socket_url(proxy, "gpt-realtime-mini"), headers=HEADERS) as ws:
        await events_until(ws, "session.created")
        await ws.send_str('{"type":"response.create"}')
        await events_until(ws, "response.done")
    await proxy.flush()
    [row] = await ledger_rows(proxy.engine)
    assert (row.input_tokens, row.cached_input_tokens, row.cached_audio_input_tokens,
            row.audio_input_tokens) == (3020, 1005, 1000, 2000)
    library = genai_prices.calc_price(genai_prices.Usage(
        input_tokens=3020, cache_read_tokens=1005, cache_audio_read_tokens=1000, input_audio_tokens=3000,
        output_tokens=47, output_audio_tokens=40), "gpt-realtime-mini", provider_id="openai").total_price
    assert row.cost_usd == library.quantize(Decimal("1e-10"))
    price = prices().quote("gpt-realtime-mini").price
    assert row.cost_usd == (15 * price.input + 5 * price.cached_input + 1000 * Decimal("0.30")
                            + 2000 * price.audio_input + 7 * price.output + 40 * price.audio_output
                            ) / Decimal(1_000_000)
    await assert_aggregates_match_ledger(proxy.engine)
    await _costs_and_metrics_equal_the_ledger(proxy)
