"""Realtime API over WebSocket (`GET /v1/realtime?model=...` with `Upgrade: websocket`): the client's
socket relayed to one upstream socket, frame by frame, and each response it bills metered.

Why a module of its own: a WebSocket is one long call made of many billed responses, not one
request and one answer. The budget is asked when the socket opens (429 before the upgrade, as
any billable call) and before each `response.create` the client sends (refused with a Realtime
`error` event, code `budget_exceeded`; the socket stays open, so the conversation survives a
budget raise). A response the upstream starts on its own (server VAD) while the campaign is at
its limit is cancelled. Every `response.done` is a ledger row of its own, spooled before the
event is relayed; so is every input audio transcription's `completed` event (its own usage, at
the session's transcription model's price, operation `realtime.transcription`). A client that
leaves mid-response has its responses cancelled upstream and their `response.done` (OpenAI
bills the part generated) waited for, briefly, and recorded.
So does a shutdown, for every open socket (`going_away`, before aiohttp waits for handlers and
closes the upstream client), which then closes both sides with 1001.

An upstream that stops reading ends the relay: each send to it is bounded (SEND_SECONDS), its
connection pinged (HEARTBEAT_SECONDS), and past either it is dropped, the client closed with 1011.

Frames are relayed unchanged; only events that may be one of the few watched types are decoded
(a client's frame with a backslash too: a JSON escape can spell any name). Each send is awaited
before the next frame is read (backpressure, no queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import WSMsgType, hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from costing.endpoints import REALTIME_TRANSCRIPTION, WEBSOCKET
from costing.errors import BudgetExceeded, CostingError
from costing.meter import Meter, Ticket
from costing.records import UsageEntry
from costing.settings import Settings
from costing.tasks import uninterrupted
from costing.usage import (
    MAX_MODEL_LENGTH,
    Reported,
    RequestFacts,
    from_realtime_response,
    from_transcription,
    model_name,
)
from proxy.errors import ProxyError
from proxy.forward import Headers, _admit, _upstream_url, upstream_headers
from proxy.state import CLIENT_KEYS, METER, METRICS, RELAYS, SETTINGS, TRACER, UPSTREAM
from proxy.tags import tag_value

log = logging.getLogger(__name__)

# Browsers cannot set Authorization on a WebSocket: OpenAI's SDKs send the key as a subprotocol.
KEY_PROTOCOL = "openai-insecure-api-key."
# aiohttp's ws_connect makes its own handshake headers; the client's must not be sent twice.
HANDSHAKE_HEADERS = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol",
                               "sec-websocket-extensions", "sec-websocket-accept"})
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
# How long a client's departure waits for the upstream to report its cancelled responses' usage.
DRAIN_SECONDS = 5.0
SEND_SECONDS = 30.0
"""How long one frame may take to go upstream. An upstream that stops reading would otherwise
block the relay for good: the client's side is not read meanwhile, so its departure goes
unnoticed too. Past it the upstream's connection is dropped and the client closed with 1011."""
HEARTBEAT_SECONDS = 30.0
"""The upstream is pinged after this long without a frame from it, and dropped without a pong
within half of it: a dead upstream connection ends a quiet session instead of holding it open."""
CLOSE_SECONDS = 2.0
"""How long a close handshake may take; then the connection is dropped (a graceful close waits
for unsent data, which a peer that stopped reading never takes)."""
UPSTREAM_STALLED = 1011  # the client's close code when the upstream stopped reading
GOING_AWAY = 1001  # the server shuts down: clients may reconnect at once (to another replica)
SHUTDOWN_DRAIN_SECONDS = 3.0
"""How long a shutdown waits for the responses it cancelled to report their usage (at most
SHUTDOWN_TIMEOUT_SECONDS): short, since the process is waited for, yet enough for OpenAI's
`response.done` of a cancelled response, which it bills."""
# Close codes a close frame may not carry (RFC 6455 7.4.1): what is sent instead.
UNSENDABLE = {1005: 1000, 1006: 1011, 1015: 1011}
# Events decoded: a cheap substring test first (audio deltas are most of the traffic).
TRANSCRIBED = "conversation.item.input_audio_transcription.completed"
COMMITTED = "input_audio_buffer.committed"  # a transcription starts (its span's start)
WATCHED_SERVER = ('"response.done"', '"response.created"', '"session.created"', '"session.updated"',
                  f'"{TRANSCRIBED}"', f'"{COMMITTED}"')
