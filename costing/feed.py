"""The live cost feed behind /costs/events: usage and budget events, formatted once into a
bounded ring that every subscriber reads from its own cursor, and `Last-Event-ID` resumes from.

No HTTP here: the edge (proxy/feed.py) subscribes, writes what a subscriber takes, and closes
it when told. Publishing runs on the request path (Meter.listeners), so it never awaits and
does no work per subscriber: with nobody listening it returns at once; otherwise it formats one
frame, appends it to the ring and wakes the writers. Each writer takes the events after its
cursor (at most every 50 ms under load, see proxy/feed.py), filtering by campaign there, off the
request path. A subscriber more than `queue_events` behind (a client that stopped reading) is
dropped and told `resync`: a slow reader never slows the proxy or the other subscribers. A
resumed subscriber starts from its `Last-Event-ID` and gets every missed event the ring holds.

Event ids are `<epoch>-<seq>`: the epoch is random per feed (and renewed when the feed goes
dormant), so an id from another process, replica or an earlier dormant period asks for a
resync instead of silently skipping what was missed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice

import orjson

from costing.budget import Budget, BudgetStatus, remaining_units, status_units
from costing.meter import Meter
from costing.money import format_units
from costing.records import UsageEntry, from_epoch_us
from costing.store import Store
from costing.tasks import pause

log = logging.getLogger(__name__)

HEARTBEAT = b": keep-alive\n\n"
LAGGARD_CHECK_EVENTS = 64
MAX_TRACKED_CAMPAIGNS = 10_000


def at_text(created_us: int) -> str:
    """ISO 8601 UTC with milliseconds and a Z, as /costs renders timestamps (truncated, as
    `isoformat` does); the date and time of day are made once per second of calls."""
    seconds, us = divmod(created_us, 1_000_000)
    return f"{_second_text(seconds)}.{us // 1000:03d}Z"


@lru_cache(maxsize=4)
def _second_text(seconds: int) -> str:
    return from_epoch_us(seconds * 1_000_000).replace(tzinfo=None).isoformat(timespec="seconds")


def budget_payload(campaign_id: str, spent: int, budget: Budget) -> dict[str, str]:
    """The campaign's `budget` object as /costs renders it, plus `campaign_id`."""
    return {
        "campaign_id": campaign_id,
        "warning_usd": format_units(budget.warning_units),
        "limit_usd": format_units(budget.limit_units),
        "spent_usd": format_units(spent),
        "remaining_usd": format_units(remaining_units(spent, budget)),
        "status": str(status_units(spent, budget)),
    }


def usage_payload(entry: UsageEntry, campaign_spent: int, session_spent: int | None,
                  status: BudgetStatus) -> dict[str, object]:
    u = entry.usage
    return {
        "campaign_id": entry.campaign_id,
        "session_id": entry.session_id,
        "model": entry.model,
        "cost_usd": format_units(entry.cost_units),
        "tokens": {"input": u.input_tokens, "cached_input": u.cached_input_tokens,
                   "output": u.output_tokens, "reasoning": u.reasoning_tokens,
                   "audio_input": u.audio_input_tokens, "audio_output": u.audio_output_tokens,
                   "cache_write_input": u.cache_write_input_tokens,
                   "cached_audio_input": u.cached_audio_input_tokens},
        "estimated": entry.estimated,
        "at": at_text(entry.created_us),
        "campaign_cost_usd": format_units(campaign_spent),
        "session_cost_usd": format_units(session_spent) if session_spent is not None else None,
        "budget_status": str(status),
    }


def frame(event_id: str, event: str, data: object) -> bytes:
    """One SSE event: id, event name and a one-line JSON data field."""
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (event_id.encode(), event.encode(), orjson.dumps(data))


@dataclass(slots=True)
class Event:
    seq: int
    campaign_id: str
    frame: bytes


