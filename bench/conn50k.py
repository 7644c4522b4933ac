"""50,000 connections held by one node with ``server.workers: 3``: broker memory per connection (issue 16).

A fresh node (``bench.brokers.FluxmqNode``, memory storage, ``server.workers`` W, ``max_connections``
per worker listener M) or a fresh Mosquitto, then C generator processes (``--client`` mode of this
module), each binding its own loopback source address 127.0.0.{2+i} so that no source address needs
more than its ~28k ephemeral ports, and each holding at most N/C sockets (under the 20,000-fd limit
of a process). Every generator opens its share in windows of ``--window`` (CONNECT sent, then every
CONNACK read: no unbounded accept storm), then waits for the driver's ``ping`` (one PINGREQ on every
connection, then every PINGRESP read) and ``close``.

The broker's memory is read at five points: before any connection, right after the last CONNACK,
parked (``--park`` s later), right after every PINGRESP, and after idling ``--idle`` s. It is
summed over the broker's process tree (arbiter + workers) in three measures from
``/proc/PID/smaps_rollup``: RSS, PSS (shared pages divided among the processes sharing them, so the
workers' shared LMDB ownership map and the forked code pages are counted once) and USS (private
pages only). Per connection = (figure - figure before) / connections held.

Usage::

    python -m bench.conn50k [--conns 50000] [--clients 4] [--workers 3] [--max-connections 19000]
        [--park 7] [--broker fluxmq|mosquitto] [--timeout 900]
    python -m bench.conn50k --broker mosquitto --conns 19000   # one process: its 20,000 fds

Bounded: every socket operation has a timeout, every wait a deadline, the whole run ``--timeout``;
it stops the broker and the generators it started (by PID) whatever happens.
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import socket
import subprocess
import sys
import time

from bench import procinfo
from bench.brokers import FluxmqNode, Mosquitto

SOCK_TIMEOUT = 60.0
KEEPALIVE = 900  # seconds: no keep-alive drop during the run (the PINGREQ is the only wake-up)


# -- generator process ---------------------------------------------------------------------------


def _connect_packet(client_id: bytes) -> bytes:
    """MQTT 3.1.1 CONNECT, clean session, keep alive KEEPALIVE."""
    body = (
        b"\x00\x04MQTT\x04\x02" + KEEPALIVE.to_bytes(2, "big") + len(client_id).to_bytes(2, "big") + client_id
    )
    return bytes([0x10, len(body)]) + body


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed by the broker")
        data += chunk
    return data


def client(src: str, port: int, count: int, tag: int, window: int) -> int:
    """Hold ``count`` connections from ``src``; obey ``ping`` / ``close`` lines on stdin."""
    procinfo.raise_nofile()
    socks: list[socket.socket] = []
    refused = 0
    t0 = time.monotonic()
    for start in range(0, count, window):
        batch = []
        for i in range(start, min(count, start + window)):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(SOCK_TIMEOUT)
            sock.bind((src, 0))
            sock.connect(("127.0.0.1", port))
            sock.sendall(_connect_packet(b"c50k-%d-%06d" % (tag, i)))
            batch.append(sock)
        for sock in batch:
            try:
                ack = _read_exact(sock, 4)
            except (OSError, ConnectionError):
                ack = b""
            if ack[:1] == b"\x20" and ack[3:4] == b"\x00":
                socks.append(sock)
            else:
                refused += 1
                sock.close()
    print(f"connected {len(socks)} refused {refused} secs {time.monotonic() - t0:.1f}", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "ping":
            t1 = time.monotonic()
            for sock in socks:
                sock.sendall(b"\xc0\x00")
            pongs = 0
            for sock in socks:
                try:
                    if _read_exact(sock, 2) == b"\xd0\x00":
                        pongs += 1
                except (OSError, ConnectionError):
                    pass
            print(f"pinged {pongs} secs {time.monotonic() - t1:.1f}", flush=True)
        elif cmd == "close":
            break
    for sock in socks:
        sock.close()
    print("closed", flush=True)
    return 0


# -- driver --------------------------------------------------------------------------------------


def smaps_kb(pid: int) -> dict[str, int]:
    """RSS, PSS and USS (Private_Clean + Private_Dirty) of one process in kB, from smaps_rollup."""
    out = {"rss": 0, "pss": 0, "uss": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key == "Rss":
                    out["rss"] = int(rest.split()[0])
                elif key == "Pss":
                    out["pss"] = int(rest.split()[0])
                elif key in ("Private_Clean", "Private_Dirty"):
                    out["uss"] += int(rest.split()[0])
    except OSError:
        pass
    return out


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def measure(root: int) -> dict:
    """Summed RSS/PSS/USS of the broker tree, and every process's fd count (the workers' spread)."""
    total = {"rss": 0, "pss": 0, "uss": 0}
    fds = []
    for pid in procinfo.tree(root):
        for k, v in smaps_kb(pid).items():
            total[k] += v
        fds.append(fd_count(pid))
    total["fds"] = fds
    return total


def _readline(proc: subprocess.Popen, deadline: float) -> str:
    """One line of a generator's output, or "" at the deadline or its exit."""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            return proc.stdout.readline().strip()
        if proc.poll() is not None:
            return ""
    return ""


