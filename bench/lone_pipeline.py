"""Warm cost of one lone QoS 0 message through the broker, in process, without the event loop.

A publisher connection and a subscriber connection (MQTT 3.1.1, memory storage) over socket pairs:
each iteration decodes one PUBLISH, runs its handler (route, deliver, encode), runs the flush (the
subscriber's ``send``) and reads the delivery on the subscriber's client socket. The figure is the
code's cost with warm caches; ``bench.lone_cost`` gives what a lone message costs a running node.

Usage (from the repository root)::

    python -m bench.lone_pipeline [--count 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)

    from gevent import socket

    from fluxmq.broker.broker import Broker, BrokerSettings
    from fluxmq.broker.session import EXPIRY_NEVER
    from fluxmq.protocol import connection
    from fluxmq.protocol.connection import _HANDLERS, MQTTConnection
    from fluxmq.protocol.flush import FlushScheduler
    from fluxmq.protocol.settings import ProtocolSettings
    from fluxmq.storage.memory import MemoryStorage
    from fluxmq.transport.tcp import SocketStream

    storage = MemoryStorage()
    broker = Broker(BrokerSettings(), storage)
    broker.restore(storage.load())
    flusher = FlushScheduler(storage)

    def connect(client_id: str):
        server_side, client_side = socket.socketpair()
        conn = MQTTConnection(
            broker, SocketStream(server_side, ("127.0.0.1", 1)), ProtocolSettings(), flusher
        )
        session, _ = broker.open_session(client_id, True, EXPIRY_NEVER)
        conn.version, conn.client_id, conn.session = 4, client_id, session
        broker.attach(session, conn, 100)
        return conn, client_side

    sub, sub_client = connect("sub")
    pub, _pub_client = connect("pub")
    broker.subscribe(sub.session, "bench/lone", 0)
    topic = b"bench/lone"
    body = len(topic).to_bytes(2, "big") + topic + b"x" * 64
    data = bytes((0x30, len(body))) + body
    n = args.count
    relay = getattr(connection, "RELAY", None)  # absent before the fast path: every packet to its handler
    relay_serve = relay.serve if relay is not None else (lambda conn, packets, start: start)
    for rnd in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        for _ in range(n):
            packets = pub.decoder.feed(data)
            # As the read loop does: the C fast path first, the handlers for what it leaves.
            for packet in packets[relay_serve(pub, packets, 0) :]:
                _HANDLERS[packet.type](pub, packet)
            callback = getattr(flusher, "_callback", None)  # run the scheduled flush here
            if callback is not None:
                callback.stop()
            flusher._flush()
            sub_client.recv(4096)
        t1 = time.perf_counter()
        for _ in range(n):  # the two syscalls alone: one send, one recv of the same size
            sub.stream.raw.send(data)
            sub_client.recv(4096)
        t2 = time.perf_counter()
        print(
            f"round {rnd}: {(t1 - t0) / n * 1e6:.2f} us per message, of which ~{(t2 - t1) / n * 1e6:.2f} us "
            f"the send and recv syscalls",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
