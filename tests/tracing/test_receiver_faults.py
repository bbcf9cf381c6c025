"""A trace receiver that is down, slow or failing costs requests nothing: every request is
answered as fast as with tracing off, the span queue never grows past its bound, and every span
is either exported or counted as dropped.

The 1,000 requests go through a plain aiohttp client (the openai SDK's own cost per call would
be most of what is measured here); the SDK drives the proxy in test_trace_export.py.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import aiohttp
import pytest
from conftest import free_port
from otlpreceiver import OTLPReceiver

from proxy.state import TRACER

REQUESTS = 1000
CONCURRENCY = 20
MAX_QUEUE = 100
BODY = b'{"model":"text-embedding-3-small","input":"a"}'
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-test", "X-Campaign-Id": "c1",
           "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}


async def _load(proxy: Any) -> list[float]:
    """REQUESTS embeddings calls, CONCURRENCY at a time; their latencies. Checks the span queue's
    bound after every answer."""
    latencies: list[float] = []
    tracer = proxy.app[TRACER]
    deepest = 0

    async def worker(http: aiohttp.ClientSession, count: int) -> None:
        nonlocal deepest
        for _ in range(count):
            started = time.perf_counter()
            async with http.post(f"{proxy.url}/v1/embeddings", data=BODY, headers=HEADERS) as response:
                assert response.status == 200
                assert (await response.json())["usage"]["prompt_tokens"] == 12
            latencies.append(time.perf_counter() - started)
            if tracer is not None:
                deepest = max(deepest, len(tracer.queue))

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(worker(http, REQUESTS // CONCURRENCY) for _ in range(CONCURRENCY)))
    assert len(latencies) == REQUESTS
    assert deepest <= MAX_QUEUE
    return latencies


def _summary(latencies: list[float]) -> tuple[float, float]:
    """Median and 90th percentile."""
    return statistics.median(latencies), statistics.quantiles(latencies, n=10)[-1]


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_a_bad_receiver_costs_requests_nothing(start_proxy, fake, caplog):
    baseline = _summary(await _load(await start_proxy()))
    for fault in ("down", "slow", "failing"):
        async with OTLPReceiver(status=503 if fault == "failing" else 200,
                                delay=5.0 if fault == "slow" else 0.0) as receiver:
            endpoint = f"http://127.0.0.1:{free_port()}" if fault == "down" else receiver.url
            traced = await start_proxy(
                otel_exporter_otlp_endpoint=endpoint, otel_bsp_max_queue_size=MAX_QUEUE,
                otel_bsp_max_export_batch_size=50, otel_bsp_schedule_delay=10,
                otel_bsp_export_timeout=1500, otel_exporter_otlp_timeout=1000)
            latencies = await _load(traced)
            # Generous bounds against tracing off on the same machine in the same minute (no
            # absolute timings): a request that waited on the receiver's 1-5 s, or paid for
            # encoding, would move the median and the 90th percentile far past these.
            median, p90 = _summary(latencies)
            assert median < 2 * baseline[0] + 0.05, (fault, median, baseline)
            assert p90 < 2 * baseline[1] + 0.2, (fault, p90, baseline)
            await traced.stop()  # flushes what it can within the export timeout, drops the rest
            exported = traced.registry.get_sample_value("llm_trace_spans_exported_total")
            dropped = traced.registry.get_sample_value("llm_trace_spans_dropped_total")
            assert (exported, dropped) == (0, REQUESTS), fault  # every span accounted for
            if fault != "down":
                assert receiver.posts >= 1, fault
            if fault == "failing":
                assert receiver.posts >= 2, "a 503 is retried"
    # Said once per outage (per proxy here), not once per lost batch.
    warnings = [r.getMessage() for r in caplog.records if "failing" in r.getMessage()]
    assert len(warnings) == 3, warnings
