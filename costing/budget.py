"""Budget rules as pure functions: thresholds, status, worst-case reservations, lease sizing."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum

from costing.errors import InvalidBudget
from costing.money import format_usd, from_units, quantize, to_units
from costing.pricing import Quote, cost_units
from costing.usage import MAX_TOKENS, RequestFacts, Usage


@dataclass(frozen=True, slots=True)
class Budget:
    warning_usd: Decimal
    limit_usd: Decimal
    # The same thresholds in money units, for the request path (see costing.money).
    warning_units: int = field(init=False, repr=False, compare=False)
    limit_units: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "warning_units", to_units(self.warning_usd))
        object.__setattr__(self, "limit_units", to_units(self.limit_usd))


class BudgetStatus(StrEnum):
    OK = "ok"
    WARNING = "warning"
    EXCEEDED = "exceeded"


def make_budget(warning_usd: Decimal, limit_usd: Decimal) -> Budget:
    """A validated budget: both non-negative, warning not above limit."""
    if warning_usd < 0:
        raise InvalidBudget("warning_usd must be zero or more", "warning_usd")
    if limit_usd < 0:
        raise InvalidBudget("limit_usd must be zero or more", "limit_usd")
    if warning_usd > limit_usd:
        raise InvalidBudget(
            f"warning_usd ({format_usd(warning_usd)}) must not exceed limit_usd ({format_usd(limit_usd)})",
            "warning_usd"
        )
    return Budget(quantize(warning_usd), quantize(limit_usd))


def effective(override_warning: Decimal | None, override_limit: Decimal | None,
              default: Budget) -> Budget:
    """The campaign's override where set, else the defaults (a lone limit keeps warning <= limit)."""
    limit = override_limit if override_limit is not None else default.limit_usd
    warning = override_warning if override_warning is not None else min(default.warning_usd, limit)
    return Budget(warning, limit)


def status(spent: Decimal, budget: Budget) -> BudgetStatus:
    return status_units(to_units(spent), budget)


def status_units(spent: int, budget: Budget) -> BudgetStatus:
    """`status` in money units, for the request path and the live feed."""
    if spent >= budget.limit_units:
        return BudgetStatus.EXCEEDED
    if spent >= budget.warning_units:
        return BudgetStatus.WARNING
    return BudgetStatus.OK


def remaining(spent: Decimal, budget: Budget) -> Decimal:
    return from_units(remaining_units(to_units(spent), budget))


def remaining_units(spent: int, budget: Budget) -> int:
    """`remaining` in money units, for the request path."""
    return max(budget.limit_units - spent, 0)


def reserved_input_tokens(facts: RequestFacts, context_window: int) -> int:
    """The input a request may be billed for. OpenAI bills the earlier context a request names
    as input: a previous response counts its recorded input and output tokens (its context and
    its answer); context the proxy cannot size (a conversation, a stored prompt, a file by id,
    a previous response the ledger does not hold) counts as the model's whole context window.
    With that context, the input is at most the context window (no call is billed more input
    than the window holds), never less than the request's own estimate."""
    own = facts.prompt_tokens
    if facts.unsized is None and facts.previous_response_id is None:
        return own
    context = facts.context_tokens
    if facts.unsized is not None or context is None:
        context = context_window
    return max(own, min(own + context, context_window))


def worst_case_units(quote: Quote, facts: RequestFacts, default_max_output: int) -> int:
    """What a request may cost at most, in money units, at the requested tier's price: the
    estimated prompt with the earlier context it names (see reserved_input_tokens), plus its
    output cap, or without one the model's largest answer (the default cap for models whose
    largest answer is unknown) for each choice it asks for. Output is priced at the dearer of
    text and audio output, input at the dearer of a plain input and a prompt-cache write (all of
    it may be written to the cache); a model that searches on every call adds one search."""
    prompt = facts.prompt_tokens
    if facts.previous_response_id is not None or facts.unsized is not None:
        prompt = reserved_input_tokens(facts, quote.context_window)
    max_output = facts.max_output_tokens
    if max_output is None:
        per_choice = quote.max_output_tokens if quote.max_output_tokens is not None else default_max_output
        max_output = min(per_choice * facts.candidates, MAX_TOKENS)
    price = quote.price
    audio_dearer = price.audio_output is not None and price.audio_output > price.output
    write_dearer = price.cache_write_input is not None and price.cache_write_input > price.input
    return cost_units(price, Usage(prompt, 0, max_output, 0, 0, max_output if audio_dearer else 0,
                                   1 if price.search_every_call else 0,
                                   prompt if write_dearer else 0))


def admits(spent: Decimal, outstanding: Decimal, reservation: Decimal, budget: Budget) -> bool:
    """True when spend is below the limit and the reservation fits under it with what is outstanding."""
    return spent < budget.limit_usd and spent + outstanding + reservation <= budget.limit_usd


def lease_amount(need: Decimal, headroom: Decimal, fraction: Decimal) -> Decimal | None:
    """How much budget a process should hold: what it needs now plus a fraction of what is left.

    None when `need` does not fit in `headroom` (the limit minus spend and others' leases).
    Slices shrink as the limit nears, so near the limit every request is checked against the
    database, while far below it one lease serves many requests.
    """
    if need > headroom:
        return None
    return quantize(need + (headroom - need) * fraction)


def warning_text(campaign_id: str, spent: Decimal, budget: Budget) -> str:
    """The X-Cost-Warning header: plain ASCII, human-readable, amounts exact as the other headers
    write them (a $0.005 limit is not "$0.00")."""
    return (f"Campaign '{campaign_id}' has spent ${format_usd(spent)} "
            f"of its ${format_usd(budget.limit_usd)} limit (warning at ${format_usd(budget.warning_usd)})")
