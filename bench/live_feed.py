"""What live subscribers cost the proxy: CPU per request of a real `llm-cost-proxy serve` process
(from /proc, user + system) under the same load with 0 and with N subscribers reading
/costs/events, in alternating pairs. Outside CI; run on a quiet machine:

    .venv/bin/python bench/live_feed.py [--pairs 3] [--requests 4000] [--subscribers 10]

The load generator, the fake upstream and the subscribers run in this process; only the proxy's
own CPU is counted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

import aiohttp

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "tests")]
from conftest import spawn_proxy  # noqa: E402
from fakeupstream import FakeUpstream  # noqa: E402

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def load(url: str, requests: int, concurrency: int = 32) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        left = iter(range(requests))

        async def worker() -> None:
            for i in left:
                headers = {"X-Campaign-Id": f"c{i % 5}", "X-Session-Id": f"s{i % 50}",
                           "Authorization": "Bearer sk-bench"}
                async with http.post(f"{url}/v1/chat/completions", json=BODY, headers=headers) as r:
                    await r.read()
                    assert r.status == 200, r.status

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def subscriber(url: str, stop: asyncio.Event, counts: list[int]) -> None:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/costs/events") as response:
        while not stop.is_set():
            try:
                chunk = await asyncio.wait_for(response.content.readany(), 0.5)
            except TimeoutError:
                continue
            counts[0] += chunk.count(b"event: usage")


async def run(pairs: int, requests: int, subscribers: int) -> None:
    async with FakeUpstream() as fake:
        with tempfile.TemporaryDirectory() as tmp:
            process, url = await spawn_proxy(DATABASE_URL=f"sqlite+aiosqlite:///{tmp}/bench.db",
                                             UPSTREAM_BASE_URL=fake.url)
            try:
                await load(url, 500)  # warm-up
                results: dict[int, list[float]] = {0: [], subscribers: []}
                for _ in range(pairs):
                    for subs in (0, subscribers):
                        stop = asyncio.Event()
                        counts = [0]
                        tasks = [asyncio.create_task(subscriber(url, stop, counts)) for _ in range(subs)]
                        await asyncio.sleep(0.5)
                        before = cpu_seconds(process.pid)
                        await load(url, requests)
                        used = cpu_seconds(process.pid) - before
                        await asyncio.sleep(0.3)
                        stop.set()
                        await asyncio.gather(*tasks)
                        per_request = used / requests * 1e6
                        results[subs].append(per_request)
                        print(f"{subs:3d} subscribers: {per_request:6.1f} us CPU per request "
                              f"({counts[0]} usage events received)", flush=True)
                for subs, values in results.items():
                    print(f"{subs:3d} subscribers, median: {sorted(values)[len(values) // 2]:.1f} us")
            finally:
                process.terminate()
                await process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--subscribers", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(run(args.pairs, args.requests, args.subscribers))


if __name__ == "__main__":
    main()
