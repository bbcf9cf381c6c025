"""Forwarding of everything under /v1/: headers, query and body as sent, responses streamed back.

Metered operations are parsed, gated, tapped for usage and recorded; everything else passes
through untouched. Upstream bodies are decoded (gzip/deflate/br) by the client session, so the
proxy meters the real JSON and the client receives a body that matches its headers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import aiohttp
import orjson
from aiohttp import hdrs, web
from multidict import CIMultiDictProxy, istr
from yarl import URL

from costing import budget as rules
from costing.endpoints import Endpoint, Kind, classify, normalize
from costing.errors import BudgetExceeded
from costing.meter import CLIENT_CLOSED_REQUEST, FinalState, Meter, Ticket
from costing.money import format_units, from_units
from costing.records import UsageEntry
from costing.settings import Settings
from costing.tasks import uninterrupted
from costing.usage import Operation, Reported, RequestFacts, answer_chars, from_body, request_facts
from proxy.errors import ProxyError, answer
from proxy.metrics import Metrics
from proxy.sse import SSETap
from proxy.state import BROWSERS, CLIENT_KEYS, METER, METRICS, SETTINGS, TRACER, UPSTREAM, Upstream
from proxy.tags import tag_value
from tracing.recorder import error_type, stream_failure
from tracing.spans import Span

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length",
})
# The client session decodes upstream bodies, so their encoding and length no longer apply.
RESPONSE_DROPPED = HOP_BY_HOP | {"content-encoding"}
# For the same reason the upstream is offered only what the session decodes (aiohttp's own
# Accept-Encoding), never the client's: an encoding it cannot decode (zstd) would turn an
# answered, billed call into a 502.
REQUEST_DROPPED = HOP_BY_HOP | {"accept-encoding"}
# With client keys the upstream account is the operator's: a client does not pick which of its
# organizations or projects is billed, and its cookies are for the proxy, not for OpenAI.
KEYED_DROPPED = frozenset({"authorization", "openai-organization", "openai-project", "cookie"})
STREAMED_USAGE_OPERATIONS = (Operation.CHAT, Operation.COMPLETIONS)
NO_USER_AGENT = ("User-Agent",)


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
    """The client's headers minus hop-by-hop ones (and those its Connection header names), its
    Accept-Encoding and tags."""
    dropped = {settings.campaign_header.lower(), settings.session_header.lower()}
    if settings.proxy_api_keys is not None:  # the client's key is the proxy's, never upstream's
        dropped.update(KEYED_DROPPED)
    for value in request.headers.getall("Connection", ()):
        dropped.update(token.strip().lower() for token in value.split(","))
    headers = [(name, value) for name, value in request.headers.items()
               if (lower := name.lower()) not in REQUEST_DROPPED and lower not in dropped]
    if settings.openai_api_key is not None and (
            "authorization" in dropped or "Authorization" not in request.headers):
        headers.append(("Authorization", f"Bearer {settings.openai_api_key.get_secret_value()}"))
    return headers


def response_headers(upstream: CIMultiDictProxy[str]) -> Headers:
    return [(name, value) for name, value in upstream.items() if name.lower() not in RESPONSE_DROPPED]


def head_length(upstream: CIMultiDictProxy[str]) -> Headers:
    """A HEAD answer's Content-Length, which response_headers drops: no body follows, so the
    length is all it tells, and aiohttp sends it on a HEAD (without chunked encoding). Not for an
    encoded body: the proxy sends bodies decoded, another length."""
    length = upstream.get(hdrs.CONTENT_LENGTH)
    if length is None or upstream.get(hdrs.CONTENT_ENCODING, "identity").lower() != "identity":
        return []
    return [(hdrs.CONTENT_LENGTH, length)]


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
    app[BROWSERS].check(request)  # 403: a web page's request (foreign Origin, rebound Host)
    settings = app[SETTINGS]
    path = request.path
    if "//" in path:  # what an upstream that merges slashes would serve
        path = normalize(path)
    if _has_dot_segment(path):
        raise ProxyError(404, "Not found: a path with '.' or '..' segments is never forwarded",
                         code="not_found")
    if request.method == "GET" and hdrs.UPGRADE in request.headers:  # one compare for the rest
        from proxy import realtime  # imports this module

        if realtime.is_websocket(request):
            return realtime.relay(request, path)
    keys = app[CLIENT_KEYS]
    bound = keys.admit(request.headers) if keys is not None else None  # 401 / 403
    campaign_id = bound or tag_value(request.headers, settings.campaign_header)
    session_id = tag_value(request.headers, settings.session_header)
    endpoint = classify(request.method, path)
    headers = upstream_headers(request, settings)
    length = request.content_length
    if length is not None and length > settings.max_request_body_bytes:
        raise ProxyError(413, f"Request body too large: {length} bytes, the limit "
                              f"is {settings.max_request_body_bytes} (MAX_REQUEST_BODY_BYTES)",
                         code="request_too_large")
    kind = endpoint.kind
    if kind is Kind.METERED:
        return _metered(request, app, headers, endpoint, campaign_id, session_id, timing)
    if kind is Kind.FREE:
        return _pass_through(request, app, headers, length, timing)
    if kind is Kind.BILLABLE:
        return _billable(request, app, headers, length, endpoint, campaign_id, session_id, timing)
    return _retrieval(request, app, headers, campaign_id, session_id, timing)


def _has_dot_segment(path: str) -> bool:
    """Whether the decoded path could climb out of /v1/ once an upstream normalises it."""
    return "/." in path and any(segment in (".", "..") for segment in path.split("/"))


def _target(request: web.Request, upstream: Upstream) -> URL:
    # rel_url, not raw_path: an absolute-form target (GET http://host/v1/...) must not carry
    # its scheme and host into the upstream URL.
    return _upstream_url(upstream.base_url, request.rel_url.raw_path_qs)


@lru_cache(maxsize=1024)
def _upstream_url(base_url: str, path_qs: str) -> URL:
    """URLs are immutable, and nearly every request goes to one of a few paths. Repeated slashes
    are merged: the upstream gets the path the proxy metered."""
    path, mark, query = path_qs.partition("?")
    return URL(base_url + normalize(path) + mark + query, encoded=True)


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
    except aiohttp.ConnectionTimeoutError as exc:  # (a TimeoutError too) never reached the upstream
        raise ProxyError(504, "The upstream API did not answer in time", type="server_error",
                         code="upstream_timeout") from exc
    except TimeoutError as exc:  # sent, and no answer within UPSTREAM_READ_TIMEOUT_SECONDS
        raise GaveUp(504, "The upstream API did not answer in time", type="server_error",
                     code="upstream_timeout") from exc
    except aiohttp.ClientError as exc:
        if isinstance(exc.__cause__, ProxyError):  # raised while streaming the request body
            raise exc.__cause__ from None
        raise ProxyError(502, f"The upstream API is unreachable: {type(exc).__name__}",
                         type="server_error", code="upstream_unreachable") from exc
    finally:
        timing.waiting += time.perf_counter() - sent
    return response


class GaveUp(ProxyError):
    """The proxy stopped waiting for an answer the upstream was giving (its read timeout, or a
    body broken off): the upstream did the work and OpenAI bills it, so the call is recorded at
    its estimate, as for a client that leaves, unless the upstream had answered with an error."""


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


@dataclass(slots=True)
class Outcome:
    """How a call ended, for its ledger row: the upstream's status once it answered."""

    status: int = 502
    answered: bool = False
    failure: str | None = None  # why it failed, when not by the upstream's status (traces)
    billed: bool = False  # the proxy gave up on an answer the upstream was giving (GaveUp)

    def answer(self, status: int) -> None:
        self.status, self.answered = status, True

    def fail(self, exc: BaseException) -> None:
        """Called as an exception leaves the handler: a departing client (cancellation) before
        the answer is recorded as nginx logs it (499), not as an upstream failure."""
        if isinstance(exc, ProxyError):
            self.billed = isinstance(exc, GaveUp) and (not self.answered or 200 <= self.status < 300)
            self.status, self.failure = exc.status, exc.code
        elif isinstance(exc, asyncio.CancelledError):
            self.failure = "client_disconnected"
            if not self.answered:
                self.status = CLIENT_CLOSED_REQUEST


