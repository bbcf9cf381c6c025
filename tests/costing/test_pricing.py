"""Pricing: the shipped data (genai-prices plus our overrides, USD per 1M tokens), snapshot
resolution, the default price for unknown models, PRICES_FILE overrides, and the exact Decimal
cost of a call.

Specification of `costing.pricing`. Expected costs are computed here, by hand, from OpenAI's
published numbers, never by calling the code under test twice.
"""

from __future__ import annotations

import json
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from costing.money import QUANTUM
from costing.pricing import (
    DEFAULT_CONTEXT_WINDOW,
    Price,
    PriceTable,
    PriceTableError,
    _openai_models,
    base_model,
    cost,
    parse_price_file,
)
from costing.usage import Usage

MILLION = Decimal(1_000_000)
OVERRIDES = json.loads(Path(__file__).resolve().parents[2].joinpath(
    "costing", "price_overrides.json").read_text())


def tokens(price: Price) -> tuple[Decimal, Decimal, Decimal]:
    return price.input, price.cached_input, price.output


def load(prices_file: Path | None = None, prompt: str = "0.00015", completion: str = "0.0006") -> PriceTable:
    return PriceTable.load(default_per_1k_prompt=Decimal(prompt),
                           default_per_1k_completion=Decimal(completion), prices_file=prices_file)


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return load()


# -- the cost of a call --------------------------------------------------------------------------


def test_cost_of_a_known_call_by_hand(table):
    """gpt-4o-mini: $0.15 input, $0.075 cached input, $0.60 output per 1M tokens."""
    usage = Usage(input_tokens=1000, cached_input_tokens=400, output_tokens=500, reasoning_tokens=200)
    by_hand = (600 * Decimal("0.15") + 400 * Decimal("0.075") + 500 * Decimal("0.60")) / MILLION
    assert by_hand == Decimal("0.00042")
    assert cost(table.quote("gpt-4o-mini").price, usage) == by_hand


def test_cost_of_a_reasoning_model_call_by_hand(table):
    """o3: $2.00 input, $0.50 cached input, $8.00 output per 1M tokens."""
    usage = Usage(input_tokens=12_345, cached_input_tokens=10_000,
                  output_tokens=6_789, reasoning_tokens=6_000)
    by_hand = (2_345 * Decimal("2.00") + 10_000 * Decimal("0.50") + 6_789 * Decimal("8.00")) / MILLION
    assert cost(table.quote("o3").price, usage) == by_hand == Decimal("0.064002")


def test_cost_of_an_embeddings_call_by_hand(table):
    usage = Usage(input_tokens=8_000)
    assert cost(table.quote("text-embedding-3-small").price, usage) == 8_000 * Decimal("0.02") / MILLION


def test_reasoning_tokens_are_billed_as_output_and_not_on_top_of_it(table):
    price = table.quote("o4-mini").price
    with_reasoning = Usage(input_tokens=100, output_tokens=500, reasoning_tokens=450)
    without = Usage(input_tokens=100, output_tokens=500, reasoning_tokens=0)
    assert cost(price, with_reasoning) == cost(price, without)


def test_cached_input_is_billed_at_the_cached_price_instead_of_the_input_price(table):
    price = table.quote("gpt-4.1").price
    all_cached = cost(price, Usage(input_tokens=1_000_000, cached_input_tokens=1_000_000))
    none_cached = cost(price, Usage(input_tokens=1_000_000))
    assert (all_cached, none_cached) == (Decimal("0.50"), Decimal("2.00"))


def test_a_call_without_tokens_costs_nothing(table):
    assert cost(table.quote("gpt-5").price, Usage()) == 0


def test_cached_tokens_above_the_input_never_make_a_negative_uncached_part():
    price = Price(input=Decimal(10), cached_input=Decimal(1), output=Decimal(0))
    assert cost(price, Usage(input_tokens=5, cached_input_tokens=8)) == 8 * Decimal(1) / MILLION


def test_a_cost_is_a_decimal_on_the_storage_quantum(table):
    amount = cost(table.quote("gpt-4o").price, Usage(input_tokens=1, output_tokens=1))
    assert isinstance(amount, Decimal)
    assert amount.as_tuple().exponent == QUANTUM.as_tuple().exponent == -10
    assert amount == Decimal("0.0000125")


