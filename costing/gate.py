"""The budget gate: admits or refuses a request before it is forwarded, without a database round
trip while the campaign is far from its limit.

Each process keeps a view per campaign: recorded spend, its own unflushed cost (`pending`),
reservations of admitted requests still running (`inflight`), and a budget *lease* held in the
database. A request is admitted locally when `inflight + pending + reservation <= lease`.
Otherwise the process asks the database for a bigger lease, under a row lock on the campaign:
granted only if spend + every process's lease stays within the limit. Hence spend never passes
the limit by more than the excess of real cost over reservations, on one process or many, and
near the limit leases shrink until every request is checked against the database.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from costing.budget import Budget
from costing.errors import BudgetExceeded, LedgerUnavailable
from costing.money import from_units, to_units
from costing.records import UsageEntry
from costing.store import Store
from costing.tasks import finish, pause, uninterrupted

log = logging.getLogger(__name__)

DB_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError)
try:  # SQLAlchemy wraps driver errors; treat all of them as "the database is away".
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    DB_ERRORS = (*DB_ERRORS, DBAPIError, OperationalError, InterfaceError)
except ImportError:  # pragma: no cover
    pass

IDLE_VIEW_SECONDS = 300.0


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class CampaignView:
    """One campaign as this process sees it; amounts in money units (see costing.money)."""

    budget: Budget
    spent: int
    pending: int = 0
    inflight: int = 0
    lease: int = 0
    lease_until: float = 0.0
    flushed: int = 0
    stale: bool = False
    known: bool = True  # False: made while the database was away (spend and budget unknown)
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def total_spent(self) -> int:
        return self.spent + self.pending

    @property
    def busy(self) -> bool:
        return bool(self.inflight or self.pending)


@dataclass(slots=True)  # not frozen: made per request; see usage.Usage
class Admission:
    """A request let through: what it reserved, and the campaign view at that moment."""

    campaign_id: str
    reservation: int  # money units
    verified: bool = True


class BudgetGate:
    def __init__(
        self, store: Store, holder_id: str, default_budget: Budget, *, lease_seconds: float,
        lease_fraction: Decimal, fail_closed: bool, db_timeout: float = 3.0,
        clock: Callable[[], float] = time.monotonic, wall: Callable[[], datetime] = utcnow,
        write_lock: asyncio.Lock | None = None,
    ) -> None:
        self.store = store
        self.holder_id = holder_id
        self.default_budget = default_budget
        self.lease_seconds = lease_seconds
        self.lease_fraction = lease_fraction
        self.fail_closed = fail_closed
        self.db_timeout = db_timeout
        self.clock = clock
        self.wall = wall
        self.views: dict[str, CampaignView] = {}
        # The ledger's `writing` lock: no batch commits while a lease is asked for.
        self.write_lock = write_lock if write_lock is not None else asyncio.Lock()
        self.in_flight_requests = 0
        # Called at every refresh, before anything else (background holds expire there, so an
        # idle process lets go of them too).
        self.on_refresh: list[Callable[[], None]] = []

    # -- request path ----------------------------------------------------------------------------

    def admit_now(self, campaign_id: str, reservation: int) -> Admission | None:
        """The common case of `admit`, without awaiting: the campaign is known and its lease
        covers the request. None when `admit` has to ask the database; raises BudgetExceeded."""
        view = self.views.get(campaign_id)
        if view is None or view.stale or view.lock.locked():  # locked: its lease is being regrown
            return None
        now = self.clock()
        view.last_used = now
        if view.total_spent >= view.budget.limit_units and view.known:
            raise _exceeded(campaign_id, view, reservation)
        if now < view.lease_until and view.inflight + view.pending + reservation <= view.lease:
            return self._take(view, campaign_id, reservation, verified=True)
        return None

    async def admit(self, campaign_id: str, reservation: int) -> Admission:
        """Admit a request reserving `reservation` money units, or raise BudgetExceeded /
        LedgerUnavailable."""
        view = self.views.get(campaign_id)
        if view is None:
            view = await self._load(campaign_id)
        view.last_used = self.clock()
        if not view.stale and view.known and view.total_spent >= view.budget.limit_units:
            raise _exceeded(campaign_id, view, reservation)
        # While a lease is being regrown nothing is admitted against the old one: the new lease is
        # sized to what is held when it is asked for, and must cover everything admitted.
        if view.stale or view.lock.locked() or not self._fits_lease(view, reservation):
            async with view.lock:
                if not self._fits_lease(view, reservation):
                    verified = await self._grow_lease(campaign_id, view, reservation)
                    if not verified:
                        return self._admit_unverified(view, campaign_id, reservation)
        return self._take(view, campaign_id, reservation, verified=True)

    def _admit_unverified(self, view: CampaignView, campaign_id: str, reservation: int) -> Admission:
        """The database did not answer in time (fail-open): admitted unless what this process
        knows already rules it out (its spend, its calls in flight and this one past the limit).
        A campaign first seen during the outage is not known at all: admitted."""
        if view.known and view.total_spent + view.inflight + reservation > view.budget.limit_units:
            raise _exceeded(campaign_id, view, reservation)
        return self._take(view, campaign_id, reservation, verified=False)

    def _take(self, view: CampaignView, campaign_id: str, reservation: int,
              *, verified: bool) -> Admission:
        view.inflight += reservation
        self.in_flight_requests += 1
        return Admission(campaign_id, reservation, verified)

    def _fits_lease(self, view: CampaignView, reservation: int) -> bool:
        return (self.clock() < view.lease_until
                and view.inflight + view.pending + reservation <= view.lease)

    async def _load(self, campaign_id: str) -> CampaignView:
        try:
            async with asyncio.timeout(self.db_timeout):
                snapshot = (await uninterrupted(self.store.refresh(
                    [campaign_id], self.holder_id, renew_until=None)))[campaign_id]
        except DB_ERRORS as exc:
            if self.fail_closed:
                raise LedgerUnavailable("the cost database is unavailable") from exc
            log.warning("budget of %r unknown (database unavailable or slower than %ss); admitting",
                        campaign_id, self.db_timeout)
            view = self.views.get(campaign_id)
            if view is None:
                view = self.views[campaign_id] = CampaignView(self.default_budget, 0, known=False)
            return view
        # Another request may have created the view while this one waited.
        view = self.views.get(campaign_id)
        if view is None:
            view = self.views[campaign_id] = CampaignView(snapshot.budget, to_units(snapshot.spent))
        return view

    async def _grow_lease(self, campaign_id: str, view: CampaignView, reservation: int) -> bool:
        """Ask the database for a lease covering this request; False = admitted unverified."""
        try:
            async with asyncio.timeout(self.db_timeout), self.write_lock:
                held = view.inflight + view.pending
                flushed_before = view.flushed
                now = self.wall()
                # A grant the caller stops waiting for still lands: the database then holds
                # more than this view knows, which only ever errs on the small side.
                grant = await uninterrupted(self.store.acquire_lease(
                    campaign_id, self.holder_id, held=from_units(held),
                    need=from_units(held + reservation),
                    fraction=self.lease_fraction, now=now,
                    expires_at=now + timedelta(seconds=self.lease_seconds)))
        except DB_ERRORS as exc:
            if self.fail_closed:
                raise LedgerUnavailable("the cost database is unavailable") from exc
            return False
        # Cost flushed while we waited may or may not be inside the grant; assume it is not
        # (the lease only ever errs on the small side).
        view.lease = to_units(grant.amount) - (view.flushed - flushed_before)
        # Renewed leases expire a little earlier locally than in the database, never later.
        view.lease_until = self.clock() + self.lease_seconds * 0.9
        view.budget = grant.budget
        view.stale = False
        view.known = True
        view.spent = max(view.spent, to_units(grant.spent))
        if not grant.admitted:
            raise _exceeded(campaign_id, view, reservation)
        return True

    def settle(self, admission: Admission, cost: int) -> None:
        """The request finished: its reservation becomes its real (unflushed) cost, in units."""
        view = self.views[admission.campaign_id]
        view.inflight -= admission.reservation
        view.pending += cost
        self.in_flight_requests -= 1

    def hold(self, admission: Admission) -> None:
        """The request is over but its reservation stays (a background response, queued: it is
        billed when it finishes); `release` ends the hold."""
        self.in_flight_requests -= 1

    def release(self, admission: Admission) -> None:
        """A held reservation is no longer needed (its final state was metered, or it expired).
        The lease that covered it is renegotiated by the next admission (smaller) rather than
        renewed as it is, so other processes get that budget back within a lease's life."""
        view = self.views.get(admission.campaign_id)
        if view is not None:
            view.inflight -= admission.reservation
            view.lease_until = 0.0

    def charge_now(self, campaign_id: str, cost: int) -> bool:
        """`charge` when the campaign's view is in memory (no await); False when it is not."""
        view = self.views.get(campaign_id)
        if view is None:
            return False
        view.pending += cost
        return True

    async def charge(self, campaign_id: str, cost: int) -> None:
        """Count cost that no admission reserved (a background response's final state, read
        later) as this process's pending spend; never refuses."""
        if self.charge_now(campaign_id, cost):
            return
        try:
            view = await self._load(campaign_id)
        except LedgerUnavailable:  # fail-closed and the database away: count it all the same
            view = self.views.setdefault(campaign_id, CampaignView(self.default_budget, 0, known=False))
        view.pending += cost

    def view(self, campaign_id: str) -> CampaignView | None:
        return self.views.get(campaign_id)

    # -- background ------------------------------------------------------------------------------

    def on_flushed(self, batch: Sequence[UsageEntry], inserted: Sequence[UsageEntry],
                   _seconds: float) -> None:
        # A view may be gone: a campaign whose only unwritten records cost nothing is idle, and
        # its view is forgotten after IDLE_VIEW_SECONDS, however long the database was away.
        views = self.views
        for entry in batch:
            view = views.get(entry.campaign_id)
            if view is not None:
                view.pending -= entry.cost_units
        for entry in inserted:
            view = views.get(entry.campaign_id)
            if view is None:
                continue
            view.spent += entry.cost_units
            view.lease = max(view.lease - entry.cost_units, 0)
            view.flushed += entry.cost_units

    async def refresh(self) -> None:
        """Re-read spend, budget and leases of active campaigns; renew leases still in use.

        This is how budget changes and other replicas' spend reach this process.
        """
        for hook in self.on_refresh:
            hook()
        now = self.clock()
        for campaign_id in [c for c, v in self.views.items()
                            if not v.busy and now - v.last_used > IDLE_VIEW_SECONDS
                            and now >= v.lease_until]:
            del self.views[campaign_id]
        active = {c: v for c, v in self.views.items() if v.busy or now - v.last_used < self.lease_seconds}
        if not active:
            return
        renew = self.wall() + timedelta(seconds=self.lease_seconds)
        # Under the ledger's write lock, which lease requests take too: no batch commits (its
        # cost would be in the spend read and still in `pending`, counted twice) and no lease is
        # regrown (a trim landing after a new grant would leave the database holding less than
        # this process admits against) until the refresh is over.
        async with asyncio.timeout(self.db_timeout * 2), self.write_lock:
            trims = self._trim(active, now)
            snapshots = await uninterrupted(self.store.refresh(
                active, self.holder_id, renew_until=renew,
                trims={c: from_units(amount) for c, amount in trims.items()}))
        renewed_until = now + self.lease_seconds * 0.9
        for campaign_id, snap in snapshots.items():
            view = active[campaign_id]
            view.budget = snap.budget
            view.known = True
            view.spent = to_units(snap.spent)
            # A lease smaller in the database than here was revoked (budget changed): follow it.
            view.lease = min(view.lease, to_units(snap.lease))
            if snap.lease > 0 and view.lease_until > now:
                view.lease_until = max(view.lease_until, renewed_until)

    def _trim(self, active: dict[str, CampaignView], now: float) -> dict[str, int]:
        """Shrink leases larger than a grant would be now, locally at once (the database follows
        in the refresh): a burst's reservations, settled since at their real cost, must not keep
        the other replicas' share of the budget while this process goes on renewing its lease.

        A live lease keeps what is held (calls in flight, cost not yet flushed) plus its slice of
        the headroom, counted as if no other process held any (so never below a new grant); a
        lease expired here keeps only what is held, which must stay covered until it settles.
        """
        trims: dict[str, int] = {}
        for campaign_id, view in active.items():
            held = view.inflight + view.pending
            target = held
            if now < view.lease_until:
                target += int(self.lease_fraction * max(view.budget.limit_units - view.spent - held, 0))
            if view.lease > target:
                view.lease = trims[campaign_id] = target
        return trims

    def forget(self, campaign_id: str) -> None:
        """After a budget change: the next request re-reads the budget and leases anew."""
        view = self.views.get(campaign_id)
        if view is not None:
            view.lease = 0
            view.lease_until = 0.0
            view.stale = True

    async def run(self, interval: float, stop: asyncio.Event) -> None:
        """Refresh every `interval` seconds until `stop` is set (never stopped mid-refresh)."""
        while not await pause(stop, interval):
            try:
                await self.refresh()
            except DB_ERRORS as exc:
                log.debug("budget refresh failed: %s", exc)


