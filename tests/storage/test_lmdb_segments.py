"""Storage schema 4: a persistent session's queue entries of one commit are one ``queue`` record (a
segment, or a few of at most SEGMENT_BYTES), and an acknowledged or popped entry is marked in the
session's ``done`` record instead of deleted; a record goes once all of its seqs are done. Restored
exactly after a kill, whatever order the acknowledgements came in; a schema 3 store (one record per
entry, written by the old code) is upgraded.
"""

from __future__ import annotations

import random
import shutil
import struct
from pathlib import Path

import pytest

from fluxmq.broker.message import Message
from fluxmq.storage import records as r
from fluxmq.storage.lmdb import DONE, QUEUE, SCHEMA_VERSION, SENT, TRIM_EVERY
from tests.storage.lmdb_node import Node, connect_sub, entries, online

SCHEMA3_STORE = Path(__file__).parent / "fixtures" / "schema3-store"


def _ack_all(s, d, limit: int = 1000) -> None:
    n = 0
    while s.inflight and n < limit:
        n += 1
        assert s.on_puback(next(iter(s.inflight)))


def test_a_commit_writes_one_record_per_session_and_acknowledgements_delete_none(node: Node) -> None:
    s, d = online(node, 100, 1)
    for i in range(40):
        node.broker.publish(Message("t/x", f"m{i}".encode(), 1))
    batch = node.storage.take_batch()
    assert len(batch.ops[QUEUE]) == 1  # 40 small entries: one segment
    node.storage.write_taken(batch)
    assert entries(node, QUEUE) == 1 and len(s.inflight) == 40
    pids = [t[3] for t in d.sent]
    for pid in pids[:39]:
        assert s.on_puback(pid)
    batch = node.storage.take_batch()
    # 39 acknowledgements: no delete, one done record
    assert batch.ops[QUEUE] == {} and len(batch.ops[DONE]) == 1
    node.storage.write_taken(batch)
    assert entries(node, QUEUE) == 1  # m39 is still in flight
    node = node.restart()
    s = node.broker.sessions["sub"]
    assert [e.message.payload for e in s.inflight.values()] == [b"m39"] and not s.queue
    s, d = connect_sub(node, 100)
    assert [(t[3], t[4]) for t in d.sent] == [(pids[39], True)]
    assert s.on_puback(pids[39])
    node.storage.commit()
    assert entries(node, QUEUE) == 0 and entries(node, SENT) == 0  # the segment went with its last entry
    node.storage.abort()


