"""Which worker owns a durable queue (``fluxmq.queues.placement``)."""

from __future__ import annotations

import zlib

import pytest

from fluxmq.queues.config import DLQConfig, QueueConfig
from fluxmq.queues.placement import QueuePlacement, owner_index


def test_the_owner_is_the_crc32_of_the_name_over_the_worker_count() -> None:
    for name in ("orders", "a", "events-2", "x" * 200):
        assert owner_index(name, 3) == zlib.crc32(name.encode()) % 3
        assert owner_index(name, 1) == 0
    spread = {owner_index(f"q{i}", 4) for i in range(100)}
    assert spread == {0, 1, 2, 3}


def test_a_dead_letter_queue_lives_with_its_queue() -> None:
    for name in ("orders", "billing", "q17"):
        assert owner_index(name + ".dlq", 5) == owner_index(name, 5)
    assert owner_index(".dlq", 5) == zlib.crc32(b".dlq") % 5  # a name that is only the suffix


def test_a_configured_dlq_topic_follows_its_source_queue() -> None:
    configs = [QueueConfig("orders", dlq=DLQConfig(topic="$queue/graveyard"))]
    placements = [QueuePlacement(i, 4, configs) for i in range(4)]
    owners = [p for p in placements if p.owns("orders")]
    assert len(owners) == 1 and owners[0].owns("graveyard")
    assert owners[0].owner("graveyard") == owner_index("orders", 4)
    assert sum(p.owns("other") for p in placements) == 1  # every name has exactly one owner


def test_a_replicated_queue_and_its_dlqs_live_on_the_raft_worker() -> None:
    """Worker 0 runs the node's Raft member: every replicated queue is its own (docs/replication.rst,
    "Several workers on a node"); plain queues stay placed by CRC-32."""
    from fluxmq.queues.config import ReplicationConfig

    rep = ReplicationConfig(enabled=True)
    name = _name_on(1, 2, "r")  # CRC-32 alone would put it on worker 1
    configs = [QueueConfig(name, replication=rep, dlq=DLQConfig(topic="$queue/rgrave")), QueueConfig("plain")]
    placements = [QueuePlacement(i, 2, configs) for i in range(2)]
    for p in placements:
        assert p.owner(name) == 0 and p.owner(name + ".dlq") == 0 and p.owner("rgrave") == 0
        assert p.owner("plain") == owner_index("plain", 2)
    assert placements[0].owns(name) and not placements[1].owns(name)


def test_one_worker_owns_everything() -> None:
    p = QueuePlacement(0, 1)
    assert p.owns("anything") and p.owns("x.dlq")


def _name_on(index: int, count: int, prefix: str = "q") -> str:
    return next(f"{prefix}{i}" for i in range(1000) if owner_index(f"{prefix}{i}", count) == index)


def test_a_manager_holds_only_the_queues_its_worker_owns(tmp_path) -> None:
    """Configured queues are made by their owner only; a publish to another worker's queue with no
    carrier to it is refused (0x80), never appended here; a stored queue another worker owns now
    (the worker count changed) is stranded: not served, its unsettled records handed out in
    batches and deleted once the owner has them."""
    from fluxmq.broker.message import Message
    from fluxmq.errors import QueueRefused
    from fluxmq.queues import QueueManager
    from fluxmq.storage.lmdb import LMDBStorage

    mine, theirs = _name_on(0, 2), _name_on(1, 2)
    storage = LMDBStorage(tmp_path / "d", map_size=64 << 20)
    try:
        one = QueueManager(storage, [QueueConfig(mine), QueueConfig(theirs)])  # one worker: both
        for i in range(5):
            one.publish(Message(f"$queue/{theirs}", f"m{i}".encode(), 1))
        group = one.queues[theirs].groups.setdefault(
            "g", one.queues[theirs].group_class(one.queues[theirs], "g")
        )
        group.floor = group.cursor = 0
        group.settle(0)
        group.settle(2)  # every group settled 0 and 2: they do not move
        storage.commit()
        one.stop()

        two = QueueManager(storage, [QueueConfig(mine), QueueConfig(theirs)], placement=QueuePlacement(0, 2))
        assert set(two.queues) == {mine} and set(two.stranded) == {theirs}
        with pytest.raises(QueueRefused) as err:
            two.publish(Message(f"$queue/{theirs}", b"x", 1))
        assert err.value.reason_code == 0x80
        first = two.take_stranded(theirs, limit=2)
        assert [r.message.payload for r in first] == [b"m1", b"m3"]
        two.drop_stranded(theirs, first)
        rest = two.take_stranded(theirs, limit=2)
        assert [r.message.payload for r in rest] == [b"m4"]
        two.drop_stranded(theirs, rest)
        assert theirs not in two.stranded  # empty: forgotten with its groups
        storage.commit()
        three = QueueManager(storage, [QueueConfig(mine)], placement=QueuePlacement(0, 2))
        assert three.stranded == {}  # nothing of it is left in this shard
    finally:
        storage.close()


