"""Database engine construction for PostgreSQL (asyncpg) and the embedded SQLite default."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from costing.settings import DatabaseTarget


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
    connect_args: dict[str, Any] = {}
    if target.schema:
        connect_args["server_settings"] = {"search_path": target.schema}
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 10)
    kwargs.setdefault("pool_pre_ping", True)
    return create_async_engine(target.url, connect_args=connect_args, **kwargs)
