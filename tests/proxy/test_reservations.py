"""Reservations that fit the model: a request without an output cap reserves the model's largest
answer for each choice, at the requested tier's price; a follow-up reserves the earlier context
OpenAI bills it for, images what their model bills for one; a budget smaller than one worst
case refuses only the calls that cannot fit, saying why, while /costs shows what remains."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from decimal import Decimal

import aiohttp
import openai
import pytest
from ledger_check import assert_aggregates_match_ledger, ledger_rows

from costing.budget import worst_case_units
from costing.money import format_units, from_units
from costing.pricing import PriceTable
from costing.usage import Operation, request_facts

PRICES = PriceTable.load(default_per_1k_prompt=Decimal("0.00015"),
                         default_per_1k_completion=Decimal("0.0006"))
M = Decimal(1_000_000)
RIDDLE = [{"role": "user", "content": "Think hard: what walks on four legs at dawn?"}]


def reserved(body: dict, default: int = 4096) -> Decimal:
    facts = request_facts(Operation.CHAT, body)
    return from_units(worst_case_units(PRICES.quote(facts.model, facts.service_tier), facts, default))


def test_an_uncapped_reasoning_call_reserves_the_models_largest_answer():
    facts = request_facts(Operation.CHAT, {"model": "o3", "messages": RIDDLE})
    # o3: 100,000 output tokens at most, $8 per 1M output, $2 per 1M input.
    assert reserved({"model": "o3", "messages": RIDDLE}) == (facts.prompt_tokens * 2 + 100_000 * 8) / M


def test_n_choices_without_a_cap_reserve_each_choice():
    one = reserved({"model": "gpt-4o-mini", "messages": RIDDLE})
    three = reserved({"model": "gpt-4o-mini", "messages": RIDDLE, "n": 3})
    prompt = request_facts(Operation.CHAT, {"model": "gpt-4o-mini", "messages": RIDDLE}).prompt_tokens
    assert one == (prompt * Decimal("0.15") + 16_384 * Decimal("0.60")) / M
    assert three == (prompt * Decimal("0.15") + 3 * 16_384 * Decimal("0.60")) / M


def test_an_unknown_model_reserves_the_default_cap():
    assert reserved({"model": "house-llama", "messages": RIDDLE}, default=1000) == (
        request_facts(Operation.CHAT, {"messages": RIDDLE}).prompt_tokens * Decimal("0.15")
        + 1000 * Decimal("0.60")) / M


def test_a_reservation_prices_the_requested_tier_and_the_dearer_audio_output():
    body = {"model": "gpt-5", "messages": RIDDLE, "max_completion_tokens": 1000}
    assert reserved({**body, "service_tier": "priority"}) == 2 * reserved(body)
    audio = {"model": "gpt-4o-audio-preview", "messages": RIDDLE, "max_completion_tokens": 1000}
    prompt = request_facts(Operation.CHAT, audio).prompt_tokens
    assert reserved(audio) == (prompt * Decimal("2.50") + 1000 * 80) / M  # audio output: $80 per 1M


async def test_a_tiny_budget_admits_calls_that_fit_and_says_why_the_others_cannot(start_proxy, fake):
    """Limit $0.002. An uncapped gpt-4o-mini call may cost ~$0.0098 (16,384 output tokens): it is
    refused with a message naming the cap to set, while /costs still says ok with $0.002 left.
    The same call with max_tokens=100 fits and goes through."""
    proxy = await start_proxy(cost_warning_threshold_usd=Decimal("0.001"),
                              cost_limit_threshold_usd=Decimal("0.002"))
    client = proxy.client(campaign="tiny", max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="gpt-4o-mini", messages=RIDDLE)
    message = caught.value.body["message"]
    assert "cannot afford this request" in message and "16384 output tokens" in message
    assert "max_completion_tokens" in message
    assert fake.hits("/chat/completions") == 0
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/costs/campaigns/tiny") as response:
            budget = (await response.json())["budget"] if response.status == 200 else None
    assert budget is None or (budget["status"] == "ok" and budget["remaining_usd"] == "0.002")
    fake.behaviour.prompt_tokens, fake.behaviour.completion_tokens = 20, 100
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=RIDDLE,
                                                                 max_tokens=100)
    assert Decimal(raw.headers["X-Request-Cost-USD"]) == (20 * Decimal("0.15") + 100 * Decimal("0.60")) / M
    assert Decimal(raw.headers["X-Campaign-Remaining-USD"]) > 0
    await proxy.flush()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/costs/campaigns/tiny") as response:
            budget = (await response.json())["budget"]
    assert budget["status"] == "ok" and Decimal(budget["remaining_usd"]) == Decimal("0.002") - Decimal(
        raw.headers["X-Request-Cost-USD"])


async def test_forty_concurrent_uncapped_reasoning_calls_stay_within_a_one_dollar_limit(start_proxy, fake):
    """#15 acceptance 5: 40 concurrent o3 calls without max_completion_tokens, each answered with
    30,000 output tokens (29,000 reasoning) and a prompt of 500 tokens (the proxy estimates the
    prompt from its characters: the estimate's error is the only way past the limit, at most the
    prompt's underestimate x $2 per 1M input for each call in flight)."""
    limit = Decimal(1)
    proxy = await start_proxy(cost_warning_threshold_usd=Decimal(0), cost_limit_threshold_usd=limit)
    fake.behaviour.prompt_tokens, fake.behaviour.completion_tokens = 500, 30_000
    fake.behaviour.reasoning_tokens, fake.behaviour.model = 29_000, "o3-2025-04-16"
    fake.behaviour.hold = asyncio.Event()
    client = proxy.client(campaign="o3-burst", max_retries=0)

    async def call() -> bool:
        try:
            await client.chat.completions.create(model="o3", messages=RIDDLE)
            return True
        except openai.RateLimitError:
            return False

    tasks = [asyncio.create_task(call()) for _ in range(40)]
    for _ in range(400):  # every request decided (admitted ones wait at the upstream)
        if sum(t.done() for t in tasks) + fake.hits("/chat/completions") >= 40:
            break
        await asyncio.sleep(0.02)
    fake.behaviour.hold.set()
    admitted = sum(await asyncio.gather(*tasks))
    await proxy.flush()
    rows = [r for r in await ledger_rows(proxy.engine) if r.campaign_id == "o3-burst"]
    spent = sum((r.cost_usd for r in rows), Decimal(0))
    prompt_estimate = request_facts(Operation.CHAT, {"model": "o3", "messages": RIDDLE}).prompt_tokens
    error_bound = admitted * max(500 - prompt_estimate, 0) * Decimal(2) / M
    print(f"\n40 concurrent uncapped o3 calls, $1.00 limit: {admitted} admitted, {40 - admitted} refused, "
          f"recorded ${spent} (each ${(500 * 2 + 30_000 * 8) / M}); estimate error bound ${error_bound}")
    assert admitted >= 1 and len(rows) == admitted
    assert spent <= limit + error_bound
    await assert_aggregates_match_ledger(proxy.engine)


async def test_a_batch_of_prompts_and_a_text_that_looks_like_a_data_url_reserve_what_they_may_cost(
        start_proxy, fake):
    """Against a $0.01 limit: 100 prompts of 400 tokens each may cost $0.08 (as `n=100` may) and
    are refused, one prompt fits; a 400,000-character message is reserved as text (~$0.25 on
    gpt-4o) even when it starts with `data:`."""
    proxy = await start_proxy(cost_warning_threshold_usd=Decimal("0.01"),
                              cost_limit_threshold_usd=Decimal("0.01"))
    client = proxy.client(campaign="batch", max_retries=0)
    model = "gpt-3.5-turbo-instruct"
    with pytest.raises(openai.RateLimitError):
        await client.completions.create(model=model, prompt=["Name a goblin."] * 100, max_tokens=400)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(
            model="gpt-4o", max_tokens=10,
            messages=[{"role": "user", "content": "data: " + "goblin " * 57_000}])
    assert fake.hits("/completions") == 0
    await client.completions.create(model=model, prompt=["Name a goblin."], max_tokens=400)
    assert fake.hits("/completions") == 1


async def _burst(fake, path: str, calls: list[Callable[[], Awaitable[bool]]]) -> int:
    """Start every call at once, the admitted ones held at the upstream until all are decided;
    how many were admitted."""
    fake.behaviour.hold = asyncio.Event()
    tasks = [asyncio.create_task(call()) for call in calls]
    for _ in range(400):
        if sum(t.done() for t in tasks) + fake.hits(path) >= len(tasks):
            break
        await asyncio.sleep(0.02)
    fake.behaviour.hold.set()
    return sum(await asyncio.gather(*tasks))


async def _spent(proxy, campaign: str) -> tuple[Decimal, int]:
    await proxy.flush()
    rows = [r for r in await ledger_rows(proxy.engine) if r.campaign_id == campaign]
    return sum((r.cost_usd for r in rows), Decimal(0)), len(rows)


@pytest.mark.parametrize("previous", ["in the ledger", "unknown to the ledger"])
async def test_a_burst_of_follow_ups_billed_100k_context_tokens_stays_within_the_limit(
        start_proxy, fake, previous):
    """10 concurrent gpt-4o follow-ups (`previous_response_id`, max_output_tokens 50), each billed
    100,000 input tokens of earlier context, against a $1.00 limit (before: only the new input
    was reserved, all were admitted, $2.505 spent). A previous response the ledger holds
    reserves its recorded tokens (100,000 + 50), one it does not (answered through another
    replica, or before this ledger) gpt-4o's whole context window (128,000 tokens, $0.32): at
    most 3 fit, and spend stays within the limit plus the estimate error of the calls' own
    input (characters / 4)."""
    limit = Decimal(1)
    proxy = await start_proxy(cost_warning_threshold_usd=Decimal(0), cost_limit_threshold_usd=limit)
    fake.behaviour.prompt_tokens, fake.behaviour.completion_tokens = 100_000, 50
    previous_id = "resp_answered_elsewhere"
    if previous == "in the ledger":
        earlier = await proxy.client(campaign="earlier").responses.create(
            model="gpt-4o", input="Read this long report.", max_output_tokens=50)
        previous_id = earlier.id
    body = {"model": "gpt-4o", "input": "And then?", "max_output_tokens": 50,
            "previous_response_id": previous_id}
    client = proxy.client(campaign="follow-ups", max_retries=0)
    refusals: list[str] = []

    async def call() -> bool:
        try:
            await client.responses.create(**body)
            return True
        except openai.RateLimitError as exc:
            refusals.append(exc.body["message"])
            return False

    admitted = await _burst(fake, "/responses", [call] * 10)
    spent, rows = await _spent(proxy, "follow-ups")
    own = request_facts(Operation.RESPONSES, body).prompt_tokens
    reserved_input = own + 100_050 if previous == "in the ledger" else 128_000
    error_bound = admitted * max(100_000 - reserved_input, 0) * Decimal("2.50") / M
    print(f"\n10 concurrent follow-ups ({previous}), $1.00 limit: {admitted} admitted, recorded "
          f"${spent} (each ${(100_000 * Decimal('2.50') + 50 * 10) / M}); error bound ${error_bound}")
    assert spent <= limit + error_bound
    assert 1 <= admitted <= 3 and rows == admitted
    assert len(refusals) == 10 - admitted
    assert all(f"continues response '{previous_id}' (previous_response_id)" in m for m in refusals)
    if previous == "in the ledger":
        assert "whose 100050 recorded tokens" in refusals[0]
    else:
        assert "does not hold (yet)" in refusals[0] and "(128000 tokens)" in refusals[0]
    await assert_aggregates_match_ledger(proxy.engine)


@pytest.mark.parametrize("written", [False, True])
async def test_a_follow_up_reserves_its_previous_responses_recorded_tokens(start_proxy, fake, written):
    """Limit $0.55; the first turn is billed 100,000 input + 500 output tokens ($0.255), leaving
    $0.295. A follow-up of it reserves those 100,500 tokens plus its own input: with
    max_output_tokens 20,000 ($0.451) it is refused, the message naming what it reserved; with
    50 ($0.2518) it goes through. One continuing a response the ledger does not hold reserves
    gpt-4o's window ($0.3205): refused. The previous turn is found in the ledger's unwritten
    entries or, once written, in the database."""
    proxy = await start_proxy(cost_warning_threshold_usd=Decimal(0),
                              cost_limit_threshold_usd=Decimal("0.55"),
                              ledger_flush_interval_seconds=0.05 if written else 30.0)
    client = proxy.client(campaign="chain", max_retries=0)
    fake.behaviour.prompt_tokens, fake.behaviour.completion_tokens = 100_000, 500
    first = await client.responses.create(model="gpt-4o", input="Summarise this book.",
                                          max_output_tokens=500)
    if written:
        await proxy.flush()
        assert len(proxy.ledger) == 0
    else:
        assert len(proxy.ledger) == 1
    with pytest.raises(openai.RateLimitError) as unknown:
        await client.responses.create(model="gpt-4o", input="And then?", max_output_tokens=50,
                                      previous_response_id="resp_not_here")
    assert "does not hold (yet)" in unknown.value.body["message"]
    large = {"model": "gpt-4o", "input": "And then?", "max_output_tokens": 20_000,
             "previous_response_id": first.id}
    with pytest.raises(openai.RateLimitError) as refused:
        await client.responses.create(**large)
    facts = replace(request_facts(Operation.RESPONSES, large), context_tokens=100_500)
    reservation = worst_case_units(PRICES.quote("gpt-4o"), facts, 4096)
    assert from_units(reservation) == ((facts.prompt_tokens + 100_500) * Decimal("2.50")
                                       + 20_000 * 10) / M
    message = refused.value.body["message"]
    assert f"may cost up to ${format_units(reservation)}" in message
    assert f"continues response '{first.id}'" in message and "100500 recorded tokens" in message
    assert fake.hits("/responses") == 1
    fake.behaviour.prompt_tokens, fake.behaviour.completion_tokens = 100_510, 50
    await client.responses.create(model="gpt-4o", input="And then?", max_output_tokens=50,
                                  previous_response_id=first.id)
    assert fake.hits("/responses") == 2


async def test_a_burst_of_gpt_4o_mini_image_calls_stays_within_the_limit(start_proxy, fake):
    """20 concurrent gpt-4o-mini chat calls of 10 images each, billed as gpt-4o-mini bills its
    largest image (2,833 + 8 x 5,667 = 48,169 tokens), against a $0.20 limit (before: 1,105
    tokens an image were reserved, all 20 admitted, $1.45 spent). Each reserves ~$0.0723: 2 fit."""
    limit = Decimal("0.20")
    proxy = await start_proxy(cost_warning_threshold_usd=Decimal(0), cost_limit_threshold_usd=limit)
    fake.behaviour.prompt_tokens, fake.behaviour.completion_tokens = 10 * 48_169 + 12, 50
    image = {"type": "image_url", "image_url": {"url": "https://example.com/goblin.png"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "Which goblin is the king?"},
                                             *[image] * 10]}]
    client = proxy.client(campaign="pictures", max_retries=0)
    refusals: list[str] = []

    async def call() -> bool:
        try:
            await client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=50)
            return True
        except openai.RateLimitError as exc:
            refusals.append(exc.body["message"])
            return False

    admitted = await _burst(fake, "/chat/completions", [call] * 20)
    spent, rows = await _spent(proxy, "pictures")
    # The documented error: the text's estimate (characters / 4) against the 12 tokens billed
    # for it; the images are reserved at the most they can be billed.
    text = request_facts(Operation.CHAT, {"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": [messages[0]["content"][0]]}]}).prompt_tokens
    error_bound = admitted * max(12 - text, 0) * Decimal("0.15") / M
    print(f"\n20 concurrent gpt-4o-mini calls of 10 images, $0.20 limit: {admitted} admitted, "
          f"recorded ${spent}; error bound ${error_bound}")
    assert spent <= limit + error_bound
    assert 1 <= admitted <= 2 and rows == admitted
    assert "Its 10 image(s) reserve 481690 tokens: up to 48169 each" in refusals[0]
    assert "(2833 at detail low)" in refusals[0]