def test_a_cost_below_the_quantum_is_rounded_half_even():
    def one_token(per_million: str) -> Decimal:
        return cost(Price(Decimal(per_million), Decimal(per_million), Decimal(0)), Usage(input_tokens=1))

    assert one_token("0.00015") == Decimal("2E-10")  # 1.5e-10 -> 2e-10
    assert one_token("0.00025") == Decimal("2E-10")  # 2.5e-10 -> 2e-10 (to even)
    assert one_token("0.00004") == Decimal(0)


def test_costs_are_exact_so_many_small_calls_add_up_to_one_big_one(table):
    price = table.quote("gpt-4o-mini").price
    small = cost(price, Usage(input_tokens=3, cached_input_tokens=1, output_tokens=7))
    big = cost(price, Usage(input_tokens=3_000, cached_input_tokens=1_000, output_tokens=7_000))
    assert small * 1000 == big


# -- the shipped table ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", [
    "gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o1", "o3", "o3-mini", "o4-mini",
    "gpt-5", "gpt-5-mini", "gpt-5-nano", "text-embedding-3-small", "text-embedding-3-large",
])
def test_the_shipped_data_prices_current_models(table, model):
    quote = table.quote(model)
    assert not quote.priced_by_default
    assert model in table
    assert "genai-prices" in quote.source


@pytest.mark.parametrize(("model", "inp", "cached", "out"), [
    ("gpt-4o", "2.50", "1.25", "10.00"),
    ("gpt-4o-mini", "0.15", "0.075", "0.60"),
    ("gpt-4.1", "2.00", "0.50", "8.00"),
    ("o4-mini", "1.10", "0.275", "4.40"),
    ("gpt-5", "1.25", "0.125", "10.00"),
    ("text-embedding-3-large", "0.13", "0.13", "0"),
])
def test_shipped_prices_are_openai_list_prices_per_million_tokens(table, model, inp, cached, out):
    assert tokens(table.quote(model).price) == (Decimal(inp), Decimal(cached), Decimal(out))


def test_every_override_is_a_valid_entry_citing_its_source():
    parsed = parse_price_file(OVERRIDES)
    assert len(parsed.models) >= 10
    for name, raw in OVERRIDES["models"].items():
        assert "_source" in raw and "$" in raw["_source"], name
    for name in parsed.models:
        price = load().quote(name).price
        assert 0 <= price.cached_input <= price.input, name


def test_embedding_models_have_no_output_price(table):
    for model in ("text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002"):
        assert table.quote(model).price.output == 0


# -- model names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("snapshot", "base"), [
    ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
    ("gpt-4-0613", "gpt-4"),
    ("gpt-5-2025-08-07", "gpt-5"),
    ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
    ("o3-mini-2025-01-31", "o3-mini"),
    ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
    ("gpt-4o", "gpt-4o"),
    ("o1", "o1"),
    ("gpt-4o-mini-realtime", "gpt-4o-mini-realtime"),
])
def test_base_model_strips_a_snapshot_date(snapshot, base):
    assert base_model(snapshot) == base


@pytest.mark.parametrize(("snapshot", "base"), [
    ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
    ("gpt-4-0613", "gpt-4"),
    ("gpt-5-2025-08-07", "gpt-5"),
    ("gpt-4o-2024-08-06", "gpt-4o"),
    ("o4-mini-2025-04-16", "o4-mini"),
    ("gpt-4o-audio-preview-2024-12-17", "gpt-4o-audio-preview"),
])
def test_a_dated_snapshot_is_priced_as_its_base_model(table, snapshot, base):
    assert table.quote(snapshot).price == table.quote(base).price
    assert not table.quote(snapshot).priced_by_default


def test_an_exact_snapshot_entry_wins_over_its_base_model(table):
    own = (Decimal("5.00"), Decimal("5.00"), Decimal("15.00"))
    assert tokens(table.quote("gpt-4o-2024-05-13").price) == own
    assert table.quote("gpt-4o").price.input == Decimal("2.50")


def test_model_names_are_matched_case_insensitively_and_without_an_openai_prefix(table):
    expected = table.quote("gpt-4o-mini")
    assert table.quote("GPT-4o-Mini") == expected
    assert table.quote("openai/gpt-4o-mini-2024-07-18") == expected


