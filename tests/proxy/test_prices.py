"""Every billed dimension through the proxy, with the real SDK, streamed and not, chat and
Responses: each call is recorded at the price OpenAI publishes, computed here by hand, and the
cost header, the ledger, /costs and /metrics agree."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aiohttp
import openai
import pytest
from ledger_check import assert_aggregates_match_ledger, ledger_rows
from test_metrics import _scrape

M = Decimal(1_000_000)
K = Decimal(1000)


@dataclass
class Case:
    name: str
    api: str  # chat, responses, or background (a Responses call created in the background)
    stream: bool
    model: str
    expected: Decimal  # by hand, from OpenAI's published prices
    behaviour: dict[str, Any]
    request: dict[str, Any] = field(default_factory=dict)
    tier: str | None = None
    searches: int = 0


CASES = [
    # gpt-5 priority: $2.50 in / $20.00 out per 1M (pricing page, Priority processing).
    Case("priority", "chat", False, "gpt-5", (100_000 * Decimal("2.50") + 100_000 * 20) / M,
         {"prompt_tokens": 100_000, "completion_tokens": 100_000}, {"service_tier": "priority"}, "priority"),
    # gpt-5.1-codex priority: $2.50 in / $20.00 out per 1M (Priority processing page); the price
    # library lacks the model, the shipped overrides carry its tiers.
    Case("codex-priority", "responses", False, "gpt-5.1-codex",
         (100_000 * Decimal("2.50") + 100_000 * 20) / M,
         {"prompt_tokens": 100_000, "completion_tokens": 100_000}, {"service_tier": "priority"}, "priority"),
    # gpt-5 flex: $0.625 in / $5.00 out per 1M (pricing page, Flex processing).
    Case("flex", "responses", True, "gpt-5", (100_000 * Decimal("0.625") + 100_000 * 5) / M,
         {"prompt_tokens": 100_000, "completion_tokens": 100_000}, {"service_tier": "flex"}, "flex"),
    # An asked-for tier the upstream did not grant is billed as the tier that served it.
    Case("flex-refused", "chat", True, "gpt-5", (1000 * Decimal("1.25") + 1000 * 10) / M,
         {"prompt_tokens": 1000, "completion_tokens": 1000, "service_tier": "default"},
         {"service_tier": "flex"}, "default"),
    # gpt-4o-audio-preview: text $2.50/$10.00, audio $40/$80 per 1M.
    Case("audio", "chat", True, "gpt-4o-audio-preview",
         (100_000 * Decimal("2.50") + 900_000 * 40 + 100_000 * 10 + 900_000 * 80) / M,
         {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000, "audio_input_tokens": 900_000,
          "audio_output_tokens": 900_000}),
    Case("audio-json", "chat", False, "gpt-4o-mini-audio-preview",
         (600 * Decimal("0.15") + 400 * 10 + 100 * Decimal("0.60") + 200 * 20) / M,
         {"prompt_tokens": 1000, "completion_tokens": 300, "audio_input_tokens": 400,
          "audio_output_tokens": 200}),
    # gpt-4o-mini-search-preview: $0.15/$0.60 per 1M, and $25 per 1k searches, one per call.
    Case("search-preview", "chat", False, "gpt-4o-mini-search-preview",
         (1000 * Decimal("0.15") + 300 * Decimal("0.60")) / M + 25 / K,
         {"prompt_tokens": 1000, "completion_tokens": 300}, searches=1),
    # Responses web_search tool on gpt-5: $10 per 1k calls, two `web_search_call` items.
    Case("web-search", "responses", False, "gpt-5", (1000 * Decimal("1.25") + 500 * 10) / M + 2 * 10 / K,
         {"prompt_tokens": 1000, "completion_tokens": 500, "web_search_calls": 2}, searches=2),
    Case("web-search-stream", "responses", True, "gpt-5", (1000 * Decimal("1.25") + 500 * 10) / M + 10 / K,
         {"prompt_tokens": 1000, "completion_tokens": 500, "web_search_calls": 1}, searches=1),
    # The Responses web_search_preview tool on a non-reasoning model: $25 per 1k calls.
    Case("search-preview-tool", "responses", False, "gpt-4.1", (1000 * 2 + 500 * 8) / M + 25 / K,
         {"prompt_tokens": 1000, "completion_tokens": 500, "web_search_calls": 1},
         {"tools": [{"type": "web_search_preview"}]}, searches=1),
    # ... also in the background: the final state, read later, is priced by the tools it echoes.
    Case("search-preview-background", "background", False, "gpt-4.1", (1000 * 2 + 500 * 8) / M + 25 / K,
         {"prompt_tokens": 1000, "completion_tokens": 500, "web_search_calls": 1, "background_polls": 0},
         {"tools": [{"type": "web_search_preview"}]}, searches=1),
    Case("search-tool", "responses", True, "gpt-4.1", (1000 * 2 + 500 * 8) / M + 10 / K,
         {"prompt_tokens": 1000, "completion_tokens": 500, "web_search_calls": 1},
         {"tools": [{"type": "web_search"}]}, searches=1),
    # Fine-tuned gpt-4o-mini: $0.30 in, $0.15 cached, $1.20 out per 1M.
    Case("fine-tune", "chat", True, "ft:gpt-4o-mini-2024-07-18:org::abc123",
         (600 * Decimal("0.30") + 400 * Decimal("0.15") + 1000 * Decimal("1.20")) / M,
         {"prompt_tokens": 1000, "cached_tokens": 400, "completion_tokens": 1000}),
    Case("fine-tune-json", "responses", False, "ft:gpt-4.1-mini-2025-04-14:org:house:x1",
         (1000 * Decimal("0.80") + 1000 * Decimal("3.20")) / M,
         {"prompt_tokens": 1000, "completion_tokens": 1000}),
    # Dated snapshots: gpt-4o-2024-05-13 has its own price ($5/$15), gpt-4o-2024-08-06 is gpt-4o's.
    Case("snapshot-own", "responses", False, "gpt-4o-2024-05-13", (1000 * 5 + 1000 * 15) / M,
         {"prompt_tokens": 1000, "completion_tokens": 1000}),
    Case("snapshot-base", "chat", False, "gpt-4o-2024-08-06", (1000 * Decimal("2.50") + 1000 * 10) / M,
         {"prompt_tokens": 1000, "completion_tokens": 1000}),
    # gpt-6.1-sol: $2 input, $0.10 cached, $2.50 cache writes (1.25x input), $10 output per 1M;
    # writes are part of the input. The call: $0.134 (it was billed $0.110).
    Case("cache-writes", "responses", False, "gpt-6.1-sol",
         (2000 * 2 + 48_000 * Decimal("2.50") + 1000 * 10) / M,
         {"prompt_tokens": 50_000, "cache_write_tokens": 48_000, "completion_tokens": 1000}),
    Case("cache-writes-stream", "responses", True, "gpt-6.1-sol",
         (2000 * 2 + 48_000 * Decimal("2.50") + 1000 * 10) / M,
         {"prompt_tokens": 50_000, "cache_write_tokens": 48_000, "completion_tokens": 1000}),
    Case("cache-writes-chat", "chat", False, "gpt-6.1-sol",
         (1000 * 2 + 5000 * Decimal("0.10") + 4000 * Decimal("2.50") + 300 * 10) / M,
         {"prompt_tokens": 10_000, "cached_tokens": 5000, "cache_write_tokens": 4000,
          "completion_tokens": 300}),
    Case("cache-writes-chat-stream", "chat", True, "gpt-6.1-sol",
         (1000 * 2 + 5000 * Decimal("0.10") + 4000 * Decimal("2.50") + 300 * 10) / M,
         {"prompt_tokens": 10_000, "cached_tokens": 5000, "cache_write_tokens": 4000,
          "completion_tokens": 300}),
    # A model without a cache-write price (gpt-5: $1.25 in, $10 out) bills them as input.
    Case("cache-writes-unpriced", "chat", True, "gpt-5", (1000 * Decimal("1.25") + 100 * 10) / M,
         {"prompt_tokens": 1000, "cache_write_tokens": 800, "completion_tokens": 100}),
]


async def _call(proxy: Any, case: Case) -> str | None:
    """Make the call; the X-Request-Cost-USD header of a non-streamed one."""
    client = proxy.client(campaign=f"p-{case.name}")
    if case.api == "chat":
        kwargs = {"model": case.model, "messages": [{"role": "user", "content": "hi"}],
                  "max_completion_tokens": 100, **case.request}
        if case.stream:
            async for _ in await client.chat.completions.create(stream=True, **kwargs):
                pass
            return None
        raw = await client.chat.completions.with_raw_response.create(**kwargs)
        return raw.headers.get("X-Request-Cost-USD")
    kwargs = {"model": case.model, "input": "hi", "max_output_tokens": 100, **case.request}
    if case.api == "background":
        created = await client.responses.create(background=True, **kwargs)
        while (await client.responses.retrieve(created.id)).status != "completed":
            pass
        return None
    if case.stream:
        async for _ in await client.responses.create(stream=True, **kwargs):
            pass
        return None
    raw = await client.responses.with_raw_response.create(**kwargs)
    return raw.headers.get("X-Request-Cost-USD")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_each_dimension_is_recorded_at_the_published_price(start_proxy, fake, case):
    proxy = await start_proxy(cost_limit_threshold_usd=Decimal(1000))
    for key, value in case.behaviour.items():
        setattr(fake.behaviour, key, value)
    header = await _call(proxy, case)
    if header is not None:
        assert Decimal(header) == case.expected
    await proxy.flush()
    [row] = [r for r in await ledger_rows(proxy.engine) if r.campaign_id == f"p-{case.name}"]
    assert row.cost_usd == case.expected
    assert not row.priced_by_default and not row.estimated
    assert row.service_tier == (case.tier or case.behaviour.get("service_tier"))
    assert (row.audio_input_tokens, row.audio_output_tokens) == (
        case.behaviour.get("audio_input_tokens", 0), case.behaviour.get("audio_output_tokens", 0))
    assert row.web_search_calls == case.searches
    assert row.cache_write_input_tokens == (case.behaviour.get("cache_write_tokens") or 0)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/costs/campaigns/p-{case.name}") as response:
            campaign = await response.json()
    assert Decimal(campaign["cost_usd"]) == case.expected
    assert campaign["tokens"]["audio_input"] == row.audio_input_tokens
    assert campaign["tokens"]["audio_output"] == row.audio_output_tokens
    assert campaign["tokens"]["cache_write_input"] == row.cache_write_input_tokens
    samples = await _scrape(proxy)
    cost = sum(v for (n, labels), v in samples.items()
               if n == "llm_cost_usd_total" and ("campaign", f"p-{case.name}") in labels)
    assert cost == pytest.approx(float(case.expected), rel=1e-12)
    for kind, column in (("audio_input", "audio_input_tokens"), ("audio_output", "audio_output_tokens"),
                         ("cache_write_input", "cache_write_input_tokens")):
        tokens = sum(v for (n, labels), v in samples.items() if n == "llm_tokens_total"
                     and ("campaign", f"p-{case.name}") in labels and ("type", kind) in labels)
        assert tokens == getattr(row, column)
    await assert_aggregates_match_ledger(proxy.engine)


async def test_a_reservation_prices_the_requested_tier(start_proxy, fake):
    """gpt-5 priority costs twice the standard price: a call that fits the budget at the
    standard price but not at priority is refused before it is forwarded."""
    # 10,000 output tokens: $0.10 standard, $0.20 priority.
    proxy = await start_proxy(cost_warning_threshold_usd=Decimal(0), cost_limit_threshold_usd=Decimal("0.15"))
    client = proxy.client(campaign="tiers")
    body = {"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 10_000}
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(service_tier="priority", **body)
    assert "cannot afford" in caught.value.body["message"]
    assert fake.hits("/chat/completions") == 0
    await client.chat.completions.create(**body)
    assert fake.hits("/chat/completions") == 1


async def test_a_search_model_call_the_upstream_refuses_costs_nothing(start_proxy, fake):
    """A search model's per-call search is billed on answered calls: OpenAI bills no failed
    request (a 429 retry storm must not eat the budget at $25 per thousand)."""
    proxy = await start_proxy()
    client = proxy.client(campaign="search-refused")
    fake.behaviour.status = 429
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-4o-mini-search-preview",
                                             messages=[{"role": "user", "content": "news?"}])
    await proxy.flush()
    [row] = await ledger_rows(proxy.engine)
    assert (row.status_code, row.cost_usd, row.web_search_calls) == (429, 0, 0)