def test_a_large_commit_is_split_into_segments_that_fit_a_page(node: Node) -> None:
    from fluxmq.storage.lmdb import SEGMENT_BYTES

    s, d = online(node, 10, 1)
    for i in range(200):
        node.broker.publish(Message("t/x", b"%03d" % i + b"p" * 60, 1))
    batch = node.storage.take_batch()
    values = list(batch.ops[QUEUE].values())
    assert 2 < len(values) < 200
    assert all(len(v) <= SEGMENT_BYTES + 1024 for v in values)
    assert sum(r.record_span(v) for v in values) == 200
    node.storage.write_taken(batch)
    node = node.restart()
    s = node.broker.sessions["sub"]
    assert len(s.inflight) == 10 and len(s.queue) == 190
    s, d = connect_sub(node, 10)
    got = []
    while s.inflight and len(got) < 300:
        pid = next(iter(s.inflight))
        got.append(s.inflight[pid].message.payload[:3])
        assert s.on_puback(pid)
        if len(got) % 17 == 0:
            node.storage.commit()
    node.storage.commit()
    assert got == [b"%03d" % i for i in range(200)]
    assert entries(node, QUEUE) == 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_acknowledgements_in_any_order_restore_exactly_after_a_kill(node: Node, seed: int) -> None:
    rnd = random.Random(seed)
    s, d = online(node, 20, 1)
    live: dict[bytes, int] = {}  # payload -> packet id in flight (0: queued)
    for i in range(60):
        node.broker.publish(Message("t/x", f"m{i:02d}".encode(), 1))
        if rnd.random() < 0.2:
            node.storage.commit()
        if rnd.random() < 0.3 and s.inflight:
            pid = rnd.choice(list(s.inflight))
            assert s.on_puback(pid)
    node.storage.commit()
    for _ in range(15):  # out of order, across commits
        pid = rnd.choice(list(s.inflight))
        assert s.on_puback(pid)
        if rnd.random() < 0.5:
            node.storage.commit()
    node.storage.commit()
    live = {e.message.payload: pid for pid, e in s.inflight.items()}
    queued = 60 - len(live) - (len(d.sent) - len(s.inflight))
    node.broker.publish(Message("t/x", b"never committed", 1))
    node = node.restart()
    s = node.broker.sessions["sub"]
    assert {e.message.payload: pid for pid, e in s.inflight.items()} == live
    assert len(s.queue) == queued
    s, d = connect_sub(node, 20)
    assert sorted(t[3] for t in d.sent) == sorted(live.values()) and all(t[4] for t in d.sent)
    node.broker.publish(Message("t/x", b"after", 1))
    node.storage.commit()
    got = []
    while s.inflight and len(got) < 200:
        pid = rnd.choice(list(s.inflight))
        got.append(s.inflight[pid].message.payload)
        assert s.on_puback(pid)
        if rnd.random() < 0.3:
            node.storage.commit()
    node.storage.commit()
    assert sorted(got) == sorted([*live, *(f"m{i:02d}".encode() for i in range(60 - queued, 60)), b"after"])
    assert entries(node, QUEUE) == 0 and entries(node, SENT) == 0
    node = node.restart()
    s = node.broker.sessions["sub"]
    assert not s.inflight and not s.queue


def test_new_entries_after_a_restart_go_above_the_acknowledged_tail_of_a_segment(node: Node) -> None:
    # One segment m0..m9; m5..m9 acknowledged (the tail), m0..m4 still in flight at the kill. The
    # entries stored after the restart must not take the seqs of m5..m9 (their record is still
    # there): a second restart would bring the acknowledged m5..m9 back, or lose the new ones.
    s, d = online(node, 20, 1)
    for i in range(10):
        node.broker.publish(Message("t/x", f"m{i}".encode(), 1))
    node.storage.commit()
    pids = [t[3] for t in d.sent]
    for pid in pids[5:]:
        assert s.on_puback(pid)
    node.storage.commit()
    node = node.restart()
    s, d = connect_sub(node, 20)
    for i in range(3):
        node.broker.publish(Message("t/x", f"new{i}".encode(), 1))
    node.storage.commit()
    node = node.restart()
    s = node.broker.sessions["sub"]
    expect = [b"m0", b"m1", b"m2", b"m3", b"m4", b"new0", b"new1", b"new2"]
    assert sorted(e.message.payload for e in s.inflight.values()) == expect
    s, d = connect_sub(node, 20)
    _ack_all(s, d)
    node.storage.commit()
    assert entries(node, QUEUE) == 0
    node = node.restart()
    assert not node.broker.sessions["sub"].inflight and not node.broker.sessions["sub"].queue


def test_a_message_never_acknowledged_does_not_keep_the_records_after_it(node: Node) -> None:
    s, d = online(node, 5, 1)
    node.broker.publish(Message("t/x", b"stuck", 1))
    node.storage.commit()
    stuck = d.sent[0][3]
    for turn in range(50):
        for i in range(4):
            node.broker.publish(Message("t/x", f"t{turn}-{i}".encode(), 1))
        node.storage.commit()
        for pid in [p for p in s.inflight if p != stuck]:
            assert s.on_puback(pid)
        node.storage.commit()
        # the stuck one's segment, the newest, and the all-done ones of the commits since the
        # last trim (every TRIM_EVERY commits): bounded, however long the stuck one stays
        assert entries(node, QUEUE) <= 3 + TRIM_EVERY
    node = node.restart()
    s = node.broker.sessions["sub"]
    assert [e.message.payload for e in s.inflight.values()] == [b"stuck"] and not s.queue


