"""Replicated durable queue (issue 12): publish -> PUBACK throughput and latency, beside a local queue.

Real ``fluxmq-node`` processes (tests.conftest.NodeFactory, ``storage.type: lmdb``, ``sync: batch``):

``local``
    one node, queue ``bench`` not replicated (the PUBACK waits for the turn's LMDB commit).
``raft-leader``
    three nodes on loopback, ``replication: {enabled, mode: sync, replication_factor: 3,
    min_in_sync_replicas: 2}``; the producer on the Raft leader (PUBACK after the majority has it).
``raft-follower``
    the same, the producer on a follower (``write_policy: forward``: pysyncobj forwards to the leader).

One raw MQTT 5.0 producer, no consumer (replication changes the publish path). Throughput: ``--count``
QoS 1 PUBLISHes with ``--window`` unacknowledged, PUBACKs per second. Latency: ``--rate`` msg/s
paced for ``--seconds``, publish -> PUBACK, p50/p99. Every node shares the machine's two cores.

    .venv/bin/python -m bench.raft_queue --count 20000 --rate 1000 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"  # noqa: A001

from bench.persist import _frame  # noqa: E402
from bench.queues import _utf8, connect5  # noqa: E402
from tests.conftest import NodeFactory, free_port  # noqa: E402


def _parse(buf: bytearray):
    while len(buf) >= 2:
        mult, n, i = 1, 0, 1
        while i < len(buf):
            b = buf[i]
            n += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if not b & 0x80:
                break
        else:
            return
        if len(buf) < i + n:
            return
        first, body = buf[0], bytes(buf[i:i + n])
        del buf[:i + n]
        yield first, body


def produce(port: int, count: int, window: int, rate: float = 0.0, seconds: float = 0.0) -> dict:
    s = connect5(port, f"bench-raft-{os.getpid()}-{time.monotonic_ns()}")
    s.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ)
    head = _utf8("$queue/bench/k")
    payload = b"p" * 64
    sent_at: dict[int, float] = {}
    lat: list[float] = []
    failed = 0
    sent = acked = 0
    buf = bytearray()
    t0 = time.perf_counter()
    end = t0 + seconds if rate else t0 + 300
    total = int(rate * seconds) if rate else count
    while acked + failed < total and time.perf_counter() < end + 10:
        now = time.perf_counter()
        due = total if not rate else min(total, int((now - t0) * rate) + 1)
        if sent < due and sent - acked - failed < window:
            n = min(200, due - sent, window - (sent - acked - failed))
            frames = []
            for k in range(n):
                pid = (sent + k) % 65535 + 1
                sent_at[pid] = now
                frames.append(_frame(0x32, head + struct.pack(">H", pid) + b"\x00" + payload))
            s.sendall(b"".join(frames))
            sent += n
        for _key, _ in sel.select(timeout=0.0005 if rate else 0.02):
            try:
                data = s.recv(262144)
            except BlockingIOError:
                continue
            if not data:
                raise RuntimeError("connection closed")
            buf += data
            got = time.perf_counter()
            for first, body in _parse(buf):
                if first >> 4 != 4:
                    continue
                pid = struct.unpack_from(">H", body)[0]
                if len(body) > 2 and body[2] >= 0x80:
                    failed += 1
                else:
                    acked += 1
                    lat.append(got - sent_at.pop(pid, got))
    elapsed = time.perf_counter() - t0
    s.close()
    lat.sort()
    out = {"acked": acked, "failed": failed, "rate": round(acked / elapsed)}
    if lat:
        out["p50_ms"] = round(lat[len(lat) // 2] * 1000, 2)
        out["p99_ms"] = round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 2)
    return out


def _status(node) -> dict:
    return node.http_get("/cluster/raft")[1]["groups"][0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="bench-raft-"))
    factory = NodeFactory(base)
    results = {}
    try:
        local = factory(config_text="queues:\n  - name: bench\n")
        results["local"] = {"throughput": produce(local.mqtt_port, args.count, args.window),
                            "paced": produce(local.mqtt_port, 0, args.window, args.rate, args.seconds)}
        local.stop()
        peers = [f"127.0.0.1:{free_port()}" for _ in range(3)]
        text = """
cluster:
  raft: {{enabled: true, bind_addr: "{me}", peers: {peers}}}
queues:
  - name: bench
    replication: {{enabled: true, mode: sync, replication_factor: 3, min_in_sync_replicas: 2}}
"""
        nodes = [factory(config_text=text.format(me=p, peers=json.dumps(peers)), wait_ready=False) for p in peers]
        for n in nodes:
            n.wait_ready()
        deadline = time.monotonic() + 20
        leader = None
        while leader is None and time.monotonic() < deadline:
            leader = next((n for n in nodes if _status(n)["delivering"]), None)
            time.sleep(0.1)
        follower = next(n for n in nodes if n is not leader)
        for name, node in (("raft-leader", leader), ("raft-follower", follower)):
            results[name] = {"throughput": produce(node.mqtt_port, args.count, args.window),
                             "paced": produce(node.mqtt_port, 0, args.window, args.rate, args.seconds)}
        results["entries_applied"] = _status(leader)["entries_applied"]
    finally:
        factory.close()
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
