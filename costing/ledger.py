"""The ledger writer: the request path hands finished usage over without waiting; a background
task writes it in batches, one transaction per batch, and keeps it until the write succeeds.

Durability: with a spool (costing/spool.py), `submit` appends each record to it before
buffering it, and a committed batch leaves it; what a killed process left is written by
`replay` at the next start, before the proxy listens. Without one, a crash loses at most one
flush interval (LEDGER_FLUSH_INTERVAL_SECONDS), plus the write in progress. On a database
outage records wait in a bounded buffer (and in the spool); the proxy refuses new metered
requests (503) before that buffer could overflow, so nothing admitted is ever dropped, but for
a record the database refuses on its own while it answers (see `_write_apart`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from itertools import islice

from sqlalchemy.exc import DataError, IntegrityError

from costing.records import UsageEntry
from costing.spool import Spool, read_segment
from costing.store import Store
from costing.tasks import finish
from costing.usage import Operation

log = logging.getLogger(__name__)

FlushListener = Callable[[Sequence[UsageEntry], Sequence[UsageEntry], float], None]
"""Called after each committed batch with (batch, inserted, seconds the write took)."""

# SQLSTATE classes that blame a record's values, not the database's state: data exceptions and
# integrity constraint violations.
BAD_RECORD_SQLSTATES = ("22", "23")
RESPONSES = Operation.RESPONSES.value


def blames_the_record(error: Exception) -> bool:
    """Whether the database refused a record's values (rather than being unable to write)."""
    if isinstance(error, DataError | IntegrityError | OverflowError | ValueError | TypeError):
        return True  # the last three: values SQLite's driver cannot bind
    sqlstate = getattr(getattr(error, "orig", None), "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate[:2] in BAD_RECORD_SQLSTATES


MAX_BACKOFF_SECONDS = 1.0
"""Retry pace while writes fail: a retry is cheap (refused at once while the database is down),
and the buffer drains, and fail-closed or buffer-full refusals end, within this of its return."""


class Ledger:
    def __init__(
        self, store: Store, holder_id: str, *, flush_interval: float, batch_size: int,
        max_records: int, spool: Spool | None = None,
    ) -> None:
        self.store = store
        self.spool = spool
        self.holder_id = holder_id
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self.max_records = max_records
        self.listeners: list[FlushListener] = []
        self.error_listeners: list[Callable[[BaseException], None]] = []
        self.drop_listeners: list[Callable[[UsageEntry], None]] = []
        # Told how many records of a committed batch the ledger already held (their record id):
        # a retried batch, a replayed spool, a final state read twice. Never silent.
        self.known_listeners: list[Callable[[int], None]] = []
        self._buffer: deque[UsageEntry] = deque()
        # Written one by one by `_write_apart`, still in the buffer until the batch is sorted out.
        self._committed_apart: set[int] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.healthy = True
        # Held from a write until its listeners have run. The budget gate asks for leases under
        # it, so spend it reads from the database and cost it still counts as pending locally
        # never overlap (a request that fits would otherwise be refused as over the limit).
        self.writing = asyncio.Lock()

    def __len__(self) -> int:
        return len(self._buffer)

    def pending(self) -> list[UsageEntry]:
        """Entries handed over and not committed yet, oldest first. Read under `writing`, with
        the database read it completes, so none is counted both stored and pending (/costs
        read-your-writes)."""
        if self._committed_apart:
            return [e for e in self._buffer if e.id not in self._committed_apart]
        return list(self._buffer)

    def response_tokens(self, response_id: str) -> int | None:
        """`Store.response_tokens` over the entries not written yet: a call that continues a
        response answered a moment ago finds it here (in memory, no query)."""
        found: int | None = None
        for entry in self._buffer:
            if (entry.response_id == response_id and entry.operation == RESPONSES
                    and not entry.estimated):
                tokens = entry.usage.input_tokens + entry.usage.output_tokens
                if found is None or tokens > found:
                    found = tokens
        return found

    def write_soon(self) -> None:
        """Write the buffer now rather than at the next interval (a reader waits for it)."""
        self._wake.set()

    def has_room(self, in_flight: int) -> bool:
        """Whether `in_flight` more records are sure to fit; the admission check for new requests."""
        return len(self._buffer) + in_flight < self.max_records

    def submit(self, entry: UsageEntry) -> None:
        """Spool and queue a record; never blocks, never drops (admission keeps the buffer
        bounded). A record the spool cannot take (disk full) is still queued: admission refuses
        further requests while the spool is unusable."""
        if self.spool is not None:
            try:
                self.spool.append(entry)
            except OSError:
                pass  # counted and logged by the spool; `Spool.usable` now refuses admission
        self._buffer.append(entry)
        if len(self._buffer) >= self.batch_size and self.healthy:
            self._wake.set()  # while writes fail, the retry backoff sets the pace instead

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    async def _run(self) -> None:
        failures = 0
        while not self._closing:
            delay = self.flush_interval if not failures else min(
                self.flush_interval * 2**failures, MAX_BACKOFF_SECONDS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            try:
                # Full batches go at once (a backlog drains back to back); the rest waits for
                # the next interval. Draining to empty wrote back to back under steady load:
                # what arrived during one write was the next, small batch, with every write's
                # fixed cost and thread hand-offs paid again for a few records.
                while self._buffer and not self._closing:
                    await self.flush_once()
                    if len(self._buffer) < self.batch_size:
                        break
                failures = 0
                self.healthy = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if await self._write_apart():
                    continue
                # The database is away: keep everything, retry with backoff.
                failures += 1
                self.healthy = False
                for on_error in self.error_listeners:
                    on_error(exc)
                if failures == 1 or failures % 20 == 0:
                    log.warning("ledger write failed (%d records waiting): %s",
                                len(self._buffer), exc)

    async def flush_once(self) -> int:
        """Write one batch from the head of the buffer; it leaves the buffer only once committed."""
        batch = list(islice(self._buffer, self.batch_size))
        if not batch:
            return 0
        await self._commit(batch, from_buffer_head=True)
        return len(batch)

    async def _commit(self, entries: list[UsageEntry], *, from_buffer_head: bool) -> None:
        """Write entries and tell the listeners, as one step under `writing`. Entries taken from
        the head of the buffer leave it once committed, before any listener runs."""
        async with self.writing:
            started = time.perf_counter()
            inserted = await self.store.write_batch(entries, self.holder_id)
            elapsed = time.perf_counter() - started
            known = len({e.id for e in entries}) - len(inserted) if len(inserted) < len(entries) else 0
            if known:
                log.info("%d usage records were in the ledger already (same record id): "
                         "not counted again", known)
                for on_known in self.known_listeners:
                    on_known(known)
            if from_buffer_head:
                for _ in entries:
                    self._buffer.popleft()
            if self.spool is not None:
                self.spool.release(entries)
            self._tell(entries, inserted, elapsed)

    def _tell(self, entries: Sequence[UsageEntry], inserted: Sequence[UsageEntry],
              elapsed: float) -> None:
        """Run every listener, whatever one of them raises: the batch is committed (a failing
        listener must not make the writer take it for a failed write), and the others' books
        (the budget's pending cost, metrics, session totals, the feed) must still move."""
        for listener in self.listeners:
            try:
                listener(entries, inserted, elapsed)
            except Exception:
                log.exception("a ledger listener failed")

    async def _write_apart(self) -> bool:
        """After a failed batch, tell a bad record from a database that is away.

        The batch is written record by record. A record is dropped (logged, counted) when the
        database refused its values twice (a data error or a constraint, SQLSTATE classes 22 and
        23; not a connection or server state error): one value the database cannot store must
        not stop every other record, nor, alone in the buffer, the writer (a shutdown would wait
        on it, and fail-closed refuse every call until a good record came). Anything else stays
        in the buffer, in order. False when nothing went in or was dropped, so the writer backs
        off and retries (an outage, a full disk, a read-only standby).
        """
        batch = list(islice(self._buffer, self.batch_size))
        kept: list[UsageEntry] = []
        bad: list[tuple[UsageEntry, Exception]] = []
        written = 0
        for entry in batch:
            error = await self._write_one(entry)
            if error is None:
                written += 1
                self._committed_apart.add(entry.id)
            elif blames_the_record(error):
                bad.append((entry, error))
            else:
                kept.append(entry)
        if not written and not bad:
            return False
        for _ in batch:
            self._buffer.popleft()
        self._committed_apart.clear()
        self._buffer.extendleft(reversed(kept))
        for entry, error in bad:
            self._drop(entry, error)
        return True

    def _drop(self, entry: UsageEntry, error: Exception) -> None:
        log.error("usage record %s refused by the database, dropped: %s", entry.id, error)
        if self.spool is not None:
            self.spool.release([entry])  # replaying it would only be refused again
        self._tell([entry], [], 0.0)  # releases what the gate counted as pending
        for on_drop in self.drop_listeners:
            on_drop(entry)

    async def replay(self) -> tuple[int, int]:
        """Write what dead processes left in the spool; (records replayed, torn lines skipped).

        Called at start, before the proxy listens. Idempotent: a record already in the ledger
        (its batch committed just before the kill) is skipped by its id, so a kill during a
        replay or during a commit costs nothing but the work done again. A segment is removed
        once all its records are committed, a directory once all its segments are. Raises when
        the database cannot be written (the start fails; the spool stays for the next one).
        """
        replayed = torn = 0
        if self.spool is None:
            return 0, 0
        for orphan in self.spool.take_over():
            try:
                for path in orphan.segments():
                    entries, skipped = read_segment(path)
                    if skipped:
                        log.warning("spool %s: %d torn or unreadable lines skipped", path, skipped)
                    torn += skipped
                    for start in range(0, len(entries), self.batch_size):
                        await self._write_now(entries[start:start + self.batch_size])
                    replayed += len(entries)
                    path.unlink()
                orphan.remove()
            except BaseException:
                orphan.unlock()  # left for the next start
                raise
        if replayed or torn:
            log.warning("spool replayed: %d records of stopped processes written (known ones "
                        "skipped), %d torn lines skipped", replayed, torn)
        return replayed, torn

    async def _write_now(self, entries: list[UsageEntry]) -> None:
        """Write records that are not in the buffer; a record the database refuses on its own
        is dropped as in `_write_apart`; raises when the database cannot write at all."""
        try:
            await self._commit(entries, from_buffer_head=False)
            return
        except Exception:
            pass
        for entry in entries:
            error = await self._write_one(entry)
            if error is None:
                continue
            if not blames_the_record(error):
                raise error
            self._drop(entry, error)

    async def _write_one(self, entry: UsageEntry) -> Exception | None:
        """Write one record (twice if need be: a passing conflict drops nothing); its error."""
        error: Exception | None = None
        for _attempt in range(2):
            try:
                await self._commit([entry], from_buffer_head=False)
            except Exception as exc:
                error = exc
                continue
            return None
        return error

    async def close(self, grace_seconds: float = 30.0) -> int:
        """Stop the loop and write everything still buffered; returns records left unwritten.

        The loop is told to stop and awaited, not cancelled: a write cut off mid-statement can
        leave its connection locked (see `costing.tasks`), and the final flush would hang on it.
        """
        deadline = time.monotonic() + grace_seconds
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await finish([self._task], grace_seconds)
        while self._buffer and time.monotonic() < deadline:
            try:
                await self.flush_once()
            except Exception as exc:
                if await self._write_apart():
                    continue
                log.warning("final ledger flush failed, retrying: %s", exc)
                await asyncio.sleep(0.5)
        if self._buffer:
            log.error("%d usage records could not be written before exit", len(self._buffer))
        return len(self._buffer)
