"""The arbiter's part of ``server.workers`` (fluxmq.node.workers) and the workers' client-id
ownership table (fluxmq.cluster.workers.LocalOwnership, a real LMDB environment in a tmp dir).
The workers acting as one broker are tested end to end in tests/e2e/test_workers.py."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from fluxmq.config import load_config
from fluxmq.node.app import NodeApplication
from fluxmq.node.cli import main
from fluxmq.node.workers import (
    WorkerContext,
    bind_reuseport,
    mark_stopping,
    shard_path,
    started_path,
    up_path,
    worker_count,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("FLUXMQ_"):
            monkeypatch.delenv(key)


def test_auto_is_the_cores_this_process_may_use() -> None:
    config = load_config(None, env={}, overrides=("server.workers=auto",))
    assert worker_count(config) == len(os.sched_getaffinity(0))
    assert worker_count(load_config(None, env={}, overrides=("server.workers=3",))) == 3


def test_several_workers_on_a_cluster_node_with_etcd_pass_check(capsys) -> None:
    """Each worker is an etcd member of its own (docs/cluster.rst, "Several workers on a cluster node")."""
    code = main(
        [
            "--check",
            "--set",
            "server.workers=2",
            "--set",
            "cluster.enabled=true",
            "--set",
            "cluster.node_id=a",
        ]
    )
    assert code == 0, capsys.readouterr().err


def test_several_workers_on_a_cluster_node_with_static_peers_only_are_refused_by_check(capsys) -> None:
    """Without etcd nothing tells the other nodes about the workers (members a/w0, a/w1)."""
    code = main(
        [
            "--check",
            "--set",
            "server.workers=2",
            "--set",
            "cluster.enabled=true",
            "--set",
            "cluster.node_id=a",
            "--set",
            'cluster.transport.peers={"b": "127.0.0.1:7949"}',
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "server.workers" in err and "without etcd" in err


def test_several_workers_with_raft_replicated_queues_pass_check(capsys) -> None:
    """Worker 0 runs the node's Raft member and owns the replicated queues (docs/replication.rst,
    "Several workers on a node"): the combination is no longer refused."""
    code = main(
        [
            "--check",
            "--set",
            "server.workers=2",
            "--set",
            "cluster.raft.enabled=true",
            "--set",
            "storage.type=lmdb",
        ]
    )
    assert code == 0, capsys.readouterr().err


def test_worker_zero_keeps_the_storage_path_the_others_get_a_shard_each() -> None:
    assert shard_path("/data/fluxmq", 0) == "/data/fluxmq"
    assert shard_path("/data/fluxmq/", 1) == "/data/fluxmq-w1"


def test_one_port_is_bound_once_per_worker() -> None:
    socks = bind_reuseport("127.0.0.1", 0, 2)
    try:
        ports = {s.getsockname()[1] for s in socks}
        assert len(socks) == 2 and len(ports) == 1
        with socket.create_connection(("127.0.0.1", ports.pop()), timeout=2):
            pass
    finally:
        for s in socks:
            s.close()


class _Worker:
    def __init__(self, index=None) -> None:
        if index is not None:
            self.worker_index = index


class _Arbiter:
    def __init__(self, *indexes: int) -> None:
        self.WORKERS = {100 + i: _Worker(i) for i in indexes}


def test_a_restarted_worker_gets_the_lowest_free_index() -> None:
    for running, expected in (((), 0), ((0,), 1), ((1,), 0), ((0, 2), 1)):
        worker = _Worker()
        NodeApplication._pre_fork(_Arbiter(*running), worker)
        assert worker.worker_index == expected


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_ownership_is_a_compare_and_swap_and_a_dead_workers_entries_are_free(tmp_path) -> None:
    from fluxmq.cluster.workers import LocalOwnership

    me = LocalOwnership(str(tmp_path / "owners"), "w0")
    live = subprocess.Popen(["sleep", "30"])
    try:
        with me.env.begin(write=True) as txn:
            txn.put(b"held", f"w1 {live.pid}".encode())
            txn.put(b"orphan", f"w1 {_dead_pid()}".encode())
        assert me.acquire_session("new") is None and me.owned_by("new") == "w0"
        assert me.acquire_session("held") == "w1"  # a live worker owns it: take it over from w1
        assert me.owned_by("held") == "w1"
        assert me.acquire_session("held", take_from="w1") is None and me.owned_by("held") == "w0"
        assert me.owned_by("orphan") is None
        assert me.acquire_session("orphan") is None  # its worker died: nobody owns it
        with me.env.begin(write=True) as txn:
            txn.put(b"theirs", f"w1 {live.pid}".encode())
        assert me.adopt(["new", "theirs", "unknown"]) == ["theirs"]
        me.release_session("new")
        assert me.owned_by("new") is None
        me.release_session("theirs")  # not ours: kept
        assert me.owned_by("theirs") == "w1"
    finally:
        live.kill()
        live.wait()
        me.close()


def test_a_dead_sibling_comes_back_restarted_until_the_node_stops(tmp_path) -> None:
    """What a claim of a dead worker's id waits for (``WorkerContext.restarts``): another index of
    this node's run, restarted while the arbiter has not marked the run directory as stopping."""
    w0 = WorkerContext(0, 2, str(tmp_path))
    assert w0.restarts("w1") and not w0.restarts("w0") and not w0.restarts("w2")
    assert WorkerContext(1, 2, str(tmp_path), node_name="n1").restarts("n1/w0")
    assert not w0.stopping()
    mark_stopping(str(tmp_path))
    mark_stopping(str(tmp_path))  # (twice: the halt after a stop)
    assert w0.stopping() and w0.restarts("w1")


