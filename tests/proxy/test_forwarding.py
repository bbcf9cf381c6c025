"""Forwarding and metering through the real `openai` SDK, against a loopback fake of OpenAI,
on SQLite and PostgreSQL: what the client sees, and what the ledger keeps."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import aiohttp
import openai
import orjson
import pytest
from ledger_check import assert_aggregates_match_ledger, ledger_rows
from multidict import CIMultiDict, CIMultiDictProxy

from costing.pricing import PriceTable
from proxy.forward import _is_event_stream

PRICES = PriceTable.load(default_per_1k_prompt=Decimal("0.00015"),
                         default_per_1k_completion=Decimal("0.0006"))


async def test_chat_completion_is_forwarded_metered_and_saved(proxy, fake):
    fake.behaviour.prompt_tokens = 1000
    fake.behaviour.cached_tokens = 400
    fake.behaviour.completion_tokens = 500
    fake.behaviour.reasoning_tokens = 200
    raw = await proxy.client().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Describe the goblin king."}])
    completion = raw.parse()
    assert completion.choices[0].message.content == fake.behaviour.reply
    # By hand, from the published gpt-4o-mini price (USD per 1M): 0.15 in, 0.075 cached, 0.60 out;
    # reasoning tokens are part of the 500 output tokens.
    expected = (Decimal(600) * Decimal("0.15") + Decimal(400) * Decimal("0.075")
                + Decimal(500) * Decimal("0.60")) / Decimal(1_000_000)
    assert Decimal(raw.headers["X-Request-Cost-USD"]) == expected
    assert Decimal(raw.headers["X-Session-Cost-USD"]) == expected
    assert Decimal(raw.headers["X-Campaign-Cost-USD"]) == expected
    await proxy.flush()
    [row] = await ledger_rows(proxy.engine)
    assert (row.campaign_id, row.session_id, row.operation) == ("c1", "s1", "chat.completions")
    assert (row.input_tokens, row.cached_input_tokens, row.output_tokens, row.reasoning_tokens) == (
        1000, 400, 500, 200)
    assert row.cost_usd == expected
    assert row.response_id == completion.id
    assert row.estimated is False and row.priced_by_default is False
    assert row.api_key_hash and "sk-test-key" not in row.api_key_hash
    await assert_aggregates_match_ledger(proxy.engine)


async def test_tag_headers_are_not_forwarded_and_the_rest_is(proxy, fake):
    await proxy.client().chat.completions.create(model="gpt-4o-mini",
                                                 messages=[{"role": "user", "content": "hi"}])
    seen = fake.requests[-1]
    assert "x-campaign-id" not in {k.lower() for k in seen.headers}
    assert "x-session-id" not in {k.lower() for k in seen.headers}
    assert seen.headers["Authorization"] == "Bearer sk-test-key"


async def test_the_user_agent_is_the_clients_own_or_none(proxy, fake):
    await proxy.client().chat.completions.create(model="gpt-4o-mini",
                                                 messages=[{"role": "user", "content": "hi"}])
    assert fake.requests[-1].headers["User-Agent"].startswith("AsyncOpenAI/Python")
    async with aiohttp.ClientSession(skip_auto_headers=["User-Agent"]) as http:
        response = await http.post(f"{proxy.url}/v1/chat/completions", json={"model": "gpt-4o"})
        assert response.status == 200
        response = await http.get(f"{proxy.url}/v1/models")
        assert response.status == 200
    assert [r.path for r in fake.requests[-2:]] == ["/v1/chat/completions", "/v1/models"]
    assert all("User-Agent" not in r.headers for r in fake.requests[-2:])


@pytest.mark.parametrize(("content_type", "is_stream"), [
    ("text/event-stream", True), ("text/event-stream; charset=utf-8", True),
    ("Text/Event-Stream ;charset=utf-8", True), (" text/event-stream", True),
    ("text/event-streams", False), ("application/json", False), ("", False), (None, False),
])
def test_a_body_is_relayed_as_events_exactly_when_its_media_type_is_event_stream(content_type, is_stream):
    headers = CIMultiDict() if content_type is None else CIMultiDict({"Content-Type": content_type})
    assert _is_event_stream(CIMultiDictProxy(headers)) is is_stream


async def test_legacy_completions_embeddings_and_responses(proxy, fake):
    client = proxy.client()
    completion = await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once upon")
    assert completion.choices[0].text == fake.behaviour.reply
    embedding = await client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(embedding.data) == 2 and len(embedding.data[0].embedding) > 0
    response = await client.responses.create(model="gpt-4.1-mini", input="Roll for initiative")
    assert response.output_text == fake.behaviour.reply
    await proxy.flush()
    rows = await ledger_rows(proxy.engine)
    assert [r.operation for r in rows] == ["completions", "embeddings", "responses"]
    assert all(r.input_tokens == fake.behaviour.prompt_tokens for r in rows)
    assert rows[1].output_tokens == 0
    assert all(r.cost_usd > 0 for r in rows)
    await assert_aggregates_match_ledger(proxy.engine)


async def _sse_events(url: str, body: dict, headers: dict[str, str]) -> list[dict]:
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as response:
        assert response.status == 200
        text = (await response.read()).decode()
    events = []
    for block in text.split("\n\n"):
        data = [line[6:] for line in block.splitlines() if line.startswith("data: ")]
        if data and data[0] != "[DONE]":
            event = orjson.loads(data[0])
            event.pop("created", None)
            event.pop("id", None)
            events.append(event)
    assert text.rstrip().endswith("data: [DONE]")
    return events


@pytest.mark.parametrize("include_usage", [False, True])
async def test_streamed_chat_client_sees_exactly_what_openai_sends(proxy, fake, include_usage):
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    direct = await _sse_events(f"{fake.url}/v1/chat/completions", body, {})
    through = await _sse_events(f"{proxy.url}/v1/chat/completions", body,
                                {"X-Campaign-Id": "c1", "X-Session-Id": "s1"})
    assert through == direct
    assert any(e.get("usage") for e in through) is include_usage
    # The proxy always asks the upstream for usage, so the stream is metered either way.
    assert fake.requests[-1].json["stream_options"] == {"include_usage": True}
    await proxy.flush()
    [row] = await ledger_rows(proxy.engine)
    assert row.streamed and not row.estimated
    assert row.output_tokens > 0


@pytest.mark.parametrize("arrival", ["whole", "event by event"])
async def test_a_stream_reads_the_same_however_it_arrives(proxy, fake, arrival):
    """A stream that has fully arrived with its headers goes out in one send; one still arriving
    is relayed event by event. The client cannot tell, and both are metered."""
    fake.behaviour.stream_whole = arrival == "whole"
    fake.behaviour.chunk_delay = 0.0 if arrival == "whole" else 0.01
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    direct = await _sse_events(f"{fake.url}/v1/chat/completions", body, {})
    through = await _sse_events(f"{proxy.url}/v1/chat/completions", body,
                                {"X-Campaign-Id": "c1", "X-Session-Id": "s1"})
    assert through == direct and not any(e.get("usage") for e in through)
    async with aiohttp.ClientSession() as http, http.post(
            f"{proxy.url}/v1/chat/completions", json=body,
            headers={"X-Campaign-Id": "c1", "X-Session-Id": "s1"}) as response:
        assert ("Transfer-Encoding" in response.headers) is (arrival != "whole")
        # Stream headers go out before the stream's own cost is known, whole or not.
        campaign_cost = Decimal(response.headers["X-Campaign-Cost-USD"])
        await response.read()
    await proxy.flush()
    rows = await ledger_rows(proxy.engine)
    assert [(r.streamed, r.estimated) for r in rows] == [(True, False), (True, False)]
    assert campaign_cost == rows[0].cost_usd > 0


async def test_stream_headers_reach_the_client_before_the_first_event(proxy, fake):
    """A model that thinks before its first token: the client learns the status at once."""
    fake.behaviour.stall_after_chunks = 0
    fake.behaviour.stall_seconds = 3.0
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as http:
        started = asyncio.get_running_loop().time()
        async with http.post(f"{proxy.url}/v1/chat/completions", json=body) as response:
            assert response.status == 200 and "X-Campaign-Cost-USD" in response.headers
            assert asyncio.get_running_loop().time() - started < 2.0
            await response.read()


async def test_streams_of_every_operation_through_the_sdk(proxy, fake):
    client = proxy.client()
    chunks = [c async for c in await client.chat.completions.create(
        model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "hi"}])]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == fake.behaviour.reply
    assert all(c.usage is None for c in chunks)
    text = [c async for c in await client.completions.create(
        model="gpt-3.5-turbo-instruct", prompt="x", stream=True)]
    assert "".join(c.choices[0].text for c in text if c.choices) == fake.behaviour.reply
    events = [e async for e in await client.responses.create(model="gpt-4.1", input="x", stream=True)]
    assert events[-1].type == "response.completed"
    await proxy.flush()
    rows = await ledger_rows(proxy.engine)
    assert [(r.operation, r.streamed, r.estimated) for r in rows] == [
        ("chat.completions", True, False), ("completions", True, False), ("responses", True, False)]
    assert all(r.input_tokens == fake.behaviour.prompt_tokens and r.output_tokens > 0 for r in rows)


async def test_ledger_and_aggregates_agree_and_survive_a_restart(start_proxy, fake):
    first = await start_proxy()
    for i in range(12):
        client = first.client(campaign=f"camp-{i % 3}", session=f"sess-{i % 4}")
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x" * i}])
    await first.flush()
    before = await assert_aggregates_match_ledger(first.engine)
    assert sum(v[1] for v in before.values()) == 12
    await first.stop()
    second = await start_proxy()
    assert await assert_aggregates_match_ledger(second.engine) == before
    await second.client(campaign="camp-0", session="sess-0").chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "again"}])
    await second.flush()
    after = await assert_aggregates_match_ledger(second.engine)
    assert after["camp-0"][1] == before["camp-0"][1] + 1


async def test_200_concurrent_calls_over_10_sessions_lose_nothing(proxy, fake):
    clients = [proxy.client(campaign="busy", session=f"s{i}") for i in range(10)]

    async def call(i: int) -> None:
        await clients[i % 10].chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"message {i}"}])

    await asyncio.gather(*(call(i) for i in range(200)))
    await proxy.flush()
    rows = await ledger_rows(proxy.engine)
    assert len(rows) == 200
    totals = await assert_aggregates_match_ledger(proxy.engine)
    assert totals["busy"][1] == 200
    assert totals["busy"][0] == sum(r.cost_usd for r in rows)


async def test_gzip_encoded_upstream_bodies_are_metered_and_decoded_for_the_client(proxy, fake):
    fake.behaviour.encoding = "gzip"
    fake.behaviour.prompt_tokens = 77
    completion = await proxy.client().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert completion.usage.prompt_tokens == 77
    await proxy.flush()
    [row] = await ledger_rows(proxy.engine)
    assert row.input_tokens == 77 and row.cost_usd > 0


async def test_the_upstream_is_offered_only_encodings_the_proxy_can_decode(proxy, fake):
    """The proxy decodes upstream bodies itself and has no zstd decoder: a client that accepts
    zstd must not make an upstream (or its CDN) answer in zstd, or a successful, billed call
    becomes a 502 recorded at $0. The upstream is offered what the proxy decodes."""
    fake.behaviour.negotiated_encoding = "zstd"
    fake.behaviour.prompt_tokens = 77
    offered = "gzip, deflate, br, zstd"
    async with aiohttp.ClientSession(auto_decompress=False) as http:  # the premise: it would
        async with http.post(f"{fake.url}/v1/chat/completions", json={"model": "gpt-4o-mini"},
                             headers={"Accept-Encoding": offered}) as direct:
            assert direct.headers["Content-Encoding"] == "zstd"
    completion = await proxy.client().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
        extra_headers={"Accept-Encoding": offered})
    assert completion.choices[0].message.content == fake.behaviour.reply
    assert completion.usage.prompt_tokens == 77
    assert "zstd" not in fake.requests[-1].headers["Accept-Encoding"]
    await proxy.flush()
    [row] = await ledger_rows(proxy.engine)
    assert (row.status_code, row.input_tokens) == (200, 77) and row.cost_usd > 0


async def test_a_head_request_tells_the_length_a_get_would_have(proxy, fake):
    """A HEAD answer has no body: the upstream's Content-Length is what it tells, passed on as
    sent (never replaced by chunked encoding), the length of the body a GET of the path gets."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/v1/models") as response:
            body = await response.read()
        async with http.head(f"{proxy.url}/v1/models") as response:
            assert response.status == 200
            assert response.headers.get("Content-Length") == str(len(body))
            assert "Transfer-Encoding" not in response.headers
    assert [r.method for r in fake.requests] == ["GET", "HEAD"]


