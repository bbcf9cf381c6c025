"""Upstream faults, client faults and hostile requests: the client always gets a clean error or a
cleanly ended stream, usage that was consumed is in the ledger, and the proxy keeps serving.

Faults already covered in tests/proxy/test_forwarding.py (not repeated here): upstream error
statuses passed through verbatim (one request each), unreachable upstream (502), a slow upstream
before the headers (504), a chat stream cut mid-way with and without a half-written SSE line, a
client that stops reading a stream (record only). Here: resets before the answer, truncated and
stalled JSON bodies, stalled streams (read timeout), streams that end without usage, cuts in the
other streamed operations, 5xx storms, the upstream side of a client disconnect, connect timeouts,
request smuggling, header and body limits, paths outside /v1/, and API keys in logs/ledger/metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from ledger_check import assert_aggregates_match_ledger, ledger_rows
from sqlalchemy import inspect, text

CHAT: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
TAGS = {"X-Campaign-Id": "c1", "X-Session-Id": "s1"}
CLOSE = b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
# The HTTP edge does not touch the database: one backend is enough for those tests.
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])


def assert_error_shape(body: Any, code: str | None = None) -> dict[str, Any]:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)
    if code is not None:
        assert error["code"] == code, error
    return dict(error)


async def still_serves(proxy: Any, fake: Any) -> None:
    """A normal call goes through after the fault (and the fault knobs are reset first)."""
    fake.behaviour = type(fake.behaviour)()
    completion = await proxy.client(campaign="after", session="s").chat.completions.create(**CHAT)
    assert completion.choices[0].message.content == fake.behaviour.reply


async def read_stream(url: str, body: dict[str, Any],
                      headers: dict[str, str] | None = None) -> tuple[bytes, BaseException | None]:
    """Read a streamed answer to its end; returns what arrived and the error that ended it, if any."""
    received = b""
    error: BaseException | None = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.post(url, json=body, headers=headers or TAGS) as response:
            assert response.status == 200
            try:
                async for chunk in response.content.iter_any():
                    received += chunk
            except aiohttp.ClientPayloadError as exc:
                error = exc
    return received, error


async def raw_http(port: int, data: bytes, wait: float = 5) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read one HTTP response (status, headers, body) or what arrived before close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), wait)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        fields = (line.partition(":") for line in lines[1:] if line)
        headers = {k.strip().lower(): v.strip() for k, _, v in fields}
        if "content-length" in headers:
            body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), wait)
        else:  # (requests send Connection: close when the answer may have no length)
            body = await asyncio.wait_for(reader.read(), wait)
        return status, headers, body
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


# -- upstream faults on non-streamed answers ------------------------------------------------------


async def test_connection_reset_before_the_answer_is_a_502_recorded_at_zero_cost(proxy, fake):
    fake.behaviour.reset_before_response = True
    with pytest.raises(openai.InternalServerError) as caught:
        await proxy.client().chat.completions.create(**CHAT)
    assert caught.value.status_code == 502
    assert_error_shape(caught.value.response.json(), "upstream_unreachable")
    await still_serves(proxy, fake)
    await proxy.flush()
    rows = await ledger_rows(proxy.engine)
    assert (rows[0].campaign_id, rows[0].status_code, rows[0].cost_usd) == ("c1", 502, 0)
    assert len(rows) == 2
    await assert_aggregates_match_ledger(proxy.engine)


async def test_a_client_that_hangs_up_before_the_answer_is_recorded_at_its_estimate(proxy, fake):
    """The upstream did nothing wrong: the record says the client left (nginx's 499). OpenAI bills
    the work it did, so the call is recorded at the request's estimate (its prompt), flagged
    `estimated`, never at $0 (the SDKs' retry-on-timeout would multiply unrecorded calls)."""
    fake.behaviour.hold = asyncio.Event()
    try:
        async with aiohttp.ClientSession() as http:
            call = asyncio.create_task(http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                                                 headers=TAGS))
            # The client gives up once the call is on its way upstream (a fixed client timeout
            # could end before a busy proxy had even admitted it: then there is no call to record).
            deadline = time.monotonic() + 10
            while not fake.hits("/chat/completions"):
                assert time.monotonic() < deadline, "the call never reached the upstream"
                await asyncio.sleep(0.01)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        await proxy.flush(within=15)
    finally:
        fake.behaviour.hold.set()
    [row] = await ledger_rows(proxy.engine)
    assert (row.campaign_id, row.status_code, row.estimated) == ("c1", 499, True)
    assert row.input_tokens > 0 and row.output_tokens == 0 and row.cost_usd > 0
    await assert_aggregates_match_ledger(proxy.engine)


async def test_each_sdk_retry_after_a_timeout_is_its_own_estimated_row(proxy, fake):
    """The openai SDK times out on a slow answer and retries: OpenAI bills each attempt's prompt,
    so each attempt is a row at its estimate, cost above zero."""
    fake.behaviour.delay = 3.0
    client = proxy.client(timeout=0.4, max_retries=2)
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model="gpt-4o-mini",
                                             messages=[{"role": "user", "content": "hi " * 50}])
    await proxy.flush(within=15)
    rows = await ledger_rows(proxy.engine)
    assert len(rows) == 3
    assert all(r.status_code == 499 and r.estimated and r.cost_usd > 0 for r in rows)
    assert len({r.cost_usd for r in rows}) == 1  # the same prompt, the same estimate
    await assert_aggregates_match_ledger(proxy.engine)


