"""Cancellation rules for database work: a statement is never cut off halfway.

Cancelling a task while its driver call runs can leave the connection unusable: aiosqlite under
SQLAlchemy 2.1 keeps the connection's execute lock, so every later statement on it (the final
ledger flush at shutdown, say) waits forever. So database calls that a timeout or a departing
client could cancel run to completion in their own task, and background loops stop between
iterations, never inside one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


async def uninterrupted(call: Awaitable[T]) -> T:
    """Await `call`; cancelling the caller stops the waiting, not the call."""
    task = asyncio.ensure_future(call)
    task.add_done_callback(_retrieve)
    return await asyncio.shield(task)


def _retrieve(task: asyncio.Future[Any]) -> None:
    # An abandoned call's error has no one to go to; mark it seen instead of logging it at exit.
    if not task.cancelled():
        task.exception()


async def pause(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds` or until `stop` is set; True when it is set (the loop should end)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def finish(tasks: Iterable[asyncio.Future[Any]], grace_seconds: float) -> None:
    """Wait for loops told to stop; cancel only those still busy after `grace_seconds`."""
    pending = {task for task in tasks if not task.done()}
    if pending:
        _done, pending = await asyncio.wait(pending, timeout=grace_seconds)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError):
            await task