async def _pass_through(request: web.Request, app: web.Application, headers: Headers,
                        length: int | None, timing: Timing, outcome: Outcome | None = None,
                        extra: Headers | None = None) -> web.StreamResponse:
    body = _body_stream(request, app[SETTINGS].max_request_body_bytes) if request.body_exists else None
    if length is not None:
        headers.append(("Content-Length", str(length)))
    upstream = await _send(request, app[UPSTREAM], headers, body, timing)
    if outcome is not None:
        outcome.answer(upstream.status)
    async with upstream:
        reply_headers = response_headers(upstream.headers)
        if request.method == "HEAD":  # only a free request can be one (see endpoints.classify)
            reply_headers += head_length(upstream.headers)
        if extra:
            reply_headers += extra
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=reply_headers)
        await response.prepare(request)
        await _relay(request, upstream, response, timing, None)
        return response


UNPRICED = RequestFacts(None, False, False, 0, 0)  # reserves nothing: refused only at the limit


async def _billable(request: web.Request, app: web.Application, headers: Headers,
                    length: int | None, endpoint: Endpoint, campaign_id: str, session_id: str,
                    timing: Timing) -> web.StreamResponse:
    """A billable call the proxy cannot price: gated by the budget, forwarded untouched (the
    body streamed: uploads can be large), recorded at cost 0 so the ledger shows it, and traced
    as its row says (the upstream gets the proxy's span id, never the caller's)."""
    meter = app[METER]
    tracer = app[TRACER]
    span = (tracer.start(request.headers, headers, endpoint.operation, campaign_id, session_id,
                         UNPRICED, {}, timing.started) if tracer is not None else None)
    ticket = await _admit(app, campaign_id, session_id, endpoint.operation, UNPRICED,
                          request.headers.get("Authorization"), span)
    outcome = Outcome()
    entry: UsageEntry | None = None
    try:
        return await _pass_through(request, app, headers, length, timing, outcome,
                                   campaign_headers(meter, campaign_id))
    except BaseException as exc:
        outcome.fail(exc)
        raise
    finally:
        if outcome.failure == "request_too_large":
            meter.release(ticket)
        else:
            entry = meter.record_unpriced(ticket, status=outcome.status)
        if span is not None:
            span.tracer.end(span, outcome.status, error_type(outcome.status, outcome.failure), entry,
                            None)


