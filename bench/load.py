"""Soak test (not part of CI): the real `llm-cost-proxy serve` process under a long run of traffic.

Starts the loopback fake OpenAI upstream (tests/fakeupstream.py) in this process and the proxy as
a subprocess (so its memory is its own: VmRSS from /proc/<pid>/status), drives `--requests` chat
completions with `--concurrency` connections, a mix of streamed and non-streamed calls over
several campaigns and sessions, every answer with its own response id (nothing deduplicates).
RSS is sampled at the start, at 50% and at 100% of the requests. At the end it waits for the
ledger to be written and checks: ledger rows == successful requests, aggregates == ledger sums.

    .venv/bin/python bench/load.py                       # 100,000 requests on SQLite
    .venv/bin/python bench/load.py --requests 20000 --stream-ratio 0.5
    .venv/bin/python bench/load.py --database-url postgresql://postgres@127.0.0.1:5432/soak
    .venv/bin/python bench/load.py --tracemalloc          # + the proxy's top allocation growth

Exit status 0 when nothing was lost and the aggregates match, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fakeupstream import FakeUpstream  # noqa: E402
from ledger_check import assert_aggregates_match_ledger  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from costing.db import create_engine  # noqa: E402
from costing.models import UsageRecord  # noqa: E402
from costing.settings import parse_database_url  # noqa: E402

CLI = ROOT / ".venv" / "bin" / "llm-cost-proxy"
PYTHON = ROOT / ".venv" / "bin" / "python"

# Run the proxy under tracemalloc; SIGUSR1 writes a snapshot to $SOAK_SNAPSHOT_DIR/<n>.snap.
TRACED_SERVE = """
import itertools, os, signal, tracemalloc
tracemalloc.start(int(os.environ.get("SOAK_TRACE_FRAMES", "12")))
_n = itertools.count()
def _dump(*_):
    tracemalloc.take_snapshot().dump(os.path.join(os.environ["SOAK_SNAPSHOT_DIR"], f"{next(_n)}.snap"))
signal.signal(signal.SIGUSR1, _dump)
from proxy.cli import main
main(["serve"])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@dataclass
class Run:
    total: int
    ok: int = 0
    ok_streamed: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    rss: dict[str, int] = field(default_factory=dict)
    next_index: int = 0

    def fail(self, kind: str) -> None:
        self.failed[kind] = self.failed.get(kind, 0) + 1

    @property
    def done(self) -> int:
        return self.ok + sum(self.failed.values())


async def wait_ready(url: str, process: asyncio.subprocess.Process) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(600):
            if process.returncode is not None:
                raise SystemExit(f"the proxy exited during start (status {process.returncode})")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{url}/healthz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise SystemExit("the proxy did not start")


async def one_call(http: aiohttp.ClientSession, url: str, i: int, args: argparse.Namespace, run: Run) -> None:
    streamed = (i * 7919) % 1000 < args.stream_ratio * 1000
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [
        {"role": "system", "content": "You are the game master."},
        {"role": "user", "content": f"Turn {i}: what does the goblin king do?"}]}
    if streamed:
        body["stream"] = True
    headers = {"X-Campaign-Id": f"soak-c{i % args.campaigns}",
               "X-Session-Id": f"s{(i // args.campaigns) % args.sessions}",
               "Authorization": "Bearer sk-soak", "Content-Type": "application/json"}
    started = time.perf_counter()
    try:
        async with http.post(f"{url}/v1/chat/completions", data=orjson.dumps(body), headers=headers) as r:
            data = await r.read()
            if r.status != 200:
                run.fail(f"status {r.status}")
                return
            if streamed and not data.rstrip().endswith(b"data: [DONE]"):
                run.fail("stream without [DONE]")
                return
    except (aiohttp.ClientError, TimeoutError) as exc:
        run.fail(type(exc).__name__)
        return
    run.latencies.append(time.perf_counter() - started)
    run.ok += 1
    run.ok_streamed += streamed


