"""The request path's side of tracing: continue or start a trace, put the proxy's own
`traceparent` on the upstream request, and queue one `Span` per sampled call. Nothing is
formatted or encoded here; `exporter.Exporter` does that in the background."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

from multidict import CIMultiDictProxy

from costing.budget import Budget
from costing.records import UsageEntry
from costing.usage import Reported, RequestFacts, Usage
from tracing import spans
from tracing.context import format_traceparent, new_ids, new_span_id, parse_traceparent
from tracing.sampler import Sampler
from tracing.spans import Span

TRACE_HEADERS = ("traceparent", "tracestate")


class Tracer:
    """Starts and ends spans; ended ones wait in `queue` (bounded: past `max_queue`, dropped
    and counted) until the exporter takes them."""

    def __init__(self, sampler: Sampler, *, max_queue: int = 2048, batch_size: int = 512,
                 capture_content: bool = False, on_drop: Callable[[int], None] = lambda n: None,
                 standing: Callable[[str], tuple[int, Budget]] | None = None) -> None:
        self.sampler = sampler
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.capture_content = capture_content
        self.on_drop = on_drop
        self.standing = standing
        self.queue: list[Span] = []
        # Span times on the monotonic clock the request's timing uses, turned into Unix time:
        # durations exact, the start the moment the request arrived.
        self.epoch_offset_ns = time.time_ns() - time.perf_counter_ns()
        self.full = asyncio.Event()  # a batch is ready: the exporter need not wait for its timer

    def start(self, request_headers: CIMultiDictProxy[str], upstream_headers: list[tuple[str, str]],
              operation: str, campaign_id: str, session_id: str, facts: RequestFacts,
              body: dict[str, Any], received: float) -> Span | None:
        """Continue the caller's trace (or start one) and send the proxy's span id upstream;
        the span when sampled, else None. The caller's own `traceparent` never goes upstream.
        `received`: when the request arrived, on the `time.perf_counter()` clock."""
        incoming = request_headers.get("traceparent")
        parent = parse_traceparent(incoming, request_headers.get("tracestate")) if incoming else None
        if incoming is not None or "tracestate" in request_headers:
            upstream_headers[:] = [h for h in upstream_headers if h[0].lower() not in TRACE_HEADERS]
        if parent is not None:
            trace_id, span_id = parent.trace_id, new_span_id()
        else:
            trace_id, span_id = new_ids()
        sampled = self.sampler(trace_id, parent)
        upstream_headers.append(("traceparent", format_traceparent(trace_id, span_id, sampled)))
        if parent is not None and parent.tracestate:
            upstream_headers.append(("tracestate", parent.tracestate))
        if not sampled:
            return None
        content = (spans.request_content(operation, body), None) if self.capture_content else None
        return Span(self, trace_id, span_id, parent.span_id if parent is not None else None,
                    parent.tracestate if parent is not None else None,
                    self.epoch_offset_ns + int(received * 1e9), operation,
                    campaign_id, session_id, facts, spans.max_tokens(body), content)

    def refused(self, request_headers: CIMultiDictProxy[str], operation: str, campaign_id: str,
                session_id: str, facts: RequestFacts, received: float) -> None:
        """A call the budget gate refused before anything went upstream: its span, ended at once
        with `error.type` budget_exceeded."""
        span = self.start(request_headers, [], operation, campaign_id, session_id, facts, {}, received)
        if span is not None:
            self.end(span, 429, "budget_exceeded", None, None)

    def answered(self, span: Span, body: Any) -> None:
        """A non-streamed answer's finish reasons (and output, when captured), from its decoded body."""
        reasons, output = spans.body_outcome(span.operation, body, self.capture_content)
        span.finish = reasons
        if output is not None and span.content is not None:
            span.content = (span.content[0], output)

    def end(self, span: Span, status: int, error_type: str | None, entry: UsageEntry | None,
            reported: Reported | None, finish: list[bytes] | None = None,
            written: asyncio.Future[bool] | None = None, creation: bool = False) -> None:
        """The call is over (answered, failed or abandoned): queue its span.

        `written` (a background response's final state, which several processes may meter):
        the span keeps this moment as its end but is queued only once the ledger says whether
        this process's insert landed; when another process's did, that one reports the call,
        and this span is dropped, or, for the call's `creation`, queued with nothing billed."""
        span.end_ns = self.epoch_offset_ns + time.perf_counter_ns()
        span.status = status
        span.error_type = error_type
        span.entry = entry
        span.reported = reported
        if finish:  # a stream's: the stretches naming its finish reasons, parsed in the background
            span.finish = finish
        if self.standing is not None:
            span.spent_budget = self.standing(span.campaign_id)
        if written is not None:
            if written.done():
                self._written(span, creation, written)
            else:
                written.add_done_callback(partial(self._written, span, creation))
            return
        queue = self.queue
        if len(queue) >= self.max_queue:
            self.on_drop(1)
            return
        queue.append(span)
        if len(queue) == self.batch_size:
            self.full.set()

    def _written(self, span: Span, creation: bool, written: asyncio.Future[bool]) -> None:
        """Queue a span held for its ledger insert (see `end`)."""
        if written.cancelled() or not written.result():
            if not creation:
                return
            if span.entry is not None:  # metered and reported by another process
                span.entry = replace(span.entry, usage=Usage(), cost_units=0, estimated=False)
        queue = self.queue
        if len(queue) >= self.max_queue:
            self.on_drop(1)
            return
        queue.append(span)
        if len(queue) >= self.batch_size:
            self.full.set()

    def take(self, limit: int) -> list[Span]:
        batch = self.queue[:limit]
        del self.queue[:limit]
        if len(self.queue) < self.batch_size:
            self.full.clear()
        return batch


def stream_failure(upstream_error: BaseException | None) -> str:
    """Why a relayed stream stopped short: the upstream broke off or went silent, else the
    client left."""
    if upstream_error is None:
        return "client_disconnected"
    return "upstream_timeout" if isinstance(upstream_error, TimeoutError) else "upstream_incomplete"


def error_type(status: int, code: str | None = None) -> str | None:
    """`error.type` of a call: the proxy's own failure names, else the HTTP status as a string."""
    if code == "upstream_timeout":
        return "timeout"
    if code in ("upstream_unreachable", "budget_exceeded", "client_disconnected", "upstream_incomplete"):
        return code
    return str(status) if status >= 400 else None
