"""End to end: a real Prometheus scrapes a real proxy (openai SDK traffic through it), and every
query of every Grafana panel returns data. Catches dashboards that name metrics or labels the proxy
does not export, PromQL that does not parse, and a scrape config that does not reach /metrics."""

from __future__ import annotations

import asyncio
import math
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from conftest import IN_CI, free_port, wait_answering
from deploy_files import PROMETHEUS_CONFIG, dashboards, load_yaml, runnable_promql, targets

PROMETHEUS = shutil.which("prometheus") or next(
    (p for p in ("/usr/bin/prometheus",) if Path(p).exists()), None)
SCRAPE = "1s"
CAMPAIGNS = ("alpha", "beta", "gamma")
CAPPED = "capped"  # limit 0: every request refused by the budget gate
MESSAGES = [{"role": "user", "content": "Roll for initiative."}]
METRICS_TOKEN = "metrics-token-e2e-5c1f"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _launch(tmp_path: Path, proxy_port: int) -> tuple[subprocess.Popen[bytes], str, Path]:
    """Prometheus with the project's scrape config, retargeted at the test proxy every second; the
    token file it names holds the proxy's METRICS_TOKEN, as docker-compose.yml writes it."""
    config = load_yaml(PROMETHEUS_CONFIG)
    config["global"].update(scrape_interval=SCRAPE, evaluation_interval=SCRAPE)
    token_file = tmp_path / "metrics_token"
    token_file.write_text(METRICS_TOKEN, encoding="utf-8")
    for job in config["scrape_configs"]:
        job["authorization"]["credentials_file"] = str(token_file)
        job.update(scrape_interval=SCRAPE, scrape_timeout=SCRAPE,
                   static_configs=[{"targets": [f"127.0.0.1:{proxy_port}"]}])
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={config_file}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}", log


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _tail(log: Path) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-3000:]


@pytest.fixture
def prometheus_binary() -> Iterator[str]:
    if PROMETHEUS is None:
        if IN_CI:
            pytest.fail("prometheus (Debian package prometheus) is required in CI")
        pytest.skip("prometheus not installed")
    yield PROMETHEUS


@pytest.fixture
async def proxy(start_proxy: Any) -> Any:
    """The proxy as compose runs it: /metrics behind METRICS_TOKEN."""
    return await start_proxy(metrics_token=METRICS_TOKEN)


@pytest.fixture
async def prometheus(prometheus_binary: str, proxy: Any, tmp_path: Path) -> AsyncIterator[str]:
    process, url, log = _launch(tmp_path, proxy.port)
    try:
        await wait_answering(f"{url}/-/ready", "prometheus", lambda: process.poll() is not None,
                             seconds=30, details=lambda: f":\n{_tail(log)}")
        yield url
    finally:
        await asyncio.to_thread(_stop, process)


async def _query(http: aiohttp.ClientSession, url: str, promql: str) -> dict[str, Any]:
    async with http.post(f"{url}/api/v1/query", data={"query": promql}) as response:
        body: dict[str, Any] = await response.json()
    return body


async def _last_scrape(http: aiohttp.ClientSession, url: str) -> float:
    """Timestamp of the newest successful scrape of the proxy (0 before the first)."""
    body = await _query(http, url, 'timestamp(up{job="llm-cost-proxy"} == 1)')
    assert body["status"] == "success", body
    return max((float(r["value"][1]) for r in body["data"]["result"]), default=0.0)


async def _scrapes_after(http: aiohttp.ClientSession, url: str, since: float, count: int = 2) -> None:
    """Wait until Prometheus has scraped the proxy `count` times after wall-clock time `since`."""
    deadline = time.monotonic() + 20
    for _ in range(count):
        while (latest := await _last_scrape(http, url)) <= since:
            assert time.monotonic() < deadline, f"no scrape of the proxy after {since}"
            await asyncio.sleep(0.2)
        since = latest


