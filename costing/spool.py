"""The local spool: every usage record is appended to a file before its answer's last byte goes
out, and leaves it once the ledger writer has committed it, so a process killed at any moment
(`kill -9`, the OOM killer) loses no answered call's record.

Layout: LEDGER_SPOOL_DIR holds one directory per live process (`p<pid>-<random>/`), each with a
`lock` file the process holds `flock`ed for its life, and segment files `<seq>.spool`. Two
processes (workers, replicas on one volume) never write to one directory; a directory whose lock
can be taken belongs to a dead process, and the next process to start (or a replacement worker)
takes it over and replays it (`take_over`). The kernel drops a dead process's locks, so no
stale-lock heuristics are needed.

A segment holds one record per line, a JSON array of plain values with a format version first
(`encode`): one `orjson.dumps` and one `write(2)` per record, ~4 us of CPU together
(docs/performance.md, "Durability").
A write into the page cache survives the death of the process; LEDGER_SPOOL_FSYNC decides what a
power loss may cost: `never`, `always` (fdatasync per record, on the request path), or a number
of seconds (a background fdatasync at that pace). Segments roll over at SEGMENT_BYTES; a segment
is removed once every record in it is committed, and the open one is truncated when it empties,
so at rest the spool holds nothing.

A line cut short (a crash inside a write, a power loss) fails to decode; replay skips and counts
it. A failed write (disk full) is rolled back to the last whole line and marks the spool
unhealthy: admission then refuses metered requests (503) until a probe write succeeds again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from costing.errors import CostingError
from costing.records import UsageEntry
from costing.usage import Usage

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FIELDS = 23  # the version and 22 values, see `encode`
# ... and a 24th, the prompt-cache writes, on a line of a call that made any: a line without
# them is the one earlier releases wrote and read (a rollback, an older process taking over).
FIELDS_WITH_CACHE_WRITES = 24
# ... and a 25th, the cached audio input tokens (after the cache writes, 0 or not), on a line of a
# Realtime response that had any: lines without are read as before, with none.
FIELDS_WITH_CACHED_AUDIO = 25
_LOW64 = (1 << 64) - 1
SEGMENT_BYTES = 4 << 20  # ~15,000 records: a replay reads one segment at a time
SUFFIX = ".spool"
LOCK_NAME = "lock"
PROBE = b" " * 4095 + b"\n"  # a blank line (skipped by replay): room for a page of records
PROBE_EVERY_SECONDS = 0.5
STAGING_SECONDS = 60.0  # a half-made directory older than this was left by a dead process
_APPEND = orjson.OPT_APPEND_NEWLINE
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC


class SpoolUnavailable(CostingError):
    """The spool directory cannot be used (not writable, not a directory)."""


# -- the line format ------------------------------------------------------------------------------

def encode(e: UsageEntry) -> bytes:
    """One record as one line: [version, id (high and low 64 bits: cheaper than hex),
    campaign, session, operation, request model, response model, input, cached input, output,
    reasoning tokens, cost units, flags (priced by default 1, estimated 2, streamed 4), status,
    latency ms, created us, response id, key hash, audio input, audio output tokens, web
    searches, service tier(, cache-write input tokens(, cached audio input tokens): only when
    there are any)]."""
    u = e.usage
    values: tuple[object, ...] = (
        FORMAT_VERSION, e.id >> 64, e.id & _LOW64, e.campaign_id, e.session_id, e.operation,
        e.request_model, e.response_model, u.input_tokens, u.cached_input_tokens, u.output_tokens,
        u.reasoning_tokens, e.cost_units, e.priced_by_default | e.estimated << 1 | e.streamed << 2,
        e.status_code, e.latency_ms, e.created_us, e.response_id, e.api_key_hash,
        u.audio_input_tokens, u.audio_output_tokens, u.web_search_calls, e.service_tier)
    if u.cached_audio_input_tokens:
        values += (u.cache_write_input_tokens, u.cached_audio_input_tokens)
    elif u.cache_write_input_tokens:
        values += (u.cache_write_input_tokens,)
    try:
        return orjson.dumps(values, option=_APPEND)
    except orjson.JSONEncodeError:  # an integer beyond 64 bits (an absurd price): as text
        return orjson.dumps([FORMAT_VERSION, *(str(v) if isinstance(v, int) else v
                                                for v in values[1:])], option=_APPEND)


def decode(line: bytes) -> UsageEntry:
    """The record of one line; ValueError for anything that is not a whole line of this format."""
    try:
        v = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not a spool line: {exc}") from None
    if (not isinstance(v, list) or not FIELDS <= len(v) <= FIELDS_WITH_CACHED_AUDIO
            or v[0] != FORMAT_VERSION):
        raise ValueError("not a spool line of format version 1")
    flags = int(v[13])
    try:
        return UsageEntry(
            _text(v[3]), _text(v[4]), _text(v[5]), _optional(v[6]), _optional(v[7]),
            Usage(int(v[8]), int(v[9]), int(v[10]), int(v[11]), int(v[19]), int(v[20]),
                  int(v[21]), int(v[23]) if len(v) >= FIELDS_WITH_CACHE_WRITES else 0,
                  int(v[24]) if len(v) == FIELDS_WITH_CACHED_AUDIO else 0),
            int(v[12]), bool(flags & 1), bool(flags & 2), bool(flags & 4),
            int(v[14]), int(v[15]), int(v[16]), _optional(v[17]), _optional(v[18]),
            _optional(v[22]), int(v[1]) << 64 | int(v[2]))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not a spool line: {exc}") from None


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("a text field holds a non-text value")
    return value


def _optional(value: object) -> str | None:
    return None if value is None else _text(value)


def read_segment(path: Path) -> tuple[list[UsageEntry], int]:
    """The records of a segment file and the number of lines that were not whole records."""
    entries: list[UsageEntry] = []
    torn = 0
    data = path.read_bytes()
    for line in data.split(b"\n"):
        if not line.strip():
            continue  # the end of the file, a probe, or padding
        try:
            entries.append(decode(line))
        except ValueError:
            torn += 1
    return entries, torn


# -- the live spool ---------------------------------------------------------------------------------

@dataclass(slots=True, eq=False)
class Segment:
    path: Path
    fd: int
    size: int = 0  # bytes of whole lines written
    outstanding: int = 0  # records written and not yet committed


@dataclass(slots=True)
class Orphan:
    """A dead process's spool directory, locked by this process until it is removed."""

    path: Path
    lock_fd: int

    def segments(self) -> list[Path]:
        return sorted(self.path.glob(f"*{SUFFIX}"))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.unlock()

    def unlock(self) -> None:
        os.close(self.lock_fd)


