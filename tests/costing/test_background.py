"""Background responses hold their creation's reservation until their final state is read, or
until the hold expires; nothing is released twice."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime

from costing.background import BackgroundResponses
from costing.gate import Admission


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _tracked(**kwargs: object) -> tuple[BackgroundResponses, list[Admission], Clock]:
    released: list[Admission] = []
    clock = Clock()
    return BackgroundResponses(released.append, clock=clock, **kwargs), released, clock  # type: ignore[arg-type]


def test_reading_the_final_state_releases_the_hold_once_and_names_the_creator():
    background, released, _ = _tracked()
    admission = Admission("c1", 48_000_000)
    background.remember("resp_1", "c1", "s1", admission)
    assert released == []
    assert background.owner("resp_1") == ("c1", "s1")
    assert background.owner("resp_1") is None  # popped: the database is asked next
    assert released == [admission]


def test_holds_expire_oldest_first_after_hold_seconds():
    background, released, clock = _tracked(hold_seconds=10.0)
    first, second = Admission("c1", 1), Admission("c1", 2)
    background.remember("resp_1", "c1", "s1", first)
    clock.now = 5.0
    background.remember("resp_2", "c1", "s1", second)
    clock.now = 10.0
    background.expire()
    assert released == [first]
    clock.now = 15.0
    background.expire()
    assert released == [first, second] and not background.holds
    assert background.owner("resp_1") == ("c1", "s1")  # the creator is still known
    assert released == [first, second]


def test_the_bound_releases_the_oldest_hold_and_an_id_seen_twice_holds_once():
    background, released, _ = _tracked(max_kept=2)
    a, b, c, again = (Admission("c1", n) for n in (1, 2, 3, 4))
    background.remember("resp_a", "c1", "s1", a)
    background.remember("resp_a", "c1", "s1", again)
    assert released == [a]
    background.remember("resp_b", "c1", "s1", b)
    background.remember("resp_c", "c1", "s1", c)
    assert released == [a, again] and list(background.holds) == ["resp_b", "resp_c"]


class FakeOwners:
    """The store's side of `keep_saved`: what was written and pruned; fails when told to."""

    def __init__(self) -> None:
        self.saved: list[tuple[str, str, str, int]] = []
        self.pruned = 0
        self.failing = False

    async def save_background_owners(self, owners: Sequence[tuple[str, str, str, int]]) -> None:
        if self.failing:
            raise OSError("database away")
        self.saved += owners

    async def prune_background_owners(self, before: datetime) -> int:
        self.pruned += 1
        return 0


async def test_creators_are_stored_as_they_come_kept_while_the_database_is_away_and_at_stop():
    background, _, _ = _tracked()
    store, stop = FakeOwners(), asyncio.Event()
    saving = asyncio.create_task(background.keep_saved(store, stop))
    background.remember("resp_1", "c1", "s1")
    async with asyncio.timeout(2):
        while background.unsaved:  # noqa: ASYNC110 (its state, not an event)
            await asyncio.sleep(0.01)
    assert [o[:3] for o in store.saved] == [("resp_1", "c1", "s1")] and store.pruned == 1
    store.failing = True
    background.remember("resp_2", "c2", "s2")
    await asyncio.sleep(0.05)
    assert list(background.unsaved) == ["resp_2"]  # kept for the next attempt
    store.failing = False
    stop.set()
    await asyncio.wait_for(saving, 2)
    assert [o[0] for o in store.saved] == ["resp_1", "resp_2"] and not background.unsaved


async def test_creators_made_while_the_database_is_away_are_all_stored_once_it_is_back():
    """An outage is no refusal of the values: however many writes fail meanwhile (and new
    creations do not cut the back-off short), nothing is given up."""
    background, _, _ = _tracked()
    store, stop = FakeOwners(), asyncio.Event()
    store.failing = True
    saving = asyncio.create_task(background.keep_saved(store, stop))
    for n in range(6):
        background.remember(f"resp_{n}", "c1", "s1")
        await asyncio.sleep(0.02)
    assert background.lost == 0 and len(background.unsaved) == 6
    store.failing = False
    stop.set()
    await asyncio.wait_for(saving, 5)
    assert len(store.saved) == 6 and background.lost == 0


def test_creators_waiting_to_be_stored_are_bounded():
    background, _, _ = _tracked(max_kept=2)
    for n in range(3):
        background.remember(f"resp_{n}", "c1", "s1")
    assert list(background.unsaved) == ["resp_1", "resp_2"] and background.lost == 1
