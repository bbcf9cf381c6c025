"""SIGTERM under load: the real `llm-cost-proxy serve` process drains in-flight requests and
flushes every pending record before it exits."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
from conftest import free_port, make_settings, wait_ready
from ledger_check import assert_aggregates_match_ledger, ledger_rows

from costing.db import create_engine

CLI = Path(sys.executable).with_name("llm-cost-proxy")


async def test_sigterm_under_load_loses_nothing(database_url, fake):
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "UPSTREAM_BASE_URL": fake.url,
           "PROXY_PORT": str(port), "LEDGER_FLUSH_INTERVAL_SECONDS": "5", "LOG_LEVEL": "WARNING"}
    process = await asyncio.create_subprocess_exec(str(CLI), "serve", env=env)
    url = f"http://127.0.0.1:{port}"
    await wait_ready(url, process)
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
        await asyncio.sleep(0.2)  # all 40 are now waiting on the upstream
        process.send_signal(signal.SIGTERM)
        statuses = await asyncio.gather(*calls)
    assert await asyncio.wait_for(process.wait(), 30) == 0
    completed = statuses.count(200)
    assert completed == 40
    engine = create_engine(make_settings(database_url=database_url).database)
    try:
        rows = await ledger_rows(engine)
        assert len(rows) == completed
        await assert_aggregates_match_ledger(engine)
    finally:
        await engine.dispose()