# A client event that may be a response.create: its name in plain text, or any JSON escape.
CREATE_TEXT, CREATE_BYTES = '"response.create"', b'"response.create"'
# A client event that may name the session's transcription model (plain text only: an escaped
# name is missed, and the server's `session.updated` names it anyway).
UPDATE_TEXT, UPDATE_BYTES = '"session.update"', b'"session.update"'
MAX_COMMITTED = 64  # audio items awaiting their transcription, kept for their spans' start
BUDGET_EXCEEDED = "budget_exceeded"
LEDGER_UNAVAILABLE = "cost_ledger_unavailable"  # as the HTTP 503 says it
ENDED = (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)
MAX_REASON = 123  # bytes a close frame's reason may hold


def is_websocket(request: web.Request) -> bool:
    """`Upgrade: websocket` on a GET (called for GETs only: the usual request pays one compare)."""
    return request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"


def offered_protocols(headers: CIMultiDictProxy[str]) -> list[str]:
    return [p.strip() for value in headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ())
            for p in value.split(",") if p.strip()]


def protocol_key(protocols: list[str]) -> str | None:
    """The API key a browser sent as `openai-insecure-api-key.<key>`, if any."""
    for protocol in protocols:
        if protocol.startswith(KEY_PROTOCOL) and len(protocol) > len(KEY_PROTOCOL):
            return protocol[len(KEY_PROTOCOL):]
    return None


def socket_headers(request: web.Request, settings: Settings, key: str | None) -> Headers:
    """The upstream handshake's headers: as for HTTP (`upstream_headers`: hop-by-hop, tags and,
    with PROXY_API_KEYS, the client's key dropped and OPENAI_API_KEY added), minus the client's
    handshake fields. A key sent as a subprotocol is the client's Authorization: without
    PROXY_API_KEYS it goes upstream as sent, and OPENAI_API_KEY is not added beside it."""
    headers = [(name, value) for name, value in upstream_headers(request, settings)
               if name.lower() not in HANDSHAKE_HEADERS]
    if key is not None and settings.proxy_api_keys is None and "Authorization" not in request.headers:
        headers = [(name, value) for name, value in headers if name.lower() != "authorization"]
    return headers


def upstream_protocols(protocols: list[str], settings: Settings) -> list[str]:
    """The subprotocols offered upstream: with PROXY_API_KEYS the key protocol holds the proxy's
    key, never to be sent on (the upstream gets OPENAI_API_KEY in Authorization)."""
    if settings.proxy_api_keys is None:
        return protocols
    return [p for p in protocols if not p.startswith(KEY_PROTOCOL)]


def _with_bearer(headers: CIMultiDictProxy[str], key: str) -> CIMultiDictProxy[str]:
    copy = CIMultiDict(headers)
    copy[hdrs.AUTHORIZATION] = f"Bearer {key}"
    return CIMultiDictProxy(copy)


def _close_code(code: int | None) -> int:
    if code is None:
        return 1000
    return UNSENDABLE.get(code, code)


def _decode(data: str | bytes) -> dict[str, Any] | None:
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def _cancel_event(response_id: str) -> str:
    return orjson.dumps({"type": "response.cancel", "response_id": response_id}).decode()


def _error_event(message: str, code: str, client_event_id: Any) -> str:
    """A Realtime `error` event, as the SDKs surface it (`error.code`, `error.event_id`)."""
    kind = "insufficient_quota" if code == BUDGET_EXCEEDED else "service_unavailable"
    return orjson.dumps({"type": "error", "event_id": f"event_proxy_{time.time_ns():x}",
                         "error": {"type": kind, "code": code, "message": message,
                                   "param": None, "event_id": client_event_id}}).decode()


