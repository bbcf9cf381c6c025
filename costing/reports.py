"""The cost-analytics service behind /costs: validated reads and budget changes over the store.

Reads are read-your-writes: what this process has answered but its ledger has not written yet
is added to what the database holds (`overlay_*`, pure), so a tab that refreshes after a reply
never shows the total from before it. Other processes' unwritten calls show once written.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Protocol, TypeVar

from costing.budget import Budget, make_budget
from costing.errors import LedgerUnavailable, NotFound
from costing.records import (
    CampaignTotals,
    DayTotals,
    SessionTotals,
    Totals,
    UsageEntry,
    from_epoch_us,
)
from costing.store import US_PER_DAY, Store

MAX_DAYS = 366
SESSION_ORDERS = ("last_seen", "cost", "first_seen")
WRITE_WAIT_SECONDS = 10.0
EPOCH_DAY = date(1970, 1, 1)
T = TypeVar("T")


class Pending(Protocol):
    """What the ledger offers the reads: unwritten entries, and the lock its writes hold."""

    writing: asyncio.Lock

    def pending(self) -> list[UsageEntry]: ...

    def write_soon(self) -> None: ...


# -- overlays (pure) ------------------------------------------------------------------------------


def plus(totals: Totals, entries: Sequence[UsageEntry]) -> Totals:
    """`totals` with `entries` added (a new object; stored totals stay as read)."""
    merged = replace(totals)
    if entries:
        merged.merge(Totals.of(entries))
    return merged


def _span(entries: Sequence[UsageEntry]) -> tuple[datetime, datetime]:
    moments = [e.created_us for e in entries]
    return from_epoch_us(min(moments)), from_epoch_us(max(moments))


def _earliest(a: datetime | None, b: datetime) -> datetime:
    return b if a is None or b < a else a


def _latest(a: datetime | None, b: datetime) -> datetime:
    return b if a is None or b > a else a


def overlay_campaign(stored: CampaignTotals | None, campaign_id: str,
                     entries: Sequence[UsageEntry], default_budget: Budget,
                     sessions: Mapping[tuple[str, str], SessionTotals]) -> CampaignTotals | None:
    """A campaign's stored totals plus its pending `entries`. `sessions`: the stored sessions of
    those entries; the others are new, and deleted ones are revived (a call revives its session)."""
    if not entries:
        return stored
    first, last = _span(entries)
    found = [sessions.get(pair) for pair in {(e.campaign_id, e.session_id) for e in entries}]
    new_sessions = found.count(None)
    revived = [s for s in found if s is not None and s.deleted_at is not None]
    if stored is None:
        return CampaignTotals(campaign_id, Totals.of(entries), default_budget, first, last,
                              session_count=new_sessions)
    return replace(stored, totals=plus(stored.totals, entries),
                   first_seen=_earliest(stored.first_seen, first),
                   last_seen=_latest(stored.last_seen, last),
                   session_count=stored.session_count + new_sessions,
                   deleted_session_count=stored.deleted_session_count - len(revived),
                   deleted_sessions_cost_usd=stored.deleted_sessions_cost_usd
                   - sum((s.totals.cost_usd for s in revived), Decimal(0)))


def overlay_session(stored: SessionTotals | None, campaign_id: str, session_id: str,
                    entries: Sequence[UsageEntry]) -> SessionTotals | None:
    if not entries:
        return stored
    first, last = _span(entries)
    if stored is None:
        return SessionTotals(campaign_id, session_id, Totals.of(entries), first, last, None)
    return replace(stored, totals=plus(stored.totals, entries),  # a call revives a deleted session
                   first_seen=_earliest(stored.first_seen, first),
                   last_seen=_latest(stored.last_seen, last), deleted_at=None)


def overlay_sessions(stored: Sequence[SessionTotals], campaign_id: str,
                     entries: Sequence[UsageEntry], *, order_by: str, limit: int,
                     unlisted: Mapping[str, SessionTotals] | None = None) -> list[SessionTotals]:
    """A campaign's listed sessions plus its pending entries, in the list's order, at most
    `limit`. A session with pending calls that the list does not hold joins it with its stored
    totals (`unlisted`: beyond the page, or deleted and now revived) plus those calls."""
    by_session: dict[str, list[UsageEntry]] = defaultdict(list)
    for e in entries:
        if e.campaign_id == campaign_id:
            by_session[e.session_id].append(e)
    if not by_session:
        return list(stored)
    result: dict[str, SessionTotals] = {s.session_id: s for s in stored}
    for session_id, group in by_session.items():
        base = result.get(session_id) or (unlisted or {}).get(session_id)
        merged = overlay_session(base, campaign_id, session_id, group)
        if merged is not None:
            result[session_id] = merged
    key = {"cost": lambda s: s.totals.cost_usd, "last_seen": lambda s: s.last_seen,
           "first_seen": lambda s: s.first_seen}[order_by]
    ordered = sorted(result.values(), key=lambda s: s.session_id)
    ordered.sort(key=key, reverse=True)  # stable: ties stay by session id, as the store orders
    return ordered[:limit]


def overlay_days(days: Sequence[DayTotals], entries: Sequence[UsageEntry]) -> list[DayTotals]:
    """Day totals plus pending entries of those days (entries of other days are ignored)."""
    by_day: dict[date, list[UsageEntry]] = defaultdict(list)
    for e in entries:
        by_day[EPOCH_DAY + timedelta(days=e.created_us // US_PER_DAY)].append(e)
    return [DayTotals(d.day, plus(d.totals, by_day.get(d.day, []))) for d in days]


def _of_campaign(entries: Sequence[UsageEntry], campaign_id: str) -> list[UsageEntry]:
    return [e for e in entries if e.campaign_id == campaign_id]


# -- the service ----------------------------------------------------------------------------------


class CostReports:
    def __init__(self, store: Store, ledger: Pending | None = None) -> None:
        self.store = store
        self.ledger = ledger

    @contextlib.asynccontextmanager
    async def _consistent(self) -> AsyncIterator[Callable[[], list[UsageEntry]]]:
        """Reads made inside and the entries not written yet (what it yields returns them) are
        one consistent view: no batch commits meanwhile (it would count as both, or neither)."""
        if self.ledger is None:
            yield list
            return
        async with self.ledger.writing:
            yield self.ledger.pending

    async def _with_pending(self, read: Awaitable[T]) -> tuple[T, list[UsageEntry]]:
        """A database read and the entries not written yet, as one consistent view."""
        async with self._consistent() as pending:
            return await read, pending()

    async def _sessions_of(self, entries: Sequence[UsageEntry]) -> dict[tuple[str, str], SessionTotals]:
        """The stored sessions of `entries` (for `overlay_campaign`)."""
        return await self.store.stored_sessions((e.campaign_id, e.session_id) for e in entries)

    async def campaigns(self, *, limit: int, after: str | None) -> tuple[list[CampaignTotals], str | None]:
        """One page of campaigns and the id to continue after (None on the last page)."""
        async with self._consistent() as read_pending:
            page = await self.store.campaigns(limit=limit + 1, after=after)
            pending = read_pending()
            more = len(page) > limit
            page = page[:limit]
            if not pending:
                return page, (page[-1].campaign_id if more and page else None)
            last = page[-1].campaign_id if more and page else None
            listed = {c.campaign_id for c in page}
            # Campaigns only pending yet belong to this page when they sort within it.
            extra = {e.campaign_id for e in pending if e.campaign_id not in listed
                     and (after is None or e.campaign_id > after)
                     and (last is None or e.campaign_id < last)}
            sessions = await self._sessions_of(
                [e for e in pending if e.campaign_id in listed or e.campaign_id in extra])
        by_id: dict[str, CampaignTotals] = {c.campaign_id: c for c in page}
        for campaign_id in listed | extra:
            merged = overlay_campaign(by_id.get(campaign_id), campaign_id,
                                      _of_campaign(pending, campaign_id), self.store.default_budget,
                                      sessions)
            if merged is not None:
                by_id[campaign_id] = merged
        page = [by_id[c] for c in sorted(by_id)][:limit]
        more = more or len(by_id) > limit
        return page, (page[-1].campaign_id if more and page else None)

    async def campaign(self, campaign_id: str) -> CampaignTotals:
        async with self._consistent() as pending:
            found = await self.store.campaign(campaign_id)
            mine = _of_campaign(pending(), campaign_id)
            sessions = await self._sessions_of(mine) if mine else {}
        if mine:
            found = overlay_campaign(found, campaign_id, mine, self.store.default_budget, sessions)
        if found is None:
            raise NotFound(f"Unknown campaign '{campaign_id}': no usage or budget recorded for it")
        return found

    async def sessions(self, campaign_id: str, *, include_deleted: bool, order_by: str,
                       limit: int) -> list[SessionTotals]:
        await self.campaign(campaign_id)
        async with self._consistent() as pending:
            stored = await self.store.sessions(campaign_id, include_deleted=include_deleted,
                                               order_by=order_by, limit=limit)
            mine = _of_campaign(pending(), campaign_id)
            listed = {s.session_id for s in stored}
            # Sessions with pending calls that the page does not hold (further down the list, or
            # deleted: those calls revive them): their stored totals, to add the calls to.
            unlisted = {session_id: found for (_, session_id), found in (await self._sessions_of(
                [e for e in mine if e.session_id not in listed])).items()}
        return overlay_sessions(stored, campaign_id, mine, order_by=order_by, limit=limit,
                                unlisted=unlisted)

    async def session(self, campaign_id: str, session_id: str) -> SessionTotals:
        found, pending = await self._with_pending(self.store.session(campaign_id, session_id))
        found = overlay_session(found, campaign_id, session_id,
                                [e for e in pending if e.campaign_id == campaign_id
                                 and e.session_id == session_id])
        if found is None:
            raise NotFound(f"Unknown session '{session_id}' in campaign '{campaign_id}'")
        return found

    async def delete_session(self, campaign_id: str, session_id: str) -> SessionTotals:
        await self._written(campaign_id, session_id)
        if not await self.store.delete_session(campaign_id, session_id, datetime.now(UTC)):
            raise NotFound(f"Unknown session '{session_id}' in campaign '{campaign_id}'")
        return await self.session(campaign_id, session_id)

    async def _written(self, campaign_id: str, session_id: str) -> None:
        """Wait until this process's calls of a session are written (a deletion marks the stored
        session; one answered a moment ago may not be stored yet)."""
        if self.ledger is None:
            return
        deadline = asyncio.get_running_loop().time() + WRITE_WAIT_SECONDS
        while any(e.campaign_id == campaign_id and e.session_id == session_id
                  for e in self.ledger.pending()):
            if asyncio.get_running_loop().time() > deadline:
                raise LedgerUnavailable("the session's latest calls are not written yet")
            self.ledger.write_soon()
            await asyncio.sleep(0.02)

    async def daily(self, campaign_id: str, start: date, end: date) -> list[DayTotals]:
        """Every day of [start, end], zero-filled where nothing was spent."""
        await self.campaign(campaign_id)
        days, pending = await self._with_pending(self.store.daily(campaign_id, start, end))
        stored = {d.day: d for d in days}
        filled = [stored.get(start + timedelta(days=i)) or DayTotals(start + timedelta(days=i), Totals())
                  for i in range((end - start).days + 1)]
        return overlay_days(filled, _of_campaign(pending, campaign_id))

    async def set_budget(self, campaign_id: str, warning_usd: Decimal,
                         limit_usd: Decimal) -> CampaignTotals:
        await self.store.set_budget(campaign_id, make_budget(warning_usd, limit_usd))
        return await self.campaign(campaign_id)

    async def clear_budget(self, campaign_id: str) -> CampaignTotals:
        await self.campaign(campaign_id)
        await self.store.set_budget(campaign_id, None)
        return await self.campaign(campaign_id)
