"""W3C Trace Context (`traceparent`, `tracestate`): parse what the caller sent, format what goes
upstream, and make ids. Pure.

Ids stay as the lowercase hex text they travel in: a caller's ids are sliced from its header
and ours go into the upstream header, so the request path never converts them; the exporter
turns them into bytes in the background. New ids come from a generator of our own, seeded
from the OS (again in a forked worker), so code that seeds the global `random` cannot make ids
repeat.
"""

from __future__ import annotations

import os
import random
import re
from typing import NamedTuple

_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)  # forked workers must not draw the same ids
# version-traceid-parentid-flags; a version after 00 may carry more fields after a dash.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
ZERO_TRACE_ID = "0" * 32
ZERO_SPAN_ID = "0" * 16
MAX_TRACESTATE = 512  # W3C: vendors may drop a tracestate longer than 512 characters


class Parent(NamedTuple):
    """The caller's span, from its `traceparent` (ids as 32 and 16 lowercase hex digits)."""

    trace_id: str
    span_id: str
    sampled: bool
    tracestate: str | None = None


def parse_traceparent(value: str | None, tracestate: str | None = None) -> Parent | None:
    """The parent in a `traceparent` header; None when absent or invalid (a new trace starts).

    Version 00 is parsed exactly; a later version is read by its first four fields, as the
    specification asks. Version ff and all-zero ids are invalid.
    """
    if not value:
        return None
    found = _TRACEPARENT.fullmatch(value)
    if found is None:
        return None
    version, trace_id, span_id, flags, rest = found.groups()
    if version == "ff" or (rest is not None and version == "00"):
        return None
    if trace_id == ZERO_TRACE_ID or span_id == ZERO_SPAN_ID:
        return None
    if tracestate and len(tracestate) > MAX_TRACESTATE:
        tracestate = tracestate[:MAX_TRACESTATE].rpartition(",")[0]
    return Parent(trace_id, span_id, flags[1] in "13579bdf", tracestate or None)


def format_traceparent(trace_id: str, span_id: str, sampled: bool) -> str:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def new_ids() -> tuple[str, str]:
    """A new trace id and span id, from one draw."""
    while True:
        drawn = f"{_ids.getrandbits(192):048x}"
        trace_id, span_id = drawn[:32], drawn[32:]
        if trace_id != ZERO_TRACE_ID and span_id != ZERO_SPAN_ID:
            return trace_id, span_id


def new_trace_id() -> str:
    while True:
        trace_id = f"{_ids.getrandbits(128):032x}"
        if trace_id != ZERO_TRACE_ID:
            return trace_id


def new_span_id() -> str:
    while True:
        span_id = f"{_ids.getrandbits(64):016x}"
        if span_id != ZERO_SPAN_ID:
            return span_id
