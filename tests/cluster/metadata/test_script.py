"""scripts/cluster up 3 / status / down: three nodes from conf/cluster/ on their fixed ports, each with
its own etcd member, stopped by PID. Skipped when one of those ports is taken on this machine."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[3]
PORTS = (
    1884,
    1885,
    1886,
    8181,
    8182,
    8183,
    2379,
    2380,
    2381,
    2382,
    2383,
    2384,
    7948,
    7949,
    7950,
    7100,
    7200,
    7300,
)


def _busy(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _cluster(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "NODE_PYTHON": sys.executable}
    return subprocess.run(
        [str(ROOT / "scripts" / "cluster"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _pids() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"conf/cluster/node" in cmd or (b"etcd" in cmd and b"run/cluster/node" in cmd):
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto-clients not installed")
def test_up_starts_three_nodes_that_share_retained_messages_and_down_stops_them():
    busy = [port for port in PORTS if _busy(port)]
    if busy or _pids():
        pytest.skip(f"ports {busy} or a cluster from scripts/cluster are in use on this machine")
    state = ROOT / "run" / "cluster"
    ours = not state.exists()  # a stopped cluster's state (its sessions) is left as it was
    try:
        up = _cluster("up", "3")
        assert up.returncode == 0, up.stderr
        assert "node3 ready: MQTT 127.0.0.1:1886" in up.stderr
        status = _cluster("status").stdout
        assert status.count('"cluster_mode": true') == 3
        assert status.count('"is_leader": true') == 1
        subprocess.run(
            ["mosquitto_pub", "-p", "1885", "-t", "script/r", "-m", "from node2", "-r", "-q", "1"],
            check=True,
            timeout=10,
        )
        # Set on node2, read on node1 through etcd: replication is asynchronous (the publisher's
        # PUBACK does not wait for etcd), so a subscriber may come before it; ask again, bounded.
        for _ in range(10):
            got = subprocess.run(
                ["mosquitto_sub", "-p", "1884", "-t", "script/#", "-v", "-C", "1", "-W", "2"],
                capture_output=True,
                text=True,
                timeout=15,
            )
            if got.stdout.strip():
                break
        assert got.stdout.strip() == "script/r from node2"
    finally:
        down = _cluster("down")
        if ours:
            shutil.rmtree(state, ignore_errors=True)
    assert down.returncode == 0, down.stderr
    assert _pids() == []


# A stand-in for a node whose etcd member outlives it: the "node" exits on SIGTERM at once, the
# process it started (same session, as the node's etcd member is) stops 1.5 s after its parent is
# gone, as a member does on the SIGTERM its worker's death sends it. Both carry the node's config path.
_SLOW_CHILD_NODE = r"""
import os, signal, sys, time
parent = os.getpid()
if os.fork() == 0:
    while os.getppid() == parent:
        time.sleep(0.05)
    time.sleep(1.5)
    os._exit(0)
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
while True:
    time.sleep(0.1)
"""


def test_down_returns_once_what_a_node_started_is_gone():
    if _pids():
        pytest.skip("a cluster from scripts/cluster runs on this machine")
    state = ROOT / "run" / "cluster"
    ours = not state.exists()
    state.mkdir(parents=True, exist_ok=True)
    pid_file = state / "node1.pid"
    node = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CHILD_NODE, "conf/cluster/node1.yaml"], start_new_session=True
    )
    reaper = __import__("threading").Thread(target=node.wait, daemon=True)  # as init reaps a node
    reaper.start()
    try:
        for _ in range(100):  # until the stand-in has started its child
            if len(_pids()) == 2:
                break
            __import__("time").sleep(0.05)
        assert len(_pids()) == 2
        pid_file.write_text(f"{node.pid}\n")
        down = _cluster("down")
        assert down.returncode == 0, down.stderr
        assert "node1 stopped" in down.stderr
        assert _pids() == []
    finally:
        for pid in _pids():
            os.kill(pid, 9)
        pid_file.unlink(missing_ok=True)
        if ours:
            shutil.rmtree(state, ignore_errors=True)


# A stand-in for a node that stops its etcd member: the "member" (a child in the node's session)
# stops 1 s after its node is gone. At SIGTERM the node writes which other nodes still have a
# process alive, then exits.
_RECORDING_NODE = r"""
import os, signal, sys, time
config, record = sys.argv[1], sys.argv[2]
parent = os.getpid()
if os.fork() == 0:
    while os.getppid() == parent:
        time.sleep(0.02)
    time.sleep(1.0)
    os._exit(0)

def others():
    seen = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except (OSError, IndexError):
            continue
        seen.update(a for a in args if a.startswith("conf/cluster/node") and a != config)
    return sorted(seen)

def term(*_):
    with open(record, "a") as f:
        f.write(f"{config}: {' '.join(others())}\n")
    os._exit(0)

signal.signal(signal.SIGTERM, term)
while True:
    time.sleep(0.1)
"""


def test_down_stops_a_node_once_the_previous_one_and_its_member_are_gone(tmp_path):
    """Nodes stopped together each wait on peers' etcd members that are going too (a leader's
    leadership transfer, the "leaving" mark and the lease revocation): down stops them in turn."""
    if _pids():
        pytest.skip("a cluster from scripts/cluster runs on this machine")
    state = ROOT / "run" / "cluster"
    ours = not state.exists()
    state.mkdir(parents=True, exist_ok=True)
    record = tmp_path / "order"
    nodes = []
    try:
        for i in (1, 2, 3):
            node = subprocess.Popen(
                [sys.executable, "-c", _RECORDING_NODE, f"conf/cluster/node{i}.yaml", str(record)],
                start_new_session=True,
            )
            threading.Thread(target=node.wait, daemon=True).start()  # as init reaps a node
            nodes.append(node)
        for _ in range(100):  # until every stand-in has started its "member"
            if len(_pids()) == 6:
                break
            time.sleep(0.05)
        assert len(_pids()) == 6
        for i, node in enumerate(nodes, 1):
            (state / f"node{i}.pid").write_text(f"{node.pid}\n")
        down = _cluster("down")
        assert down.returncode == 0, down.stderr
        assert record.read_text().splitlines() == [
            "conf/cluster/node1.yaml: conf/cluster/node2.yaml conf/cluster/node3.yaml",
            "conf/cluster/node2.yaml: conf/cluster/node3.yaml",
            "conf/cluster/node3.yaml: ",
        ]
        assert _pids() == []
    finally:
        for pid in _pids():
            os.kill(pid, 9)
        for i in (1, 2, 3):
            (state / f"node{i}.pid").unlink(missing_ok=True)
        if ours:
            shutil.rmtree(state, ignore_errors=True)
