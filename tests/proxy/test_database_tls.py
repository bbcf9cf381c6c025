"""Prisma-style URLs as hosted PostgreSQL services hand them out, against a real PostgreSQL with TLS
on (a throwaway cluster with a self-signed certificate): `sslmode=require` serves and records over
TLS, `sslmode=disable` without, `verify-full` checks the certificate, `application_name` and
`pgbouncer=true` work; the server's own view (pg_stat_ssl) says which connections are encrypted."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from conftest import CLI, IN_CI, PgCluster, Proxy, free_port, make_settings, throwaway_cluster
from ledger_check import assert_aggregates_match_ledger, ledger_rows
from prometheus_client import CollectorRegistry

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]
MESSAGES = [{"role": "user", "content": "Roll for initiative."}]


def _certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 (it is its own CA)."""
    crt, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(crt), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return crt, key


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PgCluster, Path]]:
    """A throwaway cluster with `ssl = on`; yields it and the CA file that verifies it."""
    if shutil.which("openssl") is None:
        if IN_CI:
            pytest.fail("openssl is required in CI")
        pytest.skip("openssl not installed")
    with throwaway_cluster() as cluster:
        assert cluster.data_dir is not None
        cluster.stop()
        crt, key = _certificate(cluster.data_dir, "server")
        if os.geteuid() == 0:
            for path in (crt, key):
                shutil.chown(path, "postgres", "postgres")
        key.chmod(0o600)
        with (cluster.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
        cluster.start()
        ca = tmp_path_factory.mktemp("tls") / "root.crt"
        shutil.copy(crt, ca)
        yield cluster, ca


@pytest.fixture
async def tls_database(tls_cluster: tuple[PgCluster, Path]) -> AsyncIterator[str]:
    """A fresh database's URL without query, on the TLS cluster."""
    cluster, _ca = tls_cluster
    name = f"tls_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(cluster.dsn(), ssl=False)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield cluster.dsn(name)
    admin = await asyncpg.connect(cluster.dsn(), ssl=False)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def _encrypted(cluster: PgCluster, application_name: str) -> set[bool]:
    """Whether the server's connections of `application_name` use TLS (pg_stat_ssl)."""
    admin = await asyncpg.connect(cluster.dsn(), ssl=False)
    try:
        rows = await admin.fetch("SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
                                 "WHERE a.application_name = $1", application_name)
    finally:
        await admin.close()
    return {row["ssl"] for row in rows}


async def _serve_and_record(url: str, fake) -> Proxy:
    """A proxy on `url` (migrated at start) answers one call and records it; the caller stops it."""
    proxy = Proxy(make_settings(database_url=url, upstream_base_url=fake.url, proxy_port=free_port()),
                  CollectorRegistry())
    await proxy.start()
    try:
        await proxy.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        await proxy.client(campaign="c2").chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                                  stream=True)
        await proxy.flush()
        rows = await ledger_rows(proxy.engine)
        assert sorted(r.campaign_id for r in rows) == ["c1", "c2"]
        await assert_aggregates_match_ledger(proxy.engine)
    except BaseException:
        await proxy.stop()
        raise
    return proxy


@pytest.mark.parametrize(("query", "encrypted"), [
    ("sslmode=require", True),
    ("sslmode=disable", False),
    ("sslmode=verify-full&sslrootcert={ca}", True),
    ("sslmode=require&pgbouncer=true&schema=llm_costs&connect_timeout=10", True),
])
async def test_a_prisma_style_url_serves_and_records_over_the_tls_it_asks_for(
        tls_cluster, tls_database, fake, query, encrypted):
    cluster, ca = tls_cluster
    app_name = f"proxy-{uuid.uuid4().hex[:8]}"
    url = f"{tls_database}?{query.format(ca=ca)}&application_name={app_name}"
    proxy = await _serve_and_record(url, fake)
    try:
        assert await _encrypted(cluster, app_name) == {encrypted}
    finally:
        await proxy.stop()


async def test_pgbouncer_mode_keeps_no_statement_cache_and_uses_its_own_schema(tls_database, fake):
    proxy = await _serve_and_record(f"{tls_database}?sslmode=require&pgbouncer=true&schema=llm_costs", fake)
    try:
        async with proxy.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            assert driver._stmt_cache.get_max_size() == 0  # asyncpg's cache off
        admin = await asyncpg.connect(tls_database, ssl=False)
        try:
            tables = await admin.fetch("SELECT table_schema FROM information_schema.tables "
                                       "WHERE table_name = 'usage_records'")
        finally:
            await admin.close()
        assert [t["table_schema"] for t in tables] == ["llm_costs"]
    finally:
        await proxy.stop()


def test_verify_full_against_another_ca_refuses_to_start_in_one_line(tls_cluster, tls_database, tmp_path):
    _other_ca, _ = _certificate(tmp_path, "other")
    url = f"{tls_database}?sslmode=verify-full&sslrootcert={_other_ca}"
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    done = subprocess.run([str(CLI), "serve"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**base, "DATABASE_URL": url, "PROXY_PORT": str(free_port())})
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and 1 <= len(lines) <= 3 and "Traceback" not in done.stderr, done.stderr
    assert "DATABASE_URL" in lines[-1] and "TLS" in lines[-1] and "sslrootcert" in lines[-1]
