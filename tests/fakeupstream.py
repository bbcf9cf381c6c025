"""A fake OpenAI API on a real loopback port: the upstream of the proxy in tests.

Answers chat completions, legacy completions, embeddings and responses (streamed and not), and
compacts conversations (`/v1/responses/compact`), with bodies shaped like OpenAI's, and can
misbehave on request: delays, error statuses, compressed bodies, streams cut off mid-way,
half-written SSE lines, resets. Every request is recorded.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import struct
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

import brotli
import orjson
from aiohttp import WSMsgType, web

ERRORS = {400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
          404: ("invalid_request_error", "model_not_found"), 429: ("requests", "rate_limit_exceeded"),
          500: ("server_error", None), 503: ("server_error", None)}


@dataclass
class Behaviour:
    prompt_tokens: int = 12
    completion_tokens: int | None = None  # None: one per streamed word
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    model: str | None = None
    reply: str = "The goblin king grins."
    delay: float = 0.0
    chunk_delay: float = 0.0
    status: int = 200
    error_body: dict[str, Any] | None = None
    encoding: str | None = None  # gzip, deflate or br for JSON bodies
    # JSON bodies in this encoding (zstd too) only when the request's Accept-Encoding offers it,
    # as an API or the CDN in front of it negotiates; else uncompressed.
    negotiated_encoding: str | None = None
    disconnect_after_chunks: int | None = None
    omit_usage: bool = False
    half_line_then_close: bool = False
    reset_before_response: bool = False
    response_id: str | None = None
    hold: asyncio.Event | None = None
    # Added for the reliability tests (all off by default):
    end_after_chunks: int | None = None  # stream: clean EOF after N events (no usage, no [DONE])
    stall_after_chunks: int | None = None  # stream: after N events, wait `stall_seconds` silently
    stall_seconds: float = 0.0
    body_stall: float = 0.0  # JSON: send the headers, wait this long, then the body
    truncate_body: bool = False  # JSON: send the headers and half the body, then reset
    strict_types: bool = False  # 400 (as OpenAI does) for wrongly typed well-known body fields
    stream_whole: bool = False  # stream: every event in one body with a length, in one write
    # Added for ledger completeness:
    id_pool: int | None = None  # ids cycle through this many values, as Ollama's chatcmpl-<0..998>
    background_polls: int = 2  # a background response is in_progress for this many retrievals
    # Added for the price dimensions (all off by default):
    service_tier: str | None = None  # answered tier; None: echo the request's flex/priority/default
    audio_input_tokens: int = 0  # part of prompt_tokens / input_tokens
    audio_output_tokens: int = 0  # part of completion_tokens / output_tokens
    web_search_calls: int = 0  # Responses: this many `web_search_call` output items
    # Prompt-cache writes (part of prompt_tokens / input_tokens), reported as the newest models
    # do (`cache_write_tokens` in the input details); None: the field is absent, as elsewhere.
    cache_write_tokens: int | None = None
    # Added for usage on every chunk: a stream with include_usage carries the usage so far on every
    # chunk (vLLM's `continuous_usage_stats`), then the whole in the usage-only chunk.
    running_usage: bool = False
    # Added for the Realtime API (WebSocket): each response.create is answered with
    # response.created, `realtime_deltas` deltas (text and audio), then response.done with
    # `realtime_usage` (its `usage` object, Realtime-shaped); `realtime_hold` set: response.done
    # waits for it (or for a response.cancel, answered with the usage of a cancelled response).
    realtime_usage: dict[str, Any] = field(default_factory=lambda: realtime_usage())
    realtime_deltas: int = 3
    realtime_hold: asyncio.Event | None = None
    realtime_protocol: str | None = "realtime"  # the subprotocol chosen, when the client offers it
    # Set: after session.created the fake stops reading its socket (a hung upstream) until it is set.
    realtime_stall: asyncio.Event | None = None
    # Input audio transcription: with `input_audio_transcription` set by a session.update, each
    # input_audio_buffer.commit is answered with input_audio_buffer.committed, then
    # conversation.item.input_audio_transcription.completed carrying this usage (whisper-1: a
    # duration, as OpenAI reports it). False: session.updated leaves the setting out.
    realtime_transcription_usage: dict[str, Any] = field(default_factory=lambda: transcription_usage())
    realtime_echo_transcription: bool = True


def transcription_usage(text_in: int = 4, audio_in: int = 120, text_out: int = 25) -> dict[str, Any]:
    """A Realtime transcription's `usage` (gpt-4o-transcribe family: tokens)."""
    return {"type": "tokens", "input_tokens": text_in + audio_in, "output_tokens": text_out,
            "total_tokens": text_in + audio_in + text_out,
            "input_token_details": {"text_tokens": text_in, "audio_tokens": audio_in}}


