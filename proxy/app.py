"""Application factory: builds the aiohttp app from one Settings object.

Long-lived resources (database engine, upstream client, ledger writer, budget refresh) are
created and closed in cleanup contexts, in dependency order: on shutdown the ledger is flushed
before the engine is disposed.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

from costing import schema
from costing.budget import make_budget
from costing.db import create_engine, wait_until_reachable
from costing.gate import BudgetGate, SessionCosts
from costing.ledger import Ledger
from costing.meter import Meter
from costing.pricing import PriceTable
from costing.settings import Settings
from costing.spool import Spool
from costing.store import Store
from costing.tasks import finish, pause
from proxy import costs_api, feed, health, realtime
from proxy.browsers import BrowserRule
from proxy.errors import add_fallback
from proxy.forward import forward
from proxy.keys import ClientKeys
from proxy.logs import server_logger
from proxy.metrics import Metrics
from proxy.peers import WorkerSlot, serve_registry
from proxy.state import (
    BROWSERS,
    CLIENT_KEYS,
    ENGINE,
    GATE,
    LEDGER,
    METER,
    METRICS,
    SETTINGS,
    SPOOL,
    STORE,
    TRACER,
    UPSTREAM,
    WORKER,
    Upstream,
)
from tracing.exporter import ExportConfig, Exporter, make_tracer, server_of

log = logging.getLogger(__name__)

BUDGET_REFRESH_SECONDS = 1.0
GAUGE_REFRESH_SECONDS = 5.0


class SchemaNotCurrent(RuntimeError):
    """The database is behind the code and AUTO_MIGRATE=false."""


def holder_id() -> str:
    """Identifies this process's budget leases: host, pid and a random part (pids get reused)."""
    return f"{socket.gethostname()[:30]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


async def _spool(app: web.Application) -> AsyncIterator[None]:
    """This process's spool directory, opened first: an unusable LEDGER_SPOOL_DIR stops the start
    with one line before anything else happens. Closed last, after the final flush: emptied and
    removed when every record was committed, else left for the next start to replay."""
    settings = app[SETTINGS]
    spool = open_spool(settings)
    if spool is None:
        yield
        return
    app[SPOOL] = spool
    stop = asyncio.Event()
    syncing = asyncio.create_task(spool.sync_loop(stop), name="spool-fsync")
    try:
        yield
    finally:
        stop.set()
        await syncing
        spool.close()


def open_spool(settings: Settings) -> Spool | None:
    """This process's spool, opened (None without LEDGER_SPOOL_DIR); SpoolUnavailable, one
    line, when the directory cannot be used."""
    if settings.ledger_spool_dir is None:
        return None
    spool = Spool(settings.ledger_spool_dir, settings.spool_fsync_seconds)
    spool.open()
    return spool


async def open_database(settings: Settings) -> AsyncEngine:
    """The engine once the database answers (waited for up to DATABASE_CONNECT_TIMEOUT_SECONDS)
    with its schema at head: migrated with AUTO_MIGRATE, else checked (SchemaNotCurrent)."""
    await wait_until_reachable(settings.database, settings.database_connect_timeout_seconds)
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
    except BaseException:
        await engine.dispose()
        raise
    return engine


def load_prices(settings: Settings) -> PriceTable:
    """The price table: the library's data, overridden by PRICES_FILE (PriceTableError)."""
    return PriceTable.load(default_per_1k_prompt=settings.openai_price_per_1k_prompt_tokens,
                           default_per_1k_completion=settings.openai_price_per_1k_completion_tokens,
                           prices_file=settings.prices_file)


