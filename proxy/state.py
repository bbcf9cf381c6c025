"""Typed application state keys: everything long-lived lives here, created in cleanup contexts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from costing.feed import Feed
from costing.gate import BudgetGate
from costing.ledger import Ledger
from costing.meter import Meter
from costing.settings import Settings
from costing.spool import Spool
from costing.store import Store
from proxy.browsers import BrowserRule
from proxy.keys import ClientKeys
from proxy.metrics import Metrics
from proxy.peers import WorkerSlot
from tracing.recorder import Tracer

if TYPE_CHECKING:
    from proxy.realtime import Session  # imports this module


@dataclass(slots=True)
class Upstream:
    """The pooled upstream client and where it points."""

    client: aiohttp.ClientSession
    base_url: str


SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
ENGINE = web.AppKey("engine", AsyncEngine)
STORE = web.AppKey("store", Store)
UPSTREAM = web.AppKey("upstream", Upstream)
LEDGER = web.AppKey("ledger", Ledger)
GATE = web.AppKey("gate", BudgetGate)
METER = web.AppKey("meter", Meter)
# None unless PROXY_API_KEYS is set; a plain value built from the settings, nothing to close.
CLIENT_KEYS: web.AppKey[ClientKeys | None] = web.AppKey("client_keys")
# Origin and Host rules against web pages (proxy/browsers.py); a plain value from the settings.
BROWSERS = web.AppKey("browsers", BrowserRule)
FEED = web.AppKey("feed", Feed)
SPOOL = web.AppKey("spool", Spool)
# None when tracing is off (no OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT): the request path then
# skips it with one test.
TRACER: web.AppKey[Tracer | None] = web.AppKey("tracer")
# The open Realtime sockets, closed at shutdown (proxy/realtime.py: setup).
RELAYS: web.AppKey[set[Session]] = web.AppKey("realtime_sessions")
WORKER = web.AppKey("worker", WorkerSlot)  # set only under `serve --workers N`
