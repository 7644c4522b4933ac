"""Fan-in (many publishers -> one wildcard subscriber) through one in-process listener over TCP.

A Broker with memory storage, a TCPListener on 127.0.0.1 and, in the same gevent process, ``--pubs``
MQTT 3.1.1 publishers and one subscriber on ``bench/fanin/#``. Each round every publisher writes
``--batch`` QoS ``--qos`` PUBLISHes (64-byte payloads) in one ``send``; the round ends when the
subscriber has read every delivery. The whole real path runs: read loop, decode, handler, route,
deliver, encode, flush, the sockets. Prints process CPU microseconds per message (``--rounds``
after ``--warmup``); under ``valgrind --tool=callgrind`` run it twice with different ``--rounds``
and divide the difference of the instruction counts by the difference of the messages.

Usage (from the repository root)::

    python -m bench.fanin_pipeline [--pubs 100] [--batch 10] [--rounds 200] [--qos 0]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"  # noqa: A001


def _connect_packet(client_id: str) -> bytes:
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    return bytes((0x10, len(body))) + body


def _publish_packet(topic: bytes, payload: bytes, qos: int, pid: int) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + (pid.to_bytes(2, "big") if qos else b"") + payload
    return bytes((0x30 | (qos << 1), len(body))) + body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pubs", type=int, default=100)
    ap.add_argument("--batch", type=int, default=10, help="PUBLISHes per publisher per round (one send)")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--qos", type=int, default=0, choices=(0, 1))
    args = ap.parse_args(argv)

    import gevent
    from gevent import socket

    from fluxmq.broker.broker import Broker, BrokerSettings
    from fluxmq.protocol.flush import FlushScheduler
    from fluxmq.protocol.settings import ProtocolSettings
    from fluxmq.storage.memory import MemoryStorage
    from fluxmq.transport.tcp import TCPListener

    storage = MemoryStorage()
    broker = Broker(BrokerSettings(), storage)
    broker.restore(storage.load())
    flusher = FlushScheduler(storage)
    listener = TCPListener("tcp", "127.0.0.1", 0, broker, ProtocolSettings(), flusher)
    listener.start()
    addr = listener.address

    def client(cid: str):
        s = socket.create_connection(addr)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(_connect_packet(cid))
        got = b""
        while len(got) < 4:
            got += s.recv(4 - len(got))
        return s

    sub = client("sub")
    sub.sendall(b"\x82" + bytes((2 + 2 + 13 + 1,)) + b"\x00\x01" + b"\x00\x0dbench/fanin/#" + b"\x00")
    got = b""
    while len(got) < 5:
        got += sub.recv(5 - len(got))
    pubs = [client(f"pub{i}") for i in range(args.pubs)]
    payload = b"x" * 64
    batches = []
    for i in range(args.pubs):
        topic = f"bench/fanin/{i}".encode()
        batches.append(b"".join(_publish_packet(topic, payload, args.qos, j + 1) for j in range(args.batch)))
    # What the subscriber reads per round: QoS 0 deliveries (it subscribed at QoS 0).
    per_round = sum(
        len(_publish_packet(f"bench/fanin/{i}".encode(), payload, 0, 0)) * args.batch
        for i in range(args.pubs)
    )
    acks = 4 * args.batch if args.qos else 0

    def one_round() -> None:
        for s, data in zip(pubs, batches, strict=True):
            s.sendall(data)
        left = per_round
        while left > 0:
            left -= len(sub.recv(1 << 20))
        if acks:
            for s in pubs:
                left = acks
                while left > 0:
                    left -= len(s.recv(65536))

    for _ in range(args.warmup):
        one_round()
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(args.rounds):
        one_round()
    c1, t1 = time.process_time(), time.perf_counter()
    n = args.rounds * args.pubs * args.batch
    print(
        f"{n} messages: {(c1 - c0) / n * 1e6:.2f} us CPU per message (clients included), "
        f"{(t1 - t0) / n * 1e6:.2f} us wall",
        flush=True,
    )
    for s in pubs + [sub]:
        s.close()
    listener.stop_accepting()
    gevent.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())
