"""Node registration under a renewed lease, the live member list, a duplicate node id refused, the
lease lost while etcd is down (fluxmq/cluster/metadata/membership.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fluxmq.errors import ClusterError
from tests.cluster.metadata.conftest import SHORT_TTL, crash, wait_for
from tests.etcd import start_etcd


def test_members_and_their_changes_are_seen_by_every_node(meta_factory):
    a = meta_factory("a")
    seen = []
    a.on_members(seen.append)
    b = meta_factory("b")
    assert wait_for(lambda: a.members() == {"a": a.transport_addr, "b": b.transport_addr})
    assert b.members() == a.members()
    assert seen[-1] == a.members()
    b.stop()
    assert wait_for(lambda: a.members() == {"a": a.transport_addr})
    assert seen[-1] == {"a": a.transport_addr}


def test_a_dead_node_leaves_the_members_when_its_lease_expires(meta_factory):
    a, b = meta_factory("a"), meta_factory("b")
    assert wait_for(lambda: set(a.members()) == {"a", "b"})
    crash(b)
    assert wait_for(lambda: set(a.members()) == {"a"}, timeout=SHORT_TTL * 5)


def test_a_node_id_already_live_is_refused_with_one_line(meta_factory):
    meta_factory("same")
    with pytest.raises(ClusterError) as info:
        meta_factory("same")
    message = str(info.value)
    assert "\n" not in message
    assert "cluster.node_id: 'same' is already live in the cluster" in message


def test_a_restarted_node_is_not_mistaken_for_a_twin(meta_factory, tmp_path):
    state = tmp_path / "node-a"
    first = meta_factory("a", ttl=30, state_dir=state)
    crash(first)  # killed: its registration stays for the lease's 30 s
    second = meta_factory("a", ttl=30, state_dir=state)  # the same node (same state dir) again: accepted
    assert second.ready == (True, "")
    assert wait_for(lambda: second.members() == {"a": second.transport_addr})
    with pytest.raises(ClusterError, match="already live"):
        meta_factory("a", ttl=30, state_dir=tmp_path / "elsewhere")  # a twin elsewhere: refused


HOLDER = """
import sys
from fluxmq.cluster.metadata import ClusterMetadata, EtcdSettings
from fluxmq.errors import ClusterError
endpoint, prefix, state = sys.argv[1:4]
meta = ClusterMetadata(EtcdSettings(endpoints=[endpoint], lease_ttl=10), "twin", "127.0.0.1:1", prefix=prefix,
                       state_dir=state)
try:
    meta.start()
except ClusterError as exc:
    print(exc, file=sys.stderr)
    sys.exit(3)
print("started", flush=True)
sys.stdin.read()
meta.stop()
"""


def test_a_second_process_with_a_live_node_id_exits_with_one_line(etcd_server, etcd_prefix, tmp_path):
    root = Path(__file__).parents[3]
    args = [sys.executable, "-c", HOLDER, etcd_server.endpoint, etcd_prefix]
    first = subprocess.Popen(
        [*args, str(tmp_path / "one")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=root, text=True
    )
    try:
        assert first.stdout.readline().strip() == "started"
        second = subprocess.run(
            [*args, str(tmp_path / "two")],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            cwd=root,
            text=True,
            timeout=60,
        )
        assert second.returncode != 0
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert lines[0].startswith("cluster.node_id: 'twin' is already live in the cluster")
    finally:
        first.stdin.close()
        try:
            first.wait(15)
        except subprocess.TimeoutExpired:
            first.kill()
            first.wait(5)


def test_losing_the_lease_while_etcd_is_down_is_reported_then_recovered(meta_factory, tmp_path):
    etcd = start_etcd(tmp_path, "private")
    try:
        a = meta_factory("a", endpoint=etcd.endpoint)
        assert a.ready == (True, "")
        assert a.acquire_session("kept") is None
        etcd.stop(sig_kill=True)
        assert wait_for(lambda: not a.ready[0], timeout=SHORT_TTL * 6)
        assert "etcd lease lost" in a.ready[1]
        assert not a.is_leader
        with pytest.raises(ClusterError):
            a.acquire_session("refused-without-lease")
        etcd.start()  # same ports, same data
        assert wait_for(lambda: a.ready == (True, ""), timeout=30)
        assert wait_for(lambda: a.members() == {"a": a.transport_addr}, timeout=15)
        assert a.owned_by("kept") == "a"  # re-acquired under the new lease
        assert wait_for(lambda: a.is_leader, timeout=15)
    finally:
        etcd.stop()


def test_an_etcd_that_never_answers_stops_the_start_with_one_line(tmp_path):
    from fluxmq.cluster.metadata import ClusterMetadata, EtcdSettings
    from tests.conftest import HOST, free_port

    endpoint = f"http://{HOST}:{free_port()}"
    meta = ClusterMetadata(
        EtcdSettings(endpoints=[endpoint], start_timeout=1, request_timeout=0.3),
        "a",
        "x:1",
        state_dir=tmp_path,
    )
    with pytest.raises(ClusterError) as info:
        meta.start()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        f"etcd not ready within 1s (cluster.etcd.start_timeout): etcd unreachable at {endpoint}"
    )
    assert meta.ready == (False, "cluster metadata not started")