async def _admit(app: web.Application, campaign_id: str, session_id: str, operation: str,
                 facts: RequestFacts, authorization: str | None, span: Span | None = None) -> Ticket:
    """The budget gate: a ticket, or BudgetExceeded (counted; the call's span, when it has one,
    ended as refused) / LedgerUnavailable."""
    meter = app[METER]
    try:
        return (meter.admit_now(campaign_id, session_id, operation, facts, authorization)
                or await meter.admit(campaign_id, session_id, operation, facts, authorization))
    except BudgetExceeded:
        app[METRICS].on_blocked(campaign_id)
        if span is not None:
            span.tracer.end(span, 429, "budget_exceeded", None, None)
        raise


async def _retrieval(request: web.Request, app: web.Application, headers: Headers,
                     campaign_id: str, session_id: str, timing: Timing) -> web.StreamResponse:
    """`GET /v1/responses/{id}` (or its stream) and its cancellation: forwarded as they are; a
    background response's final state in the answer is metered once (never refused: the work
    is done), a stream's before its last events go out, as for metered calls."""
    raw = await _request_body(request, app[SETTINGS].max_request_body_bytes) if request.body_exists \
        else None
    started = time.perf_counter()
    tracer = app[TRACER]
    # Started as any metered call's (the upstream gets the proxy's span id); ended only by the
    # read that meters a final state, with its figures: that read is the call's span.
    span = (tracer.start(request.headers, headers, Operation.RESPONSES.value, campaign_id, session_id,
                         UNPRICED, {}, timing.started) if tracer is not None else None)
    upstream = await _send(request, app[UPSTREAM], headers, raw, timing)
    meter = app[METER]
    state: FinalState | None = None
    read = False  # the answer was looked at for a final state

    def record(reported: Reported | None, streamed: bool) -> None:
        nonlocal state, read
        read = True
        if reported is not None:
            state = meter.final_state(campaign_id, session_id, reported, status=upstream.status,
                                      streamed=streamed, started=started,
                                      authorization=request.headers.get("Authorization"))

    try:
        async with upstream:
            if _is_event_stream(upstream.headers):
                tap = SSETap(strip_usage=False)
                try:
                    return await _stream_back(request, upstream, response_headers(upstream.headers),
                                              tap, timing, lambda: record(tap.result(), True))
                finally:
                    if not read:  # the stream broke off before its end: what it told so far
                        record(tap.result(), True)
            body = await _answer_body(upstream, timing)
            decoded = _decoded(body)
            record(from_body(decoded) if decoded is not None else None, False)
            reply_headers = response_headers(upstream.headers)
            if state is not None:  # the read that meters the call tells its cost, as a reply does
                await uninterrupted(meter.settle_final_state(state))
                if state.entry.campaign_id == campaign_id:  # to a reader of that campaign only:
                    # another campaign's key (another tenant) must not learn what it spends
                    reply_headers += campaign_headers(meter, campaign_id)
                    reply_headers.append((REQUEST_COST, format_units(state.entry.cost_units)))
                if span is not None:
                    span.tracer.answered(span, decoded)
            return web.Response(status=upstream.status, reason=upstream.reason, body=body,
                                headers=reply_headers)
    finally:
        if state is not None:
            await uninterrupted(meter.settle_final_state(state))
            if span is not None:
                _end_final_state_span(span, state)


