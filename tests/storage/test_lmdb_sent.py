"""Outbound QoS 1/2 of persistent sessions in storage schema 3: written once as a queue entry,
named in flight by a ``sent`` record, deleted once; nothing at all when acknowledged within the
batch that stored it; restored exactly; a schema 2 store (written by the old code) upgraded.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

from fluxmq.broker.message import Message
from fluxmq.broker.session import EXPIRY_NEVER, PersistentSession
from fluxmq.storage import records as r
from fluxmq.storage.lmdb import DONE, INFLIGHT, QUEUE, SCHEMA_VERSION, SENT
from tests.broker.test_session import RecordingDelivery
from tests.storage.lmdb_node import Node, connect_sub, entries, online

SCHEMA2_STORE = Path(__file__).parent / "fixtures" / "schema2-store"


def _online(node: Node, window: int):
    return online(node, window, 2)


def r_msg(payload: bytes, qos: int = 1) -> Message:
    return Message("t/x", payload, qos)


def _inflight(s) -> dict:
    """A session's messages in flight by packet id, with all that a restart must restore of each."""
    return {
        pid: (
            e.message.topic,
            e.message.payload,
            e.message.origin,
            e.message.properties,
            e.qos,
            e.retain,
            e.subscription_ids,
        )
        for pid, e in s.inflight.items()
    }


def _live(node: Node) -> int:
    """Entries in the ``queue`` records that the ``done`` records do not mark done (schema 4)."""
    with node.storage.env.begin() as txn:
        done = {bytes(k): r.decode_done(v) for k, v in txn.cursor(node.storage._dbs[DONE])}
        n = 0
        for key, value in txn.cursor(node.storage._dbs[QUEUE]):
            prefix = bytes(key).partition(b"\x00")[0] + b"\x00"
            floor, ranges = done.get(prefix, (0, []))
            start = r.key_seq(bytes(key)[len(prefix) :])
            for seq in range(start, start + r.record_span(value)):
                n += seq >= floor and not any(a <= seq < b for a, b in ranges)
        return n


def test_a_puback_in_the_batch_that_stored_the_message_writes_nothing(node: Node) -> None:
    s, d = _online(node, 1)
    node.broker.publish(r_msg(b"direct"))  # sent at once (window 1)
    node.broker.publish(r_msg(b"queued"))  # queued behind it
    first = d.sent[-1][3]
    assert s.on_puback(first)  # the queued one goes out now
    assert s.on_puback(d.sent[-1][3])
    batch = node.storage.take_batch()
    assert batch is not None
    # Both messages were stored and acknowledged within one batch: no put, no delete, no record.
    assert batch.ops[QUEUE] == {} and batch.ops[SENT] == {} and batch.ops[INFLIGHT] == {}
    node.storage.write_taken(batch)
    assert entries(node, QUEUE) == 0 and entries(node, SENT) == 0
    node = node.restart()
    assert not node.broker.sessions["sub"].inflight and not node.broker.sessions["sub"].queue
    node.storage.abort()


def test_a_queued_message_sent_later_is_not_written_again(node: Node) -> None:
    s, d = _online(node, 1)
    node.broker.publish(r_msg(b"one"))
    node.broker.publish(r_msg(b"two"))
    node.storage.commit()
    assert _live(node) == 2  # each message once, in flight or queued
    pid_one = d.sent[-1][3]
    assert s.on_puback(pid_one)
    pid_two = d.sent[-1][3]
    batch = node.storage.take_batch()
    # The PUBACK marks "one" done in the session's done record (schema 4: no delete; the record of
    # both goes when both are done); sending "two" from the queue only names its packet id in a sent
    # record: no inflight copy of it, and its queue entry stays where it is.
    assert batch.ops[QUEUE] == {} and len(batch.ops[DONE]) == 1
    assert batch.ops[INFLIGHT] == {}
    assert len(batch.ops[SENT]) == 1 and all(v is not None for v in batch.ops[SENT].values())
    node.storage.write_taken(batch)
    assert _live(node) == 1
    node = node.restart()
    s = node.broker.sessions["sub"]
    assert list(s.inflight) == [pid_two] and s.inflight[pid_two].message.payload == b"two"
    assert not s.queue
    s, d = connect_sub(node, 1)
    assert d.sent == [("t/x", 1, False, pid_two, True, None)]
    node.storage.abort()


