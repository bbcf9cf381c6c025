"""kill -9 under load: the real `llm-cost-proxy serve` process is SIGKILLed mid-traffic; at most
the records of the last flush interval (LEDGER_FLUSH_INTERVAL_SECONDS) are missing.

The client sends RATE requests a second on a fixed schedule. The test watches the ledger to see
a batch commit, then kills the proxy 0.8 intervals later (just before the next batch would be
written: close to the worst case). Then, matching the upstream response ids of the answers the
client received against the ledger:

- every missing record belongs to an answer received within `interval + MARGIN` seconds of the
  kill (a record waits at most one interval for its batch; MARGIN covers the batch write itself,
  twice, and scheduling jitter on a busy machine), so missing <= what was answered in that window,
  and missing <= RATE x (interval + MARGIN);
- what was written is consistent: the aggregates equal the ledger (batches are transactions).

The figures (answered, recorded, missing, age of the oldest missing answer) are printed.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import CLI, free_port, make_settings, wait_ready
from ledger_check import assert_aggregates_match_ledger, ledger_rows
from sqlalchemy import func, select

from costing.db import create_engine
from costing.models import UsageRecord

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

RATE = 50.0  # requests per second
MARGIN = 0.3  # seconds beyond the flush interval: batch write time and scheduling jitter
WARM_UP = 1.5  # seconds of traffic before the kill is timed


@dataclass
class Answer:
    started: float
    finished: float = 0.0
    status: int = 0
    response_id: str | None = None


@dataclass
class Load:
    url: str
    answers: list[Answer] = field(default_factory=list)

    async def one(self, http: aiohttp.ClientSession, answer: Answer, index: int) -> None:
        body = {"model": "gpt-4o-mini", "max_tokens": 32,
                "messages": [{"role": "user", "content": f"turn {index}"}]}
        headers = {"X-Campaign-Id": "crash", "X-Session-Id": f"s{index % 3}",
                   "Authorization": "Bearer sk-crash"}
        try:
            async with http.post(f"{self.url}/v1/chat/completions", json=body,
                                 headers=headers) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError):
            return  # killed before it answered: not an answer the client got
        answer.finished = time.monotonic()
        answer.status = status
        if status == 200:
            answer.response_id = orjson.loads(raw)["id"]

    async def run(self, stop: asyncio.Event) -> None:
        tasks: list[asyncio.Task[None]] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10),
                                         connector=aiohttp.TCPConnector(limit=0)) as http:
            next_at = time.monotonic()
            while not stop.is_set():
                answer = Answer(time.monotonic())
                self.answers.append(answer)
                tasks.append(asyncio.create_task(self.one(http, answer, len(self.answers))))
                next_at += 1 / RATE
                await asyncio.sleep(max(next_at - time.monotonic(), 0))
            await asyncio.gather(*tasks)


async def _count(engine: Any) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(UsageRecord)) or 0)


async def _time_kill(engine: Any, interval: float) -> None:
    """Return 0.8 intervals after a batch commit is seen (or after 3 s without one)."""
    deadline = time.monotonic() + 3.0
    before = await _count(engine)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        if await _count(engine) != before:
            await asyncio.sleep(0.8 * interval)
            return


@pytest.mark.parametrize("interval", [0.2, 1.0])
async def test_kill_9_loses_at_most_one_flush_interval(database_url, fake, backend, interval):
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "UPSTREAM_BASE_URL": fake.url,
           "PROXY_PORT": str(port), "LEDGER_FLUSH_INTERVAL_SECONDS": str(interval),
           "LOG_LEVEL": "WARNING", "AUTO_MIGRATE": "false"}
    url = f"http://127.0.0.1:{port}"
    engine = create_engine(make_settings(database_url=database_url).database)
    process = await asyncio.create_subprocess_exec(str(CLI), "serve", env=env)
    try:
        await wait_ready(url, process)
        load = Load(url)
        stop = asyncio.Event()
        traffic = asyncio.create_task(load.run(stop))
        await asyncio.sleep(WARM_UP)
        await _time_kill(engine, interval)
        killed_at = time.monotonic()
        process.kill()
        await process.wait()
        stop.set()
        await traffic

        answered = {a.response_id: a for a in load.answers if a.status == 200}
        assert len(answered) >= RATE * WARM_UP * 0.8
        assert all(a.status in (0, 200) for a in load.answers)
        rows = await ledger_rows(engine)
        recorded = {r.response_id for r in rows}
        missing = [answered[rid] for rid in set(answered) - recorded]
        unanswered = len(recorded - set(answered))  # written, but the kill cut the answer off
        window = interval + MARGIN
        recent = [a for a in answered.values() if a.finished >= killed_at - window]
        last_interval = sum(a.finished >= killed_at - interval for a in answered.values())
        oldest = max((killed_at - a.finished for a in missing), default=0.0)
        print(f"\nkill -9 [{backend}, LEDGER_FLUSH_INTERVAL_SECONDS={interval}, {RATE:.0f} req/s]: "
              f"{len(answered)} answered, {len(rows)} recorded, {len(missing)} missing "
              f"(answered in the last interval: {last_interval}; bound {len(recent)} = answered in "
              f"the last {window:.1f} s), oldest missing answer {oldest:.3f} s before the kill, "
              f"{unanswered} recorded without an answer")
        assert oldest <= window, f"a record {oldest:.3f} s old was lost (interval {interval} s)"
        assert len(missing) <= len(recent)
        assert len(missing) <= RATE * window
        await assert_aggregates_match_ledger(engine)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await engine.dispose()