def _end_final_state_span(span: Span, state: FinalState) -> None:
    """The span of a background response's call: the read that metered its final state, named
    and tagged as the call (its model, its creator's campaign and session). Queued once the
    ledger has the row, and only by the process whose insert landed: when several processes
    read the final state, one span carries its cost."""
    entry = state.entry
    span.facts = RequestFacts(entry.response_model, entry.streamed, False, 0, None)
    span.campaign_id, span.session_id = entry.campaign_id, entry.session_id
    span.tracer.end(span, entry.status_code, None, entry, state.reported, written=state.written)


async def _stream_back(request: web.Request, upstream: aiohttp.ClientResponse, reply_headers: Headers,
                       tap: SSETap, timing: Timing, record: Callable[[], object] | None = None,
                       outcome: Outcome | None = None) -> web.StreamResponse:
    """Relay an event stream through `tap`: event by event (`record` called before the last
    events go out, see `_relay`), or in one send when the whole stream has arrived already (a
    short answer from a nearby upstream), like a JSON body: then the caller records before
    returning, before any byte goes out."""
    if upstream.content.is_eof():
        events = upstream.content.read_nowait()
        return web.Response(status=upstream.status, reason=upstream.reason,
                            body=tap.feed(events) + tap.finish(), headers=reply_headers)
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                  headers=reply_headers)
    await response.prepare(request)
    if not await _relay(request, upstream, response, timing, tap, record) and outcome is not None:
        outcome.failure = stream_failure(upstream.content.exception())
    return response


async def _answer_body(upstream: aiohttp.ClientResponse, timing: Timing) -> bytes:
    """An upstream JSON answer, whole; a timeout is 504 and a broken answer 502."""
    waited = time.perf_counter()
    try:
        return await _whole_body(upstream)
    except TimeoutError as exc:
        raise GaveUp(504, "The upstream API stopped answering in time",
                     type="server_error", code="upstream_timeout") from exc
    except aiohttp.ClientError as exc:
        raise GaveUp(502, "The upstream API broke off its answer",
                     type="server_error", code="upstream_incomplete") from exc
    finally:
        timing.waiting += time.perf_counter() - waited


