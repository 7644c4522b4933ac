"""How long a Raft snapshot (log compaction) keeps the gevent hub from running other greenlets.

In-process, one-node Raft group (fluxmq.replication.group.RaftGroup, real pysyncobj and LMDB in a
temporary directory), ``--records`` records appended in 19 entries of the queue ``q``, then
one-record entries until two snapshots are written (``compaction_entries`` 20, every record
retained: no consumer). A monitor greenlet sleeps 1 ms in a loop and records the **thread CPU
time** between two of its turns: the hub's work it waited for, not the time the process was
descheduled, so the figure holds on a busy machine. Prints the longest gaps, each with whether a
snapshot was being written then (``null`` before 2026-12-05: the attribute did not exist).

    .venv/bin/python -m bench.raft_snapshot --records 27000
    PYTHONPATH=/path/to/other/tree .venv/bin/python bench/raft_snapshot.py   # that tree's code
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import gevent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=27000)
    args = ap.parse_args(argv)
    from fluxmq.broker.message import Message
    from fluxmq.queues.config import ReplicationConfig
    from fluxmq.replication.group import RaftGroup
    from fluxmq.replication.log import ReplicatedQueueLog
    from fluxmq.storage.lmdb import LMDBStorage
    from fluxmq.storage.queue_log import encode_record
    from tests.conftest import free_port

    base = Path(tempfile.mkdtemp(prefix="bench-raft-snapshot-"))
    storage = LMDBStorage(base / "data", map_size=1 << 30)
    me = f"127.0.0.1:{free_port()}"
    group = RaftGroup(
        "default", me, [me], str(base / "raft"), storage.queue_log(), "forward", compaction_entries=20
    )
    group.logs["q"] = ReplicatedQueueLog("q", group.store, group, ReplicationConfig(True))
    group.start()
    gevent.get_hub().threadpool.apply(int)  # made (and its modules imported) before, as in a node
    blob = encode_record(1.0, Message("$queue/bench/k", b"p" * 64, 1))
    gaps: list[tuple[float, bool | None]] = []
    deadline = time.monotonic() + 120
    try:
        while group.owner != me and time.monotonic() < deadline:
            gevent.sleep(0.01)

        def done() -> bool:
            return group.stats["snapshots_written"] >= 2 or time.monotonic() > deadline

        def monitor() -> None:
            last = time.thread_time()
            while not done():
                gevent.sleep(0.001)
                now = time.thread_time()
                gaps.append((now - last, getattr(group, "snapshot_writing", None)))
                last = now

        def produce() -> None:
            per = args.records // 19
            i = 0
            while not done():
                applied = group.stats["entries_applied"]
                group.stage(("a", "q", [blob] * (per if i < 19 else 1)))
                i += 1
                while group.stats["entries_applied"] == applied and not done():
                    gevent.sleep(0.0005)
                storage.commit()  # a loop turn's commit (the node's runs in the threadpool)

        gevent.joinall([gevent.spawn(monitor), gevent.spawn(produce)])
    finally:
        group.stop()
        storage.close()
        shutil.rmtree(base, ignore_errors=True)
    gaps.sort(key=lambda g: -g[0])
    print(
        json.dumps(
            {
                "records": group.logs["q"].count,
                "snapshots": group.stats["snapshots_written"],
                "longest_gaps_cpu_ms": [[round(g * 1000, 1), writing] for g, writing in gaps[:5]],
            }
        )
    )
    return 0


if __name__ == "__main__":
    import os
    import sys

    if __package__ in (None, ""):
        sys.path.insert(
            0,
            os.environ.get("PYTHONPATH", "").split(os.pathsep)[0]
            or os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
    raise SystemExit(main())
