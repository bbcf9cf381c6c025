"""The metering service: from a request's facts to an admission, and from what the upstream
reported to a priced ledger entry. The HTTP edge calls this; it knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

from costing.background import HOLD_SECONDS, BackgroundResponses
from costing.budget import Budget, worst_case_units
from costing.errors import BudgetExceeded, LedgerUnavailable
from costing.gate import DB_ERRORS, Admission, BudgetGate, SessionCosts
from costing.images import image_tokens
from costing.ledger import Ledger
from costing.money import format_units
from costing.pricing import Price, PriceTable, Quote, cost_units
from costing.records import UsageEntry, derived_id
from costing.tasks import uninterrupted
from costing.usage import UNSIZED, Operation, Reported, RequestFacts, Usage, estimate_usage

log = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that hung up before the answer
MAX_LOGGED_MODELS = 1000


@lru_cache(maxsize=1024)
def key_hash(authorization: str | None) -> str | None:
    """A short, non-reversible fingerprint of the API key: enough to tell keys apart in the ledger."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    key = credentials.strip() if scheme.lower() == "bearer" else authorization.strip()
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
    # A background response whose final state came in its own answer (a stream): resolved as
    # for FinalState.written. None for every other call.
    written: asyncio.Future[bool] | None = None


@dataclass(slots=True)
class FinalState:
    """A background response's final state, metered: submitted, or `pending` its creator (when
    this process did not see the creation) or its campaign view."""

    entry: UsageEntry
    pending: bool
    reported: Reported  # what the final state said (the call's span tells it)
    # True once this process's ledger inserted the row, False when the row was in the ledger
    # already (another process read the final state first) or was dropped: only the process
    # whose insert landed reports the call (its span, its feed event).
    written: asyncio.Future[bool]
    owner_unknown: bool = False  # the creator is looked up in the database first
    settling: asyncio.Future[None] | None = None  # the pending step, once started


