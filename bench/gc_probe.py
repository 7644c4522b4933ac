"""What Python's cyclic collector finds and costs on the message paths, in one process (no network).

Uses ``bench.queue_path`` (durable queue, 1 auto-ack consumer) and a plain QoS 1 pub/sub path of the
same shape (1 subscriber, PUBACKs in a turn of their own). Three reports:

``cycles N...``
    collector disabled, N messages per path, then ``gc.collect()`` with ``DEBUG_SAVEALL``: how
    many objects it found and of which types (a reference cycle per message would grow with N).
``cpu MODE``
    process CPU per message of each path (best of 3 x 30,000), and how many collections ran and
    their CPU per message (``gc.callbacks``), under MODE: ``default``, ``freeze`` (``gc.freeze()``
    first), ``thresh`` (generation 0 at 50,000) or ``both``.
``rss G0``
    RSS while the paths run for up to 60 s (at most 2,000,000 messages) with generation 0 at G0.

Usage::

    PYTHONPATH=$PWD .venv/bin/python -m bench.gc_probe cycles 2000 20000 60000
    for m in default both freeze thresh; do taskset -c 1 .venv/bin/python -m bench.gc_probe cpu $m; done
    taskset -c 1 .venv/bin/python -m bench.gc_probe rss 50000
"""

from __future__ import annotations

import collections
import gc
import os
import sys
import tempfile
import time

import gevent

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.queue_path import Consumer  # noqa: E402
from bench.queue_path import run as queue_run  # noqa: E402
from fluxmq.broker.broker import Broker  # noqa: E402
from fluxmq.broker.message import Message  # noqa: E402
from fluxmq.storage.lmdb import LMDBStorage  # noqa: E402


def pubsub_run(count: int, batch: int = 200) -> None:
    with tempfile.TemporaryDirectory() as d:
        storage = LMDBStorage(os.path.join(d, "s"), map_size=1 << 30)
        try:
            broker = Broker(storage=storage)
            session, _ = broker.open_session("sub", True, 0)
            consumer = Consumer()
            broker.attach(session, consumer, 1000)
            broker.subscribe(session, "bench/q", 1)
            done = 0
            while done < count:
                for _ in range(batch):
                    broker.publish(Message("bench/q", b"p" * 64, 1, origin="publisher"))
                gevent.sleep(0)
                storage.commit()
                pids, consumer.pids = consumer.pids, []
                for pid in pids:
                    session.on_puback(pid, 0)
                gevent.sleep(0)
                storage.commit()
                done += batch
        finally:
            storage.close()


def cycles(counts: list[int]) -> None:
    paths = {"queue": lambda n: queue_run(n, 200, 1), "pubsub": pubsub_run}
    for n in counts:
        for name, fn in paths.items():
            gc.collect()
            gc.disable()
            gc.set_debug(gc.DEBUG_SAVEALL)
            del gc.garbage[:]
            fn(n)
            found = gc.collect()
            kinds = collections.Counter(type(o).__name__ for o in gc.garbage)
            gc.set_debug(0)
            del gc.garbage[:]
            gc.enable()
            print(
                f"{name} {n} messages: the collector found {found} objects ({found / n:.4f} per message); "
                f"types {kinds.most_common(6)}"
            )


def cpu(mode: str, count: int = 30_000) -> None:
    spent = [0.0, 0, 0.0]

    def timing(phase: str, info: dict) -> None:
        if phase == "start":
            spent[2] = time.process_time()
        else:
            spent[0] += time.process_time() - spent[2]
            spent[1] += 1

    if mode in ("freeze", "both"):
        gc.freeze()
    if mode in ("thresh", "both"):
        gc.set_threshold(50_000, 10, 10)
    gc.callbacks.append(timing)
    q = min(sum(queue_run(count, 200, 1).values()) for _ in range(3))
    ps = []
    for _ in range(3):
        t = time.process_time()
        pubsub_run(count)
        ps.append((time.process_time() - t) / count * 1e6)
    print(
        f"{mode:7s} queue {q:.2f} us/msg  pubsub {min(ps):.2f} us/msg  collections {spent[1]}, "
        f"{spent[0] * 1e6 / (6 * count):.3f} us/msg over the 6 x {count:,} messages"
    )


def rss(g0: int) -> None:
    def now() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))

    gc.freeze()
    gc.set_threshold(g0, 10, 10)
    t0 = time.monotonic()
    n = 0
    print(f"threshold {gc.get_threshold()}: RSS {now()} MiB at start")
    while time.monotonic() - t0 < 60 and n < 2_000_000:
        queue_run(20_000, 200, 1)
        pubsub_run(20_000)
        n += 40_000
        if n % 400_000 == 0:
            print(
                f"  {time.monotonic() - t0:5.1f} s, {n:,} messages: RSS {now()} MiB, gc count {gc.get_count()}"
            )


def main(argv: list[str]) -> int:
    if argv[:1] == ["cycles"]:
        cycles([int(a) for a in argv[1:]] or [2000, 20000])
    elif argv[:1] == ["cpu"] and len(argv) == 2:
        cpu(argv[1])
    elif argv[:1] == ["rss"] and len(argv) == 2:
        rss(int(argv[1]))
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