# -- the default price ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["my-local-llama", "ft:my-local-llama:org::abc", "", None])
def test_an_unknown_model_uses_the_default_price_and_is_marked(table, model):
    quote = table.quote(model)
    assert quote.priced_by_default
    assert quote.price == Price(input=Decimal("0.15"), cached_input=Decimal("0.15"), output=Decimal("0.60"))
    if model:
        assert model not in table


def test_the_default_price_is_the_per_1k_env_price_times_1000_per_million():
    table = load(prompt="0.002", completion="0.0035")
    assert table.default == Price(Decimal("2"), Decimal("2"), Decimal("3.5"))
    by_hand = (1000 * Decimal("2") + 2000 * Decimal("3.5")) / MILLION
    assert cost(table.quote("house-model").price, Usage(input_tokens=1000, output_tokens=2000)) == by_hand


def test_the_default_price_does_not_change_known_models():
    assert load(prompt="9", completion="9").quote("gpt-4o-mini").price.input == Decimal("0.15")


# -- PRICES_FILE ---------------------------------------------------------------------------------


def test_a_json_prices_file_adds_models_and_overrides_shipped_ones(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({
        "_comment": "ignored",
        "house-model": {"input": "3", "cached_input": "1.5", "output": "4"},
        "gpt-4o": {"input": 1.25, "output": 5},
    }))
    table = load(path)
    assert table.quote("house-model").price == Price(Decimal(3), Decimal("1.5"), Decimal(4))
    assert not table.quote("house-model").priced_by_default
    assert tokens(table.quote("gpt-4o").price) == (Decimal("1.25"), Decimal("1.25"), Decimal(5))
    assert table.quote("gpt-4o-2024-08-06").price.input == Decimal("1.25")  # snapshots follow the override
    assert table.quote("gpt-4o-mini").price.input == Decimal("0.15")  # the rest is still shipped


def test_json_numbers_in_a_prices_file_are_read_as_exact_decimals(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text('{"house-model": {"input": 0.1, "output": 0.3}}')
    price = load(path).quote("house-model").price
    assert (price.input, price.output) == (Decimal("0.1"), Decimal("0.3"))


def test_cached_input_defaults_to_the_input_price(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text('{"house-model": {"input": "2", "output": "8"}}')
    assert load(path).quote("house-model").price.cached_input == Decimal(2)


def test_a_prices_file_may_wrap_its_models_in_a_models_object(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text('{"models": {"house-model": {"input": "2", "output": "8"}}}')
    assert "house-model" in load(path)


def test_a_toml_prices_file_adds_and_overrides(tmp_path):
    path = tmp_path / "prices.toml"
    path.write_text(
        '["gpt-4.1"]\ninput = 1.1\ncached_input = 0.3\noutput = 4.4\n\n'
        '[house-model]\ninput = "3"\noutput = 4\n'
    )
    table = load(path)
    assert tokens(table.quote("gpt-4.1-2025-04-14").price) == (Decimal("1.1"), Decimal("0.3"), Decimal("4.4"))
    assert table.quote("house-model").price == Price(Decimal(3), Decimal(3), Decimal(4))


def test_a_prices_file_model_name_is_matched_case_insensitively(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text('{"House-Model": {"input": "2", "output": "8"}}')
    assert not load(path).quote("house-model").priced_by_default


@pytest.mark.parametrize(("name", "content"), [
    ("bad.json", '{"m": {"input": 1, "output": '),
    ("bad.toml", "[m\ninput = 1\n"),
])
def test_a_prices_file_that_does_not_parse_is_named_in_the_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PriceTableError, match=name):
        load(path)


def test_a_missing_prices_file_is_named_in_the_error(tmp_path):
    path = tmp_path / "nowhere.json"
    with pytest.raises(PriceTableError, match=r"cannot read .*nowhere\.json"):
        load(path)


@pytest.mark.parametrize(("entry", "problem"), [
    ({"input": "1"}, "needs 'input' and 'output'"),
    ({"output": "1"}, "needs 'input' and 'output'"),
    ("1.00", "needs 'input' and 'output'"),
    ({"input": "-0.01", "output": "1"}, "input must be a non-negative number"),
    ({"input": "1", "output": -2}, "output must be a non-negative number"),
    ({"input": "1", "cached_input": "-1", "output": "1"}, "cached_input must be a non-negative number"),
    ({"input": "one", "output": "1"}, "input is not a number"),
    ({"input": [1], "output": "1"}, "input must be a number"),
    ({"input": True, "output": "1"}, "input must be a number"),
    ({"input": None, "output": "1"}, "input must be a number"),
    ({"input": "1", "cached_input": None, "output": "1"}, "cached_input must be a number"),
    ({"input": "NaN", "output": "1"}, "input must be a non-negative number"),
    ({"input": "Infinity", "output": "1"}, "input must be a non-negative number"),
])
def test_an_invalid_entry_is_refused_naming_the_model_and_the_field(tmp_path, entry, problem):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"fine-model": {"input": "1", "output": "1"}, "broken-model": entry}))
    with pytest.raises(PriceTableError) as caught:
        load(path)
    assert "'broken-model'" in str(caught.value)
    assert problem in str(caught.value)


