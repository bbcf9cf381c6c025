"""Budget rules: thresholds and status, validation, defaults and overrides, the worst case a
request may cost, admission at the exact limit, and lease sizing.

Specification of `costing.budget`. Amounts are Decimal; "one quantum" is 1e-10 USD, the
smallest amount the ledger stores, so "one quantum below" is the closest a spend can get.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from costing.budget import (
    Budget,
    BudgetStatus,
    admits,
    effective,
    lease_amount,
    make_budget,
    remaining,
    reserved_input_tokens,
    status,
    warning_text,
    worst_case_units,
)
from costing.errors import CostingError, InvalidBudget
from costing.money import QUANTUM, from_units
from costing.pricing import Price, Quote, cost_units_of
from costing.usage import MAX_TOKENS, Operation, RequestFacts, request_facts

D = Decimal
BUDGET = Budget(warning_usd=D("1.00"), limit_usd=D("5.00"))
GPT_4O_MINI = Price(input=D("0.15"), cached_input=D("0.075"), output=D("0.60"))  # USD per 1M tokens


# -- status --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spent", "expected"), [
    (D(0), BudgetStatus.OK),
    (D("1.00") - QUANTUM, BudgetStatus.OK),
    (D("1.00"), BudgetStatus.WARNING),
    (D("1"), BudgetStatus.WARNING),
    (D("5.00") - QUANTUM, BudgetStatus.WARNING),
    (D("5.00"), BudgetStatus.EXCEEDED),
    (D("5.0000000000"), BudgetStatus.EXCEEDED),
    (D("5.00") + QUANTUM, BudgetStatus.EXCEEDED),
    (D("1000"), BudgetStatus.EXCEEDED),
])
def test_status_changes_exactly_at_the_thresholds(spent, expected):
    assert status(spent, BUDGET) is expected


def test_statuses_are_the_api_words():
    assert [str(s) for s in BudgetStatus] == ["ok", "warning", "exceeded"]


def test_with_warning_equal_to_limit_the_status_goes_from_ok_to_exceeded():
    budget = make_budget(D(2), D(2))
    assert status(D(2) - QUANTUM, budget) is BudgetStatus.OK
    assert status(D(2), budget) is BudgetStatus.EXCEEDED


def test_a_zero_limit_is_exceeded_from_the_start():
    assert status(D(0), make_budget(D(0), D(0))) is BudgetStatus.EXCEEDED


def test_a_zero_warning_warns_from_the_start():
    assert status(D(0), make_budget(D(0), D(5))) is BudgetStatus.WARNING


# -- make_budget ---------------------------------------------------------------------------------


def test_make_budget_keeps_valid_amounts_on_the_storage_quantum():
    budget = make_budget(D("1.5"), D("5"))
    assert budget == Budget(D("1.5"), D("5"))
    assert budget.warning_usd.as_tuple().exponent == budget.limit_usd.as_tuple().exponent == -10


def test_make_budget_accepts_zero_and_warning_equal_to_limit():
    assert make_budget(D(0), D(0)) == Budget(D(0), D(0))
    assert make_budget(D(3), D(3)) == Budget(D(3), D(3))


@pytest.mark.parametrize(("warning", "limit", "param", "text"), [
    (D("-0.01"), D(5), "warning_usd", "warning_usd must be zero or more"),
    (D(1), D("-1"), "limit_usd", "limit_usd must be zero or more"),
    (D("5.01"), D("5.00"), "warning_usd", "warning_usd (5.01) must not exceed limit_usd (5.00)"),
    (D(5) + QUANTUM, D(5), "warning_usd", "must not exceed"),
    (D("2.0000000000"), D("1.0000000000"), "warning_usd",
     "warning_usd (2.00) must not exceed limit_usd (1.00)"),
])
def test_make_budget_refuses_invalid_amounts_naming_the_parameter(warning, limit, param, text):
    with pytest.raises(InvalidBudget) as caught:
        make_budget(warning, limit)
    assert caught.value.param == param
    assert text in str(caught.value)
    assert isinstance(caught.value, CostingError)


# -- effective: override vs defaults -------------------------------------------------------------


def test_without_overrides_the_defaults_apply():
    assert effective(None, None, BUDGET) == BUDGET


def test_both_overrides_replace_the_defaults():
    assert effective(D("20"), D("50"), BUDGET) == Budget(D("20"), D("50"))


def test_an_override_of_zero_is_an_override_not_a_missing_value():
    assert effective(D(0), D(0), BUDGET) == Budget(D(0), D(0))


def test_a_lone_limit_above_the_default_warning_keeps_the_default_warning():
    assert effective(None, D("50"), BUDGET) == Budget(D("1.00"), D("50"))


def test_a_lone_limit_below_the_default_warning_pulls_the_warning_down_to_it():
    assert effective(None, D("0.50"), BUDGET) == Budget(D("0.50"), D("0.50"))


def test_a_lone_warning_keeps_the_default_limit():
    assert effective(D("2.00"), None, BUDGET) == Budget(D("2.00"), D("5.00"))


# -- remaining -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("spent", "left"), [
    (D(0), D("5.00")),
    (D("4.9999999999"), QUANTUM),
    (D("5.00"), D(0)),
    (D("5.01"), D(0)),
    (D("1000"), D(0)),
])
def test_remaining_is_the_limit_minus_spend_and_never_negative(spent, left):
    assert remaining(spent, BUDGET) == left
    assert remaining(spent, BUDGET) >= 0


# -- worst_case_cost -----------------------------------------------------------------------------


def worst_case_cost(price: Price, facts: RequestFacts, default_max_output: int,
                    model_max_output: int | None = None) -> Decimal:
    return from_units(worst_case_units(Quote(price, False, model_max_output), facts, default_max_output))


def _facts(prompt_tokens: int, max_output_tokens: int | None) -> RequestFacts:
    return RequestFacts(model="gpt-4o-mini", stream=False, include_usage=False,
                        prompt_tokens=prompt_tokens, max_output_tokens=max_output_tokens)


def test_the_worst_case_is_the_prompt_plus_the_requested_output_cap():
    by_hand = (1000 * D("0.15") + 500 * D("0.60")) / D(1_000_000)
    assert worst_case_cost(GPT_4O_MINI, _facts(1000, 500), default_max_output=4096) == by_hand


def test_without_a_cap_the_worst_case_uses_the_default_output_cap():
    by_hand = (1000 * D("0.15") + 4096 * D("0.60")) / D(1_000_000)
    assert worst_case_cost(GPT_4O_MINI, _facts(1000, None), default_max_output=4096) == by_hand


def test_a_zero_cap_is_respected_not_replaced_by_the_default():
    assert worst_case_cost(GPT_4O_MINI, _facts(1000, 0), default_max_output=4096) == D("0.00015")


def test_the_worst_case_assumes_no_cached_input():
    price = Price(input=D(10), cached_input=D(0), output=D(0))
    assert worst_case_cost(price, _facts(100_000, 0), default_max_output=0) == D(1)


def test_the_worst_case_prices_input_as_cache_writes_where_those_are_dearer():
    """The newest models bill prompt-cache writes at 1.25x input: all of a prompt may be one."""
    price = Price(input=D(2), cached_input=D("0.1"), output=D(0), cache_write_input=D("2.5"))
    assert worst_case_cost(price, _facts(100_000, 0), default_max_output=0) == D("0.25")
    cheaper = Price(input=D(2), cached_input=D("0.1"), output=D(0), cache_write_input=D(1))
    assert worst_case_cost(cheaper, _facts(100_000, 0), default_max_output=0) == D("0.2")


# -- reserved_input_tokens: earlier context the request names --------------------------------------

GPT_4O = Price(input=D("2.50"), cached_input=D("1.25"), output=D("10.00"))
WINDOW = 128_000  # gpt-4o's context window


def _follow_up(prompt_tokens: int, *, previous: str | None = "resp_1", context: int | None = None,
               unsized: str | None = None) -> RequestFacts:
    return RequestFacts(model="gpt-4o", stream=False, include_usage=False, prompt_tokens=prompt_tokens,
                        max_output_tokens=50, previous_response_id=previous, unsized=unsized,
                        context_tokens=context)


def test_a_follow_up_reserves_its_previous_responses_recorded_tokens_as_input():
    """The previous response's input (its own context) and output (its answer) are the next
    call's input, as OpenAI bills it: 100,000 + 50 recorded, plus 20 of its own."""
    assert reserved_input_tokens(_follow_up(20, context=100_050), WINDOW) == 100_070


