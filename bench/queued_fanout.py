"""CPU per delivery of QoS 1 fan-out when every subscriber's window is full, in process (issue 16).

The path of ``mqttload`` fan-out 1 -> 100 at QoS 1 with 10,000 messages in flight: each delivery
finds its subscriber's window (100) full, is queued with the session, and leaves on one of the
subscriber's PUBACKs. Real ``MQTTConnection``\\ s over socket pairs (as ``bench/persist_relay.py``,
so the C relay serves what it serves under load), a publisher and ``--subs`` clean 3.1.1 subscribers
of ``t/#`` (window 100), in turns: ``--per`` QoS 1 PUBLISHes written to the publisher's socket at
once (their PUBACKs read), then each subscriber's ``--per`` PUBACKs and a PINGREQ written at once,
and its deliveries and PINGRESP read. Two modes, the same packets on the clients' side:

``direct``
    the windows have room: each delivery is written at once (the fan-out path).
``queued``
    the windows were filled and ``--queued`` messages wait behind them first, so each delivery is
    queued and each PUBACK sends one from the queue.

Reports CPU time (``time.process_time``, this process: broker and clients) per delivery, the best
of ``--rounds`` rounds, the modes interleaved, and their ratio: on a shared machine the ratio moves
less than the figures; ``--python`` runs the Python handlers alone (the path of what the relay
leaves: 5.0 subscription identifiers, QoS 0 in the queue, ...). Bounded: ``--turns`` per round,
each round within 60 s + 1 s per turn.

Usage::

    nice .venv/bin/python -m bench.queued_fanout --rounds 5
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"  # noqa: A001

import gevent  # noqa: E402
from gevent import socket  # noqa: E402

from fluxmq._core import codec as c  # noqa: E402
from fluxmq.broker.broker import Broker, BrokerSettings  # noqa: E402
from fluxmq.protocol.connection import RELAY, MQTTConnection  # noqa: E402
from fluxmq.protocol.flush import FlushScheduler  # noqa: E402
from fluxmq.protocol.settings import ProtocolSettings  # noqa: E402
from fluxmq.storage.memory import MemoryStorage  # noqa: E402
from fluxmq.transport.tcp import SocketStream  # noqa: E402

from .persist_relay import PAYLOAD, TOPIC, _recv_exactly, publish_qos1  # noqa: E402

WINDOW = 100
MODES = ("direct", "queued")


def run(mode: str, subs: int, turns: int, per: int, queued: int = 200) -> float:
    """CPU nanoseconds per delivery for one round of ``mode``."""
    store = MemoryStorage()
    broker = Broker(BrokerSettings(max_inflight=WINDOW, max_queued_messages=1 << 20), store)
    broker.restore(store.load())
    flusher = FlushScheduler(store)
    settings = ProtocolSettings(park_after=0)
    ends = []
    readers = []
    for k in range(subs + 1):
        cid = "pub" if k == 0 else f"sub{k}"
        server, client = socket.socketpair()
        conn = MQTTConnection(broker, SocketStream(server, ("127.0.0.1", 1)), settings, flusher)
        conn.decoder.version = conn.version = 4
        conn.client_id = cid
        session, _ = broker.open_session(cid, True, 0)
        conn.session = session
        broker.attach(session, conn, WINDOW)
        if k:
            broker.subscribe(session, "t/#", 1)
        readers.append(gevent.spawn(conn.run))
        ends.append(client)
    pub, clients = ends[0], ends[1:]
    delivery = len(c.encode(c.Publish(TOPIC, PAYLOAD, qos=1, packet_id=1), 4))
    ping = c.encode(c.Pingreq(), 4)
    next_pid = [1] * subs  # each subscriber's packet ids, in order (a turn acknowledges all it got)
    batches: dict[int, bytes] = {}

    def publish(n: int) -> None:
        publish_qos1(pub, batches, n)

    # every PUBACK in packet id order (the broker gives a subscriber's ids in turn), so a turn's
    # acknowledgements are a slice: the clients' side costs little beside the broker's
    acks = b"".join(bytes((0x40, 2, pid >> 8, pid & 0xFF)) for pid in range(1, 65536))
    acks += acks[: 4 * WINDOW]

    def ack(k: int, n: int) -> None:
        at = next_pid[k] - 1
        clients[k].sendall(acks[4 * at : 4 * (at + n)] + ping)
        next_pid[k] = (at + n) % 65535 + 1

    # the whole round bounded (a timeout per read would cost the clients a timer each)
    timeout = gevent.Timeout(60 + turns)
    timeout.start()
    try:
        if mode == "queued":
            publish(WINDOW + queued)  # the windows and the queues behind them
            for sub in clients:
                _recv_exactly(sub, WINDOW * delivery)
        gc.collect()
        t0 = time.process_time()
        for _ in range(turns):
            publish(per)  # written at once, or (queued) queued behind the others
            if mode == "direct":
                for sub in clients:
                    _recv_exactly(sub, per * delivery)
            for k in range(subs):
                ack(k, per)  # (queued: each PUBACK sends one from the queue)
            for sub in clients:
                _recv_exactly(sub, (per * delivery if mode == "queued" else 0) + 2)  # ... and the PINGRESP
        spent = time.process_time() - t0
    finally:
        timeout.close()
        for end in ends:
            end.close()
        for reader in readers:
            reader.join(timeout=5)
    return spent / (turns * per * subs) * 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--subs", type=int, default=20)
    ap.add_argument("--turns", type=int, default=200)
    ap.add_argument("--per", type=int, default=50, help="QoS 1 PUBLISHes per turn (at most 100)")
    ap.add_argument("--queued", type=int, default=200, help="messages waiting in each queue (queued mode)")
    ap.add_argument("--mode", choices=MODES, action="append", help="(default: both, interleaved)")
    ap.add_argument(
        "--python",
        action="store_true",
        help="without the C relay (RELAY.enabled = False): the Python handlers",
    )
    args = ap.parse_args(argv)
    RELAY.enabled = not args.python
    modes = args.mode or list(MODES)
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for mode in modes:
            ns = run(mode, args.subs, args.turns, min(args.per, WINDOW), args.queued)
            best[mode] = min(best.get(mode, float("inf")), ns)
    for mode, ns in best.items():
        print(
            f"{mode:7}  {ns:6.0f} ns CPU per delivery (min of {args.rounds} rounds, {args.subs} subscribers)"
        )
    if len(best) == 2:
        print(f"ratio    {best['queued'] / best['direct']:.2f} (queued / direct)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