def realtime_usage(text_in: int = 20, audio_in: int = 30, cached_text: int = 5, cached_audio: int = 10,
                   text_out: int = 7, audio_out: int = 40) -> dict[str, Any]:
    """A Realtime `response.usage` object with these counts (cached ones part of the inputs)."""
    return {"total_tokens": text_in + audio_in + text_out + audio_out,
            "input_tokens": text_in + audio_in, "output_tokens": text_out + audio_out,
            "input_token_details": {"text_tokens": text_in, "audio_tokens": audio_in, "image_tokens": 0,
                                    "cached_tokens": cached_text + cached_audio,
                                    "cached_tokens_details": {"text_tokens": cached_text,
                                                              "audio_tokens": cached_audio,
                                                              "image_tokens": 0}},
            "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out}}


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    json: Any = None


@dataclass
class FakeUpstream:
    path_prefix: str = ""
    behaviour: Behaviour = field(default_factory=Behaviour)
    requests: list[Recorded] = field(default_factory=list)
    url: str = ""
    # Background responses by id: [body of the creating request, retrievals so far, created_at].
    background: dict[str, list[Any]] = field(default_factory=dict)
    issued: int = 0  # ids minted so far (for id_pool)
    # Paths of streamed answers the proxy stopped reading (its connection closed under the fake).
    closed_by_peer: list[str] = field(default_factory=list)
    _rt_cancelled: set[Any] = field(default_factory=set)
    peer_closed: asyncio.Event = field(default_factory=asyncio.Event)
    # Realtime sockets: frames each way, as text (str) or binary (bytes), and how sockets closed.
    realtime_received: list[str | bytes] = field(default_factory=list)
    realtime_sent: list[str | bytes] = field(default_factory=list)
    realtime_closes: list[tuple[int | None, str]] = field(default_factory=list)
    realtime_closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        app = web.Application(client_max_size=100 * 1024 * 1024)
        app.router.add_route("*", self.path_prefix + "/v1/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}{self.path_prefix}"

    async def close(self) -> None:
        await self._runner.cleanup()

    def hits(self, suffix: str) -> int:
        return sum(1 for r in self.requests if r.path.endswith(suffix))

    # -- handling --------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        path = request.path.removeprefix(self.path_prefix)
        query = request.raw_path.partition("?")[2]
        recorded = Recorded(request.method, path, query, dict(request.headers), body)
        try:
            recorded.json = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            recorded.json = None
        self.requests.append(recorded)
        b = self.behaviour
        if request.headers.get("Upgrade", "").lower() == "websocket" and path == "/v1/realtime":
            return await self._realtime(request)
        if b.hold is not None:
            await b.hold.wait()
        if b.delay:
            await asyncio.sleep(b.delay)
        if b.reset_before_response:
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if b.status != 200:
            kind, code = ERRORS.get(b.status, ("server_error", None))
            error = b.error_body or {"error": {"message": f"fake error {b.status}", "type": kind,
                                               "param": None, "code": code}}
            return web.json_response(error, status=b.status)
        if path.startswith("/v1/responses/") and (
                (request.method == "GET" and path.count("/") == 3) or path.endswith("/cancel")):
            return await self._background_state(request, path)
        if path == "/v1/models" and request.method in ("GET", "HEAD"):  # HEAD: its length, no body
            return self._json({"object": "list", "data": [
                {"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "system"}]})
        handlers = {"/v1/chat/completions": self._chat, "/v1/completions": self._completions,
                    "/v1/embeddings": self._embeddings, "/v1/responses": self._responses,
                    "/v1/responses/compact": self._compact}
        handler = handlers.get(path) if request.method == "POST" else None
        if handler is None:
            return web.json_response({"method": request.method, "path": path,
                                      "query": query,
                                      "headers": dict(request.headers), "body": body.decode("latin-1")})
        if not isinstance(recorded.json, dict):
            return web.json_response({"error": {"message": "We could not parse the JSON body of your "
                                                "request.", "type": "invalid_request_error",
                                                "param": None, "code": None}}, status=400)
        if b.strict_types:
            wrong = _wrongly_typed(recorded.json)
            if wrong is not None:
                return web.json_response({"error": {"message": f"Invalid type for '{wrong}'.",
                                                    "type": "invalid_request_error", "param": wrong,
                                                    "code": "invalid_type"}}, status=400)
        return self._negotiated(request, await handler(request, recorded.json))

    # -- Realtime (WebSocket) ------------------------------------------------------------------

    async def _realtime(self, request: web.Request) -> web.WebSocketResponse:
        """A Realtime session: session.created, then answers to the client's events. Test-only
        events: `fake.close` (the upstream closes with `code` and `reason`), `fake.vad` (a response
        starts as server VAD starts one). Binary frames are echoed."""
        b = self.behaviour
        ws = web.WebSocketResponse(protocols=(b.realtime_protocol,) if b.realtime_protocol else ())
        await ws.prepare(request)
        model = request.query.get("model") or b.model or "gpt-realtime"
        responding: set[asyncio.Task[None]] = set()
        configured: dict[str, Any] = {}  # what session.update events set
        await self._rt_send(ws, {"type": "session.created", "event_id": "event_1",
                                 "session": {"id": "sess_1", "object": "realtime.session",
                                             "type": "realtime", "model": model}})
        if b.realtime_stall is not None and request.transport is not None:
            request.transport.pause_reading()
            await b.realtime_stall.wait()
            request.transport.resume_reading()
        closed: tuple[int | None, str] = (None, "")
        try:
            while True:
                message = await ws.receive()
                if message.type is WSMsgType.CLOSE:
                    closed = (message.data, message.extra or "")
                    break
                if message.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    closed = (ws.close_code, "")
                    break
                if message.type is WSMsgType.BINARY:
                    self.realtime_received.append(message.data)
                    self.realtime_sent.append(message.data)
                    await ws.send_bytes(message.data)
                    continue
                if message.type is not WSMsgType.TEXT:
                    continue
                self.realtime_received.append(message.data)
                event = orjson.loads(message.data)
                kind = event.get("type")
                if kind in ("response.create", "fake.vad"):  # fake.vad: as server VAD starts one
                    task = asyncio.create_task(self._rt_respond(ws, event))
                    responding.add(task)
                    task.add_done_callback(responding.discard)
                elif kind == "response.cancel":
                    self._rt_cancelled.add(event.get("response_id"))
                    if b.realtime_hold is not None:
                        b.realtime_hold.set()
                elif kind == "session.update":
                    configured.update(event.get("session") or {})
                    session = {"type": "realtime", "model": model, **configured}
                    if not b.realtime_echo_transcription:
                        session.pop("input_audio_transcription", None)
                    await self._rt_send(ws, {"type": "session.updated", "event_id": "event_u",
                                             "session": session})
                elif kind == "input_audio_buffer.commit":
                    await self._rt_transcribe(ws, configured.get("input_audio_transcription"))
                elif kind == "fake.close":
                    await ws.close(code=event["code"], message=event["reason"].encode())
                    closed = (event["code"], "closed by the fake")
                    break
        finally:
            for task in list(responding):
                task.cancel()
            self.realtime_closes.append(closed)
            self.realtime_closed.set()
        return ws

    async def _rt_transcribe(self, ws: web.WebSocketResponse, setting: Any) -> None:
        """The committed audio item, and its transcription when the session has one."""
        self.issued += 1
        item_id = f"item_{self.issued}"
        await self._rt_send(ws, {"type": "input_audio_buffer.committed", "event_id": f"event_m{self.issued}",
                                 "previous_item_id": None, "item_id": item_id})
        if not isinstance(setting, dict):
            return
        usage = ({"type": "duration", "seconds": 2.4} if setting.get("model") == "whisper-1"
                 else self.behaviour.realtime_transcription_usage)
        await self._rt_send(ws, {"type": "conversation.item.input_audio_transcription.completed",
                                 "event_id": f"event_t{self.issued}", "item_id": item_id,
                                 "content_index": 0, "transcript": "Hello there.", "usage": usage})

    async def _rt_send(self, ws: web.WebSocketResponse, event: dict[str, Any]) -> None:
        text = orjson.dumps(event).decode()
        self.realtime_sent.append(text)
        await ws.send_str(text)

    async def _rt_respond(self, ws: web.WebSocketResponse, request: dict[str, Any]) -> None:
        b = self.behaviour
        self.issued += 1
        response_id = f"resp_{self.issued}"
        response: dict[str, Any] = {"id": response_id, "object": "realtime.response",
                                    "status": "in_progress", "output": [], "usage": None}
        await self._rt_send(ws, {"type": "response.created", "event_id": f"event_c{self.issued}",
                                 "response": response})
        for i in range(b.realtime_deltas):
            kind = "response.output_audio.delta" if i % 2 else "response.output_text.delta"
            delta = base64.b64encode(bytes(64)).decode() if i % 2 else f"word{i} "
            await self._rt_send(ws, {"type": kind, "event_id": f"event_d{self.issued}_{i}",
                                     "response_id": response_id, "delta": delta})
            if b.chunk_delay:
                await asyncio.sleep(b.chunk_delay)
        if b.realtime_hold is not None:
            await b.realtime_hold.wait()
        cancelled = response_id in self._rt_cancelled
        usage = realtime_usage(text_in=3, audio_in=0, cached_text=0, cached_audio=0, text_out=1,
                               audio_out=0) if cancelled else b.realtime_usage
        await self._rt_send(ws, {"type": "response.done", "event_id": f"event_e{self.issued}",
                                 "response": {**response, "status": "cancelled" if cancelled
                                              else "completed", "usage": usage}})

    def _negotiated(self, request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        """`negotiated_encoding` applied to a whole JSON body, if the request accepts it."""
        encoding = self.behaviour.negotiated_encoding
        offered = {token.partition(";")[0].strip().lower()
                   for token in request.headers.get("Accept-Encoding", "").split(",")}
        if (encoding is None or encoding not in offered or type(response) is not web.Response
                or not isinstance(response.body, bytes) or response.headers.get("Content-Encoding")):
            return response
        response.body = ENCODERS[encoding](response.body)
        response.headers["Content-Encoding"] = encoding
        return response

    def _model(self, body: dict[str, Any]) -> str:
        if self.behaviour.model:
            return self.behaviour.model
        model = str(body.get("model") or "gpt-4o-mini")
        return model + "-2024-07-18" if model == "gpt-4o-mini" else model

    def _id(self, prefix: str) -> str:
        if self.behaviour.id_pool:
            self.issued += 1
            return f"{prefix}{self.issued % self.behaviour.id_pool}"
        return self.behaviour.response_id or f"{prefix}{uuid.uuid4().hex}"

    def _words(self) -> list[str]:
        words = self.behaviour.reply.split(" ")
        return [w if i == 0 else " " + w for i, w in enumerate(words)]

    def _completion_tokens(self) -> int:
        b = self.behaviour
        return b.completion_tokens if b.completion_tokens is not None else len(self._words())

    def _chat_usage(self) -> dict[str, Any]:
        b = self.behaviour
        out = self._completion_tokens()
        return {"prompt_tokens": b.prompt_tokens, "completion_tokens": out,
                "total_tokens": b.prompt_tokens + out,
                "prompt_tokens_details": self._input_details(),
                "completion_tokens_details": {"reasoning_tokens": b.reasoning_tokens,
                                              "audio_tokens": b.audio_output_tokens,
                                              "accepted_prediction_tokens": 0,
                                              "rejected_prediction_tokens": 0}}

    def _input_details(self) -> dict[str, int]:
        b = self.behaviour
        details = {"cached_tokens": b.cached_tokens, "audio_tokens": b.audio_input_tokens}
        if b.cache_write_tokens is not None:
            details["cache_write_tokens"] = b.cache_write_tokens
        return details

    def _json(self, payload: dict[str, Any]) -> web.Response:
        data = orjson.dumps(payload)
        headers = {"Content-Type": "application/json", "x-request-id": f"req_{uuid.uuid4().hex[:12]}"}
        encoding = self.behaviour.encoding
        if encoding:
            data = ENCODERS[encoding](data)
            headers["Content-Encoding"] = encoding
        if self.behaviour.body_stall or self.behaviour.truncate_body:
            return _SlowResponse(body=data, headers=headers, stall=self.behaviour.body_stall,
                                 truncate=self.behaviour.truncate_body)  # type: ignore[return-value]
        return web.Response(body=data, headers=headers)

    async def _stream(self, request: web.Request, events: list[bytes]) -> web.StreamResponse:
        b = self.behaviour
        if b.stream_whole:
            return web.Response(body=b"".join(events), headers={
                "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            for index, event in enumerate(events):
                if b.disconnect_after_chunks is not None and index >= b.disconnect_after_chunks:
                    if b.half_line_then_close:
                        await response.write(b'data: {"id":"chatc')
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                if b.end_after_chunks is not None and index >= b.end_after_chunks:
                    break
                if b.stall_after_chunks is not None and index == b.stall_after_chunks:
                    await self._stall(request, b.stall_seconds)
                await response.write(event)
                if b.chunk_delay:
                    await asyncio.sleep(b.chunk_delay)
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            self._peer_gone(request)
            raise
        return response

    async def _stall(self, request: web.Request, seconds: float) -> None:
        """Say nothing for `seconds`, but notice at once when the peer closes the connection."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ConnectionResetError("the peer closed the connection during a stall")
            await asyncio.sleep(0.01)

    def _peer_gone(self, request: web.Request) -> None:
        self.closed_by_peer.append(request.path.removeprefix(self.path_prefix))
        self.peer_closed.set()

    async def _chat(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return await self._choices(request, body, chat=True)

    async def _completions(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return await self._choices(request, body, chat=False)

    async def _choices(self, request: web.Request, body: dict[str, Any], *, chat: bool) -> web.StreamResponse:
        b = self.behaviour
        rid, model, created = self._id("chatcmpl-" if chat else "cmpl-"), self._model(body), int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            choice: dict[str, Any] = (
                {"index": 0, "message": {"role": "assistant", "content": b.reply, "refusal": None},
                 "logprobs": None, "finish_reason": "stop"} if chat else
                {"index": 0, "text": b.reply, "logprobs": None, "finish_reason": "stop"})
            payload: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model,
                                       "choices": [choice], "system_fingerprint": "fp_fake"}
            if self._tier(body):
                payload["service_tier"] = self._tier(body)
            if not b.omit_usage:
                payload["usage"] = self._chat_usage()
            return self._json(payload)
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], usage: Any = None, final: bool = False) -> bytes:
            event: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model,
                                     "system_fingerprint": "fp_fake", "choices": choices}
            if self._tier(body):
                event["service_tier"] = self._tier(body)
            if include_usage:
                event["usage"] = usage
            return b"data: " + orjson.dumps(event) + b"\n\n"

        def piece(text: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                {"content": text} if text is not None else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        def so_far(tokens: int) -> dict[str, Any] | None:
            if not b.running_usage:
                return None
            return {"prompt_tokens": b.prompt_tokens, "completion_tokens": tokens,
                    "total_tokens": b.prompt_tokens + tokens}

        events = [chunk([piece(None, role=True)], so_far(0))] if chat else []
        events += [chunk([piece(word)], so_far(n)) for n, word in enumerate(self._words(), 1)]
        events.append(chunk([piece(None if chat else "", "stop")]))
        if include_usage and not b.omit_usage:
            events.append(chunk([], self._chat_usage(), final=True))
        events.append(b"data: [DONE]\n\n")
        return await self._stream(request, events)

    async def _embeddings(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        inputs = body.get("input")
        count = len(inputs) if isinstance(inputs, list) and not all(isinstance(i, int) for i in inputs) else 1
        vector = [0.1 * (i + 1) for i in range(8)]
        encoded: Any = vector
        if body.get("encoding_format") == "base64":
            encoded = base64.b64encode(struct.pack("<8f", *vector)).decode()
        payload = {"object": "list", "model": self._model(body),
                   "data": [{"object": "embedding", "index": i, "embedding": encoded} for i in range(count)],
                   "usage": {"prompt_tokens": self.behaviour.prompt_tokens,
                             "total_tokens": self.behaviour.prompt_tokens}}
        if self.behaviour.omit_usage:
            del payload["usage"]
        return self._json(payload)

    def _tier(self, body: dict[str, Any]) -> str | None:
        asked = body.get("service_tier")
        if self.behaviour.service_tier:
            return self.behaviour.service_tier
        return ("default" if asked == "auto" else asked) if isinstance(asked, str) else None

    def _response(self, rid: str, model: str, status: str, text: str | None,
                  body: dict[str, Any] | None = None) -> dict[str, Any]:
        b = self.behaviour
        searches = [] if text is None else [
            {"id": f"ws_fake{i}", "type": "web_search_call", "status": "completed",
             "action": {"type": "search", "query": "goblin king"}} for i in range(b.web_search_calls)]
        output = [] if text is None else [*searches, {
            "id": "msg_fake", "type": "message", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}]
        usage = None if status != "completed" or b.omit_usage else self._responses_usage()
        response = {"id": rid, "object": "response", "created_at": int(time.time()), "status": status,
                    "model": model, "output": output, "parallel_tool_calls": True, "tool_choice": "auto",
                    "tools": (body or {}).get("tools", []), "temperature": 1.0, "top_p": 1.0, "error": None,
                    "incomplete_details": None, "instructions": None, "metadata": {}, "usage": usage}
        tier = self._tier(body or {})
        if tier:
            response["service_tier"] = tier
        return response

    def _responses_usage(self) -> dict[str, Any]:
        b = self.behaviour
        out = self._completion_tokens()
        return {"input_tokens": b.prompt_tokens,
                "input_tokens_details": self._input_details(),
                "output_tokens": out,
                "output_tokens_details": {"reasoning_tokens": b.reasoning_tokens,
                                          "audio_tokens": b.audio_output_tokens},
                "total_tokens": b.prompt_tokens + out}

    async def _compact(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        """POST /v1/responses/compact: the conversation as one encrypted compaction item, and the
        usage of the compaction pass (Responses-shaped; the object names no model)."""
        payload: dict[str, Any] = {
            "id": self._id("cmp_"), "object": "response.compaction", "created_at": int(time.time()),
            "output": [{"id": "cmpi_fake", "type": "compaction", "encrypted_content": "gAAAAfake"}]}
        if not self.behaviour.omit_usage:
            payload["usage"] = self._responses_usage()
        return self._json(payload)

    async def _background_state(self, request: web.Request, path: str) -> web.StreamResponse:
        """GET /v1/responses/{id} (or ?stream=true) and POST .../cancel of a background response:
        in progress for `background_polls` retrievals, then completed with its usage."""
        parts = path.split("/")
        rid, cancel = parts[3], len(parts) == 5 and parts[4] == "cancel"
        if rid not in self.background:
            return web.json_response({"error": {"message": f"No response with id '{rid}'.",
                                                "type": "invalid_request_error", "param": None,
                                                "code": None}}, status=404)
        body, polls, created_at = self.background[rid]
        self.background[rid][1] = polls + 1
        model = self._model(body)
        status = "cancelled" if cancel else (
            "completed" if polls >= self.behaviour.background_polls else "in_progress")
        state = {**self._response(rid, model, "completed" if status == "completed" else status,
                                  self.behaviour.reply if status == "completed" else None, body),
                 "background": True, "status": status, "created_at": created_at}
        if status == "cancelled":  # billed for the work done before the cancellation
            state["usage"] = {"input_tokens": self.behaviour.prompt_tokens, "output_tokens": 1,
                              "input_tokens_details": {"cached_tokens": 0},
                              "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 13}
        if request.query.get("stream") != "true" or status != "completed":
            return self._json(state)
        events = [f"event: response.{status}\n".encode() + b"data: "
                  + orjson.dumps({"type": f"response.{status}", "sequence_number": 0,
                                  "response": state}) + b"\n\n"]
        return await self._stream(request, events)

    async def _responses(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        rid, model = self._id("resp_"), self._model(body)
        if body.get("background") is True and not body.get("stream"):
            queued = self._response(rid, model, "queued", None)
            self.background[rid] = [body, 0, queued["created_at"]]
            return self._json({**queued, "background": True})
        if not body.get("stream"):
            return self._json(self._response(rid, model, "completed", self.behaviour.reply, body))
        seq = iter(range(10_000))

        def event(kind: str, **fields: Any) -> bytes:
            data = {"type": kind, "sequence_number": next(seq), **fields}
            return f"event: {kind}\n".encode() + b"data: " + orjson.dumps(data) + b"\n\n"

        item = {"id": "msg_fake", "type": "message", "status": "in_progress", "role": "assistant",
                "content": []}
        part = {"type": "output_text", "text": "", "annotations": []}
        done_part = {**part, "text": self.behaviour.reply}
        done_item = {**item, "status": "completed", "content": [done_part]}
        events = [event("response.created", response=self._response(rid, model, "in_progress", None)),
                  event("response.in_progress", response=self._response(rid, model, "in_progress", None)),
                  event("response.output_item.added", output_index=0, item=item),
                  event("response.content_part.added", item_id="msg_fake", output_index=0,
                        content_index=0, part=part)]
        events += [event("response.output_text.delta", item_id="msg_fake", output_index=0,
                         content_index=0, delta=word, logprobs=[]) for word in self._words()]
        events += [event("response.output_text.done", item_id="msg_fake", output_index=0,
                         content_index=0, text=self.behaviour.reply, logprobs=[]),
                   event("response.content_part.done", item_id="msg_fake", output_index=0,
                         content_index=0, part=done_part),
                   event("response.output_item.done", output_index=0, item=done_item),
                   event("response.completed",
                         response=self._response(rid, model, "completed", self.behaviour.reply, body))]
        return await self._stream(request, events)


_TYPED_FIELDS: dict[str, tuple[type, ...]] = {
    "model": (str,), "messages": (list,), "stream": (bool,), "stream_options": (dict,),
    "max_tokens": (int,), "max_completion_tokens": (int,), "max_output_tokens": (int,), "n": (int,),
    "prompt": (str, list), "input": (str, list),
}


def _wrongly_typed(body: dict[str, Any]) -> str | None:
    """The first well-known field whose value has a type OpenAI would refuse (null is allowed)."""
    for name, types in _TYPED_FIELDS.items():
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return name
    return None


def zstd_frame(data: bytes) -> bytes:
    """`data` as one zstd frame of raw (stored) blocks: valid zstd (RFC 8878) without a zstd
    library, which aiohttp here lacks too, so it cannot decode it."""
    # Frame header: magic, then single segment with a 4-byte content size (no window descriptor).
    frame = bytearray(struct.pack("<IBI", 0xFD2FB528, 0xA0, len(data)))
    size = 128 * 1024  # the largest block
    blocks = [data[at:at + size] for at in range(0, len(data), size)] or [b""]
    for index, block in enumerate(blocks):
        last = index == len(blocks) - 1
        frame += ((len(block) << 3) | last).to_bytes(3, "little") + block  # block type 0: raw
    return bytes(frame)


ENCODERS = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress, "zstd": zstd_frame}


class _SlowResponse(web.StreamResponse):
    """A JSON answer whose headers go out first; the body follows after a stall, or only its first
    half arrives before the connection is reset."""

    def __init__(self, *, body: bytes, headers: dict[str, str], stall: float, truncate: bool) -> None:
        super().__init__(headers=headers)
        self.content_length = len(body)
        self._payload = body
        self._stall_for = stall
        self._truncate = truncate

    async def write_eof(self, data: bytes = b"") -> None:
        if self._truncate:
            await self.write(self._payload[: len(self._payload) // 2])
            await asyncio.sleep(self._stall_for or 0.01)
            transport = self._req.transport if self._req is not None else None
            if transport is not None:
                transport.abort()
            return
        await self.write(self._payload[:1])  # the headers and a first byte go out now
        await asyncio.sleep(self._stall_for)
        await super().write_eof(self._payload[1:])
