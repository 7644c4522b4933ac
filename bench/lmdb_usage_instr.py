"""Instructions the LMDB store's usage check costs per commit: ``count`` commits of one 100-byte
queue entry each (after 1,000 to warm up; 1 GiB map, ``sync: none``) with the usage read every
``every`` commits at most (``fluxmq.storage.lmdb.USAGE_EVERY``; 1 is the read after every commit
of before). Under callgrind at the same count, the difference in instructions over the commits is
what the reads saved::

    for every in 1 64; do valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python -m bench.lmdb_usage_instr $every 4000 2>&1 | grep Collected; done
"""

from __future__ import annotations

import sys
import tempfile
import time

import fluxmq.storage.lmdb as lmdb_store
from fluxmq.storage.lmdb import LMDBStorage


def main() -> None:
    every = int(sys.argv[1]) if len(sys.argv) > 1 else lmdb_store.USAGE_EVERY
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
    lmdb_store.USAGE_EVERY = every
    with tempfile.TemporaryDirectory() as d:
        s = LMDBStorage(d, map_size=1 << 30, sync="none")
        for i in range(1000):
            s.queue_append("c", i, b"x" * 100)
            s.commit()
        t = time.process_time()
        for i in range(1000, 1000 + count):
            s.queue_append("c", i, b"x" * 100)
            s.commit()
        dt = time.process_time() - t
        s.close()
    print(f"USAGE_EVERY={every}: {count} commits, {dt / count * 1e6:.2f} us CPU per commit")


if __name__ == "__main__":
    main()
