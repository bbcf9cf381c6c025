"""A start that fails says why in one line: `llm-cost-proxy serve` (and `migrate`) as a real
subprocess, exit status non-zero, at most 3 lines of stderr, no traceback, the variable or the
cause named. LOG_LEVEL=DEBUG adds the traceback."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CLI, free_port, spawn_proxy

pytestmark = pytest.mark.timeout(90)


def run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The command in an empty directory (no `.env`), with only PATH/HOME and `env` set."""
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    return subprocess.run([str(CLI), *(args or ("serve",))], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={**base, "PROXY_PORT": str(free_port()), **env})


def assert_one_line_failure(done: subprocess.CompletedProcess[str], *named: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0, done.stderr
    assert 1 <= len(lines) <= 3, done.stderr
    assert "Traceback" not in done.stderr
    last = lines[-1]
    for name in named:
        assert name in last, done.stderr
    return last


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'costs.db'}"


def test_an_unreachable_database_is_waited_for_a_bounded_time_then_one_line(tmp_path):
    started = time.monotonic()
    done = run(tmp_path, DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/costs",
               DATABASE_CONNECT_TIMEOUT_SECONDS="2")
    elapsed = time.monotonic() - started
    last = assert_one_line_failure(done, "DATABASE_URL", "unreachable", "DATABASE_CONNECT_TIMEOUT_SECONDS")
    assert "refused" in last.lower()
    assert "waiting up to 2 s" in done.stderr  # the wait is said in the log
    assert 2 <= elapsed < 30


def test_migrate_with_the_database_down_is_one_line(tmp_path):
    done = run(tmp_path, "migrate", DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/costs",
               DATABASE_CONNECT_TIMEOUT_SECONDS="0")
    assert_one_line_failure(done, "DATABASE_URL", "unreachable")


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_an_unresolvable_database_host_is_waited_for_then_one_line_naming_database_url(tmp_path, command):
    """A compose service name resolves only once its container is up, so the lookup is retried
    like a refused connection; then the line blames DATABASE_URL's host, never PROXY_HOST."""
    started = time.monotonic()
    done = run(tmp_path, command, DATABASE_URL="postgresql://postgres@db-host.invalid:5432/costs",
               DATABASE_CONNECT_TIMEOUT_SECONDS="2", PROXY_HOST="127.0.0.1")
    elapsed = time.monotonic() - started
    last = assert_one_line_failure(done, "DATABASE_URL", "cannot resolve", "'db-host.invalid'",
                                   "DATABASE_CONNECT_TIMEOUT_SECONDS")
    assert "PROXY_HOST" not in done.stderr
    assert done.returncode == 1
    assert "waiting up to 2 s" in done.stderr
    assert 2 <= elapsed < 30, last


@pytest.mark.postgres
def test_an_unknown_database_is_one_line(tmp_path, pg_cluster):
    done = run(tmp_path, DATABASE_URL=pg_cluster.dsn("no_such_database_here"))
    assert_one_line_failure(done, "DATABASE_URL", "no_such_database_here", "does not exist")


@pytest.mark.postgres
def test_an_unknown_role_is_one_line(tmp_path, pg_cluster):
    url = f"postgresql://no_such_role@{pg_cluster.host}:{pg_cluster.port}/postgres"
    done = run(tmp_path, DATABASE_URL=url)
    assert_one_line_failure(done, "DATABASE_URL", "no_such_role")


def test_a_sqlite_file_in_a_missing_directory_is_one_line(tmp_path):
    done = run(tmp_path, DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'costs.db'}")
    assert_one_line_failure(done, "DATABASE_URL", str(tmp_path / "missing"), "does not exist")


def test_a_port_in_use_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run(tmp_path, DATABASE_URL=sqlite_url(tmp_path), PROXY_PORT=str(port))
    assert_one_line_failure(done, "PROXY_PORT", str(port), "in use")


def test_a_bad_log_level_is_one_line(tmp_path):
    done = run(tmp_path, LOG_LEVEL="LOUD")
    assert_one_line_failure(done, "LOG_LEVEL", "DEBUG")


def test_an_unresolvable_proxy_host_is_one_line(tmp_path, database_url):
    done = run(tmp_path, DATABASE_URL=database_url, PROXY_HOST="no-such-host.invalid")
    assert_one_line_failure(done, "PROXY_HOST", "no-such-host.invalid")


def test_a_missing_prices_file_is_one_line(tmp_path):
    done = run(tmp_path, DATABASE_URL=sqlite_url(tmp_path), PRICES_FILE=str(tmp_path / "nope.json"))
    assert_one_line_failure(done, "PRICES_FILE", "nope.json")
    assert done.stderr.count("PRICES_FILE") == 1


def test_a_broken_prices_file_is_one_line(tmp_path):
    (tmp_path / "prices.json").write_text('{"gpt-x": {"input": ', encoding="utf-8")
    done = run(tmp_path, DATABASE_URL=sqlite_url(tmp_path), PRICES_FILE=str(tmp_path / "prices.json"))
    assert_one_line_failure(done, "PRICES_FILE", "prices.json")


def test_a_schema_behind_with_auto_migrate_off_is_one_line_naming_the_command(tmp_path):
    done = run(tmp_path, DATABASE_URL=sqlite_url(tmp_path), AUTO_MIGRATE="false")
    assert_one_line_failure(done, "llm-cost-proxy migrate", "AUTO_MIGRATE")


def test_an_unknown_database_url_parameter_is_one_line(tmp_path):
    done = run(tmp_path, DATABASE_URL="postgresql://u@db/costs?sslmod=require")
    assert_one_line_failure(done, "DATABASE_URL", "sslmod")


def test_an_open_proxy_is_refused_naming_proxy_api_keys(tmp_path):
    done = run(tmp_path, DATABASE_URL=sqlite_url(tmp_path), PROXY_HOST="0.0.0.0",
               OPENAI_API_KEY="sk-server-secret")
    last = assert_one_line_failure(done, "PROXY_API_KEYS", "ALLOW_OPEN_PROXY", "0.0.0.0")
    assert "sk-server-secret" not in done.stderr + done.stdout + last


async def test_an_exposed_proxy_starts_with_keys_or_when_allowed(tmp_path):
    """The refusal's counterpart: keys set, or the operator's explicit choice, and it serves."""
    for extra in ({"PROXY_API_KEYS": "pk-1"}, {"ALLOW_OPEN_PROXY": "true"}):
        process, _url = await spawn_proxy(DATABASE_URL=sqlite_url(tmp_path), PROXY_HOST="0.0.0.0",
                                          OPENAI_API_KEY="sk-server-secret", **extra)
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 30) == 0


async def test_an_upstream_url_ending_in_v1_is_corrected(tmp_path, fake):
    process, url = await spawn_proxy(DATABASE_URL=sqlite_url(tmp_path), UPSTREAM_BASE_URL=f"{fake.url}/v1")
    try:
        import aiohttp

        async with aiohttp.ClientSession() as http, http.get(f"{url}/v1/models") as response:
            assert response.status == 200
        assert fake.requests[-1].path == "/v1/models"
    finally:
        process.terminate()
        await process.wait()


def test_log_level_debug_adds_the_traceback(tmp_path):
    done = run(tmp_path, DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'costs.db'}",
               LOG_LEVEL="DEBUG")
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "DATABASE_URL" in done.stderr.strip().splitlines()[-1]
