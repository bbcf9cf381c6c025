"""Record ids: version 7 UUIDs, unique, and ordered by the time they were made."""

from __future__ import annotations

import time
import uuid

from forking import drawn_in_a_forked_child

from costing.records import new_id


def test_a_record_id_is_a_version_7_uuid_carrying_the_time_it_was_made() -> None:
    before_ms = time.time_ns() // 1_000_000
    made = uuid.UUID(int=new_id())
    after_ms = time.time_ns() // 1_000_000
    assert (made.version, made.variant) == (7, uuid.RFC_4122)
    assert before_ms <= made.int >> 80 <= after_ms


def test_ids_made_in_a_later_millisecond_sort_after_earlier_ones() -> None:
    earlier = [new_id() for _ in range(100)]
    time.sleep(0.002)
    later = [new_id() for _ in range(100)]
    assert max(earlier) < min(later)


def test_ids_made_in_the_same_millisecond_do_not_repeat() -> None:
    ids = [new_id() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)


def test_forked_workers_draw_their_own_record_ids():
    """Two workers forked from one supervisor must not share the generator's state: then their
    n-th calls in the same millisecond get one id, and the ledger keeps one row of the two."""
    child = drawn_in_a_forked_child(new_id)
    assert isinstance(child, int)
    random_bits = (0xFFF << 64) | ((1 << 62) - 1)  # rand_a and rand_b of RFC 9562's layout
    assert child & random_bits != new_id() & random_bits
