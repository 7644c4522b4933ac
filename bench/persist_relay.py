"""CPU per message of QoS 1 through the whole connection path, in process: memory vs LMDB (issue 16).

``bench/persist_micro.py`` drives the broker's Python API; this drives real ``MQTTConnection``s over
socket pairs, so the publish is decoded and served by the C relay (``_core/relay.pyx``) as under
``mqttload``: a publisher and one subscriber (``t/#``, window 100), in turns of ``--per`` QoS 1
PUBLISHes written to the publisher's socket at once; the turn reads their PUBACKs and the
deliveries, writes the subscriber's PUBACKs and a PINGREQ, and waits for the PINGRESP (so every
acknowledgement is served before the next turn). ``memory``: a clean session over the memory
backend; ``lmdb``: a persistent session over LMDBStorage (``sync: batch`` behaviour, no fsync), with
the commit in the flush as in the node. ``--queued N`` first fills the subscriber's window and puts N
messages in its queue, so each PUBACK sends a queued message (the path of a subscriber behind). The
exact figure is callgrind's instruction count per message (deterministic; the gevent loop and this
driver are counted in both kinds)::

    valgrind --tool=callgrind --callgrind-out-file=cg.T python -c \\
      "import sys; sys.path.insert(0, '.'); from bench import persist_relay as pr; pr.run(KIND, T, 50)"
    # (Ir(T=300) - Ir(T=100)) / (200 * 50)

Usage (CPU time per message, min over rounds)::

    .venv/bin/python -m bench.persist_relay --rounds 3
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

import gevent  # noqa: E402
from gevent import socket  # noqa: E402

from fluxmq._core import codec as c  # noqa: E402
from fluxmq.broker.broker import Broker, BrokerSettings  # noqa: E402
from fluxmq.protocol.connection import MQTTConnection  # noqa: E402
from fluxmq.protocol.flush import FlushScheduler  # noqa: E402
from fluxmq.protocol.settings import ProtocolSettings  # noqa: E402
from fluxmq.storage.lmdb import LMDBStorage  # noqa: E402
from fluxmq.storage.memory import MemoryStorage  # noqa: E402
from fluxmq.transport.tcp import SocketStream  # noqa: E402

TOPIC = "t/mqttload-1234/0"
PAYLOAD = b"x" * 64


def _recv_exactly(sock, n: int) -> None:
    got = 0
    while got < n:
        chunk = sock.recv(min(1 << 20, n - got))
        if not chunk:
            raise RuntimeError("closed")
        got += len(chunk)


def publish_qos1(pub, batches: dict[int, bytes], n: int) -> None:
    """Write ``n`` QoS 1 PUBLISHes (packet ids 1..n: the same every turn, as the turn reads their
    PUBACKs before the next one) to ``pub`` at once, and read their PUBACKs; ``batches`` keeps each
    ``n``'s bytes."""
    data = batches.get(n)
    if data is None:
        data = batches[n] = b"".join(
            c.encode(c.Publish(TOPIC, PAYLOAD, qos=1, packet_id=1 + i), 4) for i in range(n)
        )
    pub.sendall(data)
    _recv_exactly(pub, 4 * n)


def run(kind: str, turns: int, per: int, queued: int = 0) -> float:
    """CPU microseconds per message for one round."""
    tmp = tempfile.mkdtemp(prefix="persist-relay-")
    try:
        store = (
            MemoryStorage() if kind == "memory" else LMDBStorage(tmp + "/d", map_size=1 << 30, verify=False)
        )
        broker = Broker(
            BrokerSettings(max_queued_messages=1 << 20, persistent_max_queued_messages=1 << 20), store
        )
        broker.restore(store.load())
        flusher = FlushScheduler(store)
        settings = ProtocolSettings(park_after=0)
        persistent = kind != "memory"
        ends = {}
        sessions = {}
        readers = []
        for cid, clean, expiry in (
            ("pub", True, 0),
            ("sub", not persistent, 0xFFFFFFFF if persistent else 0),
        ):
            server, client = socket.socketpair()
            conn = MQTTConnection(broker, SocketStream(server, ("127.0.0.1", 1)), settings, flusher)
            conn.decoder.version = conn.version = 4
            conn.client_id = cid
            session, _ = broker.open_session(cid, clean, expiry)
            conn.session = sessions[cid] = session
            broker.attach(session, conn, 100)
            readers.append(gevent.spawn(conn.run))
            ends[cid] = client
        broker.subscribe(sessions["sub"], "t/#", 1)
        pub, sub = ends["pub"], ends["sub"]
        delivery = len(c.encode(c.Publish(TOPIC, PAYLOAD, qos=1, packet_id=1), 4))
        ping = c.encode(c.Pingreq(), 4)
        next_pid = [1]  # the subscriber's packet ids, in order (every turn acknowledges all it got)

        batches: dict[int, bytes] = {}

        def publish(n: int) -> None:
            publish_qos1(pub, batches, n)

        def ack(n: int) -> None:
            pid = next_pid[0]
            out = bytearray()
            for _ in range(n):
                out += bytes((0x40, 2, pid >> 8, pid & 0xFF))
                pid = pid + 1 if pid < 65535 else 1
            next_pid[0] = pid
            sub.sendall(bytes(out) + ping)

        if queued:
            publish(100 + queued)  # the window (100) and the queue behind it
            _recv_exactly(sub, 100 * delivery)
        gc.collect()
        t0 = time.process_time()
        for _ in range(turns):
            publish(per)  # sent at once, or (queued) queued behind the others
            if not queued:
                _recv_exactly(sub, per * delivery)
            ack(per)  # (queued: each PUBACK sends one from the queue)
            _recv_exactly(sub, (per * delivery if queued else 0) + 2)  # ... and the PINGRESP
        spent = time.process_time() - t0
        for end in ends.values():
            end.close()
        for reader in readers:
            reader.join(timeout=5)
        store.close()
        return spent / (turns * per) * 1e6
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--turns", type=int, default=400)
    ap.add_argument("--per", type=int, default=50, help="QoS 1 PUBLISHes per turn (at most 100)")
    ap.add_argument("--queued", type=int, default=0, help="messages waiting in the subscriber's queue")
    args = ap.parse_args(argv)
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for kind in ("memory", "lmdb"):
            best[kind] = min(best.get(kind, float("inf")), run(kind, args.turns, args.per, args.queued))
    for kind, us in best.items():
        print(f"{kind:8}  {us:5.2f} us CPU per message (min of {args.rounds} rounds)")
    print(f"ratio     {best['memory'] / best['lmdb']:.0%} (memory / lmdb)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