@dataclass(slots=True, eq=False)  # compared by identity: kept in a set (RELAYS)
class Session:
    """One relayed socket: its admission (tags, key hash), model, and responses in progress."""

    app: web.Application
    request: web.Request
    ticket: Ticket
    client: web.WebSocketResponse
    upstream: aiohttp.ClientWebSocketResponse
    model: str | None
    running: dict[str, float] = field(default_factory=dict)  # response id -> started
    transcription: str | None = None  # `input_audio_transcription.model`, when the session has it
    committed: dict[str, float] = field(default_factory=dict)  # audio item id -> committed
    send_upstream: asyncio.Lock = field(default_factory=asyncio.Lock)
    send_client: asyncio.Lock = field(default_factory=asyncio.Lock)
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    leaving: bool = False  # the client left: responses still running are drained, not relayed
    transport: asyncio.Transport | None = None  # the upstream's, to drop it (see _transport)
    stalled: bool = False  # a send to the upstream timed out: its connection was dropped
    stopping: bool = False  # the proxy shuts down: nothing more goes upstream but cancels
    reading: asyncio.Task[None] | None = None  # the upstream's frames to the client
    closing: asyncio.Future[None] | None = None  # the upstream's close, shared by who asks it

    @property
    def meter(self) -> Meter:
        return self.app[METER]

    async def to_client(self, data: str | bytes) -> None:
        """Send unless the client left; a client gone mid-send is leaving (the upstream is still
        read, so responses running are recorded)."""
        if self.leaving or self.client.closed:
            return
        try:
            async with self.send_client:
                if isinstance(data, str):
                    await self.client.send_str(data)
                else:
                    await self.client.send_bytes(data)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            self.leaving = True

    async def to_upstream(self, data: str | bytes, seconds: float | None = None) -> None:
        """Send within `seconds` (SEND_SECONDS); past it the upstream is dropped (`stalled`: a
        frame cut short leaves its stream unusable anyway) and the relay ends."""
        if self.upstream.closed or self.stalled:
            return
        try:
            async with asyncio.timeout(SEND_SECONDS if seconds is None else seconds), self.send_upstream:
                if isinstance(data, str):
                    await self.upstream.send_str(data)
                else:
                    await self.upstream.send_bytes(data)
        except TimeoutError:
            log.warning("the Realtime upstream stopped reading: its socket is dropped")
            self.stalled = True
            self.drop_upstream()

    def drop_upstream(self) -> None:
        """Cut the upstream's connection, unsent data and all: no close handshake."""
        if self.transport is not None:
            self.transport.abort()


async def relay(request: web.Request, path: str) -> web.StreamResponse:
    """Handle a WebSocket upgrade under /v1/: checks as for HTTP (keys, tags, budget), then the
    upstream socket, then the client's; errors before the upgrade are plain HTTP answers."""
    received = time.perf_counter()
    app = request.app
    settings = app[SETTINGS]
    protocols = offered_protocols(request.headers)
    key = protocol_key(protocols) if hdrs.AUTHORIZATION not in request.headers else None
    checked = _with_bearer(request.headers, key) if key is not None else request.headers
    keys = app[CLIENT_KEYS]
    bound = keys.admit(checked) if keys is not None else None  # 401 / 403
    campaign_id = bound or tag_value(request.headers, settings.campaign_header)
    session_id = tag_value(request.headers, settings.session_header)
    model = model_name(request.query.get("model"))
    authorization = checked.get(hdrs.AUTHORIZATION)
    facts = RequestFacts(model, True, False, 0, 0)  # nothing reserved: refused only at the limit
    try:
        ticket = await _admit(app, campaign_id, session_id, WEBSOCKET.operation, facts, authorization)
    except BudgetExceeded:
        _refused_span(app, request, campaign_id, session_id, facts, received)
        raise
    app[METER].release(ticket)  # a gate check: each response.done is charged as it comes
    headers = socket_headers(request, settings, key)
    if app[TRACER] is not None:  # spans are per response; the caller's context is not passed on
        headers = [(name, value) for name, value in headers if name.lower() not in TRACE_HEADERS]
    upstream = await _connect(request, app, path, headers, upstream_protocols(protocols, settings))
    chosen = upstream.protocol
    client = web.WebSocketResponse(protocols=(chosen,) if chosen else (), autoping=True,
                                   max_msg_size=settings.max_request_body_bytes)
    try:
        await client.prepare(request)
    except BaseException:
        await upstream.close()
        raise
    session = Session(app, request, ticket, client, upstream, model, transport=_transport(upstream))
    sessions = app[RELAYS]
    sessions.add(session)
    try:
        await _run(session)  # closes the upstream
    finally:
        sessions.discard(session)
    return client


