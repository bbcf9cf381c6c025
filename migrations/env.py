"""Alembic environment: the URL comes from the application's Settings, never from alembic.ini.

`llm-cost-proxy migrate` (and `serve` at start) pass an open connection in
`config.attributes["connection"]`; the plain `alembic` CLI builds Settings from the environment.
"""

import asyncio

from alembic import context
from sqlalchemy import Connection

from costing.db import create_engine
from costing.models import Base
from costing.schema import migrating
from costing.settings import Settings

config = context.config
target_metadata = Base.metadata


def run_with(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_standalone(settings: Settings) -> None:
    target = settings.database
    engine = create_engine(target)
    async with migrating(engine, target) as conn:  # one migrating process at a time
        await conn.run_sync(run_with)
    await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run `llm-cost-proxy migrate`")

connection = config.attributes.get("connection")
if connection is not None:
    run_with(connection)
else:
    asyncio.run(run_standalone(config.attributes.get("settings") or Settings()))
