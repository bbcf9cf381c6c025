"""A trace receiver that is down, slow or failing costs requests nothing: every request is
answered as fast as with tracing off, the span queue never grows past its bound, and every span
is either exported or counted as dropped."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import pytest
from conftest import free_port
from otlpreceiver import OTLPReceiver

from proxy.state import TRACER

REQUESTS = 1000
CONCURRENCY = 20
MAX_QUEUE = 100


async def _load(proxy: Any) -> list[float]:
    """REQUESTS embeddings calls through the real SDK, CONCURRENCY at a time; their latencies."""
    client = proxy.client()
    latencies: list[float] = []
    tracer = proxy.app[TRACER]
    deepest = 0

    async def worker(count: int) -> None:
        nonlocal deepest
        for _ in range(count):
            started = time.perf_counter()
            reply = await client.embeddings.create(model="text-embedding-3-small", input="a")
            latencies.append(time.perf_counter() - started)
            assert reply.usage.prompt_tokens == 12
            if tracer is not None:
                deepest = max(deepest, len(tracer.queue))

    await asyncio.gather(*(worker(REQUESTS // CONCURRENCY) for _ in range(CONCURRENCY)))
    await client.close()
    assert len(latencies) == REQUESTS
    assert deepest <= MAX_QUEUE
    return latencies


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize("fault", ["down", "slow", "failing"])
async def test_a_bad_receiver_costs_requests_nothing(start_proxy, fake, fault):
    async with OTLPReceiver(status=503 if fault == "failing" else 200,
                            delay=5.0 if fault == "slow" else 0.0) as receiver:
        endpoint = f"http://127.0.0.1:{free_port()}" if fault == "down" else receiver.url
        untraced = await start_proxy()
        traced = await start_proxy(otel_exporter_otlp_endpoint=endpoint, otel_bsp_max_queue_size=MAX_QUEUE,
                                   otel_bsp_max_export_batch_size=50, otel_bsp_schedule_delay=10,
                                   otel_bsp_export_timeout=1500, otel_exporter_otlp_timeout=1000)
        baseline = await _load(untraced)
        latencies = await _load(traced)
        # Generous: a request that waited on the receiver would take its 1-5 s.
        assert max(latencies) < 1.0
        assert statistics.median(latencies) < 2 * statistics.median(baseline) + 0.02
        await traced.stop()  # flushes what it can within the export timeout, drops the rest
        exported = traced.registry.get_sample_value("llm_trace_spans_exported_total")
        dropped = traced.registry.get_sample_value("llm_trace_spans_dropped_total")
        assert exported == 0
        assert dropped == REQUESTS  # every span accounted for: none exported, all dropped
        if fault != "down":
            assert receiver.posts >= 1
