"""A tap on a server-sent-event stream: passes events through to the client, picks out usage on
the side, and removes the usage chunk the proxy itself asked for.

Events are forwarded whole (an SSE client acts only on complete events, so holding a partial
event costs no latency). The common chunk, text deltas only, is handled as one block of bytes:
events are split and JSON decoded only where usage, a terminal event or the first event's
model and id can be; the text of the rest is decoded only if the stream ends without usage.
"""

from __future__ import annotations

import re

import orjson

from costing.usage import Reported, event_text, from_event

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,')
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_TERMINAL = (b'"response.completed"', b'"response.incomplete"', b'"response.failed"')


def event_data(event: bytes) -> bytes | None:
    """The `data:` payload of one event (multi-line data joined by newlines)."""
    lines = [line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    return lines[0] if len(lines) == 1 else b"\n".join(lines)


def complete_length(data: bytes) -> int:
    """Length of the leading run of complete events in `data` (0 when none has ended yet)."""
    ends = [at + len(sep) for sep in (b"\n\n", b"\r\n\r\n", b"\r\r") if (at := data.rfind(sep)) >= 0]
    return max(ends, default=0)


class SSETap:
    def __init__(self, *, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self.usage_seen = False
        self.model: str | None = None
        self.response_id: str | None = None
        self.reported: Reported | None = None
        self._partial = b""
        self._unread: list[bytes] = []  # forwarded events not decoded, for an output estimate

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to forward for this chunk (complete events only)."""
        data = self._partial + chunk if self._partial else chunk
        end = complete_length(data)
        if not end:
            self._partial = data
            return b""
        events, self._partial = data[:end], data[end:]
        if self._worth_decoding(events):
            return self._by_event(events)
        if not self.usage_seen:
            self._unread.append(events)
        if self.strip_usage and b'"usage"' in events:
            return _NULL_USAGE.sub(b"", events)
        return events

    def finish(self) -> bytes:
        """The stream ended: whatever incomplete event is left goes to the client as it is."""
        rest, self._partial = self._partial, b""
        if rest.strip():
            unread = len(self._unread)
            self._by_event(rest)  # usage in it was still billed upstream
            del self._unread[unread:]  # but its text never reached the client's SDK (SSE discards it)
        return rest

    def _worth_decoding(self, events: bytes) -> bool:
        return (self.model is None and self.response_id is None) or _USAGE_OBJECT.search(
            events) is not None or any(t in events for t in _TERMINAL)

    def _by_event(self, events: bytes) -> bytes:
        out: list[bytes] = []
        start = 0
        for match in _BOUNDARY.finditer(events):
            forwarded = self._event(events[start:match.end()])
            start = match.end()
            if forwarded:
                out.append(forwarded)
        if start < len(events):  # an unterminated event at the very end of the stream
            forwarded = self._event(events[start:])
            if forwarded:
                out.append(forwarded)
        return b"".join(out)

    def _event(self, event: bytes) -> bytes | None:
        payload = event_data(event)
        if payload is None or payload == b"[DONE]":
            return event
        if not self._worth_decoding(payload):
            if not self.usage_seen:
                self._unread.append(event)
        else:
            try:
                decoded = orjson.loads(payload)
            except orjson.JSONDecodeError:
                return event
            reported = from_event(decoded)
            self.model = self.model or reported.model
            self.response_id = self.response_id or reported.response_id
            if reported.usage is not None:
                self.usage_seen = True
                self._unread.clear()
                self.reported = Reported(reported.usage, reported.model or self.model,
                                         reported.response_id or self.response_id)
                if self.strip_usage and isinstance(decoded, dict) and decoded.get("choices") == []:
                    return None
            elif not self.usage_seen:
                self._unread.append(event)
        if self.strip_usage and b'"usage"' in payload:
            return _NULL_USAGE.sub(b"", event)
        return event

    def streamed_chars(self) -> int:
        """Characters of generated text forwarded so far (decoded only when an estimate is needed)."""
        total = 0
        for block in self._unread:
            for event in _BOUNDARY.split(block):
                payload = event_data(event)
                if payload is None or payload == b"[DONE]":
                    continue
                try:
                    total += len(event_text(orjson.loads(payload)))
                except orjson.JSONDecodeError:
                    continue
        return total

    def result(self) -> Reported:
        if self.reported is not None:
            return self.reported
        return Reported(None, self.model, self.response_id)
