"""SIGTERM under load: the real `llm-cost-proxy serve` process drains in-flight requests and
flushes every pending record before it exits, and leaves its spool empty."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
from conftest import make_settings, spawn_proxy
from ledger_check import assert_aggregates_match_ledger, ledger_rows

from costing.db import create_engine


async def test_sigterm_under_load_loses_nothing(database_url, fake, tmp_path):
    spool = tmp_path / "spool"
    process, url = await spawn_proxy(DATABASE_URL=database_url, UPSTREAM_BASE_URL=fake.url,
                                     LEDGER_FLUSH_INTERVAL_SECONDS="5", LEDGER_SPOOL_DIR=str(spool))
    fake.behaviour.delay = 0.5
    headers = {"X-Campaign-Id": "term", "X-Session-Id": "s", "Authorization": "Bearer sk-x"}
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

    async def call(http: aiohttp.ClientSession) -> int:
        try:
            async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as response:
                await response.read()
                return response.status
        except aiohttp.ClientError:
            return 0

    async with aiohttp.ClientSession() as http:
        calls = [asyncio.create_task(call(http)) for _ in range(40)]
        deadline = time.monotonic() + 20
        while fake.hits("/chat/completions") < 40:  # all 40 waiting on the upstream (not a guess)
            assert time.monotonic() < deadline, "the calls never reached the upstream"
            await asyncio.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        statuses = await asyncio.gather(*calls)
    assert await asyncio.wait_for(process.wait(), 30) == 0
    completed = statuses.count(200)
    assert completed == 40
    assert list(spool.iterdir()) == []  # every record committed: its directory removed
    engine = create_engine(make_settings(database_url=database_url).database)
    try:
        rows = await ledger_rows(engine)
        assert len(rows) == completed
        await assert_aggregates_match_ledger(engine)
    finally:
        await engine.dispose()
