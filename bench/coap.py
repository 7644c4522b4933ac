"""CoAP NON publishes per second into MQTT subscribers (issue 13).

A fresh fluxmq node (``bench.brokers.FluxmqNode``, memory storage, CoAP on a free UDP port; broker
pinned to ``--broker-cpus``, generator to ``--gen-cpus``) gets ``--count`` CoAP NON POSTs to
``/bench/coap`` (QoS 0, a ``--size``-byte payload, No-Response 2 so that no 2.04 comes back, as a
fire-and-forget sensor would send them) from one UDP socket, optionally paced at ``--rate``.
``--subscribers`` raw MQTT 3.1.1 clients subscribed to the topic count the PUBLISH packets they get.

Reported per run: datagrams sent per second, deliveries per second (all subscribers together, from
the first datagram sent to the last delivery), and the share of datagrams that never arrived (UDP
drops in the kernel when the broker falls behind: CoAP NON is unacknowledged by design).

Usage::

    .venv/bin/python -m bench.coap                       # 3 runs, 200,000 datagrams, 1 and 10 subscribers
    .venv/bin/python -m bench.coap --runs 1 --count 50000 --subscribers 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import struct
import sys
import threading
import time

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"  # noqa: A001

from bench.brokers import FluxmqNode, free_port  # noqa: E402
from bench.persist import _connect, _frame, _packets  # noqa: E402
from fluxmq.coap import codec  # noqa: E402

TOPIC = "bench/coap"
SETTLE = 5.0  # seconds without a new delivery before a run ends


class Subscriber(threading.Thread):
    """A raw MQTT 3.1.1 QoS 0 subscriber counting PUBLISH packets."""

    def __init__(self, port: int, index: int) -> None:
        super().__init__(daemon=True)
        self.sock = _connect(port, f"coap-bench-sub-{index}", True)
        self.sock.sendall(_frame(0x82, struct.pack(">HH", 1, len(TOPIC)) + TOPIC.encode() + b"\x00"))
        self.count = 0
        self.last = 0.0
        self.subscribed = threading.Event()

    def run(self) -> None:
        try:
            for first, _ in _packets(self.sock, bytearray()):
                kind = first >> 4
                if kind == 3:
                    self.count += 1
                    self.last = time.perf_counter()
                elif kind == 9:
                    self.subscribed.set()
        except (OSError, RuntimeError):
            pass


def datagrams(count: int, size: int) -> list[bytes]:
    """``count`` NON POSTs, each with its own message id (the bridge de-duplicates repeated ids)."""
    template = codec.CoapMessage(
        codec.NON,
        codec.POST,
        0,
        b"",
        [
            *((codec.URI_PATH, part.encode()) for part in TOPIC.split("/")),
            (codec.NO_RESPONSE, codec.encode_uint(2)),
        ],
        b"x" * size,
    )
    base = bytearray(codec.serialize(template))
    out = []
    for i in range(count):
        mid = i & 0xFFFF
        base[2], base[3] = mid >> 8, mid & 0xFF
        out.append(bytes(base))
    return out


def run_once(args: argparse.Namespace, subscribers: int) -> dict[str, float]:
    coap_port = free_port()
    node = FluxmqNode(
        cpus=args.broker_cpus, sets=[f"server.coap.plain.addr=127.0.0.1:{coap_port}", "limits.publish_rate=0"]
    )
    with node:
        node.start()
        subs = [Subscriber(node.port, i) for i in range(subscribers)]
        for s in subs:
            s.start()
        for s in subs:
            if not s.subscribed.wait(10):
                raise RuntimeError("SUBACK not received")
        # message ids repeat every 65,536 datagrams: within EXCHANGE_LIFETIME a repeat from the same
        # port is a duplicate, so each block of 65,536 goes from its own socket (port)
        payloads = datagrams(args.count, args.size)
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range((args.count >> 16) + 1)]
        addr = ("127.0.0.1", coap_port)
        gap = 1.0 / args.rate if args.rate else 0.0
        started = time.perf_counter()
        deadline = started + args.max_seconds
        sent = 0
        for i, data in enumerate(payloads):
            try:
                socks[i >> 16].sendto(data, addr)
            except BlockingIOError:
                continue
            sent += 1
            if gap:
                target = started + sent * gap
                while time.perf_counter() < target:
                    pass
            if not i & 1023 and time.perf_counter() > deadline:
                break
        send_done = time.perf_counter()
        expected = sent * subscribers
        quiet_until = time.perf_counter() + SETTLE
        seen = 0
        while time.perf_counter() < quiet_until:
            total = sum(s.count for s in subs)
            if total >= expected:
                break
            if total != seen:
                seen = total
                quiet_until = time.perf_counter() + SETTLE
            time.sleep(0.05)
        total = sum(s.count for s in subs)
        last = max((s.last for s in subs), default=send_done)
        for s in socks:
            s.close()
        for s in subs:
            s.sock.close()
    elapsed = max(last, send_done) - started
    return {
        "sent_per_s": sent / (send_done - started),
        "deliveries_per_s": total / elapsed,
        "publishes_per_s": total / subscribers / elapsed,
        "lost": 1 - total / expected if expected else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--count", type=int, default=200_000, help="datagrams per run")
    p.add_argument("--size", type=int, default=16, help="payload bytes")
    p.add_argument("--rate", type=float, default=0.0, help="datagrams per second (0 = as fast as possible)")
    p.add_argument("--subscribers", type=int, nargs="+", default=[1, 10])
    p.add_argument("--max-seconds", type=float, default=60.0, help="bound on each run's sending time")
    p.add_argument("--broker-cpus", default="1")
    p.add_argument("--gen-cpus", default="0")
    args = p.parse_args(argv)
    if args.gen_cpus and shutil.which("taskset"):
        os.sched_setaffinity(0, {int(c) for c in args.gen_cpus.split(",")})
    print("| subscribers | payload (B) | datagrams sent/s | publishes/s | deliveries/s | lost |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.subscribers:
        runs = [run_once(args, n) for _ in range(args.runs)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"| {n} | {args.size} | {med['sent_per_s']:,.0f} | {med['publishes_per_s']:,.0f} | "
            f"{med['deliveries_per_s']:,.0f} | {med['lost']:.1%} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