class SessionCosts:
    """Per-session totals for the X-Session-Cost-USD header and the feed's events, in money units:
    the stored total, read in parallel with the upstream call and read again once it is older than
    `reread_seconds` (other replicas' and workers' spend shows within about that, as the budget
    headers' does), plus what this process recorded and has not flushed yet."""

    def __init__(self, store: Store, max_sessions: int = 50_000, reread_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 write_lock: asyncio.Lock | None = None) -> None:
        self.store = store
        # The ledger's `writing` lock: a read never sees a batch whose listeners have not run
        # (its cost would be in the read and in `pending`).
        self.write_lock = write_lock if write_lock is not None else asyncio.Lock()
        self.max_sessions = max_sessions
        self.reread_seconds = reread_seconds
        self.clock = clock
        self._entries: OrderedDict[tuple[str, str], _SessionEntry] = OrderedDict()

    def touch(self, campaign_id: str, session_id: str) -> None:
        key = (campaign_id, session_id)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _SessionEntry()
            self._read(key, entry)
            if len(self._entries) > self.max_sessions:
                self._entries.popitem(last=False)
            return
        self._entries.move_to_end(key)
        if entry.task is not None and entry.task.done() and \
                self.clock() - entry.read_at > self.reread_seconds:
            self._read(key, entry)

    def _read(self, key: tuple[str, str], entry: _SessionEntry) -> None:
        entry.read_at = self.clock()
        task = asyncio.ensure_future(self._stored(key, entry))
        entry.task = task
        task.add_done_callback(_retrieve)

    async def _stored(self, key: tuple[str, str], entry: _SessionEntry) -> int:
        """The stored total, read and taken in with no batch half-told (see write_lock)."""
        async with self.write_lock:
            entry.stored = value = to_units(await self.store.session_cost(*key))
        return value

    def add(self, campaign_id: str, session_id: str, cost: int) -> None:
        entry = self._entries.get((campaign_id, session_id))
        if entry is not None:
            entry.pending += cost

    def on_flushed(self, batch: Sequence[UsageEntry], inserted: Sequence[UsageEntry],
                   _seconds: float) -> None:
        """Committed cost moves from this process's pending part to the stored one."""
        for record in batch:
            entry = self._entries.get((record.campaign_id, record.session_id))
            if entry is not None:  # (an entry made after the record was added holds none of it)
                entry.pending = max(entry.pending - record.cost_units, 0)
        for record in inserted:
            entry = self._entries.get((record.campaign_id, record.session_id))
            if entry is not None and entry.stored is not None:
                entry.stored += record.cost_units

    async def close(self) -> None:
        """Wait for reads still running, so none outlives the engine (shutdown)."""
        await finish([e.task for e in self._entries.values() if e.task is not None], grace_seconds=2.0)

    def total_now(self, campaign_id: str, session_id: str) -> int | None:
        """`total` without awaiting: None while the stored part is being read (it started with
        the call, so it is nearly always done by its answer) or could not be read."""
        entry = self._entries.get((campaign_id, session_id))
        if entry is None or entry.stored is None or entry.task is None or not entry.task.done():
            return None
        return entry.stored + entry.pending

    def last_total(self, campaign_id: str, session_id: str) -> int | None:
        """`total_now`, or while the stored part is read again, with the last one read (the live
        feed's: never waiting, and never counting a flush that lands meanwhile twice)."""
        entry = self._entries.get((campaign_id, session_id))
        if entry is None or entry.stored is None:
            return None
        return entry.stored + entry.pending

    def total_later(self, campaign_id: str, session_id: str) -> tuple[asyncio.Future[int], int] | None:
        """When `last_total` is None because the stored part is being read for the first time:
        that read, and what this process holds unflushed (the total as of now is the read's
        result plus that)."""
        entry = self._entries.get((campaign_id, session_id))
        if entry is None or entry.task is None or entry.task.done():
            return None
        return entry.task, entry.pending

    async def total(self, campaign_id: str, session_id: str) -> int | None:
        entry = self._entries.get((campaign_id, session_id))
        if entry is None or entry.task is None:
            return None
        if not entry.task.done():
            try:
                await asyncio.wait_for(asyncio.shield(entry.task), 2.0)
            except Exception:  # a read again: the last total stands; a first one: none
                if entry.stored is None:
                    self._entries.pop((campaign_id, session_id), None)
                    return None
        return None if entry.stored is None else entry.stored + entry.pending


@dataclass(slots=True)
class _SessionEntry:
    task: asyncio.Future[int] | None = None  # the latest read of the stored total
    read_at: float = 0.0
    stored: int | None = None  # the stored total, with what this process flushed since the read
    pending: int = 0  # recorded by this process, not flushed yet


def _retrieve(task: asyncio.Future[int]) -> None:
    # A failed read leaves the last total; retrieving its error keeps asyncio from logging it.
    if not task.cancelled():
        task.exception()


def _exceeded(campaign_id: str, view: CampaignView, reservation: int) -> BudgetExceeded:
    return BudgetExceeded(campaign_id, from_units(view.total_spent), view.budget.limit_usd,
                          from_units(reservation))

