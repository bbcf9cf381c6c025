"""A tap on a server-sent-event stream: passes events through to the client, picks out usage on
the side, and removes the usage chunk the proxy itself asked for.

Events are forwarded whole (an SSE client acts only on complete events, so holding a partial
event costs no latency). Chunks are handled as blocks of bytes: only an event carrying a usage
object is split out and JSON decoded; the model, id and text of the rest are decoded only if
the stream ends without usage (to price an estimate).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import orjson

from costing.usage import Reported, event_text, from_event

_SEPARATORS = (b"\r\n\r\n", b"\n\n", b"\r\r")
_BOUNDARY = re.compile(b"|".join(_SEPARATORS))  # longest first: CRLF pairs win over LF pairs
_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,')
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')


def event_data(event: bytes) -> bytes | None:
    """The `data:` payload of one event (multi-line data joined by newlines)."""
    # Slices and ==, not startswith/endswith: in 3.11 those parse their arguments the slow way.
    if (event[:6] == b"data: " and event[-2:] == b"\n\n"
            and event.find(b"\n", 6) == len(event) - 2 and event.find(b"\r") < 0):
        return event[6:-2]  # the usual event: one data line
    lines = [line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    return lines[0] if len(lines) == 1 else b"\n".join(lines)


def complete_length(data: bytes) -> int:
    """Length of the leading run of complete events in `data` (0 when none has ended yet)."""
    if data.endswith(_SEPARATORS):  # the usual chunk: whole events
        return len(data)
    return _event_start(data, len(data))


# Separators are searched most likely first, the others only where they could still change the
# answer: a search that finds nothing scans the whole block, and a block holds a whole stream.
_BY_LIKELIHOOD = (b"\n\n", b"\r\n\r\n", b"\r\r")
_LONGEST = max(map(len, _SEPARATORS))


def _event_bounds(data: bytes, at: int) -> tuple[int, int]:
    """Start and end of the event holding position `at`."""
    # find(), not `in`: `bytes in bytes` first tries the needle as an integer, and building that
    # TypeError cost more than the search.
    if data.find(b"\r") < 0:  # the usual stream: one kind of separator to look for
        start = data.rfind(b"\n\n", 0, at)
        end = data.find(b"\n\n", at)
        return (start + 2 if start >= 0 else 0), (end + 2 if end >= 0 else len(data))
    return _event_start(data, at), _event_end(data, at)


def _event_start(data: bytes, at: int) -> int:
    """Where the event holding position `at` begins: just after the last separator before it."""
    start = 0
    for sep in _BY_LIKELIHOOD:
        # Only an occurrence ending after `start` matters; it cannot begin before this.
        found = data.rfind(sep, max(start - _LONGEST, 0), at)
        if found >= 0:
            start = max(start, found + len(sep))
    return start


def _event_end(data: bytes, at: int) -> int:
    end = len(data)
    for sep in _BY_LIKELIHOOD:
        found = data.find(sep, at, end)
        if found >= 0:
            end = min(end, found + len(sep))
    return end


class SSETap:
    # Slots: one tap is made for every streamed request.
    __slots__ = ("_partial", "_unread", "ends", "model", "reported", "response_id", "strip_usage",
                 "usage_seen")

    def __init__(self, *, strip_usage: bool, ends: list[bytes] | None = None) -> None:
        self.strip_usage = strip_usage
        # When traced: the stretches that name finish reasons (chat, completions) and the head of
        # a Responses terminal event, for the span's gen_ai.response.finish_reasons.
        self.ends = ends
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
        return self._block(events)

    def finish(self) -> bytes:
        """The stream ended: whatever incomplete event is left goes to the client as it is."""
        rest, self._partial = self._partial, b""
        if rest.strip():
            unread = len(self._unread)
            self._block(rest)  # usage in it was still billed upstream
            del self._unread[unread:]  # but its text never reached the client's SDK (SSE discards it)
        return rest

    def _block(self, events: bytes) -> bytes:
        """Forward a run of events: decode the few that matter, pass the rest through as bytes.

        Each byte search over a block costs about as much as copying it, so the block is searched
        once for usage mentions: usage objects are decoded, and only a stretch that still
        mentions usage after the compact replace goes through the regex.
        """
        if not self.usage_seen:
            self._unread.append(events)
        if self.ends is not None and events.find(b'"finish_reason":"') >= 0 and len(self.ends) < 8:
            self.ends.append(events[-4096:])
        at = events.find(b'"usage"')
        if at < 0:
            return events
        if self.strip_usage:
            # OpenAI writes compact JSON: this removes almost every null usage the proxy asked for.
            events = b"".join(events.split(b',"usage":null'))
            at = events.find(b'"usage"')
        out: list[bytes] = []
        done = 0
        mentioned = False  # a usage mention other than an object since `done`
        while at >= 0:
            if events[at + 7:at + 9] == b":{" or _USAGE_OBJECT.match(events, at):
                start, end = _event_bounds(events, at)
                out.append(self._plain(events[done:start]) if mentioned else events[done:start])
                out.append(self._decoded(events[start:end]))
                done, mentioned = end, False
                at = events.find(b'"usage"', end)
            else:
                mentioned = True
                at = events.find(b'"usage"', at + 1)
        out.append(self._plain(events[done:]) if mentioned else events[done:])
        return b"".join(out)

    def _plain(self, events: bytes) -> bytes:
        """Events without usage objects (compact nulls already removed): other nulls go too."""
        if self.strip_usage and events.find(b'"usage"') >= 0:
            return _NULL_USAGE.sub(b"", events)
        return events

    def _decoded(self, event: bytes) -> bytes:
        payload = event_data(event)
        if payload is None or payload == b"[DONE]":
            return event
        try:
            decoded = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return self._plain(event)
        reported = from_event(decoded)
        self.model = self.model or reported.model
        self.response_id = self.response_id or reported.response_id
        if reported.usage is not None:
            if self.ends is not None:
                self.ends.append(event[:2048])
            self.usage_seen = True
            self._unread.clear()
            reported.model = reported.model or self.model
            reported.response_id = reported.response_id or self.response_id
            self.reported = reported
            if self.strip_usage and isinstance(decoded, dict) and decoded.get("choices") == []:
                return b""
        return self._plain(event)

    def _unread_events(self) -> Iterator[Any]:
        for block in self._unread:
            for event in _BOUNDARY.split(block):
                payload = event_data(event)
                if payload is None or payload == b"[DONE]":
                    continue
                try:
                    yield orjson.loads(payload)
                except orjson.JSONDecodeError:
                    continue

    def streamed_chars(self) -> int:
        """Characters of generated text forwarded so far (decoded only when an estimate is needed)."""
        return sum(len(event_text(event)) for event in self._unread_events())

    def result(self) -> Reported:
        """Usage, model and id; without usage, model and id come from the events forwarded."""
        if self.reported is not None:
            return self.reported
        model, response_id = self.model, self.response_id
        for event in self._unread_events():
            if model and response_id:
                break
            reported = from_event(event)
            model, response_id = model or reported.model, response_id or reported.response_id
        return Reported(None, model, response_id)
