"""What a replica applies across a change of delivery owner (fluxmq/replication/group.py): the
delivery epoch, on a RaftGroup that is not started (its entries are given to ``_apply`` as
pysyncobj would, in log order) and the memory queue-log store."""

from __future__ import annotations

from fluxmq.broker.message import Message
from fluxmq.errors import QueueRefused
from fluxmq.queues.config import ReplicationConfig
from fluxmq.replication.group import STALE, RaftGroup
from fluxmq.replication.log import ReplicatedQueueLog
from fluxmq.storage.queue_log import MemoryQueueLog, encode_record


def _group(tmp_path) -> tuple[RaftGroup, ReplicatedQueueLog]:
    store = MemoryQueueLog()
    group = RaftGroup("default", "n1", ["n2", "n3"], str(tmp_path), store, "forward", distribution="forward")
    group._scheduled = True  # nothing is submitted: the test reads what is staged
    qlog = group.logs["q"] = ReplicatedQueueLog("q", store, group, ReplicationConfig(True))
    blobs = [encode_record(1.0, Message("$queue/q", b"m%d" % i, 1)) for i in range(3)]
    assert group._apply([("e", 0), ("a", "q", blobs), ("c", "q", "g", 0, None, ())], 1) is True
    return group, qlog


def test_a_settlement_staged_before_a_claim_and_applied_after_it_changes_nothing(tmp_path) -> None:
    """An $ack of a delivery made before another node's claim, committed after it: the new owner
    rebuilt its groups without it and may have handed the record out again, so the settlement
    is refused (its hold is refused, never confirmed) and the record stays unsettled; the same
    settlement staged after the claim is applied."""
    group, qlog = _group(tmp_path)
    superseded = []
    group.on_superseded = superseded.append
    assert group._apply([("o", "n2", 2, "")], 2) is True  # n2's claim
    assert (group.epoch, group.owner, superseded) == (2, "n2", [group])
    assert group._apply([("e", 0), ("c", "q", "g", 0, 1, ())], 3) == STALE
    assert group._apply([("e", 0), ("c", "q", "g", 1, None, ())], 4) == STALE  # a floor move, too
    assert qlog.progress["g"] == [0, set()]
    assert group._apply([("e", 0), ("c", "q", "g", 0, None, ())], 5) is True  # registers nothing new
    assert group._apply([("e", 2), ("c", "q", "g", 0, 1, ())], 6) is True
    assert qlog.progress["g"] == [0, {1}]


def test_a_lease_give_back_or_nack_of_an_earlier_epoch_is_not_acted_on(tmp_path) -> None:
    group, qlog = _group(tmp_path)
    group._apply([("o", "n2", 2, "")], 2)
    qlog.events.clear()
    stale = [
        ("e", 0),
        ("l", "q", "g", "n3", "k", [0], [1]),
        ("b", "q", "g", "n3", "k", [1]),
        ("n", "q", "g", "n3", 2, "", False),
    ]
    group._apply(stale, 3)
    assert qlog.events == []
    group._apply([("e", 2), ("l", "q", "g", "n3", "k", [0], [1])], 4)
    assert qlog.events == [("l", "q", "g", "n3", "k", [0], [1])]


def test_every_staged_batch_names_the_epoch_it_was_staged_in(tmp_path) -> None:
    group, qlog = _group(tmp_path)
    qlog.commit("g", 0, 1)
    group.stage_append("q", b"x")
    group._apply([("o", "n2", 2, "")], 2)  # applied between two stagings of one batch
    qlog.commit("g", 0, 2)
    group.stage_append("q", b"y")
    assert group._ops == [
        ("e", 0),
        ("c", "q", "g", 0, 1, ()),
        ("a", "q", [b"x"]),
        ("e", 2),
        ("c", "q", "g", 0, 2, ()),
        ("a", "q", [b"y"]),
    ]


