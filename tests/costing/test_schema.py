"""The revisions read without Alembic are the ones Alembic itself reports."""

from __future__ import annotations

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from conftest import make_settings

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