async def drive(url: str, pid: int, args: argparse.Namespace, run: Run,
                quiesce: Callable[[str], Awaitable[None]]) -> float:
    """Send the requests; at 50% pause (in-flight calls finish, the ledger catches up) and sample."""
    halfway = args.requests // 2
    connector = aiohttp.TCPConnector(limit=args.concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    started = time.perf_counter()
    paused = 0.0
    last_report = started
    going = asyncio.Event()
    going.set()

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal last_report, paused
        while run.next_index < run.total:
            await going.wait()
            i = run.next_index
            run.next_index += 1
            await one_call(http, url, i, args, run)
            if going.is_set() and "50%" not in run.rss and run.next_index >= halfway:
                going.clear()
                while run.done < run.next_index:  # the others finish their calls  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                pause_started = time.perf_counter()
                await quiesce("50%")
                paused += time.perf_counter() - pause_started
                going.set()
            now = time.perf_counter()
            if now - last_report >= 10:
                last_report = now
                print(f"  {run.done:>7} done, {run.done / (now - started - paused):7.0f} req/s, "
                      f"RSS {rss_kib(pid) / 1024:.1f} MiB", flush=True)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        await asyncio.gather(*(worker(http) for _ in range(args.concurrency)))
    return time.perf_counter() - started - paused


async def ledger_count(engine: Any) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(UsageRecord)) or 0)


async def wait_for_ledger(engine: Any, expected: int, within: float) -> int:
    """Poll the ledger until it holds `expected` rows or stops growing for 3 s (or `within` passes)."""
    deadline = time.monotonic() + within
    last, stable_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = await ledger_count(engine)
        if count >= expected:
            return count
        if count != last:
            last, stable_since = count, time.monotonic()
        elif time.monotonic() - stable_since > 3:
            return count
        await asyncio.sleep(0.2)
    return await ledger_count(engine)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else -1


async def wait_for_file(path: Path) -> None:
    """Until `path` exists and has stopped growing (a snapshot being written by the proxy)."""
    size = -1
    for _ in range(1200):
        await asyncio.sleep(0.25)
        current = _size(path)
        if current > 0 and current == size:
            return
        size = current
    raise SystemExit(f"no tracemalloc snapshot at {path}")


def report_tracemalloc(snapshot_dir: Path) -> None:
    import tracemalloc

    snaps = sorted(snapshot_dir.glob("*.snap"), key=lambda p: int(p.stem))
    if len(snaps) < 2:
        print("tracemalloc: fewer than two snapshots were written")
        return
    # Snapshots: 0 at the start, 1 at 50%, 2 at 100% (each once the ledger had caught up).
    first, last = (tracemalloc.Snapshot.load(str(p)) for p in (snaps[-2], snaps[-1]))
    filters = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen*>")]
    first, last = first.filter_traces(filters), last.filter_traces(filters)
    print("\ntracemalloc: top growth between the 50% and 100% snapshots (by line)")
    for stat in last.compare_to(first, "lineno")[:15]:
        print(f"  {stat.size_diff / 1024:+10.1f} KiB {stat.count_diff:+8d} blocks  {stat.traceback[0]}")
    print("tracemalloc: top growth (full tracebacks of the first three)")
    for stat in last.compare_to(first, "traceback")[:3]:
        print(f"  {stat.size_diff / 1024:+10.1f} KiB {stat.count_diff:+8d} blocks")
        for line in stat.traceback.format()[-12:]:
            print("     ", line)


