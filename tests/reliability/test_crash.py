"""kill -9 under load loses no answered call: the real `llm-cost-proxy serve` process is
SIGKILLed at a random moment while 10 clients call it, 20 times over, each restart on the spool
(LEDGER_SPOOL_DIR) the killed one left.

A call counts as answered when its client got a complete 200 answer: the JSON body, or a stream
through `data: [DONE]`. Matching the upstream's response ids (unique per call) against the
ledger, after every restart (the spool is replayed before the proxy listens):

- every answered call is in the ledger; a call the kill cut off may be there too (it was made
  and billed upstream), but no call is recorded twice;
- the aggregates equal the ledger (tests/ledger_check.py);
- after a final SIGTERM the spool holds no record and no segment file.

The totals are printed.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import serve_ready
from ledger_check import assert_aggregates_match_ledger, ledger_rows

from costing.db import create_engine
from costing.settings import parse_database_url

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ROUNDS = 20
CLIENTS = 10
LOAD_SECONDS = (0.2, 1.0)  # each round's traffic lasts a random time in this range, then kill -9


@dataclass
class Calls:
    """Response ids of the calls clients got complete answers to, and how many were sent."""

    url: str
    answered: set[str] = field(default_factory=set)
    sent: int = 0
    cut_off: int = 0

    async def client(self, index: int, stop: asyncio.Event) -> None:
        headers = {"X-Campaign-Id": f"crash{index % 3}", "X-Session-Id": f"s{index}",
                   "Authorization": "Bearer sk-crash"}
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            turn = 0
            while not stop.is_set():
                turn += 1
                stream = turn % 2 == 0
                body: dict[str, Any] = {"model": "gpt-4o-mini", "max_tokens": 32, "stream": stream,
                                        "messages": [{"role": "user", "content": f"{index} {turn}"}]}
                self.sent += 1
                try:
                    async with http.post(f"{self.url}/v1/chat/completions", json=body,
                                         headers=headers) as response:
                        raw = await response.read()
                        status = response.status
                except (aiohttp.ClientError, TimeoutError):
                    self.cut_off += 1
                    return  # the proxy is gone
                assert status == 200, raw
                if not stream:
                    self.answered.add(orjson.loads(raw)["id"])
                elif raw.endswith(b"data: [DONE]\n\n"):
                    first = raw.split(b"\n\n", 1)[0].removeprefix(b"data: ")
                    self.answered.add(orjson.loads(first)["id"])
                else:
                    self.cut_off += 1  # a stream without its end is not an answer
                    return


def spool_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.spool")) if directory.exists() else []


async def check_ledger(engine: Any, answered: set[str]) -> tuple[int, int]:
    """Every answered call once in the ledger, aggregates equal to it; (rows, rows unanswered)."""
    rows = await ledger_rows(engine)
    recorded = [r.response_id for r in rows]
    assert None not in recorded
    assert len(recorded) == len(set(recorded)), "a call was recorded twice"
    missing = answered - set(recorded)
    assert not missing, f"{len(missing)} answered calls are not in the ledger"
    await assert_aggregates_match_ledger(engine)
    return len(rows), len(set(recorded) - answered)


async def test_kill_9_at_random_moments_loses_no_answered_call(database_url, fake, backend, tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    spool = tmp_path / "spool"
    fake.behaviour.chunk_delay = 0.001  # streams arrive in several reads: the relay path
    env = {"DATABASE_URL": database_url, "UPSTREAM_BASE_URL": fake.url, "LEDGER_SPOOL_DIR": str(spool),
           "LEDGER_FLUSH_INTERVAL_SECONDS": "0.2", "AUTO_MIGRATE": "false"}
    engine = create_engine(parse_database_url(database_url))
    answered: set[str] = set()
    sent = cut_off = 0
    started = time.monotonic()
    process = None
    try:
        for _round in range(ROUNDS):
            process, url = await serve_ready(env)
            await check_ledger(engine, answered)  # what the last kill left is in, before listening
            calls = Calls(url)
            stop = asyncio.Event()
            clients = [asyncio.create_task(calls.client(i, stop)) for i in range(CLIENTS)]
            await asyncio.sleep(rng.uniform(*LOAD_SECONDS))
            process.kill()
            await process.wait()
            stop.set()
            await asyncio.gather(*clients)
            answered |= calls.answered
            sent += calls.sent
            cut_off += calls.cut_off
        process, url = await serve_ready(env)
        rows, unanswered = await check_ledger(engine, answered)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
        assert spool_files(spool) == []
        assert [p for p in spool.iterdir() if not p.name.startswith(".")] == []
        print(f"\nkill -9 x{ROUNDS} [{backend}, {CLIENTS} clients, seed {seed}]: {sent} calls sent, "
              f"{len(answered)} answered, {cut_off} cut off by the kills, {rows} ledger rows "
              f"(every answered call once, {unanswered} cut off after their record), 0 lost, "
              f"aggregates equal the ledger; {time.monotonic() - started:.0f} s")
        assert len(answered) >= ROUNDS * CLIENTS // 2  # the rounds did answer calls
    finally:
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()
        await engine.dispose()

