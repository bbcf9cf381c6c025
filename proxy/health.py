"""Liveness, readiness (database reachable and schema current) and the Prometheus endpoint
(behind the /costs access rule: it shows campaign ids and spend)."""

from __future__ import annotations

import asyncio
import os

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from costing import schema
from costing.tasks import uninterrupted
from proxy import access
from proxy.errors import answering
from proxy.peers import all_workers_exposition
from proxy.state import BROWSERS, ENGINE, LEDGER, METRICS, SETTINGS, SPOOL, WORKER


async def healthz(request: web.Request) -> web.Response:
    worker = request.app.get(WORKER)
    if worker is None:
        return web.json_response({"status": "ok"})
    # Under `serve --workers N`: which worker answered (its pid, to find or signal it).
    return web.json_response({"status": "ok", "worker": {"index": worker.index, "pid": os.getpid()}})


async def readyz(request: web.Request) -> web.Response:
    checks: dict[str, str] = {}
    ready = True
    try:
        async with asyncio.timeout(3):
            current, revision, head = await uninterrupted(
                schema.is_current(request.app[SETTINGS], request.app[ENGINE]))
        checks["database"] = "ok"
        if current:
            checks["schema"] = f"current ({head})"
        else:
            ready = False
            checks["schema"] = (f"migrations pending: database at {revision or 'nothing'}, code needs "
                                f"{head}; run `llm-cost-proxy migrate`")
    except Exception as exc:
        ready = False
        checks["database"] = f"unreachable: {type(exc).__name__}"
    ledger = request.app[LEDGER]
    checks["ledger"] = f"{len(ledger)} records waiting" + ("" if ledger.healthy else ", writes failing")
    spool = request.app.get(SPOOL)
    if spool is not None:
        if spool.healthy or spool.usable():
            checks["spool"] = f"{len(spool)} records waiting for a commit"
        else:  # metered requests are refused meanwhile
            ready = False
            checks["spool"] = f"cannot be written: {spool.last_error}"
    body = {"status": "ready" if ready else "not ready", "checks": checks}
    return web.Response(status=200 if ready else 503, body=orjson.dumps(body),
                        content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    """Campaign ids and spend: the /costs access rule, with METRICS_TOKEN (else COSTS_API_TOKEN).
    Under `serve --workers N` the scraped worker adds up every worker's registry."""
    request.app[BROWSERS].check(request)
    access.check(request, request.app[SETTINGS].metrics_access_token, "/metrics", "METRICS_TOKEN")
    registry = request.app[METRICS].registry
    worker = request.app.get(WORKER)
    payload = (generate_latest(registry) if worker is None
               else await all_workers_exposition(worker, registry))
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", answering(healthz))
    app.router.add_get("/readyz", answering(readyz))
    app.router.add_get("/metrics", answering(metrics))
