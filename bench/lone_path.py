"""A lone message's critical path in the broker: from ``epoll_wait``'s return to the delivery's send.

The latency of a message travelling alone is mostly the broker's work between the wake-up that
reports the publisher's bytes and the write of the delivery to the subscriber. This measures it
from the kernel's side: ``perf record`` of the broker's raw syscall tracepoints while ``bench.loadgen
--mode latency`` runs, then, per wake-up, the time from the ``epoll_wait`` return to the next send
(``sendto``/``write``), and from that send's return to the next ``epoll_wait``; and the first part
split at the reads (``critical_split``: to the first read, the reads, from the last read to the send). Each round starts a
fresh pinned broker per tree given (and Mosquitto with ``--mosquitto``), alternating.

Usage (from the repository root; needs ``perf`` and the right to trace, e.g. root)::

    python -m bench.lone_path --tree base=/tmp/base-checkout --tree new=. --mosquitto --rounds 3

The tracepoints add ~1 µs per syscall, more for Mosquitto (11 syscalls per message) than for
fluxmq (4): the figures compare builds, and the brokers only roughly.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"  # noqa: A001

from bench.brokers import REPO, Mosquitto  # noqa: E402
from bench.loadgen import parse_result_line  # noqa: E402
from bench.lone_cost import _TreeNode  # noqa: E402

# x86-64 syscall numbers
_EPOLL_WAIT = {232, 281}  # epoll_wait, epoll_pwait
_SEND = {1, 44}  # write, sendto
_RECV = {0, 45}  # read, recvfrom
_EVENT = re.compile(r"\s(\d+\.\d+):\s+raw_syscalls:sys_(enter|exit):\s+NR (\d+)")


def critical_path(script: str) -> tuple[list[float], list[float]]:
    """From ``perf script`` text: µs from each ``epoll_wait`` return to the next send's entry, and
    from that send's return to the next ``epoll_wait`` entry."""
    to_send: list[float] = []
    after: list[float] = []
    woke = sent = None
    for line in script.splitlines():
        m = _EVENT.search(line)
        if not m:
            continue
        t, kind, nr = float(m.group(1)), m.group(2), int(m.group(3))
        if kind == "exit" and nr in _EPOLL_WAIT:
            woke = t
        elif kind == "enter" and nr in _SEND and woke is not None:
            to_send.append((t - woke) * 1e6)
            woke = None
        elif kind == "exit" and nr in _SEND:
            sent = t
        elif kind == "enter" and nr in _EPOLL_WAIT and sent is not None:
            after.append((t - sent) * 1e6)
            sent = None
    return sorted(to_send), sorted(after)


def critical_split(script: str) -> tuple[list[float], list[float], list[float]]:
    """The same path split at the reads, for each wake-up with a read before its send: µs from the
    ``epoll_wait`` return to the first read's entry (the event loop and the callback's dispatch),
    from that entry to the last read's return before the send (the reads in the kernel), and from
    there to the send's entry (decode, route, write)."""
    to_read: list[float] = []
    reading: list[float] = []
    to_send: list[float] = []
    woke = first = last = None
    for line in script.splitlines():
        m = _EVENT.search(line)
        if not m:
            continue
        t, kind, nr = float(m.group(1)), m.group(2), int(m.group(3))
        if kind == "exit" and nr in _EPOLL_WAIT:
            woke, first, last = t, None, None
        elif woke is None:
            continue
        elif kind == "enter" and nr in _RECV and first is None:
            first = t
        elif kind == "exit" and nr in _RECV:
            last = t
        elif kind == "enter" and nr in _SEND:
            if first is not None and last is not None:
                to_read.append((first - woke) * 1e6)
                reading.append((last - first) * 1e6)
                to_send.append((t - last) * 1e6)
            woke = None
    return sorted(to_read), sorted(reading), sorted(to_send)


def _q(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(len(values) * p))] if values else float("nan")


def run_once(broker, args: argparse.Namespace) -> dict:
    broker.start(timeout=60)
    out = Path(tempfile.mkdtemp(prefix="lone-path-")) / "perf.data"
    try:
        gen = subprocess.Popen(
            (["taskset", "-c", args.gen_cpus] if args.gen_cpus else [])
            + [sys.executable, "-m", "bench.loadgen", "--mode", "latency", "--rate", str(args.rate),
               "--duration", str(args.seconds + 3), "--host", "127.0.0.1", "--port", str(broker.port),
               "--timeout", "60"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        time.sleep(1.5)  # past the connects and the first messages
        perf = subprocess.Popen(
            ["perf", "record", "-q", "-e", "raw_syscalls:sys_enter,raw_syscalls:sys_exit",
             "-p", str(broker.cpu_pid), "-o", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(args.seconds)
        perf.send_signal(signal.SIGINT)
        perf.wait(30)
        stdout = gen.communicate(timeout=120)[0]
        script = subprocess.run(["perf", "script", "-i", str(out)], capture_output=True, text=True).stdout
    finally:
        broker.cleanup()
        if out.exists():
            out.unlink()
        out.parent.rmdir()
    to_send, after = critical_path(script)
    to_read, reading, read_to_send = critical_split(script)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    res = parse_result_line(lines[-1]) if lines else {}
    return {
        "n": len(to_send),
        "to_send_p50": _q(to_send, 0.5),
        "to_send_p90": _q(to_send, 0.9),
        "after_p50": _q(after, 0.5),
        "to_read_p50": _q(to_read, 0.5),
        "reading_p50": _q(reading, 0.5),
        "read_to_send_p50": _q(read_to_send, 0.5),
        "p50_ms": res.get("p50_ms"),
        "p99_ms": res.get("p99_ms"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--mosquitto", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds traced per run")
    ap.add_argument("--broker-cpus", default="1")
    ap.add_argument("--gen-cpus", default="0")
    args = ap.parse_args(argv)
    trees = [(name, Path(path).resolve()) for name, _, path in (t.partition("=") for t in args.tree)]
    names = [n for n, _ in trees] + (["mosquitto"] if args.mosquitto else [])
    if not names:
        ap.error("give at least one --tree or --mosquitto")
    for rnd in range(1, args.rounds + 1):
        for name in names:
            if name == "mosquitto":
                broker = Mosquitto(cpus=args.broker_cpus)
            else:
                broker = _TreeNode(dict(trees)[name], cpus=args.broker_cpus)
            load = open("/proc/loadavg").read().split()[0]
            r = run_once(broker, args)
            print(
                f"round {rnd} {name}: wake->send p50 {r['to_send_p50']:.0f} us p90 {r['to_send_p90']:.0f} us, "
                f"send->next wait p50 {r['after_p50']:.0f} us ({r['n']} sends); split p50s: wake->read "
                f"{r['to_read_p50']:.1f}, reads {r['reading_p50']:.1f}, read->send {r['read_to_send_p50']:.1f} us; "
                f"latency p50 {r['p50_ms']} ms "
                f"p99 {r['p99_ms']} ms (load {load}, {time.strftime('%H:%M:%S')})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