def test_a_stale_entry_refuses_the_acks_held_for_it_and_not_the_appends(tmp_path) -> None:
    group, qlog = _group(tmp_path)
    append = qlog.held_ack()
    ack = qlog.held_settlement()
    assert append is not ack
    holds, group._holds = group._holds, []
    group._done(1, holds, None, STALE)
    assert append.done and append.outcome is None
    assert ack.done and isinstance(ack.outcome, QueueRefused)
    assert "a new leader took over delivery" in str(ack.outcome)


def test_the_epoch_is_learned_again_from_the_claims_replayed_at_a_restart(tmp_path) -> None:
    group, qlog = _group(tmp_path)
    group.applied = 10  # what the store had applied before the restart
    group.epoch = 0
    group._apply([("o", "n3", 4, "h:1883")], 7)
    assert group.epoch == 7 and group.mqtt_of["n3"] == "h:1883"
    group._apply([("e", 3), ("c", "q", "g", 0, 1, ())], 8)  # replayed: applied before, untouched
    assert qlog.progress["g"] == [0, set()]


def _run_one_member_group(tmp_path, store, me: str, messages=(), until: int = 0) -> RaftGroup:
    """A one-member group at ``me`` on ``tmp_path`` elected, its claim applied, ``messages``
    appended to queue q and committed, everything applied (at least up to index ``until``: a
    claim replayed from the journal makes it the owner before the entries after it are applied);
    stopped before it returns."""
    import gevent

    group = RaftGroup("default", me, [me], str(tmp_path), store, "forward")
    qlog = group.logs["q"] = ReplicatedQueueLog("q", store, group, ReplicationConfig(True))
    group.start()
    try:
        with gevent.Timeout(20):
            while group.owner != me:
                gevent.sleep(0.01)
            for m in messages:
                qlog.append_one(m)
            if messages:
                held = qlog.held_ack()
                while not held.done:
                    gevent.sleep(0.01)
                assert held.outcome is None
            while group.applied < max(until, group._node.raftCommitIndex):
                gevent.sleep(0.01)
    finally:
        group.stop()
    return group


def test_commands_are_pickled_with_protocol_5_and_protocol_2_ones_still_replay(tmp_path) -> None:
    """pysyncobj's @replicated pickles a command with protocol 2, where each record (bytes) is a
    latin-1 text to encode, and decode on every replica: ~90 + 80 us per entry of 200 records
    (bench/RESULTS.md). The group submits its entries pickled with protocol 5; a journal written
    before (protocol 2 commands) is replayed as it was."""
    import pickle

    import pysyncobj.pickle as pysyncobj_pickle
    from pysyncobj.journal import createJournal

    from tests.conftest import free_port

    me = f"127.0.0.1:{free_port()}"
    messages = [Message("$queue/q", b"m%d" % i, 1) for i in range(3)]
    first_store = MemoryQueueLog()
    group = _run_one_member_group(tmp_path, first_store, me, messages)
    written = first_store.read("q", 0, 10)
    assert len(written) == 3
    journal = createJournal(group.journal)
    entries = [journal[i] for i in range(len(journal))]
    ours = [(cmd, idx, term) for cmd, idx, term in entries if cmd[:1] == b"\x00"]  # REGULAR
    assert ours and all(cmd[1:3] == b"\x80\x05" for cmd, _, _ in ours)  # pickle protocol 5
    # the same journal as the previous version wrote it: every command pickled with protocol 2
    first = entries.index(ours[0])
    journal.deleteEntriesFrom(first)  # a position in the journal
    for cmd, idx, term in entries[first:]:
        if cmd[:1] == b"\x00":
            cmd = b"\x00" + pysyncobj_pickle.dumps(pickle.loads(cmd[1:]))
            assert cmd[1:3] == b"\x80\x02"
        journal.add(cmd, idx, term)
    journal._destroy()
    store = MemoryQueueLog()  # nothing applied: the restart replays the whole journal
    _run_one_member_group(tmp_path, store, me, until=entries[-1][1])
    assert store.read("q", 0, 10) == written


