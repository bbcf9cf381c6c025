"""Prices and the cost of a call, as OpenAI bills it.

The price data is genai-prices' bundled table (pinned; it is only read, never updated at run
time), completed by our own overrides (`price_overrides.json`: what the library lacks, each
entry citing OpenAI's published price) and extended/overridden by PRICES_FILE. A model's price
for a service tier (`flex`, `priority`, `batch`; anything else is the standard price) is
resolved once to integer money units per token (see costing.money) and memoized, so the cost of
a call is a few integer products; only a prompt-size tier is chosen per call.
"""

from __future__ import annotations

import functools
import json
import re
import time
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from costing.money import QUANTUM_DIGITS, from_units, to_units
from costing.usage import Usage

PER_MILLION = Decimal(1_000_000)
PER_THOUSAND = Decimal(1000)
UNITS_PER_TOKEN = Decimal(10**QUANTUM_DIGITS) / PER_MILLION  # USD per 1M tokens -> quanta per token
UNITS_PER_CALL = Decimal(10**QUANTUM_DIGITS) / PER_THOUSAND  # USD per 1k calls -> quanta per call
# `gpt-4o-mini-2024-07-18`, `gpt-4-0613`, `o1-preview-2024-09-12`: a date after the base name.
_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})$")

TOKEN_FIELDS = ("input", "cached_input", "output", "audio_input", "audio_output",
                "cache_write_input", "cached_audio_input")  # per 1M tokens
CALL_FIELDS = ("web_search", "web_search_preview")  # per 1k calls
AMOUNT_FIELDS = TOKEN_FIELDS + CALL_FIELDS
ENTRY_KEYS = frozenset({*AMOUNT_FIELDS, "search_every_call", "max_output_tokens", "service_tiers",
                        "long_context"})
# Far above any published price (o1-pro output is $600 per 1M tokens), far below what the
# ledger can store: a value above it is a typo (a price per token, an exponent), not a price.
MAX_PRICE = Decimal(10_000)
MAX_OUTPUT_TOKENS = 10**7
MAX_CONTEXT_WINDOW = 10**8
# The context window reserved as input for a model whose window neither the price data nor the
# tables know (see Quote.context_window): the largest of current OpenAI models (gpt-5.4,
# 1,050,000 tokens), so that such a reservation errs on the large side.
DEFAULT_CONTEXT_WINDOW = 1_050_000
SERVICE_TIERS = ("flex", "priority", "fast", "batch")
# What genai-prices calls a tier: request context for its price variants.
_LIBRARY_CONTEXT = {"flex": {"service_tier": "flex"}, "priority": {"service_tier": "priority"},
                    "fast": {"service_tier": "fast"}, "batch": {"processing": "batch"}}
# OpenAI renamed priority processing `fast` (2x the standard price): a response may name either,
# and a model whose prices name only one is billed at it for both.
_SAME_TIER = {"fast": "priority", "priority": "fast"}
_LIBRARY_KEYS = {"input_mtok": "input", "cache_read_mtok": "cached_input", "output_mtok": "output",
                 "input_audio_mtok": "audio_input", "output_audio_mtok": "audio_output",
                 "web_searches_kcount": "web_search", "cache_write_mtok": "cache_write_input",
                 "cache_audio_read_mtok": "cached_audio_input"}
BATCH_DISCOUNT = Decimal("0.5")  # OpenAI: the Batch API costs 50% of the standard price

LIBRARY = "genai-prices"
OVERRIDES = "costing/price_overrides.json"
USER = "PRICES_FILE"
DEFAULT = "default (OPENAI_PRICE_PER_1K_*)"


