"""Broker CPU per lone message at 1,000 msg/s, and the latency of the same run, for A/B builds.

The latency tail of a broker on this shared 2-core machine moves with other engineers' load far
more than with the broker's code; the broker's own CPU time per message (utime + stime from /proc,
over the run) is what its code decides. Each round starts a fresh pinned fluxmq node from every
tree given (alternating, so the machine's load hits each alike), runs ``bench.loadgen --mode
latency`` against it and prints p50 / p99 and the broker CPU microseconds per delivered message.

Usage (from the repository root)::

    python -m bench.lone_cost --tree base=/tmp/base-checkout --tree new=. --rounds 3

A tree is a checkout with its compiled modules (``fluxmq/_core``, ``fluxmq/protocol``); the node runs with that tree first
on PYTHONPATH. Add ``--mosquitto`` for a Mosquitto run per round beside them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"  # noqa: A001

from bench import procinfo  # noqa: E402
from bench.brokers import REPO, FluxmqNode, Mosquitto  # noqa: E402
from bench.loadgen import parse_result_line  # noqa: E402


class _TreeNode(FluxmqNode):
    """A fluxmq node run from another checkout."""

    def __init__(self, tree: Path, **kw) -> None:
        super().__init__(**kw)
        self.tree = tree

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.tree)
        return env

    def command(self) -> list[str]:
        # Through the module, not the venv's console script: the tree on PYTHONPATH is what runs.
        cmd = super().command()
        return [sys.executable, "-c", "import sys; from fluxmq.node.cli import main; sys.exit(main())"] + cmd[
            cmd.index("--config") :
        ]


def run_once(broker, args: argparse.Namespace) -> dict:
    broker.start(timeout=60)
    try:
        pids = [broker.pid]  # and its descendants (the worker), each counted once
        # The node's own background work (timers, heartbeats) over an idle second, subtracted below.
        iu0, is0 = procinfo.tree_cpu_user_sys_s(pids)
        time.sleep(args.idle)
        iu1, is1 = procinfo.tree_cpu_user_sys_s(pids)
        idle_user, idle_sys = (iu1 - iu0) / args.idle, (is1 - is0) / args.idle
        user0, sys0 = procinfo.tree_cpu_user_sys_s(pids)
        t0 = time.monotonic()
        cmd = (["taskset", "-c", args.gen_cpus] if args.gen_cpus else []) + [
            sys.executable, "-m", "bench.loadgen", "--mode", "latency", "--rate", str(args.rate),
            "--duration", str(args.duration), "--host", "127.0.0.1", "--port", str(broker.port),
            "--timeout", "60"]  # fmt: skip
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        user1, sys1 = procinfo.tree_cpu_user_sys_s(pids)
        elapsed = time.monotonic() - t0
        user = user1 - user0 - idle_user * elapsed
        sys_ = sys1 - sys0 - idle_sys * elapsed
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        res = parse_result_line(lines[-1]) if lines else {"error": p.stderr[-300:]}
        n = int(res.get("deliveries", 0) or 0)
        res["cpu_us_per_msg"] = round((user + sys_) * 1e6 / n, 1) if n else None
        res["user_us_per_msg"] = round(user * 1e6 / n, 1) if n else None
        res["sys_us_per_msg"] = round(sys_ * 1e6 / n, 1) if n else None
        return res
    finally:
        broker.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--broker-cpus", default="1")
    ap.add_argument("--gen-cpus", default="0")
    ap.add_argument("--mosquitto", action="store_true")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each run wait up to this long for other load below a quarter of a CPU",
    )
    ap.add_argument("--idle", type=float, default=2.0, help="seconds of idle CPU measured before each run")
    args = ap.parse_args(argv)
    trees = [(name, Path(path).resolve()) for name, _, path in (t.partition("=") for t in args.tree)]
    names = [n for n, _ in trees] + (["mosquitto"] if args.mosquitto else [])
    table: dict[str, list[dict]] = {n: [] for n in names}
    for rnd in range(1, args.rounds + 1):
        for name in names:
            if name == "mosquitto":
                broker = Mosquitto(cpus=args.broker_cpus)
            else:
                tree = dict(trees)[name]
                broker = _TreeNode(tree, cpus=args.broker_cpus)
            busy = ""
            if args.wait_quiet > 0:
                _, other = procinfo.wait_quiet(0.25, args.wait_quiet)
                busy = f", other load before {other:.2f} CPUs"
            load = open("/proc/loadavg").read().split()[0]
            res = run_once(broker, args)
            table[name].append(res)
            print(
                f"round {rnd} {name}: p50 {res.get('p50_ms')} ms p99 {res.get('p99_ms')} ms "
                f"cpu {res.get('cpu_us_per_msg')} us/msg (user {res.get('user_us_per_msg')}, sys {res.get('sys_us_per_msg')}) (load {load}{busy}, {time.strftime('%H:%M:%S')})",
                flush=True,
            )
    print("\n| build | p50 ms (median) | p99 ms (median) | broker CPU us/msg (median) | user | sys |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        rows = [r for r in table[name] if "error" not in r]

        def med(key: str, rows: list[dict] = rows) -> str:
            vals = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
            return f"{statistics.median(vals):.3f}" if vals else "-"

        print(
            f"| {name} | {med('p50_ms')} | {med('p99_ms')} | {med('cpu_us_per_msg')} | "
            f"{med('user_us_per_msg')} | {med('sys_us_per_msg')} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