async def test_a_head_request_of_an_encoded_body_tells_no_length(proxy, fake):
    """The upstream's length of a gzip body is not the length of the decoded body the proxy
    sends: that HEAD answer carries no Content-Length, as a GET of the path gets none."""
    fake.behaviour.encoding = "gzip"
    async with aiohttp.ClientSession() as http, http.head(f"{proxy.url}/v1/models") as response:
        assert response.status == 200
        assert "Content-Length" not in response.headers and "Content-Encoding" not in response.headers


@pytest.mark.parametrize("status", [400, 401, 429, 500, 503])
async def test_upstream_errors_pass_through_verbatim(proxy, fake, status):
    fake.behaviour.status = status
    async with aiohttp.ClientSession() as http:
        direct = await (await http.post(f"{fake.url}/v1/chat/completions", json={"model": "m"})).read()
        response = await http.post(f"{proxy.url}/v1/chat/completions", json={"model": "m"},
                                   headers={"X-Campaign-Id": "c1"})
        assert response.status == status
        assert await response.read() == direct
    await proxy.flush()
    [row] = await ledger_rows(proxy.engine)
    assert row.status_code == status and row.cost_usd == 0


async def test_unreachable_upstream_is_a_502_in_openai_shape(start_proxy):
    proxy = await start_proxy(upstream_base_url="http://127.0.0.1:9")
    with pytest.raises(openai.InternalServerError) as caught:
        await proxy.client().chat.completions.create(model="gpt-4o", messages=[])
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "upstream_unreachable"
    assert set(caught.value.response.json()["error"]) == {"message", "type", "param", "code"}
    await proxy.flush()  # the call never reached the upstream: not billed, not estimated
    [row] = await ledger_rows(proxy.engine)
    assert (row.status_code, row.cost_usd, row.estimated) == (502, 0, False)


