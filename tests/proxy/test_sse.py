"""The SSE tap, as a pure byte transformer: whatever way the upstream cuts its stream into
chunks, the client receives the same events, and usage is found exactly once.
"""

from __future__ import annotations

import itertools
import sys
import tracemalloc

import orjson
from hypothesis import given
from hypothesis import strategies as st

from costing.usage import Usage
from proxy.sse import SSETap, decoded_text_chars, text_chars

WORDS = ["The goblin", " king \\\"usage\\\": {", " leans", " back.", " Ünïcode ✓", ""]
USAGE = {"prompt_tokens": 120, "completion_tokens": 24, "total_tokens": 144,
         "prompt_tokens_details": {"cached_tokens": 64}, "completion_tokens_details": {"reasoning_tokens": 0}}


def chat_event(delta: dict, *, usage: object = None, choices: bool = True, sep: bytes = b"\n\n") -> bytes:
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o-mini-2024-07-18",
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}] if choices else [],
            "usage": usage}
    return b"data: " + orjson.dumps(body) + sep


def chat_stream(sep: bytes = b"\n\n") -> tuple[bytes, bytes]:
    """(what an include_usage upstream sends, what a client that did not ask for usage gets)."""
    events = [chat_event({"role": "assistant", "content": ""}, sep=sep)]
    events += [chat_event({"content": w}, sep=sep) for w in WORDS]
    upstream = b"".join(events) + chat_event({}, usage=USAGE, choices=False, sep=sep) + b"data: [DONE]" + sep
    client = b"".join(e.replace(b',"usage":null', b"") for e in events) + b"data: [DONE]" + sep
    return upstream, client


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def run(tap: SSETap, chunks: list[bytes]) -> bytes:
    return b"".join(tap.feed(c) for c in chunks) + tap.finish()


CUTS = st.lists(st.integers(min_value=0, max_value=10_000), max_size=30)


@given(CUTS, st.sampled_from([b"\n\n", b"\r\n\r\n"]))
def test_the_usage_chunk_the_proxy_asked_for_is_removed_however_the_stream_is_cut(cuts, sep):
    upstream, client = chat_stream(sep)
    tap = SSETap(strip_usage=True)
    assert run(tap, split(upstream, cuts)) == client
    result = tap.result()
    assert result.usage == Usage(120, 64, 24, 0)
    assert (result.model, result.response_id) == ("gpt-4o-mini-2024-07-18", "chatcmpl-1")


@given(CUTS)
def test_a_stream_whose_client_asked_for_usage_passes_byte_for_byte(cuts):
    upstream, _ = chat_stream()
    tap = SSETap(strip_usage=False)
    assert run(tap, split(upstream, cuts)) == upstream
    assert tap.usage_seen and tap.result().usage == Usage(120, 64, 24, 0)


@given(CUTS, st.integers(min_value=0, max_value=10_000))
def test_a_stream_cut_before_usage_counts_the_text_it_forwarded(cuts, stop):
    upstream, _ = chat_stream()
    cut_at = upstream.index(b'"choices":[]')  # the usage event never arrives
    truncated = upstream[:stop % cut_at]
    tap = SSETap(strip_usage=True)
    forwarded = run(tap, split(truncated, cuts))
    assert not tap.usage_seen and tap.result().usage is None
    complete_events = forwarded.split(b"\n\n")[:-1]  # an SSE client drops an event that never ended
    texts = [orjson.loads(event[6:])["choices"][0]["delta"].get("content", "") for event in complete_events]
    assert tap.streamed_chars() == sum(len(t) for t in texts)
    if complete_events:  # the model and id still price the estimate
        assert (tap.result().model, tap.result().response_id) == ("gpt-4o-mini-2024-07-18", "chatcmpl-1")


def test_a_half_written_last_line_reaches_the_client_as_it_is():
    upstream, _ = chat_stream()
    cut = upstream.index(b'"choices":[]') + 5
    tap = SSETap(strip_usage=False)
    assert run(tap, [upstream[:cut]]) == upstream[:cut]