def test_a_prices_file_that_is_not_an_object_is_refused(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text('[{"input": 1, "output": 1}]')
    with pytest.raises(PriceTableError, match="object of model"):
        load(path)


@pytest.mark.parametrize("models", [[{"input": 1, "output": 1}], "gpt-4o", 3])
def test_a_models_key_that_is_not_an_object_is_refused(tmp_path, models):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": models}))
    with pytest.raises(PriceTableError):
        load(path)


def test_price_table_error_is_a_value_error():
    assert issubclass(PriceTableError, ValueError)


# Whole quanta per token (at most 4 decimals per 1M tokens) take an integer path; finer prices
# take the Decimal path. Both must give the same amount, to the last quantum and exponent.
_per_million = st.decimals(min_value=0, max_value=10**6, places=6, allow_nan=False, allow_infinity=False)
_tokens = st.integers(min_value=0, max_value=10**9)


@settings(max_examples=2000, deadline=None)
@given(prices=st.tuples(_per_million, _per_million, _per_million),
       tokens=st.tuples(_tokens, _tokens, _tokens))
def test_a_cost_is_the_decimal_formula_rounded_half_even_whatever_the_price_precision(prices, tokens):
    price = Price(*prices)
    input_tokens, cached, output = tokens
    by_hand = ((max(input_tokens - cached, 0) * price.input + cached * price.cached_input
                + output * price.output) / MILLION).quantize(QUANTUM, rounding=ROUND_HALF_EVEN)
    amount = cost(price, Usage(input_tokens=input_tokens, cached_input_tokens=cached, output_tokens=output))
    assert amount == by_hand
    assert amount.as_tuple().exponent == by_hand.as_tuple().exponent == QUANTUM.as_tuple().exponent


def test_prices_with_at_most_four_decimals_are_whole_quanta_per_token():
    assert Price(Decimal("0.15"), Decimal("0.075"), Decimal("0.6")).units == (
        1500, 750, 6000, 1500, 6000, 0, 1500, 750)
    assert Price(Decimal("0.0375"), Decimal("0.0375"), Decimal("2.5"), Decimal(40), Decimal(80),
                 Decimal(25)).units == (375, 375, 25000, 400_000, 800_000, 250_000_000, 375, 375)
    assert Price(Decimal("0.6"), Decimal("0.06"), Decimal("2.4"), Decimal(10), Decimal(20),
                 cached_audio_input=Decimal("0.3")).units == (6000, 600, 24000, 100_000, 200_000, 0,
                                                              6000, 3000)
    assert Price(Decimal("0.00001"), Decimal("0.1"), Decimal("0.1")).units is None  # 0.1 quantum


def test_the_readme_prices_file_example_loads_and_means_what_it_says(tmp_path):
    readme = Path(__file__).resolve().parents[2].joinpath("README.md").read_text()
    section = readme[readme.index("## Prices"):]
    example = section[section.index("```json\n") + 8:]
    path = tmp_path / "prices.json"
    path.write_text(example[:example.index("```")])
    table = load(path)
    assert tokens(table.quote("gpt-4o-2024-08-06").price) == (Decimal(2), Decimal(1), Decimal(8))
    assert table.quote("gpt-4o", "priority").price.output == Decimal(14)
    assert table.quote("gpt-4o-audio-preview").price.audio_output == Decimal(80)
    assert table.quote("house-llama").max_output_tokens == 8192
    assert table.quote("house-llama").context_window == 32768
    long = table.quote("gpt-5.4").price.for_prompt(300_000)
    assert (long.input, long.output) == (Decimal(5), Decimal("22.50"))


def test_the_context_window_is_the_libraries_with_our_corrections_and_gaps(table: PriceTable) -> None:
    """What a request naming context of unknown size reserves as input."""
    assert table.quote("gpt-4o-2024-08-06").context_window == 128_000  # genai-prices
    assert table.quote("o3").context_window == 200_000
    assert table.quote("gpt-5.4").context_window == 1_050_000
    # OpenAI: 1,047,576 for the gpt-4.1 family; genai-prices says 1,000,000.
    assert table.quote("gpt-4.1-mini-2025-04-14").context_window == 1_047_576
    assert table.quote("ft:gpt-4o-mini-2024-07-18:acme::x1").context_window == 128_000  # library: none
    assert table.quote("house-llama").context_window == DEFAULT_CONTEXT_WINDOW


def test_the_default_context_window_is_the_largest_the_library_knows() -> None:
    windows = [m.context_window for m in _openai_models() if m.context_window]
    assert DEFAULT_CONTEXT_WINDOW >= max(windows)
    for name, window in OVERRIDES["context_window"].items():
        assert name.startswith("_") or window <= DEFAULT_CONTEXT_WINDOW


def test_prices_file_sets_context_windows_by_prefix(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": {"house-llama": {"input": "0.2", "output": "0.8"}},
                                "context_window": {"house-": 8192, "gpt-4o": 100_000}}))
    table = load(path)
    assert table.quote("house-llama").context_window == 8192
    assert table.quote("gpt-4o").context_window == 100_000
    with pytest.raises(PriceTableError, match="context_window"):
        parse_price_file({"models": {}, "context_window": {"x": -1}})
    with pytest.raises(PriceTableError, match="context_window"):
        parse_price_file({"models": {}, "context_window": [1]})


