"""Cancellation rules for database work (`costing.tasks`): a call is never cut off halfway, and
background loops stop between iterations."""

from __future__ import annotations

import asyncio

import pytest

from costing.tasks import finish, pause, uninterrupted


async def test_cancelling_the_caller_does_not_cancel_the_call():
    finished = asyncio.Event()

    async def call() -> str:
        await asyncio.sleep(0.05)
        finished.set()
        return "done"

    waiter = asyncio.ensure_future(uninterrupted(call()))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.wait_for(finished.wait(), 1)  # the call ran to its end regardless


async def test_a_timeout_stops_the_waiting_and_the_call_still_completes():
    finished = asyncio.Event()

    async def call() -> None:
        await asyncio.sleep(0.05)
        finished.set()

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await uninterrupted(call())
    await asyncio.wait_for(finished.wait(), 1)


async def test_the_result_and_errors_of_an_awaited_call_come_through():
    async def ok() -> int:
        return 7

    async def broken() -> None:
        raise ValueError("refused")

    assert await uninterrupted(ok()) == 7
    with pytest.raises(ValueError, match="refused"):
        await uninterrupted(broken())


async def test_pause_returns_at_once_when_stopped_and_after_the_interval_otherwise():
    stop = asyncio.Event()
    assert await pause(stop, 0.01) is False
    stop.set()
    assert await asyncio.wait_for(pause(stop, 60), 1) is True


async def test_finish_lets_a_loop_end_its_iteration_and_cancels_only_a_stuck_one():
    stop = asyncio.Event()
    iterations: list[str] = []

    async def loop() -> None:
        while not await pause(stop, 0.01):
            iterations.append("started")
            await asyncio.sleep(0.05)  # an iteration in progress when stop is set
            iterations.append("ended")

    async def stuck() -> None:
        await asyncio.sleep(3600)

    polite, hung = asyncio.create_task(loop()), asyncio.create_task(stuck())
    await asyncio.sleep(0.02)
    stop.set()
    await finish([polite, hung], grace_seconds=0.5)
    assert polite.done() and not polite.cancelled()
    assert iterations[-1] == "ended"
    assert hung.cancelled()
