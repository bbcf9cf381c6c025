"""Background responses (`{"background": true}`): who created them, and which final states
this process has metered already.

A background response is queued at creation and billed for the work it finally does, so it is
metered from its final state, once, when the proxy first reads it (the creating stream, a
retrieval, its stream, or its cancellation). Its record id derives from the response (see
`costing.records.derived_id`), so reads on several replicas still make one ledger row; this
class only keeps one process from counting a final state twice in its own running totals.
Both maps are bounded: the oldest entries go first.
"""

from __future__ import annotations

from collections import OrderedDict

from costing.records import UsageEntry

MAX_KEPT = 10_000


class BackgroundResponses:
    def __init__(self, max_kept: int = MAX_KEPT) -> None:
        self.max_kept = max_kept
        self._owners: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._metered: OrderedDict[int, None] = OrderedDict()

    def remember(self, response_id: str, campaign_id: str, session_id: str) -> None:
        """The campaign and session that created a response: its cost goes there when read."""
        self._owners[response_id] = (campaign_id, session_id)
        if len(self._owners) > self.max_kept:
            self._owners.popitem(last=False)

    def owner(self, response_id: str, campaign_id: str, session_id: str) -> tuple[str, str]:
        """The creator's tags if this process saw the creation, else the reader's."""
        return self._owners.pop(response_id, (campaign_id, session_id))

    def first(self, entry: UsageEntry) -> bool:
        """True the first time this process meters this final state (by its derived id)."""
        if entry.id in self._metered:
            return False
        self._metered[entry.id] = None
        if len(self._metered) > self.max_kept:
            self._metered.popitem(last=False)
        return True
