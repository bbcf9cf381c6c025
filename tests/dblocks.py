"""Locks held on a test database from outside the proxy: a slow database, made on purpose."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator

import asyncpg

from costing.settings import parse_database_url


@contextlib.asynccontextmanager
async def database_locked(database_url: str, backend: str,
                          campaign: str) -> AsyncIterator[asyncpg.Connection | None]:
    """Hold a lock that the proxy's next batch, and its next budget lease, must wait for: SQLite's
    write lock, or PostgreSQL's row lock on the campaign's aggregate (yielding the connection
    holding it, to watch the waiters)."""
    if backend == "sqlite":
        path = parse_database_url(database_url).url.split("///", 1)[1]
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")  # the write lock: the batch waits on its first insert
        try:
            yield None
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    dsn = database_url.split("?", 1)[0]
    pg = await asyncpg.connect(dsn)
    transaction = pg.transaction()
    await transaction.start()
    # The batch inserts its rows, then waits here to add them to the campaign's aggregate.
    await pg.execute("SELECT 1 FROM campaign_cost_aggregates WHERE campaign_id = $1 FOR UPDATE",
                     campaign)
    try:
        yield pg
    finally:
        await transaction.rollback()
        await pg.close()
