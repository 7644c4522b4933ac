"""What the slowest lone messages have in common: per-sample latencies of the latency scenario.

``bench/compare --scenario latency`` reports one p50 / p99 per run.  This tool builds a copy of
shared/tools/mqttload.c with a per-sample dump added (into bench/out/; the shared source is not
edited: the patch is the few anchored insertions of ``PATCH``), runs it in latency mode (1,000
msg/s) against Mosquitto and fluxmq nodes placed as ``bench/compare --latency-cpus`` places them
(broker and generator on one CPU), alternating, and prints per run the distribution and which of the
samples at or above the p99 overlapped the generator's own reads of the broker's RSS (every 200 ms).

With ``--perf light`` it also records the CPU's scheduler switches and wake-ups and the user page
faults (``perf record -k mono``: the samples' CLOCK_MONOTONIC stamps line up with the events) and
prints, per run:

- ``clean``: the samples during whose flight only the broker and the generator ran on the CPU (no
  other process: on a shared machine the rest is the neighbours), their p50 / p99;
- ``broker``: the broker's CPU time within each clean sample's flight, p50 / p98, and the same by
  the sample's index modulo 64 (``--period``): the phase whose median is highest against the median
  of the others' medians (fluxmq timed 1 publish in 64 for its latency histogram);
- what the samples at or above the p99 share: an RSS read of the generator, another process in the
  flight, page faults of the broker, the broker not preempted by the woken generator (its loop's
  tail is in the sample), more than one switch each way.

``--perf full`` adds every system call (which slows Mosquitto, ~11 a message, more than fluxmq, 3:
compare the brokers with ``light``).  ``--tree NAME=DIR`` runs the fluxmq of another checkout
(compiled) as broker ``NAME`` too::

    python -m bench.latency_tail --runs 3 --perf light [--tree base=/work/main] [--keep DIR]

A dump is ``send_ns recv_ns`` per sample (the send time stamped in the payload just before the
write, the receive time when the subscriber's ``epoll_wait`` returned), after a header line
``# t_first_pub_ns rate``; lines ``R t0 t1`` mark the generator's reads of the broker's RSS.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import brokers as brokers_mod
from bench import procinfo
from bench.brokers import FluxmqNode, Mosquitto
from bench.compare import MQTTLOAD_SRC, OUT_DIR, parse_result_line

#: (anchor in mqttload.c, text inserted after it, or None: DUMP / NO_RSS before it); each occurs once
PATCH = [
    (
        "static long lat_n, lat_cap;\n",
        "static uint64_t *tr_send, *tr_recv, tr_rss[8192];\nstatic long tr_rss_n;\n",
    ),
    (
        "    if (lat_us && lat_n < lat_cap) {\n",
        "        if (tr_send) { tr_send[lat_n] = ts; tr_recv[lat_n] = now_cache; }\n",
    ),
    (
        "        lat_us = xmalloc((size_t)lat_cap * sizeof(uint32_t));\n",
        '        if (getenv("MQTTLOAD_DUMP")) {\n'
        "            tr_send = xmalloc((size_t)lat_cap * sizeof(uint64_t));\n"
        "            tr_recv = xmalloc((size_t)lat_cap * sizeof(uint64_t));\n"
        "        }\n",
    ),
    (
        "            long r = read_rss_kb(cfg.pid);\n",
        "            if (tr_send && tr_rss_n < 8190) { tr_rss[tr_rss_n++] = now; tr_rss[tr_rss_n++] = now_ns(); }\n",
    ),
    ("    if (cfg.mode == M_LATENCY) {\n        qsort(", None),
    # MQTTLOAD_NO_RSS: no RSS reads of the broker during the run (they take the generator 70-90 us)
    ("        if (now - last_rss_check > 200000000ull) {\n", None),
]
DUMP = (
    "    if (cfg.mode == M_LATENCY && tr_send) {\n"
    '        FILE *df = fopen(getenv("MQTTLOAD_DUMP"), "w");\n'
    "        if (df) {\n"
    '            fprintf(df, "# %llu %.0f\\n", (unsigned long long)t_first_pub, cfg.rate);\n'
    "            for (long i = 0; i < lat_n; i++)\n"
    '                fprintf(df, "%llu %llu\\n", (unsigned long long)tr_send[i], (unsigned long long)tr_recv[i]);\n'
    "            for (long i = 0; i + 1 < tr_rss_n; i += 2)\n"
    '                fprintf(df, "R %llu %llu\\n", (unsigned long long)tr_rss[i], (unsigned long long)tr_rss[i + 1]);\n'
    "            fclose(df);\n"
    "        }\n"
    "    }\n"
)

#: events recorded by ``--perf`` on the run's CPU
PERF_EVENTS = {
    "light": "sched:sched_switch,sched:sched_wakeup,exceptions:page_fault_user",
    "full": "sched:sched_switch,sched:sched_wakeup,exceptions:page_fault_user,irq:irq_handler_entry,"
    "irq:softirq_entry,timer:hrtimer_expire_entry,raw_syscalls:sys_enter,raw_syscalls:sys_exit",
}
#: process names (``comm``, as the scheduler shows them, 15 characters) of the run itself
OURS = ("mqttload_trace", "fluxmq-node", "mosquitto", "swapper")


NO_RSS = '        if (getenv("MQTTLOAD_NO_RSS")) last_rss_check = now;\n'


def patched_source(src: str) -> str:
    """mqttload.c with the per-sample dump (raises if an anchor moved)."""
    for anchor, text in PATCH:
        if src.count(anchor) != 1:
            raise SystemExit(f"mqttload.c changed: anchor {anchor!r} found {src.count(anchor)} times")
        if text is None:
            text = DUMP if "qsort" in anchor else NO_RSS
            src = src.replace(anchor, text + anchor)
        else:
            src = src.replace(anchor, anchor + text)
    return src


def build(src: Path = MQTTLOAD_SRC, out: Path = OUT_DIR / "mqttload_trace") -> str:
    """Build the traced copy into bench/out/ (again when the shared source or this file is newer)."""
    if out.exists() and out.stat().st_mtime >= max(src.stat().st_mtime, Path(__file__).stat().st_mtime):
        return str(out)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    c = out.with_suffix(".c")
    c.write_text(patched_source(src.read_text()))
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(c)], check=True)
    return str(out)


def load(path: Path) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(samples (send, recv), the generator's RSS reads (t0, t1)) of one dump."""
    samples, rss = [], []
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            continue
        parts = line.split()
        if parts[0] == "R":
            rss.append((int(parts[1]), int(parts[2])))
        else:
            samples.append((int(parts[0]), int(parts[1])))
    return samples, rss


