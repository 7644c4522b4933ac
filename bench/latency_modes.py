"""Where the two modes of the lone-message p50 come from: the machine, the generator or the placement.

On the 2-vCPU KVM guest of bench/RESULTS.md the latency scenario's p50 is bimodal run to run for
both brokers (about 0.05 or 0.18 ms).  This runs the latency mode (1,000 msg/s, 5 s) against a fresh
Mosquitto and a fresh fluxmq node per run, alternating, under several placements:

``pin``     broker on CPU 1, generator on CPU 0 (bench/compare's default)
``same``    broker and generator on CPU 1
``nopin``   no pinning (the scheduler places both)
``spin0``   as ``pin``, plus a busy loop at nice 19 on CPU 0 for the run (the generator's vCPU never halts)
``spin1``   as ``pin``, the busy loop on CPU 1 (the broker's vCPU never halts)

and, as the machine's own reference without any broker, ``pingpong``: one byte over TCP loopback
every 1 ms from CPU 0 to an echo on CPU 1 and back (two cross-CPU wake-ups, as a lone message's
publish and delivery).  Each line gives the p50 / p90 / p99 per run (ms; pingpong's round trip;
mqttload prints no p90: -1)::

    python -m bench.latency_modes --rounds 3 --generator mqttload --mqttload /tmp/wbench/mqttload
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench import procinfo
from bench.brokers import FluxmqNode, Mosquitto
from bench.compare import parse_result_line

REPO = Path(__file__).resolve().parent.parent
#: (broker CPUs, generator CPUs, CPU of the nice-19 busy loop or None)
PLACEMENTS = {
    "pin": ("1", "0", None),
    "same": ("1", "1", None),
    "nopin": ("", "", None),
    "spin0": ("1", "0", "0"),
    "spin1": ("1", "0", "1"),
}


def spinner(cpu: str, seconds: float) -> subprocess.Popen:
    """A busy loop on ``cpu`` at nice 19 that ends by itself after ``seconds``."""
    code = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass\n"
    return subprocess.Popen(["taskset", "-c", cpu, "nice", "-n", "19", sys.executable, "-c", code])


def pingpong(cpu_a: str, cpu_b: str, count: int = 3000) -> tuple[float, float, float]:
    """p50, p90 and p99 (ms) of a 1-byte TCP loopback round trip every 1 ms, A on ``cpu_a``, echo on ``cpu_b``."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    pid = os.fork()
    if pid == 0:  # the echo
        try:
            if cpu_b:
                os.sched_setaffinity(0, {int(cpu_b)})
            c = socket.create_connection(ls.getsockname())
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.settimeout(10)
            while True:
                d = c.recv(16)
                if not d:
                    break
                c.send(d)
        finally:
            os._exit(0)
    old = os.sched_getaffinity(0)
    try:
        if cpu_a:
            os.sched_setaffinity(0, {int(cpu_a)})
        s, _ = ls.accept()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(10)
        rtt = []
        t_next = time.monotonic_ns()
        for _ in range(count + 200):
            t_next += 1_000_000
            left = t_next - time.monotonic_ns()
            if left > 0:
                time.sleep(left / 1e9)
            t = time.monotonic_ns()
            s.send(b"x")
            s.recv(16)
            rtt.append(time.monotonic_ns() - t)
        s.close()
    finally:
        os.sched_setaffinity(0, old)
        ls.close()
        os.waitpid(pid, 0)
    r = sorted(rtt[200:])
    return r[len(r) // 2] / 1e6, r[int(len(r) * 0.9)] / 1e6, r[int(len(r) * 0.99)] / 1e6


def latency_run(broker: str, placement: str, args: argparse.Namespace) -> dict:
    """One latency-mode run against a fresh broker under ``placement``; the RESULT fields."""
    bcpus, gcpus, spin = PLACEMENTS[placement]
    if broker == "pingpong":
        sp = spinner(spin, 8) if spin else None
        try:
            p50, p90, p99 = pingpong(gcpus, bcpus)
        finally:
            if sp is not None:
                sp.wait(timeout=30)
        return {"p50_ms": p50, "p90_ms": p90, "p99_ms": p99}
    b = Mosquitto(cpus=bcpus or None) if broker == "mosquitto" else FluxmqNode(cpus=bcpus or None)
    b.start(timeout=60)
    sp = None
    try:
        pin = ["taskset", "-c", gcpus] if gcpus else []
        common = ["--mode", "latency", "--rate", "1000", "--duration", "5", "--port", str(b.port)]
        if args.generator == "mqttload":
            cmd = pin + [args.mqttload] + common + ["--pid", str(b.cpu_pid)]
        else:
            cmd = pin + [sys.executable, "-m", "bench.loadgen"] + common + ["--pid", str(b.pid)]
        sp = spinner(spin, 8) if spin else None
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        return parse_result_line(lines[-1]) if lines else {"error": p.stderr[-300:]}
    finally:
        if sp is not None:
            sp.wait(timeout=30)
        b.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--placements", default=",".join(PLACEMENTS))
    p.add_argument("--brokers", default="pingpong,mosquitto,fluxmq")
    p.add_argument("--generator", choices=("loadgen", "mqttload"), default="mqttload")
    p.add_argument("--mqttload", default="/tmp/wbench/mqttload")
    p.add_argument("--wait-quiet", type=float, default=15.0)
    p.add_argument("--quiet-cpus", type=float, default=0.25)
    a = p.parse_args(argv)
    placements = a.placements.split(",")
    brokers = a.brokers.split(",")
    results: dict[tuple[str, str], list[str]] = {}
    for rnd in range(a.rounds):
        # the order of placements turns each round, so no placement always follows the same one
        order = placements[rnd % len(placements) :] + placements[: rnd % len(placements)]
        for placement in order:
            for broker in brokers:
                _, busy = procinfo.wait_quiet(a.quiet_cpus, a.wait_quiet)
                res = latency_run(broker, placement, a)
                cell = (
                    f"{float(res['p50_ms']):.3f}/{float(res.get('p90_ms', -1)):.3f}/{float(res['p99_ms']):.3f}"
                    if "p50_ms" in res
                    else f"ERR({str(res.get('error'))[:40]})"
                )
                results.setdefault((placement, broker), []).append(f"{cell} (busy {busy:.2f})")
                print(f"round {rnd + 1} {placement} {broker}: {cell} busy before {busy:.2f}", flush=True)
    print("\nplacement | broker | p50/p90/p99 ms per run (other load before the run, CPUs)")
    for placement in placements:
        for broker in brokers:
            print(f"{placement} | {broker} | {' ; '.join(results.get((placement, broker), []))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
