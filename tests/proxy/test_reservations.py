"""Reservations that fit the model: a request without an output cap reserves the model's largest
answer for each choice, at the requested tier's price, and images what their model bills for one;
a budget smaller than one worst case refuses only the calls that cannot fit, saying why, while
/costs shows what remains."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from decimal import Decimal

import aiohttp
import openai
import pytest
from ledger_check import assert_aggregates_match_ledger, ledger_rows

from costing.budget import worst_case_units
from costing.money import from_units
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

