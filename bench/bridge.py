"""Bridge forwarding rate: fluxmq forwards to a real Mosquitto (issue 14).

A fluxmq node (``bench.brokers.FluxmqNode``) has one bridge ``out`` on ``bench/#`` to a Mosquitto
(``bench.brokers.Mosquitto``). A raw-socket publisher sends ``--count`` messages to fluxmq; a
raw-socket subscriber on Mosquitto (QoS 0) counts what arrives. The rate is messages per second
from the first publish to the last arrival. At QoS 1 the link publishes QoS 1 to Mosquitto and a
message leaves the bridge's outbound store only at Mosquitto's PUBACK; the publisher keeps 100
PUBLISHes unacknowledged. Scenarios: QoS 0 and QoS 1 with memory storage, QoS 1 on a 5.0 link,
QoS 1 with LMDB (the outbound store on disk). Median of ``--runs``; every run is bounded by ``--timeout``.

Usage::

    .venv/bin/python -m bench.bridge                  # 3 runs of each scenario (~1 minute)
    .venv/bin/python -m bench.bridge --runs 1 --count 20000
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"  # noqa: A001

from bench.brokers import FluxmqNode, Mosquitto  # noqa: E402
from fluxmq._core import codec as c  # noqa: E402

WINDOW = 100
SCENARIOS = {  # name: (QoS, storage.type, link protocol_version)
    "QoS 0, memory, 3.1.1 link": (0, "memory", "3.1.1"),
    "QoS 1, memory, 3.1.1 link": (1, "memory", "3.1.1"),
    "QoS 1, memory, 5.0 link (marker property on every message)": (1, "memory", "5.0"),
    "QoS 1, lmdb (outbound store on disk), 3.1.1 link": (1, "lmdb", "3.1.1"),
}


def _connect(port: int, client_id: str) -> tuple[socket.socket, c.Decoder]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(c.encode(c.Connect(client_id, True, 60, 4), 4))
    decoder = c.Decoder(version=4)
    while True:
        packets = decoder.feed(sock.recv(65536))
        if packets:
            assert isinstance(packets[0], c.Connack) and packets[0].reason_code == 0, packets
            return sock, decoder


class Subscriber(threading.Thread):
    """Counts PUBLISHes on ``bench/#``; ``first``/``last`` are arrival times of the first/last one."""

    def __init__(self, port: int, want: int, timeout: float) -> None:
        super().__init__(daemon=True)
        self.sock, self.decoder = _connect(port, "bench-sub")
        self.sock.sendall(c.encode(c.Subscribe(1, [c.Subscription("bench/#", 0)]), 4))
        while not any(isinstance(p, c.Suback) for p in self.decoder.feed(self.sock.recv(65536))):
            pass
        self.want = want
        self.timeout = timeout
        self.count = 0
        self.last = 0.0
        self.probe = threading.Event()

    def run(self) -> None:
        self.sock.settimeout(self.timeout)
        try:
            while self.count < self.want:
                data = self.sock.recv(1 << 20)
                if not data:
                    return
                for p in self.decoder.feed(data):
                    if type(p) is c.Publish:
                        if p.topic == "bench/probe":
                            self.probe.set()
                        else:
                            self.count += 1
                self.last = time.perf_counter()
        except TimeoutError:
            return


def publish(port: int, count: int, qos: int) -> float:
    """Publish ``count`` messages; returns the start time."""
    sock, decoder = _connect(port, "bench-pub")
    payload = b"x" * 64
    start = time.perf_counter()
    if qos == 0:
        one = c.encode_publish("bench/m", payload, 0, False, False, 0, None, 4)
        for i in range(0, count, 500):
            sock.sendall(one * min(500, count - i))
    else:
        sent = acked = 0
        while acked < count:
            n = min(WINDOW - (sent - acked), count - sent)
            if n > 0:
                sock.sendall(
                    b"".join(
                        c.encode_publish("bench/m", payload, 1, False, False, (sent + k) % 65535 + 1, None, 4)
                        for k in range(n)
                    )
                )
                sent += n
            acked += sum(1 for p in decoder.feed(sock.recv(65536)) if type(p) is c.Puback)
    sock.close()
    return start


def run_once(
    qos: int, storage: str, version: str, count: int, timeout: float, cpus: tuple[str | None, str | None]
) -> dict:
    mosq = Mosquitto(cpus=cpus[1]).start()
    bridge = [
        {
            "name": "bench",
            "address": f"127.0.0.1:{mosq.port}",
            "protocol_version": version,
            "max_queued_messages": 1_000_000,
            "reconnect": {"initial": 0.1, "max": 0.5},
            "topics": [{"pattern": "bench/#", "direction": "out", "qos": qos}],
        }
    ]
    node = FluxmqNode(cpus=cpus[0], sets=[f"bridges={json.dumps(bridge)}", f"storage.type={storage}"]).start()
    try:
        sub = Subscriber(mosq.port, count, timeout)
        probe_sock, _ = _connect(node.port, "bench-probe")
        deadline = time.monotonic() + timeout
        sub.start()
        while not sub.probe.is_set():  # the bridge is connected once a probe gets through
            if time.monotonic() > deadline:
                raise RuntimeError("the bridge never connected")
            probe_sock.sendall(c.encode_publish("bench/probe", b"", 0, False, False, 0, None, 4))
            sub.probe.wait(0.2)
        probe_sock.close()
        start = publish(node.port, count, qos)
        sub.join(timeout)
        elapsed = (sub.last or time.perf_counter()) - start
        return {"received": sub.count, "rate": sub.count / elapsed if elapsed > 0 else 0.0}
    finally:
        node.cleanup()
        mosq.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--count", type=int, default=50_000)
    ap.add_argument("--timeout", type=float, default=60.0, help="bound of one run, seconds")
    ap.add_argument("--broker-cpus", default=None, help="taskset CPUs of fluxmq (e.g. 1)")
    ap.add_argument("--peer-cpus", default=None, help="taskset CPUs of Mosquitto (e.g. 0)")
    args = ap.parse_args(argv)
    print(f"| scenario | forwarded (msg/s, median of {args.runs}) | runs | received / sent |")
    print("|---|---:|---|---|")
    for name, (qos, storage, version) in SCENARIOS.items():
        results = [
            run_once(qos, storage, version, args.count, args.timeout, (args.broker_cpus, args.peer_cpus))
            for _ in range(args.runs)
        ]
        rates = [r["rate"] for r in results]
        received = min(r["received"] for r in results)
        print(
            f"| {name} | {statistics.median(rates):,.0f} | {', '.join(f'{r:,.0f}' for r in rates)} "
            f"| {received:,} / {args.count:,} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
