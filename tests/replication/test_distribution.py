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


def _replicated_queue(tmp_path, raft):
    """Queue ``q`` replicated by ``raft`` (its store stays open for the test)."""
    storage = LMDBStorage(tmp_path / "db", map_size=64 << 20)
    manager = QueueManager(
        storage,
        [QueueConfig("q")],
        log_factory=lambda name, store, stored=None: ReplicatedQueueLog(
            name, store, raft, ReplicationConfig(True), stored
        ),
    )
    return manager.queue("q", create=True)


def _leader_with_a_remote_member(tmp_path):
    raft = _Raft()
    q = _replicated_queue(tmp_path, raft)
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


class _Local:
    """A local consumer's session as the group sees it (its deliveries are taken as sent)."""

    alive = True
    send_quota = 10

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.got: list[int] = []

    def can_take_tracked(self) -> bool:
        return True

    def send_tracked(self, message) -> int:
        self.got.append(message.identity()[2] if hasattr(message, "identity") else message.offset)
        return 1


def test_an_ack_by_a_consumer_that_does_not_hold_the_record_settles_nothing(tmp_path) -> None:
    """After a takeover the new leader hands out again what nobody settled, maybe to another
    member than the one that had it from the old leadership; that one's ``$ack``, staged after the
    claim, named the record by offset only and settled the other member's delivery: confirmed, and
    then the record reached the other member (seen on nodes of two workers, the two consumers of
    the new leader's node; tests/e2e/test_replication_workers.py). An ack settles a record only for
    the member holding it, as an auto-ack PUBACK already does."""
    from fluxmq.queues.group import Member

    raft, q, qlog, g = _leader_with_a_remote_member(tmp_path)
    fresh = q.groups["g"] = ReplicatedGroup(q, "g", 3)  # a new leadership from the floor past 0..2
    qlog.apply_append([encode_record(1.0, Message("$queue/q", b"n%d" % i, 1)) for i in range(2)])
    a, b = _Local("a"), _Local("b")
    for s in (a, b):
        fresh.add(Member(s, "$queue/q", "", False, 10, fresh))
    fresh.dispatch()
    held = {o: p.member.session for o, p in fresh.pending.items()}
    assert sorted(held) == [3, 4] and {held[3], held[4]} == {a, b}
    other = a if held[3] is b else b
    assert not fresh.ack(3, other) and 3 in fresh.pending  # not its delivery: nothing settled
    assert fresh.ack(3, held[3]) and 3 not in fresh.pending
    assert fresh.ack(4)  # no session named (an ack from the node itself): by offset, as before


def test_replicate_a_record_set_aside_here_then_leased_elsewhere_is_not_offered_here_again(tmp_path) -> None:
    """distribution_mode replicate: a record none of this node's members can take is set aside
    (the group's ``undeliverable``) while this node holds its lease; once the lease lapsed and the
    record was leased to another node (``moved``), a member joining here must not get it offered
    (it would be delivered twice, on two nodes), and nothing of it stays held here."""
    raft = _Raft()
    raft.distribution = "replicate"
    q = _replicated_queue(tmp_path, raft)
    q.log.apply_append([encode_record(1.0, Message("$queue/q", b"m", 1))])
    g = q.groups["g"] = ReplicatedGroup(q, "g")
    assert g.leased
    g._set_aside(0)  # (what a refusal by every member here does)
    g.moved([0])
    assert not g.undeliverable and not g.refused
    g._offer_aside_again()  # what a member joining here does
    assert not g.ready


def test_a_follower_delivers_no_lease_of_a_leader_that_a_later_term_deposed(tmp_path) -> None:
    """A follower learns that the old leader's last entries are committed only with the new
    leader's first ones, after that leader, its claim applied, has delivered again what the old
    one had leased, and a consumer may have had its ``$ack`` of it confirmed. A lease applied while
    a later term than the last applied claim's has begun is the deposed leader's: delivering it
    sent the record to a second member after the first one's ``$ack`` was confirmed (bench/chaos.py
    --setup raft, forward, seed 51: the new leader's consumer acked offset 1092 at 28.206 s, the
    follower's consumer got it at 28.209 s). It is not delivered: the new claim delivers it again."""
    from fluxmq.queues.group import Member
    from fluxmq.replication.distribution import member_key

    raft = _Raft()
    raft.self_addr, raft.superseded = "n2", False  # a follower of n1
    raft.lease_superseded = lambda: raft.superseded
    q = _replicated_queue(tmp_path, raft)
    qlog = q.log
    qlog.apply_append([encode_record(1.0, Message("$queue/q", b"m%d" % i, 1)) for i in range(2)])
    qlog.apply_commit("g", 0, None, ())
    g = q.groups["g"] = ReplicatedGroup(q, "g")
    consumer = _Local("c")
    member = Member(consumer, "$queue/q", "", False, 10, g)
    g.add(member)
    service = RaftService.__new__(RaftService)
    service._distribute(q, qlog, [("l", "q", "g", "n2", member_key(member), [0], [1])])
    assert consumer.got == [0] and 0 in g.pending  # the current leader's lease: delivered
    raft.superseded = True  # an election of a later term began; its claim is not applied yet
    service._distribute(q, qlog, [("l", "q", "g", "n2", member_key(member), [1], [1])])
    assert consumer.got == [0] and 1 not in g.pending
