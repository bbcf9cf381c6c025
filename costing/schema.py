"""Schema migrations: Alembic driven from code, so `serve` can upgrade at start and `/readyz`
can tell whether the database is behind.
"""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

from costing.db import create_engine
from costing.settings import Settings


def alembic_config(settings: Settings) -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("migrations")))
    config.attributes["settings"] = settings
    return config


def head_revision(settings: Settings) -> str | None:
    return ScriptDirectory.from_config(alembic_config(settings)).get_current_head()


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


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
    config = alembic_config(settings)
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


async def is_current(settings: Settings, engine: AsyncEngine) -> tuple[bool, str | None, str | None]:
    """(schema is at head, current revision, head revision)."""
    current = await current_revision(engine)
    head = head_revision(settings)
    return current == head, current, head
