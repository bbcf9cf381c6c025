"""`llm-cost-proxy serve --workers 2`: two worker processes on one port, one budget, one ledger,
one /metrics; SIGTERM drains both; a killed worker is replaced."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import aiohttp
import openai
import pytest
from conftest import CLI, free_port, make_settings
from ledger_check import assert_aggregates_match_ledger, ledger_rows
from test_budget_gate import CAPPED_CALL, MESSAGES, alternate_calls, answer_what_is_reserved
from test_startup_errors import run

from costing.db import create_engine
from proxy.workers import check_port


class Workers:
    """A `serve --workers 2` supervisor process and its URL."""

    def __init__(self, process: asyncio.subprocess.Process, url: str) -> None:
        self.process = process
        self.url = url

    def worker_pids(self) -> set[int]:
        """The supervisor's children, read from /proc."""
        pids: set[int] = set()
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            pids.update(int(p) for p in (task / "children").read_text().split())
        return pids

    async def answering_pids(self, want: int = 2, seconds: float = 20.0) -> set[int]:
        """Worker pids seen in /healthz over fresh connections until `want` distinct ones answered."""
        seen: set[int] = set()
        deadline = time.monotonic() + seconds
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            while len(seen) < want:
                assert self.process.returncode is None, "the supervisor exited"
                assert time.monotonic() < deadline, f"only workers {seen} answered in {seconds} s"
                try:
                    async with http.get(f"{self.url}/healthz") as response:
                        if response.status == 200:
                            seen.add((await response.json())["worker"]["pid"])
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
        return seen

    def client(self, campaign: str = "c1") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="sk-test", max_retries=0,
                                  default_headers={"X-Campaign-Id": campaign, "X-Session-Id": "s1"})

    async def metrics(self) -> str:
        async with aiohttp.ClientSession() as http, http.get(f"{self.url}/metrics") as response:
            assert response.status == 200
            return await response.text()

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), 60)


@pytest.fixture
async def start_workers(database_url: str, fake) -> AsyncIterator:
    started: list[Workers] = []

    async def factory(**env: str) -> Workers:
        port = free_port()
        process = await asyncio.create_subprocess_exec(
            str(CLI), "serve", "--workers", "2",
            env={**os.environ, "LOG_LEVEL": "WARNING", "DATABASE_URL": database_url,
                 "UPSTREAM_BASE_URL": fake.url, "LEDGER_FLUSH_INTERVAL_SECONDS": "0.05", **env,
                 "PROXY_PORT": str(port)})
        workers = Workers(process, f"http://127.0.0.1:{port}")
        started.append(workers)
        await workers.answering_pids()
        return workers

    yield factory
    for workers in started:
        await workers.stop()


async def stored_rows(database_url: str) -> list:
    engine = create_engine(make_settings(database_url=database_url).database)
    try:
        rows = await ledger_rows(engine)
        await assert_aggregates_match_ledger(engine)
        return rows
    finally:
        await engine.dispose()


