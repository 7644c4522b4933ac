"""A peer stream whose batches store something: fsyncs per forwarded batch with ``storage.sync: always``.

Two nodes (LMDB, ``storage.sync: always``, static peers); ``bench.loadgen`` publishes QoS 1 on b1
to a persistent QoS 1 subscriber on b2, so every batch b1 forwards to b2 stores (the receiver
acknowledges it only after the commit that holds it: ``ClusterPeers.receive``). Counted over the
run, independent of the machine's load: b2's fsync-type syscalls (``perf stat`` on the
``syscalls:sys_enter_fdatasync/fsync/msync`` tracepoints of b2's worker), the batches and
messages b1 forwarded to b2 (its ``/metrics``), and b2's CPU (``/proc``). Wall-clock rates are
printed too (noisy on a shared machine).

``--fsync-delay-ms N`` makes every fsync/fdatasync of both nodes N ms slower (an ``LD_PRELOAD``
shim compiled with ``cc``), as a slower disk than this machine's would: the receiver's commits then
take longer than the batches' arrival, which is where a stream that waits for each commit in turn
falls behind one that applies the next batches meanwhile.

Usage::

    python -m bench.cluster_stored [--duration 10] [--window 1000] [--pubs 1] [--fsync-delay-ms 0] [--sets k=v ...]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import tempfile
import urllib.request
from pathlib import Path

from bench import procinfo
from bench.brokers import FluxmqNode, free_port
from bench.cluster_cross import loadgen, wait_peers

TRACEPOINTS = "syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync,syscalls:sys_enter_msync"


SLOW_FSYNC_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <unistd.h>
static int delay_us(void) { const char *s = getenv("SLOW_FSYNC_US"); return s ? atoi(s) : 0; }
int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    usleep(delay_us());
    return real(fd);
}
int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    usleep(delay_us());
    return real(fd);
}
"""


def slow_fsync_env(delay_ms: float, work: Path) -> dict[str, str]:
    """The environment that makes a node's fsyncs ``delay_ms`` slower (the shim built in ``work``)."""
    src, lib = work / "slow_fsync.c", work / "slow_fsync.so"
    src.write_text(SLOW_FSYNC_C)
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(src), "-ldl"], check=True)
    return {"LD_PRELOAD": str(lib), "SLOW_FSYNC_US": str(int(delay_ms * 1000))}


def forwarded(node: FluxmqNode, peer: str) -> tuple[float, float]:
    """(batches, messages) ``node`` forwarded to ``peer`` and had acknowledged."""
    with urllib.request.urlopen(f"http://127.0.0.1:{node.health_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = dict(
        re.findall(rf'^fluxmq_cluster_peer_(forwarded_\w+?)(?:_total)?\{{peer="{peer}"\}} (\S+)$', text, re.M)
    )
    return float(found.get("forwarded_batches", 0)), float(found.get("forwarded_messages", 0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--window", type=int, default=1000, help="loadgen --window (deliveries in flight)")
    p.add_argument("--pubs", type=int, default=1, help="publishers on b1 (one topic each)")
    p.add_argument("--fsync-delay-ms", type=float, default=0.0, help="each fsync this much slower")
    p.add_argument("--sets", nargs="*", default=[], help="extra --set k=v for both nodes")
    args = p.parse_args(argv)
    slow = {}
    if args.fsync_delay_ms > 0:
        slow = slow_fsync_env(args.fsync_delay_ms, Path(tempfile.mkdtemp(prefix="bench-slowfsync-")))
    ports = {"b1": free_port(), "b2": free_port()}
    peers = ",".join(f"{n}=127.0.0.1:{port}" for n, port in ports.items())
    nodes = []
    try:
        for name in ports:
            sets = [
                "cluster.enabled=true",
                f"cluster.node_id={name}",
                f"cluster.transport.bind_addr=127.0.0.1:{ports[name]}",
                f"cluster.transport.peers={peers}",
                "storage.type=lmdb",
                "storage.sync=always",
                *args.sets,
            ]
            saved = {k: os.environ.get(k) for k in slow}
            os.environ.update(slow)  # the node's environment only (FluxmqNode copies os.environ)
            try:
                nodes.append(FluxmqNode(sets=sets).start())
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        for node in nodes:
            wait_peers(node)
        a, b = nodes
        worker = b.cpu_pid
        before = forwarded(a, "b2")
        cpu0 = sum(procinfo.cpu_user_sys_s(worker))
        perf = subprocess.Popen(
            ["perf", "stat", "-x", ",", "-e", TRACEPOINTS, "-p", str(worker)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        res = loadgen(
            "--mode", "throughput", "--port", str(a.port), "--sub-port", str(b.port),
            "--pubs", str(args.pubs), "--subs", "1", "--topics", "1", "--qos", "1", "--persistent",
            "--duration", str(args.duration), "--procs", "1", "--window", str(args.window),
            "--label", "cross-node-stored",
        )  # fmt: skip
        perf.send_signal(signal.SIGINT)
        _, err = perf.communicate(timeout=30)
        cpu = sum(procinfo.cpu_user_sys_s(worker)) - cpu0
        after = forwarded(a, "b2")
        syncs = sum(float(line.split(",")[0]) for line in err.splitlines() if line and line[0].isdigit())
        batches, messages = after[0] - before[0], after[1] - before[1]
        print(
            f"b1 -> b2 (storage.sync always, fsync +{args.fsync_delay_ms:g} ms, persistent subscriber "
            f"on b2): {messages:,.0f} messages "
            f"in {batches:,.0f} batches ({messages / max(batches, 1):.1f} per batch); b2 fsyncs "
            f"{syncs:,.0f} ({syncs / max(batches, 1):.2f} per batch, {syncs / max(messages, 1) * 1000:.1f} "
            f"per 1000 messages); b2 CPU {cpu / max(messages, 1) * 1e6:.0f} us per message; "
            f"wall clock {float(res['rate']):,.0f} msg/s, lost {res.get('lost')}"
        )
    finally:
        for node in nodes:
            node.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
