"""End to end against a real Arize Phoenix (an OTLP/HTTP receiver and trace store): openai SDK
calls through the proxy with the caller's `traceparent`, streamed and not, chat, embeddings and
Responses; read back from Phoenix's REST API, each is one span in the caller's trace, a child of
the caller's span, with the spec's attributes; the upstream saw the proxy's span as parent.

Phoenix lives in its own virtual environment (scripts/test.sh installs it; PHOENIX_VENV says
where). Without it the test is skipped, except in CI (CI=true), where it fails.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import IN_CI, free_port

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
DEFAULT_VENV = CACHE / "llm-cost-proxy" / "phoenix-venv"
PHOENIX_VENV = Path(os.environ.get("PHOENIX_VENV") or DEFAULT_VENV)
READY_SECONDS = 240  # ~8 s on an idle machine; its first start also migrates its database


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="module")
def phoenix() -> Iterator[str]:
    """A Phoenix server of this module's own, on free loopback ports, with a fresh working dir."""
    command = PHOENIX_VENV / "bin" / "phoenix"
    if not command.exists():
        message = f"Arize Phoenix is not installed at {PHOENIX_VENV} (scripts/test.sh installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    workdir = Path(tempfile.mkdtemp(prefix="phoenix-"))
    port = free_port()
    env = {**os.environ, "PHOENIX_HOST": "127.0.0.1", "PHOENIX_PORT": str(port),
           "PHOENIX_GRPC_PORT": str(free_port()), "PHOENIX_WORKING_DIR": str(workdir),
           "PHOENIX_TELEMETRY_ENABLED": "false"}
    log = (workdir / "phoenix.log").open("wb")
    process = subprocess.Popen([str(command), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_SECONDS
        while not _answers(f"{url}/v1/projects"):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = (workdir / "phoenix.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"Phoenix did not start (exit {process.poll()}):\n{tail}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


async def _spans(url: str, count: int, trace_id: str) -> list[dict[str, Any]]:
    """The spans of `trace_id` Phoenix holds, once `count` of them have arrived."""
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{url}/v1/projects/default/spans", params={"limit": "1000"}) as response:
                assert response.status == 200, await response.text()
                found = [s for s in (await response.json())["data"] if s["context"]["trace_id"] == trace_id]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.25)


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_every_call_is_one_span_of_the_callers_trace_in_phoenix(phoenix, start_proxy, fake):
    proxy = await start_proxy(otel_exporter_otlp_endpoint=phoenix, otel_bsp_schedule_delay=50)
    client = proxy.client()
    trace_id = secrets.token_hex(16)
    callers: dict[str, str] = {}  # the caller's span id of each call -> what the call was

    def caller(call: str) -> dict[str, str]:
        span_id = secrets.token_hex(8)
        callers[span_id] = call
        return {"traceparent": f"00-{trace_id}-{span_id}-01"}

    messages = [{"role": "user", "content": "Roll for initiative"}]
    await client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=64,
                                         extra_headers=caller("chat"))
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True,
                                                  extra_headers=caller("chat stream"))
    async for _chunk in stream:
        pass
    await client.embeddings.create(model="text-embedding-3-small", input="goblin",
                                   extra_headers=caller("embeddings"))
    await client.responses.create(model="gpt-4.1-mini", input="hi", extra_headers=caller("responses"))
    async with client.responses.stream(model="gpt-4.1-mini", input="hi",
                                       extra_headers=caller("responses stream")) as events:
        async for _event in events:
            pass
    # The upstream saw each call's traceparent with the proxy's own span as the parent.
    upstream_parents = {}
    for recorded, call in zip(fake.requests, callers.values(), strict=True):
        version, trace, parent, flags = recorded.headers["traceparent"].split("-")
        assert (version, trace, flags) == ("00", trace_id, "01")
        assert parent not in callers
        upstream_parents[call] = parent

    spans = await _spans(phoenix, len(callers), trace_id)
    assert len(spans) == len(callers), [s["name"] for s in spans]  # one span per call, no more
    by_call = {callers[s["parent_id"]]: s for s in spans}  # each a child of its caller's span
    assert set(by_call) == set(callers.values())
    expected_names = {"chat": "chat gpt-4o-mini", "chat stream": "chat gpt-4o-mini",
                      "embeddings": "embeddings text-embedding-3-small",
                      "responses": "chat gpt-4.1-mini", "responses stream": "chat gpt-4.1-mini"}
    for call, span in by_call.items():
        attrs = span["attributes"]
        assert span["name"] == expected_names[call], call
        assert span["context"]["span_id"] == upstream_parents[call], call
        assert span["status_code"] != "ERROR", call
        assert attrs["gen_ai.provider.name"] == "openai"
        assert attrs["gen_ai.operation.name"] == expected_names[call].split()[0]
        assert attrs["gen_ai.request.model"] == expected_names[call].split()[1]
        assert attrs["gen_ai.response.model"]
        assert attrs["gen_ai.usage.input_tokens"] == 12
        assert attrs["gen_ai.usage.cache_read.input_tokens"] == 0
        assert attrs["llm_proxy.campaign.id"] == "c1" and attrs["llm_proxy.session.id"] == "s1"
        assert attrs["gen_ai.conversation.id"] == "s1"
        assert attrs["llm_proxy.cost.usd"] > 0 and attrs["llm_proxy.cost.estimated"] is False
        assert attrs["llm_proxy.priced_by_default"] is False
        assert attrs["llm_proxy.budget.status"] == "ok"
        assert attrs["http.response.status_code"] == 200
        assert attrs["server.address"] == "127.0.0.1"
        assert attrs["server.port"] == int(fake.url.rsplit(":", 1)[1])
        assert "error.type" not in attrs
        assert span["start_time"] < span["end_time"]
        if call != "embeddings":
            assert attrs["gen_ai.response.id"]
            assert attrs["gen_ai.response.finish_reasons"] == ["stop"], call
            assert attrs["gen_ai.usage.output_tokens"] > 0
            assert attrs["gen_ai.usage.reasoning.output_tokens"] == 0
        assert attrs.get("gen_ai.request.stream", False) is call.endswith("stream"), call
    assert by_call["chat"]["attributes"]["gen_ai.request.max_tokens"] == 64
    assert not any("Roll for initiative" in str(s) for s in spans)  # no content unless asked for
    async with asyncio.timeout(5):  # counted once Phoenix's answer is read
        while proxy.registry.get_sample_value("llm_trace_spans_exported_total") != len(callers):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