async def _drive(proxy: Any, fake: Any) -> None:
    """One round of traffic: each campaign a different kind of call, an upstream error, a refusal."""
    alpha, beta, gamma = (proxy.client(campaign=c, session=f"{c}-s") for c in CAMPAIGNS)
    await alpha.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    await alpha.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50)
    stream = await beta.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    assert [chunk async for chunk in stream]
    await gamma.embeddings.create(model="text-embedding-3-small", input=["goblin", "dragon"])
    await gamma.responses.create(model="gpt-4.1-mini", input="Describe the tavern.")
    fake.behaviour.status = 500
    with pytest.raises(openai.InternalServerError):
        await alpha.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    fake.behaviour.status = 200
    with pytest.raises(openai.RateLimitError):
        await proxy.client(campaign=CAPPED).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    await proxy.flush()


def _finite(body: dict[str, Any]) -> bool:
    data = body["data"]
    if data["resultType"] in ("scalar", "string"):
        values = [data["result"][1]]
    elif data["resultType"] == "vector":
        values = [r["value"][1] for r in data["result"]]
    else:
        values = [v[1] for r in data["result"] for v in r["values"]]
    return any(math.isfinite(float(v)) for v in values)


def _panel_queries() -> list[tuple[str, str]]:
    queries = []
    for path, dashboard in dashboards():
        for panel, target in targets(dashboard):
            label = f"{path.name} / {panel['title']} / {target['refId']}"
            queries.append((label, runnable_promql(target["expr"], dashboard)))
    assert queries, "no dashboard queries found"
    return queries


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_every_dashboard_query_returns_data_from_a_real_prometheus(proxy, fake, prometheus):
    fake.behaviour.cached_tokens, fake.behaviour.reasoning_tokens = 4, 3
    async with aiohttp.ClientSession() as http:
        # Without the token /metrics is closed, so every scrape below is an authorized one.
        async with http.get(f"{proxy.url}/metrics") as response:
            assert response.status == 401 and response.headers["WWW-Authenticate"] == "Bearer"
        async with http.put(f"{proxy.url}/costs/campaigns/{CAPPED}/budget",
                            json={"warning_usd": "0", "limit_usd": "0"}) as response:
            assert response.status == 200, await response.text()
        # Two rounds with scrapes in between, so rate()/increase() see the counters move.
        await _drive(proxy, fake)
        await _scrapes_after(http, prometheus, time.time())
        await _drive(proxy, fake)
        await _scrapes_after(http, prometheus, time.time())

        queries = _panel_queries()
        failing: dict[str, str] = {}
        # Budget gauges are re-read from the database every 5 s: poll, do not sleep a fixed time.
        deadline = time.monotonic() + 30
        while True:
            failing = {}
            for label, promql in queries:
                body = await _query(http, prometheus, promql)
                if body.get("status") != "success":
                    failing[label] = f"{promql}: {body.get('errorType')}: {body.get('error')}"
                elif not body["data"]["result"]:
                    failing[label] = f"{promql}: empty result"
                elif not _finite(body):
                    failing[label] = f"{promql}: only NaN/Inf: {body['data']['result']}"
            if not failing or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        report = "\n".join(f"{label}: {problem}" for label, problem in failing.items())
        assert not failing, f"panel queries without data:\n{report}"

        # The campaign variable (label_values(llm_budget_spent_usd, campaign)) offers every
        # campaign, the one refused from its first request included.
        async with http.get(f"{prometheus}/api/v1/label/campaign/values",
                            params={"match[]": "llm_budget_spent_usd"}) as response:
            offered = (await response.json())["data"]
        assert {*CAMPAIGNS, CAPPED} <= set(offered)
        # Polled like the panels: on a loaded machine the newest scrape may lag the last refusal.
        deadline = time.monotonic() + 20
        while True:
            blocked = await _query(http, prometheus, f'llm_requests_blocked_total{{campaign="{CAPPED}"}}')
            values = [float(r["value"][1]) for r in blocked["data"]["result"]]
            if values == [2.0] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert values == [2.0]
