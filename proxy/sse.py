"""A tap on a server-sent-event stream: passes events through to the client, picks out usage on
the side, and removes the usage chunk the proxy itself asked for.

Events are forwarded whole (an SSE client acts only on complete events, so holding a partial
event costs no latency). JSON is decoded only for events that can carry usage, model or id.
"""

from __future__ import annotations

import re

import orjson

from costing.usage import Reported, event_text, from_event

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,')
_TERMINAL = (b'"response.completed"', b'"response.incomplete"', b'"response.failed"')


def event_data(event: bytes) -> bytes | None:
    """The `data:` payload of one event (multi-line data joined by newlines)."""
    lines = [line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    return lines[0] if len(lines) == 1 else b"\n".join(lines)


class SSETap:
    def __init__(self, *, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self.usage_seen = False
        self.model: str | None = None
        self.response_id: str | None = None
        self.reported: Reported | None = None
        self._partial = b""
        self._text_events: list[bytes] = []

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to forward for this chunk (complete events only)."""
        data = self._partial + chunk if self._partial else chunk
        out: list[bytes] = []
        start = 0
        for match in _BOUNDARY.finditer(data):
            event = data[start:match.end()]
            start = match.end()
            forwarded = self._event(event)
            if forwarded:
                out.append(forwarded)
        self._partial = data[start:]
        return b"".join(out)

    def finish(self) -> bytes:
        """The stream ended: whatever incomplete event is left goes to the client as it is."""
        rest, self._partial = self._partial, b""
        if rest.strip():
            self._event(rest)
        return rest

    def _event(self, event: bytes) -> bytes | None:
        payload = event_data(event)
        if payload is None or payload == b"[DONE]":
            return event
        first = self.model is None and self.response_id is None
        if first or (b'"usage"' in payload and not _only_null_usage(payload)) or any(
                t in payload for t in _TERMINAL):
            try:
                decoded = orjson.loads(payload)
            except orjson.JSONDecodeError:
                return event
            reported = from_event(decoded)
            self.model = self.model or reported.model
            self.response_id = self.response_id or reported.response_id
            if reported.usage is not None:
                self.usage_seen = True
                self.reported = Reported(reported.usage, reported.model or self.model,
                                         reported.response_id or self.response_id)
                if self.strip_usage and isinstance(decoded, dict) and decoded.get("choices") == []:
                    return None
            else:
                self._text_events.append(payload)
        else:
            self._text_events.append(payload)
        if self.strip_usage and b'"usage"' in payload:
            return _NULL_USAGE.sub(b"", event)
        return event

    def streamed_chars(self) -> int:
        """Characters of generated text seen so far (decoded lazily: only needed to estimate)."""
        total = 0
        for payload in self._text_events:
            try:
                total += len(event_text(orjson.loads(payload)))
            except orjson.JSONDecodeError:
                continue
        return total

    def result(self) -> Reported:
        if self.reported is not None:
            return self.reported
        return Reported(None, self.model, self.response_id)


def _only_null_usage(payload: bytes) -> bool:
    return _NULL_USAGE.search(payload) is not None and payload.count(b'"usage"') == 1
