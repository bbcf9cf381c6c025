"""Spans of metered calls, as a real OTLP receiver decodes them: the caller's trace continued,
the proxy's own span id sent upstream, GenAI attributes with their OTLP types, sampling as
OTEL_TRACES_SAMPLER says, and no message content unless asked for."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from ledger_check import ledger_rows
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from otlpreceiver import OTLPReceiver

from proxy.state import TRACER

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def traceparent(flags: str = "01", trace: str = CALLER_TRACE, span: str = CALLER_SPAN) -> str:
    return f"00-{trace}-{span}-{flags}"


@pytest.fixture
async def receiver() -> AsyncIterator[OTLPReceiver]:
    async with OTLPReceiver() as running:
        yield running


@pytest.fixture
async def traced(start_proxy: Any, receiver: OTLPReceiver) -> Any:
    async def start(**values: Any) -> Any:
        values.setdefault("otel_exporter_otlp_endpoint", receiver.url)
        values.setdefault("otel_bsp_schedule_delay", 20)
        return await start_proxy(**values)
    return start


def upstream_traceparent(fake: Any) -> str:
    return str(fake.requests[-1].headers["traceparent"])


async def test_a_chat_call_continues_the_callers_trace(traced, receiver, fake):
    proxy = await traced()
    client = proxy.client()
    before = time.time_ns()
    reply = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "secret prompt"}], max_tokens=50,
        extra_headers={"traceparent": traceparent(), "tracestate": "vendor=abc"})
    after = time.time_ns()
    (got,) = await receiver.wait_for(1)
    span = got.span
    assert before < span.start_time_unix_nano < span.end_time_unix_nano < after
    assert span.name == "chat gpt-4o-mini"
    assert span.kind == Span.SpanKind.SPAN_KIND_CLIENT
    assert span.trace_id.hex() == CALLER_TRACE
    assert span.parent_span_id.hex() == CALLER_SPAN
    assert span.span_id.hex() not in (CALLER_SPAN, "0" * 16)
    assert span.trace_state == "vendor=abc"
    assert span.start_time_unix_nano < span.end_time_unix_nano
    assert span.status.code == Status.StatusCode.STATUS_CODE_UNSET
    # Upstream: the proxy's span is the parent, never the caller's (LiteLLM #39067).
    assert upstream_traceparent(fake) == f"00-{CALLER_TRACE}-{span.span_id.hex()}-01"
    assert fake.requests[-1].headers["tracestate"] == "vendor=abc"
    attrs = got.attributes
    assert attrs == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
        "openai.api.type": "chat_completions",
        "gen_ai.request.model": "gpt-4o-mini", "gen_ai.response.model": reply.model,
        "gen_ai.response.id": reply.id, "gen_ai.response.finish_reasons": ["stop"],
        "gen_ai.request.max_tokens": 50,
        "gen_ai.usage.input_tokens": 12, "gen_ai.usage.output_tokens": reply.usage.completion_tokens,
        "gen_ai.usage.cache_read.input_tokens": 0, "gen_ai.usage.reasoning.output_tokens": 0,
        "server.address": "127.0.0.1", "server.port": int(fake.url.rsplit(":", 1)[1]),
        "gen_ai.conversation.id": "s1", "llm_proxy.campaign.id": "c1", "llm_proxy.session.id": "s1",
        "llm_proxy.cost.usd": attrs["llm_proxy.cost.usd"], "gen_ai.usage.cost": attrs["llm_proxy.cost.usd"],
        "llm_proxy.cost.estimated": False, "llm_proxy.priced_by_default": False,
        "llm_proxy.budget.status": "ok", "http.response.status_code": 200,
    }
    assert attrs["llm_proxy.cost.usd"] > 0
    kinds = got.kinds()
    assert kinds["gen_ai.usage.input_tokens"] == kinds["http.response.status_code"] == "int_value"
    assert kinds["llm_proxy.cost.usd"] == "double_value"
    assert kinds["llm_proxy.cost.estimated"] == kinds["llm_proxy.priced_by_default"] == "bool_value"
    assert kinds["gen_ai.response.finish_reasons"] == "array_value"
    assert got.resource["service.name"] == "llm-cost-proxy"
    assert got.scope == "llm-cost-proxy"
    assert receiver.encodings == ["gzip"]
    assert "secret prompt" not in str(span)  # content is off by default
    # Counted once the receiver's answer is read, a moment after the receiver has the span.
    async with asyncio.timeout(5):
        while proxy.registry.get_sample_value("llm_trace_spans_exported_total") != 1:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_streams_get_a_span_ended_at_the_last_byte(traced, receiver, fake):
    proxy = await traced()
    client = proxy.client(session=None)
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True)
    async for _chunk in stream:
        pass
    (got,) = await receiver.wait_for(1)
    attrs = got.attributes
    assert got.span.parent_span_id == b""  # no caller trace: a new one starts
    assert upstream_traceparent(fake) == f"00-{got.span.trace_id.hex()}-{got.span.span_id.hex()}-01"
    assert attrs["gen_ai.request.stream"] is True
    assert attrs["gen_ai.response.finish_reasons"] == ["stop"]
    assert attrs["gen_ai.usage.input_tokens"] == 12 and attrs["gen_ai.usage.output_tokens"] > 0
    assert "gen_ai.conversation.id" not in attrs  # the request had no session tag
    assert attrs["llm_proxy.session.id"] == "_untagged"


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_and_embeddings_are_named_as_the_conventions_say(traced, receiver, fake, stream):
    proxy = await traced()
    client = proxy.client()
    if stream:
        async with client.responses.stream(model="gpt-4.1-mini", input="hi") as events:
            async for _event in events:
                pass
    else:
        await client.responses.create(model="gpt-4.1-mini", input="hi", max_output_tokens=20)
    await client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    first, second = await receiver.wait_for(2)
    assert first.span.name == "chat gpt-4.1-mini"
    assert first.attributes["openai.api.type"] == "responses"
    assert first.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert first.attributes.get("gen_ai.request.max_tokens") == (None if stream else 20)
    assert second.span.name == "embeddings text-embedding-3-small"
    assert second.attributes["gen_ai.operation.name"] == "embeddings"
    assert second.attributes["gen_ai.usage.output_tokens"] == 0


async def test_upstream_errors_and_refusals_carry_error_type(traced, receiver, fake):
    proxy = await traced(cost_warning_threshold_usd=0, cost_limit_threshold_usd=0)
    client = proxy.client(campaign="broke")
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert not fake.requests  # refused before forwarding
    (got,) = await receiver.wait_for(1)
    assert got.attributes["error.type"] == "budget_exceeded"
    assert got.attributes["http.response.status_code"] == 429
    assert got.attributes["llm_proxy.budget.status"] == "exceeded"
    assert got.span.status.code == Status.StatusCode.STATUS_CODE_ERROR


async def test_a_billable_call_it_cannot_price_is_a_span_as_its_row_says(traced, receiver, fake):
    """Its row's figures (cost 0, priced by default) and its operation's name; the upstream gets
    the proxy's span id, never the caller's; refused by the budget, a span all the same."""
    proxy = await traced()
    async with aiohttp.ClientSession() as http:
        await http.post(f"{proxy.url}/v1/images/generations", json={"prompt": "a goblin king"},
                        headers={"X-Campaign-Id": "c1", "traceparent": traceparent()})
        (got,) = await receiver.wait_for(1)
        assert got.span.name == "images.generations"
        assert got.span.parent_span_id.hex() == CALLER_SPAN
        assert upstream_traceparent(fake) == f"00-{CALLER_TRACE}-{got.span.span_id.hex()}-01"
        attrs = got.attributes
        assert attrs["gen_ai.operation.name"] == "images.generations"
        assert "openai.api.type" not in attrs
        assert attrs["llm_proxy.cost.usd"] == 0.0 and attrs["llm_proxy.priced_by_default"] is True
        await http.put(f"{proxy.url}/costs/campaigns/c1/budget", json={"warning_usd": "0",
                                                                       "limit_usd": "0"})
        refused = await http.post(f"{proxy.url}/v1/images/generations", json={"prompt": "x"},
                                  headers={"X-Campaign-Id": "c1"})
        assert refused.status == 429
        _, got = await receiver.wait_for(2)
        assert got.attributes["error.type"] == "budget_exceeded"
    await proxy.flush()
    assert len(await ledger_rows(proxy.engine)) == 1


async def test_an_upstream_failure_is_the_status_as_a_string(traced, receiver, fake):
    proxy = await traced()
    fake.behaviour.status = 500
    with pytest.raises(openai.InternalServerError):
        await proxy.client().chat.completions.create(model="gpt-4o-mini",
                                                     messages=[{"role": "user", "content": "x"}])
    (got,) = await receiver.wait_for(1)
    assert got.attributes["error.type"] == "500"
    assert got.span.status.message == "500"


async def test_unreachable_upstream(traced, receiver):
    proxy = await traced(upstream_base_url="http://127.0.0.1:9")
    with pytest.raises(openai.APIStatusError):
        await proxy.client().chat.completions.create(model="gpt-4o-mini",
                                                     messages=[{"role": "user", "content": "x"}])
    (got,) = await receiver.wait_for(1)
    assert got.attributes["error.type"] == "upstream_unreachable"
    assert got.attributes["http.response.status_code"] == 502


async def test_a_client_that_leaves_mid_stream_ends_its_span(traced, receiver, fake):
    proxy = await traced()
    fake.behaviour.chunk_delay = 0.05
    fake.behaviour.reply = " ".join(["word"] * 40)
    client = proxy.client()
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True)
    seen = 0
    async for _chunk in stream:
        seen += 1
        if seen == 3:
            break
    await stream.close()
    (got,) = await receiver.wait_for(1)
    assert got.attributes["error.type"] == "client_disconnected"
    assert got.attributes["llm_proxy.cost.estimated"] is True
    assert got.span.end_time_unix_nano > got.span.start_time_unix_nano


async def test_sampling_follows_the_caller_and_the_sampler(traced, receiver, fake):
    proxy = await traced()
    client = proxy.client()

    async def call(header: str | None) -> None:
        extra = {"traceparent": header} if header else {}
        await client.embeddings.create(model="text-embedding-3-small", input="a", extra_headers=extra)

    await call(traceparent(flags="00"))  # the caller did not sample: neither do we
    sent = upstream_traceparent(fake)
    assert sent.startswith(f"00-{CALLER_TRACE}-") and sent.endswith("-00")
    assert sent.split("-")[2] != CALLER_SPAN
    await call("garbage")  # an invalid header starts a new trace, sampled
    await call(traceparent(flags="01"))
    spans = await receiver.wait_for(2)
    await asyncio.sleep(0.1)
    assert len(receiver.spans) == 2
    assert spans[0].span.trace_id.hex() != CALLER_TRACE
    assert spans[1].span.trace_id.hex() == CALLER_TRACE


@pytest.mark.parametrize(("sampler", "arg", "caller", "expected"), [
    ("always_off", None, "01", 0),
    ("always_on", None, "00", 1),
    ("parentbased_traceidratio", "0", "01", 1),  # the parent decides
    ("parentbased_traceidratio", "0", None, 0),
    ("traceidratio", "1", None, 1),
])
async def test_otel_traces_sampler(traced, receiver, fake, sampler, arg, caller, expected):
    proxy = await traced(otel_traces_sampler=sampler, otel_traces_sampler_arg=arg)
    extra = {"traceparent": traceparent(flags=caller)} if caller else {}
    await proxy.client().embeddings.create(model="text-embedding-3-small", input="a", extra_headers=extra)
    await proxy.client().embeddings.create(model="text-embedding-3-small", input="b", extra_headers=extra)
    await asyncio.sleep(0.3)
    assert len(receiver.spans) == 2 * expected
    assert upstream_traceparent(fake).endswith("-01" if expected else "-00")


async def test_message_content_only_when_asked_for_and_truncated(traced, receiver, fake):
    proxy = await traced(otel_instrumentation_genai_capture_message_content=True)
    long_prompt = "".join(random.choice("abcdefgh") for _ in range(40_000))
    await proxy.client().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "first words"}])
    await proxy.client().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": long_prompt}])
    short, long = await receiver.wait_for(2)
    assert '"first words"' in short.attributes["gen_ai.input.messages"]
    assert '"role":"user"' in short.attributes["gen_ai.input.messages"]
    assert fake.behaviour.reply in short.attributes["gen_ai.output.messages"]
    assert len(long.attributes["gen_ai.input.messages"]) == 16 * 1024


async def test_tracing_off_leaves_the_callers_headers_alone(start_proxy, fake):
    proxy = await start_proxy()
    assert proxy.app[TRACER] is None
    await proxy.client().embeddings.create(model="text-embedding-3-small", input="a",
                                           extra_headers={"traceparent": traceparent()})
    assert upstream_traceparent(fake) == traceparent()


async def test_spans_still_queued_at_shutdown_are_sent(traced, receiver, fake):
    proxy = await traced(otel_bsp_schedule_delay=60_000)
    await proxy.client().embeddings.create(model="text-embedding-3-small", input="a")
    await asyncio.sleep(0.2)
    assert receiver.spans == []  # waiting for its batch
    await proxy.stop()
    assert len(receiver.spans) == 1
    assert proxy.registry.get_sample_value("llm_trace_spans_exported_total") == 1


async def test_a_full_batch_goes_out_before_the_schedule_delay(traced, receiver, fake):
    proxy = await traced(otel_bsp_schedule_delay=60_000, otel_bsp_max_export_batch_size=3)
    client = proxy.client()
    for _ in range(3):
        await client.embeddings.create(model="text-embedding-3-small", input="a")
    assert len(await receiver.wait_for(3, seconds=5)) == 3
    assert receiver.posts == 1


async def test_an_upstream_that_breaks_off_mid_stream(traced, receiver, fake):
    proxy = await traced()
    fake.behaviour.reply = "one two three four five six seven eight"
    fake.behaviour.chunk_delay = 0.01
    fake.behaviour.disconnect_after_chunks = 3
    with pytest.raises(openai.APIError):
        stream = await proxy.client().chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True)
        async for _chunk in stream:
            pass
    (got,) = await receiver.wait_for(1)
    assert got.attributes["error.type"] == "upstream_incomplete"
    assert got.attributes["http.response.status_code"] == 200  # the answer had begun
    assert got.attributes["llm_proxy.cost.estimated"] is True


async def test_a_background_response_is_traced_by_the_read_that_meters_it(traced, receiver, fake):
    """Its creation is a span with nothing billed yet (cost 0, no tokens, not an estimate); the
    polls that find it in progress have none; the poll that meters its final state has the span
    with the ledger row's figures, under the campaign that created it."""
    proxy = await traced()
    fake.behaviour.prompt_tokens, fake.behaviour.completion_tokens = 1500, 80
    created = await proxy.client(campaign="bg", session="s1").responses.create(
        model="gpt-4o-mini", input="Plan the heist.", background=True)
    reader = proxy.client(campaign="reader", session="r1")
    while (await reader.responses.retrieve(created.id)).status != "completed":
        pass
    await reader.responses.retrieve(created.id)  # read again: metered once, traced once
    creation, billed = await receiver.wait_for(2)
    await asyncio.sleep(0.2)
    assert len(receiver.spans) == 2
    await proxy.flush()
    [row] = await ledger_rows(proxy.engine)
    nothing = creation.attributes
    assert (nothing["llm_proxy.cost.usd"], nothing["gen_ai.usage.input_tokens"],
            nothing["llm_proxy.cost.estimated"]) == (0.0, 0, False)
    attrs = billed.attributes
    assert billed.span.name == f"chat {row.response_model}"
    assert attrs["gen_ai.response.id"] == created.id == row.response_id
    assert attrs["llm_proxy.cost.usd"] == float(row.cost_usd) > 0
    assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"]) == (1500, 80)
    assert (attrs["llm_proxy.campaign.id"], attrs["llm_proxy.session.id"]) == ("bg", "s1")
    assert attrs["gen_ai.response.finish_reasons"] == ["stop"]
