"""Every distinct call is counted and every billable path is gated: reused upstream ids, billable
endpoints the proxy cannot price, background responses, unknown models."""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal
from typing import Any

import aiohttp
import openai
import pytest
from ledger_check import assert_aggregates_match_ledger, ledger_rows
from openai_endpoints import OPENAI_BILLABLE, OPENAI_FREE

from proxy.state import GATE

TAGS = {"X-Campaign-Id": "c1", "X-Session-Id": "s1"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Roll for initiative."}],
        "max_tokens": 10}


async def _set_budget(http: aiohttp.ClientSession, proxy: Any, campaign: str, limit: str) -> None:
    async with http.put(f"{proxy.url}/costs/campaigns/{campaign}/budget",
                        json={"warning_usd": limit, "limit_usd": limit}) as response:
        assert response.status == 200, await response.text()


async def test_reused_response_ids_are_each_a_row_and_the_budget_holds(start_proxy, fake):
    """3,000 calls over 3 campaigns whose upstream draws ids from 999 values (as Ollama does):
    every answered call is a row, aggregates equal the ledger, and the budget of the capped
    campaign holds as if ids were unique."""
    proxy = await start_proxy(cost_limit_threshold_usd=Decimal("1000"),
                              cost_warning_threshold_usd=Decimal("1000"))
    fake.behaviour.id_pool = 999
    fake.behaviour.completion_tokens = 10
    async with aiohttp.ClientSession() as http:
        await _set_budget(http, proxy, "capped", "0.0025")  # ~ half of its 1,000 calls
        answered: dict[str, int] = {"open-1": 0, "open-2": 0, "capped": 0}
        costs: dict[str, Decimal] = dict.fromkeys(answered, Decimal(0))
        refused = 0
        gate = asyncio.Semaphore(24)

        async def call(i: int) -> None:
            nonlocal refused
            campaign = ("open-1", "open-2", "capped")[i % 3]
            async with gate, http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                                       headers={"X-Campaign-Id": campaign,
                                                "X-Session-Id": f"s{i % 7}"}) as response:
                await response.read()
                if response.status == 429:
                    refused += 1
                    return
                assert response.status == 200
                answered[campaign] += 1
                costs[campaign] += Decimal(response.headers["X-Request-Cost-USD"])

        await asyncio.gather(*(call(i) for i in range(3000)))
    await proxy.flush(within=30)
    rows = await ledger_rows(proxy.engine)
    assert len({r.response_id for r in rows}) == 999
    assert sum(answered.values()) + refused == 3000
    assert len(rows) == sum(answered.values())
    sums = await assert_aggregates_match_ledger(proxy.engine)
    for campaign, count in answered.items():
        assert sums[campaign][:2] == (costs[campaign], count)
    assert answered["open-1"] == answered["open-2"] == 1000
    assert 0 < answered["capped"] < 1000 and refused == 1000 - answered["capped"]
    assert costs["capped"] <= Decimal("0.0025")
    print(f"\n{len(rows)} rows for 3000 calls over 999 ids; capped campaign: "
          f"{answered['capped']} answered, spent {costs['capped']} of 0.0025")


async def test_a_campaign_at_its_limit_is_refused_on_every_billable_path(start_proxy, fake):
    proxy = await start_proxy(cost_limit_threshold_usd=Decimal("0"),
                              cost_warning_threshold_usd=Decimal("0"))
    async with aiohttp.ClientSession() as http:
        for path in ["/v1/chat/completions", "/v1//chat/completions", "/v1/chat/completions/",
                     *OPENAI_BILLABLE, "/v1/brand_new/things"]:
            async with http.post(proxy.url + path, json=CHAT, headers=TAGS) as response:
                assert response.status == 429, path
                body = await response.json()
                assert body["error"]["code"] == "budget_exceeded", path
                assert response.headers["x-should-retry"] == "false"
        assert fake.requests == []  # nothing reached the upstream
        async with http.get(f"{proxy.url}/v1/models", headers=TAGS) as response:
            assert response.status == 200
        for path in OPENAI_FREE:  # cancelling and other free calls still work
            async with http.post(proxy.url + path, json={}, headers=TAGS) as response:
                assert response.status == 200, path
    assert len(fake.requests) == 1 + len(OPENAI_FREE)
    await proxy.flush()
    assert await ledger_rows(proxy.engine) == []


async def test_merged_slashes_are_metered_as_the_operation_they_reach(proxy, fake):
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{proxy.url}/v1//chat//completions", json=CHAT, headers=TAGS) as response:
            assert response.status == 200
            assert "X-Request-Cost-USD" in response.headers
    assert fake.requests[-1].path == "/v1/chat/completions"
    await proxy.flush()
    [row] = await ledger_rows(proxy.engine)
    assert (row.operation, row.estimated) == ("chat.completions", False) and row.cost_usd > 0


