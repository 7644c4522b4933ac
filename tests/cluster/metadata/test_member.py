"""The supervised etcd member: three nodes' members form one etcd cluster; a member that dies is
restarted; stop ends it by its PID (fluxmq/cluster/metadata/member.py)."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import gevent

from fluxmq.cluster.metadata.client import EtcdClient
from fluxmq.cluster.metadata.config import EtcdSettings
from fluxmq.cluster.metadata.member import EtcdMember
from fluxmq.errors import ClusterError
from tests.cluster.metadata.conftest import wait_for
from tests.conftest import HOST, free_port


def _members(tmp_path: Path, count: int) -> list[EtcdMember]:
    ports = [(free_port(), free_port()) for _ in range(count)]
    initial = ",".join(f"m{i}=http://{HOST}:{peer}" for i, (peer, _) in enumerate(ports))
    return [
        EtcdMember(
            EtcdSettings(
                data_dir=str(tmp_path / f"m{i}" / "etcd"),
                bind_addr=f"{HOST}:{peer}",
                client_addr=f"{HOST}:{client}",
                initial_cluster=initial,
            ),
            f"m{i}",
        )
        for i, (peer, client) in enumerate(ports)
    ]


def _answers(client: EtcdClient) -> bool:
    try:
        client.range("/", keys_only=True)
        return True
    except ClusterError:
        return False


def test_three_members_form_one_cluster_and_a_dead_one_is_restarted(tmp_path):
    members = _members(tmp_path, 3)
    try:
        for member in members:
            member.start()
        clients = [EtcdClient(m.settings.client_endpoints(), timeout=2.0) for m in members]
        assert wait_for(lambda: all(_answers(c) for c in clients), timeout=60)
        clients[0].put("/shared", "from-m0")
        assert wait_for(lambda: clients[2].get("/shared") is not None)
        assert clients[2].get("/shared")["value"] == b"from-m0"
        status = clients[1].post("cluster/member/list", {})
        assert sorted(m["name"] for m in status["members"]) == ["m0", "m1", "m2"]

        victim = members[1]
        old_pid = victim.pid
        os.kill(old_pid, signal.SIGKILL)
        assert wait_for(lambda: victim.restarts == 1 and victim.pid not in (None, old_pid), timeout=20)
        assert wait_for(lambda: _answers(clients[1]), timeout=30)
        assert clients[1].get("/shared")["value"] == b"from-m0"  # same data dir, same cluster
    finally:
        pids = [m.pid for m in members]
        for member in members:
            member.stop()
    for pid in pids:
        assert pid is None or not Path(f"/proc/{pid}").exists() or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_a_member_left_by_a_killed_node_is_stopped_at_the_next_start(tmp_path):
    (first,) = _members(tmp_path, 1)
    first.start()
    leftover = first.pid
    first._supervisor.kill()
    first.proc = None  # the node died without stopping it: only the PID file knows it
    second = EtcdMember(first.settings, first.name)
    try:
        second.start()
        assert wait_for(lambda: not Path(f"/proc/{leftover}").exists() or _zombie(leftover), timeout=15)
        client = EtcdClient(second.settings.client_endpoints(), timeout=2.0)
        assert wait_for(lambda: _answers(client), timeout=30)
    finally:
        second.stop()
        if Path(f"/proc/{leftover}").exists() and not _zombie(leftover):
            os.kill(leftover, signal.SIGKILL)
        gevent.sleep(0)


def test_a_node_keeps_its_sessions_when_its_member_is_killed_and_restarted(tmp_path):
    from fluxmq.cluster.metadata import ClusterMetadata

    settings = EtcdSettings(
        data_dir=str(tmp_path / "etcd"),
        bind_addr=f"{HOST}:{free_port()}",
        client_addr=f"{HOST}:{free_port()}",
        lease_ttl=10,
        start_timeout=30,
    )
    meta = ClusterMetadata(settings, "solo", "127.0.0.1:1", state_dir=tmp_path)
    meta.start()
    member_pids = []
    try:
        assert meta.acquire_session("kept") is None
        first = meta.member.pid
        member_pids.append(first)
        os.kill(first, signal.SIGKILL)
        assert wait_for(
            lambda: meta.member.restarts == 1 and meta.member.pid not in (None, first), timeout=20
        )
        member_pids.append(meta.member.pid)

        def owned() -> bool:
            try:
                return meta.owned_by("kept") == "solo"
            except ClusterError:
                return False

        assert wait_for(owned, timeout=30)
        assert meta.ready == (True, "")
        assert meta.acquire_session("new") is None
    finally:
        meta.stop()
    for pid in member_pids:
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid)


def test_a_graceful_stop_keeps_its_writes_with_a_quorum_and_skips_them_without_one(tmp_path, caplog):
    """The nodes of a cluster that stops take their members with them: the last node's etcd has no
    quorum, and its "leaving" mark and lease revocation would each wait out a request timeout
    (5 s + 3 s at ``scripts/cluster down``). A node stopped while a quorum answers still writes
    both (the other node sees it leave, not get lost); the last one skips them, saying why."""
    from fluxmq.cluster.metadata import ClusterMetadata

    members = _members(tmp_path, 3)
    metas = []
    try:
        for member in members:
            member.start()
        clients = [EtcdClient(m.settings.client_endpoints(), timeout=2.0) for m in members]
        assert wait_for(lambda: all(_answers(c) for c in clients), timeout=60)
        for i in (0, 1):
            settings = EtcdSettings(
                endpoints=members[i].settings.client_endpoints(), lease_ttl=30.0, request_timeout=3.0
            )
            metas.append(
                ClusterMetadata(settings, f"n{i}", f"{HOST}:{7000 + i}", prefix="/stop/", state_dir=tmp_path)
            )
            metas[i].start()
        last, first = metas
        assert wait_for(lambda: set(last.members()) == {"n0", "n1"})
        members[2].stop()  # two of three members left: a quorum
        with caplog.at_level(logging.INFO, logger="fluxmq.cluster"):
            first.stop()
            assert wait_for(lambda: set(last.members()) == {"n0"})
            assert last.lost_members() == {}  # marked "leaving", then its lease revoked
            members[1].stop()  # one of three left: no quorum
            last.stop()
        events = [(r.msg, getattr(r, "answering", None), getattr(r, "members", None)) for r in caplog.records]
        assert ("etcd_quorum_gone", 1, 3) in events
        assert not {"leave_not_marked", "lease_revoke_failed"} & {e[0] for e in events}, events
    finally:
        for meta in metas:
            meta.stop()
        for member in members:
            member.stop()


def test_a_stop_write_whose_quorum_goes_while_it_waits_is_abandoned(tmp_path, caplog):
    """Every node of a cluster SIGTERMed at once: a node's probe finds a quorum, then the others stop
    with their members while its "leaving" mark is being written. That write and the lease
    revocation would each wait out a request timeout (5 s + 3 s at ``scripts/cluster``); probed
    again while the write waits, the quorum is found gone: both are abandoned, neither fails late."""
    from fluxmq.cluster.metadata import ClusterMetadata

    members = _members(tmp_path, 3)
    meta = None
    try:
        for member in members:
            member.start()
        clients = [EtcdClient(m.settings.client_endpoints(), timeout=2.0) for m in members]
        assert wait_for(lambda: all(_answers(c) for c in clients), timeout=60)
        settings = EtcdSettings(
            endpoints=members[0].settings.client_endpoints(), lease_ttl=30.0, request_timeout=3.0
        )
        meta = ClusterMetadata(settings, "n0", f"{HOST}:7000", prefix="/together/", state_dir=tmp_path)
        meta.start()
        leave = meta.membership.leave

        def others_stop_then_leave() -> None:  # after the probe: the other two go with their members
            members[1].stop()
            members[2].stop()
            leave()

        meta.membership.leave = others_stop_then_leave
        with caplog.at_level(logging.INFO, logger="fluxmq.cluster"):
            meta.stop()
        events = [(r.msg, getattr(r, "answering", None), getattr(r, "members", None)) for r in caplog.records]
        assert ("etcd_quorum_gone", 1, 3) in events
        assert not {"leave_not_marked", "lease_revoke_failed"} & {e[0] for e in events}, events
    finally:
        if meta is not None:
            meta.stop()
        for member in members:
            member.stop()


def _deaf_member(tmp_path: Path, peer_port: int | None) -> EtcdMember:
    """An EtcdMember whose process ignores SIGTERM (as a leader handing its leadership to a peer
    that is gone does, for etcd's 7 s), with one other member on ``peer_port`` (None: alone)."""
    import sys

    from gevent import subprocess

    settings = EtcdSettings(
        data_dir=str(tmp_path / "etcd"),
        bind_addr=f"{HOST}:{free_port()}",
        client_addr=f"{HOST}:{free_port()}",
        initial_cluster=f"m0=http://{HOST}:1" + (f",m1=http://{HOST}:{peer_port}" if peer_port else ""),
    )
    member = EtcdMember(settings, "m0")
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    member.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert member.proc.stdout.readline() == b"ready\n"
    return member


def test_a_stopping_member_with_no_other_member_left_is_killed_after_a_short_grace(tmp_path, caplog):
    """Every node stopped at once: the leader's member would wait out its hand-over of the
    leadership (etcd's 7 s) with nobody left to take it; no other member's peer port answering, it
    is killed once ``LONE_STOP_GRACE`` is over."""
    member = _deaf_member(tmp_path, free_port())  # nothing listens there
    with caplog.at_level(logging.INFO, logger="fluxmq.cluster"):
        member.stop()
    assert member.proc.poll() == -signal.SIGKILL
    assert "etcd_member_killed" in [r.msg for r in caplog.records]


def test_a_stopping_member_whose_peer_still_runs_gets_its_whole_stop_timeout(tmp_path, caplog, monkeypatch):
    """A peer member still listening can take the leadership: the member is not killed early (only
    at ``STOP_TIMEOUT``, shortened here)."""
    import socket

    from fluxmq.cluster.metadata import member as member_module

    monkeypatch.setattr(member_module, "STOP_TIMEOUT", 2 * member_module.LONE_STOP_GRACE)
    with socket.socket() as peer:
        peer.bind((HOST, 0))
        peer.listen(16)
        member = _deaf_member(tmp_path, peer.getsockname()[1])
        with caplog.at_level(logging.INFO, logger="fluxmq.cluster"):
            member.stop()
    assert member.proc.poll() == -signal.SIGKILL
    assert "etcd_member_killed" not in [r.msg for r in caplog.records]


def test_a_stopping_member_of_its_own_cluster_gets_its_whole_stop_timeout(
    tmp_path, caplog, monkeypatch
) -> None:
    """A single member hands no leadership over: it is not killed early (only at ``STOP_TIMEOUT``,
    shortened here)."""
    from fluxmq.cluster.metadata import member as member_module

    monkeypatch.setattr(member_module, "STOP_TIMEOUT", 2 * member_module.LONE_STOP_GRACE)
    member = _deaf_member(tmp_path, None)
    with caplog.at_level(logging.INFO, logger="fluxmq.cluster"):
        member.stop()
    assert member.proc.poll() == -signal.SIGKILL
    assert "etcd_member_killed" not in [r.msg for r in caplog.records]
