"""The hand-written OTLP wire format decodes, with `opentelemetry-proto`, to what was meant:
every value type, long values (multi-byte lengths), negative ints, status and flags."""

from __future__ import annotations

from decimal import Decimal

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanMessage
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from otlpreceiver import attributes

from costing.budget import make_budget
from costing.records import UsageEntry
from costing.usage import Reported, RequestFacts, Usage
from tracing import otlp, spans
from tracing.recorder import Tracer
from tracing.sampler import make_sampler
from tracing.spans import Span

TRACE, CALLER = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def _span(tracer: Tracer, *, parent: bool, model: str = "gpt-4o-mini") -> Span:
    facts = RequestFacts(model, True, True, 10, 100)
    return Span(tracer, TRACE, "a1b2c3d4e5f60718", CALLER if parent else None, "k=v" if parent else None,
                1_700_000_000_123_456_789, "chat.completions", "c1", "s1", facts, 100, None)


def _decode(encoder: otlp.Encoder, spans: list[Span]) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest.FromString(encoder.request([encoder.span(s) for s in spans]))


def test_values_of_every_type_round_trip():
    for value in ("", "é" * 200, True, False, 0, 127, 128, 2**40, -1, -(2**63), 0.0, 1e-10, -2.5,
                  ["stop"], ["a" * 300, "b"], []):
        decoded = AnyValue.FromString(otlp.any_value(value))
        kind = decoded.WhichOneof("value")
        got = ([v.string_value for v in decoded.array_value.values] if kind == "array_value"
               else getattr(decoded, kind))
        assert got == value and type(got) is type(value), value


def test_a_request_decodes_to_the_spans_it_holds():
    budget = make_budget(Decimal(1), Decimal(5))
    tracer = Tracer(make_sampler("always_on", None))
    encoder = otlp.Encoder(otlp.resource_attributes("svc", [("deployment.environment", "prod"),
                                                            ("service.name", "ignored")]),
                           "1.2.3", ("api.openai.com", 443))
    ok = _span(tracer, parent=True, model="m" * 200)
    ok.end_ns = ok.start_ns + 5_000_000
    ok.entry = UsageEntry("c1", "s1", "chat.completions", "m", "m-1", Usage(10, 2, 20, 5), 123_456_789,
                          True, True, True, 200, 5, 0)
    ok.reported = Reported(ok.entry.usage, "m-1", "chatcmpl-1")
    ok.spent_budget = (3 * 10**10, budget)  # $3 of a $5 limit, past the $1 warning
    ok.finish = [b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\n\n']
    failed = _span(tracer, parent=False)
    failed.end_ns, failed.status, failed.error_type = failed.start_ns + 1, 504, "timeout"

    message = _decode(encoder, [ok, failed])
    [resource_spans] = message.resource_spans
    assert attributes(resource_spans.resource.attributes) == {
        "telemetry.sdk.name": "llm-cost-proxy", "telemetry.sdk.language": "python",
        "deployment.environment": "prod", "service.name": "svc"}
    [scope_spans] = resource_spans.scope_spans
    assert (scope_spans.scope.name, scope_spans.scope.version) == ("llm-cost-proxy", "1.2.3")
    first, second = scope_spans.spans
    assert first.trace_id.hex() == TRACE and first.span_id.hex() == "a1b2c3d4e5f60718"
    assert first.parent_span_id.hex() == CALLER and first.trace_state == "k=v"
    assert first.name == "chat " + "m" * 200 and first.kind == SpanMessage.SpanKind.SPAN_KIND_CLIENT
    assert first.end_time_unix_nano - first.start_time_unix_nano == 5_000_000
    assert first.flags == 0x301  # sampled, parent known to be remote
    assert first.status.code == Status.StatusCode.STATUS_CODE_UNSET
    attrs = attributes(first.attributes)
    assert attrs["gen_ai.response.finish_reasons"] == ["length"]
    assert attrs["gen_ai.usage.cache_read.input_tokens"] == 2
    assert attrs["gen_ai.usage.reasoning.output_tokens"] == 5
    assert attrs["llm_proxy.cost.usd"] == 0.0123456789
    assert attrs["llm_proxy.cost.estimated"] is True and attrs["llm_proxy.priced_by_default"] is True
    assert attrs["llm_proxy.budget.status"] == "warning"
    assert attrs["gen_ai.request.stream"] is True
    assert second.parent_span_id == b"" and second.flags == 0x101  # a root span: parent not remote
    assert second.status.code == Status.StatusCode.STATUS_CODE_ERROR and second.status.message == "timeout"
    assert attributes(second.attributes)["error.type"] == "timeout"
    assert "gen_ai.usage.input_tokens" not in attributes(second.attributes)  # nothing was used
    # The encoder's fast paths write exactly the attributes spans.attributes() describes.
    for span, message in ((ok, first), (failed, second)):
        assert attributes(message.attributes) == dict(spans.attributes(span, ("api.openai.com", 443)))
    # The cache of repeating attributes hands out the same bytes as encoding afresh.
    assert _decode(encoder, [ok]) == _decode(encoder, [ok])


def test_captured_content_is_encoded_too():
    tracer = Tracer(make_sampler("always_on", None), capture_content=True)
    span = _span(tracer, parent=False)
    span.content = ([{"role": "user", "content": "x" * 20_000}], None)
    encoder = otlp.Encoder(otlp.resource_attributes("svc", []), "", ("h", 1))
    [decoded] = _decode(encoder, [span]).resource_spans[0].scope_spans[0].spans
    captured = attributes(decoded.attributes)["gen_ai.input.messages"]
    assert captured.startswith('[{"role":"user","parts":[{"type":"text","content":"xxx')
    assert len(captured) == 16 * 1024


def test_cache_writes_are_an_attribute_of_the_spans_that_made_some():
    """`gen_ai.usage.cache_creation.input_tokens` (the GenAI conventions' name; part of
    `gen_ai.usage.input_tokens`) on a call that wrote the prompt cache, absent on the others."""
    tracer = Tracer(make_sampler("always_on", None))
    encoder = otlp.Encoder(otlp.resource_attributes("svc", []), "", ("api.openai.com", 443))
    written, plain = _span(tracer, parent=False), _span(tracer, parent=False)
    for span, usage in ((written, Usage(50_000, 0, 1000, cache_write_input_tokens=48_000)),
                        (plain, Usage(10, 2, 20))):
        span.end_ns = span.start_ns + 1
        span.entry = UsageEntry("c1", "s1", "responses", "gpt-6.1-sol", "gpt-6.1-sol", usage, 1, False,
                                False, False, 200, 5, 0)
    first, second = _decode(encoder, [written, plain]).resource_spans[0].scope_spans[0].spans
    assert attributes(first.attributes)["gen_ai.usage.cache_creation.input_tokens"] == 48_000
    assert attributes(first.attributes)["gen_ai.usage.input_tokens"] == 50_000
    assert "gen_ai.usage.cache_creation.input_tokens" not in attributes(second.attributes)
    for span, message in ((written, first), (plain, second)):  # the fast path writes what spans says
        assert attributes(message.attributes) == dict(spans.attributes(span, ("api.openai.com", 443)))