def test_a_schema_3_store_written_by_the_old_code_is_upgraded(tmp_path: Path) -> None:
    # fixtures/schema3-store was written by the schema 3 code (fixtures/make_schema3_store.py): in
    # flight 1 m0, 3 m2, 4 m3 (seq 1, m1, acknowledged and deleted), queued m4..m9, one entry each.
    path = tmp_path / "data"
    shutil.copytree(SCHEMA3_STORE, path)
    node = Node(path)
    with node.storage.env.begin() as txn:
        meta = node.storage.env.open_db(b"meta", txn=txn, create=False)
        assert struct.unpack("<I", txn.get(b"schema_version", db=meta))[0] == SCHEMA_VERSION == 4
    assert entries(node, QUEUE) == 9  # one per entry, as schema 3 wrote them
    s = node.broker.sessions["sub"]
    assert {pid: e.message.payload for pid, e in s.inflight.items()} == {1: b"m0", 3: b"m2", 4: b"m3"}
    assert len(s.queue) == 6
    s, d = connect_sub(node, 3)
    assert sorted((t[3], t[4]) for t in d.sent) == [(1, True), (3, True), (4, True)]
    assert s.on_puback(4)  # m3: marked done; m4 goes out
    node.broker.publish(Message("t/a", b"new", 1))  # queued behind m9, in a segment above seq 9
    node.storage.commit()
    node = node.restart()
    s = node.broker.sessions["sub"]
    assert sorted(e.message.payload for e in s.inflight.values()) == [b"m0", b"m2", b"m4"]
    assert len(s.queue) == 6  # m5..m9, new
    s, d = connect_sub(node, 3)
    got = [e.message.payload for e in s.inflight.values()]
    got.clear()
    while s.inflight and len(got) < 50:
        pid = next(iter(s.inflight))
        got.append(s.inflight[pid].message.payload)
        assert s.on_puback(pid)
    node.storage.commit()
    assert sorted(got) == sorted([b"m0", b"m2", b"m4", b"m5", b"m6", b"m7", b"m8", b"m9", b"new"])
    assert entries(node, QUEUE) == 0 and entries(node, SENT) == 0
    node = node.restart()
    s = node.broker.sessions["sub"]
    assert not s.inflight and not s.queue
    node.storage.abort()


def test_entries_are_readable_while_their_batch_is_written_and_after_it_failed(tmp_path: Path) -> None:
    """``sync: always`` writes a batch in a thread while the hub goes on: the entries of a taken
    batch are read from it until it is committed; a failed batch keeps them readable until its retry
    commits."""
    from fluxmq.storage.lmdb import LMDBStorage

    st = LMDBStorage(tmp_path / "d", map_size=8 << 20)
    st.put_session("c", 60, 0.0, None)
    for seq in range(5):
        st.queue_append("c", seq, b"\x01e%d" % seq)
    batch = st.take_batch()
    st.queue_append("c", 5, b"\x01e5")  # staged after the take: the next batch
    assert st.queue_read("c", range(7)) == [b"\x01e%d" % i for i in range(6)] + [None]
    st.batch_done(batch, ok=False)  # as if the write failed: kept, merged under the pending ops
    assert st.queue_read("c", range(6)) == [b"\x01e%d" % i for i in range(6)]
    st.commit()
    assert st.queue_read("c", range(7)) == [b"\x01e%d" % i for i in range(6)] + [None]
    st.close()
    st = LMDBStorage(tmp_path / "d", map_size=8 << 20)
    assert st.load().sessions["c"].queue.count == 6
    st.close()


