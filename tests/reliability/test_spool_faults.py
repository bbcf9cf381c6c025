"""The spool's hard cases, through the real `llm-cost-proxy serve` process:

- a large spool left by a SIGKILLed process, replayed at start; the replaying proxy SIGKILLed
  mid-replay (mid-commit, batch after batch) several times: in the end every record is in the
  ledger once;
- a proxy SIGKILLed while its batch transaction waits on a locked database (PostgreSQL: a row
  lock the batch's aggregate update waits on, after its rows went in; SQLite: another writer's
  transaction): every answered call is in the ledger once after the restart;
- a torn last line (a crash inside a write) is skipped, counted and logged, the rest replayed;
- a spool directory that cannot be written stops the start with one line and a non-zero exit;
- a full disk (a small tmpfs, filled): metered requests are refused with 503 in OpenAI's shape,
  every answered call is recorded, and service resumes once there is room again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import CLI, free_port, kill, serve_ready, start_serve
from dblocks import database_locked
from ledger_check import assert_aggregates_match_ledger, ledger_rows
from sqlalchemy import func, select

from costing.db import create_engine
from costing.models import UsageRecord
from costing.records import UsageEntry, new_id
from costing.settings import parse_database_url
from costing.spool import Spool
from costing.usage import Usage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

async def rows_reach(engine: Any, count: int, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while await count_rows(engine) < count:
        assert time.monotonic() < deadline, f"the ledger never reached {count} rows"
        await asyncio.sleep(0.05)


BODY = {"model": "gpt-4o-mini", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}

# Writes `count` records into a spool under `root` the way a proxy does, then SIGKILLs itself.
DEAD_WRITER = """
import os, signal, sys, time
from pathlib import Path
from costing.records import UsageEntry, new_id
from costing.spool import Spool
from costing.usage import Usage
root, count = Path(sys.argv[1]), int(sys.argv[2])
spool = Spool(root)
spool.open()
now = time.time_ns() // 1000
for i in range(count):
    spool.append(UsageEntry("replay", f"s{i % 7}", "chat.completions", "gpt-4o-mini", "gpt-4o-mini",
                            Usage(10, 2, 5, 1), 1000 + i, False, False, i % 2 == 1, 200, 5, now + i,
                            f"replay-{i}", None, id=new_id()))
