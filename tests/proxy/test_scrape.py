"""Merging several workers' expositions into one: what adds up, what does not."""

from __future__ import annotations

from decimal import Decimal

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from costing.budget import make_budget
from proxy.metrics import Metrics
from proxy.scrape import merged_exposition


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def worker(cost: float, queue: int, spent: float, overhead: list[float]) -> str:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.cost.labels("c1", "gpt-4o-mini").inc(cost)
    metrics.queue_depth.set(queue)
    for seconds in overhead:
        metrics.overhead.observe(seconds)
    metrics.budgets.rows = [("c1", Decimal(str(spent)), make_budget(Decimal(1), Decimal(100)))]
    return generate_latest(registry).decode()


def test_counters_and_histograms_add_up_gauges_take_the_largest_and_queues_add_up():
    merged = samples(merged_exposition([worker(1.5, 3, 10.0, [0.0002, 0.003]),
                                        worker(2.25, 4, 10.5, [0.0002])]))
    assert merged[("llm_cost_usd_total", (("campaign", "c1"), ("model", "gpt-4o-mini")))] == 3.75
    assert merged[("llm_ledger_queue_depth", ())] == 7
    assert merged[("llm_budget_spent_usd", (("campaign", "c1"),))] == 10.5
    assert merged[("llm_budget_limit_usd", (("campaign", "c1"),))] == 100
    assert merged[("llm_proxy_overhead_seconds_count", ())] == 3
    assert merged[("llm_proxy_overhead_seconds_bucket", (("le", "0.00025"),))] == 2
    assert merged[("llm_proxy_overhead_seconds_bucket", (("le", "+Inf"),))] == 3
    assert abs(merged[("llm_proxy_overhead_seconds_sum", ())] - 0.0034) < 1e-12


def test_series_only_one_worker_has_are_kept_and_one_worker_is_itself():
    registry = CollectorRegistry()
    Counter("llm_requests_blocked", "Requests refused", ["campaign"], registry=registry).labels("x").inc()
    alone = worker(1.0, 1, 2.0, [])
    assert samples(merged_exposition([alone])) == samples(alone.encode())
    merged = samples(merged_exposition([alone, generate_latest(registry).decode()]))
    assert merged[("llm_requests_blocked_total", (("campaign", "x"),))] == 1
    assert merged[("llm_cost_usd_total", (("campaign", "c1"), ("model", "gpt-4o-mini")))] == 1.0
