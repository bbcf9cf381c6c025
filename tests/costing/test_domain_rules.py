"""The pure domain, without a server: usage shapes, prices, budget edges, money, settings."""

from __future__ import annotations

from decimal import Decimal

import pytest
from conftest import make_settings
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from costing import budget as rules
from costing.budget import Budget
from costing.errors import BudgetExceeded, InvalidBudget
from costing.money import format_usd, from_units, to_units
from costing.pricing import PriceTable, PriceTableError, base_model, cost
from costing.settings import describe_error, parse_database_url
from costing.usage import Operation, Usage, from_event, parse_usage, request_facts

TABLE = PriceTable.load(default_per_1k_prompt=Decimal("0.00015"),
                        default_per_1k_completion=Decimal("0.0006"))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.sampled_from(["usage", "prompt_tokens", "input_tokens",
                                                       "type", "response", "choices", "messages",
                                                       "max_tokens", "stream", "model"]), inner, max_size=5),
                    max_leaves=20)


def test_chat_and_responses_usage_shapes_with_cached_and_reasoning_tokens():
    assert parse_usage({"prompt_tokens": 10, "completion_tokens": 5,
                        "prompt_tokens_details": {"cached_tokens": 4},
                        "completion_tokens_details": {"reasoning_tokens": 2}}) == Usage(10, 4, 5, 2)
    assert parse_usage({"input_tokens": 7, "output_tokens": 3,
                        "input_tokens_details": {"cached_tokens": 9},  # clamped to input
                        "output_tokens_details": {"reasoning_tokens": 1}}) == Usage(7, 7, 3, 1)
    assert parse_usage(None) is None and parse_usage("x") is None


def test_responses_stream_usage_comes_only_from_terminal_events():
    response = {"id": "resp_1", "model": "gpt-4.1", "usage": {"input_tokens": 1, "output_tokens": 2}}
    assert from_event({"type": "response.created", "response": response}).usage is None
    for kind in ("response.completed", "response.incomplete", "response.failed"):
        assert from_event({"type": kind, "response": response}).usage == Usage(1, 0, 2, 0)


@given(JSON)
def test_parsers_never_raise_on_any_json(value):
    parse_usage(value)
    from_event(value)
    for operation in Operation:
        request_facts(operation, value)


def test_request_facts_take_the_output_cap_in_openai_precedence():
    facts = request_facts(Operation.CHAT, {"model": "m", "stream": True, "max_tokens": 50,
                                           "max_completion_tokens": 40, "n": 2,
                                           "messages": [{"role": "user", "content": "x" * 40}]})
    assert (facts.model, facts.stream, facts.include_usage, facts.max_output_tokens) == ("m", True, False, 80)
    assert facts.prompt_tokens == 10 + 1 + 4 + 3  # text/4 (incl. role) + one message + reply priming
    assert request_facts(Operation.EMBEDDINGS, {"input": "abcd"}).max_output_tokens == 0


def test_cost_of_a_known_call_by_hand():
    price = TABLE.quote("gpt-4o-mini-2024-07-18").price
    usage = Usage(input_tokens=1000, cached_input_tokens=400, output_tokens=500, reasoning_tokens=200)
    by_hand = (Decimal(600) * Decimal("0.15") + Decimal(400) * Decimal("0.075")
               + Decimal(500) * Decimal("0.60")) / Decimal(10**6)
    assert cost(price, usage) == by_hand


def test_snapshots_resolve_and_unknown_models_use_the_default():
    assert base_model("gpt-4-0613") == "gpt-4" and base_model("gpt-5-2025-08-07") == "gpt-5"
    assert TABLE.quote("gpt-4o-2024-05-13").price.input == Decimal("5.00")  # its own entry wins
    for model in ("gpt-4o", "gpt-4.1-nano", "o3", "o4-mini", "gpt-5-mini", "text-embedding-3-large"):
        assert not TABLE.quote(model).priced_by_default, model
    unknown = TABLE.quote("my-local-llama")
    assert unknown.priced_by_default and unknown.price.input == Decimal("0.15")
    assert unknown.price.output == Decimal("0.6")