def test_responses_usage_comes_from_the_terminal_event_and_nothing_is_removed():
    def event(kind: str, **fields: object) -> bytes:
        return f"event: {kind}\n".encode() + b"data: " + orjson.dumps({"type": kind, **fields}) + b"\n\n"

    response = {"id": "resp_1", "model": "gpt-4.1-2025-04-14", "usage": None}
    stream = (event("response.created", response=response)
              + b"".join(event("response.output_text.delta", delta=w) for w in WORDS)
              + event("response.completed", response={**response, "usage": {
                  "input_tokens": 10, "output_tokens": 7, "input_tokens_details": {"cached_tokens": 2},
                  "output_tokens_details": {"reasoning_tokens": 3}}}))
    for size in (1, 7, 64, len(stream)):
        tap = SSETap(strip_usage=False)
        assert run(tap, [stream[i:i + size] for i in range(0, len(stream), size)]) == stream
        assert tap.result().usage == Usage(10, 2, 7, 3)
        assert tap.result().response_id == "resp_1"


def long_stream(events: int) -> list[bytes]:
    """A long answer without usage (as an upstream cut off before it), one event per chunk."""
    words = [" goblin", " king", " Ünïcode ✓", " leans", " back.", " \\\"quoted\\\""]
    return [chat_event({"role": "assistant", "content": ""})] + [
        chat_event({"content": words[i % len(words)]}) for i in range(events)]


def held_bytes(tap: SSETap) -> int:
    """Bytes the tap holds: its fields and what they refer to."""
    return sum(sys.getsizeof(getattr(tap, name)) for name in SSETap.__slots__)


def test_the_tap_holds_the_same_few_bytes_however_long_the_stream():
    chunks = long_stream(10_000)
    tap = SSETap(strip_usage=True)
    sizes = []
    for i, chunk in enumerate(chunks):
        tap.feed(chunk[:50])  # every event arrives in two pieces: a partial event is held too
        tap.feed(chunk[50:])
        if i in (100, 10_000):
            sizes.append(held_bytes(tap))
    assert sizes[1] <= sizes[0] + 64  # a few int objects grow by a digit, nothing more
    assert sizes[1] < 2_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for chunk in chunks:
            tap.feed(chunk)
        assert tracemalloc.get_traced_memory()[0] - before < 2_000
    finally:
        tracemalloc.stop()


def test_a_long_stream_without_usage_is_estimated_within_a_few_per_cent():
    chunks = long_stream(10_000)
    tap = SSETap(strip_usage=True)
    forwarded = run(tap, chunks)
    exact = sum(len(orjson.loads(event[6:])["choices"][0]["delta"]["content"])
                for event in forwarded.split(b"\n\n")[:-1])
    assert not tap.usage_seen
    assert abs(tap.streamed_chars() - exact) <= 0.03 * exact
    assert (tap.result().model, tap.result().response_id) == ("gpt-4o-mini-2024-07-18", "chatcmpl-1")


@given(st.lists(st.sampled_from([*WORDS, "\n", '{"usage": null}', "日本語"]), max_size=8))
def test_the_text_read_from_the_bytes_is_the_text_decoded(words):
    block = b"".join(chat_event({"content": w}) for w in words)
    assert text_chars(block) == decoded_text_chars(block) == sum(len(w) for w in words)


@given(CUTS)
def test_usage_on_every_chunk_counts_only_once_the_usage_only_chunk_has_come(cuts):
    """Some compatible servers put the usage so far on every chunk (vLLM's continuous usage
    stats): the last usage wins, and only the usage-only chunk says it is the call's total."""
    so_far = [{**USAGE, "completion_tokens": n} for n in range(len(WORDS))]
    events = b"".join(chat_event({"content": w}, usage=u) for w, u in zip(WORDS, so_far, strict=True))
    tap = SSETap(strip_usage=False)
    run(tap, split(events, cuts))
    assert tap.usage_seen and not tap.usage_final
    assert tap.result().usage == Usage(input_tokens=120, cached_input_tokens=64,
                                       output_tokens=len(WORDS) - 1)
    tap.feed(chat_event({}, usage=USAGE, choices=False))
    assert tap.usage_final and tap.result().usage.output_tokens == 24  # type: ignore[union-attr]
