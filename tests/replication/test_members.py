"""Member changes of a running Raft group (fluxmq/replication/group.py ``change_member``): three
real pysyncobj groups in this process on 127.0.0.1, driven by their greenlets, with the memory
queue-log store."""

from __future__ import annotations

import gevent
import gevent.event
import pytest

from fluxmq.replication.group import MemberChangeRefused, RaftGroup
from fluxmq.replication.service import RaftService
from fluxmq.storage.queue_log import MemoryQueueLog
from tests.conftest import free_port


@pytest.fixture(params=["plain", "mtls"])
def groups(request, tmp_path):
    tls = None
    if request.param == "mtls":  # the TLS transport's addNode/dropNode (transport.py)
        from fluxmq.replication.transport import raft_tls
        from tests.certs import CertAuthority
        from tests.replication.test_transport import _raft

        ca = CertAuthority(tmp_path / "pki")
        tls = raft_tls(_raft(ca.issue_node("n", hosts=("127.0.0.1",)), ca.cert_file))
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    out = [
        RaftGroup("default", a, addrs, str(tmp_path / f"n{i}"), MemoryQueueLog(), "forward", tls=tls)
        for i, a in enumerate(addrs)
    ]
    for g in out:
        g.start()
    yield out
    for g in out:
        g.stop()


def _leader(groups) -> RaftGroup:
    with gevent.Timeout(20):
        while True:
            leaders = [g for g in groups if g.is_leader() and g.applied >= 1 and g.owner == g.self_addr]
            if leaders:
                return leaders[0]
            gevent.sleep(0.05)


def test_one_change_at_a_time_and_each_refusal_says_why(groups) -> None:
    leader = _leader(groups)
    follower = next(g for g in groups if g is not leader)
    with pytest.raises(MemberChangeRefused) as info:
        follower.change_member("remove", groups[0].self_addr, lambda error: None)
    assert info.value.status == 409 and info.value.leader == leader.self_addr
    with pytest.raises(MemberChangeRefused) as info:
        leader.change_member("remove", "127.0.0.1:1", lambda error: None)
    assert info.value.status == 404
    with pytest.raises(MemberChangeRefused) as info:
        leader.change_member("remove", leader.self_addr, lambda error: None)
    assert info.value.status == 409 and "cannot remove itself" in str(info.value)
    with pytest.raises(MemberChangeRefused) as info:
        leader.change_member("add", follower.self_addr, lambda error: None)
    assert info.value.status == 409 and "already" in str(info.value)

    done = gevent.event.AsyncResult()
    leader.change_member("remove", follower.self_addr, done.set)
    # the first is not committed yet: a second change is refused, not appended behind it
    third = next(g for g in groups if g is not leader and g is not follower)
    with pytest.raises(MemberChangeRefused) as info:
        leader.change_member("remove", third.self_addr, lambda error: None)
    assert info.value.status == 409 and "in progress" in str(info.value)
    # not committed: no configuration to write to etcd's record yet (FormingRaft's repair)
    assert leader.committed_peers() is None and follower.committed_peers() is None
    assert done.get(timeout=10) is None
    with gevent.Timeout(10):
        while leader.committed_peers() is None:  # the leader's log committed to its end
            gevent.sleep(0.05)
    assert leader.committed_peers() == sorted([leader.self_addr, third.self_addr])
    assert third.committed_peers() is None  # a follower's is never taken
    assert leader.peers == sorted([leader.self_addr, third.self_addr])
    with gevent.Timeout(10):
        while third.peers != leader.peers:
            gevent.sleep(0.05)
    # committed: the next change is taken
    again = gevent.event.AsyncResult()
    leader.change_member("add", follower.self_addr, again.set)
    assert again.get(timeout=10) is None
    assert leader.peers == sorted(g.self_addr for g in groups)
    # the member removed and added again gets the log again: the entry that added it included
    target = leader.status()["commit_index"]
    with gevent.Timeout(10):
        while follower.status()["commit_index"] < target:
            gevent.sleep(0.05)


def test_an_add_with_nothing_answering_at_the_address_is_refused(groups, tmp_path) -> None:
    leader = _leader(groups)
    service = RaftService.__new__(RaftService)  # only its groups: the check before the change
    service.groups = {"default": leader}
    with pytest.raises(MemberChangeRefused) as info:
        service.change_member("default", "add", f"127.0.0.1:{free_port()}")
    assert info.value.status == 409 and "nothing answers" in str(info.value)
    with pytest.raises(MemberChangeRefused) as info:
        service.change_member("default", "add", "no-port")
    assert info.value.status == 400
    with pytest.raises(MemberChangeRefused) as info:
        service.change_member("other", "add", leader.self_addr)
    assert info.value.status == 404
    assert leader.peers == sorted(g.self_addr for g in groups)