def schedule(path: Path) -> tuple[int, float] | None:
    """(the first publish's time, the rate) from a dump's header: sample ``i`` is due at
    ``t_first + i / rate``."""
    with open(path) as f:
        head = f.readline().split()
    return (int(head[1]), float(head[2])) if len(head) == 3 and head[0] == "#" else None


def pct(sorted_vals: list[float], p: float) -> float:
    """The p-th percentile as mqttload computes it (nearest rank)."""
    if not sorted_vals:
        return float("nan")
    return sorted_vals[min(len(sorted_vals) - 1, max(0, int(p / 100 * len(sorted_vals) + 0.5) - 1))]


class Trace:
    """The CPU's scheduler switches (who ran when) and the broker's page faults from ``perf script``."""

    LINE = re.compile(r"^\s*(.+?)\s+(\d+)\s+\[\d+\]\s+(\d+)\.(\d+):\s+(\S+):\s*(.*)$")

    def __init__(self, script: str) -> None:
        """``script``: ``perf script --ns -F comm,tid,cpu,time,event,trace`` output (``load``)."""
        self.runs: list[tuple[int, int, str]] = []  # (start, end, comm) on the CPU
        self.run_tids: list[int] = []  # the thread of each run
        self.faults: list[tuple[int, str]] = []
        self.fault_tids: list[int] = []
        # (``--perf full``) the end of each recv and the start of each send, per process name
        self.recv_end: dict[str, list[int]] = {}
        self.send_start: dict[str, list[int]] = {}
        # (``--perf full``) (time, tid, what): system calls entered (``NR n``), softirqs, interrupts
        # and expired hrtimers on the CPU
        self.events: list[tuple[int, int, str]] = []
        cur = start = None
        cur_tid = 0
        for line in script.splitlines():
            m = self.LINE.match(line)
            if not m:
                continue
            comm, tid, s, ns, name, rest = m.groups()
            t = int(s) * 1_000_000_000 + int(ns.ljust(9, "0")[:9])
            if name == "sched:sched_switch":
                nxt = re.search(r"next_comm=(.+?) next_pid=(\d+)", rest)
                if cur is not None:
                    self.runs.append((start, t, cur))
                    self.run_tids.append(cur_tid)
                cur, start = (nxt.group(1) if nxt else "?"), t
                cur_tid = int(nxt.group(2)) if nxt else 0
            elif name.startswith("exceptions:page_fault"):
                self.faults.append((t, comm.strip()))
                self.fault_tids.append(int(tid))
            elif name == "raw_syscalls:sys_exit" and rest.startswith("NR 45 "):  # recvfrom
                self.recv_end.setdefault(comm.strip(), []).append(t)
            elif name == "raw_syscalls:sys_enter":
                if rest.startswith("NR 44 "):  # sendto
                    self.send_start.setdefault(comm.strip(), []).append(t)
                self.events.append((t, int(tid), "NR " + rest.split()[1]))
            elif name == "irq:softirq_entry":
                what = re.search(r"action=(\S+)", rest)
                self.events.append((t, int(tid), "softirq " + (what.group(1) if what else "?")))
            elif name == "irq:irq_handler_entry":
                what = re.search(r"name=(\S+)", rest)
                self.events.append((t, int(tid), "irq " + (what.group(1) if what else "?")))
            elif name == "timer:hrtimer_expire_entry":
                what = re.search(r"function=(\S+)", rest)
                self.events.append((t, int(tid), "hrtimer " + (what.group(1) if what else "?")))
        self.starts = [r[0] for r in self.runs]
        self.fault_times = [f[0] for f in self.faults]
        self.event_times = [e[0] for e in self.events]

    @classmethod
    def load(cls, perf_file: Path) -> Trace:
        out = subprocess.run(["perf", "script", "-i", str(perf_file), "--ns", "-F", "comm,tid,cpu,time,event,trace"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        return cls(out)

    def flight(self, s: int, r: int) -> list[tuple[int, int, str]]:
        """Who ran on the CPU between ``s`` and ``r``: (from, to, comm), clipped."""
        return [(a, b, c) for a, b, c, _ in self.flight_tids(s, r)]

    def flight_tids(self, s: int, r: int) -> list[tuple[int, int, str, int]]:
        """As :meth:`flight`, with the thread of each run: (from, to, comm, tid)."""
        k = max(0, bisect.bisect_right(self.starts, s) - 1)
        out = []
        while k < len(self.runs) and self.runs[k][0] < r:
            a, b, c = self.runs[k]
            if b > s:
                out.append((max(a, s), min(b, r), c, self.run_tids[k]))
            k += 1
        return out

    def faults_of(self, s: int, r: int, tids: set[int]) -> int:
        """Page faults of these threads between ``s`` and ``r``."""
        lo, hi = bisect.bisect_left(self.fault_times, s), bisect.bisect_right(self.fault_times, r)
        return sum(1 for k in range(lo, hi) if self.fault_tids[k] in tids)

    def events_in(self, s: int, r: int) -> list[tuple[int, int, str]]:
        """(``--perf full``) the system calls, softirqs, interrupts and hrtimers between ``s`` and ``r``."""
        return self.events[bisect.bisect_left(self.event_times, s) : bisect.bisect_right(self.event_times, r)]

    def broker_faults(self, s: int, r: int, broker: str) -> int:
        lo, hi = bisect.bisect_left(self.fault_times, s), bisect.bisect_right(self.fault_times, r)
        return sum(1 for t, c in self.faults[lo:hi] if c.startswith(broker))


def broker_comm(name: str) -> str:
    return "mosquitto" if name == "mosquitto" else "fluxmq-node"


def analyse_perf(dump: Path, broker: str, period: int) -> list[str]:
    """The ``--perf`` lines of one run (see the module docstring)."""
    samples, rss = load(dump)
    tr = Trace.load(dump.with_suffix(".perf"))
    lat = [(r - s) / 1000 for s, r in samples]
    p99 = pct(sorted(lat), 99)
    clean, own, seqs = [], [], []
    for s, r in samples:
        fl = tr.flight(s, r)
        clean.append(all(c.startswith(OURS) for _, _, c in fl))
        own.append(sum(b - a for a, b, c in fl if c.startswith(broker)) / 1000)
        seqs.append([c for _, _, c in fl])
    cl = sorted(v for v, ok in zip(lat, clean, strict=True) if ok)
    lines = [f"    clean: {len(cl)} of {len(lat)} samples, p50 {pct(cl, 50):.1f} p99 {pct(cl, 99):.1f} us"]
    bt = sorted(v for v, ok in zip(own, clean, strict=True) if ok)
    by: dict[int, list[float]] = {}
    for i, (v, ok) in enumerate(zip(own, clean, strict=True)):
        if ok:
            by.setdefault(i % period, []).append(v)
    med = {k: statistics.median(v) for k, v in by.items()}
    top = max(med, key=med.get)
    rest = statistics.median(v for k, v in med.items() if k != top)
    lines.append(f"    broker CPU in a clean flight: p50 {pct(bt, 50):.1f} p98 {pct(bt, 98):.1f} us; by index mod {period}: "
                 f"phase {top} median {med[top]:.1f} us, the other phases' median {rest:.1f} us")  # fmt: skip
    recv, send = tr.recv_end.get(broker, []), tr.send_start.get(broker, [])
    if recv and send:
        # the broker's read-to-write time of each sample: its first recv in the flight, the next send
        gap: dict[int, list[float]] = {}
        for i, (s, r) in enumerate(samples):
            k = bisect.bisect_left(recv, s)
            if k < len(recv) and recv[k] < r:
                j = bisect.bisect_left(send, recv[k])
                if j < len(send) and send[j] < r:
                    gap.setdefault(i % period, []).append((send[j] - recv[k]) / 1000)
        gm = {k: statistics.median(v) for k, v in gap.items()}
        lines.append(f"    broker recv -> send: phase {top} median {gm.get(top, float('nan')):.1f} us, "
                     f"the other phases' median {statistics.median(v for k, v in gm.items() if k != top):.1f} us")  # fmt: skip
    tally: dict[str, int] = {}
    n_top = 0
    for i, v in enumerate(lat):
        if v < p99:
            continue
        n_top += 1
        s, r = samples[i]
        tags = []
        if any(a < r and b > s for a, b in rss):
            tags.append("generator RSS read")
        if not clean[i]:
            tags.append("other process")
        if tr.broker_faults(s, r, broker):
            tags.append("broker page faults")
        if i % period == top:
            tags.append(f"phase {top}")
        runs = [c for c in seqs[i] if not c.startswith("swapper")]
        if len(runs) > 3:
            tags.append("several switches")
        elif (
            runs
            and runs[-1].startswith("mqttload")
            and len(runs) >= 2
            and not _preempted(tr, samples[i], broker)
        ):
            tags.append("broker not preempted")
        for t in tags or ["none of these"]:
            tally[t] = tally.get(t, 0) + 1
    lines.append(f"    the {n_top} samples >= p99 ({p99:.1f} us): "
                 + ", ".join(f"{k} {v}" for k, v in sorted(tally.items(), key=lambda kv: -kv[1])))  # fmt: skip
    return lines


#: a sample sent this much later after its due time than the median sample was sent with the others
#: due meanwhile (a catch-up)
LATE_NS = 200_000
#: another process that ran on the CPU this shortly before a sample's send left it cold caches
BEFORE_NS = 200_000
#: the samples of a run's start (the first 0.2 s at 1,000 msg/s): the subscriber's connection resumes
START_SAMPLES = 200
#: kernel threads (``comm`` prefixes): the kernel's work on the CPU, not a neighbour's
KERNEL_THREADS = ("ksoftirqd", "kworker", "rcu_", "migration", "cpuhp", "watchdog", "irq/", "kcompactd")
#: an event (system call, softirq, hrtimer, interrupt) that occurs fewer times in a run than this share
#: of its samples is rare: a sample's rare events are what its flight did besides a lone message's work
RARE_SHARE = 0.05
#: the x86-64 system call numbers met in these traces
SYSCALL_NAMES = {
    0: "read", 1: "write", 3: "close", 5: "fstat", 7: "poll", 9: "mmap", 10: "mprotect", 11: "munmap",
    12: "brk", 13: "rt_sigaction", 14: "rt_sigprocmask", 16: "ioctl", 17: "pread64", 18: "pwrite64",
    20: "writev", 25: "mremap", 28: "madvise", 35: "nanosleep", 39: "getpid", 44: "sendto",
    45: "recvfrom", 46: "sendmsg", 47: "recvmsg", 61: "wait4", 62: "kill", 72: "fcntl", 74: "fsync",
    75: "fdatasync", 96: "gettimeofday", 110: "getppid", 202: "futex", 228: "clock_gettime",
    230: "clock_nanosleep", 232: "epoll_wait", 233: "epoll_ctl", 257: "openat", 262: "newfstatat",
    270: "pselect6", 280: "utimensat", 281: "epoll_pwait", 318: "getrandom",
}  # fmt: skip


def _event_name(what: str) -> str:
    if what.startswith("NR "):
        n = int(what[3:])
        return SYSCALL_NAMES.get(n, what)
    return what


def load_pids(dump: Path) -> tuple[int, set[int]] | None:
    """(the broker's worker, every thread of the broker's processes) from ``DUMP.pids``, if written."""
    f = dump.with_suffix(".pids")
    if not f.exists():
        return None
    worker, node = 0, set()
    for line in f.read_text().splitlines():
        key, *vals = line.split()
        if key == "worker":
            worker = int(vals[0])
        elif key == "node":
            node.update(int(v) for v in vals)
    return worker, node | {worker}


def broker_threads(pid: int) -> list[int]:
    """Every thread of ``pid`` and its descendants (the node's arbiter, worker and their threads)."""
    out = []
    for p in procinfo.tree(pid):
        try:
            out.extend(int(t) for t in os.listdir(f"/proc/{p}/task"))
        except OSError:
            continue
    return out


def classify(samples: list[tuple[int, int]], rss: list[tuple[int, int]], tr: Trace, worker: int,
             node: set[int], period: int, top: int, clean: bool = False,
             due: tuple[int, float] | None = None) -> list[tuple[float, str, str, int]]:  # fmt: skip
    """The ``top`` slowest samples (``clean``: of those in whose flight no other process ran), slowest
    first: (latency us, class, details, the sample's index).

    A sample's class is the first of: ``neighbour`` (another process ran in its flight),
    ``generator RSS read``, ``generator late`` (sent ``LATE_NS`` after its due time, ``due``: with the
    samples due meanwhile; details: who held the CPU), ``node, other thread`` (the arbiter or a thread of the broker, not the
    worker), ``worker heartbeat`` (``--perf full``: the worker's ``utimensat``), ``run's first 0.2 s``
    (``START_SAMPLES``), ``neighbour just before`` (another process ran on the CPU ``BEFORE_NS``
    before the send), ``kernel thread``, ``worker page faults``, ``worker rare syscall`` (a system call of the
    broker made fewer times in the run than ``RARE_SHARE`` of the samples: a timer's or another
    greenlet's turn),
    ``rare kernel event`` (a softirq, interrupt or hrtimer as rare), ``sampled phase`` (the phase of
    the index modulo ``period`` where the worker's CPU is highest), ``several switches``, ``broker not
    preempted``, ``none``. The events of the worker's turn that was running when the message was sent
    count too (from its start, at most 1 ms before)."""
    lat = [(r - s) / 1000 for s, r in samples]
    windows = []
    for s, r in samples:
        k = bisect.bisect_right(tr.starts, s) - 1
        lo = s
        if k >= 0 and tr.run_tids[k] in node and tr.runs[k][1] > s:
            lo = max(tr.runs[k][0], s - 1_000_000)
        windows.append((lo, r))
    # how often each event occurs in the run (system calls: the broker's only)
    seen: dict[str, int] = {}
    for _, tid, w in tr.events:
        if not w.startswith("NR ") or tid in node:
            seen[w] = seen.get(w, 0) + 1
    rare = {w for w, n in seen.items() if n < RARE_SHARE * len(samples)}
    own: dict[int, list[float]] = {}
    for i, (s, r) in enumerate(samples):
        own.setdefault(i % period, []).append(
            sum(b - a for a, b, _, t in tr.flight_tids(s, r) if t == worker) / 1000
        )
    med = {k: statistics.median(v) for k, v in own.items()}
    phase = max(med, key=med.get) if med else -1
    # the generator's usual send time after the due one (its timer is armed before the first send)
    lag = statistics.median(s - (due[0] + i * 1e9 / due[1]) for i, (s, _) in enumerate(samples)) if due else 0
    out = []
    for i in sorted(range(len(samples)), key=lambda i: -lat[i]):
        if len(out) == top:
            break
        s, r = samples[i]
        lo, _ = windows[i]
        fl = tr.flight_tids(s, r)
        neighbours = sorted({c for _, _, c, t in fl if t not in node and t != 0 and not c.startswith("mqttload")
                             and not c.startswith(KERNEL_THREADS)})  # fmt: skip
        if clean and neighbours:
            continue
        kernel = sorted({c for _, _, c, t in fl if c.startswith(KERNEL_THREADS)})
        others = sum(b - a for a, b, _, t in fl if t in node and t != worker) / 1000
        faults = tr.faults_of(lo, r, {worker})
        ev = [(t, w) for _, t, w in tr.events_in(lo, r) if w in rare]
        syscalls = sorted({_event_name(w) for t, w in ev if w.startswith("NR ") and t in node})
        kev = sorted({_event_name(w) for t, w in ev if not w.startswith("NR ")})
        switches = len([c for _, _, c, t in fl if t != 0])
        if neighbours:
            cls, det = "neighbour", ",".join(neighbours)
        elif any(a < r and b > s for a, b in rss):
            cls, det = "generator RSS read", ""
        elif due is not None and s - (due[0] + i * 1e9 / due[1]) - lag > LATE_NS:
            # sent late with the ones due meanwhile, in one write: the broker serves them as one batch
            at = due[0] + int(i * 1e9 / due[1] + lag)
            held = {}
            for a, b, c, t in tr.flight_tids(at, s):
                who = "worker" if t == worker else "node, other thread" if t in node else c.split("/")[0]
                if not who.startswith(("mqttload", "swapper")):
                    held[who] = held.get(who, 0) + (b - a) // 1000
            cls = "generator late"
            det = (
                ",".join(f"{k} {v} us" for k, v in sorted(held.items(), key=lambda kv: -kv[1])[:2])
                or "itself"
            )
        elif others > 0:
            cls, det = "node, other thread", f"{others:.0f} us"
        elif "utimensat" in syscalls:
            cls, det = "worker heartbeat", f"faults {faults}"
        elif i < START_SAMPLES:
            cls, det = "run's first 0.2 s", f"faults {faults}"
        elif before := sorted({c for _, _, c, t in tr.flight_tids(s - BEFORE_NS, s) if t not in node and t != 0
                               and not c.startswith(("mqttload", *KERNEL_THREADS))}):  # fmt: skip
            # the neighbour left the CPU just before the send: the flight runs on its caches
            cls, det = "neighbour just before", ",".join(before)
        elif kernel:
            cls, det = "kernel thread", ",".join(kernel)
        elif faults:
            cls, det = "worker page faults", str(faults)
        elif syscalls:
            cls, det = "worker rare syscall", ",".join(syscalls)
        elif kev:
            cls, det = "rare kernel event", ",".join(kev)
        elif i % period == phase:
            cls, det = "sampled phase", str(phase)
        elif switches > 3:
            cls, det = "several switches", str(switches)
        elif switches >= 2 and fl[-1][2].startswith("mqttload") and not _ran_after(tr, r, worker):
            cls, det = "broker not preempted", ""
        else:
            cls, det = "none", ""
        extra = []
        if cls != "worker page faults" and faults:
            extra.append(f"faults {faults}")
        if cls != "worker rare syscall" and syscalls:
            extra.append("syscalls " + ",".join(syscalls))
        if cls != "rare kernel event" and kev:
            extra.append(",".join(kev))
        if cls == "none":  # where the flight's time went: the worker, the generator, an idle CPU
            w = sum(b - a for a, b, _, t in fl if t == worker) / 1000
            g = sum(b - a for a, b, c, _ in fl if c.startswith("mqttload")) / 1000
            extra.append(f"worker {w:.0f} us, generator {g:.0f}, idle {(r - s) / 1000 - w - g:.0f}")
        out.append((lat[i], cls, "; ".join(x for x in [det, *extra] if x), i))
    return out


def classify_lines(dump: Path, period: int, top: int) -> list[str]:
    """The classes of a run's ``top`` slowest samples, their count among them and among the samples at
    or above the p99, and their share of the time above the p50 of those at or above the p99."""
    pids = load_pids(dump)
    if pids is None or not dump.with_suffix(".perf").exists():
        return []
    samples, rss = load(dump)
    tr = Trace.load(dump.with_suffix(".perf"))
    lat = sorted((r - s) / 1000 for s, r in samples)
    lines = _class_lines(
        classify(samples, rss, tr, pids[0], pids[1], period, top, due=schedule(dump)),
        pct(lat, 50),
        pct(lat, 99),
        "",
    )
    # the clean samples: the p50 and p99 of those in whose flight no other process ran
    n = len(lat)
    rows = classify(samples, rss, tr, pids[0], pids[1], period, n, clean=True, due=schedule(dump))
    cl = sorted(v for v, _, _, _ in rows)
    p50, p99 = pct(cl, 50), pct(cl, 99)
    name = dump.name.split("-")[0]
    for v, cls, _, _ in rows:
        if v < p99:
            break
        t = TOTALS.setdefault(name, {}).setdefault(cls, [0, 0.0])
        t[0] += 1
        t[1] += v - p50
    return lines + _class_lines(rows[:top], p50, p99, f"clean ({len(rows)} of {n}), ")


#: broker name -> class -> [samples at or above the clean p99, their time above the clean p50 (us)],
#: summed over the runs reported (``total_lines``)
TOTALS: dict[str, dict[str, list]] = {}


def total_lines() -> list[str]:
    """Per broker, over every run reported: the classes of the clean samples at or above each run's
    clean p99, their count and their share of the time above the p50."""
    lines = []
    for name, by in TOTALS.items():
        n = sum(v[0] for v in by.values())
        excess = sum(v[1] for v in by.values()) or 1.0
        lines.append(
            f"{name}: {n} clean samples >= their run's clean p99; class: n, share of the time above the p50"
        )
        for cls, (k, e) in sorted(by.items(), key=lambda kv: -kv[1][1]):
            lines.append(f"    {cls:22s} {k:4d} {100 * e / excess:5.1f} %")
    return lines


def _class_lines(rows: list[tuple[float, str, str, int]], p50: float, p99: float, what: str) -> list[str]:
    if not rows:
        return []
    by: dict[str, list[float]] = {}
    at99: dict[str, int] = {}
    excess = sum(v - p50 for v, _, _, _ in rows if v >= p99) or 1.0
    share: dict[str, float] = {}
    details: dict[str, dict[str, int]] = {}
    for v, cls, det, _ in rows:
        by.setdefault(cls, []).append(v)
        if v >= p99:
            at99[cls] = at99.get(cls, 0) + 1
            share[cls] = share.get(cls, 0.0) + (v - p50) / excess
        if det:
            d = details.setdefault(cls, {})
            d[det] = d.get(det, 0) + 1
    lines = [f"    classes of the {what}{len(rows)} slowest (from {rows[-1][0]:.1f} us; p50 {p50:.1f}, p99 {p99:.1f}): "
             "n, n >= p99, share of the time above the p50 (>= p99), median us, commonest details"]  # fmt: skip
    for cls, vals in sorted(by.items(), key=lambda kv: -len(kv[1])):
        common = sorted(details.get(cls, {}).items(), key=lambda kv: -kv[1])[:3]
        lines.append(f"      {cls:22s} {len(vals):3d} {at99.get(cls, 0):3d} {100 * share.get(cls, 0.0):5.1f} % "
                     f"{statistics.median(vals):7.1f}  " + " | ".join(f"{d} x{n}" for d, n in common))  # fmt: skip
    return lines


def _ran_after(tr: Trace, r: int, tid: int) -> bool:
    """Whether thread ``tid`` had the CPU next after ``r``, within 200 us (it was still runnable)."""
    k = bisect.bisect_right(tr.starts, r)
    return k < len(tr.runs) and tr.run_tids[k] == tid and tr.runs[k][0] - r < 200_000


def _preempted(tr: Trace, sample: tuple[int, int], broker: str) -> bool:
    """Whether the broker was still runnable when the generator got the CPU back to read the delivery:
    it ran on after the switch (it is seen again on the CPU before its next message)."""
    s, r = sample
    k = bisect.bisect_right(tr.starts, r)
    return k < len(tr.runs) and tr.runs[k][2].startswith(broker) and tr.runs[k][0] - r < 200_000


def run_one(name: str, gen: str, cpu: str, dump: Path, sets: list[str], duration: float, perf: str,
            tree: str | None, no_rss: bool = False) -> dict:  # fmt: skip
    """One latency run against a fresh broker; the generator's RESULT fields."""
    saved = brokers_mod.REPO
    if tree:
        brokers_mod.REPO = Path(tree)  # PYTHONPATH and cwd of the node
    try:
        b = Mosquitto(cpus=cpu) if name == "mosquitto" else FluxmqNode(cpus=cpu, sets=sets)
        b.start(timeout=60)
    finally:
        brokers_mod.REPO = saved
    rec = None
    try:
        # who is the broker in the trace (a neighbour may run a node too): its worker and every thread
        threads = broker_threads(b.pid)
        if perf:
            other = "0" if cpu != "0" else "1"
            rec = subprocess.Popen(["taskset", "-c", other, "perf", "record", "-q", "-k", "mono", "-C", cpu, "-e",
                                    PERF_EVENTS[perf], "-o", str(dump.with_suffix(".perf"))],
                                   stdout=subprocess.DEVNULL)  # fmt: skip
            time.sleep(1.0)
        cmd = ["taskset", "-c", cpu, gen, "--mode", "latency", "--rate", "1000", "--duration", str(duration),
               "--host", "127.0.0.1", "--port", str(b.port), "--pid", str(b.cpu_pid), "--label", name,
               "--timeout", "60"]  # fmt: skip
        env = dict(os.environ, MQTTLOAD_DUMP=str(dump))
        if no_rss:
            env["MQTTLOAD_NO_RSS"] = "1"
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        threads += broker_threads(b.pid)
        with contextlib.suppress(OSError):  # to name the code and data of the broker's page faults
            shutil.copyfile(f"/proc/{b.cpu_pid}/maps", dump.with_suffix(".maps"))
        dump.with_suffix(".pids").write_text(
            f"worker {b.cpu_pid}\nnode {' '.join(map(str, sorted(set(threads))))}\n"
        )
        if rec is not None:
            rec.send_signal(2)
            rec.wait(timeout=60)
            rec = None
        lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
        return parse_result_line(lines[-1]) if lines else {"error": p.stderr[-300:]}
    finally:
        if rec is not None:
            rec.kill()
            rec.wait()
        b.stop()
        b.cleanup()


def report(dump: Path, broker: str, perf: bool, period: int, n_slow: int = 100) -> None:
    samples, rss = load(dump)
    lat = sorted((r - s) / 1000 for s, r in samples)
    p99 = pct(lat, 99)
    top = [(s, r) for s, r in samples if (r - s) / 1000 >= p99]
    in_rss = sum(1 for s, r in top if any(a < r and b > s for a, b in rss))
    print(f"  {dump.name}: p50 {pct(lat, 50):.1f} p90 {pct(lat, 90):.1f} p98 {pct(lat, 98):.1f} p99 {p99:.1f} "
          f"p99.9 {pct(lat, 99.9):.1f} us; {in_rss} of the {len(top)} >= p99 in a generator RSS read "
          f"({len(rss)} reads)")  # fmt: skip
    if perf and dump.with_suffix(".perf").exists():
        for line in analyse_perf(dump, broker, period) + classify_lines(dump, period, n_slow):
            print(line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cpu", default="1", help="the one CPU of broker and generator")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--brokers", default="mosquitto,fluxmq", help="mosquitto, fluxmq and --tree names")
    ap.add_argument(
        "--tree", action="append", default=[], help="NAME=DIR: a fluxmq checkout run as broker NAME"
    )
    ap.add_argument("--set", action="append", default=[], dest="sets", help="fluxmq --set KEY=VALUE")
    ap.add_argument("--src", default=str(MQTTLOAD_SRC), help="mqttload.c (default: ../shared/tools/)")
    ap.add_argument("--perf", choices=sorted(PERF_EVENTS), default="", help="perf record the CPU (DUMP.perf)")
    ap.add_argument("--period", type=int, default=64, help="the index period looked for in the broker's CPU")
    ap.add_argument("--top", type=int, default=100, help="classify this many of the slowest samples")
    ap.add_argument("--no-rss", action="store_true", help="the generator reads no broker RSS during the run")
    ap.add_argument("--keep", default=None, help="keep the dumps in this directory")
    ap.add_argument("--analyse", nargs="*", default=None, help="only analyse these dumps (NAME-...txt)")
    args = ap.parse_args(argv)
    if args.analyse:
        for f in args.analyse:
            report(Path(f), broker_comm(Path(f).name.split("-")[0]), True, args.period, args.top)
        print("\n".join(total_lines()))
        return 0
    trees = dict(t.split("=", 1) for t in args.tree)
    names = [n for n in args.brokers.split(",") if n] + [n for n in trees if n not in args.brokers.split(",")]
    gen = build(Path(args.src))
    d = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lattail-"))
    d.mkdir(parents=True, exist_ok=True)
    for run in range(args.runs):
        for name in names:
            dump = d / f"{name}-{run}-{int(time.time())}.txt"
            kind = "mosquitto" if name == "mosquitto" else "fluxmq"
            r = run_one(
                kind, gen, args.cpu, dump, args.sets, args.duration, args.perf, trees.get(name), args.no_rss
            )
            print(f"{name} run {run}: p50 {r.get('p50_ms')} p99 {r.get('p99_ms')} ms, other procs "
                  f"{r.get('other_cpu')}", flush=True)  # fmt: skip
            report(dump, broker_comm(kind), bool(args.perf), args.period, args.top)
    print("\n".join(total_lines()))
    if not args.keep:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