async def test_a_json_answer_cut_off_halfway_is_a_clean_502_recorded_at_its_estimate(proxy, fake):
    """The upstream answered 200, so it did the work and OpenAI bills it; the proxy could not read
    the answer (a 502 for the client). Recorded as a client that left is: at the request's
    estimate, flagged `estimated`, with the status the client got."""
    fake.behaviour.truncate_body = True
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT, headers=TAGS) as response:
            assert response.status == 502
            assert_error_shape(await response.json(), "upstream_incomplete")
            charged = response.headers.get("X-Request-Cost-USD")  # the error says what it cost
            campaign = response.headers.get("X-Campaign-Cost-USD")
    await still_serves(proxy, fake)
    await proxy.flush()
    first, _ = await ledger_rows(proxy.engine)
    assert (first.status_code, first.estimated) == (502, True)
    assert first.input_tokens > 0 and first.output_tokens == 0 and first.cost_usd > 0
    assert charged is not None and Decimal(charged) == first.cost_usd == Decimal(campaign or "")
    await assert_aggregates_match_ledger(proxy.engine)


async def test_an_answer_slower_than_the_read_timeout_is_a_504_per_attempt_at_its_estimate(
        start_proxy, fake):
    """The proxy stops waiting after UPSTREAM_READ_TIMEOUT_SECONDS, as a client that leaves would:
    the upstream has the call and bills it, and the SDK retries the 504. Each attempt is a row at
    its estimate with the status the client got, never $0."""
    proxy = await start_proxy(upstream_read_timeout_seconds=0.3)
    fake.behaviour.delay = 2.0
    with pytest.raises(openai.APIStatusError) as caught:
        await proxy.client(max_retries=2).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi " * 50}])
    assert caught.value.status_code == 504
    assert_error_shape(caught.value.response.json(), "upstream_timeout")
    assert fake.hits("/chat/completions") == 3
    await proxy.flush(within=15)
    rows = await ledger_rows(proxy.engine)
    assert len(rows) == 3
    assert all(r.status_code == 504 and r.estimated and r.input_tokens > 0 and r.cost_usd > 0
               for r in rows)
    assert len({r.cost_usd for r in rows}) == 1  # the same prompt, the same estimate
    await assert_aggregates_match_ledger(proxy.engine)


async def test_an_upstream_stalling_after_its_headers_times_out_cleanly(start_proxy, fake):
    proxy = await start_proxy(upstream_read_timeout_seconds=0.3)
    fake.behaviour.body_stall = 2.0
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT, headers=TAGS) as response:
            # The answer had begun (headers) when the upstream went silent: a gateway error either
            # way, in the error shape, well before the upstream would have finished.
            assert response.status in (502, 504)
            assert_error_shape(await response.json())
    assert time.monotonic() - started < 1.8
    await still_serves(proxy, fake)
    await proxy.flush()
    first, _ = await ledger_rows(proxy.engine)  # the upstream answered 200: billed, estimated
    assert first.status_code in (502, 504) and first.estimated and first.cost_usd > 0


async def test_a_5xx_storm_passes_through_records_every_call_and_leaves_nothing_in_flight(proxy, fake):
    fake.behaviour.status = 503
    clients = [proxy.client(campaign="storm", session=f"s{i}") for i in range(6)]

    async def call(i: int) -> int:
        try:
            await clients[i % 6].chat.completions.create(**CHAT, stream=i % 2 == 0)
        except openai.APIStatusError as exc:
            assert exc.response.json()["error"]["message"] == "fake error 503"
            return exc.status_code
        return 200

    statuses = await asyncio.gather(*(call(i) for i in range(60)))
    assert statuses == [503] * 60
    await still_serves(proxy, fake)
    await proxy.flush()
    rows = await ledger_rows(proxy.engine)
    storm = [r for r in rows if r.campaign_id == "storm"]
    assert len(storm) == 60 and {(r.status_code, r.cost_usd) for r in storm} == {(503, 0)}
    assert proxy.gate.in_flight_requests == 0
    totals = await assert_aggregates_match_ledger(proxy.engine)
    assert totals["storm"][:2] == (0, 60)