def sample_sum(text: str, name: str) -> float:
    """Sum of a metric's samples over all label sets in an exposition."""
    return sum(float(value) for value in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


async def test_two_workers_enforce_one_budget_under_a_burst(start_workers, database_url, fake):
    limit = 40 * answer_what_is_reserved(fake)
    workers = await start_workers(COST_WARNING_THRESHOLD_USD="0", COST_LIMIT_THRESHOLD_USD=str(limit))
    results = await alternate_calls([workers.client(), workers.client()], CAPPED_CALL)
    assert await workers.stop() == 0  # drains and flushes both workers
    rows = await stored_rows(database_url)
    assert sum(r.cost_usd for r in rows) <= limit
    assert sum(results) == len(rows) == fake.hits("/chat/completions")
    assert 0 < sum(results) < 200


async def test_metrics_add_up_all_workers_and_equal_the_ledger(start_workers, database_url, fake):
    workers = await start_workers()
    client = workers.client()
    calls = 60
    # Concurrent calls open many connections, which the kernel spreads over both workers.
    await asyncio.gather(*(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
                           for _ in range(calls)))
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    async for _ in stream:
        pass
    deadline = time.monotonic() + 10
    while sample_sum(text := await workers.metrics(), "llm_ledger_records_written_total") < calls + 1:
        assert time.monotonic() < deadline, text
        await asyncio.sleep(0.1)
    rows = await stored_rows(database_url)
    assert len(rows) == calls + 1
    assert sample_sum(text, "llm_requests_total") == calls + 1
    assert Decimal(str(sample_sum(text, "llm_cost_usd_total"))).quantize(Decimal("1e-9")) == \
        sum(r.cost_usd for r in rows).quantize(Decimal("1e-9"))
    assert sample_sum(text, "llm_tokens_total") == sum(r.input_tokens + r.cached_input_tokens
                                                       + r.output_tokens + r.reasoning_tokens
                                                       for r in rows)
    durations = sample_sum(text, "gen_ai_client_operation_duration_seconds_count")
    assert durations == calls + 1
    # Each family appears once, whatever the number of workers.
    assert text.count("# TYPE llm_requests_total counter") == 1


async def test_sigterm_drains_both_workers(start_workers, database_url, fake):
    workers = await start_workers(LEDGER_FLUSH_INTERVAL_SECONDS="5")
    fake.behaviour.delay = 0.5
    client = workers.client("term")
    calls = [asyncio.create_task(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES))
             for _ in range(40)]
    deadline = time.monotonic() + 10
    while fake.hits("/chat/completions") < 40:  # all 40 are now waiting on the upstream
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    pids = workers.worker_pids()
    assert len(pids) == 2
    workers.process.send_signal(signal.SIGTERM)
    answers = await asyncio.gather(*calls)
    assert len(answers) == 40  # every in-flight call finished
    assert await asyncio.wait_for(workers.process.wait(), 30) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # both workers are gone
    assert len(await stored_rows(database_url)) == 40  # both ledgers flushed


async def test_a_killed_worker_is_replaced_and_the_proxy_keeps_answering(start_workers, database_url,
                                                                         fake):
    workers = await start_workers()
    before = workers.worker_pids()
    victim = next(iter(before))
    os.kill(victim, signal.SIGKILL)
    client = workers.client()
    answered = 0
    deadline = time.monotonic() + 20
    while True:  # the survivor answers meanwhile
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        answered += 1
        pids = workers.worker_pids()
        if len(pids) == 2 and victim not in pids:
            break
        assert time.monotonic() < deadline, "the killed worker was not replaced"
        await asyncio.sleep(0.1)
    assert await workers.answering_pids() == pids  # the replacement serves the port too
    await asyncio.gather(*(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
                           for _ in range(20)))
    assert await workers.stop() == 0
    assert len(await stored_rows(database_url)) == answered + 20 == fake.hits("/chat/completions")


async def test_ctrl_c_stops_the_workers_like_sigterm(start_workers):
    workers = await start_workers()
    pids = workers.worker_pids()
    workers.process.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(workers.process.wait(), 30) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_a_schema_behind_with_auto_migrate_off_stops_the_workers_start_with_one_line_and_status_2(
        tmp_path):
    process = await asyncio.create_subprocess_exec(
        str(CLI), "serve", "--workers", "2", stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LOG_LEVEL": "WARNING", "AUTO_MIGRATE": "false",
             "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}", "PROXY_PORT": str(free_port())})
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert err.decode().count("the database schema is at nothing") == 1, err.decode()


def _failed_start(tmp_path: Path, workers: int, **env: str) -> tuple[int, list[str]]:
    """`serve` (with `--workers N` when N > 1) that fails to start: its status and stderr lines."""
    args = ("serve", "--workers", str(workers)) if workers > 1 else ("serve",)
    done = run(tmp_path, *args, LOG_LEVEL="INFO", DATABASE_CONNECT_TIMEOUT_SECONDS="2", **env)
    return done.returncode, done.stderr.strip().splitlines()


