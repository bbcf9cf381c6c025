"""Prometheus metrics. The registry is a parameter, so every app (and every test) has its own.

Ledger-derived series (cost, tokens, requests) are counted when the ledger commits a batch,
from the rows actually inserted, so they always agree with `usage_records`. Budget gauges are
read from the stored aggregates, so they are right after a restart and agree across replicas
(aggregate them with max(), not sum()). Campaign and model label values are capped; the rest are
`_other`. Operation labels come from the fixed list of known operations; any other path is `_other`.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter as Counter_
from collections.abc import Iterable, Sequence
from decimal import Decimal
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from costing.budget import Budget
from costing.endpoints import OPERATIONS, REALTIME_TRANSCRIPTION
from costing.money import SCALE
from costing.records import UsageEntry

OTHER = "_other"
PROVIDER = "openai"
# OpenTelemetry GenAI semantic conventions' recommended bucket boundaries.
TOKEN_BUCKETS = tuple(float(4**i) for i in range(14))  # 1, 4, 16, ... 67108864
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
# The GenAI operations (named as their spans are); the billable calls the proxy cannot price
# report no tokens, so they are not in the GenAI histograms. A Realtime transcription reports
# tokens, but the conventions have no name for it: named as the ledger names it.
GEN_AI_OPERATION = {"chat.completions": "chat", "completions": "text_completion",
                    "embeddings": "embeddings", "responses": "chat", "realtime": "chat",
                    REALTIME_TRANSCRIPTION: REALTIME_TRANSCRIPTION}
TOKEN_TYPES = ("input", "cached_input", "output", "reasoning", "audio_input", "audio_output",
               "cache_write_input", "cached_audio_input")


# Model names come from clients (any string up to 200 characters): without a cap, a client could
# grow the scrape without bound. OpenAI has well under a hundred models and snapshots.
MAX_MODEL_LABELS = 200


def operation_label(operation: str) -> str:
    """A known operation's name, else `_other`: an unknown path's name is the client's choice
    (`POST /v1/<anything>`), and a cap would let the first few hundred of those take the names
    and push a real new endpoint into `_other`."""
    return operation if operation in OPERATIONS else OTHER


class CappedLabels:
    """Caps distinct values of a label: the first `limit` seen keep their name, the rest are
    `_other`, so label values that clients choose (campaigns, models) cannot grow the scrape."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._known: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._known:
            return value
        if len(self._known) < self.limit:
            self._known.add(value)
            return value
        return OTHER


class BudgetCollector(Collector):
    """Budget gauges from the last read of the stored aggregates."""

    def __init__(self, labels: CappedLabels) -> None:
        self.labels = labels
        self.rows: list[tuple[str, Decimal, Budget]] = []

    def collect(self) -> Iterable[Metric]:
        limit = GaugeMetricFamily("llm_budget_limit_usd", "Campaign cost limit (USD)",
                                  labels=["campaign"])
        warning = GaugeMetricFamily("llm_budget_warning_usd", "Campaign warning threshold (USD)",
                                    labels=["campaign"])
        spent = GaugeMetricFamily("llm_budget_spent_usd", "Campaign recorded spend (USD)",
                                  labels=["campaign"])
        for campaign_id, amount, budget in self.rows:
            label = self.labels(campaign_id)
            if label == OTHER:
                continue
            limit.add_metric([label], float(budget.limit_usd))
            warning.add_metric([label], float(budget.warning_usd))
            spent.add_metric([label], float(amount))
        yield from (limit, warning, spent)