@dataclass(slots=True)
class Spool:
    """This process's spool: append on the request path, release after commit."""

    root: Path
    fsync_seconds: float | None = None  # None never, 0 always (Settings.spool_fsync_seconds)
    segment_bytes: int = SEGMENT_BYTES
    healthy: bool = True
    last_error: str = ""
    write_errors: int = 0
    directory: Path | None = None
    _segment: Segment | None = None
    _seq: int = 0
    _lock_fd: int = -1
    _where: dict[int, Segment] = field(default_factory=dict)  # record id -> its segment
    _unsynced: list[int] = field(default_factory=list)  # fds (dup'ed) waiting for the sync loop
    _dirty: bool = False
    _probed_at: float = 0.0

    # -- life cycle

    def open(self) -> None:
        """Make this process's directory and lock it; SpoolUnavailable when the root is unusable."""
        name = f"p{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging = self.root / f".new-{name}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
            self._lock_fd = os.open(staging / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Made under a name scans ignore, locked, then put in place: no other process can
            # take a directory for a dead one's between its creation and its lock.
            self.directory = self.root / name
            staging.rename(self.directory)
            self._segment = self._new_segment()
        except OSError as exc:
            raise SpoolUnavailable(
                f"LEDGER_SPOOL_DIR {self.root} cannot be used: {exc.strerror or exc} "
                f"({type(exc).__name__}); point it at a writable directory") from None

    def take_over(self) -> Iterator[Orphan]:
        """Directories of dead processes, each locked as it is yielded (others are skipped)."""
        for path in sorted(self.root.iterdir()):
            if path == self.directory or not path.is_dir():
                continue
            if path.name.startswith(".") and _age(path) < STAGING_SECONDS:
                continue  # another process may be making it right now (see `open`)
            try:
                fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                continue  # removed meanwhile by another process
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)  # a live process's
                continue
            if not path.exists():  # replayed and removed between our scan and our lock
                os.close(fd)
                continue
            yield Orphan(path, fd)

    def close(self) -> int:
        """Close the files; remove this process's directory when every record was committed.
        Returns the records left for the next start to replay."""
        left = len(self._where)
        self._sync_now()
        if self._segment is not None and self._segment.fd >= 0:
            os.close(self._segment.fd)
        self._segment = None
        if self.directory is not None and not left:
            shutil.rmtree(self.directory, ignore_errors=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        if left:
            log.warning("%d usage records left in the spool %s: the next start writes them",
                        left, self.directory)
        return left

    def __len__(self) -> int:
        return len(self._where)

    # -- request path

    def append(self, entry: UsageEntry) -> None:
        """Write one record; on failure roll the file back to its last whole line and raise."""
        line = encode(entry)
        segment = self._segment
        try:
            if segment is None or segment.size >= self.segment_bytes:
                segment = self._rotate()
            written = os.write(segment.fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, "short write: the disk is full")
            if self.fsync_seconds == 0.0:
                os.fdatasync(segment.fd)
        except OSError as exc:
            self._failed(segment, exc)
            raise
        segment.size += written
        segment.outstanding += 1
        self._where[entry.id] = segment
        self._dirty = True

    def release(self, entries: Iterable[UsageEntry]) -> None:
        """Committed records leave the spool: a segment left with none is removed (the open one
        truncated)."""
        where = self._where
        for entry in entries:
            segment = where.pop(entry.id, None)
            if segment is None:
                continue
            segment.outstanding -= 1
            if not segment.outstanding:
                self._drop(segment)

    def usable(self) -> bool:
        """Whether records can be spooled; while not, a probe write at most every half second."""
        if self.healthy:
            return True
        now = time.monotonic()
        if now - self._probed_at < PROBE_EVERY_SECONDS:
            return False
        self._probed_at = now
        try:
            segment = self._segment if self._segment is not None else self._rotate()
            try:
                # A short write is a full disk too: a page's last free bytes take part of the
                # probe without an error, and the next record would not fit.
                if os.write(segment.fd, PROBE) != len(PROBE):
                    raise OSError(errno.ENOSPC, "short write: the disk is full")
            finally:
                os.ftruncate(segment.fd, segment.size)
        except OSError as exc:
            self.last_error = f"{exc.strerror or exc}"
            return False
        log.warning("the spool in %s can be written again", self.directory)
        self.healthy = True
        return True

    # -- fsync every N seconds

    async def sync_loop(self, stop: asyncio.Event) -> None:
        """Background fdatasync every `fsync_seconds` (only for a number of seconds)."""
        seconds = self.fsync_seconds
        if not seconds:
            return
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)
            fds = self._take_unsynced()
            if fds:
                await asyncio.to_thread(_sync_and_close, fds)
            if stop.is_set():
                return

    # -- internals

    def _take_unsynced(self) -> list[int]:
        fds, self._unsynced = self._unsynced, []
        if self._dirty and self._segment is not None:
            fds.append(os.dup(self._segment.fd))  # the loop may close or rotate it meanwhile
        self._dirty = False
        return fds

    def _sync_now(self) -> None:
        if self.fsync_seconds is not None:
            _sync_and_close(self._take_unsynced())

    def _new_segment(self) -> Segment:
        assert self.directory is not None
        self._seq += 1
        path = self.directory / f"{self._seq:08d}{SUFFIX}"
        segment = Segment(path, os.open(path, _OPEN_FLAGS, 0o600))
        if self.fsync_seconds is not None:  # the new name must survive a power loss too
            directory = os.open(self.directory, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        return segment

    def _rotate(self) -> Segment:
        old = self._segment
        self._segment = None
        if old is not None and old.fd >= 0:
            if self.fsync_seconds:
                self._unsynced.append(os.dup(old.fd))
            os.close(old.fd)
            old.fd = -1
            if not old.outstanding:
                with contextlib.suppress(OSError):
                    old.path.unlink()
        self._segment = self._new_segment()
        return self._segment

    def _drop(self, segment: Segment) -> None:
        if segment is self._segment:
            with contextlib.suppress(OSError):
                os.ftruncate(segment.fd, 0)  # O_APPEND: the next record goes at the start
                segment.size = 0
        else:
            with contextlib.suppress(OSError):
                segment.path.unlink()

    def _failed(self, segment: Segment | None, exc: OSError) -> None:
        self.write_errors += 1
        self.last_error = f"{exc.strerror or exc}"
        if self.healthy:
            log.error("the spool in %s cannot be written (%s): metered requests are refused "
                      "until it can", self.directory, self.last_error)
        self.healthy = False
        self._probed_at = time.monotonic()
        if segment is None or segment.fd < 0:
            return
        try:
            os.ftruncate(segment.fd, segment.size)
        except OSError:
            # A partial line may stay at its end (replay skips it): go on in a new segment.
            os.close(segment.fd)
            segment.fd = -1
            self._segment = None
            if not segment.outstanding:
                with contextlib.suppress(OSError):
                    segment.path.unlink()


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _sync_and_close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.fdatasync(fd)
        except OSError as exc:
            log.warning("spool fdatasync failed: %s", exc)
        finally:
            os.close(fd)
