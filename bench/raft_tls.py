"""CPU per replicated message with the Raft transport plain, with ``cluster.raft.password`` and over
mutual TLS (``cluster.raft.tls``), and both.

Three real ``fluxmq-node`` processes on loopback (tests.conftest.NodeFactory), a replicated queue
``bench`` (``mode: sync, replication_factor: 3, min_in_sync_replicas: 2``), one raw MQTT 5.0
producer on the Raft leader (bench.raft_queue.produce: ``--count`` QoS 1 publishes, ``--window`` in
flight, 64-byte payloads). Each node's CPU (utime + stime of its process tree, /proc) is read before
and after the timed run (after a warm-up), and divided by the acknowledged messages: the leader's
and the mean of the two followers', in microseconds per message. The machine is shared, so wall
rates are noisy; CPU per message much less so. The modes run in turn, ``--rounds`` times.

    .venv/bin/python -m bench.raft_tls --count 20000 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"  # noqa: A001

from bench import procinfo  # noqa: E402
from bench.raft_queue import produce  # noqa: E402
from tests.certs import CertAuthority  # noqa: E402
from tests.conftest import NodeFactory, free_port  # noqa: E402

MODES = ("plain", "password", "mtls", "mtls+password")

CONFIG = """
cluster:
  raft:
    enabled: true
    bind_addr: "{me}"
    peers: {peers}
{tls}
queues:
  - name: bench
    replication: {{enabled: true, mode: sync, replication_factor: 3, min_in_sync_replicas: 2}}
"""


def _tls(cert, ca_file: str) -> str:
    return (
        f'    tls: {{enabled: true, cert_file: "{cert.cert_file}", key_file: "{cert.key_file}", '
        f'ca_file: "{ca_file}", client_auth: require}}'
    )


def _status(node) -> dict:
    return node.http_get("/cluster/raft")[1]["groups"][0]


def run(mode: str, base: Path, count: int, window: int) -> dict:
    factory = NodeFactory(base / mode)
    try:
        peers = [f"127.0.0.1:{free_port()}" for _ in range(3)]
        tls = [""] * 3
        if "mtls" in mode:
            ca = CertAuthority(base / mode / "pki")
            tls = [_tls(ca.issue_node(f"n{i}", hosts=("127.0.0.1",)), ca.cert_file) for i in range(3)]
        env = {"FLUXMQ_CLUSTER_RAFT_PASSWORD": "bench-secret"} if "password" in mode else {}
        nodes = [
            factory(
                config_text=CONFIG.format(me=p, peers=json.dumps(peers), tls=tls[i]),
                wait_ready=False,
                env=env,
            )
            for i, p in enumerate(peers)
        ]
        for n in nodes:
            n.wait_ready()
        deadline = time.monotonic() + 30
        leader = None
        while leader is None and time.monotonic() < deadline:
            leader = next((n for n in nodes if _status(n)["delivering"]), None)
            time.sleep(0.1)
        if leader is None:
            raise RuntimeError(f"{mode}: no leader")
        produce(leader.mqtt_port, 2000, window)  # warm-up: connections, caches
        followers = [n for n in nodes if n is not leader]
        cpu0 = {n.pid: procinfo.tree_cpu_s([n.pid]) for n in nodes}
        out = produce(leader.mqtt_port, count, window)
        cpu1 = {n.pid: procinfo.tree_cpu_s([n.pid]) for n in nodes}
        acked = max(out["acked"], 1)
        per = {pid: (cpu1[pid] - cpu0[pid]) / acked * 1e6 for pid in cpu0}
        return {
            "mode": mode,
            "acked": out["acked"],
            "failed": out["failed"],
            "rate": out["rate"],
            "leader_us_per_msg": round(per[leader.pid], 1),
            "follower_us_per_msg": round(sum(per[f.pid] for f in followers) / len(followers), 1),
            "entries_applied": _status(leader)["entries_applied"],
        }
    finally:
        factory.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="bench-raft-tls-"))
    try:
        for r in range(args.rounds):
            for mode in args.modes.split(","):
                print(
                    json.dumps({"round": r, **run(mode, base / f"r{r}", args.count, args.window)}), flush=True
                )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