class LoopHistogram(Collector):
    """A histogram family observed from the event loop only: plain counts, no locks.

    prometheus_client's Histogram takes a lock per bucket and per sum on every observation;
    the request path observes several per request, and everything here (observations and the
    /metrics handler that collects) runs on the one event-loop thread.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.bounds = tuple(buckets)
        self._les = [floatToGoString(b) for b in (*self.bounds, math.inf)]
        self._series: dict[tuple[str, ...], _Series] = {}
        registry.register(self)

    def observe(self, value: float, labels: tuple[str, ...] = ()) -> None:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = _Series([0] * (len(self.bounds) + 1))
        series.counts[bisect_left(self.bounds, value)] += 1  # `le` bounds are inclusive
        series.sum += value

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, series in self._series.items():
            family.add_metric(list(labels), list(zip(self._les, accumulate(series.counts), strict=True)),
                              series.sum)
        yield family


class _Series:
    __slots__ = ("counts", "sum")

    def __init__(self, counts: list[int]) -> None:
        self.counts = counts
        self.sum = 0.0


class Metrics:
    def __init__(self, registry: CollectorRegistry, max_campaigns: int = 1000) -> None:
        self.registry = registry
        self.campaign = CappedLabels(max_campaigns)
        self.model = CappedLabels(MAX_MODEL_LABELS)
        gen_ai = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model",
                  "gen_ai_response_model"]
        self.token_usage = LoopHistogram(
            "gen_ai_client_token_usage", "Tokens used per operation (OpenTelemetry GenAI)",
            ["gen_ai_token_type", *gen_ai], buckets=TOKEN_BUCKETS, registry=registry)
        self.operation_duration = LoopHistogram(
            "gen_ai_client_operation_duration_seconds",
            "Duration of GenAI operations as the client sees them (OpenTelemetry GenAI)",
            [*gen_ai, "error_type"], buckets=DURATION_BUCKETS, registry=registry)
        self.cost = Counter("llm_cost_usd", "Recorded cost (USD)", ["campaign", "model"],
                            registry=registry)
        self.tokens = Counter("llm_tokens", "Recorded tokens by type", ["campaign", "model", "type"],
                              registry=registry)
        self.requests = Counter("llm_requests", "Metered requests by upstream status",
                                ["campaign", "operation", "status"], registry=registry)
        self.blocked = Counter("llm_requests_blocked", "Requests refused by the budget gate",
                               ["campaign"], registry=registry)
        self.overhead = LoopHistogram("llm_proxy_overhead_seconds",
                                      "Time spent in the proxy itself (excludes waiting on upstream)",
                                      buckets=OVERHEAD_BUCKETS, registry=registry)
        self.queue_depth = Gauge("llm_ledger_queue_depth", "Usage records waiting to be written",
                                 registry=registry)
        self.flush_duration = Histogram("llm_ledger_flush_duration_seconds",
                                        "Time to write one ledger batch", registry=registry)
        self.written = Counter("llm_ledger_records_written", "Usage records written",
                               registry=registry)
        self.dropped = Counter("llm_ledger_records_dropped",
                               "Usage records that could not be kept (stays 0 by design)",
                               registry=registry)
        self.known = Counter("llm_ledger_records_known",
                             "Records not inserted because the ledger already held their id (a "
                             "retried batch, a replayed spool, a final state read twice)",
                             registry=registry)
        self.priced_by_default = Counter("llm_requests_priced_by_default",
                                         "Calls priced with the default prices (model not in the "
                                         "price table)", ["model"], registry=registry)
        self.flush_errors = Counter("llm_ledger_flush_errors", "Failed ledger batch writes",
                                    registry=registry)
        # Durability (costing/spool.py)
        self.spooled = Gauge("llm_spool_records", "Usage records in the local spool, not yet "
                             "committed", registry=registry)
        self.spool_write_errors = Gauge("llm_spool_write_errors", "Failed spool appends since "
                                        "start (a full or failing disk)", registry=registry)
        self.spool_replayed = Counter("llm_spool_replayed_records", "Records of stopped "
                                      "processes replayed from the spool at start",
                                      registry=registry)
        self.spool_torn = Counter("llm_spool_torn_lines", "Spool lines skipped at replay: cut "
                                  "short by a crash mid-write, or unreadable", registry=registry)
        # Tracing (tracing/exporter.py): spans sent to the OTLP receiver, and spans given up.
        self.spans_exported = Counter("llm_trace_spans_exported", "Trace spans the OTLP receiver accepted",
                                      registry=registry)
        self.spans_dropped = Counter("llm_trace_spans_dropped",
                                     "Trace spans dropped: queue full, receiver failing or shutdown",
                                     registry=registry)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.budgets = BudgetCollector(self.campaign)
        registry.register(self.budgets)

    def on_flushed(self, _batch: Sequence[UsageEntry], inserted: Sequence[UsageEntry],
                   seconds: float) -> None:
        """Count a committed batch: summed per label set first, so a batch costs few updates."""
        self.flush_duration.observe(seconds)
        self.written.inc(len(inserted))
        by_default: Counter_[str] = Counter_()
        requests: Counter_[tuple[str, ...]] = Counter_()
        costs: Counter_[tuple[str, ...]] = Counter_()  # money units
        tokens: Counter_[tuple[str, ...]] = Counter_()
        for e in inserted:
            campaign = self.campaign(e.campaign_id)
            model = self.model(e.model or "unknown")
            operation = operation_label(e.operation)
            requests[(campaign, operation, str(e.status_code))] += 1
            if e.priced_by_default:
                by_default[model] += 1
            if e.cost_units:
                costs[(campaign, model)] += e.cost_units
            usage = e.usage
            for kind, count in zip(TOKEN_TYPES, (usage.input_tokens, usage.cached_input_tokens,
                                                 usage.output_tokens, usage.reasoning_tokens,
                                                 usage.audio_input_tokens, usage.audio_output_tokens,
                                                 usage.cache_write_input_tokens,
                                                 usage.cached_audio_input_tokens),
                                   strict=True):
                if count:
                    tokens[(campaign, model, kind)] += count
            gen_ai_operation = GEN_AI_OPERATION.get(operation)
            if e.status_code < 400 and gen_ai_operation is not None:
                names = (gen_ai_operation, PROVIDER,
                         self.model(e.request_model or "unknown"),
                         self.model(e.response_model or "unknown"))
                self.token_usage.observe(usage.input_tokens, ("input", *names))
                if operation != "embeddings":
                    self.token_usage.observe(usage.output_tokens, ("output", *names))
        for key, count in requests.items():
            self._child(self.requests, key).inc(count)
        for key, amount in costs.items():
            self._child(self.cost, key).inc(amount / SCALE)
        for key, count in tokens.items():
            self._child(self.tokens, key).inc(count)
        for model, count in by_default.items():
            self._child(self.priced_by_default, (model,)).inc(count)

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        """Labelled child, cached: `labels()` is the costliest part of an update."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def on_flush_error(self, _exc: BaseException) -> None:
        self.flush_errors.inc()

    def observe_operation(self, operation: str, request_model: str | None,
                          response_model: str | None, seconds: float, error_type: str) -> None:
        self.operation_duration.observe(seconds, (
            GEN_AI_OPERATION.get(operation, operation), PROVIDER, self.model(request_model or "unknown"),
            self.model(response_model or "unknown"), error_type))

    def on_blocked(self, campaign_id: str) -> None:
        self.blocked.labels(self.campaign(campaign_id)).inc()
