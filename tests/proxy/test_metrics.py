"""/metrics: values equal the ledger, the exposition passes promtool, cardinality is bounded."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from asyncio.subprocess import PIPE
from decimal import Decimal

import aiohttp
import openai
import pytest
from conftest import IN_CI
from ledger_check import ledger_rows
from prometheus_client.parser import text_string_to_metric_families


async def _scrape(proxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


async def test_metrics_equal_the_ledger(proxy, fake):
    fake.behaviour.cached_tokens, fake.behaviour.reasoning_tokens = 4, 3
    for i in range(5):
        await proxy.client(campaign=f"m{i % 2}").chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    fake.behaviour.status = 500
    with pytest.raises(openai.InternalServerError):
        await proxy.client(campaign="m0").chat.completions.create(model="gpt-4o-mini", messages=[])
    await proxy.flush()
    rows = await ledger_rows(proxy.engine)
    samples = await _scrape(proxy)
    for campaign in ("m0", "m1"):
        mine = [r for r in rows if r.campaign_id == campaign]
        cost = sum((float(v) for (n, labels), v in samples.items()
                    if n == "llm_cost_usd_total" and ("campaign", campaign) in labels), 0.0)
        assert cost == pytest.approx(float(sum(r.cost_usd for r in mine)), rel=1e-12)
        for kind, column in [("input", "input_tokens"), ("cached_input", "cached_input_tokens"),
                             ("output", "output_tokens"), ("reasoning", "reasoning_tokens")]:
            tokens = sum(v for (n, labels), v in samples.items() if n == "llm_tokens_total"
                         and ("campaign", campaign) in labels and ("type", kind) in labels)
            assert tokens == sum(getattr(r, column) for r in mine)
        for status in {r.status_code for r in mine}:
            count = sum(v for (n, labels), v in samples.items() if n == "llm_requests_total"
                        and ("campaign", campaign) in labels and ("status", str(status)) in labels)
            assert count == sum(1 for r in mine if r.status_code == status)
    assert not any("session" in k for (_, labels) in samples for k, _ in labels)
    assert samples[("llm_ledger_records_dropped_total", ())] == 0
    assert any(n == "gen_ai_client_token_usage_bucket" for n, _ in samples)
    assert any(n == "gen_ai_client_operation_duration_seconds_count" and ("error_type", "500") in labels
               for n, labels in samples)


async def test_budget_gauges_come_from_the_stored_aggregates(proxy, fake):
    await proxy.client(campaign="g1").chat.completions.create(model="gpt-4o", messages=[])
    await proxy.flush()
    [row] = await ledger_rows(proxy.engine)
    proxy.metrics.budgets.rows = await proxy.store.budget_gauges(10)
    samples = await _scrape(proxy)
    assert Decimal(str(samples[("llm_budget_spent_usd", (("campaign", "g1"),))])) == row.cost_usd
    assert samples[("llm_budget_limit_usd", (("campaign", "g1"),))] == 5.0


async def test_exposition_passes_promtool(proxy, fake):
    promtool = shutil.which("promtool")
    if promtool is None:
        if IN_CI:
            pytest.fail("promtool (Debian package prometheus) is required in CI")
        pytest.skip("promtool not installed")
    await proxy.client().chat.completions.create(model="gpt-4o", messages=[])
    await proxy.flush()
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/metrics") as response:
        text = await response.read()
    check = await asyncio.create_subprocess_exec(promtool, "check", "metrics", stdin=PIPE, stdout=PIPE,
                                                 stderr=PIPE)
    out, err = await check.communicate(text)
    assert check.returncode == 0, err
    assert out == b"" and err == b""  # not even a lint hint


async def test_5000_campaigns_keep_the_scrape_bounded(start_proxy, fake):
    proxy = await start_proxy(metrics_max_campaigns=50)
    from datetime import UTC, datetime

    from costing.money import to_units
    from costing.records import UsageEntry, epoch_us
    from costing.usage import Usage

    entries = [UsageEntry(f"camp-{i}", "s", "chat.completions", "gpt-4o", "gpt-4o", Usage(1, 0, 1, 0),
                          to_units(Decimal("0.00001")), False, False, False, 200, 1,
                          epoch_us(datetime.now(UTC)))
               for i in range(5000)]
    proxy.metrics.on_flushed(entries, entries, 0.01)
    samples = await _scrape(proxy)
    campaigns = {dict(labels).get("campaign") for _, labels in samples} - {None}
    assert len(campaigns) == 51 and "_other" in campaigns
    series = sum(1 for name, _ in samples if name.startswith("llm_cost_usd"))
    assert series <= 2 * 51


async def test_unknown_paths_add_no_series_and_known_unpriced_ones_keep_their_name(proxy, fake):
    """POSTs to paths the proxy does not know are gated and in the ledger (named by their first
    segment there), but their operation label is the one value `_other`: 300 random paths add one
    series, not 300. A known billable path it cannot price (images) keeps a readable name."""
    async with aiohttp.ClientSession(headers={"X-Campaign-Id": "u1"}) as http:
        for _ in range(300):
            async with http.post(f"{proxy.url}/v1/{uuid.uuid4().hex}/run", json={}) as response:
                assert response.status == 200
        async with http.post(f"{proxy.url}/v1/images/generations", json={"prompt": "a goblin"}) as response:
            assert response.status == 200
    await proxy.flush()
    rows = await ledger_rows(proxy.engine)
    assert len({r.operation for r in rows}) == 301  # the ledger still tells them apart
    samples = await _scrape(proxy)
    series = [dict(labels) for n, labels in samples if n == "llm_requests_total"]
    assert {s["operation"] for s in series} == {"images.generations", "_other"}
    assert len(series) == 2
    # The GenAI token histogram is for GenAI operations: calls the proxy cannot price report no
    # tokens, and are not in it.
    assert not [labels for n, labels in samples if n == "gen_ai_client_token_usage_count"]
    assert samples[("llm_requests_total", (("campaign", "u1"), ("operation", "_other"),
                                           ("status", "200")))] == 300


def test_model_names_chosen_by_clients_cannot_grow_the_scrape():
    from datetime import UTC, datetime

    from prometheus_client import CollectorRegistry

    from costing.money import to_units
    from costing.records import UsageEntry, epoch_us
    from costing.usage import Usage
    from proxy.metrics import MAX_MODEL_LABELS, Metrics

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    count = MAX_MODEL_LABELS + 300
    for i in range(count):
        metrics.observe_operation("chat.completions", f"made-up-{i}", None, 0.1, "404")
    entries = [UsageEntry("c", "s", "chat.completions", f"asked-{i}", f"answered-{i}", Usage(1, 0, 1, 0),
                          to_units(Decimal("0.00001")), False, False, False, 200, 1,
                          epoch_us(datetime.now(UTC)))
               for i in range(count)]
    metrics.on_flushed(entries, entries, 0.01)
    for family in registry.collect():
        for label in ("model", "gen_ai_request_model", "gen_ai_response_model"):
            values = {s.labels[label] for s in family.samples if label in s.labels}
            assert len(values) <= MAX_MODEL_LABELS + 1, (family.name, label)
            if len(values) > 10:
                assert "_other" in values
    assert "made-up-0" in {s.labels.get("gen_ai_request_model") for f in registry.collect()
                           for s in f.samples}  # the first ones keep their names


def test_loop_histograms_export_what_prometheus_client_histograms_would():
    """The lock-free histograms: same buckets, counts, sums and labels as prometheus_client's."""
    from prometheus_client import CollectorRegistry, Histogram

    from proxy.metrics import DURATION_BUCKETS, LoopHistogram

    ours_registry, reference_registry = CollectorRegistry(), CollectorRegistry()
    ours = LoopHistogram("d_seconds", "d", ["op"], buckets=DURATION_BUCKETS, registry=ours_registry)
    reference = Histogram("d_seconds", "d", ["op"], buckets=DURATION_BUCKETS, registry=reference_registry)
    values = [0.0, 0.01, 0.010001, 0.5, 0.64, 81.92, 81.93, 1e9, 0.02, 0.02]  # on and off the bounds
    for i, value in enumerate(values):
        op = "chat" if i % 3 else "embeddings"
        ours.observe(value, (op,))
        reference.labels(op).observe(value)

    def samples(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
        return {(s.name, tuple(sorted(s.labels.items())), s.value)
                for family in registry.collect() for s in family.samples
                if not s.name.endswith("_created")}

    assert samples(ours_registry) == samples(reference_registry)
    assert len(samples(ours_registry)) == 2 * (len(DURATION_BUCKETS) + 3)