os.kill(os.getpid(), signal.SIGKILL)
"""


def leave_dead_spool(root: Path, count: int) -> None:
    done = subprocess.run([sys.executable, "-c", DEAD_WRITER, str(root), str(count)], timeout=120)
    assert done.returncode == -9


async def count_rows(engine: Any) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(UsageRecord)) or 0)


async def test_kill_during_replay_and_its_commits_loses_nothing(database_url, backend, tmp_path):
    count = 20_000
    spool = tmp_path / "spool"
    leave_dead_spool(spool, count)
    # Batches of 500: 40 commits, so a kill soon after the first lands mid-replay even on a fast
    # machine (20,000 rows in batches of 2,000 were once all written within the random delay).
    env = {"DATABASE_URL": database_url, "LEDGER_SPOOL_DIR": str(spool), "LEDGER_BATCH_SIZE": "500",
           "AUTO_MIGRATE": "false", "UPSTREAM_BASE_URL": "http://127.0.0.1:9"}
    engine = create_engine(parse_database_url(database_url))
    rng = random.Random()
    progress: list[int] = []
    try:
        for _attempt in range(4):
            process, _url = await start_serve(env)
            try:
                before = await count_rows(engine)
                deadline = time.monotonic() + 60
                while await count_rows(engine) == before and process.returncode is None:
                    assert time.monotonic() < deadline, "the replay did not start"
                    await asyncio.sleep(0.02)
                await asyncio.sleep(rng.uniform(0, 0.05))  # a few batches further: mid-commit
            finally:
                await kill(process)
            progress.append(await count_rows(engine))
            if progress[-1] == count:
                break
        assert any(0 < rows < count for rows in progress), progress  # killed mid-replay
        process, _url = await serve_ready(env)
        try:
            rows = await ledger_rows(engine)
            assert sorted(r.response_id for r in rows) == sorted(f"replay-{i}" for i in range(count))
            await assert_aggregates_match_ledger(engine)
            assert sum(r.cost_usd for r in rows) * 10**10 == sum(1000 + i for i in range(count))
        finally:
            await kill(process)
        print(f"\nreplay of {count} records killed at {progress} rows [{backend}]: all {count} "
              "in the ledger once, aggregates equal the ledger")
    finally:
        await engine.dispose()


async def answer_calls(url: str, campaign: str, count: int) -> set[str]:
    """`count` concurrent calls, every other one streamed; the response ids of complete answers."""
    headers = {"X-Campaign-Id": campaign, "X-Session-Id": "s", "Authorization": "Bearer sk-x"}

    async def one(http: aiohttp.ClientSession, stream: bool) -> str:
        async with http.post(f"{url}/v1/chat/completions", json={**BODY, "stream": stream},
                             headers=headers) as response:
            raw = await response.read()
            assert response.status == 200, raw
        if stream:
            assert raw.endswith(b"data: [DONE]\n\n")
            raw = raw.split(b"\n\n", 1)[0].removeprefix(b"data: ")
        return str(orjson.loads(raw)["id"])

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        return set(await asyncio.gather(*(one(http, i % 2 == 1) for i in range(count))))


async def test_kill_during_a_blocked_batch_commit_loses_nothing(database_url, fake, backend, tmp_path):
    env = {"DATABASE_URL": database_url, "UPSTREAM_BASE_URL": fake.url,
           "LEDGER_SPOOL_DIR": str(tmp_path / "spool"), "AUTO_MIGRATE": "false"}
    engine = create_engine(parse_database_url(database_url))
    fake.behaviour.chunk_delay = 0.001
    try:
        process, url = await serve_ready(env)
        try:
            answered = await answer_calls(url, "commit", 1)  # the campaign and its lease exist
            await rows_reach(engine, 1)
            async with database_locked(database_url, backend, "commit") as pg:
                answered |= await answer_calls(url, "commit", 20)
                if pg is not None:
                    deadline = time.monotonic() + 10
                    while not await pg.fetchval(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                            " AND wait_event_type = 'Lock'"):
                        assert time.monotonic() < deadline, "the batch never waited on the lock"
                        await asyncio.sleep(0.02)
                else:
                    await asyncio.sleep(1.0)  # five flush intervals: the batch waits on the lock
                assert await count_rows(engine) == 1  # nothing of the batch committed
                await kill(process)
        finally:
            await kill(process)
        process, url = await serve_ready(env)
        try:
            rows = await ledger_rows(engine)
            recorded = [r.response_id for r in rows]
            assert len(recorded) == len(set(recorded)) == len(answered) == 21
            assert set(recorded) == answered
            await assert_aggregates_match_ledger(engine)
        finally:
            await kill(process)
    finally:
        await engine.dispose()


async def test_a_torn_last_line_is_skipped_counted_and_logged(database_url, tmp_path):
    spool = tmp_path / "spool"
    leave_dead_spool(spool, 50)
    [segment] = spool.rglob("*.spool")
    whole = segment.read_bytes()
    with segment.open("ab") as file:
        file.write(whole[: len(whole) // 50 // 2])  # half a record, no newline: a write cut off
    log = tmp_path / "stderr.log"
    with log.open("wb") as stderr:
        process, url = await serve_ready({"DATABASE_URL": database_url, "LEDGER_SPOOL_DIR": str(spool),
                                          "AUTO_MIGRATE": "false"}, stderr=stderr)
        engine = create_engine(parse_database_url(database_url))
        try:
            assert await count_rows(engine) == 50
            async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
                metrics = await response.text()
            assert "llm_spool_torn_lines_total 1.0" in metrics
            assert "llm_spool_replayed_records_total 50.0" in metrics
        finally:
            await kill(process)
            await engine.dispose()
    assert "1 torn or unreadable lines skipped" in log.read_text()
    assert not segment.parent.exists()  # the dead process's directory is gone


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `path` (root only); skips when mounting is not permitted here."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode:  # not root, or a container without CAP_SYS_ADMIN
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("place", ["read-only filesystem", "a regular file"])
async def test_an_unusable_spool_directory_stops_the_start_in_one_line(tmp_path, place):
    with contextlib.ExitStack() as stack:
        if place == "a regular file":
            spool = tmp_path / "spool"
            spool.write_text("not a directory")
        else:
            spool = stack.enter_context(tmpfs(tmp_path / "ro", "ro,size=1m")) / "spool"
        env = {**os.environ, "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'c.db'}",
               "LEDGER_SPOOL_DIR": str(spool), "PROXY_PORT": str(free_port())}
        done = await asyncio.to_thread(subprocess.run, [str(CLI), "serve"], env=env,
                                       capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"llm-cost-proxy: LEDGER_SPOOL_DIR {spool} cannot be used: ")
    assert "point it at a writable directory" in lines[0]
    assert not (tmp_path / "c.db").exists()  # stopped before anything else happened


def fill(directory: Path) -> Path:
    """Write a file until the filesystem is full."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as file:
        with contextlib.suppress(OSError):
            while True:
                file.write(b"x" * 4096)
        with contextlib.suppress(OSError):
            while True:
                file.write(b"x")
    return filler


