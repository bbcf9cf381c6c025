"""Schema migrations: Alembic driven from code, so `serve` can upgrade at start and `/readyz`
can tell whether the database is behind.

Alembic is imported only to migrate: importing any part of it costs a process ~10 MB that it
would keep for good, so the current and head revisions are read without it (the version table
with one query, the head from the revision files).
"""

from __future__ import annotations

import ast
import re
from importlib import resources
from typing import TYPE_CHECKING

from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from costing.db import create_engine
from costing.settings import Settings

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


async def upgrade(settings: Settings, revision: str = "head") -> None:
    """Apply migrations up to `revision`; runs Alembic's env.py on its own engine."""
    target = settings.database
    engine = create_engine(target)
    try:
        async with engine.begin() as conn:
            if target.schema and not target.is_sqlite:
                await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{target.schema}"'))
            await conn.run_sync(_run_upgrade, settings, revision)
    finally:
        await engine.dispose()


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
