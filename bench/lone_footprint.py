"""The memory a lone message touches in a broker: pages referenced per mapping, less an idle baseline.

For each broker (Mosquitto; a fluxmq node, whose worker process is measured) started as
``bench/compare`` starts it (``bench/brokers.py``, pinned to ``--cpu``), this tool connects a
subscriber and a publisher (raw MQTT 3.1.1 sockets in this process, QoS 0, a 64-byte payload as in
the latency scenario) and, per round and per K in ``--messages``:

1. writes ``1`` to ``/proc/PID/clear_refs`` (the kernel clears the accessed bits of the process's
   pages and flushes its TLB), then sends K lone messages, each after the previous one arrived
   and ``--gap`` ms later, then reads ``Referenced:`` of every mapping in ``/proc/PID/smaps``;
2. the same with no message: clear, wait as long as step 1 took, read (the idle baseline:
   the broker's own timers, the heartbeat, the arbiter's looks).

A page counts once however often it was touched, so K = 1 is the footprint of one cold message
(what a message that finds nothing in the caches or the TLB brings back), and K = 10, 100 show
whether later messages touch new pages (allocations walking through memory) or the same ones.
The figures are KiB (4 KiB pages; a huge page counts whole), medians over ``--rounds``, grouped:
the interpreter's text and data, each fluxmq ``.so`` (text / data), gevent's (``corecext`` holds
libev), libc, other libraries, ``[heap]``, anonymous mappings (pymalloc's arenas, thread stacks,
mmap'd buffers), ``[stack]``, the rest.  ``--detail`` prints every mapping that moved.

Usage (from the repository root)::

    python -m bench.lone_footprint [--brokers mosquitto,fluxmq] [--messages 1,10,100] [--rounds 7]
        [--set KEY=VALUE] [--env NAME=VALUE] [--tree NAME=DIR] [--detail]

Kernel notes: DAMON (``kdamond``) also reads and clears accessed bits, but it keeps what it
cleared in the page's "young" flag, which smaps' ``Referenced`` counts; reading smaps does not set
accessed bits.  No PMU is needed.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import re
import socket
import statistics
import struct
import sys
import time
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"  # noqa: A001

from bench import brokers as brokers_mod
from bench.brokers import FluxmqNode, Mosquitto
from bench.persist import _complete
from bench.persist import _frame as _packet

TOPIC = b"footprint/lone"
PAYLOAD = b"x" * 64


def _str(b: bytes) -> bytes:
    return struct.pack("!H", len(b)) + b


class Client:
    """A blocking MQTT 3.1.1 client, just enough for CONNECT, SUBSCRIBE and QoS 0 PUBLISH."""

    def __init__(self, port: int, client_id: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        body = _str(b"MQTT") + bytes([4, 0x02]) + struct.pack("!H", 600) + _str(client_id.encode())
        self.sock.sendall(_packet(0x10, body))
        kind, _ = self.read_packet()
        if kind >> 4 != 2:
            raise RuntimeError(f"no CONNACK: {kind:#x}")

    def read_packet(self) -> tuple[int, bytes]:
        while True:
            for kind, body in _complete(self.buf):  # removes the packet it yields from the buffer
                return kind, body
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed")
            self.buf += chunk

    def subscribe(self, topic: bytes) -> None:
        self.sock.sendall(_packet(0x82, struct.pack("!H", 1) + _str(topic) + b"\x00"))
        kind, _ = self.read_packet()
        if kind >> 4 != 9:
            raise RuntimeError(f"no SUBACK: {kind:#x}")

    def publish(self, topic: bytes, payload: bytes) -> None:
        self.sock.sendall(_packet(0x30, _str(topic) + payload))

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")
        except OSError:
            pass
        self.sock.close()


def clear_refs(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("1")


_HEAD = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \d+\s*(.*)$")


def smaps(pid: int, path: str | None = None) -> list[tuple[str, str, int, int, int, int]]:
    """Per mapping: (path or [kind] or '', perms, size KiB, Referenced KiB, AnonHugePages KiB, start);
    ``path``: a saved smaps file instead of the process's."""
    out: list[tuple[str, str, int, int, int]] = []
    cur: list = []
    with open(path or f"/proc/{pid}/smaps") as f:
        for line in f:
            m = _HEAD.match(line)
            if m:
                if cur:
                    out.append(tuple(cur))  # type: ignore[arg-type]
                start, end = int(m.group(1), 16), int(m.group(2), 16)
                cur = [m.group(4).strip(), m.group(3), (end - start) // 1024, 0, 0, start]
            elif line.startswith("Referenced:"):
                cur[3] = int(line.split()[1])
            elif line.startswith("AnonHugePages:"):
                cur[4] = int(line.split()[1])
    if cur:
        out.append(tuple(cur))  # type: ignore[arg-type]
    return out


def reference_bits_follow_writes(pages: int = 16) -> bool:
    """True when this kernel and machine report what the figures rely on: after ``clear_refs``, a
    mapping's ``Referenced`` is exactly the pages written since. Probed on a private anonymous
    mapping of this process: every page faulted in, the bits cleared, every other page written.
    (On some virtual machines they do not: seen 16-28 KiB for 32 written, and more than written
    for sparser writes; there every figure of this tool would be wrong.)"""
    m = mmap.mmap(-1, pages * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_DONTDUMP)  # a flag of its own: never merged with a neighbouring mapping
    try:
        start = ctypes.addressof(ctypes.c_char.from_buffer(m))
        for i in range(pages):
            m[i * 4096] = 1
        pid = os.getpid()
        clear_refs(pid)
        for i in range(0, pages, 2):
            m[i * 4096] = 2
        refs = [ref for _p, _perms, size, ref, _ahp, s in smaps(pid) if s <= start < s + size * 1024]
        return refs == [pages // 2 * 4]
    finally:
        m.close()


def group_of(path: str, perms: str) -> str:
    """A mapping's group: what it is, and text (x) or data."""
    kind = "text" if "x" in perms else "data"
    if not path:
        return "anon (arenas, mmap'd buffers, thread stacks)"
    if path.startswith("["):
        return path
    name = os.path.basename(path)
    if re.match(r"python3(\.\d+)?$", name) or name.startswith("libpython"):
        return f"python/libpython {kind}"
    if "/fluxmq/" in path:
        return f"fluxmq {name.split('.')[0]} {kind}"
    if "/gevent/" in path or "/greenlet/" in path:
        return f"{'gevent' if '/gevent/' in path else 'greenlet'} {name.split('.')[0]} {kind}"
    if "mosquitto" in name:
        return f"mosquitto {kind}"
    if name.startswith("libc.so") or name.startswith("libc-"):
        return f"libc {kind}"
    if name.startswith("ld-linux"):
        return f"ld.so {kind}"
    if "/lib-dynload/" in path or "site-packages" in path:
        return f"other Python extensions {kind}"
    if ".so" in name:
        return f"other libraries {kind}"
    return f"other files {kind}"


def referenced(pid: int) -> tuple[dict[str, int], dict[str, int], int]:
    """Referenced KiB per group, per mapping (path perms), and the total AnonHugePages."""
    groups: dict[str, int] = defaultdict(int)
    maps: dict[str, int] = defaultdict(int)
    huge = 0
    for path, perms, size, ref, ahp, start in smaps(pid):
        groups[group_of(path, perms)] += ref
        maps[f"{path or f'(anon {start:#x}, {size} KiB)'} {perms}"] += ref
        huge += ahp
    return groups, maps, huge


HUGE = 2 << 20
MADV_COLLAPSE = 25
SYS_PROCESS_MADVISE = 440  # x86_64


def collapse(pid: int) -> tuple[int, int]:
    """Ask the kernel to put another process's anonymous read-write memory (the heap, pymalloc's arenas,
    mmap'd buffers) into 2 MiB pages now (``process_madvise(MADV_COLLAPSE)``, Linux 6.1+): every
    2 MiB-aligned range that lies inside one mapping.  (ranges asked, ranges collapsed)."""
    import ctypes  # noqa: PLC0415

    class IoVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.pidfd_open(pid)
    asked = done = 0
    try:
        for path, perms, size, _ref, _ahp, start in smaps(pid):
            if perms != "rw-p" or path not in ("", "[heap]"):
                continue
            a = (start + HUGE - 1) // HUGE * HUGE
            for lo in range(a, (start + size * 1024) // HUGE * HUGE, HUGE):
                iov = IoVec(lo, HUGE)
                asked += 1
                if libc.syscall(SYS_PROCESS_MADVISE, fd, ctypes.byref(iov), 1, MADV_COLLAPSE, 0) == HUGE:
                    done += 1
    finally:
        os.close(fd)
    return asked, done


def measure(pid: int, pub: Client, sub: Client, k: int, gap: float) -> tuple[dict, dict, float]:
    """Clear, send k lone messages (each after the last arrived, ``gap`` s apart), read."""
    clear_refs(pid)
    t0 = time.monotonic()
    for _ in range(k):
        time.sleep(gap)
        pub.publish(TOPIC, PAYLOAD)
        kind, _ = sub.read_packet()
        if kind >> 4 != 3:
            raise RuntimeError(f"not a PUBLISH: {kind:#x}")
    time.sleep(gap)
    took = time.monotonic() - t0
    g, m, _ = referenced(pid)
    return g, m, took


def idle(pid: int, seconds: float) -> tuple[dict, dict]:
    clear_refs(pid)
    time.sleep(seconds)
    g, m, _ = referenced(pid)
    return g, m


def run_broker(name: str, args: argparse.Namespace, tree: str | None) -> dict[int, dict]:
    saved = brokers_mod.REPO
    if tree:
        brokers_mod.REPO = Path(tree)
    try:
        b = Mosquitto(cpus=args.cpu) if name == "mosquitto" else FluxmqNode(cpus=args.cpu, sets=args.sets)
        if args.env and name != "mosquitto":
            extra = dict(kv.split("=", 1) for kv in args.env)
            base_env = b.env
            b.env = lambda: {**(base_env() or os.environ), **extra}  # type: ignore[method-assign]
        b.start(timeout=60)
    finally:
        brokers_mod.REPO = saved
    out: dict[int, dict] = {}
    try:
        pid = b.cpu_pid
        sub = Client(b.port, f"fp-sub-{os.getpid()}")
        sub.subscribe(TOPIC)
        pub = Client(b.port, f"fp-pub-{os.getpid()}")
        measure(pid, pub, sub, 20, args.gap)  # warm: the route, the buffers
        if args.collapse and args.name in args.collapse:
            print(f"{args.name}: MADV_COLLAPSE {collapse(pid)} (2 MiB ranges asked, collapsed)", flush=True)
        time.sleep(0.5)
        _, _, huge = referenced(pid)
        for k in args.messages:
            rows = []
            for _ in range(args.rounds):
                g, m, took = measure(pid, pub, sub, k, args.gap)
                gi, mi = idle(pid, took)
                rows.append((g, gi, m, mi))
            out[k] = {"rows": rows, "huge": huge}
        pub.close()
        sub.close()
    finally:
        b.stop()
        b.cleanup()
    return out


def med(vals: list[int]) -> float:
    return statistics.median(vals) if vals else 0.0


def report(name: str, res: dict[int, dict], detail: bool) -> None:
    for k, r in res.items():
        rows = r["rows"]
        tot = [sum(g.values()) for g, _, _, _ in rows]
        tot_i = [sum(gi.values()) for _, gi, _, _ in rows]
        net = [a - b for a, b in zip(tot, tot_i, strict=True)]
        print(f"{name} K={k}: referenced {med(tot):.0f} KiB with the messages, {med(tot_i):.0f} idle, "
              f"net median {med(net):.0f} KiB ({med(net) / 4:.0f} pages; rounds {sorted(net)}); "
              f"AnonHugePages {r['huge']} KiB")  # fmt: skip
        groups = sorted({x for g, gi, _, _ in rows for x in (*g, *gi)})
        lines = []
        for grp in groups:
            a = med([g.get(grp, 0) for g, _, _, _ in rows])
            b = med([gi.get(grp, 0) for _, gi, _, _ in rows])
            if a or b:
                lines.append((a - b, grp, a, b))
        for d, grp, a, b in sorted(lines, key=lambda x: (-x[0], x[1])):
            print(f"    {grp:52s} {a:7.0f} {b:7.0f} {d:+7.0f} KiB")
        if detail:
            keys = sorted({x for _, _, m, mi in rows for x in (*m, *mi)})
            for key in keys:
                a = med([m.get(key, 0) for _, _, m, _ in rows])
                b = med([mi.get(key, 0) for _, _, _, mi in rows])
                if a != b:
                    print(f"      {a - b:+6.0f} {a:6.0f} {b:6.0f}  {key}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokers", default="mosquitto,fluxmq", help="mosquitto, fluxmq and --tree names")
    ap.add_argument(
        "--tree", action="append", default=[], help="NAME=DIR: a fluxmq checkout run as broker NAME"
    )
    ap.add_argument("--messages", default="1,10,100", help="K values (comma list)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--gap", type=float, default=2.0, help="ms between a message's arrival and the next send")
    ap.add_argument("--cpu", default="1", help="the broker's CPU (taskset)")
    ap.add_argument("--set", action="append", default=[], dest="sets", help="fluxmq --set KEY=VALUE")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE in the fluxmq node's environment")
    ap.add_argument("--collapse", default="", help="comma list of brokers whose anonymous memory is put "
                    "into 2 MiB pages after the warm-up (process_madvise MADV_COLLAPSE)")  # fmt: skip
    ap.add_argument("--detail", action="store_true", help="every mapping whose figure moved")
    args = ap.parse_args(argv)
    args.messages = [int(x) for x in args.messages.split(",") if x]
    args.collapse = [x for x in args.collapse.split(",") if x]
    args.gap /= 1000.0
    if not reference_bits_follow_writes():
        print(
            "lone_footprint: this kernel's page reference bits do not follow writes after clear_refs "
            "(probed on a mapping of this process), so no figure would be right here",
            file=sys.stderr,
        )
        return 2
    trees = dict(t.split("=", 1) for t in args.tree)
    names = [n for n in args.brokers.split(",") if n]
    names += [n for n in trees if n not in names]
    for name in names:
        kind = "mosquitto" if name == "mosquitto" else "fluxmq"
        args.name = name
        res = run_broker(kind, args, trees.get(name))
        report(name, res, args.detail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
