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
import socket
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


def ticks_spent(before: dict[str, tuple[int, int]],
                after: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """(user, system) ticks each thread used between two readings (threads may come and go)."""
    spent = {}
    for thread, (user, system) in after.items():
        user_before, system_before = before.get(thread, (0, 0))
        spent[thread] = (user - user_before, system - system_before)
    return spent


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise SystemExit(f"nothing listens on port {port} after {timeout}s")


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
    if args.floor:
        command = [sys.executable, str(BENCH / "passthrough.py"), str(PORT), upstream]
        env = dict(os.environ)
    else:
        command = [".venv/bin/llm-cost-proxy", "serve"]
        env = dict(os.environ, PROXY_PORT=str(PORT), UPSTREAM_BASE_URL=upstream,
                   COST_WARNING_THRESHOLD_USD="1000000", COST_LIMIT_THRESHOLD_USD="1000000",
                   DATABASE_URL=os.environ.get("BENCH_DATABASE_URL",
                                               f"sqlite+aiosqlite:///{tmp}/bench.db"))

    def wrk(seconds: int) -> str:
        return subprocess.run(
            ["wrk", "-t1", "-c32", f"-d{seconds}s", "-s", str(tmp / "post.lua"),
             f"http://127.0.0.1:{PORT}/v1/chat/completions"],
            capture_output=True, text=True, check=True).stdout

    subprocess.run(["nginx", "-c", str(BENCH / "nginx.conf"), "-p", f"{tmp}/"], check=True)
    try:
        with open(tmp / "server.log", "w") as log:
            server = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        try:
            wait_port(PORT)
            wrk(3)  # warm-up
            for _ in range(args.rounds):
                before = thread_ticks(server.pid)
                out = wrk(args.seconds)
                spent = ticks_spent(before, thread_ticks(server.pid))
                requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
                rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
                us_per_request = 1e6 / TICKS / requests
                user = sum(u for u, _ in spent.values()) * us_per_request
                system = sum(s for _, s in spent.values()) * us_per_request
                threads = {t: round((u + s) * us_per_request, 1) for t, (u, s) in spent.items() if u + s}
                print(f"req/s {rate:7.0f}  user {user:6.1f} us/req  "
                      f"system {system:5.1f} us/req  threads {threads}")
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
    finally:
        os.kill(int((tmp / "upstream.pid").read_text()), signal.SIGQUIT)


if __name__ == "__main__":
    main()
