"""Background responses (`{"background": true}`): who created them, the budget they hold while
queued, and which final states this process has metered already.

A background response is queued at creation and billed for the work it finally does, so it is
metered from its final state, once, when the proxy first reads it (the creating stream, a
retrieval, its stream, or its cancellation). Its record id derives from the response (see
`costing.records.derived_id`), so reads on several replicas still make one ledger row; this
class only keeps one process from counting a final state twice in its own running totals.

Until its final state is read, a queued response keeps the reservation its creation made: it is
work in flight, which OpenAI will bill, so a campaign cannot queue more of it than its budget
covers. The hold ends when this process meters the final state, or after `hold_seconds` (a
response read only through another replica, or never read, must not block the budget forever).
All maps are bounded: the oldest entries go first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from costing.gate import Admission
from costing.records import UsageEntry

MAX_KEPT = 10_000
HOLD_SECONDS = 1800.0


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

    def remember(self, response_id: str, campaign_id: str, session_id: str,
                 admission: Admission | None = None) -> None:
        """The campaign and session that created a response (its cost goes there when read),
        and the reservation it holds until then."""
        self._owners[response_id] = (campaign_id, session_id)
        if len(self._owners) > self.max_kept:
            self._owners.popitem(last=False)
        if admission is not None:
            self._end_hold(response_id)  # an id seen twice holds once
            self.holds[response_id] = (admission, self.clock() + self.hold_seconds)
            if len(self.holds) > self.max_kept:
                self.release(self.holds.popitem(last=False)[1][0])

    def owner(self, response_id: str, campaign_id: str, session_id: str) -> tuple[str, str]:
        """The creator's tags if this process saw the creation, else the reader's. The final
        state has been read: the response's hold ends."""
        self._end_hold(response_id)
        return self._owners.pop(response_id, (campaign_id, session_id))

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
