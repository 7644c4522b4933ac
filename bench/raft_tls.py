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

``--micro`` measures the transport alone, in this process: ``--frames`` frames of ``--frame-bytes``
(a Raft entry's size: about 100 replicated messages of 64-byte payload) sent from a dialled
connection to an accepted one over loopback: pysyncobj's TcpConnection (``pysyncobj``), ours plain
(``plain``, what a node runs without TLS) and over TLS, each also with the password, driven by
pysyncobj's select poller; process CPU time per frame covers both
ends (encrypt and decrypt, pickling and zlib included).

    .venv/bin/python -m bench.raft_tls --micro --frames 3000 --frame-bytes 12000

``--handshakes N`` measures the CPU of N TLS handshakes (both ends, EC P-256 certificates).

Under a loaded machine CPU time is noisy; instructions are not: run one kind under callgrind at two
frame counts and divide the difference (bench/RESULTS.md has the commands).
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
from types import SimpleNamespace

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"  # noqa: A001

from bench import procinfo  # noqa: E402
from bench.raft_queue import produce  # noqa: E402
from tests.certs import CertAuthority  # noqa: E402
from tests.conftest import NodeFactory, free_port  # noqa: E402

BUF = 2**16  # pysyncobj's SyncObjConf default send/recv buffer sizes (group.py keeps them)
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


def _node_tls(pki: Path):
    """``raft_tls`` of a node whose certificate (for 127.0.0.1) a new CA in ``pki`` issued, client
    certificates required: both ends of the micro benchmarks."""
    from fluxmq.replication.transport import raft_tls

    ca = CertAuthority(pki)
    cert = ca.issue_node("n", hosts=("127.0.0.1",))
    tls = SimpleNamespace(
        enabled=True,
        cert_file=cert.cert_file,
        key_file=cert.key_file,
        ca_file=ca.cert_file,
        client_auth="require",
        min_version="TLS1.2",
        cipher_suites=[],
        server_name="",
    )
    return raft_tls(SimpleNamespace(tls=tls, password=""))


def micro(kind: str, frames: int, frame_bytes: int, base: Path) -> dict:
    from pysyncobj.encryptor import getEncryptor
    from pysyncobj.poller import createPoller
    from pysyncobj.tcp_connection import TcpConnection
    from pysyncobj.tcp_server import TcpServer

    from fluxmq.replication.transport import RaftConnection, RaftServer

    poller = createPoller("select")
    port = free_port()
    got: list = []
    accepted: list = []
    encryptor = getEncryptor("bench-secret") if "password" in kind else None

    def on_new(conn) -> None:
        conn.encryptor = encryptor
        accepted.append(conn)
        conn.setOnMessageReceivedCallback(lambda m: got.append(len(m)))

    if "tls" in kind:
        tls = _node_tls(base / "micro-pki")
        server = RaftServer(poller, "127.0.0.1", port, on_new, BUF, BUF, tls=tls)
        client = RaftConnection(
            poller, timeout=30.0, sendBufferSize=BUF, recvBufferSize=BUF, tls=tls, server_hostname="127.0.0.1"
        )
    elif kind.startswith("pysyncobj"):  # pysyncobj's own (plain TCP before 2026-12-05)
        server = TcpServer(poller, "127.0.0.1", port, on_new, BUF, BUF)
        client = TcpConnection(poller, timeout=30.0, sendBufferSize=BUF, recvBufferSize=BUF)
    else:  # plain TCP on the connection of ours (cluster.raft.tls off)
        server = RaftServer(poller, "127.0.0.1", port, on_new, BUF, BUF, tls=None)
        client = RaftConnection(poller, timeout=30.0, sendBufferSize=BUF, recvBufferSize=BUF, tls=None)
    client.encryptor = encryptor
    server.bind()
    up: list = []
    client.setOnConnectedCallback(lambda: up.append(1))
    client.connect("127.0.0.1", port)
    deadline = time.monotonic() + 10
    while not up and time.monotonic() < deadline:
        poller.poll(0.01)
    import random

    rnd = random.Random(1)
    # payload-like bytes: zlib gains little on them, as on real message payloads
    frame = [rnd.randbytes(64) + b"k" * 40 for _ in range(frame_bytes // 104)]
    t0 = time.process_time()
    for _ in range(frames):
        client.send(frame)
        while client.getSendBufferSize() > 4 * frame_bytes:
            poller.poll(0.001)
        poller.poll(0)
    deadline = time.monotonic() + 60
    while len(got) < frames and time.monotonic() < deadline:
        poller.poll(0.01)
    cpu = time.process_time() - t0
    client.disconnect()
    server.unbind()
    return {
        "kind": kind,
        "frames": len(got),
        "frame_bytes": frame_bytes,
        "cpu_us_per_frame": round(cpu / max(len(got), 1) * 1e6, 1),
    }


def handshakes(count: int, base: Path) -> dict:
    """CPU time (this process: both ends) of ``count`` TLS handshakes between a dialled
    RaftConnection and a RaftServer, pysyncobj's select poller driving them."""
    from pysyncobj.poller import createPoller

    from fluxmq.replication.transport import RaftConnection, RaftServer

    tls = _node_tls(base / "hs-pki")
    poller = createPoller("select")
    port = free_port()
    accepted: list = []
    server = RaftServer(poller, "127.0.0.1", port, accepted.append, tls=tls)
    server.bind()
    times = []
    for _ in range(count):
        conn = RaftConnection(poller, timeout=10.0, tls=tls, server_hostname="127.0.0.1")
        up: list = []
        conn.setOnConnectedCallback(lambda up=up: up.append(1))
        t0 = time.process_time()
        conn.connect("127.0.0.1", port)
        deadline = time.monotonic() + 10
        while (not up or not accepted or not accepted[-1]._secure) and time.monotonic() < deadline:
            poller.poll(0.001)
        times.append(time.process_time() - t0)
        conn.disconnect()
        accepted[-1].disconnect()
    server.unbind()
    times.sort()
    return {
        "handshakes": count,
        "cpu_ms_both_ends_p50": round(times[len(times) // 2] * 1e3, 2),
        "min": round(times[0] * 1e3, 2),
        "max": round(times[-1] * 1e3, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--micro", action="store_true")
    ap.add_argument("--handshakes", type=int, default=0, help="measure N TLS handshakes instead")
    ap.add_argument("--frames", type=int, default=3000)
    ap.add_argument("--frame-bytes", type=int, default=12000)
    ap.add_argument("--kinds", default="pysyncobj,plain,tls,pysyncobj+password,password,tls+password")
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="bench-raft-tls-"))
    try:
        if args.handshakes:
            print(json.dumps(handshakes(args.handshakes, base)))
            return 0
        if args.micro:
            for r in range(args.rounds):
                for kind in args.kinds.split(","):
                    print(
                        json.dumps({"round": r, **micro(kind, args.frames, args.frame_bytes, base)}),
                        flush=True,
                    )
            return 0
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
