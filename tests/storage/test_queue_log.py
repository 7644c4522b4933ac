"""storage/queue_log.py and the schema upgrades: queue records, group progress, delivery counts and
persistent sessions' memberships in LMDB, written through the batch, read back at start; schema 1
and schema 2 stores open and are upgraded."""

from __future__ import annotations

import struct
from pathlib import Path

import lmdb

from fluxmq.broker.message import Message
from fluxmq.storage import records as r
from fluxmq.storage.lmdb import SCHEMA_VERSION, LMDBStorage
from fluxmq.storage.queue_log import StoredMember, decode_record, encode_plain_record, encode_record

MiB = 1 << 20

V1_DBS = (
    b"meta",
    b"sessions",
    b"subscriptions",
    b"inflight",
    b"inbound_qos2",
    b"queue",
    b"retained",
    b"wills",
)


def test_records_and_group_progress_survive_a_reopen(tmp_path: Path) -> None:
    s = LMDBStorage(tmp_path / "d", map_size=64 * MiB)
    qlog = s.queue_log()
    for off in range(5):
        qlog.append("orders", off, encode_record(1000.0 + off, Message("$queue/orders/k", b"p%d" % off, 1)))
    qlog.put_group("orders", "g", 2)  # 0 and 1 settled
    qlog.settle("orders", "g", 4)  # settled out of order
    assert [off for off, _ in qlog.read("orders", 0, 10)] == [0, 1, 2, 3, 4]  # pending writes are read
    s.commit()
    qlog.truncate("orders", [0])
    s.commit()
    s.close()

    s = LMDBStorage(tmp_path / "d", map_size=64 * MiB)
    found = s.queue_log().load_queues()["orders"]
    assert (found.first, found.next, found.count) == (1, 5, 4)
    assert found.groups["g"].floor == 2 and found.groups["g"].settled == {4}
    ts, fields = decode_record(s.queue_log().read("orders", 3, 1)[0][1])
    assert ts == 1003.0 and fields[0] == "$queue/orders/k" and fields[1] == b"p3"
    s.close()


def test_offsets_whose_bytes_hold_nul_are_read_back(tmp_path: Path) -> None:
    s = LMDBStorage(tmp_path / "d", map_size=64 * MiB)
    s.queue_log().put_group("q", "g", 0)
    s.queue_log().settle("q", "g", 256)  # big-endian 0x...0100: a NUL inside the offset's bytes
    s.commit()
    assert s.queue_log().load_queues()["q"].groups["g"].settled == {256}
    s.close()


def test_a_schema_1_store_is_upgraded_at_open(tmp_path: Path) -> None:
    path = tmp_path / "old"
    path.mkdir()
    env = lmdb.open(str(path), map_size=64 * MiB, max_dbs=16, subdir=True)
    with env.begin(write=True) as txn:
        dbs = {name: env.open_db(name, txn=txn) for name in V1_DBS}
        txn.put(b"magic", b"fluxmq-storage", db=dbs[b"meta"])
        txn.put(b"schema_version", struct.pack("<I", 1), db=dbs[b"meta"])
        txn.put(b"keep", r.encode_session(60, 0.0, None), db=dbs[b"sessions"])
    env.close()

    s = LMDBStorage(path, map_size=64 * MiB)
    with s.env.begin() as txn:
        meta = s.env.open_db(b"meta", txn=txn, create=False)
        assert struct.unpack("<I", txn.get(b"schema_version", db=meta))[0] == SCHEMA_VERSION == 4
    assert "keep" in s.load().sessions  # what the old store held is still there
    s.queue_log().append("q", 0, encode_record(1.0, Message("$queue/q", b"x", 1)))
    s.commit()
    assert s.queue_log().load_queues()["q"].count == 1
    s.close()


