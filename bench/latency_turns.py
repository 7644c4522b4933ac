"""The broker worker's own timeline in ``bench.latency_tail --perf full`` dumps: where its on-CPU time
in each sample's flight goes, what its heartbeat turns do to the message of their poll, and its tail
after each write.

``latency_tail`` classes a sample by *who* ran in its flight; this reads *what the worker did* there,
from the same ``perf`` file (switches, system calls, softirqs, hrtimers and interrupts of the CPU):

- ``--states``: per clean sample, the worker's on-CPU time split into user space and each system
  call (from its entry to its exit); for the ``none`` samples among the 100 slowest clean ones of
  each run, the state that exceeds its median over the run's clean samples most, against each
  state's share of the worker's on-CPU time (its exposure), and any other kernel event they held;
- ``--heartbeat``: per heartbeat turn (the worker's ``utimensat``), the sample sent last before it:
  its latency against the run's p50 and p99, and whether a loop turn (libev's ``getpid``) came
  between its read and its write (the write was a loop callback behind the heartbeat's wake);
- ``--tail``: the worker's on-CPU time from the exit of each write (``sendto``; Mosquitto's
  ``write``) to the entry of its next ``epoll_wait``, and the system calls between them::

    python -m bench.latency_tail --runs 4 --duration 10 --perf full --keep DIR ...
    python -m bench.latency_turns --states --heartbeat --tail DIR/fluxmq-*.txt
"""

from __future__ import annotations

import argparse
import bisect
import collections
import re
import statistics
import subprocess
import sys
from pathlib import Path

from bench import latency_tail as lt

LINE = re.compile(r"^\s*(.+?)\s+(\d+)\s+\[\d+\]\s+(\d+)\.(\d+):\s+(\S+):\s*(.*)$")
#: the system calls that write a delivery (fluxmq: ``sendto``; Mosquitto: ``write``)
SENDS = ("sendto", "write", "writev", "sendmsg")
#: the states whose excess a ``none`` sample is looked at for
STATES = ("user", "recvfrom", "sendto", "epoll_wait")


def timeline(script: str, worker: int) -> list[tuple[int, str, str]]:
    """The worker's events from ``perf script --ns -F comm,tid,cpu,time,event,trace`` output: (time,
    kind, what) with kind ``on``/``off`` (switched in/out), ``enter`` (system call name) / ``exit``,
    ``softirq``, ``hrtimer``, ``irq``."""
    ev = []
    for line in script.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        _, tid, s, ns, name, rest = m.groups()
        t = int(s) * 1_000_000_000 + int(ns.ljust(9, "0")[:9])
        if name == "sched:sched_switch":
            prev, nxt = re.search(r"prev_pid=(\d+)", rest), re.search(r"next_pid=(\d+)", rest)
            if prev and int(prev.group(1)) == worker:
                ev.append((t, "off", ""))
            if nxt and int(nxt.group(1)) == worker:
                ev.append((t, "on", ""))
        elif int(tid) != worker:
            continue
        elif name == "raw_syscalls:sys_enter":
            ev.append((t, "enter", lt._event_name("NR " + rest.split()[1])))
        elif name == "raw_syscalls:sys_exit":
            ev.append((t, "exit", ""))
        else:
            for event, kind, field in (("irq:softirq_entry", "softirq", "action"),
                                       ("timer:hrtimer_expire_entry", "hrtimer", "function"),
                                       ("irq:irq_handler_entry", "irq", "name")):  # fmt: skip
                if name == event:
                    what = re.search(field + r"=([^\]\s]+)", rest)
                    ev.append((t, kind, what.group(1) if what else "?"))
    return ev


def load_timeline(dump: Path, worker: int) -> list[tuple[int, str, str]]:
    out = subprocess.run(["perf", "script", "-i", str(dump.with_suffix(".perf")), "--ns", "-F",
                          "comm,tid,cpu,time,event,trace"], capture_output=True, text=True, check=True).stdout  # fmt: skip
    return timeline(out, worker)


def breakdown(ev, times, s: int, r: int) -> tuple[collections.Counter, list[str], list[str]]:
    """(the worker's on-CPU ns between ``s`` and ``r`` per state: ``user`` or a system call's name,
    the other kernel events there, the system calls entered there in order)."""
    k = bisect.bisect_left(times, s)
    on, state, seen_on, seen_state = False, "user", False, False
    j = k - 1
    while j >= 0 and not (seen_on and seen_state) and times[j] > s - 50_000_000:
        _, kind, what = ev[j]
        if not seen_on and kind in ("on", "off"):
            on, seen_on = kind == "on", True
        if not seen_state and kind in ("enter", "exit"):
            state, seen_state = (what if kind == "enter" else "user"), True
        j -= 1
    acc: collections.Counter = collections.Counter()
    extras, calls, last = [], [], s
    for t, kind, what in ev[k : bisect.bisect_right(times, r)]:
        if on:
            acc[state] += t - last
        last = t
        if kind in ("on", "off"):
            on = kind == "on"
        elif kind == "enter":
            state = what
            calls.append(what)
        elif kind == "exit":
            state = "user"
        else:
            extras.append(f"{kind} {what}")
    if on:
        acc[state] += r - last
    return acc, extras, calls