def _transport(upstream: aiohttp.ClientWebSocketResponse) -> asyncio.Transport | None:
    """The upstream socket's transport: aiohttp's client WebSocket has no abort, and its close
    (or heartbeat failure) closes the transport gracefully, which waits for unsent data."""
    connection = upstream._conn
    return connection.transport if connection is not None else None


async def _connect(request: web.Request, app: web.Application, path: str, headers: Headers,
                   protocols: list[str]) -> aiohttp.ClientWebSocketResponse:
    """The upstream socket at the same path and query; its refusal becomes the client's answer
    (with the upstream's status), a failure to reach it 502 / 504."""
    upstream = app[UPSTREAM]
    query = request.rel_url.raw_query_string
    url = _upstream_url(upstream.base_url, path + ("?" + query if query else ""))
    try:
        return await upstream.client.ws_connect(
            url, protocols=protocols, headers=headers, autoping=True, compress=0,
            heartbeat=HEARTBEAT_SECONDS, max_msg_size=app[SETTINGS].max_request_body_bytes)
    except aiohttp.WSServerHandshakeError as exc:
        status = exc.status if exc.status >= 400 else 502
        raise ProxyError(status, f"The upstream API refused the WebSocket (HTTP {exc.status})",
                         type="invalid_request_error" if status < 500 else "server_error",
                         code="upstream_refused") from exc
    except TimeoutError as exc:
        raise ProxyError(504, "The upstream API did not answer in time", type="server_error",
                         code="upstream_timeout") from exc
    except aiohttp.ClientError as exc:
        raise ProxyError(502, f"The upstream API is unreachable: {type(exc).__name__}",
                         type="server_error", code="upstream_unreachable") from exc


async def _run(session: Session) -> None:
    """Both directions until either side closes; the client's side is read in the handler task
    (aiohttp's rule), the upstream's in a task of its own, never left behind."""
    from_upstream = session.reading = asyncio.create_task(_from_upstream(session),
                                                          name="realtime-upstream")
    code, reason = None, b""
    try:
        code, reason = await _from_client(session)
    finally:
        # Shielded: aiohttp cancels the handler once the client's connection is gone, and the
        # responses still running must be drained and recorded all the same (bounded in time).
        await uninterrupted(_end(session, from_upstream, code, reason))


async def _end(session: Session, from_upstream: asyncio.Task[None], code: int | None,
               reason: bytes) -> None:
    """The client's side is over: drain what runs, close the upstream with the client's code,
    and wait for the upstream's task (cancelled only past DRAIN_SECONDS)."""
    session.leaving = True
    if session.running and not session.upstream.closed and not (session.stalled or session.stopping):
        await _drain(session, from_upstream, DRAIN_SECONDS)
    await _close_upstream(session, GOING_AWAY if session.stopping else _close_code(code), reason)
    if not from_upstream.done():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(from_upstream), DRAIN_SECONDS)
        from_upstream.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await from_upstream


async def _close_upstream(session: Session, code: int, reason: bytes) -> None:
    """Close the upstream once, whoever asks first (the handler, a shutdown): a second close
    would find it closing and drop it mid-handshake."""
    if session.closing is None:
        session.closing = asyncio.ensure_future(_closed_upstream(session, code, reason))
    await asyncio.shield(session.closing)


