"""The revisions read without Alembic are the ones Alembic itself reports."""

from __future__ import annotations

import asyncio
import os

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from conftest import CLI, make_settings, pg_database

from costing import schema
from costing.db import create_engine


def test_the_head_read_from_the_files_is_alembics_head():
    settings = make_settings()
    assert schema.head_revision(settings) == \
        ScriptDirectory.from_config(schema.alembic_config(settings)).get_current_head()


async def test_the_current_revision_is_alembics(database_url):
    engine = create_engine(make_settings(database_url=database_url).database)
    try:
        async with engine.connect() as conn:
            expected = await conn.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_revision())
        assert expected is not None
        assert await schema.current_revision(engine) == expected
    finally:
        await engine.dispose()


async def test_an_empty_database_has_no_revision(tmp_path):
    engine = create_engine(make_settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'e.db'}").database)
    try:
        assert await schema.current_revision(engine) is None
    finally:
        await engine.dispose()


async def test_replicas_starting_together_on_an_empty_database_migrate_it_once(backend, tmp_path, request):
    """Replicas (or a restarted deployment) starting at the same moment against a new database
    each run the migrations at start: none may fail on tables another is creating."""
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'new.db'}"
        await _upgrade_together(url)
        return
    async with pg_database(request.getfixturevalue("pg_cluster")) as url:
        await _upgrade_together(url)


async def _upgrade_together(url: str, replicas: int = 4) -> None:
    """`llm-cost-proxy migrate` in `replicas` processes at once (what `serve` runs at start)."""
    env = {**os.environ, "DATABASE_URL": url, "LOG_LEVEL": "WARNING"}
    processes = [await asyncio.create_subprocess_exec(str(CLI), "migrate", env=env,
                                                      stderr=asyncio.subprocess.PIPE)
                 for _ in range(replicas)]
    outcomes = []
    for process in processes:
        _, errors = await process.communicate()
        outcomes.append((process.returncode, errors.decode()))
    assert [code for code, _ in outcomes] == [0] * replicas, outcomes
    settings = make_settings(database_url=url)
    engine = create_engine(settings.database)
    try:
        assert await schema.current_revision(engine) == schema.head_revision(settings)
    finally:
        await engine.dispose()
