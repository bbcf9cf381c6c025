"""A small OTLP/HTTP trace receiver on a real loopback port, for tests: decodes what the proxy
exports with `opentelemetry-proto` and keeps it; can answer slowly or with an error status."""

from __future__ import annotations

import asyncio
import gzip
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span


def value_of(value: AnyValue) -> Any:
    """An attribute value as Python, keeping its OTLP type visible (bool, int, float, str, list)."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: value_of(kv.value) for kv in pairs}


@dataclass
class Received:
    resource: dict[str, Any]
    scope: str
    span: Span

    @property
    def attributes(self) -> dict[str, Any]:
        return attributes(self.span.attributes)

    def kinds(self) -> dict[str, str | None]:
        """Each attribute's OTLP value type (string_value, int_value, ...)."""
        return {kv.key: kv.value.WhichOneof("value") for kv in self.span.attributes}


@dataclass
class OTLPReceiver:
    status: int = 200
    delay: float = 0.0
    spans: list[Received] = field(default_factory=list)
    posts: int = 0
    encodings: list[str | None] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    url: str = ""
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> OTLPReceiver:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self._runner.cleanup()

    async def _traces(self, request: web.Request) -> web.Response:
        self.posts += 1
        body = await request.read()
        self.encodings.append(request.headers.get("Content-Encoding"))
        self.headers.append(dict(request.headers))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status != 200:
            return web.Response(status=self.status, text="failing on purpose")
        if body[:2] == b"\x1f\x8b":  # aiohttp's server inflates gzip bodies itself
            body = gzip.decompress(body)
        message = ExportTraceServiceRequest.FromString(body)
        for resource_spans in message.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(Received(resource, scope_spans.scope.name, span))
        self.arrived.set()
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def wait_for(self, count: int, seconds: float = 10.0) -> list[Received]:
        deadline = asyncio.get_running_loop().time() + seconds
        while len(self.spans) < count:
            assert asyncio.get_running_loop().time() < deadline, \
                f"{len(self.spans)} spans arrived, expected {count}"
            await asyncio.sleep(0.02)
        return self.spans


__all__ = ["KeyValue", "OTLPReceiver", "Received", "attributes", "value_of"]