async def test_a_slow_upstream_does_not_hold_up_other_routes(proxy, fake):
    fake.behaviour.delay = 1.5
    slow = asyncio.create_task(proxy.client().chat.completions.create(**CHAT))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        for path in ("/healthz", "/readyz", "/metrics", "/costs/campaigns"):
            async with http.get(f"{proxy.url}{path}") as response:
                assert response.status == 200, path
    assert time.monotonic() - started < 1.0
    assert not slow.done()
    assert (await slow).choices[0].message.content == fake.behaviour.reply


async def test_connect_timeout_is_a_clean_504(start_proxy, fake):
    """An upstream whose listen queue is full never completes the TCP handshake."""
    with _black_hole() as port:
        proxy = await start_proxy(upstream_base_url=f"http://127.0.0.1:{port}",
                                  upstream_connect_timeout_seconds=0.3)
        started = time.monotonic()
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT, headers=TAGS) as response:
                assert response.status == 504
                assert_error_shape(await response.json(), "upstream_timeout")
        assert time.monotonic() - started < 2.5
        await proxy.flush()
        [row] = await ledger_rows(proxy.engine)  # the call never reached the upstream: not billed
        assert (row.status_code, row.cost_usd, row.estimated) == (504, 0, False)


@contextlib.contextmanager
def _black_hole() -> Iterator[int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):  # fill the accept queue; later SYNs are dropped
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", port))
        except TimeoutError:
            pass
        else:
            pytest.skip("this kernel completes handshakes beyond the listen backlog")
        finally:
            probe.close()
        yield port
    finally:
        for filler in fillers:
            filler.close()
        server.close()


# -- upstream faults on streams -------------------------------------------------------------------


async def test_a_stream_stalling_past_the_read_timeout_is_cut_cleanly_and_recorded(start_proxy, fake):
    proxy = await start_proxy(upstream_read_timeout_seconds=0.3)
    fake.behaviour.reply = "one two three four five six"
    fake.behaviour.stall_after_chunks = 3
    fake.behaviour.stall_seconds = 3.0
    started = time.monotonic()
    received, error = await read_stream(f"{proxy.url}/v1/chat/completions", {**CHAT, "stream": True})
    assert time.monotonic() - started < 2.5
    assert isinstance(error, aiohttp.ClientPayloadError)  # truncated, and it looks truncated
    assert b"one" in received and b"[DONE]" not in received
    await still_serves(proxy, fake)
    await proxy.flush()
    first, _ = await ledger_rows(proxy.engine)
    assert first.estimated and first.streamed and first.output_tokens > 0 and first.cost_usd > 0
    await assert_aggregates_match_ledger(proxy.engine)


async def test_a_stream_ending_without_usage_or_done_ends_cleanly_and_is_estimated(proxy, fake):
    fake.behaviour.reply = "one two three four five six"
    fake.behaviour.end_after_chunks = 4
    stream = await proxy.client().chat.completions.create(**CHAT, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "one two three"
    await still_serves(proxy, fake)
    await proxy.flush()
    first, _ = await ledger_rows(proxy.engine)
    assert first.estimated and first.output_tokens == 4  # ceil(13 chars / 4)
    assert first.input_tokens > 0 and first.cost_usd > 0


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "Once", "stream": True}),
    ("/v1/responses", {"model": "gpt-4.1-mini", "input": "Roll", "stream": True}),
])
async def test_other_streams_cut_mid_line_are_cut_for_the_client_and_recorded(proxy, fake, path, body):
    fake.behaviour.reply = "one two three four five six seven eight"
    fake.behaviour.disconnect_after_chunks = 5
    fake.behaviour.half_line_then_close = True
    received, error = await read_stream(f"{proxy.url}{path}", body)
    assert isinstance(error, aiohttp.ClientPayloadError)
    assert b"one" in received
    await still_serves(proxy, fake)
    await proxy.flush()
    first, _ = await ledger_rows(proxy.engine)
    assert first.estimated and first.streamed and first.output_tokens > 0


async def hang_up_after_events(proxy, events: int) -> None:
    """Start a streamed chat, read `events` events, then drop the connection mid-stream."""
    async with aiohttp.ClientSession() as http:
        response = await http.post(f"{proxy.url}/v1/chat/completions", json={**CHAT, "stream": True},
                                   headers=TAGS)
        seen = b""
        while seen.count(b"\n\n") < events:
            seen += await response.content.readany()
        response.close()


