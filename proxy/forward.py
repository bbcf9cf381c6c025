"""Forwarding of everything under /v1/: headers, query and body as sent, responses streamed back.

Metered operations are parsed, gated, tapped for usage and recorded; everything else passes
through untouched. Upstream bodies are decoded (gzip/deflate/br) by the client session, so the
proxy meters the real JSON and the client receives a body that matches its headers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import aiohttp
import orjson
from aiohttp import hdrs, web
from multidict import CIMultiDictProxy, istr
from yarl import URL

from costing import budget as rules
from costing.errors import BudgetExceeded
from costing.meter import Meter, Ticket
from costing.money import format_units, from_units
from costing.records import UsageEntry
from costing.settings import Settings
from costing.usage import Operation, Reported, from_body, operation_for, request_facts
from proxy.errors import ProxyError, answer
from proxy.metrics import Metrics
from proxy.sse import SSETap
from proxy.state import METER, METRICS, SETTINGS, TRACER, UPSTREAM, Upstream
from proxy.tags import tag_value
from tracing.recorder import error_type, stream_failure

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length",
})
# The client session decodes upstream bodies, so their encoding and length no longer apply.
RESPONSE_DROPPED = HOP_BY_HOP | {"content-encoding"}
STREAMED_USAGE_OPERATIONS = (Operation.CHAT, Operation.COMPLETIONS)
NO_USER_AGENT = ("User-Agent",)
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that hung up before the answer


@dataclass(slots=True)
class Timing:
    """Where a request's time went: overhead = total - waiting on upstream - waiting on client."""

    started: float = field(default_factory=time.perf_counter)
    waiting: float = 0.0

    def overhead(self) -> float:
        return max(time.perf_counter() - self.started - self.waiting, 0.0)


Headers = list[tuple[str, str]]
"""Header lists, not multidicts: aiohttp copies what it is given into its own multidict anyway."""


def upstream_headers(request: web.Request, settings: Settings) -> Headers:
    """The client's headers minus hop-by-hop ones (and those its Connection header names) and tags."""
    dropped = {settings.campaign_header.lower(), settings.session_header.lower()}
    for value in request.headers.getall("Connection", ()):
        dropped.update(token.strip().lower() for token in value.split(","))
    headers = [(name, value) for name, value in request.headers.items()
               if (lower := name.lower()) not in HOP_BY_HOP and lower not in dropped]
    if settings.openai_api_key is not None and (
            "authorization" in dropped or "Authorization" not in request.headers):
        headers.append(("Authorization", f"Bearer {settings.openai_api_key.get_secret_value()}"))
    return headers


def response_headers(upstream: CIMultiDictProxy[str]) -> Headers:
    return [(name, value) for name, value in upstream.items() if name.lower() not in RESPONSE_DROPPED]


# Names as istr, as aiohttp's own: a multidict then skips case-folding them per response.
CAMPAIGN_COST = istr("X-Campaign-Cost-USD")
CAMPAIGN_LIMIT = istr("X-Campaign-Limit-USD")
CAMPAIGN_REMAINING = istr("X-Campaign-Remaining-USD")
COST_WARNING = istr("X-Cost-Warning")
REQUEST_COST = istr("X-Request-Cost-USD")
SESSION_COST = istr("X-Session-Cost-USD")
# Limits are few and change rarely; spend changes with every request.
_limit_text = lru_cache(maxsize=256)(format_units)


def campaign_headers(meter: Meter, campaign_id: str) -> Headers:
    spent, budget = meter.standing(campaign_id)
    headers: Headers = [
        (CAMPAIGN_COST, format_units(spent)),
        (CAMPAIGN_LIMIT, _limit_text(budget.limit_units)),
        (CAMPAIGN_REMAINING, format_units(rules.remaining_units(spent, budget))),
    ]
    if spent >= budget.warning_units:
        headers.append((COST_WARNING, rules.warning_text(campaign_id, from_units(spent), budget)))
    return headers


async def forward(request: web.Request) -> web.StreamResponse:
    """Handler for every method and path under /v1/; answers its own errors (see `answering`)."""
    try:
        return await _dispatch(request)
    except Exception as exc:
        return answer(exc)


def _dispatch(request: web.Request) -> Awaitable[web.StreamResponse]:
    """Check the request and pick its path: a plain function, so the handler is one frame less."""
    timing = Timing()
    app = request.app  # a property that walks the match info: read once
    settings = app[SETTINGS]
    if _has_dot_segment(request.path):
        raise ProxyError(404, "Not found: a path with '.' or '..' segments is never forwarded",
                         code="not_found")
    campaign_id = tag_value(request.headers, settings.campaign_header)
    session_id = tag_value(request.headers, settings.session_header)
    operation = operation_for(request.method, request.path)
    headers = upstream_headers(request, settings)
    length = request.content_length
    if length is not None and length > settings.max_request_body_bytes:
        raise ProxyError(413, f"Request body too large: {length} bytes, the limit "
                              f"is {settings.max_request_body_bytes} (MAX_REQUEST_BODY_BYTES)",
                         code="request_too_large")
    if operation is None:
        return _pass_through(request, app, headers, length, timing)
    return _metered(request, app, headers, operation, campaign_id, session_id, timing)


