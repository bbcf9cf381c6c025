"""CPU time per request of the proxy (and, with --floor, of the bench's plain pass-through) under
the same wrk load as `../shared/bench/run.py`, read from /proc: user and system microseconds per
request, per thread.

Why beside callgrind: callgrind counts instructions repeatably, but under it the proxy serves
~50x fewer requests per second, so work that runs per second rather than per request (ledger
flushes every LEDGER_FLUSH_INTERVAL_SECONDS, the budget refresh) weighs ~50x more per request
than at full speed, and waiting on locks, thread hand-offs and the kernel are not in its counts.
This script measures the real thing at full load; it is noisier (a few percent between starts),
so compare changes by alternating runs. Linux only; needs nginx and wrk.

Run from the project root:  .venv/bin/python bench/cpu_per_request.py [--stream] [--floor]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "bench"
UPSTREAM, PORT = "http://127.0.0.1:18080", 18082
TICKS = os.sysconf("SC_CLK_TCK")


def thread_ticks(pid: int) -> dict[str, tuple[int, int]]:
    """(user, system) clock ticks of every thread of a process, by thread id."""
    ticks = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        fields = stat.read_text().rsplit(")", 1)[1].split()
        ticks[stat.parent.name] = (int(fields[11]), int(fields[12]))
    return ticks


def wait_port(port: int) -> None:
    for _ in range(300):
        if subprocess.run(["bash", "-c", f"echo > /dev/tcp/127.0.0.1/{port}"],
                          capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    raise SystemExit(f"nothing listens on port {port}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stream", action="store_true", help="streamed chat completions")
    parser.add_argument("--floor", action="store_true", help="measure the plain pass-through")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="cpu-bench-"))
    upstream = UPSTREAM + ("/stream" if args.stream else "")
    script = (BENCH / "post.lua").read_text()
    if args.stream:
        script = script.replace('"messages"', '"stream":true,"messages"')
    (tmp / "post.lua").write_text(script)
    subprocess.run(["nginx", "-c", str(BENCH / "nginx.conf"), "-p", f"{tmp}/"], check=True)
    log = open(tmp / "server.log", "w")
    if args.floor:
        command = [sys.executable, str(BENCH / "passthrough.py"), str(PORT), upstream]
        env = dict(os.environ)
    else:
        command = [".venv/bin/llm-cost-proxy", "serve"]
        env = dict(os.environ, PROXY_PORT=str(PORT), UPSTREAM_BASE_URL=upstream,
                   COST_WARNING_THRESHOLD_USD="1000000", COST_LIMIT_THRESHOLD_USD="1000000",
                   DATABASE_URL=os.environ.get("BENCH_DATABASE_URL",
                                               f"sqlite+aiosqlite:///{tmp}/bench.db"))
    server = subprocess.Popen(command, env=env, stdout=log, stderr=log)
    try:
        wait_port(PORT)
        wrk = ["wrk", "-t1", "-c32", f"-d{args.seconds}s", "-s", str(tmp / "post.lua"),
               f"http://127.0.0.1:{PORT}/v1/chat/completions"]
        subprocess.run([*wrk[:3], "-d3s", *wrk[4:]], capture_output=True, check=True)  # warm-up
        for _ in range(args.rounds):
            before = thread_ticks(server.pid)
            out = subprocess.run(wrk, capture_output=True, text=True, check=True).stdout
            after = thread_ticks(server.pid)
            requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
            rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

            def per_request(ticks: int, n: int = requests) -> float:
                return ticks / TICKS / n * 1e6

            user = sum(a[0] - before.get(t, (0, 0))[0] for t, a in after.items())
            system = sum(a[1] - before.get(t, (0, 0))[1] for t, a in after.items())
            threads = {t: round(per_request(sum(a) - sum(before.get(t, (0, 0)))), 1)
                       for t, a in after.items() if sum(a) > sum(before.get(t, (0, 0)))}
            print(f"req/s {rate:7.0f}  user {per_request(user):6.1f} us/req  "
                  f"system {per_request(system):5.1f} us/req  threads {threads}")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
        os.kill(int((tmp / "upstream.pid").read_text()), signal.SIGQUIT)


if __name__ == "__main__":
    main()