def write_after_a_turn(calls: list[str]) -> bool:
    """Whether a loop turn (libev's ``getpid``) came between the read and the write."""
    if "recvfrom" not in calls or "sendto" not in calls[calls.index("recvfrom") :]:
        return False
    i = calls.index("recvfrom")
    return "getpid" in calls[i : calls.index("sendto", i)]


def heartbeat_samples(samples, ev) -> list[tuple[int, int]]:
    """(index of the sample sent last before it, the ``utimensat``'s time) per heartbeat turn that
    came within 2 ms of a send."""
    sends = [s for s, _ in samples]
    out = []
    for t, kind, what in ev:
        if kind == "enter" and what == "utimensat":
            k = bisect.bisect_right(sends, t) - 1
            if k >= 0 and t - sends[k] <= 2_000_000:
                out.append((k, t))
    return out


def tails(ev) -> tuple[list[float], collections.Counter]:
    """The worker's on-CPU us from each write's (``SENDS``) exit to its next ``epoll_wait``, and the
    system calls between them."""
    out, between = [], collections.Counter()
    on, after_send, cur, last, calls = False, False, None, 0, []
    for t, kind, what in ev:
        if cur is not None and on:
            cur += t - last
        last = t
        if kind in ("on", "off"):
            on = kind == "on"
        elif kind == "enter":
            if what in SENDS:
                cur, after_send = None, True
            elif what == "epoll_wait" and cur is not None:
                out.append(cur / 1000)
                between[",".join(calls)] += 1
                cur = None
            elif cur is not None:
                calls.append(what)
        elif kind == "exit" and after_send:
            after_send, cur, calls = False, 0, []
    return out, between


def report(dumps: list[Path], states: bool, heartbeat: bool, tail: bool) -> None:
    where: collections.Counter = collections.Counter()
    exposure: collections.Counter = collections.Counter()
    others: collections.Counter = collections.Counter()
    excess, n_none, turned, beats = [], 0, 0, []
    for dump in dumps:
        samples, rss = lt.load(dump)
        worker, node = lt.load_pids(dump)
        ev = load_timeline(dump, worker)
        times = [e[0] for e in ev]
        lat = sorted((r - s) / 1000 for s, r in samples)
        p50, p99 = lt.pct(lat, 50), lt.pct(lat, 99)
        if heartbeat:
            for k, t in heartbeat_samples(samples, ev):
                s, r = samples[k]
                _, _, calls = breakdown(ev, times, s, t)
                v = (r - s) / 1000
                beats.append((v - p50, v >= p99, write_after_a_turn(calls)))
                print(f"{dump.name}: heartbeat, sample {k}: {v:.0f} us (p50 {p50:.0f}, p99 {p99:.0f}); "
                      f"write after a loop turn: {write_after_a_turn(calls)}")  # fmt: skip
        if tail:
            ts, between = tails(ev)
            ts.sort()
            if not ts:
                continue
            print(f"{dump.name}: tail after the write, {len(ts)} turns: median {statistics.median(ts):.1f} p90 "
                  f"{lt.pct(ts, 90):.1f} p99 {lt.pct(ts, 99):.1f} us; between: {between.most_common(2)}")  # fmt: skip
        if states:
            tr = lt.Trace.load(dump.with_suffix(".perf"))
            rows = lt.classify(
                samples, rss, tr, worker, node, 64, len(samples), clean=True, due=lt.schedule(dump)
            )
            per = {i: breakdown(ev, times, *samples[i]) for _, _, _, i in rows}
            for acc, _, _ in per.values():
                exposure.update(acc)
            med = {k: statistics.median(per[i][0].get(k, 0) for i in per) for k in STATES}
            for _, cls, _, i in rows[:100]:
                if cls != "none":
                    continue
                acc, extras, calls = per[i]
                n_none += 1
                over = {k: acc.get(k, 0) - med.get(k, 0) for k in acc}
                k = max(over, key=over.get)
                where[k] += 1
                excess.append(over[k] / 1000)
                turned += write_after_a_turn(calls)
                others.update(e for e in extras if "NET_RX" not in e)
    if heartbeat and beats:
        print(f"heartbeat turns with a message: {len(beats)}; above the p50 by a median {statistics.median(b[0] for b in beats):.0f} us; "
              f"at or above the run's p99: {sum(b[1] for b in beats)}; write after a loop turn: {sum(b[2] for b in beats)}")  # fmt: skip
    if states and n_none:
        total = sum(exposure.values()) or 1
        print(f"'none' among the 100 slowest clean samples of {len(dumps)} runs: {n_none}; the most exceeded "
              f"state's excess: median {statistics.median(excess):.0f} us; write after a loop turn: {turned}; "
              f"other kernel events: {dict(others)}")  # fmt: skip
        for k, c in where.most_common():
            print(f"    {k:12s} {c:4d} ({100 * c / n_none:4.1f} %)   its share of the worker's on-CPU time in "
                  f"clean flights {100 * exposure[k] / total:4.1f} %")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dumps", nargs="+", help="latency_tail dumps (NAME-RUN-TIME.txt) with .perf and .pids")
    ap.add_argument("--states", action="store_true")
    ap.add_argument("--heartbeat", action="store_true")
    ap.add_argument("--tail", action="store_true")
    args = ap.parse_args(argv)
    report([Path(d) for d in args.dumps], args.states, args.heartbeat, args.tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