def test_in_flight_and_queued_messages_restore_exactly_with_their_packet_ids(node: Node) -> None:
    s, d = _online(node, 5)
    for i in range(20):
        node.broker.publish(r_msg(f"m{i}".encode(), qos=1 + i % 2))
    node.storage.commit()
    sent = {t[3]: i for i, t in enumerate(d.sent)}  # pid -> message index (the first 5)
    # Acknowledge m0 and m2 (QoS 1) and PUBREC m1 (QoS 2, released): m5, m6 go out from the queue.
    assert s.on_puback(d.sent[0][3]) and s.on_puback(d.sent[2][3])
    assert s.on_pubrec(d.sent[1][3])
    for t in d.sent[5:]:
        sent[t[3]] = len(sent)
    node.storage.commit()
    node.broker.publish(r_msg(b"never committed"))  # its PUBACK never left
    expect_inflight = {pid: s.inflight[pid].message.payload for pid in s.inflight}
    released = {pid for pid, e in s.inflight.items() if e.released}
    assert len(expect_inflight) == 5 and len(released) == 1
    node = node.restart()
    s = node.broker.sessions["sub"]
    assert isinstance(s, PersistentSession)
    assert {pid: e.message.payload for pid, e in s.inflight.items()} == expect_inflight
    assert {pid for pid, e in s.inflight.items() if e.released} == released
    assert len(s.queue) == 13  # m7..m19
    s, d = connect_sub(node, 5)
    assert d.pubrels == sorted(released)
    resent = [(t[3], t[4]) for t in d.sent]
    assert all(dup for _, dup in resent) and sorted(p for p, _ in resent) == sorted(
        set(expect_inflight) - released
    )
    done = 0
    while s.inflight and done < 100:  # acknowledge everything, the queue following the window
        done += 1
        pid, e = next(iter(s.inflight.items()))
        if e.released:
            assert s.on_pubcomp(pid)
        elif e.qos == 1:
            assert s.on_puback(pid)
        else:
            assert s.on_pubrec(pid) and s.on_pubcomp(pid)
    node.storage.commit()
    payloads = d.sent[len(resent) :]
    assert [t[0] for t in payloads] == ["t/x"] * 13 and not any(t[4] for t in payloads)
    assert not s.inflight and not s.queue
    node = node.restart()
    s = node.broker.sessions["sub"]
    assert not s.inflight and not s.queue
    assert entries(node, QUEUE) == 0 and entries(node, SENT) == 0
    node.storage.abort()


def test_a_schema_2_store_written_by_the_old_code_is_upgraded(tmp_path: Path) -> None:
    # fixtures/schema2-store was written by the schema 2 code (fixtures/make_schema2_store.py): two messages
    # in flight as schema 2 inflight records (pid 1 QoS 1, pid 2 QoS 2 released), four queued.
    path = tmp_path / "data"
    shutil.copytree(SCHEMA2_STORE, path)
    node = Node(path)
    with node.storage.env.begin() as txn:
        meta = node.storage.env.open_db(b"meta", txn=txn, create=False)
        assert struct.unpack("<I", txn.get(b"schema_version", db=meta))[0] == SCHEMA_VERSION == 4
    s = node.broker.sessions["sub"]
    assert {pid: (e.message.payload, e.qos, e.released) for pid, e in s.inflight.items()} == {
        1: (b"m0", 1, False),
        2: (b"m1", 2, True),
    }
    assert len(s.queue) == 4
    s, d = connect_sub(node, 2)
    assert d.sent == [("t/a", 1, False, 1, True, None)] and d.pubrels == [2]
    assert s.on_puback(1) and s.on_pubcomp(2)  # the schema 2 records are deleted; m2, m3 go out
    node.storage.commit()
    assert entries(node, INFLIGHT) == 0
    in_flight = {t[3]: t for t in d.sent[1:]}
    assert len(in_flight) == 2 and not any(t[4] for t in in_flight.values())
    node = node.restart()  # m2, m3 in flight by the schema 3 path, m4, m5 queued
    s = node.broker.sessions["sub"]
    assert sorted(e.message.payload for e in s.inflight.values()) == [b"m2", b"m3"]
    assert set(s.inflight) == set(in_flight)
    assert len(s.queue) == 2
    s, d = connect_sub(node, 2)
    assert sorted(t[3] for t in d.sent) == sorted(in_flight) and all(t[4] for t in d.sent)
    for pid in list(in_flight):
        assert s.on_puback(pid)
    for t in d.sent[2:]:
        assert s.on_puback(t[3])
    node.storage.commit()
    assert len(d.sent) == 4 and not any(t[4] for t in d.sent[2:])  # m4, m5; "lost" was never committed
    node = node.restart()
    s = node.broker.sessions["sub"]
    assert not s.inflight and not s.queue
    assert entries(node, QUEUE) == 0 and entries(node, SENT) == 0 and entries(node, INFLIGHT) == 0
    node.storage.abort()


