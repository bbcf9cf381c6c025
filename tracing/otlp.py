"""OTLP/protobuf encoding of spans for `POST /v1/traces`.

The envelope (resource, instrumentation scope) is built once with the `opentelemetry-proto`
messages and serialized once. Spans are written straight in protobuf's wire format: building
them as upb messages cost ~2.8 us per attribute (~65 us a span; the SDK's ReadableSpan and
encoder ~39 us), writing the bytes costs a few us a span, and attributes whose values repeat
(operation, provider, model, campaign, flags) are cached as finished bytes. Receivers and the
tests decode the result with `opentelemetry-proto`; field numbers below are those of
opentelemetry/proto/trace/v1/trace.proto and common/v1/common.proto.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from functools import lru_cache

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from costing.money import SCALE
from tracing.spans import Shape, Span, Value, content_attributes, repeating_attributes, shape

SCOPE_NAME = "llm-cost-proxy"
SPAN_KIND_CLIENT = 3
STATUS_CODE_ERROR = 2
# Span.flags: the W3C trace flags in bits 0-7; bit 8 says whether the parent's remoteness is
# known, bit 9 that it is remote (the caller's span is in another process).
SAMPLED = 0x01
HAS_IS_REMOTE = 0x100
IS_REMOTE = 0x200
_DOUBLE = struct.Struct("<d")
_FIXED64 = struct.Struct("<Q")
_FIXED32 = struct.Struct("<I")


def varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL = tuple(bytes((n,)) for n in range(0x80))  # one-byte varints, looked up


def _delimited(tag: bytes, data: bytes) -> bytes:
    n = len(data)
    return tag + (_SMALL[n] if n < 0x80 else varint(n)) + data


def _string(tag: bytes, text: str) -> bytes:
    return _delimited(tag, text.encode())


_TRUE, _FALSE = b"\x10\x01", b"\x10\x00"


def any_value(value: Value) -> bytes:
    """An AnyValue: string 1, bool 2, int 3, double 4, array 5. Exact types (bool is an int in
    Python, but an OTLP bool is its own type)."""
    if isinstance(value, str):
        return _string(b"\x0a", value)
    if value is True or value is False:
        return _TRUE if value else _FALSE
    if isinstance(value, int):
        return b"\x18" + varint(value & 0xFFFF_FFFF_FFFF_FFFF)  # int64, two's complement
    if isinstance(value, float):
        return b"\x21" + _DOUBLE.pack(value)
    return _delimited(b"\x2a", b"".join(_delimited(b"\x0a", _string(b"\x0a", v)) for v in value))


@lru_cache(maxsize=256)
def _key(key: str) -> bytes:
    return _string(b"\x0a", key) + b"\x12"  # KeyValue.key, then the tag of KeyValue.value


def key_value(key: str, value: Value) -> bytes:
    """One Span.attributes entry (field 9, a KeyValue)."""
    encoded = any_value(value)
    n = len(encoded)
    return _delimited(b"\x4a", _key(key) + (_SMALL[n] if n < 0x80 else varint(n)) + encoded)


def _int_prefixes(key: str) -> tuple[bytes, ...]:
    """Everything of an int attribute but its varint, by the varint's length (1 to 10 bytes)."""
    name = _key(key)
    return tuple(b"\x4a" + _SMALL[len(name) + 2 + n] + name + _SMALL[1 + n] + b"\x18" for n in range(11))


def _double_prefix(key: str) -> bytes:
    """Everything of a double attribute but its 8 bytes."""
    name = _key(key)
    return b"\x4a" + _SMALL[len(name) + 10] + name + b"\x09\x21"


_INPUT = _int_prefixes("gen_ai.usage.input_tokens")
_OUTPUT = _int_prefixes("gen_ai.usage.output_tokens")
_CACHED = _int_prefixes("gen_ai.usage.cache_read.input_tokens")
_REASONING = _int_prefixes("gen_ai.usage.reasoning.output_tokens")
_CACHE_WRITES = _int_prefixes("gen_ai.usage.cache_creation.input_tokens")
_COST = _double_prefix("llm_proxy.cost.usd")
_COST_MIRROR = _double_prefix("gen_ai.usage.cost")


