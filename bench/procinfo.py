"""Process and machine figures from /proc: a broker's RSS and CPU over its process tree, host CPU use.

A broker may be several processes (fluxmq-node is a gunicorn arbiter with a worker that holds the
connections), so RSS and CPU are summed over the process and all its descendants.
"""

from __future__ import annotations

import os
import resource
import time


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/PID/task/*/children, falling back to a /proc scan)."""
    out: list[int] = []
    task_dir = f"/proc/{pid}/task"
    try:
        for tid in os.listdir(task_dir):
            try:
                with open(f"{task_dir}/{tid}/children") as f:
                    out.extend(int(x) for x in f.read().split())
            except OSError:
                continue
        return out
    except OSError:
        pass
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(name))
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that exist now."""
    seen = [pid]
    i = 0
    while i < len(seen):
        seen.extend(c for c in children(seen[i]) if c not in seen)
        i += 1
    return seen


def rss_kb(pid: int) -> int:
    """VmRSS of one process in kB, -1 if unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return -1


def tree_rss_kb(pids: list[int]) -> int:
    """Summed VmRSS (kB) of the given processes and their descendants, -1 if none is readable."""
    total, seen = 0, False
    for root in pids:
        for p in tree(root):
            r = rss_kb(p)
            if r >= 0:
                total += r
                seen = True
    return total if seen else -1


def cpu_user_sys_s(pid: int) -> tuple[float, float]:
    """(utime, stime) of one process (all threads) in seconds, (-1, -1) if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return -1.0, -1.0
    fields = stat[stat.rfind(")") + 2 :].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def cpu_s(pid: int) -> float:
    """utime + stime of one process (all threads) in seconds, -1 if unknown."""
    user, sys_ = cpu_user_sys_s(pid)
    return -1.0 if user < 0 else user + sys_


def tree_cpu_user_sys_s(pids: list[int]) -> tuple[float, float]:
    """Summed (utime, stime) seconds of the given processes and their descendants, each process
    counted once (a root may also be a descendant of another root); (-1, -1) if none is readable."""
    user = sys_ = 0.0
    seen: set[int] = set()
    read = False
    for root in pids:
        for p in tree(root):
            if p in seen:
                continue
            seen.add(p)
            u, s = cpu_user_sys_s(p)
            if u >= 0:
                user += u
                sys_ += s
                read = True
    return (user, sys_) if read else (-1.0, -1.0)


def tree_cpu_s(pids: list[int]) -> float:
    """Summed CPU seconds of the given processes and their descendants (each counted once), -1 if
    none is readable."""
    user, sys_ = tree_cpu_user_sys_s(pids)
    return -1.0 if user < 0 else user + sys_


def start_time(pid: int) -> int:
    """Start time of a process in clock ticks since boot (identifies it across PID reuse), -1 if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return -1
    return int(stat[stat.rfind(")") + 2 :].split()[19])


def self_cpu_s() -> float:
    """CPU seconds used by this process."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def host_stat() -> list[int]:
    """The aggregate ``cpu`` line of /proc/stat (USER_HZ ticks: user nice system idle iowait irq softirq steal)."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
        return [int(x) for x in parts[1:9]]
    except (OSError, ValueError):
        return [0] * 8


def host_usage(before: list[int], after: list[int], ours_s: float) -> tuple[float, float]:
    """(steal % of all vCPU time, % of one core busy in processes other than ``ours_s`` CPU seconds)."""
    d = [a - b for a, b in zip(after, before, strict=True)]
    tot = sum(d)
    if tot <= 0:
        return 0.0, 0.0
    hz = os.sysconf("SC_CLK_TCK")
    busy = (d[0] + d[1] + d[2]) / hz
    secs = tot / hz / (os.cpu_count() or 1)
    other = max(0.0, busy - ours_s)
    return 100.0 * d[7] / tot, (100.0 * other / secs if secs > 0 else 0.0)


def busy_cpus(interval: float = 1.0) -> float:
    """CPUs' worth of non-idle time on the whole machine over the next ``interval`` seconds."""
    a = host_stat()
    time.sleep(interval)
    b = host_stat()
    d = [y - x for x, y in zip(a, b, strict=True)]
    tot = sum(d)
    if tot <= 0:
        return 0.0
    ncpu = os.cpu_count() or 1
    return ncpu * (tot - d[3] - d[4]) / tot  # all but idle and iowait


def wait_quiet(max_busy: float, max_wait: float, interval: float = 1.0) -> tuple[float, float]:
    """Wait until the machine's busy CPUs drop to ``max_busy`` or ``max_wait`` seconds pass.

    Returns (seconds waited, busy CPUs in the last interval).
    """
    t0 = time.monotonic()
    while True:
        busy = busy_cpus(interval)
        waited = time.monotonic() - t0
        if busy <= max_busy or waited >= max_wait:
            return waited, busy


def raise_nofile() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def machine_info() -> dict[str, str]:
    """nproc, CPU model, kernel and load average, for reports."""
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/loadavg") as f:
            load = " ".join(f.read().split()[:3])
    except OSError:
        load = "?"
    u = os.uname()
    return {
        "nproc": str(os.cpu_count()),
        "affinity": ",".join(str(c) for c in sorted(os.sched_getaffinity(0))),
        "cpu": model,
        "kernel": f"{u.sysname} {u.release} {u.machine}",
        "loadavg": load,
    }


def tcp_peer_ports(pid: int) -> set[int]:
    """The remote ports of the TCP connections (IPv4 and IPv6) process ``pid`` holds open (its
    socket inodes in /proc/PID/fd, looked up in /proc/PID/net/tcp*); empty if it is gone."""
    inodes: set[str] = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return set()
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f, None)  # the header
                for line in f:
                    cols = line.split()
                    if len(cols) > 9 and cols[9] in inodes:
                        ports.add(int(cols[2].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return ports