class Meter:
    def __init__(self, prices: PriceTable, gate: BudgetGate, ledger: Ledger,
                 sessions: SessionCosts, *, default_max_output_tokens: int,
                 background_hold_seconds: float = HOLD_SECONDS) -> None:
        self.prices = prices
        self.gate = gate
        self.ledger = ledger
        self.sessions = sessions
        self.default_max_output_tokens = default_max_output_tokens
        self.background = BackgroundResponses(gate.release, hold_seconds=background_hold_seconds)
        gate.on_refresh.append(self.background.expire)  # every second: off the request path
        # Called with each entry once the ledger has it (the live feed): must not block. A
        # background final state's, once its insert landed (see `on_flushed`).
        self.listeners: list[Callable[[UsageEntry], None]] = []
        # Background final states submitted and not yet written, by record id.
        self._unreported: dict[int, asyncio.Future[bool]] = {}
        self._unknown_models: set[str] = set()

    def admit_now(self, campaign_id: str, session_id: str, operation: str,
                  facts: RequestFacts, authorization: str | None) -> Ticket | None:
        """`admit` without awaiting, when this process's budget lease covers the request (nearly
        always); None when the gate has to ask the database, or the request continues an
        earlier response (its tokens are looked up first). Raises as `admit` does."""
        if facts.previous_response_id is not None:
            return None
        quote, reservation = self._reserve(facts)
        try:
            admission = self.gate.admit_now(campaign_id, reservation)
        except BudgetExceeded as exc:
            raise self._held(_explained(exc, facts, quote, self.default_max_output_tokens)) from None
        if admission is None:
            return None
        return self._ticket(campaign_id, session_id, operation, facts, quote, admission, authorization)

    async def admit(self, campaign_id: str, session_id: str, operation: str,
                    facts: RequestFacts, authorization: str | None) -> Ticket:
        """Reserve the request's worst-case cost, or raise BudgetExceeded / LedgerUnavailable."""
        if facts.previous_response_id is not None and facts.unsized is None:
            facts = await self._continued(facts, facts.previous_response_id)
        quote, reservation = self._reserve(facts)
        # gate.admit covers the case admit_now takes too, so callers need not try that first.
        try:
            admission = await self.gate.admit(campaign_id, reservation)
        except BudgetExceeded as exc:
            raise self._held(_explained(exc, facts, quote, self.default_max_output_tokens)) from None
        return self._ticket(campaign_id, session_id, operation, facts, quote, admission, authorization)

    async def _continued(self, facts: RequestFacts, response_id: str) -> RequestFacts:
        """The facts of a request that continues an earlier response, with that response's
        tokens as recorded: the ledger's unwritten entries first, then the database (one indexed
        lookup, made only for such requests). Left unknown (the reservation then counts the
        model's context window) when neither holds it, or the database does not answer in time."""
        tokens = self.ledger.response_tokens(response_id)
        if tokens is None:
            try:
                async with asyncio.timeout(self.gate.db_timeout):
                    tokens = await uninterrupted(self.ledger.store.response_tokens(response_id))
            except DB_ERRORS:
                log.warning("tokens of response %r unknown (database unavailable): its model's "
                            "context window is reserved", response_id)
        return replace(facts, context_tokens=tokens) if tokens is not None else facts

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
        quote = self.prices.quote(facts.model, facts.service_tier)
        return quote, worst_case_units(quote, facts, self.default_max_output_tokens)

    def _held(self, exc: BudgetExceeded) -> BudgetExceeded:
        """A refusal while queued background responses hold part of the budget: say how much, as
        spend alone does not explain it."""
        if exc.spent >= exc.limit or not self.background.holds:
            return exc
        held = [admission.reservation for admission, _until in self.background.holds.values()
                if admission.campaign_id == exc.campaign_id]
        if not held:
            return exc
        return exc.with_hint(
            f"{len(held)} queued background response(s) hold ${format_units(sum(held))} of it until "
            "their final state is read (or BACKGROUND_HOLD_SECONDS pass)")

    def _ticket(self, campaign_id: str, session_id: str, operation: str, facts: RequestFacts,
                quote: Quote, admission: Admission, authorization: str | None) -> Ticket:
        self.sessions.touch(campaign_id, session_id)
        return Ticket(campaign_id, session_id, operation, facts, quote, admission,
                      key_hash(authorization))

    def record(self, ticket: Ticket, reported: Reported | None, *, status: int, streamed: bool,
               output_chars: int = 0, billed: bool = False) -> UsageEntry:
        """Price what the upstream reported (or estimate it) and hand the entry to the ledger.

        Without usage, a call the upstream answered (2xx), the client left (499) or the proxy
        gave up on while the upstream worked (`billed`: its 502/504 after a read timeout or a
        broken 2xx body) is estimated: prompt plus `output_chars` of answer text (a stream's so
        far, a JSON answer's), as OpenAI bills work it did. Other errors, OpenAI's own or a call
        that never reached it, cost nothing.
        Idempotent per ticket: a second call returns without recording twice.
        """
        usage: Usage | None = reported.usage if reported else None
        estimated = False
        if usage is None:
            if 200 <= status < 300 or status == CLIENT_CLOSED_REQUEST or billed:
                # The context it continued is billed as input too, when its size is known.
                usage = estimate_usage(ticket.facts.prompt_tokens + (ticket.facts.context_tokens or 0),
                                       output_chars)
                estimated = True
            else:
                usage = Usage()  # OpenAI does not bill failed requests
        response_model = reported.model if reported else None
        tier = (reported.service_tier if reported else None) or ticket.facts.service_tier
        price, by_default = self._price(response_model, ticket, tier)
        if price.search_every_call and usage.web_search_calls < 1 and (estimated or 200 <= status < 300):
            # Billed per call, when the call is billed at all (answered, or work the upstream
            # did for a client that left): the ledger shows the search.
            usage.web_search_calls = 1
        entry = self._entry(ticket.campaign_id, ticket.session_id, ticket.operation,
                            ticket.facts.model, reported if 200 <= status < 300 else None, usage,
                            price, by_default, tier, estimated, streamed, status, ticket.started,
                            ticket.api_key_hash)
        if ticket.settled:
            return entry
        if ticket.facts.background and 200 <= status < 300:
            # Queued in the background: the final state, read later, is what gets metered;
            # until then the response keeps its reservation (see costing.background).
            if estimated:  # the entry tells what the reply and its span report: nothing yet
                entry.cost_units, entry.usage, entry.estimated = 0, Usage(), False
                if reported is not None and reported.response_id:
                    ticket.settled = True
                    self.gate.hold(ticket.admission)
                    self.background.remember(reported.response_id, ticket.campaign_id,
                                             ticket.session_id, ticket.admission)
                else:  # nothing to know its final state by: nothing to hold for
                    self._settle(ticket, 0)
                return entry
            if not self.background.first(entry):
                self._settle(ticket, 0)  # this process metered that final state already
                return entry
            if reported is not None and reported.background_at is not None:
                # Its final state, in the creating answer (a stream): metered here, and the
                # creator stored, as other processes may read it too; reported once written.
                if reported.response_id:
                    self.background.remember(reported.response_id, ticket.campaign_id,
                                             ticket.session_id)
                self._settle(ticket, entry.cost_units)
                ticket.written = self._submit_final(entry)
                return entry
        self._settle(ticket, entry.cost_units)
        self._submit(entry)
        return entry

    def _price(self, response_model: str | None, ticket: Ticket, tier: str | None) -> tuple[Price, bool]:
        """The price of a finished call and whether it is the default: the response's model at
        the tier that served it (as the response says, else as asked), falling back to the
        requested model's when the response names a model the table does not know."""
        quote = ticket.quote
        if response_model or tier != ticket.facts.service_tier:
            quote = self.prices.quote(response_model or ticket.facts.model, tier)
            if quote.priced_by_default and not ticket.quote.priced_by_default:
                quote = self.prices.quote(ticket.facts.model, tier)
        return quote.price.with_tools(ticket.facts.search_preview), quote.priced_by_default

    def record_unpriced(self, ticket: Ticket, *, status: int) -> UsageEntry:
        """A call on a billable path the proxy cannot price yet: a ledger row at cost 0, flagged
        `priced_by_default`, so the ledger shows it."""
        entry = self._entry(ticket.campaign_id, ticket.session_id, ticket.operation, None, None,
                            Usage(), self.prices.quote(None).price, True, None, False, False,
                            status, ticket.started, ticket.api_key_hash)
        entry.cost_units = 0
        if not ticket.settled:
            self._settle(ticket, 0)
            self._submit(entry)
        return entry

    async def record_part(self, ticket: Ticket, reported: Reported, *, started: float,
                          operation: str | None = None) -> UsageEntry:
        """One billed part of a long-lived call (a Realtime session's `response.done`): its own
        ledger row, charged to the campaign without a reservation (the work is done and billed;
        the gate was asked when the session opened and before each part the client asked for).
        `ticket` is the session's admission, settled already; it gives tags, model and key hash.
        A part with an `operation` of its own (a Realtime transcription) runs on a model of its
        own: priced by that model alone, never by the session's. Returns once the entry is
        spooled; awaits only when the campaign's view is not in memory (the first part after a
        long idle)."""
        if operation is None:
            price, by_default = self._price(reported.model, ticket, None)
        else:
            quote = self.prices.quote(reported.model)
            price, by_default = quote.price, quote.priced_by_default
        usage = reported.usage if reported.usage is not None else Usage()
        entry = self._entry(ticket.campaign_id, ticket.session_id, operation or ticket.operation,
                            ticket.facts.model, reported, usage, price, by_default, None, False, True,
                            200, started, ticket.api_key_hash)
        if not self.gate.charge_now(ticket.campaign_id, entry.cost_units):
            await self.gate.charge(ticket.campaign_id, entry.cost_units)
        self.sessions.touch(ticket.campaign_id, ticket.session_id)
        self.sessions.add(ticket.campaign_id, ticket.session_id, entry.cost_units)
        self._submit(entry)
        return entry

    def release(self, ticket: Ticket) -> None:
        """An admitted call that never reached the upstream whole (the proxy refused its body part
        way): nothing was billed, so no ledger row; its reservation is freed."""
        if not ticket.settled:
            self._settle(ticket, 0)

    def final_state(self, campaign_id: str, session_id: str, reported: Reported, *, status: int,
                    streamed: bool, started: float, authorization: str | None) -> FinalState | None:
        """Meter a background response whose final state was read (a retrieval, its stream or
        its cancellation), once: its record id derives from the response, so any number of
        reads, here or on other replicas, make one ledger row. Recorded under the campaign and
        session that created it: this process's memory when it saw the creation, else the
        database (`background_responses`, written by the creating process); the reader's tags
        only when neither knows it. Never refused: the work is done and billed. Reported (span,
        feed) only by the process whose ledger insert lands: see `FinalState.written`.

        Synchronous, so a stream's record is spooled before its last event goes out: the entry
        is submitted at once when this process saw the creation and the campaign's budget view
        is in memory (as a rule); else `FinalState.pending` and `settle_final_state` must be
        awaited to look the creator up and load the view."""
        if reported.background_at is None or reported.usage is None or not 200 <= status < 300:
            return None
        owner = self.background.owner(reported.response_id) if reported.response_id else None
        if owner is not None:
            campaign_id, session_id = owner
        quote = self.prices.quote(reported.model, reported.service_tier)
        entry = self._entry(campaign_id, session_id, Operation.RESPONSES.value, None, reported,
                            reported.usage, quote.price.with_tools(reported.search_preview),
                            quote.priced_by_default, reported.service_tier, False, streamed, status,
                            started, key_hash(authorization))
        if not self.background.first(entry):
            return None
        written: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if owner is None and reported.response_id:
            return FinalState(entry, True, reported, written, owner_unknown=True)
        if not self.gate.charge_now(campaign_id, entry.cost_units):
            return FinalState(entry, True, reported, written)
        self._submit_final_state(entry, written)
        return FinalState(entry, False, reported, written)

    async def settle_final_state(self, state: FinalState) -> None:
        """Submit a final state whose creator had to be looked up or whose campaign view had to
        be loaded first. Idempotent: a second call (the handler's `finally` after its client
        left) waits for the same step, so the entry's tags are final when it returns."""
        if state.settling is None:
            if not state.pending:
                return
            state.settling = asyncio.ensure_future(self._settle_final_state(state))
            state.settling.add_done_callback(_seen)
        await asyncio.shield(state.settling)

    async def _settle_final_state(self, state: FinalState) -> None:
        state.pending = False
        entry = state.entry
        try:
            if state.owner_unknown and entry.response_id:
                owner = await self._stored_owner(entry.response_id)
                if owner is not None:
                    entry.campaign_id, entry.session_id = owner
            await self.gate.charge(entry.campaign_id, entry.cost_units)
        except BaseException:
            if not state.written.done():
                state.written.set_result(False)
            raise
        self._submit_final_state(entry, state.written)

    async def _stored_owner(self, response_id: str) -> tuple[str, str] | None:
        """The creator another process stored; None (the reader's tags) when none is stored or
        the database does not answer in time."""
        try:
            async with asyncio.timeout(self.gate.db_timeout):
                return await uninterrupted(self.ledger.store.background_owner(response_id))
        except DB_ERRORS:
            log.warning("creator of background response %r unknown (database unavailable): "
                        "its final state is charged to the reader's campaign", response_id)
            return None

    def _submit_final_state(self, entry: UsageEntry, written: asyncio.Future[bool]) -> None:
        self.sessions.touch(entry.campaign_id, entry.session_id)
        self.sessions.add(entry.campaign_id, entry.session_id, entry.cost_units)
        self._submit_final(entry, written)

    def _submit_final(self, entry: UsageEntry,
                      written: asyncio.Future[bool] | None = None) -> asyncio.Future[bool]:
        """Hand a background final state to the ledger. Several processes may meter it; the
        ledger keeps the first insert (the id derives from the response), so listeners hear of
        it only once this process's insert landed (`on_flushed`), never at submission."""
        if written is None:
            written = asyncio.get_running_loop().create_future()
        self.ledger.submit(entry)
        self._unreported[entry.id] = written
        return written

    def on_flushed(self, batch: Sequence[UsageEntry], inserted: Sequence[UsageEntry],
                   _seconds: float) -> None:
        """Ledger listener: background final states this process inserted are told to the
        listeners now and resolve True; those another process had inserted first (in `batch`
        but not in `inserted`), or dropped, resolve False and are told to nobody. Nothing to do
        (one test) for batches without them."""
        unreported = self._unreported
        if not unreported:
            return
        for entry in inserted:
            written = unreported.pop(entry.id, None)
            if written is not None:
                self._tell(entry)
                if not written.done():
                    written.set_result(True)
        if unreported:
            for entry in batch:
                written = unreported.pop(entry.id, None)
                if written is not None and not written.done():
                    written.set_result(False)

    def _entry(self, campaign_id: str, session_id: str, operation: str, request_model: str | None,
               reported: Reported | None, usage: Usage, price: Price, priced_by_default: bool,
               tier: str | None, estimated: bool, streamed: bool, status: int, started: float,
               api_key_hash: str | None) -> UsageEntry:
        if priced_by_default:
            self._unknown_model(request_model if reported is None else reported.model or request_model)
        # Positional, in field order: keyword matching of 16 fields cost more than the rest.
        entry = UsageEntry(
            campaign_id, session_id, operation, request_model,
            reported.model if reported else None, usage, cost_units(price, usage),
            priced_by_default, estimated, streamed, status,
            int((time.perf_counter() - started) * 1000), time.time_ns() // 1000,
            reported.response_id if reported else None, api_key_hash, tier,
        )
        if reported is not None and reported.background_at is not None and reported.usage is not None:
            entry.id = derived_id(f"background:{reported.response_id}:{reported.background_at}")
        return entry

    def _settle(self, ticket: Ticket, cost: int) -> None:
        ticket.settled = True
        self.gate.settle(ticket.admission, cost)
        self.sessions.add(ticket.campaign_id, ticket.session_id, cost)

    def _submit(self, entry: UsageEntry) -> None:
        self.ledger.submit(entry)
        for listener in self.listeners:
            try:
                listener(entry)
            except Exception:  # a listener's bug must not fail the call it heard about
                log.exception("usage listener failed")

    def _tell(self, entry: UsageEntry) -> None:
        for listener in self.listeners:
            try:
                listener(entry)
            except Exception:  # a listener's bug must not fail the call it heard about
                log.exception("usage listener failed")

    def _unknown_model(self, model: str | None) -> None:
        """Log the first call priced with the default prices, per model (bounded)."""
        if model is None:  # a billable path without a model (an upload): nothing to add
            return
        key = model
        if key in self._unknown_models or len(self._unknown_models) >= MAX_LOGGED_MODELS:
            return
        self._unknown_models.add(key)
        log.warning("model %r is not in the price table: priced with the default prices "
                    "(OPENAI_PRICE_PER_1K_*); add it to PRICES_FILE", model)

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


