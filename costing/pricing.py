"""Prices and the cost of a call: a table of USD per 1M tokens, with dated snapshots resolved
to their base model and a default price for models the table does not know.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

from costing.money import QUANTUM_DIGITS, from_units, to_units
from costing.usage import Usage

PER_MILLION = Decimal(1_000_000)
UNITS_PER_TOKEN = Decimal(10**QUANTUM_DIGITS) / PER_MILLION  # USD per 1M tokens -> quanta per token
# `gpt-4o-mini-2024-07-18`, `gpt-4-0613`, `o1-preview-2024-09-12`: a date after the base name.
_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})$")


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens."""

    input: Decimal
    cached_input: Decimal
    output: Decimal
    # The same prices in storage quanta (1e-10 USD) per token, when all three are whole numbers
    # of quanta (any price with at most 4 decimals): then a cost is exact integer arithmetic.
    units: tuple[int, int, int] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        per_token = [amount * UNITS_PER_TOKEN for amount in (self.input, self.cached_input, self.output)]
        exact = all(amount == amount.to_integral_value() for amount in per_token)
        object.__setattr__(self, "units", tuple(int(a) for a in per_token) if exact else None)


@dataclass(frozen=True, slots=True)
class Quote:
    """The price that applies to a model, and whether it came from the default."""

    price: Price
    priced_by_default: bool


class PriceTableError(ValueError):
    """A price table that cannot be used (bad file, bad values)."""


def cost(price: Price, usage: Usage) -> Decimal:
    """Cost of a call in USD: cached input at the cached price, reasoning inside output at the
    output price."""
    return from_units(cost_units(price, usage))


def cost_units(price: Price, usage: Usage) -> int:
    """`cost` in money units (1e-10 USD), as the request path keeps amounts."""
    return cost_units_of(price, usage.input_tokens, usage.cached_input_tokens, usage.output_tokens)


def cost_units_of(price: Price, input_tokens: int, cached_input_tokens: int, output_tokens: int) -> int:
    """`cost_units` over plain counts (input includes cached), for callers that have no Usage."""
    uncached = max(input_tokens - cached_input_tokens, 0)
    units = price.units
    if units is not None:  # the same value as below, without Decimal division and rounding
        return uncached * units[0] + cached_input_tokens * units[1] + output_tokens * units[2]
    total = uncached * price.input + cached_input_tokens * price.cached_input + output_tokens * price.output
    return to_units(total / PER_MILLION)


def base_model(model: str) -> str:
    """Strip a snapshot date: `gpt-4o-mini-2024-07-18` -> `gpt-4o-mini`."""
    return _SNAPSHOT.sub("", model)


class PriceTable:
    """Model name -> Price, with snapshot resolution and a default for unknown models."""

    def __init__(self, prices: Mapping[str, Price], default: Price) -> None:
        self._prices = {name.lower(): price for name, price in prices.items()}
        self.default = default
        self._quotes: dict[str | None, Quote] = {}

    def quote(self, model: str | None) -> Quote:
        """The price of a model; memoized (bounded), as every request asks."""
        quote = self._quotes.get(model)
        if quote is None:
            quote = self._resolve(model)
            if len(self._quotes) < 10_000:
                self._quotes[model] = quote
        return quote

    def _resolve(self, model: str | None) -> Quote:
        if model:
            name = model.lower().removeprefix("openai/")
            price = self._prices.get(name) or self._prices.get(base_model(name))
            if price is not None:
                return Quote(price, False)
        return Quote(self.default, True)

    def __contains__(self, model: str) -> bool:
        return not self.quote(model).priced_by_default

    @classmethod
    def load(
        cls,
        *,
        default_per_1k_prompt: Decimal,
        default_per_1k_completion: Decimal,
        prices_file: Path | None = None,
    ) -> PriceTable:
        """The shipped table, extended/overridden by PRICES_FILE (JSON or TOML, same shape)."""
        shipped = resources.files("costing").joinpath("prices.json").read_text("utf-8")
        prices = parse_prices(json.loads(shipped, parse_float=Decimal))
        if prices_file is not None:
            prices.update(parse_prices(read_prices_file(prices_file)))
        prompt = default_per_1k_prompt * 1000
        return cls(prices, Price(prompt, prompt, default_per_1k_completion * 1000))


def read_prices_file(path: Path) -> Any:
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise PriceTableError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        if path.suffix.lower() == ".toml":
            return tomllib.loads(text, parse_float=Decimal)
        return json.loads(text, parse_float=Decimal)
    except ValueError as exc:
        raise PriceTableError(f"{path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from exc


def _decimal(model: str, field: str, value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        raise PriceTableError(f"price of {model!r}: {field} must be a number")
    try:
        amount = Decimal(str(value))
    except ArithmeticError as exc:
        raise PriceTableError(f"price of {model!r}: {field} is not a number: {value!r}") from exc
    if not amount.is_finite() or amount < 0:
        raise PriceTableError(f"price of {model!r}: {field} must be a non-negative number")
    return amount


def parse_prices(raw: Any) -> dict[str, Price]:
    """`{"model": {"input": .., "cached_input": .. (optional), "output": ..}}`, USD per 1M tokens."""
    if not isinstance(raw, dict):
        raise PriceTableError("a price table is an object of model -> {input, cached_input, output}")
    table = raw.get("models", raw)
    if not isinstance(table, dict):
        raise PriceTableError("'models' in a price table must be an object of model -> prices")
    prices: dict[str, Price] = {}
    for model, entry in table.items():
        if model.startswith("_"):
            continue
        if not isinstance(entry, dict) or "input" not in entry or "output" not in entry:
            raise PriceTableError(f"price of {model!r} needs 'input' and 'output' (USD per 1M tokens)")
        price_in = _decimal(model, "input", entry["input"])
        prices[model] = Price(
            input=price_in,
            cached_input=_decimal(model, "cached_input", entry.get("cached_input", price_in)),
            output=_decimal(model, "output", entry["output"]),
        )
    return prices