async def _closed_upstream(session: Session, code: int, reason: bytes) -> None:
    """Close the upstream within CLOSE_SECONDS, then drop its connection whatever is left of it
    (nothing after a completed handshake; unsent data when the upstream stopped reading)."""
    if not session.upstream.closed and not session.stalled:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_SECONDS):
                await session.upstream.close(code=code, message=reason)
    session.drop_upstream()


async def _drain(session: Session, from_upstream: asyncio.Task[None], seconds: float) -> None:
    """The client left mid-response: cancel what runs upstream and wait for its `response.done`,
    whose usage OpenAI bills; `seconds` in all, the cancels' sends included."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    for response_id in list(session.running):
        with contextlib.suppress(Exception):
            await session.to_upstream(_cancel_event(response_id), max(0.0, deadline - loop.time()))
    waiter = asyncio.ensure_future(session.drained.wait())
    try:
        await asyncio.wait({from_upstream, waiter}, timeout=max(0.0, deadline - loop.time()),
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


async def _from_client(session: Session) -> tuple[int | None, bytes]:
    """Client frames to the upstream, unchanged; a `response.create` is asked of the budget.
    Returns the code and reason of the client's close frame, to pass on."""
    client = session.client
    while True:
        message = await client.receive()
        if message.type is WSMsgType.TEXT or message.type is WSMsgType.BINARY:
            if session.stopping:
                continue  # the socket closes in seconds: nothing new may start upstream
            data: str | bytes = message.data
            if _may_create(data) and not await _response_allowed(session, data):
                continue
            if (UPDATE_TEXT in data) if isinstance(data, str) else (UPDATE_BYTES in data):
                _session_update(session, data)
            await session.to_upstream(data)
            if session.stalled:
                return UPSTREAM_STALLED, b""
        elif message.type is WSMsgType.CLOSE:
            return message.data, _reason(message.extra)
        elif message.type in ENDED:
            return None, b""


def _reason(extra: Any) -> bytes:
    return extra.encode()[:MAX_REASON] if isinstance(extra, str) else b""


def _session_update(session: Session, data: str | bytes) -> None:
    """A client's `session.update` naming a transcription model: kept unless the server's echo
    names one (its `session.updated` may leave the setting out)."""
    event = _decode(data)
    if event is not None and event.get("type") == "session.update":
        model = _transcription_model(event.get("session"))
        if model is not None:
            session.transcription = model


def _transcription_model(described: Any) -> str | None:
    """The transcription model a session object names: `input_audio_transcription.model` (the
    beta shape) or `audio.input.transcription.model` (the GA shape)."""
    if not isinstance(described, dict):
        return None
    setting = described.get("input_audio_transcription")
    audio = described.get("audio")
    if setting is None and isinstance(audio, dict) and isinstance(audio.get("input"), dict):
        setting = audio["input"].get("transcription")
    return model_name(setting.get("model")) if isinstance(setting, dict) else None


def _may_create(data: str | bytes) -> bool:
    """Whether a client frame may be a `response.create` (then decoded): without its name in
    plain text nor any backslash, no JSON spells that type. The test is two scans, no decode:
    the large frames, `input_audio_buffer.append` with base64 audio, have neither. Binary frames
    alike: one holding a UTF-8 JSON event may be read as the text one."""
    if isinstance(data, str):
        return "\\" in data or CREATE_TEXT in data
    return b"\\" in data or CREATE_BYTES in data


async def _response_allowed(session: Session, data: str | bytes) -> bool:
    """Ask the gate for a client's `response.create`; refused: an `error` event instead. A frame
    that may be one but is no JSON object orjson reads is asked for too (a laxer parser upstream
    may read it as one); under the limit it goes on unchanged as any frame."""
    event = _decode(data)
    if event is not None and event.get("type") != "response.create":
        return True
    refused = await _refusal(session)
    if refused is None:
        return True
    event_id = event.get("event_id") if event is not None else None
    await session.to_client(_error_event(str(refused), _refusal_code(refused), event_id))
    return False


