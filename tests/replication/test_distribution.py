"""The forward leader's consumer groups (fluxmq/replication/distribution.py) as the applied
entries drive them (RaftService._distribute), on a real LMDB queue store; the Raft group is a
stand-in that records what is staged."""

from __future__ import annotations

from fluxmq.broker.message import Message
from fluxmq.queues import QueueManager
from fluxmq.queues.config import QueueConfig, ReplicationConfig
from fluxmq.replication.distribution import ReplicatedGroup
from fluxmq.replication.log import ReplicatedQueueLog
from fluxmq.replication.service import RaftService
from fluxmq.storage.lmdb import LMDBStorage
from fluxmq.storage.queue_log import encode_record


class _Raft:
    """This node ("n1") is the leader whose claim was applied last (the owner)."""

    distribution = "forward"
    self_addr = owner = "n1"
    incarnation = "run1"

    def __init__(self) -> None:
        self.delivering = True
        self.staged: list = []

    def stage(self, op) -> None:
        self.staged.append(op)

    def stage_lease(self, queue, group, node, key, offset, count) -> None:
        self.staged.append(("l", queue, group, node, key, [offset], [count]))

    def leader(self) -> str:
        return "n1"

    def answering(self, within: float) -> set[str]:
        return {"n1", "n2"}


def _leader_with_a_remote_member(tmp_path):
    raft = _Raft()
    storage = LMDBStorage(tmp_path / "db", map_size=64 << 20)
    manager = QueueManager(
        storage,
        [QueueConfig("q")],
        log_factory=lambda name, store, stored=None: ReplicatedQueueLog(
            name, store, raft, ReplicationConfig(True), stored
        ),
    )
    q = manager.queue("q", create=True)
    qlog = q.log
    qlog.apply_append([encode_record(1.0, Message("$queue/q", b"m%d" % i, 1)) for i in range(3)])
    qlog.apply_commit("g", 0, None, ())
    g = q.groups["g"] = ReplicatedGroup(q, "g")
    g.sync_remote({("n2", "c\x00$queue/q"): ("run9", "", 10, False)}, {"n1", "n2"}, "n1", raft)
    g.dispatch()
    assert sorted(g.pending) == [0, 1, 2]  # leased to the member on n2
    qlog.events.clear()
    return raft, q, qlog, g


def test_a_settlement_from_another_node_is_settled_on_a_leader_whose_delivery_lease_lapsed(tmp_path) -> None:
    """``delivering`` (a majority answered within DELIVERY_LEASE) lapses for a moment on a loaded
    leader; its groups are still the leader's decisions. A settlement applied then was taken as a
    follower's: the record left the leader's pending without being settled there, and the
    leader's floor never passed it (seen: the replicated floor stuck for good after a leader
    kill, tests/e2e/test_replication.py leader-kill runs, forward)."""
    raft, q, qlog, g = _leader_with_a_remote_member(tmp_path)
    raft.delivering = False
    qlog.apply_commit("g", 0, 1, ())  # n2's member acked offset 1
    events, qlog.events = qlog.events, []
    RaftService._distribute(RaftService.__new__(RaftService), q, qlog, events)
    assert g.is_settled(1) and 1 not in g.pending
    raft.delivering = True
    qlog.apply_commit("g", 0, 0, ())
    events, qlog.events = qlog.events, []
    RaftService._distribute(RaftService.__new__(RaftService), q, qlog, events)
    assert g.floor == 2 and sorted(g.pending) == [2]


def test_an_ack_on_a_leader_whose_delivery_lease_lapsed_moves_its_floor(tmp_path) -> None:
    raft, q, qlog, g = _leader_with_a_remote_member(tmp_path)
    raft.delivering = False
    assert g.ack(0)
    assert g.floor == 1
