"""Shared fixtures: real databases (SQLite file and PostgreSQL), a real proxy on a loopback port,
a real fake-OpenAI upstream on loopback, and the real `openai` SDK as the client.

PostgreSQL: the server at 127.0.0.1:5432 (user postgres) when it answers, else a throwaway
cluster started with initdb/pg_ctl in a temp dir. With CI=true a missing PostgreSQL fails the
tests that need it instead of skipping them. Each test gets its own database, built with
`alembic upgrade head` and dropped afterwards.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from fakeupstream import FakeUpstream
from openai import AsyncOpenAI
from prometheus_client import CollectorRegistry

from costing import schema
from costing.settings import Settings
from proxy.app import create_app, server_options
from proxy.state import ENGINE, GATE, LEDGER, METER, METRICS, STORE

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_HOST = os.environ.get("TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("TEST_PG_USER", "postgres")
BACKENDS = os.environ.get("TEST_BACKENDS", "sqlite,postgresql").split(",")
# Each proxy's spool (LEDGER_SPOOL_DIR) in a directory of its own under this one, never in the
# working directory; removed at exit.
SPOOLS = Path(tempfile.mkdtemp(prefix="llmcost-spools-"))
atexit.register(shutil.rmtree, SPOOLS, True)


def new_spool_dir() -> Path:
    return SPOOLS / uuid.uuid4().hex[:12]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    return None


@dataclass
class PgCluster:
    """A PostgreSQL server tests may create databases on; `stop`/`start` only for owned clusters."""

    host: str
    port: int
    user: str
    data_dir: Path | None = None

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def _ctl(self, *args: str) -> None:
        assert self.data_dir is not None, "only a throwaway cluster can be stopped"
        run_as_postgres([_pg_bin("pg_ctl") or "pg_ctl", "-D", str(self.data_dir), "-w", *args])

    def stop(self) -> None:
        self._ctl("-m", "fast", "stop")

    def start(self) -> None:
        self._ctl("-o", f"-p {self.port} -k {self.data_dir} -c listen_addresses=127.0.0.1",
                  "-l", str(self.data_dir / "log"), "start")


def run_as_postgres(cmd: list[str]) -> None:
    """initdb and pg_ctl refuse to run as root: drop to the postgres user when we are root."""
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def start_throwaway_cluster() -> PgCluster:
    initdb = _pg_bin("initdb")
    if initdb is None or _pg_bin("pg_ctl") is None:
        raise RuntimeError("no PostgreSQL server answers and no initdb/pg_ctl binaries are installed")
    data_dir = Path(tempfile.mkdtemp(prefix="pgtest-"))
    if os.geteuid() == 0:
        shutil.chown(data_dir, "postgres", "postgres")
    run_as_postgres([initdb, "-D", str(data_dir), "-U", "postgres", "-A", "trust", "--no-sync"])
    cluster = PgCluster("127.0.0.1", free_port(), "postgres", data_dir)
    cluster.start()
    return cluster


@contextmanager
def throwaway_cluster() -> Iterator[PgCluster]:
    """A cluster started with initdb/pg_ctl in a temp dir; skip (fail in CI) when that cannot be."""
    try:
        cluster = start_throwaway_cluster()
    except Exception as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL is required in CI: {exc}")
        pytest.skip(f"PostgreSQL unavailable: {exc}")
    try:
        yield cluster
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            cluster.stop()  # fails when a test left it stopped: nothing to do then
        shutil.rmtree(cluster.data_dir or "", ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """The machine's PostgreSQL, or a throwaway one; skip (fail in CI) when neither is possible."""
    if _pg_answers(PG_HOST, PG_PORT):
        yield PgCluster(PG_HOST, PG_PORT, PG_USER)
        return
    with throwaway_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def owned_pg_cluster() -> Iterator[PgCluster]:
    """A throwaway cluster of the test module's own (never the shared server), so its tests may
    stop and start it."""
    with throwaway_cluster() as cluster:
        yield cluster


@asynccontextmanager
async def pg_database(cluster: PgCluster) -> AsyncIterator[str]:
    """A fresh, empty database; dropped afterwards."""
    name = f"llmcost_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(cluster.dsn())
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield cluster.dsn(name) + "?schema=public"
    finally:
        admin = await asyncpg.connect(cluster.dsn())
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


CLI = Path(sys.executable).with_name("llm-cost-proxy")


async def spawn_proxy(**env: str) -> tuple[asyncio.subprocess.Process, str]:
    """A real `llm-cost-proxy serve` process on a free loopback port, ready; the caller stops it.

    `env` holds Settings variables by name (DATABASE_URL=..., UPSTREAM_BASE_URL=...).
    """
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        str(CLI), "serve", env={**os.environ, "LOG_LEVEL": "WARNING",
                                "LEDGER_SPOOL_DIR": str(new_spool_dir()), **env,
                                "PROXY_PORT": str(port)})
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url, process)
    except BaseException:
        await kill(process)  # never left running behind a failed test
        raise
    return process, url


