"""fluxmq/queues/manager.py: bad input is refused with a reason code and changes nothing; what
clients can create is bounded."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from fluxmq.broker.broker import Broker
from fluxmq.broker.message import USER_PROPERTY, Message
from fluxmq.errors import QueueRefused
from fluxmq.queues import QueueManager, manager
from fluxmq.queues.config import CLASSIC, STREAM, QueueConfig, RetentionConfig
from fluxmq.queues.retention import apply_retention
from fluxmq.storage.lmdb import LMDBStorage
from tests.queues.test_group import member


@pytest.fixture
def broker(tmp_path: Path):
    storage = LMDBStorage(tmp_path / "d", map_size=64 << 20)
    b = Broker(storage=storage)
    b.queues = QueueManager(storage, [QueueConfig("s", type=STREAM)])
    yield b
    storage.close()


@pytest.mark.parametrize("topic", ["$queue/", "$queue//x"])
def test_publish_without_a_queue_name_is_0x90(broker, topic: str) -> None:
    with pytest.raises(QueueRefused) as err:
        broker.publish(Message(topic, b"x", 1))
    assert err.value.reason_code == 0x90
    assert set(broker.queues.queues) == {"s"}


@pytest.mark.parametrize("message_id", ["", "nocolon", "s:", "s:-1", "other:1", "s:abc"])
def test_settlements_that_name_nothing_change_nothing(broker, message_id: str) -> None:
    props = {USER_PROPERTY: [("message-id", message_id), ("group-id", "g")]}
    for action in ("$ack", "$nack", "$reject"):
        assert broker.publish(Message(f"$queue/s/{action}", b"", 1, properties=props)) == 0
    assert broker.publish(Message("$queue/none/$ack", b"", 1, properties=props)) == 0
    assert broker.queues.queues["s"].log.count == 0


def test_a_bad_stream_offset_is_refused(broker) -> None:
    session, _ = broker.open_session("c", True, 0)
    with pytest.raises(QueueRefused) as err:
        broker.subscribe(session, "$queue/s/#", 1, user_properties=[("stream-offset", "yesterday")])
    assert err.value.reason_code == 0x83
    assert not broker.queues.queues["s"].groups and not broker.queues.members


def test_groups_per_queue_and_auto_created_queues_are_bounded(broker, monkeypatch) -> None:
    monkeypatch.setattr(manager, "MAX_GROUPS_PER_QUEUE", 2)
    monkeypatch.setattr(manager, "MAX_AUTO_QUEUES", 1)
    member(broker, "a", "$queue/s/#", "g1")
    member(broker, "b", "$queue/s/#", "g2")
    session, _ = broker.open_session("c", True, 0)
    with pytest.raises(QueueRefused) as err:
        broker.subscribe(session, "$queue/s/#", 1, user_properties=[("consumer-group", "g3")])
    assert err.value.reason_code == 0x97
    broker.publish(Message("$queue/auto1", b"x", 1))
    with pytest.raises(QueueRefused) as err:
        broker.publish(Message("$queue/auto2", b"x", 1))
    assert err.value.reason_code == 0x97
    assert QueueConfig("x").type == CLASSIC


def test_the_timer_ends_when_its_store_is_closed_first(tmp_path: Path, caplog) -> None:
    """An owner that closes the store without stopping the queues first (a test, an abrupt stop)
    must not leave a timer reading a closed LMDB environment: it ends, without an error line."""
    storage = LMDBStorage(tmp_path / "d", map_size=64 << 20)
    queues = QueueManager(storage, [QueueConfig("w")])
    queues.start()
    timer = queues._timer
    assert timer is not None
    storage.close()
    timer.join(timeout=10 * manager.TICK)
    assert timer.dead
    assert queues._timer is None
    assert not [r for r in caplog.records if r.msg == "queue_tick_failed"]


def test_queue_counters_count_and_read_unknown_names_as_0_without_listing_them(broker) -> None:
    broker.publish(Message("$queue/s", b"x", 1))
    q = broker.queues.queues["s"]
    assert q.stats["appended"] == 1
    assert q.stats["dead_lettered"] == 0  # never counted: 0, and not listed as a counter
    assert broker.queues.describe("s")[0]["counters"] == {"appended": 1}


def test_a_queue_reassigned_away_is_stranded_and_its_local_members_rejoin_the_new_owner(
    tmp_path: Path,
) -> None:
    """An operator gave queue "w" to node n2 while this node (n1) served it: it is no longer served
    here, its unsettled records wait to move to n2 (``take_stranded``), and this node's consumer
    joins n2's group (through ``remote``) in its group, with its auto-ack."""
    import gevent

    from fluxmq.queues.placement import QueuePlacement
    from tests.queues.test_group import member

    storage = LMDBStorage(tmp_path / "d", map_size=64 << 20)
    owners = {"w": "n1"}
    placement = QueuePlacement(0, 1)
    placement.nodes = SimpleNamespace(node="n1", owner=owners.get, known=owners.get)
    b = Broker(storage=storage)
    b.queues = QueueManager(storage, [QueueConfig("w")], placement=placement)
    joined: list[tuple] = []
    b.queues.remote = SimpleNamespace(
        subscribe=lambda session, f, qos, user, version, rejoin: joined.append(
            (session.client_id, f, user, rejoin)
        ),
        session_gone=lambda session: [],
    )
    try:
        session, delivered = member(b, "c1", "$queue/w", "g", auto_ack=False)
        for i in range(3):
            b.publish(Message("$queue/w", f"m{i}".encode(), 1))
        gevent.sleep(0)
        storage.commit()
        assert len(delivered.sent) == 3  # held by c1, unsettled
        owners["w"] = "n2"
        b.queues.move_away({"w": "n2"})
        gevent.sleep(0.01)
        assert "w" not in b.queues.queues and session not in b.queues.members
        assert [r.message.payload for r in b.queues.take_stranded("w")] == [b"m0", b"m1", b"m2"]
        assert joined == [("c1", "$queue/w", [("consumer-group", "g"), ("auto-ack", "false")], True)]
    finally:
        storage.close()


def test_a_compacted_queue_forgets_the_keys_whose_records_retention_deleted(tmp_path: Path) -> None:
    """A compacted stream keeps the newest record per key (one per device, say); once retention
    deleted a key's record, the key is not remembered for ever: 5,000 keys seen once each leave at
    most about twice the live records' keys (plus a slack) behind, not 5,000."""
    storage = LMDBStorage(tmp_path / "d", map_size=64 << 20)
    try:
        b = Broker(storage=storage)
        retention = RetentionConfig(max_length_messages=10, compact=True)
        b.queues = QueueManager(storage, [QueueConfig("last", type=STREAM, retention=retention)])
        q = b.queues.queues["last"]
        for i in range(5000):
            b.publish(Message(f"$queue/last/device-{i}", b"v", 1))
            apply_retention(q)
        assert q.log.count == 10
        assert len(q.newest) <= 2 * 10 + 1024 + 1  # twice the live records' keys + COMPACT_SLACK
        assert {f"device-{i}" for i in range(4990, 5000)} <= set(q.newest)  # the live records' keys
    finally:
        storage.close()
