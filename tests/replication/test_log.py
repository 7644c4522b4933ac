"""What a replica applies to its queue log (fluxmq/replication/log.py), on the memory store."""

from __future__ import annotations

from fluxmq.queues.config import ReplicationConfig
from fluxmq.replication.log import ReplicatedQueueLog
from fluxmq.storage.queue_log import MemoryQueueLog, encode_record


class _Group:
    delivering = True

    def __init__(self) -> None:
        self.staged = []

    def stage(self, op) -> None:
        self.staged.append(op)


def test_a_stale_group_registration_never_moves_the_floor_back() -> None:
    qlog = ReplicatedQueueLog("q", MemoryQueueLog(), _Group(), ReplicationConfig(True))
    qlog.apply_commit("g", 0, None, ())
    qlog.apply_commit("g", 500, None, ())
    qlog.apply_commit("g", 0, None, ())  # a follower's late subscribe registers the group at 0
    assert qlog.progress["g"][0] == 500


def test_settled_offsets_accumulate_and_the_floor_follows_them() -> None:
    qlog = ReplicatedQueueLog("q", MemoryQueueLog(), _Group(), ReplicationConfig(True))
    qlog.apply_commit("g", 0, None, ())
    qlog.apply_commit("g", 0, 2, ())
    qlog.apply_commit("g", 0, 1, ())
    assert qlog.progress["g"] == [0, {1, 2}]
    qlog.apply_commit("g", 1, None, ())
    assert qlog.progress["g"] == [3, set()]


def test_appends_get_their_offsets_when_applied() -> None:
    group = _Group()
    qlog = ReplicatedQueueLog("q", MemoryQueueLog(), group, ReplicationConfig(True))
    qlog.apply_append([encode_record(1.0, _msg(b"a")), encode_record(1.0, _msg(b"b"))])
    assert (qlog.first, qlog.next, qlog.count) == (0, 2, 2)
    assert [r.message.payload for r in qlog.read(0, 10)] == [b"a", b"b"]
    qlog.commit("g", 1)
    assert group.staged == [("c", "q", "g", 1, None, ())]  # a write is a command, not a local change


def _msg(payload: bytes):
    from fluxmq.broker.message import Message

    return Message("$queue/q", payload, 1, False)
