"""Kernel-side figures per delivery of the ``bench.persist_ratio`` load, load-independent (issue 16).

One fresh node per kind given (``memory``: clean sessions over the memory backend; ``lmdb``:
``storage.sync: batch`` with ``mqttload --persistent``), 400,000 messages or 8 s of ``mqttload --mode
throughput --qos 1 --inflight 100``, broker on CPU 1, generator on CPU 0. Prints, per delivery, the
worker's user and system CPU and per 1,000 deliveries its minor page faults and voluntary and
involuntary context switches (``/proc/PID/stat``, ``/proc/PID/status``), and, with ``perf``
tracepoints, its system calls: all, and the ``pwrite64`` / ``writev`` LMDB's commit writes its dirty
pages with (counts, so they do not depend on how much CPU the broker got, only on how many messages
a loop turn carried). Run it from the tree to measure (the node imports fluxmq from the current
directory)::

    cd TREE && MQTTLOAD=/tmp/mqttload /work/main/.venv/bin/python PATH/bench/persist_probe.py lmdb memory
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.getcwd())

from bench import procinfo  # noqa: E402
from bench.brokers import FluxmqNode  # noqa: E402
from bench.compare import ensure_mqttload  # noqa: E402

SETS = {
    "lmdb": ["storage.type=lmdb", "storage.sync=batch", "storage.max_queued_messages=1000000"],
    "memory": ["storage.type=memory"],
}
EVENTS = [
    "raw_syscalls:sys_enter",
    "syscalls:sys_enter_pwrite64",
    "syscalls:sys_enter_writev",
    "syscalls:sys_enter_epoll_wait",
    "syscalls:sys_enter_fdatasync",
]


def _proc(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return {
        "minflt": int(fields[7]),
        "utime": int(fields[11]),
        "stime": int(fields[12]),
        "vcs": int(status["voluntary_ctxt_switches"]),
        "ncs": int(status["nonvoluntary_ctxt_switches"]),
    }


def run(kind: str, mqttload: str) -> str:
    node = FluxmqNode(cpus="1", sets=SETS[kind])
    node.start(timeout=60)
    out_dir = tempfile.mkdtemp(prefix="persist-probe-")
    try:
        pids = procinfo.tree(node.pid)
        pid = pids[-1] if pids else node.pid
        cmd = ["taskset", "-c", "0", mqttload, "--mode", "throughput", "--qos", "1", "--inflight", "100"]
        cmd += ["--count", "400000", "--duration", "8", "--host", "127.0.0.1", "--port", str(node.port)]
        cmd += ["--pid", str(pid), "--label", kind, "--timeout", "90"]
        cmd += ["--persistent"] if kind == "lmdb" else []
        perf = None
        counts = os.path.join(out_dir, "perf.txt")
        if shutil.which("perf"):
            perf = subprocess.Popen(
                ["perf", "stat", "-x,", "-e", ",".join(EVENTS), "-p", str(pid), "-o", counts]
            )
            time.sleep(0.3)
        before = _proc(pid)
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=150).stdout
        after = _proc(pid)
        if perf is not None:
            perf.send_signal(2)
            perf.wait(timeout=30)
        line = next(ln for ln in result.splitlines() if ln.startswith("RESULT "))
        res = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
        n = int(res["deliveries"])
        tick = 1e6 / os.sysconf("SC_CLK_TCK")
        d = {k: after[k] - before[k] for k in before}
        text = (
            f"{kind:6} rate {res['rate']:>7} deliveries {n} user {d['utime'] * tick / n:.2f} us "
            f"sys {d['stime'] * tick / n:.2f} us per delivery; per 1,000: minflt {d['minflt'] * 1000 / n:.2f} "
            f"vcs {d['vcs'] * 1000 / n:.2f} ncs {d['ncs'] * 1000 / n:.2f}"
        )
        if perf is not None and os.path.exists(counts):
            with open(counts) as f:
                for row in f:
                    parts = row.strip().split(",")
                    if len(parts) > 2 and parts[0].isdigit():
                        text += f" {parts[2].split(':')[-1]} {int(parts[0]) * 1000 / n:.1f}"
        return (
            text
            + f"; broker_cpu {res['broker_cpu']} other_cpu {res['other_cpu']} lost {res['lost']} dups {res['dups']}"
        )
    finally:
        node.cleanup()
        shutil.rmtree(out_dir, ignore_errors=True)


def main(argv: list[str]) -> int:
    mqttload = ensure_mqttload(os.environ.get("MQTTLOAD"))
    for kind in argv or ["lmdb", "memory"]:
        print(run(kind, mqttload), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
