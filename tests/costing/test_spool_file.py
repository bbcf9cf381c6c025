"""The spool's file format and bookkeeping (costing/spool.py), on real files."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import orjson
import pytest

from costing.records import UsageEntry
from costing.settings import parse_fsync
from costing.spool import PROBE, Spool, decode, encode, read_segment
from costing.usage import Usage


def entry(i: int = 0, **changes: object) -> UsageEntry:
    values: dict[str, object] = dict(
        campaign_id="c1", session_id=f"s{i}", operation="chat.completions",
        request_model="gpt-4o-mini", response_model="gpt-4o-mini-2024-07-18",
        usage=Usage(120 + i, 3, 48, 7), cost_units=4_512_000 + i, priced_by_default=False,
        estimated=False, streamed=True, status_code=200, latency_ms=350,
        created_us=1_764_550_000_000_000 + i, response_id=f"chatcmpl-{i}", api_key_hash="0123456789ab",
        id=(1 << 100) + i)
    values.update(changes)
    return UsageEntry(**values)  # type: ignore[arg-type]


def segments(spool: Spool) -> list[Path]:
    assert spool.directory is not None
    return sorted(spool.directory.glob("*.spool"))


def test_a_record_survives_its_line_exactly():
    for e in (entry(), entry(1, request_model=None, response_model=None, response_id=None,
                             api_key_hash=None, priced_by_default=True, estimated=True,
                             streamed=False, status_code=499),
              entry(2, campaign_id='a "quoted"\nname', cost_units=10**30)):  # beyond 64 bits
        line = encode(e)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert decode(line) == e


@pytest.mark.parametrize("line", [
    b"", b"[1,2,3]", b'[2' + encode(entry())[2:], encode(entry())[:-20], b"not json",
    encode(entry()).replace(b'"c1"', b"17"),
])
def test_anything_but_a_whole_line_of_the_format_is_refused(line):
    with pytest.raises(ValueError):
        decode(line)


# A line as releases before cache writes wrote it (23 values): a spool left by one is replayed.
OLD_LINE = (b'[1,68719476736,9,"c1","s9","responses","gpt-6.1-sol","gpt-6.1-sol-2026-09-29",50000,0,1000,'
            b'0,1100000000,4,200,812,1764550000000000,"resp_old","0123456789ab",0,0,0,"default"]\n')


def test_a_line_written_before_cache_writes_reads_as_none():
    old = decode(OLD_LINE)
    assert old == UsageEntry("c1", "s9", "responses", "gpt-6.1-sol", "gpt-6.1-sol-2026-09-29",
                             Usage(50_000, 0, 1000, 0), 1_100_000_000, False, False, True, 200, 812,
                             1_764_550_000_000_000, "resp_old", "0123456789ab", "default", id=(1 << 100) + 9)
    assert old.usage.cache_write_input_tokens == 0
    assert encode(old) == OLD_LINE  # a call without cache writes is still written as then


def test_cache_writes_survive_their_line():
    e = entry(3, usage=Usage(50_000, 1000, 1000, 0, cache_write_input_tokens=48_000))
    assert decode(encode(e)) == e
    big = entry(4, usage=Usage(50_000, 0, 1000, 0, cache_write_input_tokens=48_000), cost_units=10**30)
    assert decode(encode(big)) == big  # the all-text form of an integer beyond 64 bits


def test_cached_audio_survives_its_line_and_lines_without_read_as_none():
    e = entry(6, usage=Usage(50, 15, 47, 0, 20, 40, cached_audio_input_tokens=10))
    line = encode(e)
    assert len(orjson.loads(line)) == 25 and decode(line) == e  # cache writes 0 before it
    both = entry(7, usage=Usage(50, 15, 47, 0, 20, 40, 0, 5, 10))
    assert decode(encode(both)) == both
    assert decode(OLD_LINE).usage.cached_audio_input_tokens == 0
    assert decode(encode(entry(8, usage=Usage(10, 0, 1, 0, cache_write_input_tokens=8)))).usage == Usage(
        10, 0, 1, 0, cache_write_input_tokens=8)


def test_a_dead_processs_old_lines_are_replayed_with_its_new_ones(tmp_path):
    root = tmp_path / "spool"
    dead = Spool(root)
    dead.open()
    new = entry(5, usage=Usage(10, 0, 1, 0, cache_write_input_tokens=8))
    dead.append(new)
    dead.close()
    assert dead.directory is not None
    [segment] = sorted(dead.directory.glob("*.spool"))
    segment.write_bytes(OLD_LINE + segment.read_bytes())  # a spool that spans the upgrade
    [orphan] = list(Spool(root).take_over())
    [(entries, torn)] = [read_segment(p) for p in orphan.segments()]
    assert torn == 0
    assert [e.usage.cache_write_input_tokens for e in entries] == [0, 8]
    assert entries[1] == new
    orphan.remove()


def test_reading_a_segment_skips_blank_lines_and_counts_torn_ones(tmp_path):
    path = tmp_path / "00000001.spool"
    path.write_bytes(encode(entry(1)) + PROBE + b"\n" + b'[1,"torn\n' + encode(entry(2))
                     + encode(entry(3))[:40])
    entries, torn = read_segment(path)
    assert entries == [entry(1), entry(2)]
    assert torn == 2


def test_committed_records_leave_the_spool_and_their_segments_go(tmp_path):
    spool = Spool(tmp_path / "spool", segment_bytes=4 * len(encode(entry(0))) - 1)  # 4 records each
    spool.open()
    records = [entry(i) for i in range(10)]
    for e in records:
        spool.append(e)
    files = segments(spool)
    assert len(files) == 3 and len(spool) == 10
    assert [e for f in files for e in read_segment(f)[0]] == records
    spool.release(records[:4])
    assert segments(spool) == files[1:]  # the first segment is all committed: removed
    spool.release(records[4:9])
    assert segments(spool) == files[2:]
    spool.release(records[9:] + records[:2])  # releasing twice is harmless
    assert segments(spool) == files[2:] and files[2].stat().st_size == 0  # the open one: emptied
    assert len(spool) == 0
    spool.append(entry(11))
    assert read_segment(files[2]) == ([entry(11)], 0)
    spool.release([entry(11)])
    assert spool.close() == 0
    assert list((tmp_path / "spool").iterdir()) == []  # its directory is removed


def test_a_spool_closed_with_records_left_is_taken_over_once(tmp_path):
    root = tmp_path / "spool"
    dead = Spool(root)
    dead.open()
    dead.append(entry(1))
    assert dead.close() == 1  # left: its lock goes with it, as at a process's death
    live = Spool(root)
    live.open()
    live.append(entry(2))
    other = Spool(root)
    other.open()
    [orphan] = list(other.take_over())  # the live one is locked, and our own is ours
    assert orphan.path == dead.directory
    assert list(Spool(root).take_over()) == []  # locked by `other` while it replays
    assert [read_segment(p)[0] for p in orphan.segments()] == [[entry(1)]]
    orphan.remove()
    assert not dead.directory.exists()
    assert live.directory is not None and live.directory.exists()


def test_a_directory_in_the_making_is_left_alone_until_it_is_old(tmp_path):
    root = tmp_path / "spool"
    staging = root / ".new-p1-abcdef12"
    staging.mkdir(parents=True)
    spool = Spool(root)
    spool.open()
    assert list(spool.take_over()) == []
    old = time.time() - 120
    os.utime(staging, (old, old))
    [orphan] = list(spool.take_over())
    orphan.remove()
    assert not staging.exists()


def test_the_lock_is_held_for_the_spools_life(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.open()
    assert spool.directory is not None
    fd = os.open(spool.directory / "lock", os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        spool.close()
    finally:
        os.close(fd)


def test_fsync_always_and_every_n_seconds_write_the_same_lines(tmp_path):
    for name, seconds in (("always", 0.0), ("every", 0.5)):
        spool = Spool(tmp_path / name, seconds)
        spool.open()
        spool.append(entry(1))
        assert [read_segment(p)[0] for p in segments(spool)] == [[entry(1)]]
        spool.release([entry(1)])
        assert spool.close() == 0


@pytest.mark.parametrize(("text", "seconds"), [("never", None), ("ALWAYS", 0.0), ("2.5", 2.5)])
def test_fsync_setting(text, seconds):
    assert parse_fsync(text) == seconds


@pytest.mark.parametrize("text", ["sometimes", "0", "-1", "nan", "inf"])
def test_fsync_setting_refuses(text):
    with pytest.raises(ValueError):
        parse_fsync(text)
