"""Our costs against genai-prices' own `calc_price`, to the last 1e-10 USD, over (model, usage
shape, service tier, date) cases; where our overrides differ, the figure is OpenAI's published
price, computed here by hand."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal

import genai_prices
import pytest

from costing.money import QUANTUM
from costing.pricing import PriceTable, cost
from costing.usage import Usage

NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)
M = Decimal(1_000_000)
TABLE = PriceTable.load(default_per_1k_prompt=Decimal("0.00015"),
                        default_per_1k_completion=Decimal("0.0006"))

# (input incl. cached and audio, cached, output incl. reasoning and audio, audio in, audio out, searches)
SHAPES = {
    "plain": (1000, 0, 500, 0, 0, 0),
    "cached": (20_000, 15_000, 700, 0, 0, 0),
    "reasoning": (512, 0, 31_337, 0, 0, 0),
    "search": (3000, 1000, 800, 0, 0, 2),
}
TIERED = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "o3", "o4-mini", "gpt-5", "gpt-5-mini",
          "gpt-5-nano"]
PLAIN = ["gpt-4.1-nano", "o1", "o3-mini", "o1-pro", "gpt-4-32k", "gpt-5-codex", "computer-use-preview",
         "gpt-4o-2024-05-13", "gpt-4o-mini-2024-07-18", "gpt-3.5-turbo", "chatgpt-4o-latest",
         "text-embedding-3-small", "gpt-5-pro", "codex-mini-latest", "gpt-4o-search-preview"]
# The newest models bill prompt-cache writes at their own price (1.25x input).
CACHE_WRITES = ["gpt-5.6-cyber", "gpt-5.6-luna", "gpt-5.6-sol", "gpt-5.6-terra", "gpt-6-astra",
                "gpt-6-cyber", "gpt-6-luna", "gpt-6-rosalind", "gpt-6-sol", "gpt-6.1-sol", "gpt-6.1-terra"]


def _cases() -> list[tuple[str, str, str | None, datetime]]:
    cases = [(m, s, None, NOW) for m, s in itertools.product(PLAIN, ("plain", "cached"))]
    cases += [(m, s, t, NOW) for m, s, t in itertools.product(
        TIERED, ("cached", "reasoning", "search"), (None, "priority", "fast", "flex", "batch"))]
    cases += [
        ("gpt-audio", "audio", None, NOW),
        ("gpt-audio-mini", "audio", None, NOW),
        ("gpt-5.4", "long", None, NOW),  # above 272k input tokens: the long-context price
        ("gpt-5.4", "plain", "flex", NOW),
        ("gpt-5.4", "long", "priority", NOW),
        ("gpt-5.4", "plain", "fast", NOW),  # OpenAI's new name of priority processing
        ("o3", "plain", None, datetime(2025, 6, 1, tzinfo=UTC)),  # before the o3 price cut
        ("o3", "plain", None, datetime(2025, 6, 10, tzinfo=UTC)),  # its first day
        ("gpt-5", "cached", "priority", datetime(2026, 10, 1, tzinfo=UTC)),  # before tier prices
    ]
    cases += [(m, s, None, NOW)
              for m, s in itertools.product(CACHE_WRITES, ("cache_write", "cache_write_long"))]
    cases += [(m, "cache_write", t, NOW) for m, t in itertools.product(
        ("gpt-6.1-sol", "gpt-5.6-luna"), ("priority", "fast", "flex", "batch"))]
    cases += [("gpt-5.6-sol", "cache_write", None, datetime(2026, 8, 1, tzinfo=UTC))]  # before its cut
    return cases


EXTRA_SHAPES = {"audio": (10_000, 0, 5000, 8000, 4000, 0), "long": (300_000, 100_000, 2000, 0, 0, 0)}
# ... and prompt-cache writes (part of the input, as reads are): the Responses call of the issue
# (50,000 in, 48,000 written), and one above the long-context threshold with reads too.
CACHE_WRITE_SHAPES = {"cache_write": ((50_000, 0, 1000, 0, 0, 0), 48_000),
                      "cache_write_long": ((300_000, 100_000, 2000, 0, 0, 0), 150_000)}


def _usage(shape: str) -> tuple[Usage, genai_prices.Usage]:
    if shape in CACHE_WRITE_SHAPES:
        (i, c, o, ai, ao, w), cw = CACHE_WRITE_SHAPES[shape]
    else:
        (i, c, o, ai, ao, w), cw = {**SHAPES, **EXTRA_SHAPES}[shape], 0
    return (Usage(i, c, o, 0, ai, ao, w, cw),
            genai_prices.Usage(input_tokens=i, cache_read_tokens=c, cache_write_tokens=cw, output_tokens=o,
                               input_audio_tokens=ai, output_audio_tokens=ao, web_searches=w))


def _context(tier: str | None) -> dict[str, str] | None:
    if tier is None:
        return None
    return {"processing": "batch"} if tier == "batch" else {"service_tier": tier}


CASES = _cases()


def test_the_table_has_at_least_forty_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize(("model", "shape", "tier", "when"), CASES,
                         ids=[f"{m}-{s}-{t}-{w.date()}" for m, s, t, w in CASES])
def test_our_cost_is_the_library_price_to_the_last_quantum(model, shape, tier, when):
    ours, theirs = _usage(shape)
    library = genai_prices.calc_price(theirs, model, provider_id="openai", genai_request_timestamp=when,
                                      price_context=_context(tier))
    quote = TABLE.resolve(model, tier, when)
    assert not quote.priced_by_default
    expected = library.total_price.quantize(QUANTUM, rounding=ROUND_HALF_EVEN)
    if model == "gpt-4o-search-preview":  # override: $25 per 1k searches, one per call at least
        # (the meter counts that search on a billed call; see the proxy's search-model test)
        ours.web_search_calls = searches = max(ours.web_search_calls, 1)
        expected = (library.total_price - theirs.web_searches * Decimal(10) / 1000
                    + searches * Decimal(25) / 1000).quantize(QUANTUM)
    assert cost(quote.price, ours) == expected


# Where our overrides differ from the library: OpenAI's published figure, by hand.
OVERRIDDEN = [
    # gpt-4o-audio-preview: audio $40 in / $80 out per 1M (library: audio billed as text).
    ("gpt-4o-audio-preview", Usage(1_000_000, 0, 1_000_000, 0, 900_000, 900_000),
     (100_000 * Decimal("2.50") + 900_000 * 40 + 100_000 * 10 + 900_000 * 80) / M),
    ("gpt-4o-audio-preview-2024-10-01", Usage(1000, 0, 1000, 0, 1000, 1000), (1000 * 100 + 1000 * 200) / M),
    ("gpt-4o-mini-audio-preview", Usage(2000, 0, 1000, 0, 1000, 500),
     (1000 * Decimal("0.15") + 1000 * 10 + 500 * Decimal("0.60") + 500 * 20) / M),
    # gpt-4o-mini-search-preview: $25 per 1k searches, every call searches (the meter counts one
    # on every billed call); cached not discounted.
    ("gpt-4o-mini-search-preview", Usage(1000, 0, 300, 0, 0, 0, 1), Decimal("0.02533")),
    ("gpt-4o-mini-search-preview-2025-03-11", Usage(1000, 500, 300, 0, 0, 0, 1),
     (1000 * Decimal("0.15") + 300 * Decimal("0.60")) / M + Decimal("0.025")),
    # Fine-tunes: cached input $0.15 (gpt-4o-mini) and $1.875 (gpt-4o); gpt-4.1 family and o4-mini.
    ("ft:gpt-4o-mini-2024-07-18:org::id", Usage(1000, 400, 1000),
     (600 * Decimal("0.30") + 400 * Decimal("0.15") + 1000 * Decimal("1.20")) / M),
    ("ft:gpt-4o-2024-08-06:org:team:id", Usage(1000, 400, 1000),
     (600 * Decimal("3.75") + 400 * Decimal("1.875") + 1000 * 15) / M),
    ("ft:gpt-4.1-2025-04-14:org::id", Usage(1000, 400, 1000),
     (600 * 3 + 400 * Decimal("0.75") + 1000 * 12) / M),
    ("ft:gpt-4.1-nano-2025-04-14:org::id", Usage(1000, 0, 1000),
     (1000 * Decimal("0.20") + 1000 * Decimal("0.80")) / M),
    ("ft:o4-mini-2025-04-16:org::id", Usage(1000, 0, 1000), (1000 * 4 + 1000 * 16) / M),
]


@pytest.mark.parametrize(("model", "usage", "published"), OVERRIDDEN, ids=[c[0] for c in OVERRIDDEN])
def test_an_override_is_billed_at_the_published_price(model, usage, published):
    assert cost(TABLE.resolve(model, None, NOW).price, usage) == published


@pytest.mark.parametrize("tier", ["priority", "flex", "batch"])
def test_gpt_5_tiers_from_the_issue(tier):
    """gpt-5, 100k in / 100k out: priority $2.25, flex and batch $0.5625, standard $1.125."""
    usage = Usage(100_000, 0, 100_000)
    assert cost(TABLE.resolve("gpt-5", None, NOW).price, usage) == Decimal("1.125")
    assert cost(TABLE.resolve("gpt-5", tier, NOW).price, usage) == {
        "priority": Decimal("2.25"), "flex": Decimal("0.5625"), "batch": Decimal("0.5625")}[tier]


def test_batch_without_a_published_batch_price_is_half_the_standard_price():
    # gpt-4o-audio-preview has no batch variant in the data: the Batch API's 50% applies.
    standard = TABLE.resolve("gpt-4o-audio-preview", None, NOW).price
    batch = TABLE.resolve("gpt-4o-audio-preview", "batch", NOW).price
    assert (batch.input, batch.output, batch.audio_output) == (
        standard.input / 2, standard.output / 2, standard.audio_output / 2)  # type: ignore[operator]


def test_an_unknown_tier_is_the_standard_price():
    assert TABLE.quote("gpt-5", "scale").price == TABLE.quote("gpt-5", "default").price == \
        TABLE.quote("gpt-5").price


@pytest.mark.parametrize(("model", "tokens"), [
    ("o3", 100_000), ("o3-2025-04-16", 100_000), ("o4-mini", 100_000), ("gpt-5", 128_000),
    ("gpt-5-mini-2025-08-07", 128_000), ("gpt-5-chat-latest", 16_384), ("gpt-4.1", 32_768),
    ("gpt-4o-mini", 16_384), ("gpt-4o-2024-05-13", 4096), ("ft:gpt-4o-mini-2024-07-18:o::x", 16_384),
    ("my-local-llama", None),
])
def test_each_model_knows_its_largest_answer(model, tokens):
    assert TABLE.quote(model).max_output_tokens == tokens


@pytest.mark.parametrize("model", ["gpt-realtime-mini", "gpt-realtime", "gpt-4o-mini-realtime-preview"])
def test_cached_audio_is_the_library_price_to_the_last_quantum(model):
    """A Realtime usage with cached audio (gpt-realtime-mini: $0.30 per 1M, cached text $0.06):
    ours counts `audio_input` uncached and `cached_audio_input` apart; the library's
    `input_audio_tokens` is all audio and `cache_audio_read_tokens` its cached part."""
    from costing.usage import realtime_usage

    raw = {"input_tokens": 1_000_000, "output_tokens": 100_000,
           "input_token_details": {"text_tokens": 400_000, "audio_tokens": 600_000,
                                   "cached_tokens": 500_000,
                                   "cached_tokens_details": {"text_tokens": 200_000,
                                                             "audio_tokens": 300_000}},
           "output_token_details": {"text_tokens": 50_000, "audio_tokens": 50_000}}
    ours = realtime_usage(raw)
    assert ours is not None
    assert (ours.cached_audio_input_tokens, ours.audio_input_tokens) == (300_000, 300_000)
    theirs = genai_prices.Usage(input_tokens=1_000_000, cache_read_tokens=500_000,
                                cache_audio_read_tokens=300_000, input_audio_tokens=600_000,
                                output_tokens=100_000, output_audio_tokens=50_000)
    library = genai_prices.calc_price(theirs, model, provider_id="openai", genai_request_timestamp=NOW)
    price = TABLE.resolve(model, None, NOW).price
    expected = library.total_price.quantize(QUANTUM, rounding=ROUND_HALF_EVEN)
    assert cost(price, ours) == expected
    if model == "gpt-realtime-mini":
        assert price.cached_audio_input == Decimal("0.3") and price.cached_input == Decimal("0.06")
        assert expected == Decimal("4.342")  # cached audio at the cached text price: $4.27