def _has_dot_segment(path: str) -> bool:
    """Whether the decoded path could climb out of /v1/ once an upstream normalises it."""
    return "/." in path and any(segment in (".", "..") for segment in path.split("/"))


def _target(request: web.Request, upstream: Upstream) -> URL:
    # rel_url, not raw_path: an absolute-form target (GET http://host/v1/...) must not carry
    # its scheme and host into the upstream URL.
    return _upstream_url(upstream.base_url, request.rel_url.raw_path_qs)


@lru_cache(maxsize=1024)
def _upstream_url(base_url: str, path_qs: str) -> URL:
    """URLs are immutable, and nearly every request goes to one of a few paths."""
    return URL(base_url + path_qs, encoded=True)


def _is_event_stream(headers: CIMultiDictProxy[str]) -> bool:
    """`content_type == "text/event-stream"` without aiohttp parsing every parameter."""
    return headers.get(hdrs.CONTENT_TYPE, "").partition(";")[0].strip().lower() == "text/event-stream"


async def _send(request: web.Request, upstream: Upstream, headers: Headers, body: object,
                timing: Timing) -> aiohttp.ClientResponse:
    """Open the upstream request; connection failures become 502 and timeouts 504."""
    client = upstream.client
    # Only a client that sent no User-Agent needs aiohttp's own kept out: asking for that on
    # every request takes aiohttp's slow header path (a multidict copy per request).
    skip = None if "User-Agent" in request.headers else NO_USER_AGENT
    sent = time.perf_counter()
    try:
        response = await client.request(request.method, _target(request, upstream), headers=headers,
                                        data=body, allow_redirects=False, skip_auto_headers=skip)
    except TimeoutError as exc:
        raise ProxyError(504, "The upstream API did not answer in time", type="server_error",
                         code="upstream_timeout") from exc
    except aiohttp.ClientError as exc:
        if isinstance(exc.__cause__, ProxyError):  # raised while streaming the request body
            raise exc.__cause__ from None
        raise ProxyError(502, f"The upstream API is unreachable: {type(exc).__name__}",
                         type="server_error", code="upstream_unreachable") from exc
    finally:
        timing.waiting += time.perf_counter() - sent
    return response


def _too_large(limit: int) -> ProxyError:
    return ProxyError(413, f"Request body too large: the limit is {limit} bytes "
                           "(MAX_REQUEST_BODY_BYTES)", code="request_too_large")


async def _body_stream(request: web.Request, limit: int):
    seen = 0
    async for chunk in request.content.iter_any():
        seen += len(chunk)
        if seen > limit:
            raise _too_large(limit)
        yield chunk


async def _whole_body(message: web.Request | aiohttp.ClientResponse) -> bytes:
    """A request's or an upstream answer's body; without `read()`'s awaits and copies when all of
    it has arrived already (the usual JSON request, most answers)."""
    if message.content.is_eof():
        return message.content.read_nowait()
    return await message.read()


async def _request_body(request: web.Request, limit: int) -> bytes:
    body = await _whole_body(request)
    if len(body) > limit:  # a chunked body taken whole: no Content-Length was checked before
        raise _too_large(limit)
    return body


async def _pass_through(request: web.Request, app: web.Application, headers: Headers,
                        length: int | None, timing: Timing) -> web.StreamResponse:
    body = _body_stream(request, app[SETTINGS].max_request_body_bytes) if request.body_exists else None
    if length is not None:
        headers.append(("Content-Length", str(length)))
    upstream = await _send(request, app[UPSTREAM], headers, body, timing)
    async with upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=response_headers(upstream.headers))
        await response.prepare(request)
        await _relay(request, upstream, response, timing, None)
        return response


async def _relay(request: web.Request, upstream: aiohttp.ClientResponse, response: web.StreamResponse,
                 timing: Timing, tap: SSETap | None) -> bool:
    """Copy the upstream body to the client as it arrives; False if either side broke off.

    An upstream that breaks off mid-body breaks the client's connection too (after passing on
    what arrived), so the client sees a truncated answer as truncated, as it would from OpenAI.
    A client that goes away ends the copy; leaving the caller's block closes the upstream request.
    """
    try:
        while True:
            waited = time.perf_counter()
            try:
                chunk = await upstream.content.readany()
            except (aiohttp.ClientError, TimeoutError):
                if tap is not None:
                    await response.write(tap.finish())
                if request.transport is not None:
                    request.transport.abort()
                return False
            finally:
                timing.waiting += time.perf_counter() - waited
            if not chunk:
                break
            out = tap.feed(chunk) if tap is not None else chunk
            if upstream.content.at_eof():
                # The body ended with this chunk: it goes out with the end of the response (and
                # with the headers, when they are still unsent), one send instead of two or three.
                rest = tap.finish() if tap is not None else b""
                await response.write_eof(out + rest if rest else out)
                return True
            if out:
                waited = time.perf_counter()
                await response.write(out)
                timing.waiting += time.perf_counter() - waited
        if tap is not None:
            rest = tap.finish()
            if rest:
                await response.write(rest)
        await response.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        return False
    return True