async def test_billable_calls_the_proxy_cannot_price_are_in_the_ledger_at_zero(proxy, fake):
    client = proxy.client()
    await client.images.generate(model="gpt-image-1", prompt="a goblin king")
    await client.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input="Hail!")
    await client.files.create(file=("notes.jsonl", b'{"a": 1}\n'), purpose="batch")
    await proxy.flush()
    rows = await ledger_rows(proxy.engine)
    assert [(r.operation, r.status_code, r.cost_usd, r.priced_by_default) for r in rows] == [
        ("images.generations", 200, 0, True), ("audio.speech", 200, 0, True),
        ("files", 200, 0, True)]
    assert fake.requests[-1].body.startswith(b"--")  # the multipart upload went through as sent
    await assert_aggregates_match_ledger(proxy.engine)


async def test_a_compaction_is_metered_as_a_responses_call_with_the_sdk(proxy, fake):
    """`client.responses.compact(...)` (POST /v1/responses/compact) is billed by OpenAI by its
    usage, in the Responses shape: one row with the real tokens, priced as a Responses call of the
    requested model (the answer names none), and the reply tells that cost."""
    fake.behaviour.prompt_tokens, fake.behaviour.completion_tokens = 4000, 300
    fake.behaviour.cached_tokens, fake.behaviour.reasoning_tokens = 1000, 200
    raw = await proxy.client(campaign="cmp").responses.with_raw_response.compact(
        model="gpt-4o-mini", input=[{"role": "user", "content": "Roll for initiative."}],
        instructions="Keep what the party planned.")
    compacted = raw.parse()
    assert compacted.output[0].type == "compaction"
    await proxy.flush()
    [row] = await ledger_rows(proxy.engine)
    assert (row.campaign_id, row.operation, row.request_model, row.response_id) == (
        "cmp", "responses", "gpt-4o-mini", compacted.id)
    assert (row.input_tokens, row.cached_input_tokens, row.output_tokens, row.reasoning_tokens,
            row.estimated, row.priced_by_default) == (4000, 1000, 300, 200, False, False)
    # gpt-4o-mini: 3,000 input at $0.15/M, 1,000 cached at $0.075/M, 300 output at $0.60/M
    assert row.cost_usd == Decimal("0.000705")
    assert Decimal(raw.headers["X-Request-Cost-USD"]) == row.cost_usd
    await assert_aggregates_match_ledger(proxy.engine)


async def test_a_background_response_is_metered_once_from_its_final_state(proxy, fake):
    """Created, polled until completed (and read again): exactly one row, with the real usage,
    under the campaign that created it."""
    fake.behaviour.prompt_tokens, fake.behaviour.completion_tokens = 300, 700
    client = proxy.client(campaign="bg", session="s1")
    created = await client.responses.create(model="gpt-4o-mini", input="Tell a long tale.",
                                            background=True)
    assert created.status == "queued"
    await proxy.flush()
    assert await ledger_rows(proxy.engine) == []  # no estimate at creation
    reader = proxy.client(campaign="reader", session="other")
    states = []
    while not states or states[-1] != "completed":
        states.append((await reader.responses.retrieve(created.id)).status)
    await reader.responses.retrieve(created.id)  # read again: not counted again
    stream = await reader.responses.retrieve(created.id, stream=True)
    async for _event in stream:
        pass
    await proxy.flush()
    [row] = await ledger_rows(proxy.engine)
    assert (row.campaign_id, row.session_id, row.input_tokens, row.output_tokens, row.estimated) == (
        "bg", "s1", 300, 700, False)
    assert row.response_id == created.id and row.cost_usd > 0
    assert states == ["in_progress", "in_progress", "completed"]
    await assert_aggregates_match_ledger(proxy.engine)


async def _create_background(client: Any) -> Any:
    return await client.responses.create(model="gpt-4o-mini", input="Plan the heist.",
                                         background=True, max_output_tokens=8000)


async def test_queued_background_responses_hold_their_reservation_until_read(start_proxy, fake):
    """A queued background response is work in flight: it keeps its reservation (8,000 output
    tokens: $0.0048) until its final state is read, so a $0.01 campaign queues two, not twenty;
    once they are read (at their real cost) the budget they held is free again."""
    proxy = await start_proxy()
    fake.behaviour.prompt_tokens, fake.behaviour.completion_tokens = 1000, 1000
    fake.behaviour.background_polls = 0
    async with aiohttp.ClientSession() as http:
        await _set_budget(http, proxy, "bgq", "0.01")
    client = proxy.client(campaign="bgq")
    queued = [await _create_background(client) for _ in range(2)]
    with pytest.raises(openai.RateLimitError) as refused:
        await _create_background(client)  # a third would not fit: none of the two has finished
    message = refused.value.body["message"]  # spend alone ($0) does not explain it: the holds do
    assert "2 queued background response(s) hold $0.0096" in message, message
    for response in queued:  # the read that meters the call says what it cost, as a reply does
        raw = await client.responses.with_raw_response.retrieve(response.id)
        assert raw.parse().status == "completed"
        assert Decimal(raw.headers["X-Request-Cost-USD"]) == Decimal("0.00075")
    third = await _create_background(client)  # their holds ended: $0.0015 spent of $0.01
    assert third.status == "queued"
    await proxy.flush()
    rows = await ledger_rows(proxy.engine)
    assert sorted(r.response_id for r in rows) == sorted(r.id for r in queued)
    assert all(r.cost_usd == Decimal("0.00075") for r in rows)
    await assert_aggregates_match_ledger(proxy.engine)


