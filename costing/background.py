"""Background responses (`{"background": true}`): who created them, the budget they hold while
queued, and which final states this process has metered already.

A background response is queued at creation and billed for the work it finally does, so it is
metered from its final state, once, when the proxy first reads it (the creating stream, a
retrieval, its stream, or its cancellation). Its record id derives from the response (see
`costing.records.derived_id`), so reads on several replicas still make one ledger row; this
class only keeps one process from counting a final state twice in its own running totals.

Creators are kept in memory and, for the other processes on the database (replicas, `serve
--workers N`), in `background_responses`: written by `keep_saved`, off the request path, soon
after the creation is seen (one statement per burst); a process that reads a final state
without having seen its creation looks the creator up there (Meter.settle_final_state), so the
creator's campaign is charged wherever the final state is read. Rows go after
`OWNER_KEEP_SECONDS`. A final state read elsewhere within the few milliseconds before the
creator is stored goes to the reader's tags (background responses take seconds, as a rule).

Until its final state is read, a queued response keeps the reservation its creation made: it is
work in flight, which OpenAI will bill, so a campaign cannot queue more of it than its budget
covers. The hold ends when this process meters the final state, or after `hold_seconds` (a
response read only through another replica, or never read, must not block the budget forever).
All maps are bounded: the oldest entries go first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol

from costing.gate import Admission
from costing.ledger import blames_the_record
from costing.records import UsageEntry
from costing.tasks import uninterrupted

log = logging.getLogger(__name__)

MAX_KEPT = 10_000
HOLD_SECONDS = 1800.0
OWNER_KEEP_SECONDS = 7 * 86_400.0
"""How long a creator stays in `background_responses`: a final state read later than this
through a process that did not see its creation goes to the reader's tags."""
PRUNE_EVERY_SECONDS = 3600.0
SAVE_ATTEMPTS = 3  # a batch the database refuses this often is dropped (logged), not retried forever


class OwnerStore(Protocol):
    async def save_background_owners(self, owners: Sequence[tuple[str, str, str, int]]) -> None: ...
    async def prune_background_owners(self, before: datetime) -> int: ...


