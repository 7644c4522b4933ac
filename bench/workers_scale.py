"""``server.workers``: deliveries per second and broker CPU per delivery, 1 worker against N (issue 16).

For each worker count a fresh ``fluxmq-node`` (memory storage, ``bench.brokers.FluxmqNode``), then
``mqttload`` (``shared/tools/mqttload.c``) fan-out 1 -> 100 and fan-in 100 -> 1 (QoS 0, or 1 with ``--qos 1``; 64-byte
payloads), each ``--runs`` times. Besides the generator's rate it reads the CPU time of every
process of the node (arbiter and workers, ``/proc/<pid>/task/*/schedstat``, in ns) around each run: CPU us per
delivery show what the cross-worker path costs whatever the other load on a shared machine, and
``rate x cpu/delivery`` how many cores the node used; the generator's CPU share (its CPU seconds over
the run's wall time: 1.00 = one core) says how much of the machine was left to the node.

Usage::

    python -m bench.workers_scale --mqttload /path/to/mqttload [--workers 1,2] [--runs 3]
        [--window 1000] [--broker-cpus 0,1] [--gen-cpus 0] [--count N] [--detail] [--batches] [--perf]

``--detail`` prints per run and worker its CPU per delivery, the time it waited, runnable, for a
CPU, its voluntary (waits) and involuntary (preempted) context switches per 1,000 deliveries, and
its user and system us per delivery (10 ms ticks: take runs of a second of CPU, ``--count``);
``--batches`` the batches between the workers and their messages (the node's ``/metrics``).

``--marginal N`` runs a first run of N messages before each run and reports ``(CPU of the run - CPU
of the first) / (deliveries - its deliveries)``: the steady state's CPU per delivery, without the
run's fixed cost (100 connections made, subscribed, closed: ~15-40 ms of the node's CPU, 20-35 %
of a default 500,000-message fan-in run's). ``--detail`` and ``--perf`` still cover the run alone.

``--perf`` attaches ``perf stat`` to each worker for every run and prints, per worker and per 1,000
deliveries, its system calls (all, and ``sendto``/``sendmsg``/``recvfrom``/``epoll_wait``/``mremap``
apart), context switches and page faults: counts that do not depend on the other load of the machine.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
import urllib.request

from bench import procinfo
from bench.brokers import FluxmqNode, Mosquitto

MODES = {
    "fanout": ["--mode", "fanout", "--subs", "100", "--count", "10000", "--duration", "5"],
    "fanin": ["--mode", "fanin", "--pubs", "100", "--count", "500000", "--duration", "5"],
}


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its children (the arbiter and its workers)."""
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return pids


def proc_cpu(pid: int) -> tuple[float, int, int, float]:
    """CPU seconds of ``pid`` (all its threads: the scheduler's run time in ns, /proc/.../schedstat,
    rather than /proc/PID/stat's 10 ms ticks, which are coarse for a run of a fraction of a second),
    its voluntary context switches (waits: wake-ups of an idle worker), its involuntary ones
    (preemptions: another process wanted its CPU) and the seconds it waited, runnable, for a CPU
    (schedstat's second field)."""
    ns = waits = preempted = queued = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                fields = f.read().split()
                ns += int(fields[0])
                queued += int(fields[1])
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        waits += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        preempted += int(line.split()[1])
    except (OSError, ValueError):
        pass
    return ns / 1e9, waits, preempted, queued / 1e9


def forwarded(node: FluxmqNode) -> tuple[float, float]:
    """The batches and messages the node's workers received from each other so far (``/metrics``:
    ``fluxmq_cluster_received_batches`` and ``_messages``, summed over the workers)."""
    url = f"http://127.0.0.1:{node.health_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    got = dict.fromkeys(("batches", "messages"), 0.0)
    for m in re.finditer(r"^fluxmq_cluster_received_(batches|messages)(?:_total)? (\S+)$", text, re.M):
        got[m.group(1)] = float(m.group(2))
    return got["batches"], got["messages"]


