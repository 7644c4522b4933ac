"""A large store and what it costs the hub: start-up load/restore, commits, queue reads (issue 17 item 6).

Builds a store of ``--sessions`` persistent sessions (one subscription each) holding ``--messages``
queued QoS 1 messages in total, written directly through ``LMDBStorage`` (no broker), then times:

* ``open``: ``LMDBStorage(...)`` including the verify child that reads every page;
* ``load``: ``storage.load()``; ``restore``: ``Broker.restore(state)``; ``first commit`` after it;
* ``hub stalls`` while a worker-style start runs (``BrokerService``-like: load in the threadpool,
  restore in slices): the longest gap a 1 ms ticker greenlet saw;
* single operations the hub does at run time: a commit of a session's end (prefix deletes and the
  first GC chunk of its queue), a GC chunk, a DiskQueue read-ahead of 32 entries, a commit of a
  typical turn (100 QoS 1 in-flight puts);
* with ``--node``: a real node (``python -m fluxmq.node.cli``) started on the store with
  ``server.worker_timeout`` set to ``--worker-timeout``: seconds until ``/ready`` answers 200 and
  whether the arbiter restarted the worker.

Usage::

    /work/main/.venv/bin/python -m bench.bigstore --path /tmp/bigstore            # build + time
    /work/main/.venv/bin/python -m bench.bigstore --path /tmp/bigstore --reuse --node

Prints one Markdown table (and nothing is written elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import gevent

from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.broker.message import Message
from fluxmq.storage import records as r
from fluxmq.storage.lmdb import GC_CHUNK, LMDBStorage

GiB = 1 << 30


def client_id(i: int) -> str:
    return f"client-{i:07d}"


def build(path: Path, sessions: int, messages: int, payload: int) -> float:
    """Write the store; returns the seconds it took."""
    started = time.perf_counter()
    st = LMDBStorage(path, map_size=8 * GiB, sync="none", verify=False)
    per = max(1, messages // sessions)
    ops = 0
    body = b"x" * payload
    for i in range(sessions):
        cid = client_id(i)
        st.put_session(cid, 0xFFFFFFFF, time.time(), None)
        st.put_subscription(cid, f"dev/{i}/#", 1, False, False, 0, 0)
        entry = r.encode_entry(Message(f"dev/{i}/m", body, 1), 1, False, None)
        for seq in range(per):
            st.queue_append(cid, seq, entry)
        ops += per + 2
        if ops >= 50_000:
            st.commit()
            ops = 0
    st.commit()
    st.close()
    return time.perf_counter() - started


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def longest_stall(fn) -> tuple[float, float]:
    """Run ``fn`` in a greenlet while a ticker greenlet sleeps 1 ms at a time; (seconds fn took,
    longest gap the ticker saw): the longest the hub could not run anything else."""
    gaps = [0.0]
    done = [False]

    def tick() -> None:
        last = time.perf_counter()
        while not done[0]:
            gevent.sleep(0.001)
            now = time.perf_counter()
            gaps[0] = max(gaps[0], now - last)
            last = now

    ticker = gevent.spawn(tick)
    gevent.sleep(0)
    t = time.perf_counter()
    g = gevent.spawn(fn)
    g.join()
    took = time.perf_counter() - t
    done[0] = True
    ticker.join()
    if g.exception is not None:
        raise g.exception
    return took, gaps[0]


def run_ops(st: LMDBStorage, sessions: int) -> list[tuple[str, float]]:
    """Time single run-time operations of the hub on the big store."""
    out = []
    cid = client_id(sessions - 1)
    _, t = timed(st.queue_read, cid, range(0, 32))
    out.append(("DiskQueue read-ahead (32 entries)", t))
    for i in range(100):
        st.put_inflight(client_id(i), 1, Message("t", b"x" * 100, 1), 1, False, None)
    _, t = timed(st.commit)
    out.append(("commit of a turn: 100 in-flight puts", t))
    st.delete_session(client_id(0), 10)
    _, t = timed(st.commit)
    out.append(("commit of a session's end (prefix deletes + its queue)", t))
    entry = r.encode_entry(Message("long/q", b"x" * 64, 1), 1, False, None)
    for seq in range(10_000):
        st.queue_append("long-queue", seq, entry)
    _, t = timed(st.commit)
    out.append(("commit of a turn: 10,000 queue appends", t))
    st.delete_session("long-queue", 10_000)
    _, t = timed(st.commit)
    out.append((f"commit of a GC chunk ({GC_CHUNK:,} queue entries of an ended session)", t))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(path: Path, worker_timeout: float, wait: float) -> dict:
    """Start a real node on the store; seconds until /ready is 200 and the worker pids seen."""
    work = path.parent / (path.name + "-node")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    health = free_port()
    config = {
        "server": {
            "tcp": {"plain": {"addr": f"127.0.0.1:{free_port()}"}},
            "websocket": {"plain": {"addr": ""}},
            "http": {"plain": {"addr": ""}},
            "admin": {"addr": ""},
            "health_addr": f"127.0.0.1:{health}",
            "worker_timeout": f"{worker_timeout}s",
        },
        "storage": {"path": str(path), "map_size": "8GiB"},
    }
    cfg = work / "fluxmq.json"  # YAML is a superset of JSON
    cfg.write_text(json.dumps(config))
    log = work / "node.log"
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(repo), PYTHONUNBUFFERED="1")
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fluxmq.node.cli", "--config", str(cfg)],
            cwd=repo,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    ready_after = None
    try:
        while time.monotonic() - started < wait and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health}/ready", timeout=2) as resp:
                    if resp.status == 200:
                        ready_after = time.monotonic() - started
                        break
            except OSError:
                pass
            time.sleep(0.2)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    return {
        "ready_after": ready_after,
        "worker_restarts": text.count("WORKER TIMEOUT") + text.count("worker_timeout"),
        "booted": text.count("Booting worker"),
        "log": str(log),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", type=Path, default=Path("/tmp/fluxmq-bigstore"))
    ap.add_argument("--sessions", type=int, default=100_000)
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--payload", type=int, default=64)
    ap.add_argument("--reuse", action="store_true", help="time an existing store instead of building one")
    ap.add_argument("--node", action="store_true", help="also start a real node on the store")
    ap.add_argument("--worker-timeout", type=float, default=5.0)
    ap.add_argument("--node-wait", type=float, default=600.0)
    args = ap.parse_args()
    rows: list[tuple[str, str]] = []
    if not args.reuse:
        shutil.rmtree(args.path, ignore_errors=True)
        rows.append(("build", f"{build(args.path, args.sessions, args.messages, args.payload):.1f} s"))
    size = (args.path / "data.mdb").stat().st_size
    rows.append(("data.mdb", f"{size / (1 << 20):.0f} MiB"))
    st, t = timed(LMDBStorage, args.path, 8 * GiB, "batch")
    rows.append(("open (with the verify child)", f"{t:.2f} s"))
    state, t = timed(st.load)
    rows.append(("storage.load() in the hub", f"{t:.2f} s"))
    broker = Broker(BrokerSettings(), st)
    _, t = timed(broker.restore, state)
    rows.append(("Broker.restore() in the hub", f"{t:.2f} s"))
    _, t = timed(st.commit)
    rows.append(("first commit after restore", f"{t * 1000:.1f} ms"))
    st.close()
    del state, broker
    # The worker's way: load in the threadpool, restore in slices (fluxmq.node.service).
    from fluxmq.node.service import load_and_restore

    st = LMDBStorage(args.path, 8 * GiB, "batch", verify=False)
    holder: list = []
    took, gap = longest_stall(lambda: holder.append(load_and_restore(st, Broker(BrokerSettings(), st))))
    rows.append(("load + restore as the worker does", f"{took:.2f} s, longest hub stall {gap * 1000:.0f} ms"))
    holder.clear()
    for name, t in run_ops(st, args.sessions):
        rows.append((name, f"{t * 1000:.2f} ms"))
    st.close()
    if args.node:
        res = start_node(args.path, args.worker_timeout, args.node_wait)
        ready = f"{res['ready_after']:.1f} s" if res["ready_after"] is not None else "never"
        rows.append(
            (
                f"node start, worker timeout {args.worker_timeout:g} s",
                f"ready after {ready}, workers booted {res['booted']}, timeouts {res['worker_restarts']}",
            )
        )
    print(f"store: {args.sessions:,} sessions, {args.messages:,} queued messages of {args.payload} B")
    print("| step | figure |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