def _seen(task: asyncio.Future[None]) -> None:
    """A step whose waiter left: its error, logged by the step itself, is not reported again."""
    if not task.cancelled():
        task.exception()


def _explained(exc: BudgetExceeded, facts: RequestFacts, quote: Quote, default_max_output: int
               ) -> BudgetExceeded:
    """A refusal while the campaign still has budget: say what made the reservation large (an
    earlier context the request names, its images, no output cap) and how to make the request
    fit (/costs shows the same remaining amount)."""
    if exc.spent >= exc.limit:
        return exc
    model = facts.model or "the model"
    window = f"the whole context window of {model} ({quote.context_window} tokens)"
    if facts.unsized is not None:
        exc = exc.with_hint(
            f"It names {UNSIZED[facts.unsized]}, whose size the proxy cannot know, so {window} is "
            "reserved as input (a hold: the call settles at its real cost)")
    elif facts.previous_response_id is not None:
        if facts.context_tokens is None:
            exc = exc.with_hint(
                f"It continues response '{facts.previous_response_id}' (previous_response_id), "
                f"which this proxy's ledger does not hold (yet), so {window} is reserved as input "
                "(a hold: the call settles at its real cost); send the earlier turns as input "
                "instead to reserve only what they hold")
        else:
            exc = exc.with_hint(
                f"It continues response '{facts.previous_response_id}' (previous_response_id), "
                f"whose {facts.context_tokens} recorded tokens (its input and its answer) are "
                "billed again as input")
    if facts.images:
        figures = image_tokens(facts.model)
        exc = exc.with_hint(
            f"Its {facts.images} image(s) reserve {facts.image_tokens} tokens: up to "
            f"{figures.high} each, the most {model} bills for one at detail high or auto "
            f"({figures.low} at detail low)")
    if facts.max_output_tokens is not None:
        return exc
    per_choice = quote.max_output_tokens if quote.max_output_tokens is not None else default_max_output
    choices = f" for each of {facts.candidates} choices" if facts.candidates > 1 else ""
    return exc.with_hint(
        f"It sets no output cap, so {per_choice} output tokens{choices} are reserved (the most "
        f"{model} can answer): set max_completion_tokens (or max_tokens / "
        "max_output_tokens) to what the answer needs")