def test_an_entry_is_appended_and_sent_to_the_followers_in_the_turn_it_is_submitted(tmp_path) -> None:
    """The leader appends a submitted entry to its log and sends it to every follower at once, in
    the same hub turn (not at its driver's next tick, which pysyncobj would wake through a pipe):
    before this greenlet yields, the log holds it and the next index pysyncobj keeps for each
    follower is past it; then every replica applies it."""
    import gevent

    groups = _three_groups(tmp_path)
    addrs = [g.self_addr for g in groups]
    try:
        with gevent.Timeout(30):
            leader = _started_leader(groups)
            followers = [a for a in addrs if a != leader.self_addr]
            while not all(leader._node.isNodeConnected(n) for n in leader._node.otherNodes):
                gevent.sleep(0.02)
            node = leader._node
            before = node.getStatus()["log_len"]
            blob = encode_record(1.0, Message("$queue/q", b"m", 1))
            outcome = []
            node.submit([("e", leader.epoch), ("a", "q", [blob])], lambda res, err: outcome.append(err))
            status = node.getStatus()  # no yield since the submit: no tick ran
            assert status["log_len"] == before + 1
            last = max(int(status[f"next_node_idx_server_{a}"]) for a in followers)
            assert all(int(status[f"next_node_idx_server_{a}"]) == last for a in followers)
            assert last > node.raftLastApplied + 1  # sent past what is applied: the new entry
            while not outcome:
                gevent.sleep(0.01)
            assert outcome == [0]
            while not all(len(g.store.read("q", 0, 10)) == 1 for g in groups):
                gevent.sleep(0.01)
    finally:
        for group in groups:
            group.stop()


def _three_groups(tmp_path) -> list[RaftGroup]:
    from tests.conftest import free_port

    addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    groups = []
    for i, me in enumerate(addrs):
        store = MemoryQueueLog()
        group = RaftGroup("default", me, addrs, str(tmp_path / f"n{i}"), store, "forward")
        group.logs["q"] = ReplicatedQueueLog("q", store, group, ReplicationConfig(True))
        groups.append(group)
    return groups


def _started_leader(groups: list[RaftGroup]) -> RaftGroup:
    """Start ``groups`` and wait (under the caller's gevent.Timeout) for one to deliver."""
    import gevent

    for group in groups:
        group.start()
    while True:
        gevent.sleep(0.02)
        leader = next((g for g in groups if g.delivering), None)
        if leader is not None:
            return leader


def _untimed_leader(groups: list[RaftGroup]) -> RaftGroup:
    """``_started_leader``, once it is connected to both followers and every group applied what it
    did; then every group's driver is killed: no tick from here on (under the caller's
    gevent.Timeout)."""
    import gevent

    leader = _started_leader(groups)
    while not all(leader._node.isNodeConnected(n) for n in leader._node.otherNodes):
        gevent.sleep(0.02)
    while not all(g.applied == leader.applied for g in groups):
        gevent.sleep(0.02)
    for group in groups:
        group._driver.kill()
    return leader


def test_the_leader_delivers_whatever_the_drift_between_pysyncobjs_clock_and_time_monotonic(
    tmp_path, monkeypatch
) -> None:
    """pysyncobj stamps each member's last answer with its own clock (CLOCK_MONOTONIC_RAW), which
    drifts from time.monotonic's: on a host where they were 0.31 s apart the lease (0.3 s) was
    never held and no leader ever delivered. Here pysyncobj's clock runs 1 s behind; the leader
    still delivers and counts its followers as answering."""
    import gevent
    from pysyncobj import syncobj

    raw = syncobj.monotonicTime
    monkeypatch.setattr(syncobj, "monotonicTime", lambda: raw() - 1.0)
    groups = _three_groups(tmp_path)
    try:
        with gevent.Timeout(30):
            leader = _started_leader(groups)
            while len(leader.answering(2.0)) < 3:
                gevent.sleep(0.02)
        assert leader.answering(2.0) == {g.self_addr for g in groups}
    finally:
        for group in groups:
            group.stop()