@pytest.mark.parametrize(("named", "said"), [
    ({"conversation": "conv_1"}, "It names a conversation (`conversation`)"),
    ({"prompt": {"id": "pmpt_1", "variables": {"city": "Paris"}}},
     "It names a stored prompt template (`prompt.id`)"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "Summarise."},
                                             {"type": "input_file", "file_id": "file-1"}]}]},
     "It names a file by `file_id` or `file_url`"),
])
async def test_a_call_naming_input_the_proxy_cannot_size_reserves_the_context_window(
        start_proxy, fake, named, said):
    """Against a $0.10 limit: a gpt-4o call naming a conversation, a stored prompt or a file by
    id reserves gpt-4o's whole context window as input (128,000 tokens, $0.32) and is refused,
    the message saying why; the same call with its input in the request fits."""
    proxy = await start_proxy(cost_warning_threshold_usd=Decimal(0),
                              cost_limit_threshold_usd=Decimal("0.10"))
    client = proxy.client(campaign="unsized", max_retries=0)
    body = {"model": "gpt-4o", "input": "Summarise.", "max_output_tokens": 50, **named}
    with pytest.raises(openai.RateLimitError) as refused:
        await client.responses.create(**body)
    message = refused.value.body["message"]
    assert said in message and "whole context window of gpt-4o (128000 tokens)" in message
    assert "may cost up to $0.3205" in message
    assert fake.hits("/responses") == 0
    await client.responses.create(model="gpt-4o", input="Summarise.", max_output_tokens=50)
    assert fake.hits("/responses") == 1
