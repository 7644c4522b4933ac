"""User-space instructions of a real node under load: ``fluxmq-node`` (memory storage, ``--set
server.workers=N``) run under callgrind (every process: the arbiter and its forked workers), one
``mqttload`` run of ``count`` messages (fan-in 100 -> 1 or fan-out 1 -> 100, window 1,000, the
generator on CPU 0), then the node stopped and the instruction totals of its processes read from
the files callgrind writes at exit (``<prefix>.<workers>.<mode>.<count>.<pid>``; the prefix is
``$WBENCH_CG_PREFIX``, default ``/tmp/wbench/cg``: files matching it are deleted at start, so give
each engineer's runs their own).

Run it for two counts and divide the difference of the totals by the difference of deliveries: the
node's instructions per delivery, with the real sockets, reads and batches (under callgrind the
node is ~50x slower, so its reads and batches are larger than at full speed). Per function, diff
the files with ``callgrind_annotate --inclusive=yes``. Caveat: which worker gets the subscriber and
how the publishers spread over the workers (the kernel's SO_REUSEPORT choice) changes from run to
run, and with it the forwarded share; compare the relay's functions per worker role rather than
totals across runs::

    for n in 20000 60000; do .venv/bin/python -m bench.workers_node_instr 2 fanin $n; done
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import time

from bench.brokers import FluxmqNode

LOAD = {"fanin": ["--mode", "fanin", "--pubs", "100"], "fanout": ["--mode", "fanout", "--subs", "100"]}


class CallgrindNode(FluxmqNode):
    """``FluxmqNode`` under ``valgrind --tool=callgrind``, output files ``<out>.<pid>``."""

    def __init__(self, out: str, **kw) -> None:
        super().__init__(**kw)
        self.out = out

    def command(self) -> list[str]:
        return [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={self.out}.%p",
            "--dump-instr=no",
        ] + super().command()


def main(argv: list[str]) -> int:
    workers, mode, count = int(argv[0]), argv[1], int(argv[2])
    prefix = os.environ.get("WBENCH_CG_PREFIX", "/tmp/wbench/cg")
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    out = f"{prefix}.{workers}.{mode}.{count}"
    for f in glob.glob(out + ".*"):
        os.unlink(f)
    node = CallgrindNode(out, cpus="0,1", sets=[f"server.workers={workers}", *argv[3:]])
    node.start(timeout=600)
    try:
        time.sleep(3)
        cmd = ["taskset", "-c", "0", "/tmp/wbench/mqttload", *LOAD[mode], "--count", str(count)]
        cmd += ["--host", "127.0.0.1", "--port", str(node.port), "--window", "1000", "--timeout", "300"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=400).stdout
        line = next((ln for ln in res.splitlines() if ln.startswith("RESULT ")), "")
        result = dict(kv.partition("=")[::2] for kv in line.split()[1:])
    finally:
        node.cleanup()
    time.sleep(3)
    totals = {}
    for f in glob.glob(out + ".*"):
        with open(f) as fh:
            found = re.search(r"^(?:summary|totals): (\d+)", fh.read(), re.M)
        if found:
            totals[os.path.basename(f)] = int(found.group(1))
    deliveries = result.get("deliveries", result.get("received"))
    print(
        f"{workers} {mode} {count} deliveries={deliveries} lost={result.get('lost')} total={sum(totals.values())}"
    )
    for name, n in sorted(totals.items()):
        print(f"  {name} {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