class _Nodes:
    """A cluster's owner registry as the placement sees it (fluxmq.cluster.queue_nodes.QueueNodes)."""

    def __init__(self, node: str, owners: dict[str, str]) -> None:
        self.node = node
        self.owners = owners
        self.asked: list[str] = []

    def owner(self, name: str) -> str:
        self.asked.append(name)
        return self.owners.setdefault(name, self.node)  # claimed by the first node asking


def test_on_a_cluster_the_owning_node_comes_first_then_the_worker() -> None:
    from fluxmq.queues.config import ReplicationConfig

    configs = [
        QueueConfig("orders", dlq=DLQConfig(topic="$queue/graveyard")),
        QueueConfig("ledger", replication=ReplicationConfig(enabled=True)),
    ]
    here = [QueuePlacement(i, 2, configs) for i in range(2)]
    shared = {"orders": "n2", "local": "n1"}
    for p in here:
        p.nodes = _Nodes("n1", shared)
    # another node's queue, its DLQs with it: owned by no worker here
    for name in ("orders", "orders.dlq", "graveyard"):
        assert [p.owns(name) for p in here] == [False, False]
        assert here[0].owner_node(name) == "n2"
    assert here[0].nodes.asked[-1] == "orders"  # a DLQ is placed by its source queue's name
    # this node's queue: one worker of it
    assert sorted(p.owns("local") for p in here) == [False, True]
    assert here[0].owner_node("local") is None
    # a new queue is claimed for this node by the first worker asking
    assert sorted(p.owns("fresh") for p in here) == [False, True]
    assert shared["fresh"] == "n1"
    # a replicated queue never asks: it stays with this node's Raft member (worker 0)
    asked = len(here[0].nodes.asked)
    assert [p.owns("ledger") for p in here] == [True, False]
    assert [p.owns("ledger.dlq") for p in here] == [True, False]
    assert here[0].owner_node("ledger") is None
    assert len(here[0].nodes.asked) == asked


class _Owners:
    """``ClusterMetadata.queue_owners`` as ``QueueNodes`` uses it: the known owners, and claims in etcd."""

    def __init__(self, node: str, owners: dict[str, str]) -> None:
        self.node = node
        self.owners = dict(owners)
        self.claims: list[str] = []

    def claim(self, name: str) -> str:
        self.claims.append(name)
        return self.owners.setdefault(name, self.node)


def test_owns_without_waiting_never_claims_and_declines_an_owner_not_known_yet(tmp_path) -> None:
    """The C fast path's question (``owns(name, wait=False)``, asked by
    ``QueueManager.append_relayed`` within a call that must not switch greenlets): a queue whose
    owning node is not known here yet is not this worker's, and etcd is not asked (``owns`` claims
    it, in the reader greenlet); a known owner is answered as ``owns`` answers it."""
    from fluxmq.cluster.queue_nodes import QueueNodes
    from fluxmq.queues import QueueManager
    from fluxmq.queues.config import ReplicationConfig
    from fluxmq.storage.lmdb import LMDBStorage

    meta = type("Meta", (), {})()
    meta.queue_owners = owners = _Owners("n1", {"here": "n1", "there": "n2"})
    configs = [QueueConfig("ledger", replication=ReplicationConfig(enabled=True))]
    p = QueuePlacement(0, 1, configs)
    p.nodes = QueueNodes(meta)
    assert [p.owns(name, wait=False) for name in ("here", "here.dlq", "there", "fresh", "ledger")] == [
        True,
        True,
        False,
        False,  # not known yet: declined, not claimed
        True,  # replicated: this node's Raft member, never asked
    ]
    assert owners.claims == []
    assert p.owns("fresh") and owners.claims == ["fresh"]  # the full path claims it for this node
    assert p.owns("fresh", wait=False)
    # the relay's append declines (no effect, no claim) what owns(wait=False) declines
    storage = LMDBStorage(tmp_path / "db", map_size=16 << 20, verify=False)
    try:
        manager = QueueManager(storage, [QueueConfig("here"), QueueConfig("new")], placement=p)
        assert owners.claims == ["fresh", "new"]  # (claimed by the manager's start)
        del owners.owners["new"]  # (as if its owner were not known here)
        assert manager.append_relayed("$queue/new", [b"x"], "c") == 0
        assert manager.append_relayed("$queue/here", [b"x", b"y"], "c") == 2
        assert owners.claims == ["fresh", "new"]
        assert manager.queues["new"].log.count == 0 and manager.queues["here"].log.count == 2
    finally:
        storage.close()
