"""fluxmq/queues/group.py: a record a member can never take (over its Maximum Packet Size: its
session's ``send_tracked`` says REFUSED) in each kind of queue (work queue, partitioned, stream),
over a real Broker and LMDB store (no network). The records behind it go on; it is set aside
(``undeliverable``), counted once and not offered again until a member joins, which gets it.
(tests/e2e/test_queues_refused.py holds the same with real clients on a real node.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxmq.broker.broker import Broker
from fluxmq.broker.message import Message
from fluxmq.queues.config import QueueConfig
from tests.queues.test_group import Delivery, end_of_turn, member, node

BIG = b"B" * 1000


class SmallDelivery(Delivery):
    """A client whose Maximum Packet Size no delivery of BIG fits (the connection's refusal)."""

    def send_publish(self, message, qos, retain, packet_id, dup, subscription_ids) -> bool:
        if len(message.payload) > 100:
            return False
        return super().send_publish(message, qos, retain, packet_id, dup, subscription_ids)


def small_member(broker: Broker, cid: str, filter: str, group: str):
    session, d = member(broker, cid, filter, group, auto_ack=True)
    small = SmallDelivery()
    broker.attach(session, small, 100)  # the same session, now behind the small client
    return session, small


CONFIGS = {
    "classic": QueueConfig("q"),
    "partitioned": QueueConfig("q", partitions=2),
    "stream": QueueConfig("q", type="stream"),
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_a_record_no_member_can_take_is_set_aside_until_a_member_joins(tmp_path: Path, kind: str) -> None:
    storage, broker = node(tmp_path / "d", [CONFIGS[kind]])
    try:
        session, small = small_member(broker, "small", "$queue/q/#", "g")
        for payload in (BIG, b"s1", b"s2", b"s3"):
            broker.publish(Message("$queue/q/k", payload, 1))
        end_of_turn()
        broker.queues.tick()
        group = broker.queues.queues["q"].groups["g"]
        assert sorted(m.payload for _, m in small.sent) == [b"s1", b"s2", b"s3"]
        assert group.undeliverable == {0}
        assert broker.queues.queues["q"].stats["undeliverable"] == 1
        assert session.dropped == 1
        for _ in range(3):  # more dispatch runs: BIG is not offered again
            broker.publish(Message("$queue/q/k", b"t", 1))
            end_of_turn()
            broker.queues.tick()
        assert session.dropped == 1 and broker.queues.queues["q"].stats["undeliverable"] == 1
        for pid, _ in small.sent:  # its PUBACKs (auto-ack): a partition's holder lets it go
            session.on_puback(pid)
        _, large = member(broker, "large", "$queue/q/#", "g", auto_ack=True)
        end_of_turn()
        broker.queues.tick()
        assert BIG in [m.payload for _, m in large.sent]
        assert not group.undeliverable and not group.refused
    finally:
        storage.close()


def test_what_members_refused_is_forgotten_as_they_leave(tmp_path: Path) -> None:
    """The refusals of a record set aside are held per member of the group there is: members that
    join, refuse it and leave (a reconnecting client, one away from the owner joined again by the
    reconcile) leave nothing behind, so what ``refused`` holds is bounded by the group's unsettled
    records times its members."""
    storage, broker = node(tmp_path / "d", [QueueConfig("q")])
    try:
        first, _ = small_member(broker, "small", "$queue/q/#", "g")
        broker.publish(Message("$queue/q/k", BIG, 1))
        end_of_turn()
        broker.queues.tick()
        group = broker.queues.queues["q"].groups["g"]
        assert group.undeliverable == {0}
        for i in range(5):
            session, _ = broker.open_session(f"churn{i}", True, 0)
            broker.attach(session, SmallDelivery(), 100)  # small from the start (joins small)
            user = [("consumer-group", "g"), ("auto-ack", "true")]
            assert broker.subscribe(session, "$queue/q/#", 1, user_properties=user).granted_qos == 1
            end_of_turn()
            broker.queues.tick()
            assert session.dropped == 1 and group.undeliverable == {0}  # offered to it once
            broker.unsubscribe(session, "$queue/q/#")
            assert len(group.refused[0]) == len(group.members) == 1
        assert broker.queues.queues["q"].stats["undeliverable"] == 1  # counted once
        broker.unsubscribe(first, "$queue/q/#")
        assert not group.refused and group.lag() == 1  # kept, stored, for a member to come
    finally:
        storage.close()