async def main(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    database_url = args.database_url or f"sqlite+aiosqlite:///{workdir / 'soak.db'}"
    fake = FakeUpstream()
    await fake.start()

    async def forget_requests() -> None:  # the fake records every request; keep its memory flat
        while True:
            fake.requests.clear()
            await asyncio.sleep(1)

    forgetter = asyncio.create_task(forget_requests())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DATABASE_URL": database_url, "UPSTREAM_BASE_URL": fake.url,
           "PROXY_PORT": str(port), "LOG_LEVEL": "WARNING", "COST_WARNING_THRESHOLD_USD": "100000",
           "COST_LIMIT_THRESHOLD_USD": "1000000", "SOAK_SNAPSHOT_DIR": str(workdir)}
    command = [str(PYTHON), "-c", TRACED_SERVE] if args.tracemalloc else [str(CLI), "serve"]
    # cwd: the temp dir, so no .env file of the checkout is read.
    process = await asyncio.create_subprocess_exec(*command, env=env, cwd=workdir)
    engine = None
    try:
        await wait_ready(url, process)
        pid = process.pid
        run = Run(total=args.requests)
        engine = create_engine(parse_database_url(database_url))
        snapshots = 0

        async def quiesce(label: str) -> None:
            """Sample RSS (and a tracemalloc snapshot) once the ledger holds every finished call."""
            nonlocal snapshots
            await wait_for_ledger(engine, run.ok, within=120)
            await asyncio.sleep(0.5)  # the writer's listeners run after the commit
            run.rss[label] = rss_kib(pid)
            if args.tracemalloc:
                os.kill(pid, signal.SIGUSR1)
                await wait_for_file(workdir / f"{snapshots}.snap")
                snapshots += 1

        await quiesce("0%")
        print(f"proxy pid {pid} on {url}, database {database_url}\n"
              f"driving {args.requests} requests, concurrency {args.concurrency}, "
              f"stream ratio {args.stream_ratio}, {args.campaigns} campaigns x {args.sessions} sessions",
              flush=True)
        elapsed = await drive(url, pid, args, run, quiesce)
        flush_started = time.perf_counter()
        rows = await wait_for_ledger(engine, run.ok, within=120)
        flush_wait = time.perf_counter() - flush_started
        run.rss["100% (busy)"] = rss_kib(pid)
        await quiesce("100%")
        try:
            totals = await assert_aggregates_match_ledger(engine)
            aggregates_ok = sum(v[1] for v in totals.values()) == rows
        except AssertionError:
            aggregates_ok = False
        lat = sorted(run.latencies)

        def pct(p: float) -> float:
            return lat[min(int(p * len(lat)), len(lat) - 1)] * 1000 if lat else float("nan")

        half, full = run.rss["50%"], run.rss["100%"]
        growth = (full - half) / half * 100
        print("\n== soak result ==")
        print(f"requests            {run.total} ({run.ok} ok, {run.ok_streamed} of them streamed)")
        print(f"failures            {sum(run.failed.values())} {run.failed or ''}")
        print(f"elapsed             {elapsed:.1f} s")
        print(f"throughput          {run.ok / elapsed:.0f} req/s")
        print(f"latency             p50 {pct(0.5):.1f} ms, p99 {pct(0.99):.1f} ms, max {pct(1.0):.1f} ms")
        print(f"RSS at 0%           {run.rss['0%'] / 1024:.1f} MiB")
        print(f"RSS at 50%          {half / 1024:.1f} MiB")
        print(f"RSS at 100%         {full / 1024:.1f} MiB (right at the end: "
              f"{run.rss['100% (busy)'] / 1024:.1f} MiB)")
        print(f"RSS growth 50->100% {growth:+.1f}%")
        print(f"ledger rows         {rows} (flush wait {flush_wait:.1f} s)")
        print(f"lost records        {run.ok - rows}")
        print(f"aggregates==ledger  {'yes' if aggregates_ok else 'NO'}")
        if args.tracemalloc:
            report_tracemalloc(workdir)
        return 0 if rows == run.ok and aggregates_ok and not run.failed else 1
    finally:
        if engine is not None:
            await engine.dispose()
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 60)
            except TimeoutError:
                process.kill()
        forgetter.cancel()
        await fake.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--stream-ratio", type=float, default=0.3)
    parser.add_argument("--campaigns", type=int, default=20)
    parser.add_argument("--sessions", type=int, default=50, help="sessions per campaign")
    parser.add_argument("--database-url", help="default: a SQLite file in a temp dir")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="run the proxy under tracemalloc and print the top growth 50%%->100%%")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (database, snapshots)")
    args = parser.parse_args(argv)
    if args.requests < 2 or args.concurrency < 1 or not 0 <= args.stream_ratio <= 1:
        parser.error("need --requests >= 2, --concurrency >= 1, 0 <= --stream-ratio <= 1")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    sys.exit(asyncio.run(main(arguments)))