def test_earlier_context_of_unknown_size_reserves_the_models_context_window():
    assert reserved_input_tokens(_follow_up(20), WINDOW) == WINDOW  # previous response not recorded
    for unsized in ("conversation", "prompt", "file", "item_reference"):
        assert reserved_input_tokens(_follow_up(20, previous=None, unsized=unsized), WINDOW) == WINDOW
        # a known previous response does not size a conversation or a stored prompt
        assert reserved_input_tokens(_follow_up(20, context=100, unsized=unsized), WINDOW) == WINDOW


def test_earlier_context_takes_the_input_to_the_context_window_at_most_but_never_below_its_own():
    assert reserved_input_tokens(_follow_up(20, context=127_990), WINDOW) == WINDOW
    assert reserved_input_tokens(_follow_up(200_000, context=100), WINDOW) == 200_000
    assert reserved_input_tokens(_follow_up(200_000, unsized="conversation"), WINDOW) == 200_000


def test_a_request_naming_no_earlier_context_reserves_its_own_estimate():
    assert reserved_input_tokens(_follow_up(20, previous=None), WINDOW) == 20


def test_the_worst_case_of_a_follow_up_prices_its_context_as_input_at_the_quotes_window():
    quote = Quote(GPT_4O, False, context_window=WINDOW)
    known = worst_case_units(quote, _follow_up(20, context=100_050), 4096)
    assert from_units(known) == (100_070 * D("2.50") + 50 * D(10)) / D(1_000_000)
    unknown = worst_case_units(quote, _follow_up(20), 4096)
    assert from_units(unknown) == (WINDOW * D("2.50") + 50 * D(10)) / D(1_000_000)  # $0.3205
    alone = worst_case_units(quote, _follow_up(20, previous=None), 4096)
    assert from_units(alone) == (20 * D("2.50") + 50 * D(10)) / D(1_000_000)