async def start_serve(env: dict[str, str], stderr: Any = None) -> tuple[asyncio.subprocess.Process, str]:
    """`serve` started, not waited for (spawn_proxy waits until it answers)."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        str(CLI), "serve", stderr=stderr,
        env={**os.environ, "LOG_LEVEL": "WARNING", **env, "PROXY_PORT": str(port)})
    return process, f"http://127.0.0.1:{port}"


async def serve_ready(env: dict[str, str], stderr: Any = None,
                      seconds: float = 90.0) -> tuple[asyncio.subprocess.Process, str]:
    """`serve` started and answering, after its spool replay (which can take a while on a busy
    machine); killed if it does not get there."""
    process, url = await start_serve(env, stderr)
    try:
        await wait_ready(url, process, seconds)
    except BaseException:
        await kill(process)
        raise
    return process, url


async def kill(process: asyncio.subprocess.Process) -> None:
    """SIGKILL, unless it has exited already."""
    if process.returncode is None:
        process.kill()
        await process.wait()


async def wait_answering(url: str, name: str, exited: Callable[[], bool], *, seconds: float = 15.0,
                         details: Callable[[], str] = lambda: "") -> None:
    """Poll `url` until it answers 200; fail at once if the process behind it has exited."""
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as http:
        while True:
            assert not exited(), f"{name} exited before answering {url}{details()}"
            try:
                async with http.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, f"{name} did not answer {url} in {seconds} s{details()}"
            await asyncio.sleep(0.05)


async def wait_ready(url: str, process: asyncio.subprocess.Process, seconds: float = 15.0) -> None:
    """Wait until a proxy subprocess answers /healthz; fail at once if it exits."""
    await wait_answering(f"{url}/healthz", "proxy", lambda: process.returncode is not None,
                         seconds=seconds)


def make_settings(**values: Any) -> Settings:
    """Settings for tests: nothing from the machine's environment or a .env file."""
    defaults: dict[str, Any] = {
        "database_url": "sqlite+aiosqlite:///:memory:", "upstream_base_url": "http://127.0.0.1:9",
        "openai_api_key": None, "costs_api_token": None, "prices_file": None,
        "ledger_flush_interval_seconds": 0.05, "log_level": "WARNING",
        "ledger_spool_dir": new_spool_dir(),
        # Tracing off unless a test turns it on, whatever OTEL_* the machine has set.
        "otel_exporter_otlp_endpoint": None, "otel_exporter_otlp_traces_endpoint": None,
    }
    defaults.update(values)
    return Settings(_env_file=None, **defaults)  # type: ignore[call-arg]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def database_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """An empty database of the parametrized backend, migrated with `alembic upgrade head`."""
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'costs.db'}"
        await schema.upgrade(make_settings(database_url=url))
        yield url
        return
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    async with pg_database(cluster) as url:
        await schema.upgrade(make_settings(database_url=url))
        yield url


@pytest.fixture
async def empty_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A database with no tables yet: the migration tests upgrade it step by step."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
        return
    async with pg_database(request.getfixturevalue("pg_cluster")) as url:
        yield url


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as upstream:
        yield upstream


class Proxy:
    """A real proxy app on a loopback port."""

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.app = create_app(settings, registry=registry)
        self.runner = web.AppRunner(self.app, handle_signals=False,
                                    **{**server_options(settings), "shutdown_timeout": 5})
        self.port = settings.proxy_port
        self.url = f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        await self.runner.cleanup()

    @property
    def store(self) -> Any:
        return self.app[STORE]

    @property
    def engine(self) -> Any:
        return self.app[ENGINE]

    @property
    def ledger(self) -> Any:
        return self.app[LEDGER]

    @property
    def gate(self) -> Any:
        return self.app[GATE]

    @property
    def metrics(self) -> Any:
        return self.app[METRICS]

    async def flush(self, within: float = 10.0) -> None:
        """Wait until every record handed to the ledger is committed."""
        deadline = time.monotonic() + within
        background = self.app[METER].background  # creators of background responses stored too
        while len(self.ledger) or self.gate.in_flight_requests or background.unsaved or background.saving:
            if time.monotonic() > deadline:
                raise AssertionError(f"ledger still holds {len(self.ledger)} records")
            await asyncio.sleep(0.02)

    def client(self, campaign: str | None = "c1", session: str | None = "s1", **kwargs: Any) -> AsyncOpenAI:
        headers = {}
        if campaign is not None:
            headers["X-Campaign-Id"] = campaign
        if session is not None:
            headers["X-Session-Id"] = session
        kwargs.setdefault("max_retries", 0)
        return AsyncOpenAI(base_url=f"{self.url}/v1", api_key="sk-test-key", default_headers=headers,
                           **kwargs)


ProxyFactory = Callable[..., Any]


@pytest.fixture
async def start_proxy(database_url: str, fake: FakeUpstream) -> AsyncIterator[ProxyFactory]:
    """Start proxies (several may share the database); all stopped at teardown."""
    started: list[Proxy] = []

    async def factory(**values: Any) -> Proxy:
        values.setdefault("database_url", database_url)
        values.setdefault("upstream_base_url", fake.url)
        values.setdefault("proxy_port", free_port())
        proxy = Proxy(make_settings(**values), CollectorRegistry())
        await proxy.start()
        started.append(proxy)
        return proxy

    yield factory
    for proxy in reversed(started):
        await proxy.stop()


@pytest.fixture
async def proxy(start_proxy: ProxyFactory) -> Proxy:
    result: Proxy = await start_proxy()
    return result
