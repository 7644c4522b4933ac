"""The latency of a lone message that finds the caches cold: the latency scenario with a polluter.

``bench/compare --scenario latency`` runs mqttload at 1,000 msg/s with the broker on the same CPU;
its p99 is set by the ~1-2 % of messages that arrive after the host ran something else on the vCPU
(cold caches and TLB), which makes it depend on the machine's mood.  Here every message is cold on
purpose: a copy of mqttload (``bench/latency_tail.py``'s per-sample dump, plus the insertions of
``POLLUTE``) reads ``--pollute`` MiB (every 64-byte line of its own buffer, 4 KiB pages) right
before it stamps and writes each message, and only once the previous message has arrived (with
``--code`` it then also runs that many MiB of code, a jump in every 64-byte line).  The
generator runs on the broker's CPU, so the read evicts the broker's lines from that core's L1 and
L2 (512 KiB on this EPYC), as much of the L3 as the size reaches, and the TLB entries (2,048 in the
second level: 8 MiB of 4 KiB pages).  The p50 of such a run is then the cold cost of a lone
message; ``--pollute 0`` is the same run without it (the warm case).

Brokers alternate within each round (Mosquitto, fluxmq, ``--tree`` / ``--env`` variants), and the
figures are per run: p50 / p90 / p99 in us from the dump::

    python -m bench.lone_cold [--rounds 4] [--pollute 0,4,48] [--rate 200] [--duration 5]
        [--variant NAME:ENV=VALUE[,ENV=VALUE]] [--tree NAME=DIR]

``--variant hp:PYTHONMALLOC=malloc,GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` runs the fluxmq node
with those variables in its environment as broker ``hp``; the pseudo-variable ``@collapse`` (as in
``--variant thp:@collapse``) instead puts the node's anonymous memory into 2 MiB pages once the
generator's clients are connected (``bench.lone_footprint.collapse``: ``process_madvise(MADV_COLLAPSE)``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"  # noqa: A001

from bench import brokers as brokers_mod
from bench import procinfo
from bench.brokers import FluxmqNode, Mosquitto
from bench.compare import MQTTLOAD_SRC, OUT_DIR
from bench.latency_tail import load, patched_source, pct
from bench.lone_footprint import collapse

#: (anchor in latency_tail's patched mqttload.c, text inserted before it); each occurs once
POLLUTE = [
    ("#include <sys/epoll.h>\n", "#include <sys/mman.h>\n"),
    (
        "static uint64_t *tr_send, *tr_recv",
        "static volatile uint8_t *pol_buf;\nstatic size_t pol_len;\nstatic volatile uint64_t pol_sink;\n"
        "static void (*pol_code)(void);\n"
        "static long pol_branches;\n"
        "#define PF(n) static uint64_t pf##n(uint64_t x) { return x * (n + 3) + n; }\n"
        "PF(0) PF(1) PF(2) PF(3) PF(4) PF(5) PF(6) PF(7) PF(8) PF(9) PF(10) PF(11) PF(12) PF(13) PF(14) PF(15)\n"
        "static uint64_t (*const pol_fns[16])(uint64_t) = {pf0, pf1, pf2, pf3, pf4, pf5, pf6, pf7, pf8, pf9,\n"
        "    pf10, pf11, pf12, pf13, pf14, pf15};\n"
        "static void pollute_branches(void)\n{\n"
        "    static uint32_t r = 12345;\n    uint64_t s = 0;\n"
        "    for (long i = 0; i < pol_branches; i++) { /* random directions, random indirect targets */\n"
        "        r = r * 1103515245u + 12345u;\n"
        "        if (r & 0x10000) s += (uint64_t)i; else s ^= (uint64_t)i;\n"
        "        if (r & 0x20000) s += r >> 3;\n"
        "        s = pol_fns[(r >> 24) & 15](s);\n"
        "    }\n    pol_sink += s;\n}\n"
        "static void pollute(void)\n{\n    uint64_t s = 0;\n"
        "    for (size_t i = 0; i < pol_len; i += 64) s += pol_buf[i];\n    pol_sink += s;\n"
        "    if (pol_code) pol_code();\n"
        "    if (pol_branches) pollute_branches();\n}\n",
    ),
    (
        "        uint8_t *m = c->wbuf + c->wlen;\n",
        "        if (cfg.mode == M_LATENCY && pol_buf) {\n"
        "            if (recv_unique < c->sent) break; /* the last message first: each travels alone */\n"
        "            pollute();\n"
        "        }\n",
    ),
    (
        "    long rss0 = read_rss_kb(cfg.pid), rss_peak = rss0;\n",
        '    if (getenv("MQTTLOAD_POLLUTE_MB") && atof(getenv("MQTTLOAD_POLLUTE_MB")) > 0) {\n'
        '        pol_len = (size_t)(atof(getenv("MQTTLOAD_POLLUTE_MB")) * 1048576.0);\n'
        "        void *p = mmap(NULL, pol_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);\n"
        '        if (p == MAP_FAILED) die("mmap: %s", strerror(errno));\n'
        "        madvise(p, pol_len, MADV_NOHUGEPAGE);\n"
        "        memset(p, 1, pol_len);\n"
        "        pol_buf = p;\n"
        "    }\n"
        '    if (getenv("MQTTLOAD_POLLUTE_CODE_MB") && atof(getenv("MQTTLOAD_POLLUTE_CODE_MB")) > 0) {\n'
        '        size_t n = (size_t)(atof(getenv("MQTTLOAD_POLLUTE_CODE_MB")) * 1048576.0);\n'
        "        uint8_t *c = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);\n"
        '        if (c == MAP_FAILED) die("mmap: %s", strerror(errno));\n'
        "        madvise(c, n, MADV_NOHUGEPAGE);\n"
        "        for (size_t i = 0; i + 64 <= n; i += 64) { /* a jmp to the next line in each line, ret in the last */\n"
        "            if (i + 128 > n) { c[i] = 0xc3; break; }\n"
        "            int32_t rel = 64 - 5;\n"
        "            c[i] = 0xe9;\n"
        "            memcpy(c + i + 1, &rel, 4);\n"
        "        }\n"
        '        if (mprotect(c, n, PROT_READ | PROT_EXEC)) die("mprotect: %s", strerror(errno));\n'
        "        pol_code = (void (*)(void))c;\n"
        "        if (!pol_buf) { pol_buf = c; pol_len = 0; }\n"
        "    }\n"
        '    if (getenv("MQTTLOAD_POLLUTE_BRANCHES") && atol(getenv("MQTTLOAD_POLLUTE_BRANCHES")) > 0) {\n'
        '        pol_branches = atol(getenv("MQTTLOAD_POLLUTE_BRANCHES"));\n'
        "        if (!pol_buf) { pol_buf = (volatile uint8_t *)&pol_sink; pol_len = 0; }\n"
        "    }\n",
    ),
]


def build(src: Path = MQTTLOAD_SRC, out: Path = OUT_DIR / "mqttload_cold") -> str:
    """Build the polluting copy into bench/out/ (again when the source or a patch is newer)."""
    newest = max(src.stat().st_mtime, Path(__file__).stat().st_mtime,
                 (Path(__file__).parent / "latency_tail.py").stat().st_mtime)  # fmt: skip
    if out.exists() and out.stat().st_mtime >= newest:
        return str(out)
    text = patched_source(src.read_text())
    for anchor, ins in POLLUTE:
        if text.count(anchor) != 1:
            raise SystemExit(f"mqttload.c changed: anchor {anchor!r} found {text.count(anchor)} times")
        text = text.replace(anchor, ins + anchor)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    c = out.with_suffix(".c")
    c.write_text(text)
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(c)], check=True)
    return str(out)


SPIN_C = 'int main(void) { for (;;) __asm__ volatile("" ::: "memory"); }\n'


def build_spin(out: Path = OUT_DIR / "spin_cpu") -> str:
    """A busy loop that touches no memory (``--spin``: keeps the vCPU from halting between messages)."""
    if not out.exists():
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".c").write_text(SPIN_C)
        subprocess.run(["gcc", "-O2", "-o", str(out), str(out.with_suffix(".c"))], check=True)
    return str(out)


def schedstat_ns(pid: int) -> int:
    """CPU time (ns) of a process's main thread so far (/proc/PID/schedstat)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def run_one(kind: str, gen: str, cpu: str, dump: Path, mib: float, rate: float, duration: float,
            env: dict[str, str], sets: list[str], tree: str | None, code_mib: float = 0.0,
            spin: str | None = None, branches: int = 0) -> dict:  # fmt: skip
    """One run against a fresh broker: p50 / p90 / p99 (us) of its samples."""
    saved = brokers_mod.REPO
    if tree:
        brokers_mod.REPO = Path(tree)
    env = dict(env)
    want_collapse = env.pop("@collapse", None) is not None
    try:
        b = Mosquitto(cpus=cpu) if kind == "mosquitto" else FluxmqNode(cpus=cpu, sets=sets)
        if env:
            base_env = b.env
            b.env = lambda: {**(base_env() or os.environ), **env}  # type: ignore[method-assign]
        b.start(timeout=60)
    finally:
        brokers_mod.REPO = saved
    try:
        cmd = ["taskset", "-c", cpu, gen, "--mode", "latency", "--rate", str(rate), "--duration", str(duration),
               "--host", "127.0.0.1", "--port", str(b.port), "--pid", str(b.cpu_pid), "--label", kind,
               "--timeout", str(duration * 3 + 30), "--settle", "1.0"]  # fmt: skip
        genv = dict(
            os.environ,
            MQTTLOAD_DUMP=str(dump),
            MQTTLOAD_NO_RSS="1",
            MQTTLOAD_POLLUTE_MB=str(mib),
            MQTTLOAD_POLLUTE_CODE_MB=str(code_mib if mib > 0 else 0),
            MQTTLOAD_POLLUTE_BRANCHES=str(branches if mib > 0 else 0),
        )
        t0 = time.monotonic()
        collapsed = None
        spinner = subprocess.Popen(["nice", "-n", "19", "taskset", "-c", cpu, spin]) if spin else None
        g = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=genv)
        if want_collapse:  # within the generator's settle second: its connections exist, no message yet
            time.sleep(0.6)
            collapsed = collapse(b.cpu_pid)
        cpu0 = schedstat_ns(b.cpu_pid)
        try:
            out, err = g.communicate(timeout=duration * 3 + 60)
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
        p = subprocess.CompletedProcess(cmd, g.returncode, out, err)
        cpu1 = schedstat_ns(b.cpu_pid)
        took = time.monotonic() - t0
        if not dump.exists():
            return {"error": p.stderr[-300:]}
        samples, _ = load(dump)
        lat = sorted((r - s) / 1000 for s, r in samples)
        other = [x.split("=", 1)[1] for x in p.stdout.split() if x.startswith("other_cpu=")]
        return {"n": len(lat), "p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99), "took": took,
                "other": other[0] if other else "?", "cpu": (cpu1 - cpu0) / 1000 / max(1, len(lat)),
                "collapsed": collapsed}  # fmt: skip
    finally:
        b.stop()
        b.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--pollute", default="0,4,48", help="MiB read before each message (comma list; 0 = warm)")
    ap.add_argument("--code", type=float, default=0.0, help="MiB of code (a jump per 64-byte line) run "
                    "after the data read, when --pollute is not 0: evicts the instruction caches, the "
                    "branch targets and the instruction TLB too")  # fmt: skip
    ap.add_argument("--branches", type=int, default=0, help="iterations of a loop of random branch "
                    "directions and indirect calls run after the reads, when --pollute is not 0: evicts the "
                    "branch predictors' history")  # fmt: skip
    ap.add_argument("--spin", action="store_true", help="a nice-19 busy loop (no memory) on the CPU during "
                    "each run: the vCPU never halts between messages, its caches stay as the messages left them")  # fmt: skip
    ap.add_argument("--rate", type=float, default=200.0, help="messages/s (each waits for the last anyway)")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--cpu", default="1", help="the one CPU of broker and generator")
    ap.add_argument(
        "--brokers", default="mosquitto,fluxmq", help="mosquitto, fluxmq, and variant / tree names"
    )
    ap.add_argument("--variant", action="append", default=[], help="NAME:ENV=VALUE[,ENV=VALUE]: a fluxmq node "
                    "with these environment variables, run as broker NAME")  # fmt: skip
    ap.add_argument(
        "--tree", action="append", default=[], help="NAME=DIR: a fluxmq checkout run as broker NAME"
    )
    ap.add_argument("--set", action="append", default=[], dest="sets", help="fluxmq --set KEY=VALUE")
    ap.add_argument("--wait-quiet", type=float, default=0.0, help="before each run wait up to SECONDS for "
                    "other load to drop to 0.25 CPU")  # fmt: skip
    ap.add_argument("--src", default=str(MQTTLOAD_SRC), help="mqttload.c (default: ../shared/tools/)")
    args = ap.parse_args(argv)
    variants: dict[str, dict[str, str]] = {}
    for v in args.variant:
        name, _, kvs = v.partition(":")
        variants[name] = dict((kv + ("" if "=" in kv else "=")).split("=", 1) for kv in kvs.split(",") if kv)
    trees = dict(t.split("=", 1) for t in args.tree)
    names = [n for n in args.brokers.split(",") if n]
    names += [n for n in (*variants, *trees) if n not in names]
    gen = build(Path(args.src))
    spin = build_spin() if args.spin else None
    d = Path(tempfile.mkdtemp(prefix="lonecold-"))
    res: dict[tuple[str, float], list[dict]] = {}
    for rnd in range(args.rounds):
        for mib in [float(x) for x in args.pollute.split(",") if x]:
            for name in names:
                kind = "mosquitto" if name == "mosquitto" else "fluxmq"
                dump = d / f"{name}-{rnd}-{mib}.txt"
                if args.wait_quiet > 0:
                    procinfo.wait_quiet(0.25, args.wait_quiet)
                r = run_one(kind, gen, args.cpu, dump, mib, args.rate, args.duration, variants.get(name, {}),
                            args.sets, trees.get(name), args.code,
                    spin, args.branches)  # fmt: skip
                res.setdefault((name, mib), []).append(r)
                if "error" in r:
                    print(f"round {rnd} pollute {mib:g} MiB {name}: {r['error']}", flush=True)
                    continue
                print(f"round {rnd} pollute {mib:g} MiB {name}: p50 {r['p50']:.1f} p90 {r['p90']:.1f} "
                      f"p99 {r['p99']:.1f} us, broker CPU {r['cpu']:.1f} us/msg ({r['n']} samples, other procs {r['other']}, "
                      f"load {os.getloadavg()[0]:.2f}{', collapsed ' + str(r['collapsed']) if r['collapsed'] else ''})", flush=True)  # fmt: skip
    print(
        "\nmedians over the rounds (p50 / p90 / p99 us; broker CPU us per message, which includes its idle"
        " turns / the messages):"
    )
    for (name, mib), rs in res.items():
        ok = [r for r in rs if "error" not in r]
        if ok:
            m = [statistics.median(r[k] for r in ok) for k in ("p50", "p90", "p99", "cpu")]
            p50s = ", ".join(f"{r['p50']:.1f}" for r in ok)
            cpus = ", ".join(f"{r['cpu']:.1f}" for r in ok)
            print(
                f"  pollute {mib:5g} MiB {name:12s} {m[0]:6.1f} / {m[1]:6.1f} / {m[2]:6.1f}   CPU {m[3]:5.1f}"
                f"   (p50s {p50s}; CPU {cpus})"
            )
    print(
        f"\npaired by round, each broker against {names[0]} (median of the rounds' differences; p50 us, CPU us):"
    )
    for (name, mib), rs in res.items():
        if name == names[0]:
            continue
        pairs = [
            (r, b)
            for r, b in zip(rs, res[(names[0], mib)], strict=False)
            if "error" not in r and "error" not in b
        ]
        if pairs:
            dp = sorted(r["p50"] - b["p50"] for r, b in pairs)
            dc = sorted(r["cpu"] - b["cpu"] for r, b in pairs)
            print(
                f"  pollute {mib:5g} MiB {name:12s} p50 {statistics.median(dp):+6.1f} ({', '.join(f'{x:+.1f}' for x in dp)})"
                f"   CPU {statistics.median(dc):+5.1f} ({', '.join(f'{x:+.1f}' for x in dc)})"
            )
    for f in d.iterdir():
        f.unlink()
    d.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