async def test_client_disconnect_mid_stream_closes_the_upstream_request_and_records(proxy, fake):
    fake.behaviour.reply = " ".join(f"w{i}" for i in range(200))
    fake.behaviour.chunk_delay = 0.02
    await hang_up_after_events(proxy, 5)
    await asyncio.wait_for(fake.peer_closed.wait(), 3)
    assert fake.closed_by_peer == ["/v1/chat/completions"]
    await proxy.flush(within=15)
    [row] = await ledger_rows(proxy.engine)
    assert row.estimated and row.streamed and 0 < row.output_tokens < 200 // 4 * 3
    await still_serves(proxy, fake)
    await proxy.flush()  # (the check reads in READ COMMITTED: no batch may land while it runs)
    await assert_aggregates_match_ledger(proxy.engine)


async def test_client_disconnect_during_an_upstream_pause_closes_the_upstream_promptly(proxy, fake):
    fake.behaviour.reply = "one two three four"
    fake.behaviour.stall_after_chunks = 2
    fake.behaviour.stall_seconds = 4.0
    await hang_up_after_events(proxy, 2)
    try:
        await asyncio.wait_for(fake.peer_closed.wait(), 1.5)
    finally:
        await proxy.flush(within=15)
    [row] = await ledger_rows(proxy.engine)
    assert row.estimated


# -- hostile or malformed requests (raw sockets: HTTP clients would not send these) --------------


@sqlite_only
@pytest.mark.parametrize("head", [
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    b"Content-Length: 5\r\nContent-Length: 6\r\n",
    b"Transfer-Encoding: xchunked\r\n",
    b"Transfer-Encoding: chunked, identity\r\n",
], ids=["cl-te", "te-cl", "two-cl", "te-obfuscated", "te-not-last-chunked"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/files"])
async def test_request_smuggling_shapes_are_refused_and_never_forwarded(proxy, fake, head, path):
    body = b"0\r\n\r\nPOST /v1/smuggled HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}"
    status, _, _ = await raw_http(proxy.port, b"POST " + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\n"
                                  + head + b"\r\n" + body)
    assert status == 400
    assert fake.requests == []
    await still_serves(proxy, fake)
    assert [r.path for r in fake.requests] == ["/v1/chat/completions"]


@sqlite_only
@pytest.mark.parametrize("extra", [
    b"X-Big: " + b"a" * 9000 + b"\r\n",
    b"".join(b"X-H%d: v\r\n" % i for i in range(200)),
], ids=["one-huge-header", "too-many-headers"])
async def test_oversized_headers_are_refused(proxy, fake, extra):
    status, _, _ = await raw_http(proxy.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                                  b"Content-Length: 2\r\n" + extra + b"\r\n{}")
    assert status in (400, 431)
    assert fake.requests == []
    await still_serves(proxy, fake)


@sqlite_only
@pytest.mark.parametrize(("path", "chunked"), [
    ("/v1/chat/completions", False), ("/v1/chat/completions", True), ("/v1/files", False),
])  # ("/v1/files", chunked): its own test below
async def test_a_body_over_max_request_body_bytes_is_a_413_and_not_forwarded(start_proxy, fake, path,
                                                                           chunked):
    proxy = await start_proxy(max_request_body_bytes=4096)
    payload = orjson.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 8000}]})
    if chunked:
        framed = b"".join(b"%x\r\n%s\r\n" % (len(payload[i:i + 1000]), payload[i:i + 1000])
                          for i in range(0, len(payload), 1000)) + b"0\r\n\r\n"
        head = b"Transfer-Encoding: chunked\r\n"
    else:
        framed, head = payload, b"Content-Length: %d\r\n" % len(payload)
    status, _, body = await raw_http(proxy.port, b"POST " + path.encode() + b" HTTP/1.1\r\n"
                                     b"Host: localhost\r\nContent-Type: application/json\r\n"
                                     + head + b"\r\n" + framed)
    assert status == 413
    assert_error_shape(orjson.loads(body), "request_too_large")
    assert fake.requests == []
    await still_serves(proxy, fake)
    # Exactly at the limit is fine.
    async with aiohttp.ClientSession() as http:
        exact = orjson.dumps({**CHAT, "pad": ""})
        exact = orjson.dumps({**CHAT, "pad": "x" * (4096 - len(exact))})
        assert len(exact) == 4096
        async with http.post(f"{proxy.url}/v1/chat/completions", data=exact, headers=TAGS) as response:
            assert response.status == 200


