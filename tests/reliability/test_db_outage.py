"""Database outage under steady traffic: PostgreSQL (a throwaway cluster of this module's own)
is stopped with `pg_ctl stop -m fast` for 10 s while a client sends 20 requests a second, then
started again.

- fail-open (the default): every request is answered 200 during the outage, its usage waits in
  the ledger buffer and is written when the database returns; afterwards every answered request
  is in the ledger (matched on the upstream response id), the aggregates equal the ledger, the
  records-dropped counter is 0 and /readyz is ready again.
- fail-closed (BUDGET_FAIL_CLOSED=true): once the proxy sees the database is away, metered
  requests are refused with 503 in OpenAI's error shape; what was answered is still recorded.
- buffer full (LEDGER_BUFFER_MAX_RECORDS tiny): rather than serve requests it could not record,
  the proxy refuses them with 503 once the buffer is full; nothing is dropped.
- stopped during an outage: what the final flush could not write stays in the spool, and the next
  start writes it.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import PgCluster, Proxy, free_port, make_settings, new_spool_dir, pg_database
from fakeupstream import FakeUpstream
from ledger_check import assert_aggregates_match_ledger, ledger_rows
from prometheus_client import CollectorRegistry

from costing import schema

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(120)]

RATE = 20.0  # requests per second, sent on a fixed schedule whatever the answers take
OUTAGE_SECONDS = 10.0
SESSIONS = ("s0", "s1", "s2")
STREAM_ID = re.compile(rb'"id":"([^"]+)"')
ERROR_KEYS = {"message", "type", "param", "code"}


@dataclass
class Call:
    index: int
    campaign: str
    stream: bool
    started: float
    finished: float = 0.0
    status: int = 0  # 0: no HTTP answer at all
    response_id: str | None = None
    error: dict[str, Any] | None = None
    retry_after: str | None = None


@dataclass
class Traffic:
    """Open-loop load: one request every 1/RATE s, each in its own task; every 4th streamed."""

    url: str
    campaign: str = "outage"
    calls: list[Call] = field(default_factory=list)
    late_campaign_from: float | None = None  # from then on every 5th call uses a new campaign

    def campaign_for(self, index: int, now: float) -> str:
        if self.late_campaign_from is not None and now >= self.late_campaign_from and index % 5 == 0:
            return self.campaign + "-late"
        return self.campaign

    async def one(self, http: aiohttp.ClientSession, call: Call) -> None:
        body: dict[str, Any] = {"model": "gpt-4o-mini", "max_tokens": 64,
                                "messages": [{"role": "user", "content": f"turn {call.index}"}]}
        if call.stream:
            body["stream"] = True
        headers = {"X-Campaign-Id": call.campaign, "X-Session-Id": SESSIONS[call.index % len(SESSIONS)],
                   "Authorization": "Bearer sk-outage"}
        try:
            async with http.post(f"{self.url}/v1/chat/completions", json=body,
                                 headers=headers) as response:
                raw = await response.read()
                call.status = response.status
                call.retry_after = response.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError):
            call.finished = time.monotonic()
            return
        call.finished = time.monotonic()
        if call.status == 200:
            if call.stream:
                found = STREAM_ID.search(raw)
                call.response_id = found.group(1).decode() if found else None
            else:
                call.response_id = orjson.loads(raw)["id"]
        else:
            call.error = orjson.loads(raw)

    async def run(self, stop: asyncio.Event) -> None:
        tasks: list[asyncio.Task[None]] = []
        timeout = aiohttp.ClientTimeout(total=20)
        async with aiohttp.ClientSession(timeout=timeout,
                                         connector=aiohttp.TCPConnector(limit=0)) as http:
            next_at = time.monotonic()
            while not stop.is_set():
                index, now = len(self.calls), time.monotonic()
                call = Call(index, self.campaign_for(index, now), index % 4 == 3, now)
                self.calls.append(call)
                tasks.append(asyncio.create_task(self.one(http, call)))
                next_at += 1 / RATE
                await asyncio.sleep(max(next_at - time.monotonic(), 0))
            await asyncio.gather(*tasks)

    def between(self, start: float, end: float) -> list[Call]:
        """Calls sent and answered entirely within [start, end]."""
        return [c for c in self.calls if c.started >= start and c.finished and c.finished <= end]


@dataclass
class Outage:
    down_at: float = 0.0  # pg_ctl stop returned: the server is gone
    up_at: float = 0.0  # pg_ctl start returned: the server accepts connections
    ready_during: int = 0  # /readyz status in the middle of the outage
    ready_again_after: float | None = None  # seconds from up_at to the first 200 from /readyz


async def readyz(url: str) -> int:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http, \
            http.get(f"{url}/readyz") as response:
        return response.status


async def run_outage(proxy: Proxy, cluster: PgCluster, traffic: Traffic, *, before: float = 2.0,
                     outage: float = OUTAGE_SECONDS, after: float = 2.0) -> Outage:
    """Traffic throughout; the database stopped for `outage` seconds after `before` seconds."""
    result = Outage()
    stop = asyncio.Event()
    load = asyncio.create_task(traffic.run(stop))
    try:
        await asyncio.sleep(before)
        await asyncio.to_thread(cluster.stop)
        result.down_at = time.monotonic()
        if traffic.late_campaign_from is not None:
            traffic.late_campaign_from = result.down_at
        await asyncio.sleep(outage / 2)
        result.ready_during = await readyz(proxy.url)
        await asyncio.sleep(result.down_at + outage - time.monotonic())
        await asyncio.to_thread(cluster.start)
        result.up_at = time.monotonic()
        while time.monotonic() - result.up_at < 15:
            if await readyz(proxy.url) == 200:
                result.ready_again_after = time.monotonic() - result.up_at
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(max(result.up_at + after - time.monotonic(), 0))
    finally:
        stop.set()
        await load
    return result


@asynccontextmanager
async def outage_proxy(cluster: PgCluster, fake: FakeUpstream, **values: Any) -> AsyncIterator[Proxy]:
    """A migrated database on the module's own cluster and an in-process proxy on it."""
    async with pg_database(cluster) as url:
        await schema.upgrade(make_settings(database_url=url))
        settings = make_settings(database_url=url, upstream_base_url=fake.url, proxy_port=free_port(),
                                 ledger_flush_interval_seconds=0.2, shutdown_timeout_seconds=5,
                                 **values)
        proxy = Proxy(settings, CollectorRegistry())
        await proxy.start()
        try:
            yield proxy
        finally:
            try:
                if not await asyncio.to_thread(_running, cluster):
                    await asyncio.to_thread(cluster.start)  # a failed test left it stopped
            finally:
                await proxy.stop()


