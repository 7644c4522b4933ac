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


def test_delivery_counts_are_commands_applied_on_every_replica() -> None:
    group = _Group()
    qlog = ReplicatedQueueLog("q", MemoryQueueLog(), group, ReplicationConfig(True))
    qlog.record_deliveries("g", 5, {2: 3})
    assert group.staged == [("k", "q", "g", 5, {2: 3})]  # staged, not written locally
    assert qlog.marks == {} and qlog.counts == {}
    qlog.apply_counts("g", 5, {2: 3})
    qlog.apply_counts("g", None, {2: None, 4: 2})
    assert qlog.marks == {"g": 5} and qlog.counts == {"g": {4: 2}}


def test_a_restarted_node_s_first_registration_drops_those_of_its_earlier_run() -> None:
    group = _Group()
    group.distribution = "forward"
    qlog = ReplicatedQueueLog("q", MemoryQueueLog(), group, ReplicationConfig(True))
    qlog.apply_member("g", "n1", "run1", "a\x00$queue/q", "", 10, False)
    qlog.apply_member("h", "n1", "run1", "b\x00$queue/q", "", 10, False)
    qlog.apply_member("g", "n2", "run7", "c\x00$queue/q", "k/#", 5, True)
    qlog.apply_member("g", "n1", "run2", "d\x00$queue/q", "", 10, False)
    assert qlog.registered == {
        "g": {
            ("n2", "c\x00$queue/q"): ("run7", "k/#", 5, True),
            ("n1", "d\x00$queue/q"): ("run2", "", 10, False),
        },
        "h": {},
    }
    qlog.apply_member("g", "n2", "run7", "c\x00$queue/q", "", 0, False)  # left
    assert list(qlog.registered["g"]) == [("n1", "d\x00$queue/q")]


def test_a_settlement_of_the_floor_itself_moves_the_floor() -> None:
    """A member on another node settles the record at the floor (``("c", g, 0, off)``): the
    replicated floor passes it at once, without waiting for the leader's own floor. Otherwise a
    leader whose group missed that settlement (its event applied while it did not deliver) keeps
    committing the old floor, and every later leader rebuilds a group whose floor sits on a
    settled record: never passed, never delivered again (seen: floor stuck for good after a
    leader kill)."""
    qlog = ReplicatedQueueLog("q", MemoryQueueLog(), _Group(), ReplicationConfig(True))
    qlog.apply_commit("g", 0, None, ())
    qlog.apply_commit("g", 0, 1, ())
    qlog.apply_commit("g", 0, 0, ())
    assert qlog.progress["g"] == [2, set()]
    qlog.apply_commit("g", 1, None, ())  # the leader's older floor changes nothing
    assert qlog.progress["g"] == [2, set()]