def test_an_ack_recorded_and_passed_by_the_floor_in_one_batch_writes_nothing(tmp_path: Path) -> None:
    # Out-of-order acks (many members): an offset settled above the floor and passed by the floor
    # before the commit leaves no write at all (not a put then a delete), and nothing is lost.
    s = LMDBStorage(tmp_path / "d", map_size=64 * MiB)
    qlog = s.queue_log()
    for off in range(3):
        qlog.append("orders", off, encode_record(1000.0 + off, Message("$queue/orders/k", b"p", 1)))
    qlog.put_group("orders", "g", 0)
    s.commit()
    qlog.settle("orders", "g", 1)  # 1 acked before 0
    qlog.settle("orders", "g", 2)
    s.commit()
    qlog.settle("orders", "g", 2, False)  # committed before: its delete is written
    qlog.put_group("orders", "g", 3)
    qlog.settle("orders", "g", 5)  # recorded in this batch ...
    qlog.settle("orders", "g", 5, False)  # ... and passed in the same batch: no write left
    ack_writes = [k for k in s._batch.ops[s.queue_log().db] if k.startswith(b"A")]
    assert ack_writes == [b"Aorders\x00g\x00" + struct.pack(">Q", 2)]
    s.commit()
    qlog.settle("orders", "g", 1, False)
    s.commit()
    s.close()

    s = LMDBStorage(tmp_path / "d", map_size=64 * MiB)
    found = s.queue_log().load_queues()["orders"]
    assert found.groups["g"].floor == 3 and found.groups["g"].settled == set()
    s.close()


def test_delivery_counts_and_memberships_survive_a_reopen(tmp_path: Path) -> None:
    s = LMDBStorage(tmp_path / "d", map_size=64 * MiB)
    qlog = s.queue_log()
    for off in range(4):
        qlog.append("orders", off, encode_record(1.0, Message("$queue/orders/k", b"p", 1)))
    qlog.put_group("orders", "g", 1)
    qlog.put_mark("orders", "g", 4)  # 1..3 delivered
    qlog.put_count("orders", "g", 2, 3)  # offset 2 delivered three times
    qlog.put_count("orders", "g", 3, 0)  # offset 3 passed over, never delivered
    qlog.put_count("orders", "g", 0, 5)  # below the floor: settled, not loaded
    qlog.put_member("c1", "$queue/orders/eu/#", "g", True)
    qlog.put_member("c1", "$queue/other", "c1", False)
    qlog.put_member("c2", "$queue/orders", "g", False)
    s.commit()
    qlog.delete_member("c1", "$queue/other")
    qlog.delete_members("c2")
    s.commit()
    s.close()

    s = LMDBStorage(tmp_path / "d", map_size=64 * MiB)
    found = s.queue_log().load_queues()
    assert set(found) == {"orders"}  # membership keys are not queues
    g = found["orders"].groups["g"]
    assert (g.floor, g.mark, g.counts) == (1, 4, {2: 3, 3: 0})
    assert s.queue_log().load_members() == [StoredMember("c1", "$queue/orders/eu/#", "g", True)]
    s.queue_log().delete_group("orders", "g")
    s.commit()
    assert "g" not in s.queue_log().load_queues().get("orders").groups
    s.close()


def test_a_schema_2_store_is_upgraded_and_its_queues_load(tmp_path: Path) -> None:
    """A store as schema 2 wrote it (queue records, a group's floor and an out-of-order ack): it
    opens, becomes schema 3, and its queues load with no delivery count and no membership known."""
    path = tmp_path / "v2"
    path.mkdir()
    env = lmdb.open(str(path), map_size=64 * MiB, max_dbs=16, subdir=True)
    with env.begin(write=True) as txn:
        dbs = {name: env.open_db(name, txn=txn) for name in (*V1_DBS, b"queues")}
        txn.put(b"magic", b"fluxmq-storage", db=dbs[b"meta"])
        txn.put(b"schema_version", struct.pack("<I", 2), db=dbs[b"meta"])
        for off in range(3):
            txn.put(
                b"Ljobs\x00" + struct.pack(">Q", off),
                encode_record(5.0, Message("$queue/jobs", b"j%d" % off, 1)),
                db=dbs[b"queues"],
            )
        txn.put(b"Gjobs\x00w", struct.pack("<Q", 1), db=dbs[b"queues"])
        txn.put(b"Ajobs\x00w\x00" + struct.pack(">Q", 2), b"", db=dbs[b"queues"])
    env.close()

    s = LMDBStorage(path, map_size=64 * MiB)
    with s.env.begin() as txn:
        meta = s.env.open_db(b"meta", txn=txn, create=False)
        assert struct.unpack("<I", txn.get(b"schema_version", db=meta))[0] == SCHEMA_VERSION == 4
    q = s.queue_log().load_queues()["jobs"]
    assert (q.first, q.next, q.count) == (0, 3, 3)
    g = q.groups["w"]
    assert (g.floor, g.settled, g.mark, g.counts) == (1, {2}, 0, {})
    assert s.queue_log().load_members() == []
    s.close()