def _varying(span: Span) -> list[bytes]:
    """`spans.varying_attributes`, written with the keys' bytes made once (the attributes every
    span has its own values of: most of the encoding's work)."""
    out = []
    reported, entry = span.reported, span.entry
    if reported is not None and reported.response_id:
        out.append(key_value("gen_ai.response.id", reported.response_id))
    cost = 0.0
    if entry is not None:
        usage = entry.usage
        for prefixes, count in ((_INPUT, usage.input_tokens), (_OUTPUT, usage.output_tokens),
                                (_CACHED, usage.cached_input_tokens), (_REASONING, usage.reasoning_tokens)):
            encoded = varint(count)
            out.append(prefixes[len(encoded)] + encoded)
        if usage.cache_write_input_tokens:
            encoded = varint(usage.cache_write_input_tokens)
            out.append(_CACHE_WRITES[len(encoded)] + encoded)
        cost = entry.cost_units / SCALE
    packed = _DOUBLE.pack(cost)
    out += (_COST + packed, _COST_MIRROR + packed)
    if span.content is not None:
        out += [key_value(key, value) for key, value in content_attributes(span)]
    return out


@lru_cache(maxsize=8192)
def _repeating(values: Shape) -> bytes:
    """The attributes a span shares with others of its shape, encoded once."""
    return b"".join([key_value(key, value) for key, value in repeating_attributes(values)])


def span_bytes(span: Span, server: tuple[str, int]) -> bytes:
    """One Span message."""
    flags = SAMPLED | HAS_IS_REMOTE
    parts = [b"\x0a\x10", bytes.fromhex(span.trace_id), b"\x12\x08", bytes.fromhex(span.span_id)]
    if span.tracestate:
        parts.append(_string(b"\x1a", span.tracestate))
    if span.parent_span_id:
        parts += (b"\x22\x08", bytes.fromhex(span.parent_span_id))
        flags |= IS_REMOTE
    parts += (_string(b"\x2a", span.name), b"\x30\x03",
              b"\x39", _FIXED64.pack(span.start_ns), b"\x41", _FIXED64.pack(max(span.end_ns, span.start_ns)),
              _repeating(shape(span, server)))
    parts += _varying(span)
    if span.error_type:
        # Status: message 2, code 3 (ERROR)
        parts.append(_delimited(b"\x7a", _string(b"\x12", span.error_type) + b"\x18\x02"))
    parts += (b"\x85\x01", _FIXED32.pack(flags))  # flags: field 16, fixed32
    return b"".join(parts)


def resource_attributes(service_name: str, extra: Iterable[tuple[str, str]]) -> Resource:
    """`service.name` and the SDK facts backends group by, then OTEL_RESOURCE_ATTRIBUTES
    (`service.name` from OTEL_SERVICE_NAME wins, as the specification says)."""
    pairs = {"telemetry.sdk.name": SCOPE_NAME, "telemetry.sdk.language": "python"}
    pairs.update(extra)
    pairs["service.name"] = service_name
    return Resource(attributes=[KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in pairs.items()])


class Encoder:
    """ExportTraceServiceRequest bodies: one ResourceSpans (this process) with one ScopeSpans."""

    def __init__(self, resource: Resource, scope_version: str, server: tuple[str, int]) -> None:
        self.server = server
        # ResourceSpans.resource (1) and ScopeSpans.scope (1): serialized once.
        self._resource = _delimited(b"\x0a", resource.SerializeToString())
        scope = InstrumentationScope(name=SCOPE_NAME, version=scope_version)
        self._scope = _delimited(b"\x0a", scope.SerializeToString())

    def span(self, span: Span) -> bytes:
        """A span as a ScopeSpans.spans entry (field 2)."""
        return _delimited(b"\x12", span_bytes(span, self.server))

    def request(self, encoded_spans: Sequence[bytes]) -> bytes:
        scope_spans = self._scope + b"".join(encoded_spans)
        resource_spans = self._resource + _delimited(b"\x12", scope_spans)
        return _delimited(b"\x0a", resource_spans)