def test_answers_are_read_committed_and_applied_in_the_hub_turn_without_a_tick(tmp_path) -> None:
    """The Raft sockets are watched by persistent hub watchers whose callbacks read a message and
    do what a tick did after its poll (the leader's commit index from the followers' answers, the
    committed entries applied, the holds resolved) in the same hub turn. With no driver ticking
    at all, an entry is still sent, answered, committed, acknowledged and applied on every
    replica; and the watchers that served it are the ones made when the connections were (none
    made per wait)."""
    import gevent

    groups = _three_groups(tmp_path)
    try:
        with gevent.Timeout(30):
            leader = _untimed_leader(groups)  # no tick from here on: only the hub's watchers and timers
            watchers = [dict(g._node._poller.watchers) for g in groups]
            assert all(watchers)
            qlog = leader.logs["q"]
            for round_ in range(3):
                qlog.append_one(Message("$queue/q", b"m%d" % round_, 1))
                held = qlog.held_ack()
                while not held.done:
                    gevent.sleep(0.005)
                assert held.outcome is None
            # every replica applied them (a follower the last one with the next entry, or at its
            # driver's tick: FOLLOWER_APPLY_BATCH)
            while not all(len(g.store.read("q", 0, 10)) >= (3 if g is leader else 2) for g in groups):
                gevent.sleep(0.01)
            assert [dict(g._node._poller.watchers) for g in groups] == watchers
    finally:
        for group in groups:
            group.stop()


class _CountingMap:
    """A journal file's mapping that counts its ``size()`` calls (one fstat(2) each)."""

    def __init__(self, mm) -> None:
        self.mm = mm
        self.sizes = 0

    def size(self) -> int:
        self.sizes += 1
        return self.mm.size()

    def __len__(self) -> int:
        return len(self.mm)

    def __getitem__(self, key):
        return self.mm[key]

    def __setitem__(self, key, value) -> None:
        self.mm[key] = value

    def resize(self, size: int) -> None:
        self.mm.resize(size)

    def flush(self) -> None:
        self.mm.flush()

    def close(self) -> None:
        self.mm.close()


def test_the_leader_applies_its_own_entries_without_unpickling_them_nor_stating_its_journal(
    tmp_path, monkeypatch
) -> None:
    """The leader keeps the operations of the entries it submits and applies those (the same
    entry, checked by identity in its log) instead of unpickling the command it pickled itself;
    and its journal appends an entry without asking the file's size (pysyncobj's journal stats
    the file twice per entry)."""
    import gevent
    import pysyncobj.syncobj as syncobj_module

    from tests.conftest import free_port

    me = f"127.0.0.1:{free_port()}"
    store = MemoryQueueLog()
    group = RaftGroup("default", me, [me], str(tmp_path), store, "forward")
    qlog = group.logs["q"] = ReplicatedQueueLog("q", store, group, ReplicationConfig(True))
    group.start()
    try:
        with gevent.Timeout(20):
            while group.owner != me:
                gevent.sleep(0.01)
            journal = group._node._SyncObj__raftLog._FileJournal__journalFile
            counting = journal._ResizableFile__mm = _CountingMap(journal._ResizableFile__mm)
            unpickled = []
            loads = syncobj_module.pickle.loads
            monkeypatch.setattr(syncobj_module.pickle, "loads", lambda d: unpickled.append(1) or loads(d))
            for i in range(3):
                qlog.append_one(Message("$queue/q", b"m%d" % i, 1))
                held = qlog.held_ack()
                while not held.done:
                    gevent.sleep(0.005)
                assert held.outcome is None
            assert len(store.read("q", 0, 10)) == 3
            assert unpickled == [] and counting.sizes == 0
    finally:
        group.stop()


