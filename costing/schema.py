"""Schema migrations: Alembic driven from code, so `serve` can upgrade at start and `/readyz`
can tell whether the database is behind.

Alembic is imported only to migrate: importing any part of it costs a process ~10 MB that it
would keep for good, so the current and head revisions are read without it (the version table
with one query, the head from the revision files).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import fcntl
import os
import re
from collections.abc import AsyncIterator
from importlib import resources
from typing import TYPE_CHECKING

from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from costing.db import create_engine
from costing.settings import DatabaseTarget, Settings

if TYPE_CHECKING:
    from alembic.config import Config

_REVISION_LINE = re.compile(r"^(revision|down_revision)\s*(?::[^=]*)?=\s*(.+?)\s*$", re.M)


def alembic_config(settings: Settings) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(resources.files("migrations")))
    config.attributes["settings"] = settings
    return config


def head_revision(_settings: Settings | None = None) -> str | None:
    """The newest revision: the one no other revision file names as its `down_revision`."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in resources.files("migrations").joinpath("versions").iterdir():
        if not path.name.endswith(".py") or path.name.startswith("__"):
            continue
        fields = {key: ast.literal_eval(value)
                  for key, value in _REVISION_LINE.findall(path.read_text("utf-8"))}
        revisions.add(fields["revision"])
        down = fields.get("down_revision")
        parents.update(down if isinstance(down, tuple) else (down,) if down else ())
    heads = revisions - parents
    if len(heads) > 1:
        raise RuntimeError(f"the migrations have several heads: {sorted(heads)}")
    return next(iter(heads), None)


def _current(connection: Connection) -> str | None:
    if not inspect(connection).has_table("alembic_version"):
        return None
    version = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    return str(version) if version is not None else None


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(_current)


MIGRATION_LOCK_KEY = 0x6C6C6D2D636F7374  # "llm-cost": the advisory lock migrations take on PostgreSQL


async def upgrade(settings: Settings, revision: str = "head") -> None:
    """Apply migrations up to `revision`; runs Alembic's env.py on its own engine, one migrating
    process at a time (see `migrating`)."""
    target = settings.database
    engine = create_engine(target)
    try:
        async with migrating(engine, target) as conn:
            await conn.run_sync(_run_upgrade, settings, revision)
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def migrating(engine: AsyncEngine, target: DatabaseTarget) -> AsyncIterator[AsyncConnection]:
    """The transaction migrations run in, this process's turn taken first.

    Replicas that start together on a new database all migrate at start: they take turns (an
    advisory lock on PostgreSQL, held to the transaction's end; an flock on the SQLite file), so
    the first creates the schema and the others find it at head and do nothing."""
    async with _sqlite_file_locked(target), engine.begin() as conn:
        if not target.is_sqlite:
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            if target.schema:
                await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{target.schema}"'))
        yield conn


@contextlib.asynccontextmanager
async def _sqlite_file_locked(target: DatabaseTarget) -> AsyncIterator[None]:
    """An exclusive flock on the SQLite file (which SQLite's own fcntl locks do not touch) for
    the migration; nothing for PostgreSQL or an in-memory database."""
    path = target.sqlite_path
    if path is None:
        yield
        return
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _run_upgrade(connection: Connection, settings: Settings, revision: str) -> None:
    from alembic import command

    config = alembic_config(settings)
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


async def is_current(settings: Settings, engine: AsyncEngine) -> tuple[bool, str | None, str | None]:
    """(schema is at head, current revision, head revision)."""
    current = await current_revision(engine)
    head = head_revision(settings)
    return current == head, current, head