async def _refusal(session: Session) -> CostingError | None:
    """The gate asked as for any billable call (nothing reserved; counted when refused). A ledger
    that cannot take records (fail-closed during an outage, a full buffer or spool) refuses too,
    as it does HTTP calls, rather than end the socket: the upstream is still read, so responses
    running are recorded."""
    ticket = session.ticket
    try:
        admitted = await _admit(session.app, ticket.campaign_id, ticket.session_id, ticket.operation,
                                ticket.facts, None)
    except CostingError as exc:
        if isinstance(exc, BudgetExceeded):
            _refused_span(session.app, session.request, ticket.campaign_id, ticket.session_id,
                          RequestFacts(session.model, True, False, 0, 0), time.perf_counter())
        return exc
    session.meter.release(admitted)
    return None


def _refusal_code(refused: CostingError) -> str:
    return BUDGET_EXCEEDED if isinstance(refused, BudgetExceeded) else LEDGER_UNAVAILABLE


async def _from_upstream(session: Session) -> None:
    """Upstream frames to the client, unchanged; watched events metered first. When the upstream
    closes, the client is closed with its code and reason."""
    upstream = session.upstream
    reason = b""
    try:
        while True:
            message = await upstream.receive()
            if message.type is WSMsgType.TEXT:
                data: str = message.data
                if any(name in data for name in WATCHED_SERVER):
                    await _watch(session, data)
                await session.to_client(data)
            elif message.type is WSMsgType.BINARY:
                await session.to_client(message.data)
            elif message.type is WSMsgType.CLOSE:
                reason = _reason(message.extra)
                break
            elif message.type in ENDED:
                break
    finally:
        session.drained.set()
        if not session.client.closed:
            # No close code: the connection was lost, not closed (1006), sent as 1011.
            await _close_client(session, _close_code(upstream.close_code or 1006), reason)


async def _close_client(session: Session, code: int, reason: bytes) -> None:
    """Close the client within CLOSE_SECONDS, else drop its connection (a client that stopped
    reading never answers, and a graceful close would wait for its unsent data)."""
    transport = session.request.transport
    try:
        async with asyncio.timeout(CLOSE_SECONDS):
            await session.client.close(code=code, message=reason)
    except Exception:
        if transport is not None:
            transport.abort()


async def _watch(session: Session, data: str) -> None:
    """Session and transcription models, responses started (cancelled at the limit), responses
    done and transcriptions completed (recorded)."""
    event = _decode(data)
    if event is None:
        return
    kind = event.get("type")
    if kind in ("session.created", "session.updated"):
        described = event.get("session")
        model = described.get("model") if isinstance(described, dict) else None
        if isinstance(model, str) and model:
            session.model = model[:MAX_MODEL_LENGTH]
        transcription = _transcription_model(described)
        if transcription is not None:
            session.transcription = transcription
    elif kind == TRANSCRIBED:
        await _record_transcription(session, event)
    elif kind == COMMITTED:
        item_id = event.get("item_id")
        if isinstance(item_id, str) and session.transcription is not None:
            if len(session.committed) >= MAX_COMMITTED:  # never transcribed: the oldest goes
                del session.committed[next(iter(session.committed))]
            session.committed[item_id] = time.perf_counter()
    elif kind == "response.created":
        response = event.get("response")
        response_id = response.get("id") if isinstance(response, dict) else None
        if isinstance(response_id, str):
            session.running[response_id] = time.perf_counter()
            session.drained.clear()
            await _stop_if_over(session, response_id)
    elif kind == "response.done":
        await _record(session, event.get("response"))


async def _stop_if_over(session: Session, response_id: str) -> None:
    """A response started while the campaign is at its limit (the upstream's own, with server
    VAD; the client's are asked before they are sent) is cancelled; the client is told. So is
    one started while the proxy shuts down (not told: its socket is closing)."""
    if session.stopping:
        await session.to_upstream(_cancel_event(response_id), CLOSE_SECONDS)
        return
    refused = await _refusal(session)
    if refused is None:
        return
    await session.to_upstream(_cancel_event(response_id))
    await session.to_client(_error_event(f"{refused} (response {response_id} was cancelled)",
                                         _refusal_code(refused), None))