@pytest.mark.parametrize("model", ["gpt-5", "gpt-4o", "gpt-5.1-codex"])
def test_the_fast_tier_is_priority_processing_under_its_new_name(table: PriceTable, model: str) -> None:
    """OpenAI renamed priority processing `fast`; a response may say either. Library models
    and models whose prices name only `priority` (the shipped overrides) bill both alike."""
    fast, priority = table.quote(model, "fast").price, table.quote(model, "priority").price
    assert tokens(fast) == tokens(priority) != tokens(table.quote(model).price)


def test_a_prices_file_may_name_the_fast_tier(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text('{"models": {"house-model": {"input": 1, "output": 2, '
                    '"service_tiers": {"fast": {"input": 3, "output": 6}}}}}')
    table = load(path)
    assert tokens(table.quote("house-model", "fast").price)[::2] == (Decimal(3), Decimal(6))
    assert tokens(table.quote("house-model", "priority").price)[::2] == (Decimal(3), Decimal(6))


# -- prompt-cache writes (the newest models bill them at 1.25x input) ---------------------------


def test_cache_writes_are_billed_at_their_price_as_part_of_the_input(table: PriceTable) -> None:
    """gpt-6.1-sol, Responses: 50,000 input of which 48,000 written to the cache, 1,000 output:
    $2 input, $2.50 cache writes, $10 output per 1M; $0.110 when writes were billed as input."""
    usage = Usage(50_000, 0, 1000, cache_write_input_tokens=48_000)
    by_hand = (2000 * 2 + 48_000 * Decimal("2.50") + 1000 * 10) / MILLION
    assert by_hand == Decimal("0.134")
    assert cost(table.quote("gpt-6.1-sol").price, usage) == by_hand


def test_cache_writes_read_and_audio_are_each_billed_once(table: PriceTable) -> None:
    """Uncached text input is what is left of the input after reads, writes and audio."""
    usage = Usage(10_000, 3000, 0, cache_write_input_tokens=4000)
    by_hand = (3000 * 2 + 3000 * Decimal("0.10") + 4000 * Decimal("2.50")) / MILLION
    assert cost(table.quote("gpt-6.1-sol").price, usage) == by_hand
    assert cost(table.quote("gpt-6.1-sol").price, Usage(10, 6, 0, cache_write_input_tokens=6)) == \
        (6 * Decimal("0.10") + 6 * Decimal("2.50")) / MILLION  # never a negative uncached part


def test_a_model_without_a_cache_write_price_bills_writes_as_input(table: PriceTable) -> None:
    price = table.quote("gpt-4o-mini").price
    assert price.cache_write_input is None
    with_writes = Usage(1000, 400, 500, cache_write_input_tokens=600)
    assert cost(price, with_writes) == cost(price, Usage(1000, 400, 500))


def test_cache_writes_take_the_long_context_price(table: PriceTable) -> None:
    """Above 272k input tokens gpt-6.1-sol bills the whole call at $4 input, $0.20 cached, $5
    cache writes and $15 output per 1M."""
    usage = Usage(300_000, 100_000, 2000, cache_write_input_tokens=150_000)
    by_hand = (50_000 * 4 + 100_000 * Decimal("0.20") + 150_000 * 5 + 2000 * 15) / MILLION
    assert cost(table.quote("gpt-6.1-sol").price, usage) == by_hand


def test_each_tier_has_its_cache_write_price(table: PriceTable) -> None:
    writes = {tier: table.quote("gpt-6.1-sol", tier).price.cache_write_input
              for tier in (None, "flex", "priority", "fast", "batch")}
    assert writes == {None: Decimal("2.5"), "flex": Decimal("1.25"), "priority": Decimal(5),
                      "fast": Decimal(5), "batch": Decimal("1.25")}


def test_a_prices_file_sets_the_cache_write_price(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"house-model": {
        "input": 1, "cache_write_input": "1.25", "output": 4,
        "service_tiers": {"priority": {"input": 2, "cache_write_input": "2.5", "output": 8}},
        "long_context": [{"above": 1000, "input": 2, "cache_write_input": "2.5"}]}}))
    table = load(path)
    assert table.quote("house-model").price.cache_write_input == Decimal("1.25")
    assert table.quote("house-model", "priority").price.cache_write_input == Decimal("2.5")
    assert table.quote("house-model", "batch").price.cache_write_input == Decimal("0.625")  # 50%
    usage = Usage(2000, 0, 0, cache_write_input_tokens=1000)
    assert cost(table.quote("house-model").price, usage) == (1000 * 2 + 1000 * Decimal("2.5")) / MILLION