async def test_a_background_hold_ends_after_background_hold_seconds(start_proxy, fake):
    """A response never read through this process (another replica or worker polls it, or
    nobody does) must not hold the budget forever: the hold ends on time even while this process
    serves nothing (its budget refresh ends it), and the lease that covered it is not kept."""
    proxy = await start_proxy(background_hold_seconds=0.5)
    async with aiohttp.ClientSession() as http:
        await _set_budget(http, proxy, "bgq", "0.01")
    client = proxy.client(campaign="bgq")
    for _ in range(2):
        await _create_background(client)
    with pytest.raises(openai.RateLimitError):
        await _create_background(client)
    view = proxy.app[GATE].views["bgq"]
    assert view.inflight > 0
    async with asyncio.timeout(5):  # no request meanwhile: the refresh (every second) ends it
        while view.inflight:  # noqa: ASYNC110 (the gate's state, not an event)
            await asyncio.sleep(0.05)
    assert view.lease_until == 0.0  # renegotiated by the next admission, not renewed as it was
    assert (await _create_background(client)).status == "queued"


async def test_a_background_response_read_by_another_replica_is_still_one_row(start_proxy, fake):
    fake.behaviour.background_polls = 0
    first, second = await start_proxy(), await start_proxy()
    created = await first.client(campaign="bg").responses.create(
        model="gpt-4o-mini", input="hi", background=True)
    for proxy in (first, second, second):
        await proxy.client(campaign="bg").responses.retrieve(created.id)
    for proxy in (first, second):
        await proxy.flush()
    [row] = await ledger_rows(first.engine)
    assert row.campaign_id == "bg" and not row.estimated
    await assert_aggregates_match_ledger(first.engine)


async def test_a_cancelled_background_response_is_billed_for_its_work(proxy, fake):
    client = proxy.client(campaign="bg")
    created = await client.responses.create(model="gpt-4o-mini", input="hi", background=True)
    cancelled = await client.responses.cancel(created.id)
    assert cancelled.status == "cancelled"
    await proxy.flush()
    [row] = await ledger_rows(proxy.engine)
    assert (row.input_tokens, row.output_tokens, row.estimated) == (12, 1, False)


@pytest.mark.parametrize("whole", [False, True])
async def test_usage_on_every_chunk_is_billed_at_the_last_usage(proxy, fake, whole):
    """A compatible upstream that sends the usage so far on every chunk (vLLM's
    `continuous_usage_stats`): the call is billed at the final usage whether the events arrive one
    by one or all at once, never at the first usage seen."""
    fake.behaviour.running_usage = True
    fake.behaviour.stream_whole = whole
    fake.behaviour.chunk_delay = 0.01
    fake.behaviour.completion_tokens = 500
    stream = await proxy.client().chat.completions.create(
        model="gpt-4o-mini", messages=CHAT["messages"], stream=True,
        stream_options={"include_usage": True})
    usage = [chunk.usage async for chunk in stream if chunk.usage is not None]
    assert usage[-1].completion_tokens == 500 and usage[0].completion_tokens == 0
    await proxy.flush()
    [row] = await ledger_rows(proxy.engine)
    assert (row.output_tokens, row.estimated) == (500, False)


async def test_unknown_models_are_counted_and_logged_once(proxy, fake, caplog):
    caplog.set_level(logging.WARNING, logger="costing.meter")
    client = proxy.client()
    for _ in range(3):
        await client.chat.completions.create(model="homebrew-llm", messages=CHAT["messages"])
    await client.chat.completions.create(model="gpt-4o-mini", messages=CHAT["messages"])
    await proxy.flush()
    assert proxy.registry.get_sample_value("llm_requests_priced_by_default_total",
                                           {"model": "homebrew-llm"}) == 3
    assert proxy.registry.get_sample_value("llm_requests_priced_by_default_total",
                                           {"model": "gpt-4o-mini-2024-07-18"}) is None
    logged = [r for r in caplog.records if "homebrew-llm" in r.getMessage()]
    assert len(logged) == 1 and "PRICES_FILE" in logged[0].getMessage()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_reused_id_in_the_same_campaign_is_two_rows_with_the_sdk(proxy, fake, stream):
    fake.behaviour.response_id = "chatcmpl-123"
    client = proxy.client()
    for _ in range(2):
        result = await client.chat.completions.create(model="gpt-4o-mini", messages=CHAT["messages"],
                                                      stream=stream)
        if stream:
            async for _chunk in result:  # type: ignore[union-attr]
                pass
    await proxy.flush()
    rows = await ledger_rows(proxy.engine)
    assert [r.response_id for r in rows] == ["chatcmpl-123", "chatcmpl-123"]
    assert len({r.id for r in rows}) == 2 and all(r.cost_usd > 0 for r in rows)
