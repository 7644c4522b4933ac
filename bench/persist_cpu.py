"""Broker CPU (user + system) per delivery of the ``bench.persist_ratio`` load, from ``/proc`` (issue 16).

One fresh node per name given (``memory``: clean sessions over the memory backend; ``lmdb``:
``storage.sync: batch`` with ``mqttload --persistent``), 400,000 messages or 8 s of
``mqttload --mode throughput --qos 1 --inflight 100``, broker on CPU 1, generator on CPU 0. Prints
the worker's user and system CPU microseconds per delivery read from ``/proc/PID/stat`` before and
after the run: the figure to compare builds by on a shared machine (it does not depend on how much
of its CPU the broker got, as long as it got most of it; a starved broker handles smaller batches
per loop turn and costs more per message). Run it from the tree to measure (the node imports fluxmq
from the current directory), alternating trees::

    cd TREE && /work/main/.venv/bin/python PATH/bench/persist_cpu.py lmdb memory
"""

from __future__ import annotations

import os
import subprocess
import sys

sys.path.insert(0, os.getcwd())

from bench import procinfo  # noqa: E402
from bench.brokers import FluxmqNode  # noqa: E402
from bench.compare import ensure_mqttload  # noqa: E402

SETS = {
    "lmdb": ["storage.type=lmdb", "storage.sync=batch", "storage.max_queued_messages=1000000"],
    "memory": ["storage.type=memory"],
}


def _cpu_ticks(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def run(kind: str, mqttload: str) -> str:
    node = FluxmqNode(cpus="1", sets=SETS[kind])
    node.start(timeout=60)
    try:
        pids = procinfo.tree(node.pid)
        pid = pids[-1] if pids else node.pid
        cmd = [
            "taskset",
            "-c",
            "0",
            mqttload,
            "--mode",
            "throughput",
            "--qos",
            "1",
            "--inflight",
            "100",
            "--count",
            "400000",
            "--duration",
            "8",
            "--host",
            "127.0.0.1",
            "--port",
            str(node.port),
            "--pid",
            str(pid),
            "--label",
            kind,
            "--timeout",
            "90",
        ] + (["--persistent"] if kind == "lmdb" else [])
        tick = 1e6 / os.sysconf("SC_CLK_TCK")
        u0, s0 = _cpu_ticks(pid)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=150).stdout
        u1, s1 = _cpu_ticks(pid)
        res = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
        fields = dict(kv.split("=", 1) for kv in res.split()[1:] if "=" in kv)
        n = int(fields["deliveries"])
        return (
            f"{kind:6} rate {fields['rate']:>7} deliveries {n} user {(u1 - u0) * tick / n:.2f} us "
            f"sys {(s1 - s0) * tick / n:.2f} us per delivery, broker_cpu {fields['broker_cpu']} "
            f"other_cpu {fields['other_cpu']} lost {fields['lost']} dups {fields['dups']}"
        )
    finally:
        node.cleanup()


def main(argv: list[str]) -> int:
    mqttload = ensure_mqttload(os.environ.get("MQTTLOAD"))
    for kind in argv or ["lmdb", "memory"]:
        print(run(kind, mqttload), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