class BackgroundResponses:
    def __init__(self, release: Callable[[Admission], None] = lambda admission: None, *,
                 hold_seconds: float = HOLD_SECONDS, max_kept: int = MAX_KEPT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.release = release
        self.hold_seconds = hold_seconds
        self.max_kept = max_kept
        self.clock = clock
        self._owners: OrderedDict[str, tuple[str, str]] = OrderedDict()
        # Held reservations by response id, oldest (first to expire) first.
        self.holds: OrderedDict[str, tuple[Admission, float]] = OrderedDict()
        self._metered: OrderedDict[int, None] = OrderedDict()
        # Creators not stored yet, oldest first: (campaign, session, epoch microseconds).
        self.unsaved: OrderedDict[str, tuple[str, str, int]] = OrderedDict()
        self.saving = False  # a write of creators is running (tests wait for it)
        self.lost = 0  # creators never stored (the bound, or refused by the database)
        self._attempts = 0  # failed writes of the oldest creators waiting
        self._wake = asyncio.Event()

    def remember(self, response_id: str, campaign_id: str, session_id: str,
                 admission: Admission | None = None) -> None:
        """The campaign and session that created a response (its cost goes there when read,
        here or, once stored, by any process), and the reservation it holds until then."""
        self._owners[response_id] = (campaign_id, session_id)
        if len(self._owners) > self.max_kept:
            self._owners.popitem(last=False)
        self.unsaved[response_id] = (campaign_id, session_id, time.time_ns() // 1000)
        if len(self.unsaved) > self.max_kept:  # the database away for long: the oldest go
            self.unsaved.popitem(last=False)
            self.lost += 1
        self._wake.set()
        if admission is not None:
            self._end_hold(response_id)  # an id seen twice holds once
            self.holds[response_id] = (admission, self.clock() + self.hold_seconds)
            if len(self.holds) > self.max_kept:
                self.release(self.holds.popitem(last=False)[1][0])

    def owner(self, response_id: str) -> tuple[str, str] | None:
        """The creator's tags if this process saw the creation, else None (then look them up in
        the database). The final state has been read: the response's hold ends."""
        self._end_hold(response_id)
        return self._owners.pop(response_id, None)

    def expire(self) -> None:
        """End the holds past their time."""
        holds, now = self.holds, self.clock()
        while holds:
            response_id, (admission, until) = next(iter(holds.items()))
            if until > now:
                return
            del holds[response_id]
            self.release(admission)

    def _end_hold(self, response_id: str) -> None:
        held = self.holds.pop(response_id, None)
        if held is not None:
            self.release(held[0])

    def first(self, entry: UsageEntry) -> bool:
        """True the first time this process meters this final state (by its derived id)."""
        if entry.id in self._metered:
            return False
        self._metered[entry.id] = None
        if len(self._metered) > self.max_kept:
            self._metered.popitem(last=False)
        return True

    # -- storing creators ----------------------------------------------------------------------

    async def keep_saved(self, store: OwnerStore, stop: asyncio.Event, *,
                         keep_seconds: float = OWNER_KEEP_SECONDS,
                         prune_every: float = PRUNE_EVERY_SECONDS) -> None:
        """Store creators as they come, prune old ones at start and every `prune_every`; at
        `stop`, store what is left and return (never stopped mid-statement: see costing.tasks)."""
        stopping = asyncio.ensure_future(stop.wait())
        next_prune = 0.0
        failures = 0
        try:
            while not stop.is_set():
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + prune_every
                    await self._prune(store, keep_seconds)
                if failures:  # backing off: new creators wait with the others
                    await asyncio.wait({stopping}, timeout=min(2.0**failures, 30.0))
                elif not self.unsaved:
                    woken = asyncio.ensure_future(self._wake.wait())
                    await asyncio.wait({woken, stopping}, return_when=asyncio.FIRST_COMPLETED,
                                       timeout=max(next_prune - time.monotonic(), 0.0))
                    woken.cancel()
                self._wake.clear()
                failures = 0 if await self._save(store) else failures + 1
        finally:
            stopping.cancel()
        await self._save(store)

    async def _save(self, store: OwnerStore) -> bool:
        """Write the creators waiting; False when the write failed (they stay, unless refused
        SAVE_ATTEMPTS times)."""
        if not self.unsaved:
            return True
        batch = list(self.unsaved.items())
        self.saving = True
        try:
            await uninterrupted(store.save_background_owners(
                [(rid, c, s, us) for rid, (c, s, us) in batch]))
        except Exception as exc:
            # Only a refusal of the values counts towards giving up: a database that is away
            # keeps them all (bounded by max_kept), written once it is back.
            self._attempts += blames_the_record(exc)
            if self._attempts >= SAVE_ATTEMPTS:
                log.error("%d creators of background responses could not be stored (%s): their "
                          "final states read through other processes go to the readers' tags",
                          len(batch), exc)
                self._forget(batch)
                self.lost += len(batch)
            else:
                log.warning("creators of background responses not stored yet: %s", exc)
            return False
        finally:
            self.saving = False
        self._forget(batch)
        return True

    def _forget(self, batch: list[tuple[str, tuple[str, str, int]]]) -> None:
        self._attempts = 0
        for response_id, owner in batch:
            if self.unsaved.get(response_id) == owner:  # not remembered again meanwhile
                del self.unsaved[response_id]

    async def _prune(self, store: OwnerStore, keep_seconds: float) -> None:
        try:
            await uninterrupted(store.prune_background_owners(
                datetime.now(UTC) - timedelta(seconds=keep_seconds)))
        except Exception as exc:
            log.debug("background creators not pruned: %s", exc)
