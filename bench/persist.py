"""Persistent QoS 1 throughput under each ``storage.sync`` mode (issue 4).

Two scenarios, each against a fresh fluxmq node per run (``bench.brokers.FluxmqNode``, broker pinned
to ``--broker-cpus``, generator to ``--gen-cpus`` like ``bench/compare``), median of ``--runs``:

``online``
    ``bench.loadgen --mode throughput --qos 1 --persistent``: 1 publisher -> 1 subscriber with a
    persistent session (clean session 0), 100 in flight, the subscriber acknowledging; every
    delivery's inflight state goes through the store (put at send, delete at PUBACK, coalesced
    when both fall in one loop turn).
``offline``
    a subscriber with a persistent session subscribes and disconnects; one publisher sends
    ``--offline-count`` QoS 1 messages (window of 1,000 unacknowledged) that all go to the on-disk
    queue: *fill* is PUBACKs per second (each one sent only after its message is committed);
    then the subscriber reconnects and acknowledges everything: *drain* is deliveries per second.

Configurations: ``memory`` (``storage.type=memory``: persistent sessions kept in the process, the
baseline), ``lmdb/none``, ``lmdb/batch`` (the default), ``lmdb/always``.

Usage::

    .venv/bin/python -m bench.persist                 # 3 runs of everything (~3 minutes)
    .venv/bin/python -m bench.persist --runs 1 --quick

Prints a Markdown table and writes it to ``bench/out/persist-<UTC timestamp>.md``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"  # noqa: A001

from bench.brokers import FluxmqNode  # noqa: E402
from bench.loadgen import parse_result_line  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "bench" / "out"
CONFIGS = {
    "memory": ["storage.type=memory"],
    "lmdb/none": ["storage.type=lmdb", "storage.sync=none"],
    "lmdb/batch": ["storage.type=lmdb", "storage.sync=batch"],
    "lmdb/always": ["storage.type=lmdb", "storage.sync=always"],
}


def _pin(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus and shutil.which("taskset") else []


def run_online(node: FluxmqNode, args: argparse.Namespace) -> float:
    count = "50000" if args.quick else "200000"
    cmd = _pin(args.gen_cpus) + [sys.executable, "-m", "bench.loadgen", "--mode", "throughput", "--qos", "1",
                                 "--inflight", "100", "--count", count, "--duration", "5", "--persistent",
                                 "--procs", "1", "--host", "127.0.0.1", "--port", str(node.port),
                                 "--timeout", "90"]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=150)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"loadgen gave no RESULT (exit {p.returncode}): {p.stderr[-500:]}")
    res = parse_result_line(lines[-1])
    if res.get("lost", "0") not in ("0", "0.0"):
        raise RuntimeError(f"loadgen lost messages: {lines[-1]}")
    return float(res["rate"])


# -- offline scenario: a tiny raw MQTT 3.1.1 client ------------------------------------------------


def _frame(ptype: int, body: bytes) -> bytes:
    n, rl = len(body), b""
    while True:
        byte, n = n % 128, n // 128
        rl += bytes([byte | (0x80 if n else 0)])
        if not n:
            return bytes([ptype]) + rl + body


def _connect(port: int, cid: str, clean: bool) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c = cid.encode()
    s.sendall(
        _frame(
            0x10,
            b"\x00\x04MQTT\x04" + bytes([2 if clean else 0]) + b"\x00\x3c" + struct.pack(">H", len(c)) + c,
        )
    )
    ack = s.recv(4)
    if ack[:2] != b"\x20\x02" or ack[3] != 0:
        raise RuntimeError(f"CONNACK {ack!r}")
    return s


def _complete(buf: bytearray):
    """Yield (first byte, body) of every complete packet in ``buf``, removing each; stop at the
    first incomplete one (what is left stays in ``buf``)."""
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
        first, body = buf[0], bytes(buf[i : i + n])
        del buf[: i + n]
        yield first, body


def _packets(s: socket.socket, buf: bytearray):
    """Yield (first byte, body) of every complete packet, reading more as needed."""
    while True:
        yield from _complete(buf)
        data = s.recv(262144)
        if not data:
            raise RuntimeError("connection closed")
        buf += data


def run_offline(node: FluxmqNode, count: int, size: int = 64) -> tuple[float, float]:
    """(fill PUBACKs/s, drain deliveries/s) for ``count`` QoS 1 messages to an offline session."""
    cid = f"persist-bench-{os.getpid()}-{time.monotonic_ns()}"
    sub = _connect(node.port, cid, clean=False)
    topic = b"bench/offline"
    sub.sendall(_frame(0x82, struct.pack(">H", 1) + struct.pack(">H", len(topic)) + topic + b"\x01"))
    buf = bytearray()
    first, _ = next(_packets(sub, buf))
    assert first == 0x90, first
    sub.sendall(b"\xe0\x00")
    sub.close()

    pub = _connect(node.port, cid + "-pub", clean=True)
    payload = b"p" * size
    head = struct.pack(">H", len(topic)) + topic
    sent = acked = 0
    window = 1000
    buf = bytearray()
    packets = _packets(pub, buf)
    t0 = time.perf_counter()
    while acked < count:
        if sent < count and sent - acked < window:
            n = min(200, count - sent, window - (sent - acked))
            pub.sendall(
                b"".join(
                    _frame(0x32, head + struct.pack(">H", (sent + k) % 65535 + 1) + payload) for k in range(n)
                )
            )
            sent += n
            continue
        first, _ = next(packets)
        if first == 0x40:
            acked += 1
    fill = count / (time.perf_counter() - t0)
    pub.sendall(b"\xe0\x00")
    pub.close()

    t0 = time.perf_counter()
    sub = _connect(node.port, cid, clean=False)
    buf = bytearray()
    got = 0
    acks = []
    for first, body in _packets(sub, buf):
        if first >> 4 != 3:
            continue
        tlen = struct.unpack_from(">H", body)[0]
        acks.append(b"\x40\x02" + body[2 + tlen : 4 + tlen])
        got += 1
        if len(acks) >= 50 or got == count:
            sub.sendall(b"".join(acks))
            acks.clear()
        if got == count:
            break
    drain = count / (time.perf_counter() - t0)
    sub.sendall(_frame(0xE0, b""))
    sub.close()
    return fill, drain


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.persist", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="fewer messages")
    p.add_argument("--config", action="append", choices=list(CONFIGS), help="only these configurations")
    p.add_argument("--scenario", action="append", choices=["online", "offline"])
    p.add_argument("--offline-count", type=int, default=0, help="messages queued offline (default 50,000)")
    p.add_argument("--broker-cpus", default="1")
    p.add_argument("--gen-cpus", default="0")
    args = p.parse_args(argv)
    configs = args.config or list(CONFIGS)
    scenarios = args.scenario or ["online", "offline"]
    offline_count = args.offline_count or (10_000 if args.quick else 50_000)
    results: dict[tuple[str, str], list[float]] = {}
    for run in range(args.runs):
        for name in configs:
            for scenario in scenarios:
                node = FluxmqNode(
                    cpus=args.broker_cpus if shutil.which("taskset") else None,
                    sets=CONFIGS[name] + ["storage.max_queued_messages=1000000"],
                )
                node.start(timeout=60)
                try:
                    if scenario == "online":
                        rate = run_online(node, args)
                        results.setdefault((name, "online"), []).append(rate)
                        print(f"run {run + 1} {name:12} online  {rate:10.0f} deliveries/s", file=sys.stderr)
                    else:
                        fill, drain = run_offline(node, offline_count)
                        results.setdefault((name, "fill"), []).append(fill)
                        results.setdefault((name, "drain"), []).append(drain)
                        print(
                            f"run {run + 1} {name:12} offline fill {fill:8.0f}/s drain {drain:8.0f}/s",
                            file=sys.stderr,
                        )
                finally:
                    node.cleanup()
    cols = [
        ("online", "online 1->1 (deliveries/s)"),
        ("fill", f"offline fill, {offline_count} msgs (PUBACKs/s)"),
        ("drain", "offline drain (deliveries/s)"),
    ]
    cols = [c for c in cols if any((n, c[0]) in results for n in configs)]
    lines = [
        f"Persistent QoS 1, 64-byte payloads, median of {args.runs} run(s), "
        f"broker on CPU {args.broker_cpus}, generator on CPU {args.gen_cpus}.",
        "",
        "| storage | " + " | ".join(t for _, t in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name in configs:
        cells = []
        for key, _ in cols:
            vals = results.get((name, key))
            cells.append(f"{statistics.median(vals):,.0f}" if vals else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / f"persist-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.md"
    out.write_text(table)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
