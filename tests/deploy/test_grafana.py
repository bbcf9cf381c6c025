"""The Grafana provisioning and dashboards: well-formed, wired to the provisioned Prometheus datasource
and to the compose mounts, and built only from metrics the proxy really exports."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import pytest
from deploy_files import (
    DASHBOARD_PROVIDERS,
    DASHBOARDS,
    DATASOURCES,
    GRAFANA,
    all_panels,
    bind_mounts,
    container_ports,
    dashboards,
    load_yaml,
    runnable_promql,
    service,
    targets,
    variables,
)
from prometheus_client import CollectorRegistry

from costing.budget import Budget
from proxy.metrics import Metrics

METRIC_NAME = re.compile(r"\b(?:llm|gen_ai)_[a-z0-9_]+\b")


def _datasource() -> dict[str, Any]:
    files = sorted(DATASOURCES.glob("*.y*ml"))
    assert files, "no datasource provisioning file"
    sources = [s for f in files for s in load_yaml(f)["datasources"]]
    [prometheus] = [s for s in sources if s["type"] == "prometheus"]
    return prometheus


def _provider() -> dict[str, Any]:
    [path] = sorted(DASHBOARD_PROVIDERS.glob("*.y*ml"))
    data = load_yaml(path)
    assert data["apiVersion"] == 1
    [provider] = data["providers"]
    return provider


def _all_dashboards() -> list[tuple[Any, dict[str, Any]]]:
    found = dashboards()
    assert found, f"no dashboard JSON in {DASHBOARDS}"
    return found


def test_the_datasource_is_prometheus_with_a_fixed_uid_at_the_compose_service():
    source = _datasource()
    assert source["uid"] == "prometheus"
    assert source["access"] == "proxy"
    url = source["url"]
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    # The compose service name, on the port Prometheus listens on inside its container.
    assert str(service(host)["image"]).startswith("prom/prometheus")
    assert int(port) == 9090 and 9090 in container_ports(service(host))


def test_the_provider_loads_the_mounted_dashboards_into_the_llm_costs_folder():
    provider = _provider()
    assert provider["type"] == "file" and provider["folder"] == "LLM costs"
    mounts = {target: host for host, target in bind_mounts(service("grafana"))}
    assert mounts.get(provider["options"]["path"]) == DASHBOARDS.resolve(), (
        f"provider path {provider['options']['path']} is not where compose mounts grafana/dashboards")
    assert mounts.get("/etc/grafana/provisioning") == (GRAFANA / "provisioning").resolve()


def test_the_llm_costs_dashboard_exists_with_a_campaign_variable():
    by_title = {d["title"]: d for _, d in _all_dashboards()}
    dashboard = by_title["LLM costs"]
    campaign = variables(dashboard)["campaign"]
    query = campaign["query"]
    query = query["query"] if isinstance(query, dict) else query
    # Budget gauges come from the stored aggregates: every campaign, blocked or idle since a restart.
    assert query.replace(" ", "") == "label_values(llm_budget_spent_usd,campaign)"
    assert campaign["type"] == "query" and campaign["multi"] is True and campaign["includeAll"] is True
    assert campaign.get("allValue") == ".*"  # "All" must match every campaign, _other included


@pytest.mark.parametrize("path_and_dashboard", dashboards(), ids=lambda pd: pd[0].name)
def test_dashboard_structure(path_and_dashboard):
    _, dashboard = path_and_dashboard
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 39
    assert dashboard.get("uid") and dashboard.get("title")
    panels = list(all_panels(dashboard))
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    occupied: dict[tuple[int, int], int] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in occupied, f"{panel['title']} overlaps panel {occupied[(x, y)]}"
                occupied[(x, y)] = panel["id"]


@pytest.mark.parametrize("path_and_dashboard", dashboards(), ids=lambda pd: pd[0].name)
def test_every_query_uses_the_provisioned_datasource_and_has_an_expression(path_and_dashboard):
    _, dashboard = path_and_dashboard
    expected = {"type": "prometheus", "uid": _datasource()["uid"]}
    for panel in all_panels(dashboard):
        if panel.get("type") == "row":
            continue
        assert panel.get("datasource") == expected, panel["title"]
        assert panel.get("targets"), f"{panel['title']} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    for panel, target in targets(dashboard):
        assert target.get("datasource", expected) == expected, panel["title"]
        assert str(target.get("expr", "")).strip(), f"{panel['title']} {target['refId']} has no expr"
    for variable in variables(dashboard).values():
        if "datasource" in variable:
            assert variable["datasource"] == expected, variable["name"]


@pytest.mark.parametrize("path_and_dashboard", dashboards(), ids=lambda pd: pd[0].name)
def test_campaign_filters_are_regex_matches(path_and_dashboard):
    """A multi-value/All variable expands to a regex: `campaign="$campaign"` would match nothing."""
    _, dashboard = path_and_dashboard
    for panel, target in targets(dashboard):
        expr = target["expr"]
        assert not re.search(r'campaign\s*(=|!=)\s*"\$', expr), f"{panel['title']}: {expr}"
        runnable_promql(expr, dashboard)  # no variable left unknown


def _exported_series_names() -> set[str]:
    """Every sample name the proxy's registry can export, with one labelled child of each metric."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, max_campaigns=10)
    metrics.observe_operation("chat.completions", "gpt-4o", "gpt-4o", 0.1, "")
    metrics.on_blocked("c1")
    metrics.overhead.observe(0.001)
    metrics.flush_duration.observe(0.01)
    metrics.budgets.rows = [("c1", Decimal("0.1"), Budget(Decimal("1"), Decimal("5")))]
    names = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def test_every_metric_in_the_dashboards_is_exported_by_the_proxy():
    exported = _exported_series_names()
    assert "llm_cost_usd_total" in exported and "llm_budget_spent_usd" in exported
    used: set[str] = set()
    for _, dashboard in _all_dashboards():
        for panel, target in targets(dashboard):
            names = set(METRIC_NAME.findall(target["expr"]))
            assert names, f"{panel['title']}: no proxy metric in {target['expr']}"
            unknown = names - exported
            assert not unknown, f"{panel['title']}: {sorted(unknown)} not exported by proxy/metrics.py"
            used |= names
        for variable in variables(dashboard).values():
            query = variable.get("query")
            query = query.get("query", "") if isinstance(query, dict) else str(query or "")
            assert set(METRIC_NAME.findall(query)) <= exported, variable["name"]
    # The panels the dashboard promises: spend, budget, tokens, requests, blocked, latency, writer.
    for required in ("llm_cost_usd_total", "llm_budget_spent_usd", "llm_budget_limit_usd", "llm_tokens_total",
                     "llm_requests_total", "llm_requests_blocked_total",
                     "gen_ai_client_operation_duration_seconds_bucket", "llm_proxy_overhead_seconds_bucket",
                     "llm_ledger_queue_depth", "llm_ledger_flush_duration_seconds_bucket",
                     "llm_ledger_records_dropped_total"):
        assert required in used, f"no panel shows {required}"