def user_sys(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid`` (all its threads; /proc/.../stat, 10 ms ticks: use runs
    of a second of CPU or more, ``--count``)."""
    user = system = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
                user += int(fields[11])
                system += int(fields[12])
    except (OSError, ValueError):
        pass
    hz = os.sysconf("SC_CLK_TCK")
    return user / hz, system / hz


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its children, as /proc says now."""
    return sum(proc_cpu(p)[0] for p in tree_pids(pid))


#: what ``--perf`` counts per worker (``perf stat -e``)
PERF_EVENTS = (
    "raw_syscalls:sys_enter",
    "context-switches",
    "syscalls:sys_enter_sendto",
    "syscalls:sys_enter_sendmsg",
    "syscalls:sys_enter_recvfrom",
    "syscalls:sys_enter_epoll_wait",
    "syscalls:sys_enter_mremap",
    "page-faults",
)
PERF_NAMES = ("syscalls", "switches", "sendto", "sendmsg", "recvfrom", "epoll_wait", "mremap", "faults")


def perf_start(pids: list[int], out: str) -> list[subprocess.Popen]:
    """``perf stat`` on each of ``pids`` (CSV into ``out.PID``), counting until ``perf_stop``."""
    procs = []
    for pid in pids:
        cmd = ["perf", "stat", "-x,", "-o", f"{out}.{pid}", "-e", ",".join(PERF_EVENTS), "-p", str(pid)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(0.3)  # attached before the run starts
    return procs


def perf_stop(procs: list[subprocess.Popen], pids: list[int], out: str) -> dict[int, dict[str, int]]:
    """Stop the ``perf stat``s; per pid, the counts by ``PERF_NAMES``."""
    for proc in procs:
        proc.send_signal(signal.SIGINT)
    counts = {}
    for proc, pid in zip(procs, pids, strict=True):
        proc.wait(timeout=30)
        got = {}
        with open(f"{out}.{pid}") as f:
            for line in f:
                fields = line.strip().split(",")
                if len(fields) > 2 and fields[2] in PERF_EVENTS:
                    try:
                        got[PERF_NAMES[PERF_EVENTS.index(fields[2])]] = int(fields[0])
                    except ValueError:
                        pass
        os.unlink(f"{out}.{pid}")
        counts[pid] = got
    return counts


def run_once(
    mqttload: str,
    port: int,
    mode: str,
    window: int,
    gen_cpus: str,
    count: int = 0,
    qos: int = 0,
    pids: list[int] = (),
    gen_nice: int = 0,
) -> dict[str, str]:
    """One mqttload run: its RESULT line's fields, plus ``gen_share``: the generator's CPU seconds
    (user + system, from the kernel's account of the waited child) over the run's wall time, and
    ``split``: the TCP connections each of ``pids`` held 1.5 s into the run (``pid:count,...``)."""
    pin = ["taskset", "-c", gen_cpus] if gen_cpus else []
    if gen_nice:
        pin = ["nice", "-n", str(gen_nice), *pin]
    load = [*MODES[mode], "--qos", str(qos)]
    if count:
        load[load.index("--count") + 1] = str(count)
        load[load.index("--duration") + 1] = "30"
    cmd = [
        *pin,
        mqttload,
        *load,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--window",
        str(window),
        "--timeout",
        "60",
    ]
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    split = ""
    try:
        proc.wait(timeout=1.5)
    except subprocess.TimeoutExpired:
        split = ",".join(f"{p}:{len(procinfo.tcp_peer_ports(p) - {0})}" for p in pids)
    out = proc.communicate(timeout=90)[0]
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic() - start
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), "RESULT error=no_result")
    result = dict(kv.partition("=")[::2] for kv in line.split()[1:])
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    result["gen_share"] = f"{cpu / wall:.3f}" if wall > 0 else "0"
    result["split"] = split
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mqttload", required=True)
    p.add_argument(
        "--workers", default="1,2", help='worker counts, and "mosquitto": the same runs against it'
    )
    p.add_argument("--modes", default="fanout,fanin")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--window", type=int, default=1000)
    p.add_argument("--broker-cpus", default="0,1")
    p.add_argument("--gen-cpus", default="0")
    p.add_argument("--set", action="append", default=[], help="extra --set for the node")
    p.add_argument("--count", type=int, default=0, help="messages per run (default: the mode's)")
    p.add_argument("--qos", type=int, choices=(0, 1), default=0, help="mqttload's --qos (default 0)")
    p.add_argument(
        "--gen-nice",
        type=int,
        default=0,
        help="the generator's nice value (negative: its wakeups preempt the broker on a shared CPU, "
        "as clients on other hosts would answer at once)",
    )
    p.add_argument(
        "--marginal",
        type=int,
        default=0,
        help="before each run a run of this many messages, whose CPU and deliveries are subtracted",
    )
    p.add_argument(
        "--perf",
        action="store_true",
        help="per run and worker: system calls and context switches per 1,000 deliveries (perf stat)",
    )
    p.add_argument(
        "--batches",
        action="store_true",
        help="per run: the batches between the workers and the messages per batch (the node's /metrics)",
    )
    p.add_argument(
        "--detail",
        action="store_true",
        help="per run: each worker's CPU us per delivery and waits (voluntary context switches) per 1,000",
    )
    args = p.parse_args(argv)
    print(
        "| workers | scenario | deliveries/s (runs) | median | broker CPU us/delivery (median) | cores used "
        "| generator CPU share (median) | load avg |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---|")
    for entry in args.workers.split(","):
        if entry == "mosquitto":  # the same scenario against Mosquitto (same limits: bench.brokers)
            workers, node = 1, Mosquitto(cpus=args.broker_cpus or None)
        else:
            workers = int(entry)
            node = FluxmqNode(cpus=args.broker_cpus or None, sets=[f"server.workers={workers}", *args.set])
        node.start()
        try:
            time.sleep(1.0)  # every worker up
            for mode in args.modes.split(","):
                rates, costs, shares = [], [], []
                load = open("/proc/loadavg").read().split()[0]
                for _ in range(args.runs):
                    pids = tree_pids(node.pid)
                    out = f"/tmp/workers_scale_perf.{os.getpid()}"
                    perfs = perf_start(pids[1:] or pids, out) if args.perf else []
                    sent = forwarded(node) if args.batches and workers > 1 else (0.0, 0.0)
                    fixed_cpu = fixed_deliveries = 0.0
                    if args.marginal:
                        first = {p: proc_cpu(p)[0] for p in pids}
                        short = run_once(
                            args.mqttload,
                            node.port,
                            mode,
                            args.window,
                            args.gen_cpus,
                            args.marginal,
                            args.qos,
                            gen_nice=args.gen_nice,
                        )
                        fixed_cpu = sum(proc_cpu(p)[0] - first[p] for p in pids)
                        fixed_deliveries = int(short.get("deliveries", short.get("received", "0")) or 0)
                    before = {p: proc_cpu(p) for p in pids}
                    split0 = {p: user_sys(p) for p in pids}
                    result = run_once(
                        args.mqttload,
                        node.port,
                        mode,
                        args.window,
                        args.gen_cpus,
                        args.count,
                        args.qos,
                        pids[1:] or pids,
                        args.gen_nice,
                    )
                    shares.append(float(result["gen_share"]))
                    after = {p: proc_cpu(p) for p in pids}
                    split1 = {p: user_sys(p) for p in pids}
                    counts = perf_stop(perfs, pids[1:] or pids, out) if args.perf else {}
                    cpu = sum(after[p][0] - before[p][0] for p in pids)
                    deliveries = int(result.get("deliveries", result.get("received", "0")) or 0)
                    rates.append(float(result.get("rate", "0") or 0))
                    if deliveries:
                        if args.marginal and deliveries > fixed_deliveries:
                            costs.append((cpu - fixed_cpu) / (deliveries - fixed_deliveries) * 1e6)
                        else:
                            costs.append(cpu / deliveries * 1e6)
                        if args.detail:
                            print(
                                f"<!-- {entry} {mode}: connections per worker {result['split']}; "
                                + ", ".join(
                                    f"pid {p} {(after[p][0] - before[p][0]) / deliveries * 1e6:.3f} us "
                                    f"(waited for a CPU {(after[p][3] - before[p][3]) / deliveries * 1e6:.3f} us) "
                                    f"{(after[p][1] - before[p][1]) * 1000 / deliveries:.2f} waits "
                                    f"{(after[p][2] - before[p][2]) * 1000 / deliveries:.2f} preempted, "
                                    f"user {(split1[p][0] - split0[p][0]) / deliveries * 1e6:.3f} "
                                    f"sys {(split1[p][1] - split0[p][1]) / deliveries * 1e6:.3f}"
                                    for p in (pids[1:] or pids)
                                )
                                + " per delivery / per 1,000 -->",
                                flush=True,
                            )
                        if args.batches and workers > 1:
                            got = forwarded(node)
                            n, m = got[0] - sent[0], got[1] - sent[1]
                            print(
                                f"<!-- {workers} {mode}: {n:,.0f} batches between the workers, {m:,.0f} "
                                f"messages, {m / n if n else 0:,.0f} per batch -->",
                                flush=True,
                            )
                        for pid, got in counts.items():
                            print(
                                f"<!-- {entry} {mode}: pid {pid} per 1,000 deliveries: "
                                + ", ".join(f"{k} {v * 1000 / deliveries:.2f}" for k, v in got.items())
                                + " -->",
                                flush=True,
                            )
                med_rate = statistics.median(rates)
                med_cost = statistics.median(costs) if costs else 0.0
                print(
                    f"| {entry} | {mode} | {', '.join(f'{r:,.0f}' for r in rates)} | {med_rate:,.0f} | "
                    f"{med_cost:.3f} | {med_rate * med_cost / 1e6:.2f} | {statistics.median(shares):.2f} | {load} |",
                    flush=True,
                )
        finally:
            node.cleanup()  # (its temporary directory goes too)
    return 0


if __name__ == "__main__":
    sys.exit(main())
