"""W3C trace context parsing and formatting, OTEL_TRACES_SAMPLER, and the OTEL_* settings (pure)."""

from __future__ import annotations

import pytest
from conftest import make_settings
from forking import drawn_in_a_forked_child
from pydantic import ValidationError

from costing.settings import describe_error
from tracing.context import Parent, format_traceparent, new_ids, new_span_id, new_trace_id, parse_traceparent
from tracing.exporter import ExportConfig, parse_pairs, server_of
from tracing.sampler import make_sampler

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


def test_a_valid_traceparent_is_parsed_with_its_tracestate():
    parent = parse_traceparent(f"00-{TRACE}-{SPAN}-01", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
    assert parent == Parent(TRACE, SPAN, True, "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-00") == Parent(TRACE, SPAN, False)
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-03").sampled  # type: ignore[union-attr]
    long_state = ",".join(f"k{i}=" + "v" * 20 for i in range(40))
    kept = parse_traceparent(f"00-{TRACE}-{SPAN}-01", long_state).tracestate  # type: ignore[union-attr]
    assert kept and len(kept) <= 512 and long_state.startswith(kept + ",")  # whole members only


@pytest.mark.parametrize("header", [
    None, "", "garbage", f"00-{TRACE}-{SPAN}-0", f"00-{'0' * 32}-{SPAN}-01", f"00-{TRACE}-{'0' * 16}-01",
    f"ff-{TRACE}-{SPAN}-01", f"00-{TRACE.upper()}-{SPAN}-01", f"00-{TRACE}-{SPAN}-01-extra",
    f"00_{TRACE}-{SPAN}-01", f"0g-{TRACE}-{SPAN}-01",
])
def test_an_invalid_traceparent_starts_a_new_trace(header):
    assert parse_traceparent(header, "k=v") is None


def test_a_later_version_is_read_by_its_first_fields():
    parent = parse_traceparent(f"01-{TRACE}-{SPAN}-01-whatever")
    assert parent is not None and parent.trace_id == TRACE


def test_formatted_ids_round_trip_and_are_never_zero():
    trace_id, span_id = new_trace_id(), new_span_id()
    assert len(trace_id) == 32 and len(span_id) == 16 and int(trace_id, 16) and int(span_id, 16)
    parent = parse_traceparent(format_traceparent(trace_id, span_id, sampled=False))
    assert parent == Parent(trace_id, span_id, False)
    assert format_traceparent(TRACE, SPAN, sampled=True) == f"00-{TRACE}-{SPAN}-01"
    assert len({new_span_id() for _ in range(1000)}) == 1000
    trace_id, span_id = new_ids()
    assert len(trace_id) == 32 and len(span_id) == 16 and int(trace_id, 16) and int(span_id, 16)
    assert len({new_ids() for _ in range(1000)}) == 1000


def test_samplers():
    sampled, unsampled = Parent(TRACE, SPAN, True), Parent(TRACE, SPAN, False)
    assert make_sampler("always_on", None)(TRACE, unsampled)
    assert not make_sampler("always_off", None)(TRACE, sampled)
    assert make_sampler("parentbased_always_on", None)(TRACE, None)
    assert not make_sampler("parentbased_always_on", None)(TRACE, unsampled)
    assert make_sampler("parentbased_always_off", None)(TRACE, sampled)
    half = make_sampler("traceidratio", "0.5")
    assert half(f"{(1 << 63) - 1:032x}", sampled) and not half(f"{1 << 63:032x}", sampled)  # low 64 bits
    assert half(f"{(1 << 100) | 5:032x}", None)
    ids = [new_trace_id() for _ in range(4000)]
    assert 1600 < sum(half(i, None) for i in ids) < 2400
    assert not make_sampler("traceidratio", "0")(TRACE, None)
    assert make_sampler("parentbased_traceidratio", "0")(TRACE, sampled)


@pytest.mark.parametrize(("values", "named"), [
    ({"otel_traces_sampler": "sometimes"}, "OTEL_TRACES_SAMPLER"),
    ({"otel_traces_sampler": "traceidratio", "otel_traces_sampler_arg": "2"}, "OTEL_TRACES_SAMPLER_ARG"),
    ({"otel_exporter_otlp_endpoint": "localhost:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
    ({"otel_exporter_otlp_protocol": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
    ({"otel_exporter_otlp_traces_compression": "zstd"}, "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION"),
])
def test_bad_otel_settings_stop_the_start_naming_the_variable(values, named):
    with pytest.raises(ValidationError) as caught:
        make_settings(**values)
    assert named in describe_error(caught.value)


def test_tracing_is_off_without_an_endpoint_and_when_disabled():
    assert make_settings().traces_url is None
    assert make_settings(otel_exporter_otlp_endpoint="http://c:4318/").traces_url == "http://c:4318/v1/traces"
    both = make_settings(otel_exporter_otlp_endpoint="http://c:4318",
                         otel_exporter_otlp_traces_endpoint="http://t:9999/custom")
    assert both.traces_url == "http://t:9999/custom"  # the signal's own endpoint is used as is
    endpoint = "http://c:4318"
    assert make_settings(otel_exporter_otlp_endpoint=endpoint, otel_sdk_disabled=True).traces_url is None
    assert make_settings(otel_exporter_otlp_endpoint=endpoint, otel_traces_exporter="none").traces_url is None
    assert ExportConfig.from_settings(make_settings()) is None


def test_export_config_takes_the_traces_variables_first():
    config = ExportConfig.from_settings(make_settings(
        otel_exporter_otlp_endpoint="http://c:4318", otel_exporter_otlp_headers="a=1,b=2",
        otel_exporter_otlp_traces_headers="x-honeycomb-team=k%20ey", otel_exporter_otlp_timeout=3000,
        otel_exporter_otlp_compression="none", otel_resource_attributes="deployment.environment=prod,bad",
        otel_bsp_max_queue_size=10, otel_bsp_max_export_batch_size=512))
    assert config is not None
    assert config.headers == {"x-honeycomb-team": "k ey"}
    assert config.timeout == 3.0 and not config.gzip
    assert config.batch_size == 10  # never more than the queue holds
    assert config.resource_attributes == [("deployment.environment", "prod")]
    default = ExportConfig.from_settings(make_settings(otel_exporter_otlp_endpoint="http://c:4318"))
    assert default is not None and default.gzip and default.timeout == 10.0
    assert (default.max_queue, default.batch_size, default.schedule_delay) == (2048, 512, 5.0)


def test_pairs_and_server():
    assert parse_pairs("a=1, b = x%3Dy ,=z,novalue") == [("a", "1"), ("b", "x=y")]
    assert server_of("https://api.openai.com") == ("api.openai.com", 443)
    assert server_of("http://127.0.0.1:8000/prefix") == ("127.0.0.1", 8000)


def test_forked_workers_draw_their_own_trace_and_span_ids():
    child = drawn_in_a_forked_child(new_ids)
    assert child != new_ids()