class Subscriber:
    """One /costs/events connection: a cursor into the feed's ring and what its writer is owed.

    Publishing touches no subscriber: an event is appended to the ring once, and each writer,
    when it next takes, reads the events after its cursor (keeping its campaign's). A writer
    that falls more than `limit` events behind is dropped (see `Feed._drop_laggards`). The
    missed events a resume starts with (after `cursor`, up to `joined`) are on top of `limit`,
    so a resume that missed more than `limit` events is neither cut short nor dropped by the
    next event before its writer first takes them; once taken, the plain bound applies.
    """

    __slots__ = ("campaign_id", "closed", "cursor", "feed", "heartbeat", "joined", "limit",
                 "on_drop", "pending", "resync")

    def __init__(self, feed: Feed, campaign_id: str | None, limit: int, cursor: int,
                 pending: list[bytes]) -> None:
        self.feed = feed
        self.campaign_id = campaign_id
        self.limit = limit
        self.cursor = cursor  # the seq of the last event taken (or skipped: another campaign's)
        self.joined = feed.seq  # the bound counts from here until the first take
        self.pending = pending  # frames owed before any event: a resync that starts a resume
        self.heartbeat = False
        self.closed = False  # no more events will come; the writer sends what is owed and ends
        # Dropped for falling behind: owed nothing more from the ring, its last frame `resync`.
        self.resync = False
        # Called when it is dropped: its writer may be stuck on a client that reads nothing.
        self.on_drop: Callable[[], None] | None = None

    def lag(self, seq: int) -> int:
        """Events published since it last took (or joined, for a resume's first take)."""
        return seq - max(self.cursor, self.joined)

    async def take(self) -> list[bytes]:
        """Everything owed, waiting for something; an empty list once closed and drained."""
        news = self.feed.news
        while True:
            frames = self._owed()
            if frames or self.closed:
                return frames
            news.clear()  # nothing is owed to anyone who waits: they all re-check when woken
            await news.wait()

    def _owed(self) -> list[bytes]:
        frames, self.pending = self.pending, []
        if self.resync:
            return frames
        feed = self.feed
        new = feed.seq - self.cursor
        if new > 0:
            ring = feed.ring
            if new > len(ring):  # some of them are no longer held
                feed.drop(self, "events were missed; reload /costs and reconnect")
                frames, self.pending = self.pending, []
                return frames
            events = list(islice(reversed(ring), new))
            events.reverse()
            campaign = self.campaign_id
            frames += [e.frame for e in events if campaign is None or e.campaign_id == campaign]
            self.cursor = feed.seq
        if self.heartbeat:
            self.heartbeat = False
            frames.append(HEARTBEAT)
        return frames

    def close(self, resync: bytes | None = None) -> None:
        """End the stream after what is owed; with a `resync` frame, instead of it."""
        if resync is not None:
            self.pending = [resync]
            self.resync = True
        self.closed = True
        self.feed.news.set()


class TooManySubscribers(Exception):
    """The feed already serves its maximum number of subscribers."""