def test_the_workers_check_names_the_workers_down_and_reads_the_same_on_every_worker(tmp_path) -> None:
    """``/ready``'s ``workers`` check (``WorkerContext.readiness``): up, with details naming the
    workers without an up mark or whose mark names a process that is gone (killed, or stopped: its
    mark removed), the same on every worker; a worker of its own counts as up (it answers)."""
    run = str(tmp_path)
    w0, w1, w2 = (WorkerContext(i, 3, run) for i in range(3))
    for i in (1, 2):  # (each served once since the node started: the check below is the node's start)
        open(started_path(run, i), "w").close()
    w0.mark_up()
    assert w0.readiness() == (True, "1/3 workers up; down: w1, w2") and not w0.others_up()
    live = subprocess.Popen(["sleep", "30"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        with open(up_path(run, 1), "w") as f:
            f.write(str(live.pid))
        with open(up_path(run, 2), "w") as f:
            f.write(str(gone.pid))  # killed -9: its mark stays, naming a dead process
        assert w0.readiness() == w1.readiness() == (True, "2/3 workers up; down: w2")
        assert w2.others_up() and w0.others_up()
        with open(up_path(run, 2), "w") as f:
            f.write(str(live.pid))
        assert w1.readiness() == (True, "")
        w0.mark_down()
        assert w1.readiness() == (True, "2/3 workers up; down: w0")
    finally:
        live.kill()
        live.wait()


def test_the_workers_check_is_down_while_the_node_starts_until_every_worker_served_once(tmp_path) -> None:
    """While the node starts, ``/ready`` is 503 until every worker has served once: a request the
    node was said ready for could land on a worker still loading its store, whose "starting" apps
    answer 503 (the churn test's HTTP publish got one in CI). A worker down after that (stopped,
    killed, restarting) leaves the node ready, degraded."""
    run = str(tmp_path)
    w0, w1 = (WorkerContext(i, 2, run) for i in range(2))
    w0.mark_up()
    assert w0.readiness() == (False, "starting: w1")
    w1.mark_up()
    assert w0.readiness() == w1.readiness() == (True, "")
    w1.mark_down()  # its stop began; the arbiter restarts it
    assert w0.readiness() == (True, "1/2 workers up; down: w1")