def _running(cluster: PgCluster) -> bool:
    try:
        with socket.create_connection((cluster.host, cluster.port), timeout=1):
            return True
    except OSError:
        return False


def metric(proxy: Proxy, name: str) -> float:
    value = proxy.registry.get_sample_value(name)
    return float(value or 0.0)


async def assert_every_answer_recorded(proxy: Proxy, traffic: Traffic) -> int:
    """Every 200 the client received is in the ledger, once; the aggregates equal the ledger."""
    await proxy.flush(within=20)
    answered = [c.response_id for c in traffic.calls if c.status == 200]
    assert None not in answered
    rows = await ledger_rows(proxy.engine)
    recorded = [r.response_id for r in rows]
    assert len(recorded) == len(set(recorded))
    assert set(recorded) == set(answered), (
        f"missing {len(set(answered) - set(recorded))}, unexpected {len(set(recorded) - set(answered))}")
    await assert_aggregates_match_ledger(proxy.engine)
    assert metric(proxy, "llm_ledger_records_dropped_total") == 0
    assert metric(proxy, "llm_ledger_records_written_total") == len(rows)
    return len(rows)


def assert_refusal_shape(call: Call) -> None:
    assert call.status == 503
    assert call.error is not None and set(call.error) == {"error"}
    assert set(call.error["error"]) == ERROR_KEYS
    assert call.error["error"]["type"] == "service_unavailable"
    assert call.error["error"]["code"] == "cost_ledger_unavailable"
    assert call.retry_after == "1"