def _unusable_spool(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "a-file").write_text("", encoding="utf-8")
    return {"LEDGER_SPOOL_DIR": str(tmp_path / "a-file")}


def assert_same_failed_start(tmp_path: Path, env: dict[str, str]) -> list[str]:
    """With workers, a start that fails is the single process's: the same one line, once, the
    same status, no traceback, and nothing claims to serve. Returns the workers' lines."""
    single_status, single = _failed_start(tmp_path, 1, **env)
    status, lines = _failed_start(tmp_path, 2, **env)
    assert status == single_status and status in (1, 2), lines
    assert lines[-1] == single[-1] and lines[-1].startswith("llm-cost-proxy: "), lines
    assert [line for line in lines if "llm-cost-proxy: " in line] == [lines[-1]], lines  # once
    assert len(lines) <= 3 and "Traceback" not in "\n".join(lines), lines
    assert not any("serving on" in line for line in lines), lines
    return lines


@pytest.mark.parametrize("host", ["127.0.0.1", "db-host.invalid"])
def test_with_workers_a_database_out_of_reach_is_waited_for_then_one_line_status_1(tmp_path, host):
    port = free_port() if host == "127.0.0.1" else 5432  # refused, or a name that never resolves
    lines = assert_same_failed_start(tmp_path, {"DATABASE_URL": f"postgresql://postgres@{host}:{port}/costs"})
    assert any("waiting up to 2 s" in line for line in lines), lines
    assert "DATABASE_URL" in lines[-1]
    assert ("refused" if host == "127.0.0.1" else host) in lines[-1]


@pytest.mark.parametrize("problem", ["spool directory", "prices file"])
def test_with_workers_a_bad_setting_is_found_before_they_start_one_line_status_2(tmp_path, database_url,
                                                                                 problem):
    (tmp_path / "a-file").write_text("", encoding="utf-8")
    env = ({"LEDGER_SPOOL_DIR": str(tmp_path / "a-file")} if problem == "spool directory"
           else {"PRICES_FILE": str(tmp_path / "nope.json")})
    lines = assert_same_failed_start(tmp_path, {"DATABASE_URL": database_url, **env})
    assert ("LEDGER_SPOOL_DIR" if problem == "spool directory" else "PRICES_FILE") in lines[-1]


async def test_serving_on_is_logged_once_every_worker_listens(tmp_path, database_url, fake):
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        str(CLI), "serve", "--workers", "2", stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LOG_LEVEL": "INFO", "DATABASE_URL": database_url, "UPSTREAM_BASE_URL": fake.url,
             "LEDGER_SPOOL_DIR": str(tmp_path / "spool"), "PROXY_PORT": str(port)})
    workers = Workers(process, f"http://127.0.0.1:{port}")
    try:
        assert process.stderr is not None
        async with asyncio.timeout(30):
            while b"serving on" not in (line := await process.stderr.readline()):
                assert line, "the supervisor ended without serving"
        # Said once they listen: the port answers at once (no retry), and both workers answer.
        async with aiohttp.ClientSession() as http, http.get(f"{workers.url}/healthz") as response:
            assert response.status == 200
        assert len(await workers.answering_pids(seconds=5)) == 2
        assert len(workers.worker_pids()) == 2  # the preparing child is gone
        assert len(list((tmp_path / "spool").iterdir())) == 2  # one spool directory per worker
    finally:
        assert await workers.stop() == 0


def test_the_port_check_ignores_connections_of_an_earlier_server_in_time_wait():
    """`serve --workers 2` right after a `serve` on the same port: the earlier server's closed
    connections wait in TIME-WAIT, and the port is free all the same (as the workers' own
    sockets find it)."""
    port = free_port()
    server = socket.create_server(("127.0.0.1", port))
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server's end closes first: it is the one left in TIME-WAIT
    time.sleep(0.05)
    client.close()
    server.close()
    time.sleep(0.05)
    check_port(make_settings(proxy_port=port))
