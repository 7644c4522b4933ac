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


# "s:\u00b2": str.isdigit takes the superscript two, int() refuses it (was a ValueError)
@pytest.mark.parametrize("message_id", ["", "nocolon", "s:", "s:-1", "other:1", "s:abc", "s:\u00b2"])
def test_settlements_that_name_nothing_change_nothing(broker, message_id: str) -> None:
    props = {USER_PROPERTY: [("message-id", message_id), ("group-id", "g")]}
    for action in ("$ack", "$nack", "$reject"):
        assert broker.publish(Message(f"$queue/s/{action}", b"", 1, properties=props)) == 0
    assert broker.publish(Message("$queue/none/$ack", b"", 1, properties=props)) == 0
    assert broker.queues.queues["s"].log.count == 0


# "\u00b2", "timestamp=\u00b2": digits to str.isdigit, not to int() (were a ValueError, not a refusal)
@pytest.mark.parametrize("start", ["yesterday", "\u00b2", "timestamp=\u00b2"])
def test_a_bad_stream_offset_is_refused(broker, start: str) -> None:
    session, _ = broker.open_session("c", True, 0)
    with pytest.raises(QueueRefused) as err:
        broker.subscribe(session, "$queue/s/#", 1, user_properties=[("stream-offset", start)])
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


def test_a_queue_given_back_before_its_records_all_moved_is_served_from_them_once(tmp_path: Path) -> None:
    """Queue "w" went to n2 while this node (n1) held records of it (stranded: some moved to n2,
    a batch on its way), then an operator gave it back to n1. While the batch is on its way the
    queue is neither served nor made anew (0x80: never a new log over its records); once the
    batch is settled, what n1 still holds is served again with its group's progress: the record
    the group settled is not delivered again, the moved ones are n2's, each other one is delivered
    once, and an append goes after them (no offset reused). Its capture of ordinary topics stops
    with the strand and starts again with it."""
    import gevent

    from fluxmq.queues.placement import QueuePlacement
    from tests.queues.test_group import settle

    storage = LMDBStorage(tmp_path / "d", map_size=64 << 20)
    owners = {"w": "n1"}
    placement = QueuePlacement(0, 1)
    placement.nodes = SimpleNamespace(node="n1", owner=owners.get, known=owners.get)
    b = Broker(storage=storage)
    b.queues = QueueManager(storage, [QueueConfig("w", topics=["t/#"])], placement=placement)
    b.queues.install_captures(b.router)
    b.queues.remote = SimpleNamespace(subscribe=lambda *args: None, session_gone=lambda session: [])
    try:
        _session, held = member(b, "c1", "$queue/w", "g")
        for i in range(5):
            b.publish(Message("$queue/w", f"m{i}".encode(), 1))
        b.publish(Message("t/x", b"m5", 1))  # captured
        gevent.sleep(0)
        assert settle(b, "w", "$ack", held.sent[0][1]) == 1  # m0: settled by the group
        b.queues.tick()
        storage.commit()
        owners["w"] = "n2"
        b.queues.move_away({"w": "n2"})
        gevent.sleep(0.01)  # c1's membership goes to n2's group (remote)
        storage.commit()
        b.publish(Message("t/x", b"not-here", 1))  # n2 captures it now, not n1
        assert "w" not in b.queues.queues
        moved = b.queues.take_stranded("w", limit=2)
        assert [r.payload for r in moved] == [b"m1", b"m2"]
        b.queues.drop_stranded("w", moved)  # stored by n2
        assert [r.payload for r in b.queues.take_stranded("w", limit=2)] == [b"m3", b"m4"]  # on its way
        owners["w"] = "n1"  # given back (n2 gone)
        assert b.queues.unstrand("w") is None
        with pytest.raises(QueueRefused) as refused:
            b.queues.publish(Message("$queue/w", b"early", 1))
        assert refused.value.reason_code == 0x80 and "w" not in b.queues.queues
        b.queues.keep_stranded("w")  # the batch did not reach n2
        assert b.queues.unstrand("w") is not None and not b.queues.stranded
        b.publish(Message("$queue/w", b"after", 1))
        b.publish(Message("t/y", b"captured", 1))
        gevent.sleep(0)
        storage.commit()
        _session2, d = member(b, "c2", "$queue/w", "g")
        gevent.sleep(0)
        assert [m.payload for _pid, m in d.sent] == [b"m3", b"m4", b"m5", b"after", b"captured"]
        q = b.queues.queues["w"]
        assert q.log.next == 8 and q.log.count == 5  # m0 settled and m1, m2 moved: gone from here
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
