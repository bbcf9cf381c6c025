"""What the spool adds to every metered call: `timeit` of encoding a record, of appending it
(LEDGER_SPOOL_FSYNC=never: one write(2) into the page cache; =always: plus an fdatasync), and of
`Ledger.submit` with and without a spool. Best of several repeats, microseconds per record, as
CPU time of this process (what the event loop spends: steady on a busy machine) and as wall time
(what an fdatasync waits for the disk is wall time, not CPU).

Run from the project root:  .venv/bin/python bench/spool_append.py [--dir PATH]
(--dir: the filesystem to measure on; the default is a temporary directory under ./).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import timeit
from functools import partial
from pathlib import Path

from costing.ledger import Ledger
from costing.records import UsageEntry
from costing.spool import Spool, encode
from costing.usage import Usage


def record() -> UsageEntry:
    return UsageEntry("campaign-1", "session-1", "chat.completions", "gpt-4o-mini",
                      "gpt-4o-mini-2024-07-18", Usage(120, 0, 48, 0), 4_512_000, False, False, True,
                      200, 350, 1_764_550_000_000_000, "chatcmpl-" + "a" * 29, "0123456789ab")


def best(call: object, number: int, repeat: int = 7) -> str:
    cpu, wall = (min(timeit.repeat(call, number=number, repeat=repeat, timer=timer))  # type: ignore[arg-type]
                 / number * 1e6 for timer in (time.process_time, time.perf_counter))
    return f"{cpu:8.2f} us CPU {wall:8.2f} us wall"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("."))
    args = parser.parse_args()
    entry = record()
    print(f"record line: {len(encode(entry))} bytes")
    print(f"encode:                         {best(partial(encode, entry), 20_000)}")
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        for name, seconds, number in (("never", None, 20_000), ("1 s", 1.0, 20_000),
                                      ("always", 0.0, 300)):
            spool = Spool(Path(root) / name, seconds)
            spool.open()
            print(f"append, LEDGER_SPOOL_FSYNC={name + ':':7}{best(partial(spool.append, entry), number)}")
            spool.release([entry])
            spool.close()
        for name, spool_or_none in (("without a spool", None),
                                    ("with a spool (never)", Spool(Path(root) / "s"))):
            if spool_or_none is not None:
                spool_or_none.open()
            ledger = Ledger(None, "bench", flush_interval=1, batch_size=10**9, max_records=10**9,  # type: ignore[arg-type]
                            spool=spool_or_none)
            print(f"Ledger.submit {name + ':':21}{best(partial(ledger.submit, entry), 20_000)}")
            if spool_or_none is not None:
                spool_or_none.release([entry])
                spool_or_none.close()


if __name__ == "__main__":
    main()
