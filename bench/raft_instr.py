"""Instructions per replicated message of the Raft path, three replicas in one process, for
callgrind: the figure that does not move with the machine's load.

Three ``RaftGroup`` members on loopback in one gevent hub (memory queue-log stores: the LMDB work
is the same with or without replication), queue ``q`` replicated; the leader appends ``--window``
records per round as the C relay does (``ReplicatedQueueLog.append_relayed``) and starts the next
round when the round's hold is resolved (the commit), as a producer with that many PUBLISHes in
flight does. Every replica applies every entry. Timers that fire on wall-clock time (pysyncobj's
tick, the commit notice) are stretched so that valgrind's slowness does not add ticks per round;
the commit index then reaches the followers on the next entry, as at a steady rate. Run it twice
with two counts under callgrind and divide the difference in instructions by the difference in
messages::

    for n in 200 1200; do valgrind --tool=callgrind --callgrind-out-file=/tmp/ri.$n \\
        .venv/bin/python -m bench.raft_instr --rounds $n; done
    callgrind_annotate /tmp/ri.200 | head -3; callgrind_annotate /tmp/ri.1200 | head -3

Without valgrind it prints the rounds per second and the process CPU per message.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"  # noqa: A001

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402

from fluxmq.queues.config import ReplicationConfig  # noqa: E402
from fluxmq.replication import group as group_module  # noqa: E402
from fluxmq.replication.group import RaftGroup  # noqa: E402
from fluxmq.replication.log import ReplicatedQueueLog  # noqa: E402
from fluxmq.storage.queue_log import MemoryQueueLog  # noqa: E402
from tests.conftest import free_port  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=50)
    args = ap.parse_args(argv)
    group_module.TICK_WAIT = 0.25  # pysyncobj's timers only (or, before, the poll's longest wait)
    group_module.COMMIT_NOTICE_DELAY = 1.0
    base = tempfile.mkdtemp(prefix="raft-instr-")
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    groups = []
    for i, me in enumerate(addrs):
        store = MemoryQueueLog()
        g = RaftGroup("default", me, addrs, os.path.join(base, f"n{i}"), store, "forward")
        g.logs["q"] = ReplicatedQueueLog("q", store, g, ReplicationConfig(True, ack_timeout=60.0))
        groups.append(g)
    for g in groups:
        g.start()
    payloads = [b"p" * 64] * args.window
    try:
        with gevent.Timeout(600):
            leader = None
            while leader is None:
                gevent.sleep(0.05)
                leader = next((g for g in groups if g.delivering), None)
            while not all(leader._node.isNodeConnected(n) for n in leader._node.otherNodes):
                gevent.sleep(0.05)
            qlog = leader.logs["q"]

            def run(rounds: int) -> None:
                for _ in range(rounds):
                    held = qlog.append_relayed("$queue/q/k", payloads, "bench")
                    committed = Event()
                    held.add(lambda error, committed=committed: committed.set())
                    committed.wait()  # the hub runs: sends, answers, the commit
                    if held.outcome is not None:
                        raise RuntimeError(held.outcome)

            run(args.warmup)
            cpu = time.process_time()
            t0 = time.perf_counter()
            run(args.rounds)
            elapsed = time.perf_counter() - t0
            cpu = time.process_time() - cpu
            n = args.rounds * args.window
            while not all(g.applied == leader.applied for g in groups):
                gevent.sleep(0.01)
            print(
                f"{args.rounds} rounds of {args.window}: {args.rounds / elapsed:.0f} rounds/s, "
                f"{cpu / n * 1e6:.2f} us of process CPU per message (three replicas), "
                f"entries {leader.stats['entries_submitted']}"
            )
    finally:
        for g in groups:
            g.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