# -- admits --------------------------------------------------------------------------------------


def test_a_reservation_that_lands_exactly_on_the_limit_is_admitted():
    assert admits(D("4.00"), D("0.50"), D("0.50"), BUDGET)
    assert admits(D(0), D(0), D("5.00"), BUDGET)


def test_one_quantum_more_than_the_limit_is_refused():
    assert not admits(D("4.00"), D("0.50"), D("0.50") + QUANTUM, BUDGET)
    assert not admits(D(0), D(0), D("5.00") + QUANTUM, BUDGET)


def test_outstanding_reservations_count_like_the_new_one():
    assert not admits(D("4.00"), D("0.50") + QUANTUM, D("0.50"), BUDGET)


def test_spent_equal_to_the_limit_refuses_even_a_zero_reservation():
    assert not admits(D("5.00"), D(0), D(0), BUDGET)
    assert not admits(D("5.01"), D(0), D(0), BUDGET)


def test_one_quantum_below_the_limit_still_admits_a_request_that_fits():
    assert admits(D("5.00") - QUANTUM, D(0), D(0), BUDGET)
    assert admits(D("5.00") - QUANTUM, D(0), QUANTUM, BUDGET)
    assert not admits(D("5.00") - QUANTUM, D(0), 2 * QUANTUM, BUDGET)


def test_a_zero_limit_admits_nothing():
    assert not admits(D(0), D(0), D(0), make_budget(D(0), D(0)))


# -- lease_amount --------------------------------------------------------------------------------


def test_no_lease_when_the_need_does_not_fit_in_the_headroom():
    assert lease_amount(D("1.00") + QUANTUM, D("1.00"), D("0.05")) is None


def test_a_need_equal_to_the_headroom_leases_exactly_the_headroom():
    assert lease_amount(D("1.00"), D("1.00"), D("0.05")) == D("1.00")


def test_a_lease_is_the_need_plus_a_fraction_of_the_rest():
    assert lease_amount(D("0.01"), D("10.01"), D("0.05")) == D("0.51")
    assert lease_amount(D(0), D(4), D("0.25")) == D(1)


def test_a_fraction_of_one_leases_all_the_headroom():
    assert lease_amount(D("0.2"), D("3"), D(1)) == D(3)


def test_a_lease_is_on_the_storage_quantum():
    amount = lease_amount(D(0), D(1), D("0.33333"))
    assert amount is not None and amount.as_tuple().exponent == -10


AMOUNTS = st.decimals(min_value=0, max_value=10_000, places=10, allow_nan=False, allow_infinity=False)
FRACTIONS = st.decimals(min_value=QUANTUM, max_value=1, places=10, allow_nan=False, allow_infinity=False)


@settings(deadline=None)
@given(AMOUNTS, AMOUNTS, FRACTIONS)
def test_a_lease_covers_the_need_and_never_exceeds_the_headroom(need, headroom, fraction):
    amount = lease_amount(need, headroom, fraction)
    if need > headroom:
        assert amount is None
    else:
        assert amount is not None
        assert need <= amount <= headroom


@settings(deadline=None)
@given(AMOUNTS, AMOUNTS, AMOUNTS, FRACTIONS)
def test_a_lease_shrinks_as_the_limit_nears(need, extra_a, extra_b, fraction):
    low, high = need + min(extra_a, extra_b), need + max(extra_a, extra_b)
    small, large = lease_amount(need, low, fraction), lease_amount(need, high, fraction)
    assert small is not None and large is not None and small <= large


# -- warning_text --------------------------------------------------------------------------------


def test_the_warning_text_names_the_campaign_spend_limit_and_threshold():
    text = warning_text("c1", D("1.23456"), BUDGET)
    assert text == "Campaign 'c1' has spent $1.23456 of its $5.00 limit (warning at $1.00)"
    assert text.isascii()
    small = warning_text("w", D("0.00051"), make_budget(D("0.0004"), D("0.005")))
    assert small == "Campaign 'w' has spent $0.00051 of its $0.005 limit (warning at $0.0004)"


def test_the_worst_case_of_any_request_body_is_a_storable_amount():
    facts = request_facts(Operation.CHAT, {"messages": [], "max_completion_tokens": 10**40, "n": 10**9})
    price = Price(Decimal(10**7), Decimal(10**7), Decimal(10**7))
    # The output cap is bounded like every token count, so the reservation stays a number the
    # database stores (NUMERIC(20,10) would refuse 10**40 tokens' worth).
    assert worst_case_units(Quote(price, False), facts, 4096) == cost_units_of(
        price, facts.prompt_tokens, 0, MAX_TOKENS)
