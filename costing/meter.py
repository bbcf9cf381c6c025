"""The metering service: from a request's facts to an admission, and from what the upstream
reported to a priced ledger entry. The HTTP edge calls this; it knows nothing of HTTP.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from functools import lru_cache

from costing.budget import Budget, worst_case_units
from costing.errors import LedgerUnavailable
from costing.gate import Admission, BudgetGate, SessionCosts
from costing.ledger import Ledger
from costing.pricing import PriceTable, Quote, cost_units
from costing.records import UsageEntry
from costing.usage import Operation, Reported, RequestFacts, Usage, estimate_usage


@lru_cache(maxsize=1024)
def key_hash(authorization: str | None) -> str | None:
    """A short, non-reversible fingerprint of the API key: enough to tell keys apart in the ledger."""
    if not authorization:
        return None
    key = authorization.removeprefix("Bearer ").strip()
    return hashlib.sha256(key.encode()).hexdigest()[:12] if key else None


@dataclass(slots=True)
class Ticket:
    """One admitted metered request, from admission to its ledger entry."""

    campaign_id: str
    session_id: str
    operation: str  # the Operation's value: enum `.value` is a Python-level property
    facts: RequestFacts
    quote: Quote
    admission: Admission
    api_key_hash: str | None
    started: float = field(default_factory=time.perf_counter)
    settled: bool = False


class Meter:
    def __init__(self, prices: PriceTable, gate: BudgetGate, ledger: Ledger,
                 sessions: SessionCosts, *, default_max_output_tokens: int) -> None:
        self.prices = prices
        self.gate = gate
        self.ledger = ledger
        self.sessions = sessions
        self.default_max_output_tokens = default_max_output_tokens

    def admit_now(self, campaign_id: str, session_id: str, operation: Operation,
                  facts: RequestFacts, authorization: str | None) -> Ticket | None:
        """`admit` without awaiting, when this process's budget lease covers the request (nearly
        always); None when the gate has to ask the database. Raises as `admit` does."""
        quote, reservation = self._reserve(facts)
        admission = self.gate.admit_now(campaign_id, reservation)
        if admission is None:
            return None
        return self._ticket(campaign_id, session_id, operation, facts, quote, admission, authorization)

    async def admit(self, campaign_id: str, session_id: str, operation: Operation,
                    facts: RequestFacts, authorization: str | None) -> Ticket:
        """Reserve the request's worst-case cost, or raise BudgetExceeded / LedgerUnavailable."""
        quote, reservation = self._reserve(facts)
        # gate.admit covers the case admit_now takes too, so callers need not try that first.
        admission = await self.gate.admit(campaign_id, reservation)
        return self._ticket(campaign_id, session_id, operation, facts, quote, admission, authorization)

    def _reserve(self, facts: RequestFacts) -> tuple[Quote, int]:
        """The request's price and worst-case cost, once the ledger can take its record."""
        if not self.ledger.has_room(self.gate.in_flight_requests + 1):
            raise LedgerUnavailable("usage cannot be recorded right now (ledger buffer full)")
        spool = self.ledger.spool
        if spool is not None and not spool.healthy and not spool.usable():
            raise LedgerUnavailable("usage cannot be recorded right now (the local spool in "
                                    f"LEDGER_SPOOL_DIR cannot be written: {spool.last_error})")
        if self.gate.fail_closed and not self.ledger.healthy:
            # BUDGET_FAIL_CLOSED: serve nothing while usage cannot be written, even when a budget
            # lease held from before the outage would still cover the request.
            raise LedgerUnavailable("the cost database is unavailable")
        quote = self.prices.quote(facts.model)
        return quote, worst_case_units(quote.price, facts, self.default_max_output_tokens)

    def _ticket(self, campaign_id: str, session_id: str, operation: Operation, facts: RequestFacts,
                quote: Quote, admission: Admission, authorization: str | None) -> Ticket:
        self.sessions.touch(campaign_id, session_id)
        # str() of a StrEnum member is its value, without `.value`'s descriptor call.
        return Ticket(campaign_id, session_id, str(operation), facts, quote, admission,
                      key_hash(authorization))

    def record(self, ticket: Ticket, reported: Reported | None, *, status: int, streamed: bool,
               streamed_chars: int = 0) -> UsageEntry:
        """Price what the upstream reported (or estimate it) and hand the entry to the ledger.

        Idempotent per ticket: a second call returns without recording twice.
        """
        usage: Usage | None = reported.usage if reported else None
        estimated = False
        if usage is None:
            if 200 <= status < 300:
                usage = estimate_usage(ticket.facts.prompt_tokens, streamed_chars)
                estimated = True
            else:
                usage = Usage()  # OpenAI does not bill failed requests
        response_model = reported.model if reported else None
        quote = self.prices.quote(response_model) if response_model else ticket.quote
        if quote.priced_by_default and not ticket.quote.priced_by_default:
            quote = ticket.quote
        amount = cost_units(quote.price, usage)
        # Positional, in field order: keyword matching of 16 fields cost more than the rest.
        entry = UsageEntry(
            ticket.campaign_id, ticket.session_id, ticket.operation, ticket.facts.model,
            response_model, usage, amount, quote.priced_by_default, estimated, streamed, status,
            int((time.perf_counter() - ticket.started) * 1000), time.time_ns() // 1000,
            reported.response_id if reported and 200 <= status < 300 else None,
            ticket.api_key_hash,
        )
        if not ticket.settled:
            ticket.settled = True
            self.gate.settle(ticket.admission, amount)
            self.sessions.add(ticket.campaign_id, ticket.session_id, amount)
            self.ledger.submit(entry)
        return entry

    def standing(self, campaign_id: str) -> tuple[int, Budget]:
        """What the response headers say about the campaign after a request: its spend in
        money units, and its budget."""
        view = self.gate.view(campaign_id)
        if view is None:
            return 0, self.gate.default_budget
        return view.total_spent, view.budget

    async def session_total(self, campaign_id: str, session_id: str) -> int | None:
        return await self.sessions.total(campaign_id, session_id)

    def session_total_now(self, campaign_id: str, session_id: str) -> int | None:
        """`session_total` when the stored part has been read already (nearly always), else None."""
        return self.sessions.total_now(campaign_id, session_id)
