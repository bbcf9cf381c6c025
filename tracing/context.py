"""W3C Trace Context (`traceparent`, `tracestate`): parse what the caller sent, format what goes
upstream, and make ids. Pure; ids come from a generator of our own, seeded once from the OS, so
code that seeds the global `random` cannot make ids repeat."""

from __future__ import annotations

import random
from dataclasses import dataclass

_ids = random.Random()
_HEX = frozenset("0123456789abcdef")
MAX_TRACESTATE = 512  # W3C: at most 32 members; vendors truncate at 512 characters
SAMPLED = 0x01


@dataclass(frozen=True, slots=True)
class Parent:
    """The caller's span, from its `traceparent`."""

    trace_id: int
    span_id: int
    flags: int
    tracestate: str | None = None

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)


def parse_traceparent(value: str | None, tracestate: str | None = None) -> Parent | None:
    """The parent in a `traceparent` header; None when absent or invalid (a new trace starts).

    Version 00 is parsed exactly; a later version is read by its first four fields, as the
    specification asks. All-zero ids and version ff are invalid.
    """
    if not value:
        return None
    value = value.strip()
    if len(value) < 55 or value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    version, trace_hex, span_hex, flags_hex = value[:2], value[3:35], value[36:52], value[53:55]
    if version == "ff" or (version == "00" and len(value) != 55) or (len(value) > 55 and value[55] != "-"):
        return None
    if not _HEX.issuperset(value[:2] + trace_hex + span_hex + flags_hex):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    state = tracestate.strip()[:MAX_TRACESTATE] if tracestate else None
    return Parent(trace_id, span_id, int(flags_hex, 16), state or None)


def format_traceparent(trace_id: int, span_id: int, sampled: bool) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def new_trace_id() -> int:
    while True:
        trace_id = _ids.getrandbits(128)
        if trace_id:
            return trace_id


def new_span_id() -> int:
    while True:
        span_id = _ids.getrandbits(64)
        if span_id:
            return span_id