async def _relay(request: web.Request, upstream: aiohttp.ClientResponse, response: web.StreamResponse,
                 timing: Timing, tap: SSETap | None, record: Callable[[], object] | None = None) -> bool:
    """Copy the upstream body to the client as it arrives; False if either side broke off.

    `record` (metered streams) is called once, before the events that end the answer go out:
    as soon as the tap has seen the final usage event, or else when the upstream body has ended. So
    the call's record is spooled before the client has its last byte (a kill after that loses
    nothing); a stream that breaks off is recorded by the caller.

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
                if record is not None:
                    record()
                await response.write_eof(out + rest if rest else out)
                return True
            if record is not None and tap is not None and tap.usage_final:
                record()  # the final usage event is in `out`: recorded before it goes out
                record = None
            if out:
                waited = time.perf_counter()
                await response.write(out)
                timing.waiting += time.perf_counter() - waited
        if tap is not None:
            rest = tap.finish()
            if record is not None:
                record()
            if rest:
                await response.write(rest)
        await response.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        return False
    return True


async def _metered(request: web.Request, app: web.Application, headers: Headers,
                   endpoint: Endpoint, campaign_id: str, session_id: str,
                   timing: Timing) -> web.StreamResponse:
    meter = app[METER]
    operation = endpoint.metered
    assert operation is not None
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
    span = (tracer.start(request.headers, headers, endpoint.operation, campaign_id, session_id, facts,
                         parsed, timing.started) if tracer is not None else None)
    ticket = await _admit(app, campaign_id, session_id, endpoint.operation, facts,
                          request.headers.get("Authorization"), span)
    outcome = Outcome()
    entry: UsageEntry | None = None
    reported: Reported | None = None
    tap: SSETap | None = None
    gave_up: GaveUp | None = None
    try:
        upstream = await _send(request, app[UPSTREAM], headers, raw, timing)
        outcome.answer(upstream.status)
        async with upstream:
            if _is_event_stream(upstream.headers):
                tap = SSETap(strip_usage=strip_usage, ends=[] if span is not None else None)
                streamed = tap

                def record() -> None:  # before the last events go out (see _relay)
                    nonlocal entry
                    entry = meter.record(ticket, streamed.result(), status=outcome.status,
                                         streamed=True, output_chars=0 if streamed.usage_seen
                                         else streamed.streamed_chars())

                return await _stream_back(
                    request, upstream,
                    response_headers(upstream.headers) + campaign_headers(meter, campaign_id),
                    tap, timing, record, outcome)
            body = await _answer_body(upstream, timing)
            decoded = _decoded(body)
            reported = from_body(decoded) if decoded is not None else None
            if span is not None:
                span.tracer.answered(span, decoded)
            # Without usage, the output is estimated from the answer's text, as a stream's is.
            entry = meter.record(ticket, reported, status=outcome.status, streamed=False,
                                 output_chars=0 if reported is not None and reported.usage
                                 is not None else answer_chars(decoded))
            reply_headers = response_headers(upstream.headers) + campaign_headers(meter, campaign_id)
            reply_headers.append((REQUEST_COST, format_units(entry.cost_units)))
            session_total = meter.session_total_now(campaign_id, session_id)
            if session_total is None:
                session_total = await meter.session_total(campaign_id, session_id)
            if session_total is not None:
                reply_headers.append((SESSION_COST, format_units(session_total)))
            return web.Response(status=upstream.status, reason=upstream.reason, body=body,
                                headers=reply_headers)
    except BaseException as exc:
        outcome.fail(exc)
        gave_up = exc if isinstance(exc, GaveUp) else None
        raise
    finally:
        if tap is not None:
            reported = tap.result()
        if not ticket.settled:
            entry = meter.record(ticket, reported, status=outcome.status, streamed=tap is not None,
                                 output_chars=tap.streamed_chars() if tap and not tap.usage_seen
                                 else 0, billed=outcome.billed)
            if gave_up is not None:  # charged at its estimate: the error says so, as a reply would
                gave_up.headers.update(campaign_headers(meter, campaign_id))
                gave_up.headers[REQUEST_COST] = format_units(entry.cost_units)
        _observe(app[METRICS], ticket, reported, outcome.status, timing)
        if span is not None:
            # ticket.written: a background response's final state in its own stream, reported
            # by whichever process's insert lands (see Tracer.end)
            span.tracer.end(span, outcome.status, error_type(outcome.status, outcome.failure), entry,
                            reported, tap.ends if tap is not None else None, ticket.written, True)


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
