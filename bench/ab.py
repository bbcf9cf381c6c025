"""Two proxy configurations (and the plain pass-through floor) side by side, alternated in short
slices against one nginx upstream: for A/B comparisons on a machine whose speed drifts.

`../shared/bench/run.py` measures one target after another, 10 s each; on this shared 2-core VM
the speed of the whole machine drifts by tens of percent over minutes, which swamps a 5 % effect.
Here every target stays up for the whole run and the load moves between them every few seconds,
so neighbouring slices see the same machine. Per slice it prints the throughput and the CPU the
target's process (all threads) spent per request; at the end the medians and the median of the
paired ratios B/A.

Even neighbouring slices differ by ±20 % on a busy host. `--concurrent` loads A and B at the
same moment instead (one wrk each): both see the same machine, the scheduler shares the CPU
between them, and their CPU per request (and, by that sharing, their throughput) compare
under identical conditions. That is the figure to read for effects of a few percent.

Run from the project root (nginx and wrk installed, as for run.py):
  .venv/bin/python bench/ab.py --b-env OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318
  .venv/bin/python bench/ab.py --a-dir ../before --stream        # code before/after a change
  .venv/bin/python bench/ab.py --concurrent --a-env LEDGER_SPOOL_DIR=   # spool off (A) vs on (B)
  .venv/bin/python bench/ab.py --concurrent --both-ways --b-env OTEL_EXPORTER_OTLP_ENDPOINT=...
Each target gets a fresh SQLite ledger (or BENCH_DATABASE_URL) and its own spool directory.

Run a comparison both ways round (`--both-ways`: the configurations swap seats for a second run,
and the geometric mean of the two is printed): the seat itself can count. On 2026-12-02, in
`--concurrent` mode, the two orders put B's own share of CPU per request at -0.5 % to +2.6 %
(the square root of the product of both B/A figures), as large as some effects measured.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "bench"
UPSTREAM = 18080
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Target:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    non2xx: int = 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def wait_port(port: int, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on port {port} after {timeout:.0f}s")


def wrk(script: Path, port: int, seconds: int, connections: int) -> tuple[float, int, int]:
    return wrk_result(wrk_start(script, port, seconds, connections))


def wrk_start(script: Path, port: int, seconds: int, connections: int) -> subprocess.Popen[str]:
    return subprocess.Popen(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script),
                             f"http://127.0.0.1:{port}/v1/chat/completions"],
                            stdout=subprocess.PIPE, text=True)


def wrk_result(proc: subprocess.Popen[str]) -> tuple[float, int, int]:
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"wrk failed ({proc.returncode}): {out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, total, int(errors.group(1)) if errors else 0


def paired(xs: list[float], ys: list[float]) -> float:
    """Median of y/x over slices run back to back."""
    return statistics.median(y / x for x, y in zip(xs, ys, strict=True))


def parse_env(pairs: list[str]) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a-env", nargs="*", default=[], help="KEY=VALUE for A")
    ap.add_argument("--b-env", nargs="*", default=[], help="KEY=VALUE for B")
    ap.add_argument("--a-dir", default=".", help="checkout whose .venv runs A")
    ap.add_argument("--b-dir", default=".", help="checkout whose .venv runs B")
    ap.add_argument("--slices", type=int, default=8, help="slices per target")
    ap.add_argument("--seconds", type=int, default=5, help="length of one slice")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--stream", action="store_true", help="streamed chat completions")
    ap.add_argument("--no-floor", action="store_true", help="leave the pass-through floor out")
    ap.add_argument("--concurrent", action="store_true",
                    help="load A and B at the same time (same moment, same machine: the CPU per "
                         "request is compared under identical conditions; the floor is left out)")
    ap.add_argument("--subscribers", type=int, default=0,
                    help="live-feed subscribers (curl reading /costs/events) kept on B throughout")
    ap.add_argument("--both-ways", action="store_true",
                    help="run twice, the configurations in swapped seats the second time, and "
                         "print B's figures over A's as the geometric mean of the two runs")
    args = ap.parse_args()
    if args.concurrent:
        args.no_floor = True
    first = measure(args, swapped=False)
    if not args.both_ways:
        return
    print("\n-- the same, A's configuration in seat B and B's in seat A --")
    second = measure(args, swapped=True)
    throughput, cpu = (math.sqrt(x * y) for x, y in zip(first, second, strict=True))
    print(f"\nboth ways: config B / config A throughput {throughput:.3f}, CPU per request {cpu:.3f}")


def measure(args: argparse.Namespace, *, swapped: bool) -> tuple[float, float]:
    """One run; (throughput, CPU per request) of configuration B over configuration A. Swapped:
    A's configuration runs in seat B (port 18084) and B's in seat A, the subscribers on B's."""
    configs = [(args.a_dir, args.a_env), (args.b_dir, args.b_env)]
    if swapped:
        configs.reverse()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ab-"))
    upstream = f"http://127.0.0.1:{UPSTREAM}" + ("/stream" if args.stream else "")
    script = tmp / "post.lua"
    lua = (SHARED / "post.lua").read_text()
    script.write_text(lua.replace('"messages"', '"stream":true,"messages"') if args.stream else lua)
    subprocess.run(["nginx", "-c", str(SHARED / "nginx.conf"), "-p", f"{tmp}/"], check=True)
    log = open(tmp / "servers.log", "wb")
    targets: list[Target] = []
    subscribers: list[subprocess.Popen[bytes]] = []
    try:
        wait_port(UPSTREAM)
        if not args.no_floor:
            targets.append(Target("floor", 18081, subprocess.Popen(
                [sys.executable, str(SHARED / "passthrough.py"), "18081", upstream], stdout=log, stderr=log)))
        for (name, port), (checkout, extra) in zip((("A", 18082), ("B", 18084)), configs, strict=True):
            env = dict(os.environ, PROXY_PORT=str(port), UPSTREAM_BASE_URL=upstream,
                       COST_WARNING_THRESHOLD_USD="1000000", COST_LIMIT_THRESHOLD_USD="1000000",
                       DATABASE_URL=os.environ.get("BENCH_DATABASE_URL", f"sqlite+aiosqlite:///{tmp}/{name}.db"),
                       LEDGER_SPOOL_DIR=str(tmp / f"spool-{name}"))
            env.update(parse_env(extra))
            cmd = [str(Path(checkout).resolve() / ".venv" / "bin" / "llm-cost-proxy"), "serve"]
            proc = subprocess.Popen(cmd, env=env, cwd=checkout, stdout=log, stderr=log)
            targets.append(Target(name, port, proc))
        for t in targets:
            wait_port(t.port)
            wrk(script, t.port, 2, args.connections)  # warm-up: connections, caches, first rows
        feed_out = open(tmp / "feed.out", "wb")
        feed = ["curl", "-sN", f"http://127.0.0.1:{18082 if swapped else 18084}/costs/events"]
        subscribers = [subprocess.Popen(feed, stdout=feed_out) for _ in range(args.subscribers)]
        print(f"{'slice':>5} " + " ".join(f"{t.name + ' req/s':>12} {t.name + ' us/req':>11}"
                                          for t in targets))
        for i in range(args.slices):
            order = targets if i % 2 == 0 else targets[::-1]  # no target always runs first
            groups = [order] if args.concurrent else [[t] for t in order]
            for group in groups:
                before = [cpu_seconds(t.proc.pid) for t in group]
                runs = [wrk_start(script, t.port, args.seconds, args.connections) for t in group]
                for t, run, cpu in zip(group, runs, before, strict=True):
                    rps, total, errors = wrk_result(run)
                    t.rps.append(rps)
                    t.cpu_us.append((cpu_seconds(t.proc.pid) - cpu) * 1e6 / max(total, 1))
                    t.non2xx += errors
            print(f"{i + 1:>5} " + " ".join(f"{t.rps[-1]:12.0f} {t.cpu_us[-1]:11.1f}" for t in targets),
                  flush=True)
        print("median " + " ".join(f"{statistics.median(t.rps):12.0f} {statistics.median(t.cpu_us):11.1f}"
                                  for t in targets))
        print("non-2xx " + " ".join(f"{t.name}={t.non2xx}" for t in targets))
        if subscribers:
            alive = sum(p.poll() is None for p in subscribers)
            events = (tmp / "feed.out").read_bytes().count(b"event: usage")
            print(f"subscribers on config B: {alive} of {len(subscribers)} still connected, "
                  f"{events} usage events received")
            for p in subscribers:
                p.terminate()
        a, b = (t for t in targets if t.name in "AB")
        throughput, cpu = paired(a.rps, b.rps), paired(a.cpu_us, b.cpu_us)
        print(f"B/A throughput, median of paired slices: {throughput:.3f}")
        print(f"B/A CPU per request, median of paired slices: {cpu:.3f}")
        if not args.no_floor:
            floor = targets[0]
            for t in (a, b):
                print(f"{t.name}/floor throughput, median of paired slices: {paired(floor.rps, t.rps):.3f}")
        return (1 / throughput, 1 / cpu) if swapped else (throughput, cpu)
    finally:
        for t in targets:
            t.proc.send_signal(signal.SIGTERM)
        for t in targets:
            try:
                t.proc.wait(20)
            except subprocess.TimeoutExpired:
                t.proc.kill()
        pid = tmp / "upstream.pid"
        if pid.exists():
            os.kill(int(pid.read_text()), signal.SIGQUIT)


if __name__ == "__main__":
    main()