def drive(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    if args.broker == "mosquitto":
        broker = Mosquitto()
    else:
        broker = FluxmqNode(
            max_connections=args.max_connections,
            sets=[f"server.workers={args.workers}", "server.tcp.plain.write_timeout=600s"],
        )
    broker.start(timeout=60)
    gens: list[subprocess.Popen] = []
    points: list[tuple[str, dict]] = []
    held = 0
    try:
        time.sleep(3.0)  # every worker up and settled
        points.append(("before", measure(broker.pid)))
        share = [args.conns // args.clients + (i < args.conns % args.clients) for i in range(args.clients)]
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        for i, n in enumerate(share):
            gens.append(subprocess.Popen(
                [sys.executable, "-m", "bench.conn50k", "--client", f"127.0.0.{2 + i}", str(broker.port), str(n),
                 str(i), str(args.window)],
                cwd=here, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))  # fmt: skip
        t0 = time.monotonic()
        for i, gen in enumerate(gens):
            line = _readline(gen, deadline)
            print(f"generator {i} (127.0.0.{2 + i}): {line or 'no answer'}", flush=True)
            if line.startswith("connected"):
                held += int(line.split()[1])
        print(f"held {held} of {args.conns} after {time.monotonic() - t0:.1f} s", flush=True)
        points.append(("connected", measure(broker.pid)))
        time.sleep(args.park)
        points.append(("parked", measure(broker.pid)))
        for gen in gens:
            gen.stdin.write("ping\n")
            gen.stdin.flush()
        pongs = 0
        for i, gen in enumerate(gens):
            line = _readline(gen, deadline)
            print(f"generator {i}: {line or 'no answer'}", flush=True)
            if line.startswith("pinged"):
                pongs += int(line.split()[1])
        print(f"PINGRESP {pongs} of {held}", flush=True)
        time.sleep(1.0)
        points.append(("after_ping", measure(broker.pid)))
        time.sleep(args.idle)
        points.append(("idle_again", measure(broker.pid)))
        base = points[0][1]
        print(
            f"\nbroker {args.broker}"
            + (f", server.workers {args.workers}" if args.broker == "fluxmq" else "")
            + f", {held} connections held, {pongs} PINGRESP"
        )
        print("| point | RSS kB | PSS kB | USS kB | RSS B/conn | PSS B/conn | USS B/conn | fds per process |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        for name, m in points:
            per = {
                k: (m[k] - base[k]) * 1024 / held if held and name != "before" else 0
                for k in ("rss", "pss", "uss")
            }
            print(
                f"| {name} | {m['rss']:,} | {m['pss']:,} | {m['uss']:,} | {per['rss']:,.0f} | {per['pss']:,.0f} | "
                f"{per['uss']:,.0f} | {' '.join(map(str, m['fds']))} |",
                flush=True,
            )
        for gen in gens:
            gen.stdin.write("close\n")
            gen.stdin.flush()
        for gen in gens:
            _readline(gen, min(deadline, time.monotonic() + 60))
        ok = held == args.conns and pongs == held
        print("RESULT ok" if ok else "RESULT incomplete")
        return 0 if ok else 1
    finally:
        for gen in gens:  # our children, by PID
            if gen.poll() is None:
                gen.kill()
            gen.wait(10)
        broker.stop()
        tail = broker.log_tail(1500)
        if tail:
            print(f"--- broker log tail ---\n{tail}")
        broker.cleanup()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--client":
        src, port, count, tag, window = argv[1], int(argv[2]), int(argv[3]), int(argv[4]), int(argv[5])
        return client(src, port, count, tag, window)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conns", type=int, default=50_000)
    p.add_argument("--clients", type=int, default=4, help="generator processes (one source address each)")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--max-connections", type=int, default=19_000, help="per worker listener")
    p.add_argument("--window", type=int, default=500, help="CONNECTs in flight per generator")
    p.add_argument("--park", type=float, default=7.0, help="seconds to idle (more than the 5 s park_after)")
    p.add_argument(
        "--idle",
        type=float,
        default=12.0,
        help="seconds after the PINGRESPs to the last point (more than the node's 10 s heap-trim check)",
    )
    p.add_argument("--broker", choices=("fluxmq", "mosquitto"), default="fluxmq")
    p.add_argument("--timeout", type=float, default=900.0)
    args = p.parse_args(argv)
    need = -(-args.conns // args.clients) + 100
    if need > resource.getrlimit(resource.RLIMIT_NOFILE)[1]:
        p.error(f"{need} sockets per generator exceed the fd limit: use more --clients")
    if -(-args.conns // args.clients) > 28_000:
        p.error("more than one source address's ephemeral ports per generator: use more --clients")
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
