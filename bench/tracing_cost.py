"""CPU cost of tracing per span, by part, with timeit (no server): what the request path pays
(`Tracer.start` with and without a caller `traceparent`, `Tracer.end`) and what the background
pays (building the OTLP messages, serializing, gzip). Figures go to docs/performance.md.

Run from the project root:  .venv/bin/python bench/tracing_cost.py
"""

from __future__ import annotations

import gzip
import time
import timeit
from decimal import Decimal

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from costing.budget import make_budget
from costing.records import UsageEntry
from costing.usage import Operation, Reported, RequestFacts, Usage
from tracing import otlp
from tracing.exporter import GZIP_LEVEL
from tracing.recorder import Tracer
from tracing.sampler import make_sampler

BATCH = 512


def per_call_us(statement: object, number: int) -> float:
    # CPU time of this process: the machine may be busy with other work.
    best = min(timeit.repeat(statement, number=number, repeat=5, timer=time.process_time))  # type: ignore[arg-type]
    return best / number * 1e6


def main() -> None:
    budget = make_budget(Decimal(1), Decimal(5))
    tracer = Tracer(make_sampler("parentbased_always_on", None), max_queue=10**9, batch_size=10**9,
                    standing=lambda _campaign: (12345, budget))
    facts = RequestFacts("gpt-4o-mini", False, False, 30, 256)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 256}
    plain = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json", "X-Campaign-Id": "c1"}))
    with_parent = CIMultiDictProxy(CIMultiDict({
        "Content-Type": "application/json", "X-Campaign-Id": "c1",
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "tracestate": "k=v"}))
    headers = [("Content-Type", "application/json"), ("Authorization", "Bearer x")]
    operation = str(Operation.CHAT)
    entry = UsageEntry("c1", "s1", operation, "gpt-4o-mini", "gpt-4o-mini-2024-07-18",
                       Usage(30, 0, 12, 0), 123456, False, False, False, 200, 250, 0, "chatcmpl-x", "abc")
    reported = Reported(entry.usage, entry.response_model, entry.response_id)
    message = {"role": "assistant", "content": "ok"}
    answer = {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}

    def start(request_headers: CIMultiDictProxy[str]) -> None:
        tracer.start(request_headers, list(headers), operation, "c1", "s1", facts, body, 0.0)

    copy_us = per_call_us(lambda: list(headers), 200_000)
    start_us = per_call_us(lambda: start(plain), 100_000) - copy_us
    start_parent_us = per_call_us(lambda: start(with_parent), 100_000) - copy_us
    span = tracer.start(plain, list(headers), operation, "c1", "s1", facts, body, 0.0)
    assert span is not None
    answered_us = per_call_us(lambda: tracer.answered(span, answer), 200_000)

    def end() -> None:
        tracer.end(span, 200, None, entry, reported, None)
        tracer.queue.clear()

    end_us = per_call_us(end, 200_000)

    spans = []
    for n in range(BATCH):  # new traces, each its own response id, tokens and cost
        one = tracer.start(plain, list(headers), operation, f"campaign-{n % 20}", f"session-{n % 200}",
                           facts, body, 0.0)
        assert one is not None
        tracer.answered(one, answer)
        usage = Usage(30 + n, 0, 12 + n % 50, 0)
        own = UsageEntry(one.campaign_id, one.session_id, operation, "gpt-4o-mini", "gpt-4o-mini-2024-07-18",
                         usage, 123456 + 7919 * n, False, False, False, 200, 250, 0, f"chatcmpl-{n:024x}")
        tracer.end(one, 200, None, own, Reported(usage, own.response_model, own.response_id), None)
        spans.append(one)
    encoder = otlp.Encoder(otlp.resource_attributes("llm-cost-proxy", []), "0.1.0", ("api.openai.com", 443))

    def build() -> list[bytes]:
        return [encoder.span(one) for one in spans]

    build_us = per_call_us(build, 5) / BATCH
    built = build()
    serialize_us = per_call_us(lambda: encoder.request(built), 20) / BATCH
    data = encoder.request(built)
    gzip_us = per_call_us(lambda: gzip.compress(data, GZIP_LEVEL), 20) / BATCH
    zipped = len(gzip.compress(data, GZIP_LEVEL))
    # References measured in the same run, to scale the figures on a busy machine.
    queue: list[tuple[int, int]] = []
    append_us = per_call_us(lambda: queue.append((1, 2)), 1_000_000)
    chat_answer = orjson.dumps({"id": "chatcmpl-x", "object": "chat.completion", "model": "gpt-4o-mini",
                                "choices": [answer["choices"][0] | {"logprobs": None}],
                                "usage": {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}})
    loads_us = per_call_us(lambda: orjson.loads(chat_answer), 200_000)
    print(f"references: a tuple append {append_us:.3f} us, "
          f"orjson.loads of a small chat answer {loads_us:.2f} us")
    print(f"request path: start {start_us:.2f} us (caller traceparent: {start_parent_us:.2f} us), "
          f"answered {answered_us:.2f} us, end {end_us:.2f} us")
    print(f"background, per span in batches of {BATCH}: encode {build_us:.2f} us, request body "
          f"{serialize_us:.2f} us, gzip {gzip_us:.2f} us; {len(data) / BATCH:.0f} bytes a span, "
          f"{zipped / BATCH:.0f} gzipped")


if __name__ == "__main__":
    main()