async def test_a_chunked_body_over_the_limit_on_a_billable_path_is_a_413_and_no_row(start_proxy, fake):
    """The upload is refused part-way (after the budget admitted it): nothing reached the upstream
    whole, nothing is billed, so no ledger row; the budget's reservation is released."""
    proxy = await start_proxy(max_request_body_bytes=4096)
    framed = b"".join(b"400\r\n" + b"a" * 1024 + b"\r\n" for _ in range(8)) + b"0\r\n\r\n"
    status, _, body = await raw_http(proxy.port, b"POST /v1/files HTTP/1.1\r\nHost: localhost\r\n"
                                     b"Transfer-Encoding: chunked\r\n\r\n" + framed)
    assert fake.requests == []
    assert status == 413
    assert_error_shape(orjson.loads(body), "request_too_large")
    await proxy.flush()
    assert await ledger_rows(proxy.engine) == []
    await still_serves(proxy, fake)


@sqlite_only
@pytest.mark.parametrize("target", [b"/v2/x", b"/../etc/passwd", b"/admin", b"/V1/models", b"/v1x/models",
                                    b"//v1/models", b"/page/nope.js", b"/costs/../v1/models"])
async def test_paths_outside_v1_are_404_in_the_error_shape_and_not_forwarded(proxy, fake, target):
    status, _, body = await raw_http(proxy.port, b"GET " + target + CLOSE)
    assert status == 404, body
    assert_error_shape(orjson.loads(body))
    assert fake.requests == []


@sqlite_only
@pytest.mark.parametrize("target", [b"/v1/../admin", b"/v1/%2e%2e/admin", b"/v1/..%2fadmin",
                                    b"/v1/./../../admin"])
async def test_dot_segments_cannot_escape_v1(proxy, fake, target):
    status, _, body = await raw_http(proxy.port, b"GET " + target + CLOSE)
    assert fake.requests == []
    assert status in (400, 404)
    assert_error_shape(orjson.loads(body))


@sqlite_only
async def test_an_absolute_form_target_is_not_a_500_and_goes_only_to_the_upstream(proxy, fake):
    status, _, body = await raw_http(proxy.port, b"GET http://evil.example/v1/models HTTP/1.1\r\n"
                                     b"Host: localhost\r\nConnection: close\r\n\r\n")
    assert status < 500, body
    assert all(r.path == "/v1/models" for r in fake.requests)


# -- secrets --------------------------------------------------------------------------------------


async def test_the_api_key_is_nowhere_in_logs_ledger_metrics_or_costs(proxy, fake, caplog):
    caplog.set_level(logging.DEBUG)
    key = "sk-secret-XYZ-0123456789abcdefghijklmnopqrstuvwxyz"
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key=key, max_retries=0,
                                default_headers={"X-Campaign-Id": "keyed", "X-Session-Id": "s1"})
    await client.chat.completions.create(**CHAT)
    [c async for c in await client.chat.completions.create(**CHAT, stream=True)]
    await client.embeddings.create(model="text-embedding-3-small", input="x")
    fake.behaviour.status = 401
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(**CHAT)
    fake.behaviour.status = 200
    fake.behaviour.disconnect_after_chunks = 2
    with pytest.raises(openai.APIError):
        [c async for c in await client.chat.completions.create(**CHAT, stream=True)]
    fake.behaviour.disconnect_after_chunks = None
    assert fake.requests[0].headers["Authorization"] == f"Bearer {key}"  # the upstream does get it
    await proxy.flush()
    dump: list[str] = []
    async with proxy.engine.connect() as conn:
        tables = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
        for table in tables:
            rows = (await conn.execute(text(f'SELECT * FROM "{table}"'))).all()
            dump.extend(repr(tuple(row)) for row in rows)
    async with aiohttp.ClientSession() as http:
        for path in ("/metrics", "/costs/campaigns", "/costs/campaigns/keyed",
                     "/costs/campaigns/keyed/sessions", "/readyz"):
            async with http.get(f"{proxy.url}{path}") as response:
                dump.append(await response.text())
    dump.extend(record.getMessage() + repr(record.args) + (record.exc_text or "")
                for record in caplog.records)
    dump.append(caplog.text)
    everything = "\n".join(dump)
    assert "usage_records" in tables and len(everything) > 1000
    for needle in (key, key[3:], key[-20:]):
        assert needle not in everything
    short = hashlib.sha256(key.encode()).hexdigest()[:12]
    rows = await ledger_rows(proxy.engine)
    assert len(rows) == 5 and {r.api_key_hash for r in rows} == {short}
    assert short in everything
