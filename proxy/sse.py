"""A tap on a server-sent-event stream: passes events through to the client, picks out usage on
the side, and removes the usage chunk the proxy itself asked for.

Events are forwarded whole (an SSE client acts only on complete events, so holding a partial
event costs no latency). Chunks are handled as blocks of bytes: only an event carrying a usage
object is split out and JSON decoded. For an estimate, should the stream end without usage, the
tap keeps running counts, never the events: the characters of generated text (read from the
bytes in the usual shapes, see `text_chars`) and the model and id of the first events. Its
memory is one partial event, whatever the stream's length.
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
# The usual text-bearing events as OpenAI writes them (compact JSON): a chat chunk whose delta
# is only its content, and a Responses `*.delta` event; what may follow their text's closing quote.
_TEXT_SHAPES = ((b'"delta":{"content":"', (b"}",)), (b'"delta":"', (b",", b"}")))
# Events decoded for the model and id, should usage never come: these normally sit in the first.
_IDENTIFYING_BLOCKS = 4
# Text is counted in every block of a short answer; past that, in one block of every
# `_SAMPLE_EVERY`, and the blocks between are credited with as much text per byte. A count costs
# ~1 us per block (a few byte searches), most of what the tap costs, for a figure needed only when
# a stream breaks off before its usage: then a long answer's estimate is within a few per cent.
_EXACT_BLOCKS = 8
_SAMPLE_EVERY = 8


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
    if data[-2:] == b"\n\n" or data.endswith(_SEPARATORS):  # the usual chunk: whole events
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


def _data_events(block: bytes) -> Iterator[Any]:
    """The decoded `data:` payloads of a block of whole events (undecodable ones skipped)."""
    for event in _BOUNDARY.split(block):
        payload = event_data(event)
        if payload is None or payload == b"[DONE]":
            continue
        try:
            yield orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue


def decoded_text_chars(block: bytes) -> int:
    """Characters of generated text in a block of whole events, by decoding every event."""
    return sum(len(event_text(event)) for event in _data_events(block))


def text_chars(block: bytes) -> int:
    """Characters of generated text in a block of whole events, as `decoded_text_chars` counts.

    Runs for every relayed block until usage arrives, so the usual shapes are read from the bytes
    with a few searches (a JSON decode costs several times more): a chat chunk's
    `"delta":{"content":"..."}`, else a Responses `"delta":"..."`. Any other block (the role and
    stop chunks, tool calls, reasoning text, legacy completions, escapes in the text) is decoded.
    """
    for marker, closings in _TEXT_SHAPES:
        at = block.find(marker)
        if at < 0:
            continue
        chars = 0
        while at >= 0:
            start = at + len(marker)
            end = block.find(b'"', start)
            text = block[start:end]
            # No escape in the text (a quote could hide behind one), and the value ends there.
            if end < 0 or text.find(b"\\") >= 0 or block[end + 1:end + 2] not in closings:
                return decoded_text_chars(block)
            chars += len(text) if text.isascii() else len(text.decode("utf-8", "replace"))
            at = block.find(marker, end)
        return chars
    return decoded_text_chars(block)


class SSETap:
    # Slots: one tap is made for every streamed request.
    __slots__ = ("_blocks", "_chars", "_counted", "_partial", "_skipped", "ends", "model", "reported",
                 "response_id", "strip_usage", "usage_final", "usage_seen")

    def __init__(self, *, strip_usage: bool, ends: list[bytes] | None = None) -> None:
        self.strip_usage = strip_usage
        # When traced: the stretches that name finish reasons (chat, completions) and the head of
        # a Responses terminal event, for the span's gen_ai.response.finish_reasons.
        self.ends = ends
        self.usage_seen = False
        # The usage seen is the call's total: it came in an event that ends the answer (OpenAI's
        # usage-only chunk, a Responses terminal event), not in a chunk that still carries
        # choices (some compatible servers put the usage so far on every chunk; the last wins).
        self.usage_final = False
        self.model: str | None = None
        self.response_id: str | None = None
        self.reported: Reported | None = None
        self._partial = b""
        self._chars = 0  # generated text forwarded so far, for an estimate without usage
        self._blocks = 0  # blocks forwarded before usage
        self._counted = 0  # bytes of the blocks whose text is in _chars
        self._skipped = 0  # bytes of the blocks not counted (see _SAMPLE_EVERY)

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
            counts = self._chars, self._counted, self._skipped
            self._block(rest)  # usage in it was still billed upstream
            # but its text never reached the client's SDK (SSE discards it)
            self._chars, self._counted, self._skipped = counts
        return rest

    def _block(self, events: bytes) -> bytes:
        """Forward a run of events: decode the few that matter, pass the rest through as bytes.

        Each byte search over a block costs about as much as copying it, so the block is searched
        once for usage mentions: usage objects are decoded, and only a stretch that still
        mentions usage after the compact replace goes through the regex. Until usage has come,
        the block's text is counted too.
        """
        block = events
        if self.ends is not None and events.find(b'"finish_reason":"') >= 0 and len(self.ends) < 8:
            self.ends.append(events[-4096:])
        if self.strip_usage:
            # OpenAI writes compact JSON: this removes almost every null usage the proxy asked for.
            events = events.replace(b',"usage":null', b"")
        at = events.find(b'"usage"')
        if at >= 0:
            events = self._usage(events, at)
        if not self.usage_seen:  # a block with the usage event is not counted: no estimate then
            self._count(block)
        return events

    def _count(self, block: bytes) -> None:
        blocks = self._blocks = self._blocks + 1
        if blocks > _EXACT_BLOCKS and blocks % _SAMPLE_EVERY:
            self._skipped += len(block)  # counted in proportion, in streamed_chars()
        elif blocks <= _IDENTIFYING_BLOCKS and not (self.model and self.response_id):
            self._identify(block)
        else:
            self._chars += text_chars(block)
            self._counted += len(block)

    def _identify(self, events: bytes) -> None:
        """A first block: decoded whole, for the model and id as well as the text."""
        self._counted += len(events)
        for event in _data_events(events):
            reported = from_event(event)
            self.model = self.model or reported.model
            self.response_id = self.response_id or reported.response_id
            self._chars += len(event_text(event))

    def _usage(self, events: bytes, at: int) -> bytes:
        """Events that mention usage from `at` on: usage objects decoded, null usage removed."""
        out: list[bytes] = []
        done = 0
        mentioned = False  # a usage mention other than an object since `done`
        while at >= 0:
            if events[at + 7:at + 12] == b":null":  # compact null usage: kept, or removed below
                mentioned = True
                at = events.find(b'"usage"', at + 12)
            elif events[at + 7:at + 9] == b":{" or _USAGE_OBJECT.match(events, at):
                start, end = _event_bounds(events, at)
                out.append(self._plain(events[done:start]) if mentioned else events[done:start])
                out.append(self._decoded(events[start:end]))
                done, mentioned = end, False
                at = events.find(b'"usage"', end)
            else:
                mentioned = True
                at = events.find(b'"usage"', at + 1)
        if not out:  # no usage object: the usual event of a stream whose client asked for usage
            return self._plain(events) if mentioned else events
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
            self.usage_final = not (isinstance(decoded, dict) and decoded.get("choices"))
            reported.model = reported.model or self.model
            reported.response_id = reported.response_id or self.response_id
            self.reported = reported
            if self.strip_usage and isinstance(decoded, dict) and decoded.get("choices") == []:
                return b""
        return self._plain(event)

    def streamed_chars(self) -> int:
        """Characters of generated text forwarded so far (meaningful while usage has not come):
        exact in a short answer, with the uncounted blocks of a long one credited per byte."""
        if not self._skipped:
            return self._chars
        return self._chars + round(self._chars * self._skipped / max(self._counted, 1))

    def result(self) -> Reported:
        """Usage, model and id; without usage, model and id come from the first events forwarded."""
        if self.reported is not None:
            return self.reported
        return Reported(None, self.model, self.response_id)