class Feed:
    """Publishes events to subscribers; see the module docstring."""

    def __init__(self, *, buffer_events: int, queue_events: int, max_subscribers: int,
                 linger_seconds: float = 60.0) -> None:
        self.queue_events = queue_events
        self.max_subscribers = max_subscribers
        self.linger_seconds = linger_seconds
        self.epoch = secrets.token_hex(4)
        self.seq = 0
        self.ring: deque[Event] = deque(maxlen=buffer_events)
        self.subscribers: list[Subscriber] = []
        # Read on every recorded call: True while anyone listens, and for `linger_seconds` after
        # the last one left, so a reconnect still resumes.
        self.live = False
        self.live_since_ms = 0  # when it last went live: calls made before then are not published
        self.dropped = 0  # subscribers dropped for falling behind
        self._statuses: OrderedDict[str, BudgetStatus] = OrderedDict()
        self._linger: asyncio.TimerHandle | None = None
        self.seen = SeenIds()
        # Set when there is something new for the writers; a writer with nothing owed clears it
        # and waits (see `Subscriber.take`).
        self.news = asyncio.Event()
        # How often publishing looks for subscribers past their bound: a laggard is dropped at
        # most this many events late (every event for small bounds, as in the tests).
        self._check_every = max(1, min(LAGGARD_CHECK_EVENTS, queue_events // 8))

    # -- subscribers ---------------------------------------------------------------------------

    def subscribe(self, campaign_id: str | None, last_event_id: str | None) -> Subscriber:
        """A new subscriber, owed every event it missed since `last_event_id` (or a `resync`
        first when they are no longer all held); raises TooManySubscribers."""
        if len(self.subscribers) >= self.max_subscribers:
            raise TooManySubscribers(f"the feed serves at most {self.max_subscribers} subscribers")
        cursor, pending = self.seq, []
        if last_event_id:
            resumed = self._resume_point(last_event_id)
            if resumed is None:
                pending = [self._resync_frame("Last-Event-ID is outside the feed's window")]
            else:
                cursor = resumed
        sub = Subscriber(self, campaign_id, self.queue_events, cursor, pending)
        self.subscribers.append(sub)
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if not self.live:
            self.live = True
            self.live_since_ms = int(time.time() * 1000)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        if sub in self.subscribers:
            self.subscribers.remove(sub)
        if not self.subscribers and self.live and self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(self.linger_seconds, self._sleep)

    def _sleep(self) -> None:
        """Nobody listened for `linger_seconds`: stop publishing. The epoch changes, so an id
        handed out before now asks for a resync (events went unrecorded meanwhile)."""
        self._linger = None
        if self.subscribers:
            return
        self.live = False
        self.ring.clear()
        self.epoch = secrets.token_hex(4)
        self.seen.clear()

    def close(self) -> None:
        """Shutdown: every stream ends after what it has queued."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        for sub in self.subscribers:
            sub.close()
        self.subscribers.clear()
        self.live = False

    def _resume_point(self, last_event_id: str) -> int | None:
        """The seq of `last_event_id` when every event after it is still held, else None."""
        epoch, _, number = last_event_id.strip().partition("-")
        if epoch != self.epoch or not number.isdigit():
            return None
        seq = int(number)
        if seq > self.seq:
            return None
        oldest = self.ring[0].seq if self.ring else self.seq + 1
        if seq + 1 < oldest:
            return None
        return seq

    def _resync_frame(self, reason: str) -> bytes:
        return frame(f"{self.epoch}-{self.seq}", "resync", {"reason": reason})

    # -- publishing ----------------------------------------------------------------------------

    def publish(self, campaign_id: str, event: str, data: object) -> None:
        """Format once, keep in the ring, wake the writers; no work per subscriber."""
        self.seq += 1
        self.ring.append(Event(self.seq, campaign_id, frame(f"{self.epoch}-{self.seq}", event, data)))
        if not self.seq % self._check_every:
            self._drop_laggards()
        if not self.news.is_set():
            self.news.set()

    def _drop_laggards(self) -> None:
        seq = self.seq
        for sub in [s for s in self.subscribers if s.lag(seq) > s.limit]:
            self.drop(sub, "the subscriber fell behind; reload /costs and reconnect")

    def drop(self, sub: Subscriber, reason: str) -> None:
        """Out of the feed for falling behind: its stream ends with `resync`."""
        if sub in self.subscribers:
            self.subscribers.remove(sub)
        self.dropped += 1
        sub.close(self._resync_frame(reason))
        if sub.on_drop is not None:
            sub.on_drop()
        if not self.subscribers:
            self.unsubscribe(sub)  # start the linger timer

    def heartbeat(self) -> None:
        """A comment to every subscriber: keeps proxies and browsers from timing the stream out."""
        for sub in self.subscribers:
            sub.heartbeat = True
        self.news.set()

    def usage(self, entry: UsageEntry, campaign_spent: int, budget: Budget,
              session_spent: int | None) -> None:
        """A recorded call: its `usage` event, then a `budget` event if its campaign's status
        changed. `campaign_spent` already includes the call's cost."""
        status = status_units(campaign_spent, budget)
        before = self._statuses.get(entry.campaign_id)
        if before is None:
            before = status_units(campaign_spent - entry.cost_units, budget)
        self.publish(entry.campaign_id, "usage", usage_payload(entry, campaign_spent, session_spent, status))
        self._track(entry.campaign_id, status)
        if status != before:
            self.publish(entry.campaign_id, "budget",
                         budget_payload(entry.campaign_id, campaign_spent, budget))

    def budget_changed(self, campaign_id: str, spent: int, budget: Budget) -> None:
        """A budget was set or reset through /costs: its new `budget` event, always (the tab
        shows the new limit even when the status stays the same)."""
        if not self.live:
            return
        self._track(campaign_id, status_units(spent, budget))
        self.publish(campaign_id, "budget", budget_payload(campaign_id, spent, budget))

    def _track(self, campaign_id: str, status: BudgetStatus) -> None:
        self._statuses[campaign_id] = status
        self._statuses.move_to_end(campaign_id)
        if len(self._statuses) > MAX_TRACKED_CAMPAIGNS:
            self._statuses.popitem(last=False)


class SeenIds:
    """Record ids already published, within the window the ledger watcher looks back over, and
    which of them (this process's own calls) its ledger has not written yet."""

    def __init__(self) -> None:
        self._ids: set[int] = set()
        self.unwritten: set[int] = set()

    def __contains__(self, record_id: int) -> bool:
        return record_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, record_id: int, *, written: bool = True) -> None:
        self._ids.add(record_id)
        if not written:
            self.unwritten.add(record_id)

    def on_flushed(self, batch: Sequence[UsageEntry], _inserted: Sequence[UsageEntry],
                   _seconds: float) -> None:
        """Ledger listener: these are in the database now (inserted or known already)."""
        if self.unwritten:
            for entry in batch:
                self.unwritten.discard(entry.id)

    def on_dropped(self, entry: UsageEntry) -> None:
        """Ledger drop listener: this one never will be."""
        self.unwritten.discard(entry.id)

    def keep_within(self, floor_id: int, ceiling_id: int) -> None:
        """Keep only ids of the watcher's window (ids are time-ordered: their first 48 bits are
        ms); a background final state's id, derived from its response, falls outside it."""
        self._ids = {i for i in self._ids if floor_id <= i < ceiling_id}
        self.unwritten = {i for i in self.unwritten if floor_id <= i < ceiling_id}

    @property
    def written(self) -> int:
        """How many of the ids are in the database: what a count of its rows from the same floor
        finds when no other process wrote any."""
        return len(self._ids) - len(self.unwritten)

    def clear(self) -> None:
        self._ids.clear()
        self.unwritten.clear()


class MeterListener:
    """The Meter listener for this replica's calls: does nothing at all while nobody listens.
    Called when a call is recorded; for a background final state, once this process's ledger
    inserted it (several processes may meter one; the one whose row landed tells it).

    A call's event carries its session's total, which needs the session's stored cost; for the
    first call of a session that read may still be running (it starts at admission, alongside
    the upstream call). Such a call, and any recorded after it, wait in order in `waiting`
    until the read is done, so events never overtake one another.
    """

    def __init__(self, feed: Feed, meter: Meter) -> None:
        self.feed = feed
        self.meter = meter
        self.waiting: deque[tuple[UsageEntry, int, Budget, int | None,
                                  tuple[asyncio.Future[int], int] | None]] = deque()

    def __call__(self, entry: UsageEntry) -> None:
        feed = self.feed
        if not feed.live:
            return
        feed.seen.add(entry.id, written=False)
        meter = self.meter
        spent, budget = meter.standing(entry.campaign_id)
        session = meter.sessions.last_total(entry.campaign_id, entry.session_id)
        later = None if session is not None else meter.sessions.total_later(entry.campaign_id,
                                                                              entry.session_id)
        if later is None and not self.waiting:
            feed.usage(entry, spent, budget, session)
            return
        self.waiting.append((entry, spent, budget, session, later))
        if len(self.waiting) == 1 and later is not None:
            later[0].add_done_callback(self._drain)

    def _drain(self, _done: object = None) -> None:
        while self.waiting:
            entry, spent, budget, session, later = self.waiting[0]
            if later is not None:
                read, added = later
                if not read.done():
                    read.add_done_callback(self._drain)
                    return
                if not read.cancelled() and read.exception() is None:
                    session = read.result() + added
            self.waiting.popleft()
            if self.feed.live:
                self.feed.usage(entry, spent, budget, session)


class LedgerWatcher:
    """Brings other processes' calls (replicas on one PostgreSQL, `serve --workers N` on one
    database) into this feed by reading the ledger by time, while anyone listens.

    Record ids are version 7 UUIDs (their first 48 bits: the milliseconds they were made), so
    "rows made in the last `lag_seconds`" is a range of the primary key. Each poll counts the
    rows in that range (from the index alone); when there are no more than this process has
    published and written (its own calls, published when recorded, and rows of earlier polls),
    that is all. Otherwise it reads the ids in the range, skips those already published, and
    reads the rest in full with their campaign's and session's stored totals. A row committed
    more than `lag_seconds` after it was made (a writer that could not reach the database for
    that long) is missed by the feed, never by /costs; so is a background response's final state
    written by another process (its id derives from the response, not the time: the range is
    bounded above, so such ids, which look like any moment, are never taken for recent calls);
    the process whose insert landed publishes it (see Meter.on_flushed).
    """

    def __init__(self, store: Store, feed: Feed, *, lag_seconds: float, max_rows: int = 10_000,
                 wall: Callable[[], float] = time.time) -> None:
        self.store = store
        self.feed = feed
        self.lag_ms = int(lag_seconds * 1000)
        self.max_rows = max_rows
        self.wall = wall

    async def poll(self) -> int:
        """One look at the ledger; returns the number of events published."""
        feed = self.feed
        if not feed.live:
            return 0
        now_ms = int(self.wall() * 1000)
        floor = max(feed.live_since_ms, now_ms - self.lag_ms) << 80
        ceiling = (now_ms + self.lag_ms) << 80  # as much slack for clocks of other hosts
        feed.seen.keep_within(floor, ceiling)
        # Nearly always, nobody else wrote: the rows in the window are the ones already
        # published, and one count says so without reading them.
        if await self.store.count_records_between(floor, ceiling) <= feed.seen.written:
            return 0
        ids = await self.store.record_ids_between(floor, ceiling, self.max_rows)
        new = [i for i in ids if i not in feed.seen]
        if not new:
            return 0
        rows = await self.store.usage_with_totals(new, ceiling)
        published = 0
        for row in rows:
            if row.entry.id in feed.seen or not feed.live:
                continue
            feed.seen.add(row.entry.id)
            feed.usage(row.entry, row.campaign_spent, row.budget, row.session_spent)
            published += 1
        return published

    async def run(self, interval: float, stop: asyncio.Event) -> None:
        """Poll every `interval` seconds until `stop` is set (never stopped mid-query)."""
        while not await pause(stop, interval):
            try:
                await self.poll()
            except Exception as exc:
                log.debug("live feed: ledger poll failed: %s", exc)