async def _record(session: Session, response: Any) -> None:
    """One ledger row for one `response.done`, spooled before the event goes on (uninterrupted:
    a departing client never cuts a record short); a span and the duration metric."""
    reported = from_realtime_response(response, session.model)
    response_id = reported.response_id
    started = session.running.pop(response_id, None) if response_id else None
    if started is None:
        started = session.ticket.started
    meter = session.meter
    entry = await uninterrupted(meter.record_part(session.ticket, reported, started=started))
    if not session.running:
        session.drained.set()
    status = response.get("status") if isinstance(response, dict) else None
    _observe(session, reported, entry, started, status if isinstance(status, str) else None)


async def _record_transcription(session: Session, event: dict[str, Any]) -> None:
    """One ledger row for one completed input audio transcription that reports usage, at the
    session's transcription model's price, spooled before the event goes on (as `_record`)."""
    reported = from_transcription(event, session.transcription)
    if reported.usage is None:
        return
    item_id = reported.response_id
    started = session.committed.pop(item_id, None) if item_id else None
    if started is None:  # its commit unseen: timed from here
        started = time.perf_counter()
    entry = await uninterrupted(session.meter.record_part(session.ticket, reported, started=started,
                                                          operation=REALTIME_TRANSCRIPTION))
    _observe(session, reported, entry, started, None)


def _observe(session: Session, reported: Reported, entry: UsageEntry, started: float,
             status: str | None) -> None:
    """A recorded part's span and duration metric."""
    app = session.app
    seconds = time.perf_counter() - started
    app[METRICS].observe_operation(entry.operation, session.ticket.facts.model, entry.response_model,
                                   seconds, "")
    tracer = app[TRACER]
    if tracer is not None:
        facts = RequestFacts(reported.model, True, False, 0, None)
        span = tracer.start(session.request.headers, [], entry.operation, entry.campaign_id,
                            entry.session_id, facts, {}, started)
        if span is not None:
            span.finish = [status] if status is not None else None
            tracer.end(span, 200, None, entry, reported)


def _refused_span(app: web.Application, request: web.Request, campaign_id: str, session_id: str,
                  facts: RequestFacts, received: float) -> None:
    """A socket or a response the budget refused: its span, as for any refused call."""
    tracer = app[TRACER]
    if tracer is not None:
        tracer.refused(request.headers, "realtime", campaign_id, session_id, facts, received)


def setup(app: web.Application) -> None:
    """The open sockets' registry, and their end at shutdown (see `going_away`)."""
    app.cleanup_ctx.append(_sessions)
    app.on_shutdown.append(going_away)


async def _sessions(app: web.Application) -> AsyncIterator[None]:
    """The open sockets; any left at cleanup (a handler past the shutdown timeout) has its
    upstream connection dropped before the upstream client is closed, which would wait for it."""
    sessions: set[Session] = set()
    app[RELAYS] = sessions
    yield
    for session in sessions:
        session.drop_upstream()


async def going_away(app: web.Application) -> None:
    """At shutdown, before aiohttp waits for handlers, then cancels them, then closes the upstream
    client: each open socket's responses cancelled and recorded, then its sides closed (1001)."""
    sessions: list[Session] = [*app[RELAYS]] if RELAYS in app else []
    if sessions:
        seconds = min(SHUTDOWN_DRAIN_SECONDS, app[SETTINGS].shutdown_timeout_seconds)
        await asyncio.gather(*(_go_away(session, seconds) for session in sessions),
                             return_exceptions=True)


async def _go_away(session: Session, seconds: float) -> None:
    """One socket at shutdown: what runs is cancelled and its `response.done` (billed) waited for,
    `seconds` at most, and recorded as it comes; then the client, then the upstream, closed with
    1001. The client is closed first: it learns at once, and its handler stops relaying."""
    session.stopping = True
    reading = session.reading
    if session.running and reading is not None and not session.upstream.closed and not session.stalled:
        await _drain(session, reading, seconds)
    if not session.client.closed:
        await _close_client(session, GOING_AWAY, b"server shutting down")
    await _close_upstream(session, GOING_AWAY, b"")
