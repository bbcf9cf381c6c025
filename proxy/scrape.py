"""One /metrics for several worker processes: each worker's exposition text, merged.

prometheus_client's multiprocess mode cannot carry custom collectors (the loop histograms, the
budget gauges), so each worker serves its own registry on a private unix socket, and the worker
that receives a scrape gathers the others' text and merges it here. Rules, per sample name and
label set: counters and histograms (buckets, counts, sums) add up; gauges take the largest value
(the budget gauges are the same stored figures read by every worker), except gauges that count
something per process (`ADDITIVE_GAUGES`, the ledger queue), which add up; `*_created`
timestamps take the earliest.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

ADDITIVE_GAUGES = frozenset({"llm_ledger_queue_depth"})


def _combine(kind: str, name: str, values: Sequence[float]) -> float:
    if kind != "gauge" or name in ADDITIVE_GAUGES:
        return sum(values)
    if name.endswith("_created"):
        return min(values)
    return max(values)


def merge(texts: Iterable[str]) -> list[Metric]:
    """Families of several expositions with equal samples combined; order of first appearance."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            samples = values[family.name]
            for sample in family.samples:
                samples.setdefault((sample.name, tuple(sample.labels.items())), []).append(sample.value)
    merged = []
    for name, family in families.items():
        for (sample_name, labels), seen in values[name].items():
            family.add_sample(sample_name, dict(labels), _combine(family.type, name, seen))
        merged.append(family)
    return merged


class _Merged(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def merged_exposition(texts: Iterable[str]) -> bytes:
    """The text format of `merge(texts)`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(merge(texts)))
    return generate_latest(registry)
