"""Raft snapshots of a group (fluxmq/replication/snapshot.py) and their writing by the group's log
compaction (fluxmq/replication/group.py): real LMDB stores in tmp dirs, a real one-node pysyncobj
group for the compaction."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import gevent
import pytest

from fluxmq.broker.message import Message
from fluxmq.queues.config import ReplicationConfig
from fluxmq.replication import snapshot
from fluxmq.replication.log import ReplicatedQueueLog
from fluxmq.storage.lmdb import LMDBStorage
from fluxmq.storage.queue_log import MemoryQueueLog, encode_record
from tests.conftest import free_port

MiB = 1 << 20


class _Group:
    """What snapshot.Writing and snapshot.read use of a RaftGroup."""

    def __init__(self, store) -> None:
        self.name = "default"
        self.store = store
        self.logs: dict = {}
        self.owner = "127.0.0.1:1"
        self.self_addr = "127.0.0.1:1"
        self.epoch = 0  # the index of the last claim applied (RaftGroup.epoch)
        self.mqtt_of = {"127.0.0.1:1": "127.0.0.1:1883"}
        self.applied = 0
        self.stats = {"snapshots_written": 0, "snapshots_installed": 0}
        self.on_unknown = None
        self.on_applied = None


def _blobs(first: int, n: int) -> list[bytes]:
    return [encode_record(1.0, Message("$queue/q/k", b"m%d" % i, 1)) for i in range(first, first + n)]


def _store(kind: str, path: Path):
    if kind == "memory":
        return None, MemoryQueueLog()
    storage = LMDBStorage(path, map_size=64 * MiB)
    return storage, storage.queue_log()


@pytest.mark.parametrize("kind", ["lmdb", "memory"])
def test_a_dump_written_in_steps_is_the_state_it_began_at(tmp_path: Path, kind: str) -> None:
    """The records are written a chunk per step (the hub runs between two); what is applied
    meanwhile (a truncation, appends, a commit of the store) does not change the dump, which a
    replica then installs as the state at the dump's index."""
    storage, store = _store(kind, tmp_path / "a")
    group = _Group(store)
    qlog = group.logs["q"] = ReplicatedQueueLog("q", store, group, ReplicationConfig(True))
    qlog.apply_append(_blobs(0, 2000))
    if storage is not None:
        storage.commit()  # these in LMDB, the next ones pending
    qlog.apply_append(_blobs(2000, 500))
    qlog.apply_commit("g", 7, 9, ())
    path = str(tmp_path / "dump")
    writing = snapshot.Writing(path, group, ((b"", 42, 3), (b"", 41, 3), set()))
    steps = writing.steps()
    next(steps)
    qlog.apply_truncate(1500)  # applied after the dump's index
    qlog.apply_append(_blobs(2500, 100))
    qlog.apply_commit("g", 1500, None, ())
    if storage is not None:
        storage.commit()
    n = 1 + sum(1 for _ in steps)
    assert n == -(-2500 // snapshot.CHUNK)  # 2,500 records, CHUNK at a time
    writing.finish()
    assert group.stats["snapshots_written"] == 1

    storage2, store2 = _store(kind, tmp_path / "b")
    replica = _Group(store2)
    rlog = replica.logs["q"] = ReplicatedQueueLog("q", store2, replica, ReplicationConfig(True))
    assert snapshot.read(path, replica) == ((b"", 42, 3), (b"", 41, 3), set())
    assert replica.applied == 42 and replica.stats["snapshots_installed"] == 1
    assert (rlog.first, rlog.next, rlog.count) == (0, 2500, 2500)
    assert rlog.progress == {"g": [7, {9}]}
    assert store2.read("q", 0, 3000) == list(enumerate(_blobs(0, 2500)))
    for s in (storage, storage2):
        if s is not None:
            s.close()


def test_a_dump_given_up_leaves_the_previous_one_whole(tmp_path: Path) -> None:
    group = _Group(MemoryQueueLog())
    qlog = group.logs["q"] = ReplicatedQueueLog("q", group.store, group, ReplicationConfig(True))
    qlog.apply_append(_blobs(0, 10))
    path = str(tmp_path / "dump")
    first = snapshot.Writing(path, group, ((b"", 5, 1), (b"", 4, 1), set()))
    for _ in first.steps():
        pass
    first.finish()
    before = Path(path).read_bytes()
    qlog.apply_append(_blobs(10, 3000))
    second = snapshot.Writing(path, group, ((b"", 9, 1), (b"", 8, 1), set()))
    next(second.steps())
    second.discard()
    assert Path(path).read_bytes() == before
    assert not Path(path + ".writing").exists()


def test_compaction_writes_the_dump_while_the_hub_goes_on(tmp_path: Path) -> None:
    """Log compaction of a group holding thousands of records: entries are committed and applied
    while its dump is written (once the whole dump was written in one go, holding the hub and every
    publish of the node: the 20-90 ms stall once per 5,000 entries of bench/raft_queue.py), the log
    before the dump is dropped, and the dump has every record."""
    from fluxmq.replication.group import RaftGroup

    storage = LMDBStorage(tmp_path / "data", map_size=64 * MiB)
    me = f"127.0.0.1:{free_port()}"
    group = RaftGroup(
        "default", me, [me], str(tmp_path / "raft"), storage.queue_log(), "forward", compaction_entries=4
    )
    group.logs["q"] = ReplicatedQueueLog("q", group.store, group, ReplicationConfig(True))
    group.start()
    try:
        deadline = time.monotonic() + 20
        while group.owner != me and time.monotonic() < deadline:
            gevent.sleep(0.01)
        assert group.owner == me  # elected, its claim applied
        # (dump being written, entries applied) at every idle point of the loop, while a producer
        # keeps one entry of 1,000 records in flight until two dumps are written
        seen: list[tuple[bool, int]] = []
        produced = [0]

        def done() -> bool:
            return group.stats["snapshots_written"] >= 2 or time.monotonic() > deadline

        def watch() -> None:
            while not done() and len(seen) < 10_000_000:
                seen.append((group.snapshot_writing, group.stats["entries_applied"]))
                gevent.idle()

        def produce() -> None:
            while not done():
                applied = group.stats["entries_applied"]
                group.stage(("a", "q", _blobs(produced[0], 1000)))  # one Raft entry
                produced[0] += 1000
                while group.stats["entries_applied"] == applied and not done():
                    gevent.sleep(0.001)

        gevent.joinall(
            [gevent.spawn(watch), gevent.spawn(produce)], timeout=max(0.0, deadline - time.monotonic())
        )
        assert group.stats["snapshots_written"] >= 2, group.stats
        assert any(a[0] and b[0] and b[1] > a[1] for a, b in itertools.pairwise(seen)), (
            "no entry was applied while a dump was being written"
        )
        # pysyncobj drops the entries before a dump at its next tick after the dump is complete
        st = group._node.getStatus()
        while st["log_len"] > st["commit_idx"] - 3 and time.monotonic() < deadline:
            gevent.sleep(0.01)
            st = group._node.getStatus()
        assert st["log_len"] <= st["commit_idx"] - 3, st
    finally:
        group.stop()
    replica = _Group(MemoryQueueLog())
    rlog = replica.logs["q"] = ReplicatedQueueLog("q", replica.store, replica, ReplicationConfig(True))
    snapshot.read(group.dump, replica)
    assert rlog.first == 0 and rlog.count == rlog.next >= 2000  # whole entries, every record up to the index
    assert replica.store.read("q", 0, rlog.next) == list(enumerate(_blobs(0, rlog.next)))
    storage.close()