async def test_upstream_timeout_is_a_504(start_proxy, fake):
    proxy = await start_proxy(upstream_read_timeout_seconds=0.3)
    fake.behaviour.delay = 2
    with pytest.raises(openai.APIStatusError) as caught:
        await proxy.client().chat.completions.create(model="gpt-4o", messages=[])
    assert caught.value.status_code == 504
    assert caught.value.body["code"] == "upstream_timeout"


@pytest.mark.parametrize("value", ["", "has space", "x" * 129, "semi;colon", "é", ".", ".."])
async def test_malformed_tags_are_refused_with_400_and_nothing_is_forwarded(proxy, fake, value):
    async with aiohttp.ClientSession() as http:
        response = await http.post(f"{proxy.url}/v1/chat/completions", json={"model": "gpt-4o"},
                                   headers={"X-Session-Id": value.encode().decode("latin-1")})
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["param"] == "X-Session-Id" and error["code"] == "invalid_tag"
    assert fake.requests == []


async def test_untagged_calls_are_recorded_under_untagged(proxy, fake):
    await proxy.client(campaign=None, session=None).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    await proxy.flush()
    [row] = await ledger_rows(proxy.engine)
    assert (row.campaign_id, row.session_id) == ("_untagged", "_untagged")


async def test_a_non_json_body_on_a_metered_path_is_a_400(proxy, fake):
    async with aiohttp.ClientSession() as http:
        response = await http.post(f"{proxy.url}/v1/chat/completions", data=b"{not json",
                                   headers={"Content-Type": "application/json"})
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "invalid_json"
    assert fake.requests == []


