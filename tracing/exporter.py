"""The background side of tracing: take ended spans from the tracer's queue in batches, encode
them as OTLP/protobuf and POST them to the receiver, retrying what may succeed later.

Nothing here runs on a request's path. A receiver that is down, slow or failing only makes the
queue fill; past its bound the tracer drops spans and counts them. Encoding runs in slices with
the event loop let through between them, and compression in a thread (zlib lets go of the GIL).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import aiohttp

from costing.settings import Settings
from tracing import otlp
from tracing.recorder import Tracer
from tracing.sampler import make_sampler
from tracing.spans import Span

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503, 504})
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 8.0
ENCODE_SLICE = 64  # spans built between two yields to the event loop (~0.5 ms)
CONTENT_TYPE = "application/x-protobuf"
# zlib's fastest level: span batches still shrink ~10x (ids and numbers are most of their bytes),
# for about a third of level 6's CPU.
GZIP_LEVEL = 1


@dataclass(frozen=True, slots=True)
class ExportConfig:
    """The OTEL_* settings the exporter uses, resolved (traces-specific ones win)."""

    url: str
    headers: dict[str, str]
    timeout: float  # seconds per POST
    gzip: bool
    schedule_delay: float  # seconds between exports when no batch is full
    export_timeout: float  # seconds a batch may take, retries included
    max_queue: int
    batch_size: int
    service_name: str
    resource_attributes: list[tuple[str, str]]

    @classmethod
    def from_settings(cls, settings: Settings) -> ExportConfig | None:
        url = settings.traces_url
        if url is None:
            return None
        headers = settings.otel_exporter_otlp_traces_headers or settings.otel_exporter_otlp_headers
        timeout = settings.otel_exporter_otlp_traces_timeout or settings.otel_exporter_otlp_timeout or 10_000
        compression = (settings.otel_exporter_otlp_traces_compression
                       or settings.otel_exporter_otlp_compression or "gzip")
        return cls(url, dict(parse_pairs(headers.get_secret_value() if headers else "")), timeout / 1000,
                   compression == "gzip", settings.otel_bsp_schedule_delay / 1000,
                   settings.otel_bsp_export_timeout / 1000, settings.otel_bsp_max_queue_size,
                   min(settings.otel_bsp_max_export_batch_size, settings.otel_bsp_max_queue_size),
                   settings.otel_service_name, parse_pairs(settings.otel_resource_attributes))


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """`k1=v1,k2=v2` (W3C Baggage style, values percent-decoded): OTEL_EXPORTER_OTLP_HEADERS and
    OTEL_RESOURCE_ATTRIBUTES; malformed members are skipped, as the specification says."""
    pairs = []
    for member in text.split(","):
        key, sep, value = member.partition("=")
        if sep and key.strip():
            pairs.append((unquote(key.strip()), unquote(value.strip())))
    return pairs


def server_of(base_url: str) -> tuple[str, int]:
    """`server.address` and `server.port` of the upstream the proxy forwards to."""
    parts = urlsplit(base_url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def make_tracer(settings: Settings, config: ExportConfig, on_drop: Callable[[int], None],
                standing: Callable[[str], tuple[int, object]] | None = None) -> Tracer:
    return Tracer(make_sampler(settings.otel_traces_sampler, settings.otel_traces_sampler_arg),
                  max_queue=config.max_queue, batch_size=config.batch_size,
                  capture_content=settings.otel_instrumentation_genai_capture_message_content,
                  on_drop=on_drop, standing=standing)  # type: ignore[arg-type]


class Exporter:
    def __init__(self, tracer: Tracer, config: ExportConfig, server: tuple[str, int], *,
                 on_exported: Callable[[int], None], on_dropped: Callable[[int], None],
                 scope_version: str = "") -> None:
        self.tracer = tracer
        self.config = config
        self.on_exported = on_exported
        self.on_dropped = on_dropped
        self.encoder = otlp.Encoder(otlp.resource_attributes(config.service_name, config.resource_attributes),
                                    scope_version, server)
        self.headers = {**config.headers, "Content-Type": CONTENT_TYPE}
        if config.gzip:
            self.headers["Content-Encoding"] = "gzip"
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: aiohttp.ClientSession | None = None
        self._failing = False

    def start(self) -> None:
        self._client = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.timeout),
            connector=aiohttp.TCPConnector(limit=4), cookie_jar=aiohttp.DummyCookieJar())
        self._task = asyncio.create_task(self._run(), name="trace-exporter")

    async def close(self, within: float) -> None:
        """Send what is queued (within `within` seconds), then stop; what is left is dropped."""
        self._stop.set()
        self.tracer.full.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), within)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        left = len(self.tracer.queue)
        if left:
            self.tracer.queue.clear()
            self.on_dropped(left)
        if self._client is not None:
            await self._client.close()

    async def _run(self) -> None:
        tracer = self.tracer
        while True:
            if not self._stop.is_set() and len(tracer.queue) < self.config.batch_size:
                with contextlib.suppress(TimeoutError):  # woken early by a full batch or close()
                    await asyncio.wait_for(tracer.full.wait(), self.config.schedule_delay)
            while tracer.queue:
                batch = tracer.take(self.config.batch_size)
                try:
                    await self.export(batch)
                except asyncio.CancelledError:
                    self.on_dropped(len(batch))
                    raise
                except Exception:  # never let one bad batch stop tracing
                    log.exception("trace export failed")
                    self.on_dropped(len(batch))
                if not self._stop.is_set() and len(tracer.queue) < self.config.batch_size:
                    break
            if self._stop.is_set() and not tracer.queue:
                return

    async def encode(self, spans: list[Span]) -> bytes:
        """The request body: spans written in slices, the event loop let through between them."""
        encoded: list[bytes] = []
        for start in range(0, len(spans), ENCODE_SLICE):
            if start:
                await asyncio.sleep(0)
            encoded += map(self.encoder.span, spans[start:start + ENCODE_SLICE])
        data = self.encoder.request(encoded)
        if self.config.gzip:
            data = await asyncio.to_thread(gzip.compress, data, GZIP_LEVEL)
        return data

    async def export(self, spans: list[Span]) -> bool:
        """POST one batch; retried with backoff on 429/502/503/504 and connection errors until
        OTEL_BSP_EXPORT_TIMEOUT; counted as exported or dropped."""
        body = await self.encode(spans)
        assert self._client is not None
        deadline = time.monotonic() + self.config.export_timeout
        backoff = FIRST_BACKOFF_SECONDS
        while True:
            retry_after = None
            try:
                async with self._client.post(self.config.url, data=body, headers=self.headers) as response:
                    await response.read()
                    if response.status < 300:
                        self._succeeded()
                        self.on_exported(len(spans))
                        return True
                    problem = f"HTTP {response.status}"
                    if response.status not in RETRY_STATUSES:
                        self._dropped(spans, problem)
                        return False
                    retry_after = _seconds(response.headers.get("Retry-After"))
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = type(exc).__name__
            wait = min(retry_after if retry_after is not None else backoff, MAX_BACKOFF_SECONDS)
            if self._stop.is_set() or time.monotonic() + wait >= deadline:
                self._dropped(spans, problem)
                return False
            await asyncio.sleep(wait)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    def _dropped(self, spans: list[Span], problem: str) -> None:
        """Count a lost batch; say so once per outage, not once per batch."""
        self.on_dropped(len(spans))
        if not self._failing:
            self._failing = True
            log.warning("trace receiver %s failing (%s): spans are dropped and counted in "
                        "llm_trace_spans_dropped_total until it answers again", self.config.url, problem)

    def _succeeded(self) -> None:
        if self._failing:
            self._failing = False
            log.warning("trace receiver %s answers again", self.config.url)


def _seconds(value: str | None) -> float | None:
    try:
        return max(float(value), 0.0) if value else None
    except ValueError:
        return None
