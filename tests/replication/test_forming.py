"""FormingRaft before its members are known (fluxmq/replication/forming.py); the group forming from
etcd end to end is tests/e2e/test_replication_etcd.py."""

from __future__ import annotations

from types import SimpleNamespace

import gevent
import pytest

from fluxmq.errors import QueueRefused
from fluxmq.queues.config import QueueConfig, ReplicationConfig
from fluxmq.replication.forming import FormingRaft


def forming(queues) -> FormingRaft:
    raft = SimpleNamespace(bind_addr="127.0.0.1:7100", peers=[], groups={}, auto_provision_groups=True)
    return FormingRaft(raft, queues, "/nonexistent", store=None, node_id="n1", self_addr="127.0.0.1:7100")


def test_without_a_replicated_queue_nothing_is_agreed_or_recorded() -> None:
    asked = []
    f = forming([QueueConfig("plain")])
    f.run(lambda: asked.append(1) or (None, "waiting"))
    gevent.sleep(0.05)
    assert asked == [] and f.members is None and "no queue with replication.enabled" in f.waiting
    f.stop()


def test_until_agreed_a_replicated_queue_refuses_with_what_it_waits_for() -> None:
    f = forming([QueueConfig("orders", replication=ReplicationConfig(True, "default", "sync", 3, 2, 5.0))])
    f.run(lambda: (None, "waiting for node3 to register"))
    gevent.sleep(0.05)
    qlog = f.log_factory("orders", SimpleNamespace(), None)
    with pytest.raises(
        QueueRefused, match=r"its Raft group is not formed yet \(waiting for node3 to register\)"
    ):
        qlog.append_one(SimpleNamespace())
    assert qlog.delivering is False
    held = qlog.held_ack()
    assert held.done and isinstance(held.outcome, QueueRefused)
    assert f.status()[0]["forming"] == "waiting for node3 to register"
    f.stop()


def test_a_recorded_address_other_than_ours_keeps_the_node_out_with_the_reason() -> None:
    f = forming([QueueConfig("orders", replication=ReplicationConfig(True, "default", "sync", 3, 2, 5.0))])
    qlog = f.log_factory("orders", SimpleNamespace(), None)
    f.form({"n1": "127.0.0.1:9999", "n2": "127.0.0.1:7200", "n3": "127.0.0.1:7300"})
    assert f.members is None and f.service is None
    assert "etcd records this node's Raft address as 127.0.0.1:9999, but it is 127.0.0.1:7100" in f.waiting
    with pytest.raises(QueueRefused, match="127.0.0.1:9999"):
        qlog.append_one(SimpleNamespace())


def test_a_node_outside_the_agreed_set_refuses_as_holding_no_replica() -> None:
    f = forming([QueueConfig("orders", replication=ReplicationConfig(True, "default", "sync", 3, 2, 5.0))])
    qlog = f.log_factory("orders", SimpleNamespace(), None)
    f.form({"n2": "127.0.0.1:7200", "n3": "127.0.0.1:7300", "n4": "127.0.0.1:7400"})
    with pytest.raises(QueueRefused, match=r"holds no replica: it is not one of the Raft members") as info:
        qlog.append_one(SimpleNamespace())
    assert info.value.reason_code == 0x80
    later = f.log_factory("orders.dlq", SimpleNamespace(), None)  # made after: refused the same way
    with pytest.raises(QueueRefused, match="holds no replica"):
        later.append_one(SimpleNamespace())


@pytest.mark.parametrize("mode", ["forward", "replicate"])
def test_a_log_made_before_forming_distributes_as_configured(mode) -> None:
    """The queues are made at start, before etcd agreed on the members (a stand-in group, which
    knows no distribution_mode): their logs still get the mode's consumer groups, registrations
    and events. Without them the formed group served only the leader's own consumers (seen: the
    consumer on a follower received nothing in a whole leader-kill run)."""
    from fluxmq.replication.distribution import ReplicatedGroup

    f = forming([QueueConfig("orders", replication=ReplicationConfig(True, "default", "sync", 3, 2, 5.0))])
    f.raft.distribution_mode = mode
    qlog = f.log_factory("orders", SimpleNamespace(), None)
    assert qlog.group_class is ReplicatedGroup and qlog.events == []
    assert qlog.leased is (mode == "replicate") and qlog.deciding is False
    qlog.register("g", "c1\x00$queue/orders", None)  # no group yet: the reconcile loop registers it later
    assert qlog.delivering is False
    f.stop()