async def test_other_paths_methods_and_queries_pass_through(proxy, fake):
    async with aiohttp.ClientSession() as http:
        response = await http.delete(f"{proxy.url}/v1/files/file-1?x=1&y=%20z",
                                     headers={"X-Custom": "kept", "X-Campaign-Id": "c1"})
        echoed = await response.json()
    assert response.status == 200
    assert echoed["method"] == "DELETE" and echoed["path"] == "/v1/files/file-1"
    assert echoed["query"] == "x=1&y=%20z"
    assert echoed["headers"].get("X-Custom") == "kept"
    models = await proxy.client().models.list()
    assert models.data


async def _answer_text(proxy, operation: str, stream: bool) -> str:
    """One call of `operation` through the SDK; the text the client got."""
    client = proxy.client()
    hi = [{"role": "user", "content": "hi"}]
    if operation == "chat":
        if not stream:
            return (await client.chat.completions.create(model="gpt-4o-mini", messages=hi)
                    ).choices[0].message.content
        return "".join([c.choices[0].delta.content or "" async for c in await client.chat.completions
                        .create(model="gpt-4o-mini", messages=hi, stream=True) if c.choices])
    if operation == "completions":
        if not stream:
            return (await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi")
                    ).choices[0].text
        return "".join([c.choices[0].text async for c in await client.completions.create(
            model="gpt-3.5-turbo-instruct", prompt="hi", stream=True) if c.choices])
    if not stream:
        return (await client.responses.create(model="gpt-4o-mini", input="hi")).output_text
    return "".join([e.delta async for e in await client.responses.create(
        model="gpt-4o-mini", input="hi", stream=True) if e.type == "response.output_text.delta"])