async def _metered(request: web.Request, app: web.Application, headers: Headers,
                   operation: Operation, campaign_id: str, session_id: str,
                   timing: Timing) -> web.StreamResponse:
    meter = app[METER]
    metrics = app[METRICS]
    raw = await _request_body(request, app[SETTINGS].max_request_body_bytes)
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProxyError(400, f"The request body must be a JSON object ({exc})",
                         code="invalid_json") from exc
    if not isinstance(parsed, dict):
        raise ProxyError(400, "The request body must be a JSON object", code="invalid_json")
    facts = request_facts(operation, parsed)
    strip_usage = facts.stream and operation in STREAMED_USAGE_OPERATIONS and not facts.include_usage
    if strip_usage:
        options = parsed.get("stream_options")
        parsed["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                    "include_usage": True}
        raw = orjson.dumps(parsed)
    tracer = app[TRACER]
    span = (tracer.start(request.headers, headers, str(operation), campaign_id, session_id, facts, parsed,
                         timing.started) if tracer is not None else None)
    authorization = request.headers.get("Authorization")
    try:
        ticket = (meter.admit_now(campaign_id, session_id, operation, facts, authorization)
                  or await meter.admit(campaign_id, session_id, operation, facts, authorization))
    except BudgetExceeded:
        metrics.on_blocked(campaign_id)
        if span is not None:
            span.tracer.end(span, 429, "budget_exceeded", None, None)
        raise
    status = 502
    answered = False
    reported: Reported | None = None
    tap: SSETap | None = None
    entry: UsageEntry | None = None
    failure: str | None = None  # why the call failed, when not by the upstream's HTTP status
    try:
        upstream = await _send(request, app[UPSTREAM], headers, raw, timing)
        status, answered = upstream.status, True
        async with upstream:
            if _is_event_stream(upstream.headers):
                tap = SSETap(strip_usage=strip_usage, ends=[] if span is not None else None)
                reply_headers = response_headers(upstream.headers) + campaign_headers(meter, campaign_id)
                if upstream.content.is_eof():
                    # The whole stream has arrived already (a short answer from a nearby
                    # upstream): headers and events go out in one send, like a JSON body.
                    events = upstream.content.read_nowait()
                    return web.Response(status=upstream.status, reason=upstream.reason,
                                        body=tap.feed(events) + tap.finish(), headers=reply_headers)
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                              headers=reply_headers)
                await response.prepare(request)
                if not await _relay(request, upstream, response, timing, tap):
                    failure = stream_failure(upstream.content.exception())
                return response
            waited = time.perf_counter()
            try:
                body = await _whole_body(upstream)
            except TimeoutError as exc:
                raise ProxyError(504, "The upstream API stopped answering in time",
                                 type="server_error", code="upstream_timeout") from exc
            except aiohttp.ClientError as exc:
                raise ProxyError(502, "The upstream API broke off its answer",
                                 type="server_error", code="upstream_incomplete") from exc
            finally:
                timing.waiting += time.perf_counter() - waited
            decoded = _decoded(body)
            reported = from_body(decoded) if decoded is not None else None
            if span is not None:
                span.tracer.answered(span, decoded)
            entry = meter.record(ticket, reported, status=status, streamed=False)
            reply_headers = response_headers(upstream.headers) + campaign_headers(meter, campaign_id)
            reply_headers.append((REQUEST_COST, format_units(entry.cost_units)))
            session_total = meter.session_total_now(campaign_id, session_id)
            if session_total is None:
                session_total = await meter.session_total(campaign_id, session_id)
            if session_total is not None:
                reply_headers.append((SESSION_COST, format_units(session_total)))
            return web.Response(status=upstream.status, reason=upstream.reason, body=body,
                                headers=reply_headers)
    except ProxyError as exc:
        status, failure = exc.status, exc.code
        raise
    except asyncio.CancelledError:
        if not answered:  # the client left first: recorded as nginx logs it, not as an upstream 502
            status = CLIENT_CLOSED_REQUEST
        failure = "client_disconnected"
        raise
    finally:
        if tap is not None:
            reported = tap.result()
        if not ticket.settled:
            entry = meter.record(ticket, reported, status=status, streamed=tap is not None,
                                 streamed_chars=tap.streamed_chars() if tap and not tap.usage_seen
                                 else 0)
        _observe(metrics, ticket, reported, status, timing)
        if span is not None:
            span.tracer.end(span, status, error_type(status, failure), entry, reported,
                            tap.ends if tap is not None else None)


def _decoded(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _observe(metrics: Metrics, ticket: Ticket, reported: Reported | None, status: int,
             timing: Timing) -> None:
    seconds = time.perf_counter() - ticket.started
    error_type = "" if status < 400 else str(status)
    metrics.observe_operation(ticket.operation, ticket.facts.model,
                              reported.model if reported else None, seconds, error_type)
    metrics.overhead.observe(timing.overhead())
