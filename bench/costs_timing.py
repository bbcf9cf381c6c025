#!/usr/bin/env python3
"""Latency of every /costs endpoint on a database holding a realistic ledger.

    .venv/bin/python bench/costs_timing.py [--database-url URL] [--rows 100000] [--calls 20]

Builds a fresh database with the project's Alembic migrations (default: a temporary SQLite file;
with a postgresql:// URL, a temporary database created on that server and dropped afterwards),
fills it through the proxy's own write path (`Store.write_batch` with `UsageEntry` batches of
1,000, as the ledger writer does, so every aggregate equals the ledger), starts the real app on a
loopback port and times each endpoint for the largest campaign: `--calls` sequential requests
after two warm-ups, median and p95 in milliseconds.

Data: 80% of the rows spread over `--campaigns` campaigns x `--sessions` sessions x `--days`
days; 20% in one large campaign, `big`, with 50 x `--sessions` sessions over the same days.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import asyncpg
from aiohttp import web

from costing import schema
from costing.budget import make_budget
from costing.db import create_engine
from costing.money import quantize, to_units
from costing.records import UsageEntry, epoch_us
from costing.settings import Settings
from costing.store import Store
from costing.usage import Usage
from proxy.app import create_app

BIG = "big"
BATCH = 1000
PRICE_IN, PRICE_CACHED, PRICE_OUT = Decimal("0.15e-6"), Decimal("0.075e-6"), Decimal("0.6e-6")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def settings_for(url: str, port: int = 0) -> Settings:
    return Settings(_env_file=None, database_url=url, proxy_port=port,
                    costs_api_token=None, openai_api_key=None, prices_file=None,
                    upstream_base_url="http://127.0.0.1:9", log_level="WARNING")


def refuse_existing_file(url: str) -> None:
    path = Path(url.split(":///", 1)[1])
    if path.exists():
        raise SystemExit(f"{path} exists: give a new file (the benchmark builds a fresh database)")


@asynccontextmanager
async def fresh_database(url: str | None) -> AsyncIterator[str]:
    """A new, empty database URL; temporary ones are removed afterwards."""
    if url is None:
        with tempfile.TemporaryDirectory(prefix="costs-bench-") as tmp:
            yield f"sqlite+aiosqlite:///{tmp}/costs.db"
        return
    parts = urlsplit(url)
    if parts.scheme.startswith("sqlite"):
        refuse_existing_file(url)
        yield url
        return
    if not parts.scheme.startswith("postgres"):
        raise SystemExit("--database-url: sqlite+aiosqlite:///new-file.db or postgresql://user@host:port")
    admin_dsn = urlunsplit(("postgresql", parts.netloc, parts.path if parts.path.strip("/") else "/postgres",
                            "", ""))
    name = f"llmcost_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield urlunsplit(("postgresql", parts.netloc, f"/{name}", "", ""))
    finally:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def entries(rows: int, campaigns: int, sessions: int, days: int, now: datetime) -> list[UsageEntry]:
    rng = random.Random(42)
    big_sessions = sessions * 50
    out = []
    for i in range(rows):
        if i % 5 == 0:
            campaign, session = BIG, f"s-{rng.randrange(big_sessions):05d}"
        else:
            campaign, session = f"c-{rng.randrange(campaigns):04d}", f"s-{rng.randrange(sessions):03d}"
        created = now - timedelta(days=rng.randrange(days), seconds=rng.randrange(86_400))
        prompt, cached, output = rng.randrange(50, 4000), 0, rng.randrange(10, 800)
        if rng.random() < 0.3:
            cached = rng.randrange(0, prompt)
        cost = quantize((prompt - cached) * PRICE_IN + cached * PRICE_CACHED + output * PRICE_OUT)
        out.append(UsageEntry(
            campaign_id=campaign, session_id=session, operation="chat.completions",
            request_model="gpt-4o-mini", response_model="gpt-4o-mini-2024-07-18",
            usage=Usage(input_tokens=prompt, cached_input_tokens=cached, output_tokens=output),
            cost_units=to_units(cost), priced_by_default=False, estimated=False,
            streamed=i % 3 == 0, status_code=200, latency_ms=rng.randrange(200, 4000),
            created_us=epoch_us(created),
            response_id=f"chatcmpl-{i:08d}", api_key_hash="0123456789ab"))
    return out


async def fill(url: str, args: argparse.Namespace, now: datetime) -> tuple[float, list[str]]:
    """Write the ledger; returns the seconds it took and two sessions of the large campaign."""
    settings = settings_for(url)
    await schema.upgrade(settings)
    engine = create_engine(settings.database)
    store = Store(engine, make_budget(Decimal("1.00"), Decimal("5.00")))
    data = entries(args.rows, args.campaigns, args.sessions, args.days, now)
    started = time.perf_counter()
    try:
        for i in range(0, len(data), BATCH):
            inserted = await store.write_batch(data[i:i + BATCH], "bench-holder")
            assert len(inserted) == len(data[i:i + BATCH])
    finally:
        await engine.dispose()
    big_sessions = list(dict.fromkeys(e.session_id for e in data if e.campaign_id == BIG))
    return time.perf_counter() - started, big_sessions[:2]


def endpoints(today: date, sessions: list[str]) -> list[tuple[str, str, str, bytes | None]]:
    """(label, method, path, body) of every /costs operation, on the large campaign."""
    year_ago = today - timedelta(days=365)
    budget = b'{"warning_usd": "50.00", "limit_usd": "100.00"}'
    return [
        ("GET openapi.json", "GET", "/costs/openapi.json", None),
        ("GET campaigns (limit 50)", "GET", "/costs/campaigns", None),
        ("GET campaigns (limit 500)", "GET", "/costs/campaigns?limit=500", None),
        ("GET campaign", "GET", f"/costs/campaigns/{BIG}", None),
        ("GET sessions (by last_seen)", "GET", f"/costs/campaigns/{BIG}/sessions", None),
        ("GET sessions (by cost, +deleted)", "GET",
         f"/costs/campaigns/{BIG}/sessions?order=cost&include_deleted=true", None),
        ("GET sessions (first_seen, 50)", "GET",
         f"/costs/campaigns/{BIG}/sessions?order=first_seen&limit=50", None),
        ("GET session", "GET", f"/costs/campaigns/{BIG}/sessions/{sessions[0]}", None),
        ("DELETE session", "DELETE", f"/costs/campaigns/{BIG}/sessions/{sessions[1]}", None),
        ("GET daily (30 days)", "GET", f"/costs/campaigns/{BIG}/daily", None),
        ("GET daily (366 days)", "GET", f"/costs/campaigns/{BIG}/daily?from={year_ago}&to={today}", None),
        ("PUT budget", "PUT", f"/costs/campaigns/{BIG}/budget", budget),
        ("DELETE budget", "DELETE", f"/costs/campaigns/{BIG}/budget", None),
    ]


async def measure(url: str, calls: int, today: date,
                  sessions: list[str]) -> list[tuple[str, int, float, float, float]]:
    port = free_port()
    app = create_app(settings_for(url, port))
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    results = []
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            for label, method, path, body in endpoints(today, sessions):
                times = []
                size = 0
                for i in range(calls + 2):
                    started = time.perf_counter()
                    async with http.request(method, path, data=body) as response:
                        payload = await response.read()
                        if response.status != 200:
                            raise SystemExit(f"{method} {path}: {response.status} {payload[:300]!r}")
                    if i >= 2:  # two warm-ups
                        times.append((time.perf_counter() - started) * 1000)
                    size = len(payload)
                times.sort()
                p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
                results.append((label, size, statistics.median(times), p95, times[-1]))
    finally:
        await runner.cleanup()
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="postgresql://user@host:port (a temporary database "
                        "is created there and dropped) or sqlite+aiosqlite:///new.db; "
                        "default: a temporary SQLite file")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--campaigns", type=int, default=200)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    now = datetime.now(UTC)
    async with fresh_database(args.database_url) as url:
        backend = "PostgreSQL" if url.startswith("postgres") else "SQLite"
        seconds, sessions = await fill(url, args, now)
        print(f"{backend}: {args.rows:,} ledger rows ({args.campaigns} campaigns x {args.sessions} "
              f"sessions x {args.days} days, plus '{BIG}' with {args.sessions * 50} sessions and "
              f"{args.rows // 5:,} rows) written in {seconds:.1f} s "
              f"({args.rows / seconds:,.0f} rows/s)")
        results = await measure(url, args.calls, now.date(), sessions)
    width = max(len(r[0]) for r in results)
    print(f"{'endpoint':<{width}}  {'bytes':>8}  {'median ms':>9}  {'p95 ms':>7}  {'max ms':>7}")
    for label, size, median, p95, worst in results:
        print(f"{label:<{width}}  {size:>8}  {median:>9.2f}  {p95:>7.2f}  {worst:>7.2f}")


if __name__ == "__main__":
    asyncio.run(main())
