"""Session takeover time, the local part: export + encode on the old owner, decode + import on
the new one (``Broker.export_session`` / ``Broker.import_session``), over ``--takeovers`` takeovers of
a session holding ``--queued`` queued QoS 1 messages (``--payload`` bytes, 5.0 properties), 5 QoS 1/2
in flight, one inbound QoS 2 id, 3 subscriptions and a will. The network hop and the etcd CAS of a
real takeover come on top (reference claim: < 100 ms for the whole takeover).

Each takeover moves the session the other way (A -> B, then B -> A, ...), so both brokers export
and import in turn. With ``--store lmdb`` both brokers write through to a real LMDB store in a temp
dir; ``commit`` is the time of committing both stores' buffered operations afterwards (the node's
FlushScheduler does it once per loop turn; sync: batch).

    .venv/bin/python -m bench.takeover --store memory
    .venv/bin/python -m bench.takeover --store lmdb
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.broker.message import CONTENT_TYPE, USER_PROPERTY, Message
from fluxmq.broker.session import Will
from fluxmq.storage.lmdb import LMDBStorage
from tests.broker.test_session import RecordingDelivery

PROPS = {CONTENT_TYPE: "application/json", USER_PROPERTY: [("trace", "0123456789")]}


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def make_broker(store: str, path: Path) -> tuple[Broker, LMDBStorage | None]:
    storage = LMDBStorage(path, map_size=256 << 20) if store == "lmdb" else None
    broker = Broker(BrokerSettings(max_inflight=5), storage)
    if storage is not None:
        broker.restore(storage.load())
    return broker, storage


def fill(broker: Broker, storage, queued: int, payload: bytes) -> None:
    session, _ = broker.open_session("mover", False, 3600, Will(Message("will/mover", b"gone", 1), 10))
    broker.attach(session, RecordingDelivery(), 5)
    for i, f in enumerate(("t/#", "x/+", "$share/g/y")):
        broker.subscribe(session, f, 2, no_local=bool(i % 2), subscription_id=i + 1)
    for i in range(5 + queued):  # 5 go in flight (window 5), the rest is queued
        broker.publish(Message(f"t/{i}", payload, 1 + i % 2, properties=dict(PROPS)))
    session.inbound_qos2.add(9)
    broker.close_session(session, session.delivery, False)  # offline: the queue waits
    if storage is not None:
        storage.commit()
    assert len(session.queue) == queued


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", choices=("memory", "lmdb"), default="memory")
    ap.add_argument("--takeovers", type=int, default=200)
    ap.add_argument("--queued", type=int, default=100)
    ap.add_argument("--payload", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-takeover-") as tmp:
        a, sa = make_broker(args.store, Path(tmp) / "a")
        b, sb = make_broker(args.store, Path(tmp) / "b")
        fill(a, sa, args.queued, b"x" * args.payload)
        src, dst = (a, sa), (b, sb)
        export_ms, import_ms, total_ms, commit_ms = [], [], [], []
        size = 0
        for _ in range(args.takeovers):
            t0 = time.perf_counter()
            blob = src[0].export_session("mover")
            t1 = time.perf_counter()
            session = dst[0].import_session("mover", blob)
            t2 = time.perf_counter()
            for storage in (src[1], dst[1]):
                if storage is not None:
                    storage.commit()
            t3 = time.perf_counter()
            assert len(session.queue) == args.queued and len(session.inflight) == 5
            size = len(blob)
            export_ms.append((t1 - t0) * 1e3)
            import_ms.append((t2 - t1) * 1e3)
            total_ms.append((t2 - t0) * 1e3)
            commit_ms.append((t3 - t2) * 1e3)
            src, dst = dst, src
        print(
            f"store={args.store} takeovers={args.takeovers} queued={args.queued} payload={args.payload} "
            f"state={size} bytes"
        )
        for name, values in (
            ("export+encode", export_ms),
            ("decode+import", import_ms),
            ("takeover (local part)", total_ms),
            ("commit of both stores", commit_ms),
        ):
            print(
                f"  {name:24s} p50 {statistics.median(values):7.3f} ms   p99 {pct(values, 99):7.3f} ms"
                f"   max {max(values):7.3f} ms"
            )
        for storage in (sa, sb):
            if storage is not None:
                storage.close()


if __name__ == "__main__":
    main()