async def test_fail_open_outage_keeps_serving_and_loses_nothing(owned_pg_cluster, fake):
    async with outage_proxy(owned_pg_cluster, fake) as proxy:
        # A campaign first seen during the outage: its budget cannot be read, and fail-open
        # admits it anyway (on the default budget).
        traffic = Traffic(proxy.url, late_campaign_from=float("inf"))
        outage = await run_outage(proxy, owned_pg_cluster, traffic)
        during = traffic.between(outage.down_at, outage.up_at)
        assert any(c.campaign == "outage-late" for c in during)
        statuses = sorted({c.status for c in traffic.calls})
        assert statuses == [200], f"statuses seen: {statuses}"
        assert len(during) >= RATE * OUTAGE_SECONDS * 0.8, len(during)
        assert metric(proxy, "llm_ledger_flush_errors_total") > 0  # the writer did hit the outage
        assert outage.ready_during == 503
        assert outage.ready_again_after is not None, "/readyz did not recover"
        written = await assert_every_answer_recorded(proxy, traffic)
        print(f"\nfail-open outage: {len(traffic.calls)} requests, {len(during)} answered during the "
              f"{OUTAGE_SECONDS:.0f} s outage, {written} ledger rows, 0 dropped, "
              f"/readyz ready {outage.ready_again_after:.2f} s after restart")


async def test_fail_closed_outage_refuses_with_503_and_loses_nothing(owned_pg_cluster, fake):
    async with outage_proxy(owned_pg_cluster, fake, budget_fail_closed=True) as proxy:
        traffic = Traffic(proxy.url)
        outage = await run_outage(proxy, owned_pg_cluster, traffic)
        # The proxy notices at its first failed write (one flush interval, 0.2 s) or lease
        # request; give it one second, then every metered request must be refused until
        # the database is back.
        refused_window = traffic.between(outage.down_at + 1.0, outage.up_at)
        assert len(refused_window) >= RATE * (OUTAGE_SECONDS - 1) * 0.8
        for call in refused_window:
            assert_refusal_shape(call)
        assert {c.status for c in traffic.calls} <= {200, 503}
        # Service resumes once the database is back: the writer retries at least every second
        # (MAX_BACKOFF_SECONDS), and its first successful write ends the refusals.
        resumed = [c for c in traffic.calls if c.started > outage.up_at and c.status == 200]
        assert resumed, "no request succeeded after the database came back"
        first_ok = min(c.started for c in resumed) - outage.up_at
        assert first_ok < 2.0
        assert all(c.status == 200 for c in traffic.calls if c.started > outage.up_at + first_ok)
        assert outage.ready_again_after is not None
        written = await assert_every_answer_recorded(proxy, traffic)
        refused = sum(c.status == 503 for c in traffic.calls)
        served_down = sum(c.status == 200 for c in traffic.between(outage.down_at, outage.up_at))
        print(f"\nfail-closed outage: {len(traffic.calls)} requests, {refused} refused with 503, "
              f"{written} answered and all recorded ({served_down} of them sent after the stop, "
              f"before the proxy saw a write fail); first 200 {first_ok:.2f} s after restart")


async def test_fail_closed_refuses_unknown_campaign_during_outage(owned_pg_cluster, fake):
    async with outage_proxy(owned_pg_cluster, fake, budget_fail_closed=True) as proxy:
        await asyncio.to_thread(owned_pg_cluster.stop)
        try:
            traffic = Traffic(proxy.url, campaign="never-seen")
            call = Call(0, "never-seen", False, time.monotonic())
            traffic.calls.append(call)
            async with aiohttp.ClientSession() as http:
                await traffic.one(http, call)
            assert_refusal_shape(call)
            assert fake.hits("/chat/completions") == 0  # nothing forwarded
        finally:
            await asyncio.to_thread(owned_pg_cluster.start)