@pytest.mark.parametrize("operation", ["chat", "completions", "responses"])
async def test_an_answer_without_usage_is_estimated_from_its_text_json_or_streamed(proxy, fake,
                                                                                   operation):
    """An OpenAI-compatible upstream may report no usage. The output is then estimated from the
    answer's text (characters / 4), whether it came whole as JSON or as a stream: the same answer
    costs the same either way, never just its prompt."""
    fake.behaviour.omit_usage = True
    fake.behaviour.reply = "The goblin king grins and the dice roll across the table."
    for stream in (False, True):
        assert await _answer_text(proxy, operation, stream) == fake.behaviour.reply
    await proxy.flush()
    whole, streamed = await ledger_rows(proxy.engine)
    assert (whole.streamed, streamed.streamed) == (False, True)
    assert whole.estimated and streamed.estimated
    assert whole.output_tokens == streamed.output_tokens == -(-len(fake.behaviour.reply) // 4)
    assert whole.input_tokens == streamed.input_tokens and whole.cost_usd == streamed.cost_usd
    await assert_aggregates_match_ledger(proxy.engine)


@pytest.mark.parametrize("half_line", [False, True])
async def test_upstream_cut_off_mid_stream_cuts_the_client_and_is_recorded_estimated(proxy, fake, half_line):
    fake.behaviour.reply = "one two three four five six seven eight"
    fake.behaviour.disconnect_after_chunks = 4
    fake.behaviour.half_line_then_close = half_line
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    received = b""
    async with aiohttp.ClientSession() as http:
        response = await http.post(f"{proxy.url}/v1/chat/completions", json=body,
                                   headers={"X-Campaign-Id": "c1"})
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in response.content.iter_any():
                received += chunk
    assert b"one" in received and b"[DONE]" not in received
    await proxy.flush()
    [row] = await ledger_rows(proxy.engine)
    assert row.estimated and row.streamed
    assert row.output_tokens > 0 and row.cost_usd > 0
    # The proxy is still serving.
    fake.behaviour.disconnect_after_chunks = None
    await proxy.client().chat.completions.create(model="gpt-4o-mini", messages=[])


async def test_client_disconnect_mid_stream_still_records_usage(proxy, fake):
    fake.behaviour.reply = " ".join(f"w{i}" for i in range(40))
    fake.behaviour.chunk_delay = 0.02
    stream = await proxy.client().chat.completions.create(
        model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "hi"}])
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 5:
            break
    await stream.close()
    await proxy.flush(within=15)
    [row] = await ledger_rows(proxy.engine)
    assert row.estimated and row.output_tokens > 0
    await assert_aggregates_match_ledger(proxy.engine)
