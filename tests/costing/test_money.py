"""Money: Decimal amounts on a 1e-10 USD quantum, their text form for JSON and headers, integer
units for SQLite, parsing of user-supplied amounts, and the budget refusal message.

Specification of `costing.money` and of the messages in `costing.errors`.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from costing.errors import BudgetExceeded, CostingError, InvalidBudget, format_money
from costing.money import (
    QUANTUM,
    SCALE,
    ZERO,
    format_units,
    format_usd,
    from_units,
    parse_usd,
    quantize,
    to_units,
)

D = Decimal

# -- the quantum ---------------------------------------------------------------------------------


def test_the_quantum_is_a_ten_billionth_of_a_dollar():
    assert QUANTUM == D("0.0000000001") and SCALE == 10**10 and ZERO == 0


def test_quantize_rounds_half_even_to_the_quantum():
    assert quantize(D("0.00000000015")) == D("0.0000000002")
    assert quantize(D("0.00000000025")) == D("0.0000000002")
    assert quantize(D("0.000000000249")) == D("0.0000000002")
    assert quantize(D("0.00000000005")) == D(0)
    assert quantize(D("3")).as_tuple().exponent == -10


# -- format_usd ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("amount", "text"), [
    (D("5"), "5.00"),
    (D("5.00"), "5.00"),
    (D("5.0000000000"), "5.00"),
    (D("0.000054"), "0.000054"),
    (D("0.0000540000"), "0.000054"),
    (D("0.0000000001"), "0.0000000001"),
    (D("1E-10"), "0.0000000001"),
    (D("0"), "0.00"),
    (D("0E-10"), "0.00"),
    (D("0.1"), "0.10"),
    (D("0.123"), "0.123"),
    (D("1234.5"), "1234.50"),
    (D("5E+3"), "5000.00"),
    (D("12.3456789012"), "12.3456789012"),
])
def test_format_usd_gives_at_least_cents_and_no_exponent_or_extra_zeros(amount, text):
    assert format_usd(amount) == text


@given(st.integers(min_value=-10**19, max_value=10**19))
def test_format_units_is_the_plain_decimal_string_of_the_amount(units):
    text = format_units(units)
    whole, _, fraction = text.partition(".")
    assert whole.lstrip("-").isdigit() and fraction.isdigit() and 2 <= len(fraction) <= 10
    assert len(fraction) == 2 or not fraction.endswith("0")
    assert D(text) == from_units(units) and text == format_usd(from_units(units))


def test_format_usd_rounds_amounts_finer_than_the_quantum():
    assert format_usd(D("0.00000000015")) == "0.0000000002"
    assert format_usd(D("0.00000000001")) == "0.00"


@settings(deadline=None)
@given(st.decimals(min_value=-10**9, max_value=10**9, places=10, allow_nan=False, allow_infinity=False))
def test_format_usd_is_a_plain_decimal_string_that_reads_back_as_the_amount(amount):
    text = format_usd(amount)
    assert "E" not in text.upper()
    whole, _, fraction = text.partition(".")
    assert whole.lstrip("-").isdigit() and fraction.isdigit() and 2 <= len(fraction) <= 10
    assert D(text) == amount


# -- to_units / from_units -----------------------------------------------------------------------


def test_units_are_ten_billionths_of_a_dollar():
    assert to_units(D("1")) == 10_000_000_000
    assert to_units(D("0.0000000001")) == 1
    assert to_units(D("0.000054")) == 540_000
    assert from_units(1) == QUANTUM
    assert from_units(50_000_000_000) == D("5")


def test_to_units_rounds_to_the_quantum_first():
    assert to_units(D("0.00000000015")) == 2


@settings(deadline=None)
@given(st.decimals(min_value=-10**12, max_value=10**12, places=10, allow_nan=False, allow_infinity=False))
def test_units_round_trip_exactly(amount):
    units = to_units(amount)
    assert isinstance(units, int)
    assert from_units(units) == amount
    assert from_units(units).as_tuple().exponent == -10


@settings(deadline=None)
@given(st.integers(min_value=-10**22, max_value=10**22))
def test_from_units_round_trips_every_integer(units):
    assert to_units(from_units(units)) == units


# -- parse_usd -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "amount"), [
    ("5.00", D("5")),
    (" 2.5 ", D("2.5")),
    ("0", D(0)),
    ("1e-3", D("0.001")),
    ("0.00000000015", D("0.0000000002")),
    ("-1", D("-1")),  # the sign is for callers to judge (make_budget refuses it)
])
def test_parse_usd_reads_decimal_text_onto_the_quantum(text, amount):
    parsed = parse_usd(text)
    assert parsed == amount and parsed.as_tuple().exponent == -10


@pytest.mark.parametrize("text", ["NaN", "nan", "sNaN", "-NaN", "Infinity", "-Infinity", "inf", "Inf"])
def test_parse_usd_rejects_nan_and_infinity(text):
    with pytest.raises(ValueError, match="not a finite number"):
        parse_usd(text)


@pytest.mark.parametrize("text", ["", " ", "abc", "$5", "5 USD", "1,00", "1.2.3", "0x10", "five", "1_000"])
def test_parse_usd_rejects_garbage(text):
    with pytest.raises(ValueError, match="not a decimal number"):
        parse_usd(text)


def test_parse_usd_raises_value_error_for_an_amount_too_large_to_store():
    with pytest.raises(ValueError):
        parse_usd("1e20")


def test_an_amount_that_rounds_up_to_the_bound_is_too_large_too():
    with pytest.raises(ValueError, match="too large"):
        parse_usd("99999999.999999999999")


# -- the refusal message -------------------------------------------------------------------------


def test_a_campaign_at_its_limit_is_refused_with_the_spec_message():
    error = BudgetExceeded("c1", D("5.01"), D("5.00"), D(0))
    assert str(error) == "Campaign 'c1' reached its cost limit: $5.01 spent of $5.00"


def test_the_refusal_message_shows_cents_for_amounts_on_the_quantum():
    error = BudgetExceeded("c1", D("5.0100000000"), D("5.0000000000"), D("0.0001"))
    assert str(error) == "Campaign 'c1' reached its cost limit: $5.01 spent of $5.00"


def test_spent_exactly_at_the_limit_is_reached():
    error = BudgetExceeded("c1", D(5), D(5), D(0))
    assert str(error) == "Campaign 'c1' reached its cost limit: $5.00 spent of $5.00"


def test_a_tiny_limit_is_shown_with_the_digits_that_matter():
    error = BudgetExceeded("tiny", D("0.000054"), D("0.00005"), D(0))
    assert str(error) == "Campaign 'tiny' reached its cost limit: $0.000054 spent of $0.00005"


def test_a_request_that_does_not_fit_says_what_it_may_cost():
    error = BudgetExceeded("c1", D("4.50"), D("5.00"), D("0.75"))
    assert str(error) == (
        "Campaign 'c1' cannot afford this request: $4.50 spent of $5.00, and this request may cost "
        "up to $0.75 (lower max_tokens or raise the budget)"
    )


def test_budget_exceeded_keeps_its_amounts():
    error = BudgetExceeded("c1", D("5.01"), D("5.00"), D("0.02"))
    assert (error.campaign_id, error.spent, error.limit, error.reservation) == ("c1", D("5.01"), D("5.00"),
                                                                                D("0.02"))
    assert isinstance(error, CostingError)


@pytest.mark.parametrize(("amount", "text"), [
    (D("5"), "5.00"),
    (D("5.01"), "5.01"),
    (D("12.3456"), "12.35"),  # a dollar or more: cents are enough
    (D("12.345"), "12.34"),  # half-even
    (D("0.25"), "0.25"),
    (D("0.000123"), "0.000123"),  # below a dollar: more digits rather than hide the amount
    (D("0"), "0.00"),
])
def test_format_money_shows_cents_and_more_digits_only_when_needed(amount, text):
    assert format_money(amount) == text


def test_invalid_budget_carries_the_parameter():
    error = InvalidBudget("limit_usd must be zero or more", "limit_usd")
    assert (str(error), error.param) == ("limit_usd must be zero or more", "limit_usd")
    assert InvalidBudget("bad").param is None