def test_sent_records_round_trip() -> None:
    slots = r.sent_slots()
    slots[3] = (41 + 1) << 1 | 1
    assert r.decode_sent(r.encode_sent(slots)) == slots


def test_an_online_queue_longer_than_its_memory_part_drains_in_order_once(node: Node, monkeypatch) -> None:
    # An online session keeps its newest entries in memory (at most MEM_ENTRIES); the older ones
    # are read back from the store: the client gets every message once, in order, across both.
    from fluxmq.storage import queue as q

    monkeypatch.setattr(q, "MEM_ENTRIES", 5)
    used_before = q._MemUse.used
    s, d = _online(node, 3)
    for i in range(30):
        node.broker.publish(r_msg(f"m{i:02d}".encode(), qos=1))
        if i % 7 == 0:
            node.storage.commit()
    node.storage.commit()
    assert len(s.queue) == 27
    got = []
    while s.inflight and len(got) < 40:
        pid = next(iter(s.inflight))
        got.append(s.inflight[pid].message.payload)
        assert s.on_puback(pid)
        if len(got) % 4 == 0:
            node.storage.commit()
    node.storage.commit()
    assert got == [f"m{i:02d}".encode() for i in range(30)]
    assert entries(node, QUEUE) == 0 and entries(node, SENT) == 0
    assert q._MemUse.used == used_before  # the process-wide count of cached bytes is given back


def test_every_delivery_shape_sent_at_once_is_stored_once_and_restored_exactly(node: Node) -> None:
    """The send-at-once path (``put_sent_entry``, entries of plain messages encoded by
    ``_core.entry``): plain messages with and without an origin, a retained delivery, properties
    with an expiry and subscription identifiers each leave one queue entry, and come back after
    a restart with every field."""
    import time

    a, da = connect_sub(node, 10)
    node.broker.subscribe(a, "t/#", 2)
    b, db = node.broker.open_session("sub-ids", False, EXPIRY_NEVER, None)[0], RecordingDelivery()
    node.broker.attach(b, db, 10)
    node.broker.subscribe(b, "t/#", 1, subscription_id=7, retain_as_published=True)
    node.storage.commit()
    shapes = [
        Message("t/plain", b"p0", 1),
        Message("t/origin", b"p1", 2, origin="pub-ü"),
        Message("t/retained", b"p2", 1, retain=True, origin="pub"),
        Message(
            "t/props",
            b"p3",
            1,
            properties={0x03: "text/plain", 0x26: [("k", "v")]},
            expires_at=time.monotonic() + 3600,
        ),
    ]
    for m in shapes:
        node.broker.publish(m)
    node.storage.commit()
    assert len(da.sent) == len(db.sent) == 4 and len(a.inflight) == len(b.inflight) == 4
    assert _live(node) == 8  # one entry per delivery, nothing else
    assert entries(node, QUEUE) == 2  # schema 4: one record per session per commit
    # The entry of a plain message without subscription ids is encoded once, for every such session.
    assert isinstance(shapes[0].wire_cache[("storage.entry", 1, False)], bytes)
    expect = {cid: _inflight(s) for cid, s in (("sub", a), ("sub-ids", b))}
    assert expect["sub-ids"][db.sent[0][3]][6] == (7,)
    node = node.restart()
    for cid in ("sub", "sub-ids"):
        s = node.broker.sessions[cid]
        got = _inflight(s)
        assert got == expect[cid]
        (props_entry,) = [e for e in s.inflight.values() if e.message.topic == "t/props"]
        assert 3500 < props_entry.message.remaining_expiry() <= 3600
    node.storage.abort()


def test_a_qos0_message_queued_behind_the_window_goes_out_while_the_window_is_full(node: Node) -> None:
    # pump with a full window sends only a QoS 0 head (the peek branch); with room it pops the head
    s, d = _online(node, 1)
    node.broker.publish(r_msg(b"a"))  # sent at once, the window is full
    node.broker.publish(r_msg(b"b"))  # queued
    node.broker.publish(r_msg(b"c", qos=0))  # queued behind b (the queue is not empty)
    node.broker.publish(r_msg(b"d"))
    node.storage.commit()
    assert [t[1] for t in d.sent] == [1] and len(s.queue) == 3
    assert s.on_puback(d.sent[0][3])  # b goes out (window full again), then c (QoS 0), not d
    assert [t[1] for t in d.sent] == [1, 1, 0] and len(s.queue) == 1
    node.storage.commit()
    assert s.on_puback(d.sent[1][3])
    assert [t[1] for t in d.sent] == [1, 1, 0, 1] and not s.queue
    assert s.on_puback(d.sent[3][3])
    node.storage.commit()
    assert entries(node, QUEUE) == 0 and entries(node, SENT) == 0
