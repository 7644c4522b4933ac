"""What a node's hub runs besides messages, and which latency samples it lands on.

Two halves:

``record``: loaded into a node through ``sitecustomize`` (``bench/hub_trace_site/``), records in the
process every greenlet turn (the time from the hub's switch into a greenlet until it switches back)
and every cyclic-garbage collection, with its CLOCK_MONOTONIC start and its length, one line each
(``start_ns dur_ns kind name``) to ``$HUB_TRACE_PREFIX.<pid>``.  A lone message the C relay serves
in the hub's I/O callback makes no switch, so what shows is the node's other work: timers' greenlets
(heartbeat, run loop, $SYS, heap trim, ...), the readers' greenlets, and the collector::

    HUB_TRACE_PREFIX=/tmp/ht PYTHONPATH=bench/hub_trace_site:. fluxmq-node --config ...

``report``: sets a latency trace (``bench.loadgen --mode latency --trace FILE``: ``send_ns
latency_ns`` per delivery) beside the node's trace: per kind of event its count, rate and length, and
for the slowest samples (by default the 1 % that make the p99) the events that overlapped them::

    python -m bench.hub_trace report --lat /tmp/lat.txt --hub /tmp/ht.12345
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import sys
import time

#: events kept in memory before a write (a write is a syscall on the hub: not one per event)
BUFFER = 256
#: a switch shorter than this is not recorded (the trace would cost more than what it shows)
MIN_NS = 0


def _name(g) -> str:
    if getattr(g, "parent", 0) is None:
        return "main"
    run = getattr(g, "_run", None) or getattr(g, "run", None)
    if run is None:
        return type(g).__name__
    owner = getattr(run, "__self__", None)
    fn = getattr(run, "__func__", run)
    name = getattr(fn, "__qualname__", None) or repr(fn)
    if owner is not None and not name.startswith(type(owner).__name__):
        name = f"{type(owner).__name__}.{name}"
    return name


def install(prefix: str) -> None:
    """Record greenlet turns and collections of this process (and of the children it forks)."""
    import greenlet

    state = {"pid": -1, "fd": -1, "buf": [], "turn": None, "gc": 0}
    now = time.monotonic_ns

    def out(line: str) -> None:
        pid = os.getpid()
        if state["pid"] != pid:  # after a fork (gunicorn's worker): a file of its own
            state["pid"] = pid
            state["buf"] = []
            state["fd"] = os.open(f"{prefix}.{pid}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        buf = state["buf"]
        buf.append(line)
        if len(buf) >= BUFFER:
            os.write(state["fd"], "".join(buf).encode())
            buf.clear()

    def flush() -> None:
        if state["buf"] and state["pid"] == os.getpid():
            os.write(state["fd"], "".join(state["buf"]).encode())
            state["buf"].clear()

    def on_switch(event, args) -> None:
        if event not in ("switch", "throw"):
            return
        origin, target = args
        t = now()
        turn = state["turn"]
        if turn is not None and turn[1] is origin:
            d = t - turn[0]
            if d >= MIN_NS:
                out(f"{turn[0]} {d} turn {_name(origin)}\n")
            state["turn"] = None
        if type(target).__name__ != "Hub":  # the main greenlet too (gunicorn's run loop)
            state["turn"] = (t, target)

    def on_gc(phase, info) -> None:
        if phase == "start":
            state["gc"] = now()
        else:
            t0 = state["gc"]
            out(f"{t0} {now() - t0} gc gen{info['generation']}:{info['collected']}\n")

    greenlet.settrace(on_switch)
    gc.callbacks.append(on_gc)
    import atexit

    atexit.register(flush)
    import signal

    # gunicorn's worker leaves by os._exit after its run: flush on the way out of the service.
    prev = signal.getsignal(signal.SIGTERM)

    def on_term(sig, frame):
        flush()
        if callable(prev):
            prev(sig, frame)

    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:
        pass
    state["flush"] = flush
    sys.modules[__name__].flush = flush  # type: ignore[attr-defined]


def _load_lat(path: str) -> list[tuple[int, int]]:
    with open(path) as f:
        return [(int(a), int(b)) for a, b in (line.split() for line in f if line.strip())]


def _load_hub(paths: list[str]) -> list[tuple[int, int, str, str]]:
    rows = []
    for path in paths:
        with open(path) as f:
            for line in f:
                parts = line.split(maxsplit=3)
                if len(parts) == 4:
                    rows.append((int(parts[0]), int(parts[1]), parts[2], parts[3].strip()))
    rows.sort()
    return rows


def report(lat_path: str, hub_paths: list[str], worst: float = 1.0) -> str:
    """Per-kind counts of the node's events during the run, and what overlapped the slowest samples."""
    lat = _load_lat(lat_path)
    hub = _load_hub(hub_paths)
    if not lat:
        return "no samples"
    t0, t1 = lat[0][0], lat[-1][0] + lat[-1][1]
    secs = (t1 - t0) / 1e9
    during = [e for e in hub if t0 <= e[0] <= t1]
    lines = [f"{len(lat)} samples over {secs:.2f} s; {len(during)} hub events in that time"]
    by: dict[str, list[int]] = collections.defaultdict(list)
    for _start, dur, kind, name in during:
        key = f"{kind} {name.split(':')[0] if kind == 'gc' else name}"
        by[key].append(dur)
    lines.append("event | count | per s | median us | max us | total us")
    for key, durs in sorted(by.items(), key=lambda kv: -sum(kv[1])):
        durs.sort()
        lines.append(
            f"{key} | {len(durs)} | {len(durs) / secs:.1f} | {durs[len(durs) // 2] / 1e3:.1f} | "
            f"{durs[-1] / 1e3:.1f} | {sum(durs) / 1e3:.0f}"
        )
    ordered = sorted(lat, key=lambda x: -x[1])
    n = max(1, int(len(lat) * worst / 100))
    slow = ordered[:n]
    hit = 0
    causes: collections.Counter = collections.Counter()
    starts = [e[0] for e in hub]
    import bisect

    for ts, d in slow:
        lo = bisect.bisect_left(starts, ts - 50_000_000)
        names = set()
        for start, dur, kind, name in hub[lo:]:
            if start > ts + d:
                break
            if start + dur >= ts:  # overlaps [send, receive]
                names.add(f"{kind} {name.split(':')[0] if kind == 'gc' else name}")
        if names:
            hit += 1
            causes.update(names)
    lines.append(
        f"slowest {n} samples ({worst:g} %: {slow[-1][1] / 1e6:.3f} - {slow[0][1] / 1e6:.3f} ms): "
        f"{hit} overlap a hub event"
    )
    for name, count in causes.most_common():
        lines.append(f"  {name}: {count}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report", help="a latency trace beside a node's hub trace")
    r.add_argument("--lat", required=True, help="bench.loadgen --trace output")
    r.add_argument("--hub", required=True, nargs="+", help="the node's trace file(s)")
    r.add_argument("--worst", type=float, default=1.0, help="percent of the slowest samples to explain")
    a = p.parse_args(argv)
    print(report(a.lat, a.hub, a.worst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
