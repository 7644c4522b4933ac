"""CPU per message of the session and storage path of QoS 1, in process: memory vs LMDB (issue 16).

No sockets and no codec: a Broker with one subscriber (``t/#``, window 100) whose Delivery only
records packet ids. Each turn publishes (as client "pub", like a PUBLISH from a connection) ``--per`` QoS 1 messages, commits, acknowledges as many of
the oldest in flight (the queue refills the window) and commits again, with ``--queued`` (900)
messages waiting in the queue as under ``mqttload``'s 1,000-message window; ``--queued 0`` measures
the path of a client that keeps up (each message sent at once, as in the ``mqttload`` runs, whose
subscriber's queue is empty most of the time). ``memory``: a clean session over the
memory backend; ``lmdb``: a persistent session over LMDBStorage (``sync: batch`` behaviour, no
fsync) in a temporary directory. Prints the CPU time (``time.process_time``) per message, the
minimum over ``--rounds`` rounds: steadier than end-to-end rates on a shared machine, and the
difference between the two is what the store costs per message.

Usage::

    .venv/bin/python -m bench.persist_micro --rounds 4
    .venv/bin/python -m bench.persist_micro --rounds 4 --queued 0
    .venv/bin/python -m bench.persist_micro --store-ops
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"  # noqa: A001

from fluxmq.broker.broker import Broker, BrokerSettings  # noqa: E402
from fluxmq.broker.message import Message  # noqa: E402
from fluxmq.storage.lmdb import LMDBStorage  # noqa: E402
from fluxmq.storage.memory import MemoryStorage  # noqa: E402

TOPIC = "t/mqttload-1234/0"
PAYLOAD = b"x" * 64


class _Delivery:
    version = 4
    closed = False

    def __init__(self) -> None:
        self.pids: list[int] = []

    def send_publish(self, message, qos, retain, packet_id, dup, subscription_ids) -> bool:
        self.pids.append(packet_id)
        return True

    def send_pubrel(self, packet_id: int) -> None:
        pass

    def is_congested(self) -> bool:
        return False

    def close(self, *args) -> None:
        pass


def run(kind: str, turns: int, per: int, queued: int = 900) -> float:
    """CPU microseconds per message for one round."""
    tmp = tempfile.mkdtemp(prefix="persist-micro-")
    try:
        store = (
            MemoryStorage() if kind == "memory" else LMDBStorage(tmp + "/d", map_size=1 << 30, verify=False)
        )
        broker = Broker(BrokerSettings(), store)
        broker.restore(store.load())
        persistent = kind != "memory"
        session, _ = broker.open_session("sub", not persistent, 0xFFFFFFFF if persistent else 0, None)
        d = _Delivery()
        broker.attach(session, d, 100)
        broker.subscribe(session, "t/#", 1)
        store.commit()
        for _ in range(queued):
            broker.publish(Message(TOPIC, PAYLOAD, 1, origin="pub"))
        store.commit()
        gc.collect()
        acked = 0
        t0 = time.process_time()
        for _ in range(turns):
            for _ in range(per):
                broker.publish(Message(TOPIC, PAYLOAD, 1, origin="pub"))
            store.commit()
            pids = d.pids
            for _ in range(per):
                session.on_puback(pids[acked])
                acked += 1
            store.commit()
        spent = time.process_time() - t0
        store.close()
        return spent / (turns * per) * 1e6
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def store_ops(rounds: int, per: int = 100) -> dict[str, float]:
    """CPU nanoseconds per message of each store step of the send-at-once path, LMDBStorage alone
    (no broker): ``put_sent_entry`` of ``per`` messages, their commit, ``delete_inflight`` of the
    same, that commit. Shows what LMDB's own put and delete cost against the Python bookkeeping."""
    tmp = tempfile.mkdtemp(prefix="persist-micro-")
    try:
        store = LMDBStorage(tmp + "/d", map_size=1 << 30, verify=False)
        entry = b"y" * 110  # about the entry of a 64-byte message on a short topic
        spent = dict.fromkeys(
            ("put_sent_entry", "commit of the puts", "delete_inflight", "commit of the deletes"), 0.0
        )
        steps = list(spent)
        for k in range(rounds):
            base = k * per
            t0 = time.process_time()
            for i in range(per):
                store.put_sent_entry("sub", i + 1, base + i, entry)
            t1 = time.process_time()
            store.commit()
            t2 = time.process_time()
            for i in range(per):
                store.delete_inflight("sub", i + 1)
            t3 = time.process_time()
            store.commit()
            t4 = time.process_time()
            for step, dt in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                spent[step] += dt
        store.close()
        return {step: dt / (rounds * per) * 1e9 for step, dt in spent.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.persist_micro", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--turns", type=int, default=400)
    p.add_argument("--per", type=int, default=50)
    p.add_argument(
        "--queued", type=int, default=900, help="messages waiting in the queue (0: each sent at once)"
    )
    p.add_argument("--store-ops", action="store_true", help="time the store's steps alone (see store_ops)")
    args = p.parse_args(argv)
    if args.store_ops:
        for step, ns in store_ops(2000).items():
            print(f"{step:22} {ns:6.0f} ns CPU per message (100 per commit)")
        return 0
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for kind in ("memory", "lmdb"):
            best[kind] = min(best.get(kind, float("inf")), run(kind, args.turns, args.per, args.queued))
    for kind, us in best.items():
        print(f"{kind:7} {us:6.2f} us CPU per message (min of {args.rounds} rounds)")
    print(f"store   {best['lmdb'] - best['memory']:6.2f} us per message (lmdb - memory)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