async def test_fail_open_admits_a_campaign_first_seen_during_an_outage_whatever_it_spends(
        owned_pg_cluster, fake):
    """Its budget cannot be read, so nothing is known of it: not even the default limit applies
    (its own may be far larger), and every call is admitted until the database is back."""
    async with outage_proxy(owned_pg_cluster, fake, cost_warning_threshold_usd=Decimal(0),
                            cost_limit_threshold_usd=Decimal("0.000001")) as proxy:
        await asyncio.to_thread(owned_pg_cluster.stop)
        try:
            traffic = Traffic(proxy.url, campaign="never-seen")
            async with aiohttp.ClientSession() as http:
                for n in range(8):  # far past the default limit in reservations and in spend
                    call = Call(n, "never-seen", False, time.monotonic())
                    traffic.calls.append(call)
                    await traffic.one(http, call)
            assert [c.status for c in traffic.calls] == [200] * 8
        finally:
            await asyncio.to_thread(owned_pg_cluster.start)
        await assert_every_answer_recorded(proxy, traffic)


async def test_buffer_full_refuses_instead_of_dropping(owned_pg_cluster, fake):
    """LEDGER_BUFFER_MAX_RECORDS=100 (its minimum) and a 7 s outage at 20 req/s (140 requests):
    the first ~100 are served and buffered, the rest refused with 503; nothing is dropped."""
    limit = 100
    async with outage_proxy(owned_pg_cluster, fake, ledger_buffer_max_records=limit) as proxy:
        traffic = Traffic(proxy.url)
        outage = await run_outage(proxy, owned_pg_cluster, traffic, before=1.0, outage=7.0,
                                  after=3.0)
        during = traffic.between(outage.down_at, outage.up_at)
        served = [c for c in during if c.status == 200]
        refused = [c for c in during if c.status != 200]
        assert refused, "the buffer never filled"
        for call in refused:
            assert_refusal_shape(call)
        # Served calls during the outage all sit in the buffer (a few sent just before the stop
        # may too): never more than the buffer holds.
        assert len(served) < limit
        assert max(c.index for c in served) < min(c.index for c in refused)  # full, then refusing
        assert metric(proxy, "llm_ledger_records_dropped_total") == 0
        # The buffer drains within a retry (at most 1 s) of the database's return; then requests
        # are served again.
        resumed = [c for c in traffic.calls if c.started > outage.up_at and c.status == 200]
        assert resumed and min(c.started for c in resumed) - outage.up_at < 2.0
        written = await assert_every_answer_recorded(proxy, traffic)
        print(f"\nbuffer full (max {limit}): {len(during)} requests during the outage, "
              f"{len(served)} served and buffered, {len(refused)} refused with 503, "
              f"{written} ledger rows, 0 dropped")


async def test_a_stop_during_an_outage_leaves_its_records_to_the_next_start(owned_pg_cluster, fake):
    """SIGTERM's final flush cannot reach the database: the records stay in the spool
    (LEDGER_SPOOL_DIR), and the next start writes them before it serves."""
    spool = new_spool_dir()
    async with pg_database(owned_pg_cluster) as url:
        await schema.upgrade(make_settings(database_url=url))

        def settings() -> Any:
            return make_settings(database_url=url, upstream_base_url=fake.url, proxy_port=free_port(),
                                 shutdown_timeout_seconds=2, ledger_spool_dir=spool)

        proxy = Proxy(settings(), CollectorRegistry())
        await proxy.start()
        client = proxy.client(campaign="stopped")
        messages = [{"role": "user", "content": "hi"}]
        answered = [(await client.chat.completions.create(model="gpt-4o-mini", messages=messages)).id]
        await proxy.flush()
        await asyncio.to_thread(owned_pg_cluster.stop)
        try:
            for _ in range(3):
                answer = await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
                answered.append(answer.id)
            stream = await client.chat.completions.create(model="gpt-4o-mini", messages=messages,
                                                          stream=True)
            chunks = [chunk async for chunk in stream]  # read to its end
            answered.append(chunks[0].id)
            await proxy.stop()
        finally:
            await asyncio.to_thread(owned_pg_cluster.start)
        [left] = [p for p in spool.iterdir() if not p.name.startswith(".")]
        again = Proxy(settings(), CollectorRegistry())
        await again.start()
        try:
            rows = await ledger_rows(again.engine)
            assert sorted(r.response_id for r in rows) == sorted(answered)
            await assert_aggregates_match_ledger(again.engine)
            assert not left.exists()
        finally:
            await again.stop()
