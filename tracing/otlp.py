"""OTLP/protobuf encoding of spans, building the `opentelemetry-proto` messages directly.

The SDK's ReadableSpan and its encoder cost ~39 us per span; building the messages here, with
the attributes that repeat (operation, provider, model, server, flags) made once and reused,
costs a fraction of that (see docs/performance.md, "Tracing").
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    InstrumentationScope,
    KeyValue,
)
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans, Status
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanMessage

from tracing.spans import Span, Value, attributes

SCOPE_NAME = "llm-cost-proxy"
CLIENT = SpanMessage.SpanKind.SPAN_KIND_CLIENT
ERROR = Status.StatusCode.STATUS_CODE_ERROR
# Span.flags: the W3C trace flags in bits 0-7; bit 8 says whether the parent's remoteness is
# known, bit 9 that it is remote (the caller's span is in another process).
SAMPLED_FLAGS = 0x01
HAS_IS_REMOTE = 0x100
IS_REMOTE = 0x200


def any_value(value: Value) -> AnyValue:
    # bool before int: a bool is an int in Python, but an OTLP bool is its own type.
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, list):
        return AnyValue(array_value=ArrayValue(values=[AnyValue(string_value=v) for v in value]))
    return AnyValue(string_value=value)


@lru_cache(maxsize=4096)
def _cached(key: str, value: str | bool) -> KeyValue:
    """Attributes whose values repeat from span to span: built once, copied in."""
    return KeyValue(key=key, value=any_value(value))


# Keys whose values are few (names, flags, models, statuses): the cache's hits pay.
_REPEATING = frozenset({
    "gen_ai.operation.name", "gen_ai.provider.name", "openai.api.type", "server.address",
    "gen_ai.request.model", "gen_ai.response.model", "llm_proxy.campaign.id", "gen_ai.request.stream",
    "llm_proxy.cost.estimated", "llm_proxy.priced_by_default", "llm_proxy.budget.status", "error.type",
})


def key_value(key: str, value: Value) -> KeyValue:
    if key in _REPEATING and isinstance(value, str | bool):
        return _cached(key, value)
    return KeyValue(key=key, value=any_value(value))


def resource_attributes(service_name: str, extra: Iterable[tuple[str, str]]) -> list[KeyValue]:
    """`service.name` and the SDK facts backends group by, then OTEL_RESOURCE_ATTRIBUTES
    (`service.name` from OTEL_SERVICE_NAME wins, as the specification says)."""
    pairs = {"telemetry.sdk.name": SCOPE_NAME, "telemetry.sdk.language": "python"}
    pairs.update(extra)
    pairs["service.name"] = service_name
    return [KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in pairs.items()]


class Batch:
    """One export request being built: spans go straight into their place in the message."""

    def __init__(self, resource: list[KeyValue], scope_version: str, server: tuple[str, int]) -> None:
        self.message = ExportTraceServiceRequest()
        resource_spans = self.message.resource_spans.add()
        resource_spans.resource.attributes.extend(resource)
        self.scope: ScopeSpans = resource_spans.scope_spans.add()
        self.scope.scope.CopyFrom(InstrumentationScope(name=SCOPE_NAME, version=scope_version))
        self.server = server
        self.count = 0

    def add(self, span: Span) -> None:
        message = self.scope.spans.add()
        message.trace_id = span.trace_id.to_bytes(16, "big")
        message.span_id = span.span_id.to_bytes(8, "big")
        flags = SAMPLED_FLAGS | HAS_IS_REMOTE
        if span.parent_span_id:
            message.parent_span_id = span.parent_span_id.to_bytes(8, "big")
            flags |= IS_REMOTE
        if span.tracestate:
            message.trace_state = span.tracestate
        message.flags = flags
        message.name = span.name
        message.kind = CLIENT
        message.start_time_unix_nano = span.start_ns
        message.end_time_unix_nano = max(span.end_ns, span.start_ns)
        message.attributes.extend([key_value(k, v) for k, v in attributes(span, self.server)])
        if span.error_type:
            message.status.code = ERROR
            message.status.message = span.error_type
        self.count += 1

    def encode(self) -> bytes:
        return self.message.SerializeToString()
