"""The compose stack's tracing backend: a Jaeger that takes OTLP/HTTP, the proxy's OTEL_* variables
pointing at it, and a Grafana datasource for it (no Docker engine needed)."""

from __future__ import annotations

from deploy_files import (
    DATASOURCES,
    compose,
    container_ports,
    environment,
    interpolate,
    load_yaml,
    published,
    service,
)

from costing.settings import Settings


def test_jaeger_takes_otlp_http_and_publishes_on_loopback_only():
    jaeger = service("jaeger")
    assert str(jaeger["image"]).startswith("jaegertracing/all-in-one:")
    assert environment(jaeger)["COLLECTOR_OTLP_ENABLED"] == "true"
    assert {4318, 16686} <= set(container_ports(jaeger))
    for address, _host, _container in published(jaeger):  # traces may hold prompts
        assert address == "127.0.0.1", "Jaeger is published beyond loopback by default"


def test_the_proxy_exports_its_spans_to_the_jaeger_service():
    env = environment(service("proxy"))
    settings = Settings(_env_file=None, **{k.lower(): v for k, v in env.items()})  # type: ignore[arg-type]
    assert settings.traces_url == "http://jaeger:4318/v1/traces"
    assert settings.otel_service_name == "llm-cost-proxy"
    assert settings.otel_instrumentation_genai_capture_message_content is False
    # Set empty in the shell or .env: tracing off.
    raw = service("proxy")["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    emptied = interpolate(raw, {"OTEL_EXPORTER_OTLP_ENDPOINT": ""})
    off = Settings(_env_file=None, **{**{k.lower(): v for k, v in env.items()},  # type: ignore[arg-type]
                                      "otel_exporter_otlp_endpoint": emptied})
    assert off.traces_url is None
    assert "jaeger" in compose()["services"]


def test_grafana_has_a_jaeger_datasource_at_the_query_port():
    sources = [s for f in sorted(DATASOURCES.glob("*.y*ml")) for s in load_yaml(f)["datasources"]]
    [jaeger] = [s for s in sources if s["type"] == "jaeger"]
    assert jaeger["uid"] == "jaeger" and jaeger["access"] == "proxy" and not jaeger.get("isDefault")
    host, port = jaeger["url"].removeprefix("http://").rstrip("/").split(":")
    assert str(service(host)["image"]).startswith("jaegertracing/")
    assert int(port) == 16686 and 16686 in container_ports(service(host))
    assert sum(1 for s in sources if s.get("isDefault")) == 1
