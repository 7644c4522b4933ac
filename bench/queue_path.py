"""The durable-queue path in one process, no network: publish -> dispatch -> PUBACK, CPU per message.

A Broker with an LMDB store (``storage.sync`` as in tests: no fsync), one ``$queue/bench`` work
queue and ``--consumers`` auto-ack 5.0 members of one group, each with a connection is a stand-in that takes every PUBLISH (it
encodes it as the 5.0 connection does on a cache miss). Per loop of ``--batch`` messages:
``--batch`` publishes, the end of the turn (dispatch), the commit, then for each consumer its
PUBACKs, the end of that turn and the commit again (``--relayed``: the appends as the node's C fast
path of a PUBLISH makes them, ``QueueManager.append_relayed``); every 5,000 messages the queues' timer tick (retention) and
a commit. Reports process CPU time (``time.process_time``) per message by
phase, so other load on the machine weighs less than in ``bench.queues``: the best of ``--runs``.

Usage::

    PYTHONPATH=$PWD .venv/bin/python -m bench.queue_path --runs 5
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import gevent

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fluxmq._core.codec import encode_publish  # noqa: E402
from fluxmq.broker.broker import Broker  # noqa: E402
from fluxmq.broker.message import Message  # noqa: E402
from fluxmq.queues import QueueManager  # noqa: E402
from fluxmq.queues.config import QueueConfig  # noqa: E402
from fluxmq.storage.lmdb import LMDBStorage  # noqa: E402

V5_QOS1 = 10  # the 5.0 connection's wire_cache key of a QoS 1, non-retained PUBLISH


class Consumer:
    """The consumer's connection: takes every PUBLISH, encoding it like the 5.0 connection does."""

    version = 5
    closed = False

    def __init__(self) -> None:
        self.pids: list[int] = []

    def send_publish(self, message, qos, retain, packet_id, dup, subscription_ids) -> bool:
        cache = message.wire_cache
        if cache is None:
            cache = message.wire_cache = {}
        if cache.get(V5_QOS1) is None:
            cache[V5_QOS1] = encode_publish(
                message.topic, message.payload, qos, retain, False, 1, message.properties or None, 5
            )
        self.pids.append(packet_id)
        return True

    def is_congested(self) -> bool:
        return False

    def close(self, reason_code: int, reason: str = "") -> None:
        self.closed = True


def run(count: int, batch: int, consumers: int = 1, relayed: bool = False) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        storage = LMDBStorage(os.path.join(d, "s"), map_size=1 << 30)
        try:
            broker = Broker(storage=storage)
            broker.queues = QueueManager(storage, [QueueConfig("bench", max_inflight=1000)])
            members = []
            for i in range(consumers):
                session, _ = broker.open_session(f"c{i}", True, 0)
                consumer = Consumer()
                broker.attach(session, consumer, 1000)
                broker.subscribe(
                    session,
                    "$queue/bench/#",
                    1,
                    user_properties=[("consumer-group", "g"), ("auto-ack", "true")],
                )
                members.append((session, consumer))
            payload = b"p" * 64
            t = dict.fromkeys(("publish", "dispatch", "puback", "commit", "tick"), 0.0)
            done = 0
            clock = time.process_time
            while done < count:
                t0 = clock()
                if relayed:  # as the node's C fast path of a PUBLISH hands a read's run over
                    broker.queues.append_relayed("$queue/bench", [payload] * batch, "publisher")
                else:
                    for _ in range(batch):
                        broker.publish(Message("$queue/bench", payload, 1, origin="publisher"))
                t1 = clock()
                gevent.sleep(0)  # the end of the turn: the dispatch
                t2 = clock()
                storage.commit()
                t["publish"] += t1 - t0
                t["dispatch"] += t2 - t1
                t["commit"] += clock() - t2
                for session, consumer in members:  # each consumer's PUBACKs in a turn of their own
                    t3 = clock()
                    pids, consumer.pids = consumer.pids, []
                    for pid in pids:
                        session.on_puback(pid, 0)
                    t4 = clock()
                    gevent.sleep(0)  # the end of that turn: progress, deletes, the next dispatch
                    storage.commit()
                    t5 = clock()
                    t["puback"] += t4 - t3
                    t["commit"] += t5 - t4
                done += batch
                if done % 5000 == 0:  # the 100 ms timer (retention, timeouts) and its commit
                    t6 = clock()
                    broker.queues.tick()
                    storage.commit()
                    t["tick"] += clock() - t6
            return {k: v / count * 1e6 for k, v in t.items()}
        finally:
            storage.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.queue_path", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--count", type=int, default=50_000)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--consumers", type=int, default=1, help="members of the group (auto-ack)")
    p.add_argument(
        "--relayed",
        action="store_true",
        help="append as the node's C fast path does (QueueManager.append_relayed), not by Broker.publish",
    )
    args = p.parse_args(argv)
    results = [run(args.count, args.batch, args.consumers, args.relayed) for _ in range(args.runs)]
    best = min(results, key=lambda r: sum(r.values()))
    totals = sorted(sum(r.values()) for r in results)
    print(
        " ".join(f"{k} {v:.2f}" for k, v in best.items()) + f"  total {sum(best.values()):.2f} us/msg "
        f"(best of {args.runs}; all: {', '.join(f'{x:.1f}' for x in totals)})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
