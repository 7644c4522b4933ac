"""The cluster's metadata plane against a real etcd: latency of its operations and what etcd costs
the gevent hub.

    python -m bench.cluster_metadata [--rounds 300]

Starts a private etcd 3.4 on free loopback ports (temp dir), then measures, without monkey patching:

* ``acquire_session`` of a free client id, and a takeover race of two nodes (p50/p99 of one call);
* a watch's delivery: put on one client -> the PrefixMirror callback of another (p50/p99);
* the hub: the longest gap a 1 ms ticker greenlet sees while requests run, with fluxmq's EtcdClient
  (gevent sockets) and with a plain etcd3gw client (standard library sockets);
* the time from a node's death (its lease left to expire, TTL 2 s) to the leader publishing its will.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import etcd3gw
import gevent

from fluxmq.broker.message import Message
from fluxmq.cluster.metadata import ClusterMetadata, EtcdSettings
from fluxmq.cluster.metadata.client import EtcdClient, PrefixMirror
from fluxmq.cluster.metadata.replicated import WillRegistry


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] * 1000


def _line(name: str, values: list[float]) -> None:
    print(f"| {name} | {len(values)} | {_pct(values, 0.5):.2f} | {_pct(values, 0.99):.2f} |")


def _start_etcd(tmp: Path) -> tuple[subprocess.Popen, str]:
    client, peer = _free_port(), _free_port()
    endpoint = f"http://127.0.0.1:{client}"
    proc = subprocess.Popen(
        [
            shutil.which("etcd"),
            "--name",
            "bench",
            "--data-dir",
            str(tmp / "data"),
            "--listen-client-urls",
            endpoint,
            "--advertise-client-urls",
            endpoint,
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-cluster",
            f"bench=http://127.0.0.1:{peer}",
            "--log-level",
            "error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            urllib.request.urlopen(endpoint + "/health", timeout=1).read()
            return proc, endpoint
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("etcd did not start")


def _meta(endpoint: str, node: str, tmp: Path, ttl: float = 10.0) -> ClusterMetadata:
    meta = ClusterMetadata(
        EtcdSettings(endpoints=[endpoint], lease_ttl=ttl),
        node,
        "127.0.0.1:1",
        prefix="/bench/",
        state_dir=tmp / node,
    )
    meta.start()
    return meta


def _max_gap(work) -> float:
    """The longest pause a 1 ms ticker greenlet sees while ``work`` runs in another greenlet."""
    gaps = []
    stop = []

    def tick():
        last = time.perf_counter()
        while not stop:
            gevent.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = gevent.spawn(tick)
    gevent.sleep(0.01)
    gevent.spawn(work).join()
    stop.append(1)
    ticker.join()
    return max(gaps) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    n = args.rounds
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        proc, endpoint = _start_etcd(tmp)
        try:
            a, b = _meta(endpoint, "a", tmp), _meta(endpoint, "b", tmp)
            print("| operation | samples | p50 ms | p99 ms |\n|---|---:|---:|---:|")
            times = []
            for i in range(n):
                t = time.perf_counter()
                assert a.acquire_session(f"free-{i}") is None
                times.append(time.perf_counter() - t)
            _line("acquire_session (free client id)", times)
            times = []
            for i in range(n):
                t = time.perf_counter()
                assert b.acquire_session(f"free-{i}", take_from="a") is None
                times.append(time.perf_counter() - t)
            _line("acquire_session take_from (takeover CAS)", times)
            race = []
            for i in range(n // 2):
                client = f"race-{i}"
                start = time.perf_counter()
                greenlets = [gevent.spawn(m.acquire_session, client) for m in (a, b)]
                gevent.joinall(greenlets)
                assert sum(g.value is None for g in greenlets) == 1
                race.append(time.perf_counter() - start)
            _line("two nodes racing for one client id (both answered)", race)

            writer, reader = EtcdClient([endpoint]), EtcdClient([endpoint])
            sent: dict[str, float] = {}
            delays: list[float] = []
            mirror = PrefixMirror(
                reader,
                "/bench/watch/",
                lambda k, kv, old: kv is not None and delays.append(time.perf_counter() - sent[k]),
            )
            mirror.start()
            for i in range(n):
                key = f"/bench/watch/{i}"
                sent[key] = time.perf_counter()
                writer.put(key, "x")
                gevent.sleep(0.002)
            deadline = time.monotonic() + 5
            while len(delays) < n and time.monotonic() < deadline:
                gevent.sleep(0.01)
            mirror.stop()
            _line("watch delivery (put -> other client's callback)", delays)

            ours = _max_gap(lambda: [writer.get("/bench/watch/1") for _ in range(n)])
            host, port = endpoint.rsplit("//", 1)[1].split(":")
            plain = etcd3gw.client(host=host, port=int(port))
            theirs = _max_gap(lambda: [plain.get("/bench/watch/1") for _ in range(n)])
            print(
                f"\nlongest hub pause during {n} gets: EtcdClient (gevent sockets) {ours:.1f} ms, "
                f"plain etcd3gw (blocking sockets, unpatched) {theirs:.1f} ms"
            )
            a.stop()
            b.stop()

            published: list[float] = []
            dead = _meta(endpoint, "dead", tmp, ttl=2)
            leader = _meta(endpoint, "leader", tmp, ttl=2)
            wills_dead = WillRegistry(dead, lambda m: None)
            wills_leader = WillRegistry(
                leader, lambda m: published.append(time.perf_counter()), sweep_interval=0.1
            )
            wills_dead.start()
            wills_leader.start()
            wills_dead.put("dev", Message("will/dev", b"bye", 1, False))
            wills_dead.stop()
            dead.membership.stop()
            dead.election.stop()
            killed = time.perf_counter()
            dead.lease.stop(revoke=False)  # as if killed: the lease runs out
            deadline = time.monotonic() + 15
            while not published and time.monotonic() < deadline:
                gevent.sleep(0.01)
            if published:
                print(
                    f"node death -> its will published by the leader: {(published[0] - killed) * 1000:.0f} ms "
                    "(lease TTL 2 s)"
                )
            wills_leader.stop()
            leader.stop()
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