def service_tier_key(tier: str | None) -> str | None:
    """The tier a price is resolved for: flex, priority, fast or batch; None is the standard
    price (`default`, `auto`, `scale`, absent or anything unknown)."""
    if tier is None:
        return None
    tier = tier.lower()
    return tier if tier in SERVICE_TIERS else None


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens (web_search: per 1k searches). Audio prices None: audio tokens are
    billed as text; `cache_write_input` None: prompt-cache writes are billed as plain input (the
    models that price them apart report them); `cached_audio_input` None: cached audio is billed
    at the cached (text) input price. `long_context`: the price of prompts above N input tokens,
    ascending."""

    input: Decimal
    cached_input: Decimal
    output: Decimal
    audio_input: Decimal | None = None
    audio_output: Decimal | None = None
    web_search: Decimal = Decimal(0)
    search_every_call: bool = False  # Chat Completions search models: one search billed per call
    long_context: tuple[tuple[int, Price], ...] = ()
    cache_write_input: Decimal | None = None
    cached_audio_input: Decimal | None = None  # Realtime: cached audio input (cached_input if None)
    # The same price for a request that used the Responses `web_search_preview` tool, where its
    # per-call fee differs from `web_search` (non-reasoning models: $25 instead of $10 per 1k).
    preview: Price | None = field(default=None, compare=False)
    # The same prices in storage quanta (1e-10 USD) per token or per search, when all are whole
    # numbers of quanta (prices with at most 4 decimals): then a cost is integer arithmetic.
    # In token_prices' order, then web search, then cache writes and cached audio (appended:
    # older code indexes).
    units: tuple[int, int, int, int, int, int, int, int] | None = field(init=False, repr=False,
                                                                        compare=False)

    def __post_init__(self) -> None:
        (p_in, p_cached, p_out, p_audio_in, p_audio_out, p_write, p_cached_audio) = self.token_prices()
        amounts = [a * UNITS_PER_TOKEN for a in (p_in, p_cached, p_out, p_audio_in, p_audio_out)]
        amounts += [self.web_search * UNITS_PER_CALL, p_write * UNITS_PER_TOKEN,
                    p_cached_audio * UNITS_PER_TOKEN]
        exact = all(a == a.to_integral_value() for a in amounts)
        object.__setattr__(self, "units", tuple(int(a) for a in amounts) if exact else None)

    def token_prices(self) -> tuple[Decimal, Decimal, Decimal, Decimal, Decimal, Decimal, Decimal]:
        """input, cached input, output, audio input, audio output, cache writes, cached audio
        (audio as text, cache writes as input, cached audio as cached input when unset)."""
        return (self.input, self.cached_input, self.output,
                self.input if self.audio_input is None else self.audio_input,
                self.output if self.audio_output is None else self.audio_output,
                self.input if self.cache_write_input is None else self.cache_write_input,
                self.cached_input if self.cached_audio_input is None else self.cached_audio_input)

    def with_tools(self, search_preview: bool) -> Price:
        """The price for a call that offered the Responses `web_search_preview` tool, or not."""
        return self.preview if search_preview and self.preview is not None else self

    def for_prompt(self, input_tokens: int) -> Price:
        """The price for a prompt of this size: a long-context tier applies to the whole call
        when the prompt has more input tokens than its threshold (OpenAI's rule)."""
        price = self
        for above, tier in self.long_context:
            if input_tokens > above:
                price = tier
        return price


@dataclass(frozen=True, slots=True)
class Quote:
    """The price that applies to a model in a service tier, and where it came from."""

    price: Price
    priced_by_default: bool
    max_output_tokens: int | None = None  # the model's largest answer, when known
    model: str | None = None  # the name the price was found under
    source: str = DEFAULT
    # The most input tokens a call can be billed for: what a request naming context of unknown
    # size (a conversation, a previous response the ledger lacks) reserves as input.
    context_window: int = DEFAULT_CONTEXT_WINDOW


class PriceTableError(ValueError):
    """A price table that cannot be used (bad file, bad values)."""


def cost(price: Price, usage: Usage) -> Decimal:
    """Cost of a call in USD (see cost_units)."""
    return from_units(cost_units(price, usage))


def cost_units(price: Price, usage: Usage) -> int:
    """Cost of a call in money units (1e-10 USD): uncached text input, cached text and audio
    input, prompt-cache writes, text output (reasoning included), audio input and output at
    their prices, and web searches."""
    if price.long_context:
        price = price.for_prompt(usage.input_tokens)
    input_tokens, cached = usage.input_tokens, usage.cached_input_tokens
    cached_audio = usage.cached_audio_input_tokens  # part of cached: Realtime only
    if cached_audio:
        if cached_audio > cached:  # never more than the cached input (see realtime_usage)
            cached_audio = cached
        cached -= cached_audio  # the cached text
        input_tokens -= cached_audio
    written = usage.cache_write_input_tokens
    audio_in = usage.audio_input_tokens
    audio_out = usage.audio_output_tokens
    text_in = input_tokens - cached - written - audio_in
    if text_in < 0:
        text_in = 0
    text_out = usage.output_tokens - audio_out
    if text_out < 0:
        text_out = 0
    searches = usage.web_search_calls  # a search model's per-call search: set by the meter on
    # answered calls only (OpenAI bills no failed request), and by the reservation
    units = price.units
    if units is not None:  # the same value as below, without Decimal division and rounding
        return (text_in * units[0] + cached * units[1] + text_out * units[2] + audio_in * units[3]
                + audio_out * units[4] + searches * units[5] + written * units[6]
                + cached_audio * units[7])
    p_in, p_cached, p_out, p_audio_in, p_audio_out, p_write, p_cached_audio = price.token_prices()
    tokens = (text_in * p_in + cached * p_cached + text_out * p_out + audio_in * p_audio_in
              + audio_out * p_audio_out + written * p_write + cached_audio * p_cached_audio)
    return to_units(tokens / PER_MILLION + searches * price.web_search / PER_THOUSAND)


def cost_units_of(price: Price, input_tokens: int, cached_input_tokens: int, output_tokens: int) -> int:
    """`cost_units` over plain text counts (input includes cached), for callers without a Usage."""
    return cost_units(price, Usage(input_tokens, cached_input_tokens, output_tokens))


def base_model(model: str) -> str:
    """Strip a snapshot date: `gpt-4o-mini-2024-07-18` -> `gpt-4o-mini`."""
    return _SNAPSHOT.sub("", model)


# -- price entries (our overrides and PRICES_FILE share one shape) --------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One model's entry of a price file: only the fields it names."""

    amounts: Mapping[str, Decimal]
    search_every_call: bool | None = None
    max_output_tokens: int | None = None
    service_tiers: Mapping[str, Mapping[str, Decimal]] = field(default_factory=dict)
    long_context: tuple[tuple[int, Mapping[str, Decimal]], ...] | None = None


@dataclass(frozen=True, slots=True)
class PriceFile:
    """A parsed price file: model entries, max-output-token and context-window prefixes."""

    models: Mapping[str, Entry]
    max_output_tokens: Mapping[str, int]
    context_window: Mapping[str, int] = field(default_factory=dict)


def _amount(where: str, name: str, value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        raise PriceTableError(f"{where}: {name} must be a number")
    try:
        amount = Decimal(str(value))
    except ArithmeticError as exc:
        raise PriceTableError(f"{where}: {name} is not a number: {value!r}") from exc
    if not amount.is_finite() or amount < 0:
        raise PriceTableError(f"{where}: {name} must be a non-negative number")
    if amount > MAX_PRICE:
        raise PriceTableError(f"{where}: {name} must be at most {MAX_PRICE} (USD per 1M tokens, "
                              f"per 1k searches), not {value}")
    return amount


def _count(where: str, name: str, value: Any, limit: int) -> int:
    if type(value) is not int or not 0 <= value <= limit:
        raise PriceTableError(f"{where}: {name} must be a whole number from 0 to {limit}")
    return value


def _amounts(where: str, raw: Mapping[str, Any], allowed: Iterable[str]) -> dict[str, Decimal]:
    allowed = tuple(allowed)
    amounts: dict[str, Decimal] = {}
    for key, value in raw.items():
        if key.startswith("_"):
            continue
        if key not in allowed:
            raise PriceTableError(f"{where}: unknown key {key!r} (known: {', '.join(allowed)})")
        amounts[key] = _amount(where, key, value)
    return amounts


def _entry(model: str, raw: Any) -> Entry:
    where = f"price of {model!r}"
    if not isinstance(raw, dict):
        raise PriceTableError(f"{where} needs 'input' and 'output' in an object of prices "
                              "(USD per 1M tokens)")
    unknown = sorted(k for k in raw if not k.startswith("_") and k not in ENTRY_KEYS)
    if unknown:
        raise PriceTableError(f"{where}: unknown key {unknown[0]!r} "
                              f"(known: {', '.join(sorted(ENTRY_KEYS))})")
    amounts = _amounts(where, {k: v for k, v in raw.items() if k in AMOUNT_FIELDS}, AMOUNT_FIELDS)
    every = raw.get("search_every_call")
    if every is not None and not isinstance(every, bool):
        raise PriceTableError(f"{where}: search_every_call must be true or false")
    max_output = raw.get("max_output_tokens")
    if max_output is not None:
        max_output = _count(where, "max_output_tokens", max_output, MAX_OUTPUT_TOKENS)
    tiers_raw = raw.get("service_tiers", {})
    if not isinstance(tiers_raw, dict):
        raise PriceTableError(f"{where}: service_tiers must be an object of tier -> prices")
    tiers: dict[str, dict[str, Decimal]] = {}
    for tier, prices in tiers_raw.items():
        if tier.startswith("_"):
            continue
        if tier not in SERVICE_TIERS:
            raise PriceTableError(f"{where}: unknown service tier {tier!r} "
                                  f"(known: {', '.join(SERVICE_TIERS)})")
        if not isinstance(prices, dict):
            raise PriceTableError(f"{where}: service_tiers.{tier} must be an object of prices")
        tiers[tier] = _amounts(f"{where}, service tier {tier}", prices, AMOUNT_FIELDS)
    long_context = None
    if "long_context" in raw:
        bands = raw["long_context"]
        if not isinstance(bands, list):
            raise PriceTableError(f"{where}: long_context must be a list of "
                                  "{above: input tokens, input: .., output: ..}")
        parsed = []
        for band in bands:
            if not isinstance(band, dict) or "above" not in band:
                raise PriceTableError(f"{where}: each long_context tier needs 'above' (input tokens)")
            above = _count(where, "long_context above", band["above"], 10**9)
            parsed.append((above, _amounts(f"{where}, long_context above {above}",
                                           {k: v for k, v in band.items() if k != "above"}, TOKEN_FIELDS)))
        long_context = tuple(sorted(parsed, key=lambda band: band[0]))
    return Entry(amounts, every, max_output, tiers, long_context)


def parse_price_file(raw: Any) -> PriceFile:
    """`{"models": {model: entry}, "max_output_tokens": {prefix: n}, "context_window": {prefix:
    n}}`, or the models object alone.

    An entry: `input`, `cached_input`, `output`, `audio_input`, `audio_output`,
    `cache_write_input`, `cached_audio_input` (USD per 1M tokens), `web_search` and
    `web_search_preview` (USD per 1k searches with the Responses `web_search` /
    `web_search_preview` tool), `search_every_call`,
    `max_output_tokens`, `service_tiers` ({flex|priority|batch: {field: price}}) and
    `long_context` ([{above: N, field: price}]). Keys starting with `_` are comments; any other
    key is refused.
    """
    if not isinstance(raw, dict):
        raise PriceTableError("a price table is an object of model -> {input, cached_input, output}")
    if "models" in raw:
        unknown = sorted(k for k in raw if not k.startswith("_")
                         and k not in ("models", "max_output_tokens", "context_window"))
        if unknown:
            raise PriceTableError(f"unknown top-level key {unknown[0]!r} "
                                  "(known: models, max_output_tokens, context_window)")
        table = raw["models"]
        limits_raw = raw.get("max_output_tokens", {})
        windows_raw = raw.get("context_window", {})
    else:
        table, limits_raw, windows_raw = raw, {}, {}
    if not isinstance(table, dict):
        raise PriceTableError("'models' in a price table must be an object of model -> prices")
    if not isinstance(limits_raw, dict):
        raise PriceTableError("'max_output_tokens' must be an object of model name prefix -> tokens")
    if not isinstance(windows_raw, dict):
        raise PriceTableError("'context_window' must be an object of model name prefix -> tokens")
    models = {name.lower(): _entry(name, entry) for name, entry in table.items()
              if not name.startswith("_")}
    limits = {prefix.lower(): _count("max_output_tokens", prefix, n, MAX_OUTPUT_TOKENS)
              for prefix, n in limits_raw.items() if not prefix.startswith("_")}
    windows = {prefix.lower(): _count("context_window", prefix, n, MAX_CONTEXT_WINDOW)
               for prefix, n in windows_raw.items() if not prefix.startswith("_")}
    return PriceFile(models, limits, windows)


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


def _apply(fields: dict[str, Decimal], amounts: Mapping[str, Decimal]) -> dict[str, Decimal]:
    """An entry's prices over what is known: an `input` without `cached_input` means no caching
    discount (cached input at the input price), and without `cache_write_input` no cache-write
    price (writes at the new input price, not at a price made for the old one)."""
    fields.update(amounts)
    if "input" in amounts:
        if "cached_input" not in amounts:
            fields["cached_input"] = amounts["input"]
        if "cache_write_input" not in amounts:
            fields.pop("cache_write_input", None)
    return fields


def _build(fields: Mapping[str, Decimal], every: bool,
           bands: Iterable[tuple[int, Mapping[str, Decimal]]]) -> Price:
    def make(values: Mapping[str, Decimal], long_context: tuple[tuple[int, Price], ...] = (),
             search: str = "web_search") -> Price:
        return Price(values["input"], values.get("cached_input", values["input"]), values["output"],
                     values.get("audio_input"), values.get("audio_output"),
                     values.get(search, values.get("web_search", Decimal(0))), every, long_context,
                     values.get("cache_write_input"), values.get("cached_audio_input"))

    def priced(search: str) -> Price:
        current = dict(fields)
        tiers = []
        for above, band in sorted(bands, key=lambda b: b[0]):
            current = {**current, **band}
            tiers.append((above, make(current, search=search)))
        return make(fields, tuple(tiers), search)

    price = priced("web_search")
    preview = fields.get("web_search_preview")
    if preview is not None and preview != price.web_search:
        object.__setattr__(price, "preview", priced("web_search_preview"))
    return price


# -- the library ---------------------------------------------------------------------------------


@functools.cache
def library_version() -> str:
    return metadata.version("genai-prices")


def _openai_models() -> list[Any]:
    """genai-prices' bundled OpenAI models: the package's data module, read as it ships (its
    auto-update, `UpdatePrices`, is never started, so nothing is downloaded)."""
    from genai_prices.data import providers

    return next(p for p in providers if p.id == "openai").models


def _library_fields(info: Any, tier: str | None, when: datetime
                    ) -> tuple[dict[str, Decimal], list[tuple[int, dict[str, Decimal]]], bool]:
    """A library model's prices in our field names, its prompt-size tiers, and whether the tier
    was the library's own (a variant), at the time `when`."""
    from genai_prices.types import TieredPrices

    context = _LIBRARY_CONTEXT.get(tier) if tier else None
    standard = info.get_prices(when)
    prices = info.get_prices(when, context) if context else standard
    fields: dict[str, Decimal] = {}
    bands: dict[int, dict[str, Decimal]] = {}
    for key, name in _LIBRARY_KEYS.items():
        value = getattr(prices, key, None)
        if isinstance(value, TieredPrices):
            fields[name] = value.base
            for band in value.tiers:
                bands.setdefault(band.start, {})[name] = band.price
        elif value is not None:
            fields[name] = value
    varied = prices is not standard and any(
        getattr(prices, key, None) != getattr(standard, key, None) for key in _LIBRARY_KEYS)
    return fields, sorted(bands.items()), varied


class PriceTable:
    """Model name and service tier -> Quote: genai-prices, our overrides, PRICES_FILE, and a
    default price for unknown models."""

    def __init__(self, overrides: PriceFile, user: PriceFile | None, default: Price, *,
                 default_max_output_tokens: int | None = None,
                 library: list[Any] | None = None, user_label: str = USER) -> None:
        self.overrides = overrides
        self.user = user or PriceFile({}, {})
        self.default = default
        self.default_max_output_tokens = default_max_output_tokens
        self.user_label = user_label
        self._library = _openai_models() if library is None else library
        self._quotes: dict[tuple[str | None, str | None], Quote] = {}
        self._day = -1
        self._limits = {**overrides.max_output_tokens, **self.user.max_output_tokens}
        self._windows = {**overrides.context_window, **self.user.context_window}

    def quote(self, model: str | None, tier: str | None = None) -> Quote:
        """The price of a model in a service tier; memoized per UTC day (bounded), as every
        request asks and prices can change on a date."""
        day = int(time.time()) // 86_400
        if day != self._day:
            self._quotes.clear()
            self._day = day
        key = (model, tier)
        quote = self._quotes.get(key)
        if quote is None:
            quote = self.resolve(model, tier)
            if len(self._quotes) < 10_000:
                self._quotes[key] = quote
        return quote

    def __contains__(self, model: str) -> bool:
        return not self.quote(model).priced_by_default

    def library_model(self, name: str) -> Any | None:
        """The genai-prices model a name matches (its snapshot's base name as a second try)."""
        for candidate in dict.fromkeys((name, base_model(name))):
            for info in self._library:
                if info.is_match(candidate):
                    return info
        return None

    def _names(self, name: str, info: Any | None) -> list[str]:
        """Names an entry may be filed under, most specific first: the name, its base (no
        snapshot date), the library's id for it; a fine-tune `ft:BASE:org::id` also `ft:BASE`
        and BASE without its date."""
        names = [name, base_model(name)]
        if name.startswith("ft:"):
            base = name.split(":")[1]
            names += [f"ft:{base}", f"ft:{base_model(base)}"]
        if info is not None:
            names.append(info.id.lower())
        return list(dict.fromkeys(names))

    def resolve(self, model: str | None, tier: str | None = None, when: datetime | None = None) -> Quote:
        """`quote` without the memo, at any time (the price in force then)."""
        return self.explain(model, tier, when)[0]

    def explain(self, model: str | None, tier: str | None = None, when: datetime | None = None
                ) -> tuple[Quote, dict[str, str]]:
        """The quote and where each of its fields came from."""
        tier = service_tier_key(tier)
        when = when or datetime.now(UTC)
        name = model.lower().removeprefix("openai/") if model else ""
        info = self.library_model(name) if name else None
        names = self._names(name, info) if name else []
        found_as = [_first(names, entries) for entries in (self.overrides.models, self.user.models)]
        layers = [(OVERRIDES, found_as[0][1]), (self.user_label, found_as[1][1])]
        if info is None and not any(entry and {"input", "output"} <= entry.amounts.keys()
                                    for _, entry in layers):
            return Quote(self.default, True, self._max_output(name), None, DEFAULT,
                         self._context_window(name, info)), {f: DEFAULT for f in AMOUNT_FIELDS}
        fields: dict[str, Decimal] = {}
        origin: dict[str, str] = {}
        bands: list[tuple[int, dict[str, Decimal]]] = []
        every = False
        max_output = None
        found = found_as[1][0] or found_as[0][0] or (info.id if info is not None else None)
        tiered = False
        library_label = f"{LIBRARY} {library_version()}"
        if info is not None:
            fields, bands, tiered = _library_fields(info, tier, when)
            if not tiered and tier in _SAME_TIER:
                same = _library_fields(info, _SAME_TIER[tier], when)
                if same[2]:
                    fields, bands, tiered = same
            origin = dict.fromkeys(fields, library_label)
        for label, entry in layers:
            if entry is None:
                continue
            _apply(fields, entry.amounts)
            origin.update(dict.fromkeys(_apply({}, entry.amounts), label))
            if entry.long_context is not None:
                bands = [(above, dict(band)) for above, band in entry.long_context]
            if entry.search_every_call is not None:
                every = entry.search_every_call
            if entry.max_output_tokens is not None:
                max_output = entry.max_output_tokens
        for label, entry in layers:  # a tier's price is more specific than any standard price
            if entry is None or tier is None:
                continue
            named = tier if tier in entry.service_tiers else _SAME_TIER.get(tier)
            if named is not None and named in entry.service_tiers:
                _apply(fields, entry.service_tiers[named])
                origin.update(dict.fromkeys(_apply({}, entry.service_tiers[named]), f"{label} ({named})"))
                tiered = True
        if "cache_write_input" not in fields:  # dropped by an entry's own `input` (see _apply)
            origin.pop("cache_write_input", None)
        if tier == "batch" and not tiered:
            for key in TOKEN_FIELDS:
                if key in fields:
                    fields[key] = fields[key] * BATCH_DISCOUNT
                    origin[key] = f"{origin.get(key, '?')}, Batch API 50%"
            bands = [(above, {k: v * BATCH_DISCOUNT for k, v in band.items()}) for above, band in bands]
        if "input" in fields and "output" not in fields:  # embeddings: input only
            fields["output"] = Decimal(0)
        if "input" not in fields:  # a library model priced by other units (characters, seconds)
            return Quote(self.default, True, self._max_output(name), None, DEFAULT,
                         self._context_window(name, info)), {f: DEFAULT for f in AMOUNT_FIELDS}
        price = _build(fields, every, bands)
        source = ", ".join(sorted(set(origin.values())))
        if max_output is None:
            max_output = self._max_output(name, info.id if info is not None else None)
        return Quote(price, False, max_output, found or name, source,
                     self._context_window(name, info)), origin

    def _max_output(self, name: str, library_id: str | None = None) -> int | None:
        """Longest prefix of the name (or the library's id for it) in the max-output table."""
        found = _longest_prefix(self._limits, name, library_id)
        return found if found is not None else self.default_max_output_tokens

    def _context_window(self, name: str, info: Any | None) -> int:
        """The model's context window: our table (PRICES_FILE's, then the shipped corrections
        and gaps of the library), else genai-prices' figure, else DEFAULT_CONTEXT_WINDOW."""
        found = _longest_prefix(self._windows, name, info.id if info is not None else None)
        if found is not None:
            return found
        window = getattr(info, "context_window", None) if info is not None else None
        return window if type(window) is int and window > 0 else DEFAULT_CONTEXT_WINDOW

    @classmethod
    def load(
        cls,
        *,
        default_per_1k_prompt: Decimal,
        default_per_1k_completion: Decimal,
        prices_file: Path | None = None,
        default_max_output_tokens: int | None = None,
    ) -> PriceTable:
        """genai-prices with our overrides, extended/overridden by PRICES_FILE (JSON or TOML).
        Errors in PRICES_FILE are raised as one line naming it."""
        shipped = resources.files("costing").joinpath("price_overrides.json").read_text("utf-8")
        overrides = parse_price_file(json.loads(shipped, parse_float=Decimal))
        user = None
        label = USER
        if prices_file is not None:
            label = f"{USER} {prices_file}"
            try:
                user = parse_price_file(read_prices_file(prices_file))
            except PriceTableError as exc:
                raise PriceTableError(f"PRICES_FILE: {exc}") from None
        prompt = default_per_1k_prompt * 1000
        table = cls(overrides, user, Price(prompt, prompt, default_per_1k_completion * 1000),
                    default_max_output_tokens=default_max_output_tokens, user_label=label)
        table._check_complete()
        return table

    def _check_complete(self) -> None:
        """Every PRICES_FILE entry must give a whole price: its own `input` and `output`, or a
        model the shipped data prices (the entry then changes only the fields it names)."""
        for name, entry in self.user.models.items():
            if {"input", "output"} <= entry.amounts.keys():
                continue
            quote = self.resolve(name)
            if quote.priced_by_default:
                raise PriceTableError(f"PRICES_FILE: price of {name!r} needs 'input' and 'output' "
                                      "(USD per 1M tokens): the shipped data does not price this model")


def _longest_prefix(table: Mapping[str, int], name: str, library_id: str | None) -> int | None:
    """The value of the longest prefix of the name (or of the library's id for it) in a table."""
    best: tuple[int, int] | None = None
    for candidate in (name, library_id or ""):
        for prefix, tokens in table.items():
            if candidate.startswith(prefix) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), tokens)
    return best[1] if best else None


def _first(names: list[str], entries: Mapping[str, Entry]) -> tuple[str | None, Entry | None]:
    """The first of the names with an entry, and the entry."""
    for name in names:
        entry = entries.get(name)
        if entry is not None:
            return name, entry
    return None, None


def library_price(model: str, tier: str | None, when: date | datetime) -> Price | None:
    """genai-prices' own price of a model, for comparisons (tests, the prices command)."""
    table = PriceTable(PriceFile({}, {}), None, Price(Decimal(0), Decimal(0), Decimal(0)))
    moment = when if isinstance(when, datetime) else datetime.combine(when, datetime.min.time(), UTC)
    quote = table.resolve(model, tier, moment)
    return None if quote.priced_by_default else quote.price
