"""Application factory: builds the aiohttp app from one Settings object.

Long-lived resources (database engine, upstream client, ledger writer, budget refresh) are
created and closed in cleanup contexts, in dependency order: on shutdown the ledger is flushed
before the engine is disposed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from costing import schema
from costing.budget import make_budget
from costing.db import create_engine
from costing.gate import BudgetGate, SessionCosts
from costing.ledger import Ledger
from costing.meter import Meter
from costing.pricing import PriceTable
from costing.settings import Settings
from costing.store import Store
from costing.tasks import finish, pause
from proxy import costs_api, health
from proxy.errors import add_fallback
from proxy.forward import forward
from proxy.metrics import Metrics
from proxy.peers import WorkerSlot, serve_registry
from proxy.state import (
    ENGINE,
    GATE,
    LEDGER,
    METER,
    METRICS,
    SETTINGS,
    STORE,
    UPSTREAM,
    WORKER,
    Upstream,
)

log = logging.getLogger(__name__)

BUDGET_REFRESH_SECONDS = 1.0
GAUGE_REFRESH_SECONDS = 5.0


class SchemaNotCurrent(RuntimeError):
    """The database is behind the code and AUTO_MIGRATE=false."""


def holder_id() -> str:
    """Identifies this process's budget leases: host, pid and a random part (pids get reused)."""
    return f"{socket.gethostname()[:30]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


async def _database(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if settings.auto_migrate:
        await schema.upgrade(settings)
    engine = create_engine(settings.database)
    try:
        if not settings.auto_migrate:
            current, revision, head = await schema.is_current(settings, engine)
            if not current:
                raise SchemaNotCurrent(
                    f"the database schema is at {revision or 'nothing'}, the code needs {head}: "
                    "run `llm-cost-proxy migrate` (or set AUTO_MIGRATE=true)")
        app[ENGINE] = engine
        app[STORE] = Store(engine, make_budget(settings.cost_warning_threshold_usd,
                                               settings.cost_limit_threshold_usd))
        yield
    finally:
        await engine.dispose()


async def _upstream(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    timeout = aiohttp.ClientTimeout(total=None, connect=settings.upstream_connect_timeout_seconds,
                                    sock_read=settings.upstream_read_timeout_seconds)
    client = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True),
        timeout=timeout, auto_decompress=True,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    app[UPSTREAM] = Upstream(client, settings.upstream_base_url)
    yield
    await client.close()


async def _metering(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store = app[STORE]
    metrics = app[METRICS]
    holder = holder_id()
    ledger = Ledger(store, holder, flush_interval=settings.ledger_flush_interval_seconds,
                    batch_size=settings.ledger_batch_size,
                    max_records=settings.ledger_buffer_max_records)
    gate = BudgetGate(store, holder, store.default_budget, lease_seconds=settings.budget_lease_seconds,
                      lease_fraction=settings.budget_lease_fraction,
                      fail_closed=settings.budget_fail_closed, write_lock=ledger.writing)
    prices = PriceTable.load(default_per_1k_prompt=settings.openai_price_per_1k_prompt_tokens,
                             default_per_1k_completion=settings.openai_price_per_1k_completion_tokens,
                             prices_file=settings.prices_file)
    ledger.listeners += [gate.on_flushed, metrics.on_flushed]
    ledger.error_listeners.append(metrics.on_flush_error)
    ledger.drop_listeners.append(lambda _entry: metrics.dropped.inc())
    metrics.queue_depth.set_function(lambda: len(ledger))
    app[LEDGER] = ledger
    app[GATE] = gate
    app[METER] = Meter(prices, gate, ledger, SessionCosts(store),
                       default_max_output_tokens=settings.budget_default_max_output_tokens)
    ledger.start()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(gate.run(BUDGET_REFRESH_SECONDS, stop), name="budget-refresh"),
             asyncio.create_task(_refresh_gauges(app, stop), name="budget-gauges")]
    yield
    stop.set()
    await finish(tasks, grace_seconds=2 * gate.db_timeout)
    await app[METER].sessions.close()
    left = await ledger.close(settings.shutdown_timeout_seconds)
    if left:
        metrics.dropped.inc(left)


async def _refresh_gauges(app: web.Application, stop: asyncio.Event) -> None:
    metrics = app[METRICS]
    while True:
        try:
            metrics.budgets.rows = await app[STORE].budget_gauges(metrics.campaign.limit)
        except Exception as exc:
            log.debug("budget gauges not refreshed: %s", exc)
        if await pause(stop, GAUGE_REFRESH_SECONDS):
            return


async def _worker_metrics(app: web.Application) -> AsyncIterator[None]:
    """A worker's own registry on its private socket, for the worker that answers a scrape."""
    runner = await serve_registry(app[WORKER], app[METRICS].registry)
    yield
    await runner.cleanup()


def server_options(settings: Settings) -> dict[str, Any]:
    """aiohttp server options, shared by `serve` and the tests' runner.

    handler_cancellation: a client that leaves while the upstream is silent (a reasoning model
    thinking) cancels the upstream call at once, not at the next chunk; what was used is still
    recorded, in the handler's `finally`.
    """
    return {"access_log": None, "handler_cancellation": True,
            "shutdown_timeout": settings.shutdown_timeout_seconds}


def create_app(settings: Settings, *, registry: CollectorRegistry | None = None,
               worker: WorkerSlot | None = None) -> web.Application:
    """The proxy; `worker` when it is one of the processes of `serve --workers N`."""
    app = web.Application(client_max_size=settings.max_request_body_bytes)
    app[SETTINGS] = settings
    app[METRICS] = Metrics(registry if registry is not None else CollectorRegistry(),
                           settings.metrics_max_campaigns)
    app.cleanup_ctx.extend([_database, _upstream, _metering])
    if worker is not None:
        app[WORKER] = worker
        app.cleanup_ctx.append(_worker_metrics)
    app.router.add_route("*", "/v1/{tail:.*}", forward)
    health.setup(app)
    costs_api.setup(app)
    add_fallback(app)
    return app
