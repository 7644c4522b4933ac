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
