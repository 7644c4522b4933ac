"""storage/queue_log.py and the schema 2 upgrade: queue records and group progress in LMDB,
written through the batch, read back at start; a schema 1 store opens and is upgraded."""

from __future__ import annotations

import struct
from pathlib import Path

import lmdb

from fluxmq.broker.message import Message
from fluxmq.storage import records as r
from fluxmq.storage.lmdb import SCHEMA_VERSION, LMDBStorage
from fluxmq.storage.queue_log import decode_record, encode_record

MiB = 1 << 20

V1_DBS = (b"meta", b"sessions", b"subscriptions", b"inflight", b"inbound_qos2", b"queue", b"retained", b"wills")


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
        assert struct.unpack("<I", txn.get(b"schema_version", db=meta))[0] == SCHEMA_VERSION
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