def test_a_plain_records_one_pack_encoding_is_the_general_one() -> None:
    """encode_record's shortcut (no properties, no expiry) writes the bytes the general encoder
    writes, with and without an origin, so records read back the same."""
    for message in (
        Message("$queue/q/k", b"x" * 70, 1, origin="client-1"),
        Message("$queue/q", b"", 1),
        Message("t", b"p", 0, True),
    ):
        general = Message(message.topic, message.payload, message.qos, message.retain, origin=message.origin)
        blob = encode_record(7.5, message)
        assert blob == struct.pack("<Bd", 1, 7.5) + r.encode_message(general)
        assert decode_record(blob) == (
            7.5,
            (message.topic, message.payload, message.qos, message.retain, None, None, message.origin),
        )


def test_the_relayed_appends_encoding_is_the_general_one() -> None:
    """encode_plain_record (the relayed append: QoS 1, no properties, from encoded topic and
    origin) writes the bytes encode_record writes for the same message."""
    for topic, payload, origin in (
        ("$queue/q/k", b"x" * 70, "client-1"),
        ("$queue/q", b"", None),
        ("$queue/é", b"p", ""),
    ):
        message = Message(topic, payload, 1, origin=origin)
        blob = encode_plain_record(7.5, topic.encode(), origin.encode() if origin else b"", payload)
        assert blob == encode_record(7.5, message)
        assert decode_record(blob) == (7.5, (topic, payload, 1, False, None, None, origin or None))


def test_append_plain_stores_the_plain_encoding(tmp_path: Path) -> None:
    """LMDBQueueLog.append_plain (encoding and put in one call) stores what encode_plain_record
    makes, before and after the batch is woken, and returns its size; so does the generic one."""
    from fluxmq.storage.queue_log import MemoryQueueLog

    storage = LMDBStorage(tmp_path / "s", map_size=16 << 20)
    try:
        store = storage.queue_log()
        want = [encode_plain_record(1.5, b"$queue/q/a", b"c1", p) for p in (b"x", b"", b"y" * 300)]
        want.append(encode_plain_record(2.5, b"$queue/q", b"", b""))
        assert store.append_plain("q", 0, 1.5, b"$queue/q/a", b"c1", [b"x", b"", b"y" * 300]) == [
            len(w) for w in want[:3]
        ]
        assert store.append_plain("q", 3, 2.5, b"$queue/q", b"", [b""]) == [len(want[3])]
        assert storage.op_count and storage.has_pending
        storage.commit()
        assert store.read("q", 0, 4) == list(enumerate(want))
        memory = MemoryQueueLog()
        assert memory.append_plain("q", 0, 1.5, b"$queue/q/a", b"c1", [b"x", b""]) == [
            len(w) for w in want[:2]
        ]
        assert memory.read("q", 0, 2) == [(0, want[0]), (1, want[1])]
    finally:
        storage.close()


def test_a_view_reads_the_records_as_they_were_when_it_was_taken(tmp_path: Path) -> None:
    """QueueLogStore.view (a Raft snapshot written in slices): committed, being-written and pending
    records as they were; later appends, truncations and commits do not show."""
    s = LMDBStorage(tmp_path / "d", map_size=64 * MiB)
    qlog = s.queue_log()
    for off in range(4):
        qlog.append("orders", off, b"r%d" % off)
    s.commit()  # 0-3 in LMDB
    qlog.append("orders", 4, b"r4")
    batch = s.take_batch()  # 4 in the batch being written
    qlog.append("orders", 5, b"r5")  # 5 pending
    qlog.truncate("orders", [0])  # a pending delete
    view = qlog.view(["orders"])
    try:
        s.write_taken(batch)
        qlog.truncate("orders", range(1, 6))
        qlog.append("orders", 6, b"r6")
        s.commit()
        assert qlog.read("orders", 0, 10) == [(6, b"r6")]
        assert view.read("orders", 0, 10) == [(off, b"r%d" % off) for off in range(1, 6)]
    finally:
        view.close()
        s.close()