def test_an_input_price_without_a_cache_write_price_bills_writes_as_that_input(tmp_path: Path) -> None:
    """As with cached input: an entry's own `input` replaces the price the library's cache-write
    figure was made for, unless it names `cache_write_input` too."""
    path = tmp_path / "prices.json"
    path.write_text('{"gpt-6.1-sol": {"input": 3, "output": 12}, '
                    '"gpt-6-sol": {"input": 3, "cache_write_input": 4, "output": 12}}')
    table = load(path)
    assert table.quote("gpt-6.1-sol").price.cache_write_input is None
    assert table.quote("gpt-6-sol").price.cache_write_input == Decimal(4)
    _, origin = table.explain("gpt-6.1-sol")
    assert "cache_write_input" not in origin


def test_cache_write_prices_take_the_integer_path_too() -> None:
    price = Price(Decimal(2), Decimal("0.1"), Decimal(10), cache_write_input=Decimal("2.5"))
    assert price.units == (20_000, 1000, 100_000, 20_000, 100_000, 0, 25_000, 1000)
    assert Price(Decimal(2), Decimal("0.1"), Decimal(10)).units == (
        20_000, 1000, 100_000, 20_000, 100_000, 0, 20_000, 1000)  # writes at the input price


@settings(max_examples=1000, deadline=None)
@given(prices=st.tuples(_per_million, _per_million, _per_million, _per_million),
       tokens=st.tuples(_tokens, _tokens, _tokens, _tokens))
def test_a_cost_with_cache_writes_is_the_decimal_formula_on_both_paths(prices, tokens):
    p_in, p_cached, p_out, p_write = prices
    price = Price(p_in, p_cached, p_out, cache_write_input=p_write)
    input_tokens, cached, written, output = tokens
    by_hand = ((max(input_tokens - cached - written, 0) * p_in + cached * p_cached + written * p_write
                + output * p_out) / MILLION).quantize(QUANTUM, rounding=ROUND_HALF_EVEN)
    assert cost(price, Usage(input_tokens, cached, output, cache_write_input_tokens=written)) == by_hand