def test_segment_and_done_records_round_trip() -> None:
    entries = [b"\x01abc", b"\x01", b"\x01" + b"z" * 300]
    seg = r.encode_segment(entries)
    assert r.record_span(seg) == 3 and [bytes(e) for e in r.record_entries(seg)] == entries
    assert r.record_span(entries[0]) == 1 and [bytes(e) for e in r.record_entries(entries[0])] == [entries[0]]
    with pytest.raises(r.RecordError):
        r.record_entries(seg[:-1])
    assert r.decode_done(r.encode_done(7, [(9, 12), (20, 21)])) == (7, [(9, 12), (20, 21)])
    with pytest.raises(r.RecordError):
        r.decode_done(r.encode_done(7, [(9, 12)])[:-1])


def test_a_packet_id_reused_after_its_sent_record_was_deleted_is_restored(node: Node) -> None:
    # The store caches the slots of the buckets it used last: a bucket whose record a commit
    # deletes (its 16 packet ids all acknowledged) must not take a packet id in memory only when
    # the ids come round to it again.
    s, d = online(node, 20, 1)
    for i in range(17):  # packet ids 1..17: the first sent record (ids 0..15) and the second
        node.broker.publish(Message("t/x", f"m{i}".encode(), 1))
    node.storage.commit()
    for pid in range(1, 16):
        assert s.on_puback(pid)
    node.storage.commit()
    assert entries(node, SENT) == 1  # 16 and 17 still in flight
    s._next_pid = 1  # as after 65,535 deliveries
    node.broker.publish(Message("t/x", b"again", 1))
    node.storage.commit()
    node = node.restart()
    s = node.broker.sessions["sub"]
    assert sorted(e.message.payload for e in s.inflight.values()) == [b"again", b"m15", b"m16"]


def test_a_session_with_nothing_live_between_commits_keeps_storing(node: Node) -> None:
    # Its seq space is dropped when all of it is done (the table remembers the state it found
    # last: a dropped one must not take the next entries).
    s, d = online(node, 20, 1)
    for turn in range(3):
        node.broker.publish(Message("t/x", f"m{turn}".encode(), 1))
        node.storage.commit()
        if turn < 2:
            _ack_all(s, d)
            node.storage.commit()
            assert "sub" not in node.storage._sent
    node = node.restart()
    s = node.broker.sessions["sub"]
    assert [e.message.payload for e in s.inflight.values()] == [b"m2"]


def test_all_done_records_go_every_trim_every_commits_or_when_the_session_has_none_live(node: Node) -> None:
    """A session that keeps live entries (one never acknowledged) leaves its all-done records for
    up to TRIM_EVERY commits (a trim dirties the queue's leftmost pages: a page write per commit),
    then one commit deletes them all; a restart in between brings none of them back. Once every
    entry of the session is done, that commit deletes its records at once."""
    s, d = online(node, 10, 1)
    node.broker.publish(Message("t/x", b"stuck", 1))
    node.storage.commit()
    stuck = d.sent[0][3]
    counts = []
    for turn in range(TRIM_EVERY + 2):
        node.broker.publish(Message("t/x", f"t{turn}".encode(), 1))
        for pid in [p for p in s.inflight if p != stuck]:
            assert s.on_puback(pid)  # (done before its first commit: never written)
        node.broker.publish(Message("t/x", f"u{turn}".encode(), 1))
        node.storage.commit()  # writes u{turn}
        counts.append(entries(node, QUEUE))
    assert max(counts) > 3  # all-done records were left between trims
    assert min(counts[TRIM_EVERY - 2 :]) <= 2  # and a trim took them: the stuck one and the newest
    node = node.restart()
    s = node.broker.sessions["sub"]
    assert sorted(e.message.payload for e in s.inflight.values()) == sorted(
        [b"stuck", f"u{TRIM_EVERY + 1}".encode()]
    )
    s, d = connect_sub(node, 10)
    _ack_all(s, d)
    node.storage.commit()
    assert entries(node, QUEUE) == 0  # nothing live: gone with the same commit