def test_prices_file_overrides_and_bad_files_are_named(tmp_path):
    good = tmp_path / "p.toml"
    good.write_text('[gpt-4o]\ninput = "1"\noutput = "2"\n[house-model]\ninput = 3\noutput = 4\n')
    table = PriceTable.load(default_per_1k_prompt=Decimal(0), default_per_1k_completion=Decimal(0),
                            prices_file=good)
    assert table.quote("gpt-4o").price.input == Decimal(1) and "house-model" in table
    bad = tmp_path / "bad.json"
    bad.write_text('{"m": {"input": "-1", "output": "1"}}')
    with pytest.raises(PriceTableError, match="'m'"):
        PriceTable.load(default_per_1k_prompt=Decimal(0), default_per_1k_completion=Decimal(0),
                        prices_file=bad)


def test_budget_status_and_admission_at_the_exact_boundaries():
    budget = rules.make_budget(Decimal("1.00"), Decimal("5.00"))
    quantum = Decimal("1e-10")
    assert rules.status(Decimal("1.00") - quantum, budget) == rules.BudgetStatus.OK
    assert rules.status(Decimal("1.00"), budget) == rules.BudgetStatus.WARNING
    assert rules.status(Decimal("5.00"), budget) == rules.BudgetStatus.EXCEEDED
    assert rules.admits(Decimal(4), Decimal("0.5"), Decimal("0.5"), budget)
    assert not rules.admits(Decimal(4), Decimal("0.5"), Decimal("0.5") + quantum, budget)
    assert not rules.admits(Decimal(5), Decimal(0), Decimal(0), budget)
    assert rules.remaining(Decimal(7), budget) == 0
    with pytest.raises(InvalidBudget):
        rules.make_budget(Decimal(6), Decimal(5))
    with pytest.raises(InvalidBudget):
        rules.make_budget(Decimal(-1), Decimal(5))


@given(st.decimals(0, 100, places=4), st.decimals(0, 100, places=4), st.decimals("0.01", 1, places=2))
def test_a_lease_never_exceeds_the_headroom(need, headroom, fraction):
    amount = rules.lease_amount(need, headroom, fraction)
    if need > headroom:
        assert amount is None
    else:
        assert amount is not None and need <= amount <= headroom


def test_refusal_message_and_money_formats():
    error = BudgetExceeded("c1", Decimal("5.01"), Decimal("5.00"), Decimal(0))
    assert str(error) == "Campaign 'c1' reached its cost limit: $5.01 spent of $5.00"
    formatted = [format_usd(Decimal(v)) for v in ("5", "0.000054", "1e-10")]
    assert formatted == ["5.00", "0.000054", "0.0000000001"]
    assert from_units(to_units(Decimal("0.0000612"))) == Decimal("0.0000612")
    assert Budget(Decimal(1), Decimal(2)).limit_usd == 2


def test_settings_accept_the_prisma_url_and_name_bad_variables():
    target = parse_database_url("postgresql://postgres:postgres@localhost:5432/ai_rpg_manager?schema=public")
    assert target.url == "postgresql+asyncpg://postgres:postgres@localhost:5432/ai_rpg_manager"
    assert target.schema == "public"
    assert parse_database_url("sqlite:///x.db").url == "sqlite+aiosqlite:///x.db"
    with pytest.raises(ValueError, match="postgresql://"):
        parse_database_url("mysql://u@h/db")
    for values, name in [({"proxy_port": "abc"}, "PROXY_PORT"),
                         ({"cost_limit_threshold_usd": "-1"}, "COST_LIMIT_THRESHOLD_USD"),
                         ({"upstream_base_url": "ftp://x"}, "UPSTREAM_BASE_URL")]:
        with pytest.raises(ValidationError) as caught:
            make_settings(**values)
        line = describe_error(caught.value)
        assert name in line and "\n" not in line