async def _database(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    engine = await open_database(settings)
    try:
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
    app[UPSTREAM] = Upstream(client, settings.upstream_base)
    yield
    await client.close()


async def _metering(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store = app[STORE]
    metrics = app[METRICS]
    holder = holder_id()
    spool = app.get(SPOOL)
    ledger = Ledger(store, holder, flush_interval=settings.ledger_flush_interval_seconds,
                    batch_size=settings.ledger_batch_size,
                    max_records=settings.ledger_buffer_max_records, spool=spool)
    if spool is not None:
        # What killed processes left, written before the budget gate reads any spend and before
        # the server listens (cleanup contexts run before the site starts).
        ledger.listeners.append(metrics.on_flushed)
        replayed, torn = await ledger.replay()
        metrics.spool_replayed.inc(replayed)
        metrics.spool_torn.inc(torn)
        ledger.listeners.clear()
        metrics.spooled.set_function(lambda: len(spool))
        metrics.spool_write_errors.set_function(lambda: spool.write_errors)
    gate = BudgetGate(store, holder, store.default_budget, lease_seconds=settings.budget_lease_seconds,
                      lease_fraction=settings.budget_lease_fraction,
                      fail_closed=settings.budget_fail_closed, write_lock=ledger.writing)
    prices = load_prices(settings)
    ledger.listeners += [gate.on_flushed, metrics.on_flushed]
    ledger.error_listeners.append(metrics.on_flush_error)
    ledger.drop_listeners.append(lambda _entry: metrics.dropped.inc())
    ledger.known_listeners.append(metrics.known.inc)
    metrics.queue_depth.set_function(lambda: len(ledger))
    app[LEDGER] = ledger
    app[GATE] = gate
    sessions = SessionCosts(store, write_lock=ledger.writing)
    ledger.listeners.append(sessions.on_flushed)
    meter = app[METER] = Meter(prices, gate, ledger, sessions,
                               default_max_output_tokens=settings.budget_default_max_output_tokens,
                               background_hold_seconds=settings.background_hold_seconds)
    # After the gate's and the sessions' books: a background final state is reported (the live
    # feed) once written, with the totals that include it.
    ledger.listeners.append(meter.on_flushed)
    ledger.start()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(gate.run(BUDGET_REFRESH_SECONDS, stop), name="budget-refresh"),
             asyncio.create_task(_refresh_gauges(app, stop), name="budget-gauges"),
             asyncio.create_task(meter.background.keep_saved(store, stop),
                                 name="background-creators")]
    yield
    stop.set()
    await finish(tasks, grace_seconds=2 * gate.db_timeout)
    await app[METER].sessions.close()
    left = await ledger.close(settings.shutdown_timeout_seconds)
    if left and spool is None:  # with a spool they are kept for the next start
        metrics.dropped.inc(left)


async def _tracing(app: web.Application) -> AsyncIterator[None]:
    """Spans of metered calls, exported over OTLP when an endpoint is set; flushed at shutdown
    within OTEL_BSP_EXPORT_TIMEOUT (and the shutdown timeout)."""
    settings = app[SETTINGS]
    config = ExportConfig.from_settings(settings)
    if config is None:
        yield
        return
    metrics = app[METRICS]
    tracer = make_tracer(settings, config, metrics.spans_dropped.inc, app[METER].standing)
    exporter = Exporter(tracer, config, server_of(settings.upstream_base_url),
                        on_exported=metrics.spans_exported.inc, on_dropped=metrics.spans_dropped.inc,
                        scope_version=_version())
    exporter.start()
    app[TRACER] = tracer
    yield
    await exporter.close(min(config.export_timeout, settings.shutdown_timeout_seconds))


def _version() -> str:
    try:
        return importlib.metadata.version("llm-cost-proxy")
    except importlib.metadata.PackageNotFoundError:
        return ""


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
    recorded, in the handler's `finally`. logger: aiohttp's, filtered so that a request its
    parser refuses is logged without its bytes (a header line may hold a key; see proxy.logs).
    """
    return {"access_log": None, "handler_cancellation": True, "logger": server_logger(),
            "shutdown_timeout": settings.shutdown_timeout_seconds}


def create_app(settings: Settings, *, registry: CollectorRegistry | None = None,
               worker: WorkerSlot | None = None) -> web.Application:
    """The proxy; `worker` when it is one of the processes of `serve --workers N`."""
    app = web.Application(client_max_size=settings.max_request_body_bytes)
    app[SETTINGS] = settings
    app[CLIENT_KEYS] = ClientKeys.from_settings(settings)
    app[BROWSERS] = BrowserRule.from_settings(settings)
    app[METRICS] = Metrics(registry if registry is not None else CollectorRegistry(),
                           settings.metrics_max_campaigns)
    app[TRACER] = None
    app.cleanup_ctx.extend([_spool, _database, _upstream, _metering, _tracing])
    if worker is not None:
        app[WORKER] = worker
        app.cleanup_ctx.append(_worker_metrics)
    realtime.setup(app)  # after the upstream client: its sockets are ended before it is closed
    app.router.add_route("*", "/v1/{tail:.*}", forward)
    health.setup(app)
    feed.setup(app)
    costs_api.setup(app, events=feed.events)
    add_fallback(app)
    return app
