"""Database engine construction for PostgreSQL (asyncpg) and the embedded SQLite default, and the
bounded wait for a database that is still starting."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
import uuid
from typing import Any

from sqlalchemy import event, make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from costing.errors import DatabaseUnavailable
from costing.settings import DatabaseTarget

log = logging.getLogger(__name__)


def create_engine(target: DatabaseTarget, **kwargs: Any) -> AsyncEngine:
    """An async engine; SQLite gets WAL and a busy timeout so the writer and readers coexist."""
    if target.is_sqlite:
        engine = create_async_engine(target.url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    if target.pool_size is not None:  # Prisma's connection_limit: the most connections, in all
        kwargs.setdefault("pool_size", target.pool_size)
        kwargs.setdefault("max_overflow", 0)
    if target.pool_timeout is not None:
        kwargs.setdefault("pool_timeout", target.pool_timeout)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 10)
    kwargs.setdefault("pool_pre_ping", True)
    return create_async_engine(target.url, connect_args=connect_args(target), **kwargs)


def connect_args(target: DatabaseTarget) -> dict[str, Any]:
    """asyncpg's connect() arguments for the libpq/Prisma parameters of the URL."""
    args: dict[str, Any] = {}
    server_settings = {}
    if target.schema:
        server_settings["search_path"] = target.schema
    if target.application_name:
        server_settings["application_name"] = target.application_name
    if server_settings:
        args["server_settings"] = server_settings
    tls = ssl_argument(target)
    if tls is not None:
        args["ssl"] = tls
    if target.connect_timeout is not None:
        args["timeout"] = target.connect_timeout
    if target.statement_cache_size is not None:
        args["statement_cache_size"] = target.statement_cache_size
    if target.pgbouncer:
        # PgBouncer in transaction mode: a server connection is shared between clients, so no
        # statement may outlive its transaction or collide with another client's by name.
        args["statement_cache_size"] = 0
        args["prepared_statement_name_func"] = _statement_name
    return args


def _statement_name() -> str:
    return f"__asyncpg_{uuid.uuid4().hex}__"


def ssl_argument(target: DatabaseTarget) -> ssl.SSLContext | str | bool | None:
    """`sslmode` as libpq means it: disable, allow and prefer as asyncpg does them; require
    encrypts without checking the certificate (checks it against `sslrootcert` when one is given,
    as libpq does); verify-ca checks the chain, verify-full the host name too."""
    mode = target.sslmode
    if mode is None and target.sslrootcert:
        mode = "verify-ca"  # libpq's default `prefer` with a root certificate verifies it
    if mode is None:
        return None
    if mode == "disable":
        return False
    if mode in ("allow", "prefer") and not target.sslcert:
        return mode
    if mode in ("allow", "prefer", "require") and target.sslrootcert:
        mode = "verify-ca"
    try:
        if mode in ("verify-ca", "verify-full"):
            cafile = None if target.sslrootcert in (None, "system") else target.sslrootcert
            context = ssl.create_default_context(cafile=cafile)
            context.check_hostname = mode == "verify-full"
        else:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if target.sslcert:
            context.load_cert_chain(target.sslcert, keyfile=target.sslkey,
                                    password=target.sslpassword or None)
    except (OSError, ssl.SSLError) as exc:
        raise DatabaseUnavailable(f"DATABASE_URL: cannot load the TLS files (sslrootcert, sslcert, "
                                  f"sslkey): {exc.strerror or exc}") from exc
    return context


# A server that is starting, restarting or not listening yet: worth waiting for. Anything else
# (a wrong password, an unknown database, a TLS failure) will not heal by waiting.
_TRANSIENT_SQLSTATES = frozenset({"57P03", "08006", "08001", "57P01"})


def causes(exc: BaseException, limit: int = 10) -> list[BaseException]:
    """`exc` and what it wraps, outermost first: SQLAlchemy's `orig`, else the cause or context
    (at most `limit`, each once)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < limit:
        seen.append(current)
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__
    return seen


def is_transient(exc: BaseException) -> bool:
    return any(isinstance(e, (ConnectionRefusedError, ConnectionResetError, TimeoutError))
               or getattr(e, "sqlstate", None) in _TRANSIENT_SQLSTATES for e in causes(exc))


def unresolved_host(exc: BaseException) -> socket.gaierror | None:
    """The name-lookup failure behind `exc`, if that is what it is (the driver raises it raw)."""
    return next((e for e in causes(exc) if isinstance(e, socket.gaierror)), None)


def database_host(target: DatabaseTarget) -> str:
    """The server host named by DATABASE_URL (its `host=` parameter first, as libpq reads it)."""
    url = make_url(target.url)
    host = url.query.get("host") or url.host or "localhost"
    return host if isinstance(host, str) else ",".join(host)


def unresolved_line(target: DatabaseTarget, seconds: float, lookup: socket.gaierror) -> str:
    """The start-up line for a database host that never resolved: names DATABASE_URL and the
    host, not PROXY_HOST (the lookup error itself does not say whose host it was)."""
    return (f"DATABASE_URL: cannot resolve the database host {database_host(target)!r} after "
            f"{seconds:g} s (DATABASE_CONNECT_TIMEOUT_SECONDS): {lookup.strerror or lookup}")


async def wait_until_reachable(target: DatabaseTarget, seconds: float) -> None:
    """Return once the database answers; wait up to `seconds` for one that is starting (said in
    the log), raise DatabaseUnavailable with one line for a host that never resolved.

    A host that does not resolve is waited for like a refused connection: under docker compose
    the database service's name often resolves only once its container is up, so failing at
    once would make the proxy's start depend on the order containers happen to start in. A
    mistyped host costs the wait, said in the log the moment it begins."""
    path = target.sqlite_path
    if path is not None:
        if not path.parent.is_dir():
            raise DatabaseUnavailable(f"DATABASE_URL: the directory {path.parent} of the SQLite "
                                      "file does not exist; create it or point DATABASE_URL elsewhere")
        return
    if target.is_sqlite:
        return
    engine = create_engine(target, pool_size=1, max_overflow=0, pool_pre_ping=False)
    deadline = time.monotonic() + seconds
    said = False
    try:
        while True:
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 1.0)):
                    async with engine.connect() as conn:
                        await conn.execute(text("SELECT 1"))
                return
            except Exception as exc:
                left = deadline - time.monotonic()
                lookup = unresolved_host(exc)
                if lookup is not None and left <= 0:
                    raise DatabaseUnavailable(unresolved_line(target, seconds, lookup)) from exc
                if not (is_transient(exc) or lookup is not None) or left <= 0:
                    raise
                if not said:
                    log.warning("database not reachable yet (%s); waiting up to %.0f s "
                                "(DATABASE_CONNECT_TIMEOUT_SECONDS)", describe_cause(exc), seconds)
                    said = True
                await asyncio.sleep(min(1.0, left))
    finally:
        await engine.dispose()


def describe_cause(exc: BaseException) -> str:
    """The innermost driver error of `exc`, as one short line."""
    seen: BaseException = exc
    for _ in range(10):
        inner = getattr(seen, "orig", None) or seen.__cause__
        if inner is None or inner is seen:
            break
        seen = inner
    message = str(seen).strip().splitlines()[0] if str(seen).strip() else ""
    return f"{type(seen).__name__}: {message}" if message else type(seen).__name__