def test_a_follower_applies_committed_entries_two_at_a_time_unless_its_own_entry_waits(tmp_path) -> None:
    """A follower learns each entry's commit from the next append_entries (or the commit notice)
    and applies committed entries two at a time: one store commit for both (the driver's tick
    applies a lone one). An entry a follower forwarded (its producer's PUBACK waits for it) is
    applied as soon as it is committed. No driver ticks here: only the hub's watchers."""
    import gevent

    groups = _three_groups(tmp_path)
    try:
        with gevent.Timeout(30):
            leader = _untimed_leader(groups)
            followers = [g for g in groups if g is not leader]
            batches: dict = {id(g): [] for g in followers}
            for g in followers:
                node = g._node
                apply = node._apply_entries

                def counted(node=node, apply=apply, seen=batches[id(g)]):
                    seen.append(node.raftCommitIndex - node.raftLastApplied)
                    return apply()

                node._apply_entries = counted
            qlog = leader.logs["q"]
            for round_ in range(6):
                qlog.append_one(Message("$queue/q", b"m%d" % round_, 1))
                held = qlog.held_ack()
                while not held.done:
                    gevent.sleep(0.005)
            while not all(g.applied >= leader.applied - 1 for g in followers):
                gevent.sleep(0.01)
            assert all(batches[id(g)] and min(batches[id(g)]) >= 2 for g in followers), batches
            follower = followers[0]
            before = follower.applied
            flog = follower.logs["q"]
            flog.append_one(Message("$queue/q", b"forwarded", 1))
            held = flog.held_ack()
            while not held.done:
                gevent.sleep(0.005)
            assert held.outcome is None
            assert follower.applied > before and len(follower.store.read("q", 0, 10)) == 7
    finally:
        for group in groups:
            group.stop()


def test_a_start_whose_raft_port_is_taken_lets_the_hub_run_while_it_retries_the_bind(tmp_path) -> None:
    """pysyncobj (autoTick off) retries the bind in a loop inside its constructor until
    ``maxBindRetries`` fail: ~5 s in which the worker answered nothing (HTTP, MQTT, its etcd
    lease). The retries wait in the hub: another greenlet runs meanwhile, and the start still
    ends in pysyncobj's BindError once they are spent (the caller retries or reports it)."""
    import socket

    import gevent
    import pytest
    from pysyncobj import SyncObjException

    from tests.conftest import HOST

    taken = socket.socket()
    taken.bind((HOST, 0))
    taken.listen(1)
    me = f"{HOST}:{taken.getsockname()[1]}"
    group = RaftGroup("default", me, [me], str(tmp_path), MemoryQueueLog(), "forward")
    ticks = []

    def other() -> None:
        while True:
            ticks.append(1)
            gevent.sleep(0.05)

    runner = gevent.spawn(other)
    try:
        with gevent.Timeout(30), pytest.raises(SyncObjException, match="BindError"):
            group.start()
        assert len(ticks) > 1, "the hub ran nothing while the bind was retried"
    finally:
        runner.kill()
        group.stop()
        taken.close()


def test_leases_are_superseded_once_a_later_term_than_the_last_applied_claims_began(tmp_path) -> None:
    """``RaftGroup.lease_superseded`` (its use: tests/replication/test_distribution.py): the term
    of the claim applied last, against the node's current Raft term; learned again from the
    claims replayed at a restart."""
    from types import SimpleNamespace

    group, qlog = _group(tmp_path)
    assert not group.lease_superseded()  # not started
    group._apply([("o", "n2", 2, "")], 2)
    group._node = SimpleNamespace(raftCurrentTerm=2)
    try:
        assert group.claim_term == 2 and not group.lease_superseded()
        group._node.raftCurrentTerm = 3  # n2 deposed: an election of term 3
        assert group.lease_superseded()
        group._apply([("o", "n3", 3, "")], 5)  # the new term's claim
        assert not group.lease_superseded()
        group.applied, group.claim_term = 10, None  # a restart replaying its journal
        group._apply([("o", "n3", 3, "")], 5)
        assert group.claim_term == 3 and not group.lease_superseded()
    finally:
        group._node = None