def test_a_probe_that_fits_only_partly_finds_the_disk_still_full(tmp_path):
    """A full disk's last page may still take a few bytes of the probe without an error: that is
    no room for a record, and the spool stays refused (else every half second one more call is
    answered whose record cannot be spooled)."""
    with tmpfs(tmp_path / "disk", "size=64k") as mount:
        spool = Spool(mount / "spool")
        spool.open()
        spool.append(spool_entry(0))  # the open segment: one page, partly used
        filler = fill(mount)
        with pytest.raises(OSError):
            for i in range(1, 100):  # the page fills up until a record no longer fits
                spool.append(spool_entry(i))
        assert not spool.healthy
        assert spool.directory is not None
        segment = next(spool.directory.glob("*.spool"))
        size = segment.stat().st_size
        spool._probed_at = 0.0  # the next probe is due
        assert not spool.usable()
        assert segment.stat().st_size == size  # the probe's bytes are gone again
        filler.unlink()
        spool._probed_at = 0.0
        assert spool.usable()
        spool.close()


def spool_entry(i: int) -> UsageEntry:
    return UsageEntry("c1", f"s{i}", "chat.completions", "gpt-4o-mini", "gpt-4o-mini-2024-07-18",
                      Usage(120, 0, 48), 4_512_000, False, False, True, 200, 350,
                      1_764_550_000_000_000 + i, f"chatcmpl-{i}", None, None, id=new_id())


async def test_a_full_disk_refuses_metered_requests_and_loses_nothing(database_url, fake, tmp_path):
    disk = tmpfs(tmp_path / "disk", "size=256k")
    with disk as mount:
        env = {"DATABASE_URL": database_url, "UPSTREAM_BASE_URL": fake.url,
               "LEDGER_SPOOL_DIR": str(mount / "spool"), "AUTO_MIGRATE": "false"}
        process, url = await serve_ready(env)
        engine = create_engine(parse_database_url(database_url))
        headers = {"X-Campaign-Id": "full", "X-Session-Id": "s", "Authorization": "Bearer sk-x"}
        statuses: list[int] = []
        answered: set[str] = set()
        try:
            async with aiohttp.ClientSession() as http:

                async def call() -> None:
                    async with http.post(f"{url}/v1/chat/completions", json=BODY,
                                         headers=headers) as response:
                        body = orjson.loads(await response.read())
                    statuses.append(response.status)
                    if response.status == 200:
                        answered.add(body["id"])
                    else:
                        assert response.status == 503
                        assert set(body["error"]) == {"message", "type", "param", "code"}
                        assert body["error"]["code"] == "cost_ledger_unavailable"
                        assert "LEDGER_SPOOL_DIR" in body["error"]["message"]
                        assert response.headers["Retry-After"] == "1"

                for _ in range(5):
                    await call()
                await rows_reach(engine, 5)  # committed: the spool is empty again
                filler = fill(mount)
                for _ in range(10):
                    await call()
                async with http.get(f"{url}/readyz") as response:
                    ready_when_full = response.status, (await response.json())["checks"]["spool"]
                refused = statuses.count(503)
                forwarded = fake.hits("/chat/completions")
                filler.unlink()
                await asyncio.sleep(0.6)  # the spool probes again at most every 0.5 s
                for _ in range(5):
                    await call()
            assert statuses[:5] == [200] * 5
            # The first call after the disk filled was admitted before its record failed to
            # spool (it still went to the ledger, from memory); then refusals until room is back.
            assert statuses[5] == 200 and statuses[6:15] == [503] * 9 and refused == 9
            assert forwarded == 6  # refused calls never reached the upstream
            assert statuses[15:] == [200] * 5
            assert ready_when_full == (503, "cannot be written: No space left on device")
            await asyncio.sleep(0.5)
            rows = await ledger_rows(engine)
            assert sorted(r.response_id for r in rows) == sorted(answered)
            await assert_aggregates_match_ledger(engine)
            async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
                metrics = await response.text()
            assert "llm_spool_write_errors 1.0" in metrics
            assert "llm_ledger_records_dropped_total 0.0" in metrics
        finally:
            await kill(process)
            await engine.dispose()
