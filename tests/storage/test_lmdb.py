"""LMDBStorage on real LMDB files in tmp dirs: each operation, load/restore, bad directories, full maps."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import lmdb
import pytest

from fluxmq.broker.message import Message
from fluxmq.errors import StorageError
from fluxmq.storage.lmdb import SCHEMA_VERSION, LMDBStorage, StorageFull

MiB = 1 << 20


def reopen(st: LMDBStorage, **kw) -> LMDBStorage:
    st.close()
    return LMDBStorage(st.path, **kw)


@pytest.fixture
def st(tmp_path: Path):
    s = LMDBStorage(tmp_path / "data", map_size=64 * MiB)
    yield s
    try:
        s.abort()
    except lmdb.Error:
        pass


def msg(topic: str = "t", payload: bytes = b"p", qos: int = 1, **kw) -> Message:
    return Message(topic, payload, qos, **kw)


def test_new_directory_is_initialised_with_magic_and_schema(tmp_path: Path) -> None:
    s = LMDBStorage(tmp_path / "new")
    with s.env.begin() as txn:
        meta = s.env.open_db(b"meta", txn=txn, create=False)
        assert txn.get(b"magic", db=meta) == b"fluxmq-storage"
        assert struct.unpack("<I", txn.get(b"schema_version", db=meta))[0] == SCHEMA_VERSION
    state = s.load()
    assert state.sessions == {} and state.retained == []
    s.close()


def test_session_with_subscriptions_inflight_inbound_queue_and_will_survives(st: LMDBStorage) -> None:
    st.put_session("c1", 3600, 0.0, "alice")
    st.put_subscription("c1", "a/+", 1, False, True, 1, 5)
    st.put_subscription("c1", "$share/g/b/#", 2, False, False, 0, 0)
    st.put_inflight("c1", 7, msg("x", b"1", 1), 1, False, None)
    st.put_inflight("c1", 8, msg("y", b"2", 2), 2, True, (5,))
    st.release_inflight("c1", 8)  # read back from the pending batch, then updated
    st.put_inbound_qos2("c1", 300)
    st.put_will("c1", msg("will/c1", b"bye", 1, retain=True), 30)
    for i in range(5):
        st.queue_append("c1", i, _entry(f"q/{i}", qos=0 if i == 3 else 1))
    st.put_retained("r/1", msg("r/1", b"kept", 1, retain=True, properties={0x03: "text/plain"}))
    st.commit()
    st = reopen(st, map_size=64 * MiB)
    state = st.load()
    s = state.sessions["c1"]
    assert (s.expiry_interval, s.disconnected_at, s.username) == (3600, 0.0, "alice")
    assert sorted(s.subscriptions) == [("$share/g/b/#", 2, False, False, 0, 0), ("a/+", 1, False, True, 1, 5)]
    assert set(s.inflight) == {7, 8}
    fields, qos, retain, ids, released = s.inflight[8]
    assert (fields[0], qos, retain, ids, released) == ("y", 2, True, (5,), True)
    assert s.inflight[7][4] is False
    assert s.inbound_qos2 == {300}
    assert s.will[1] == 30 and s.will[0][0] == "will/c1"
    assert (s.queue.first, s.queue.next, s.queue.count, s.queue.qos0) == (0, 5, 5, [3])
    assert s.queue.bytes > 0
    assert [m[0] for m in state.retained] == ["r/1"]
    assert state.retained[0][4] == {0x03: "text/plain"}
    st.close()


def _entry(topic: str, qos: int = 1) -> bytes:
    from fluxmq.storage import records as r
    return r.encode_entry(msg(topic, b"payload", qos), qos, False, None)


def test_deletes_remove_each_record(st: LMDBStorage) -> None:
    st.put_session("c", 10, 0.0, None)
    st.put_subscription("c", "f", 0, False, False, 0, 0)
    st.put_inflight("c", 1, msg(), 1, False, None)
    st.put_inbound_qos2("c", 2)
    st.queue_append("c", 0, _entry("a"))
    st.queue_append("c", 1, _entry("b"))
    st.put_retained("r", msg("r"))
    st.put_will("c", msg("w"), 5)
    st.commit()
    st.delete_subscription("c", "f")
    st.delete_inflight("c", 1)
    st.delete_inbound_qos2("c", 2)
    st.queue_pop("c", 0)
    st.delete_retained("r")
    st.delete_will("c")
    st.commit()
    state = st.load()
    s = state.sessions["c"]
    assert (s.subscriptions, s.inflight, s.inbound_qos2, s.will) == ([], {}, set(), None)
    assert (s.queue.first, s.queue.count) == (1, 1)
    assert state.retained == []


def test_delete_session_removes_everything_it_owns_and_nothing_else(st: LMDBStorage) -> None:
    for cid in ("c", "c2"):  # "c" is a prefix of "c2": the NUL separator keeps them apart
        st.put_session(cid, 10, 0.0, None)
        st.put_subscription(cid, "f", 0, False, False, 0, 0)
        st.put_inflight(cid, 1, msg(), 1, False, None)
        st.queue_append(cid, 0, _entry("a"))
        st.put_will(cid, msg("w"), 5)
    st.commit()
    st.delete_session("c", queue_next=1)
    st.queue_append("c", 1, _entry("b"))  # recorded after the delete: kept (a new session's)
    st.commit()
    state = st.load()
    assert set(state.sessions) == {"c2"}
    c2 = state.sessions["c2"]
    assert (len(c2.subscriptions), len(c2.inflight), c2.queue.count, c2.will is not None) == (1, 1, 1, True)
    assert st.queue_read("c", [0, 1])[0] is None and st.queue_read("c", [0, 1])[1] is not None


def test_clear_session_state_keeps_record_and_subscriptions(st: LMDBStorage) -> None:
    st.put_session("c", 10, 0.0, None)
    st.put_subscription("c", "f", 0, False, False, 0, 0)
    st.put_inflight("c", 1, msg(), 1, False, None)
    st.put_inbound_qos2("c", 9)
    st.queue_append("c", 0, _entry("a"))
    st.clear_session_state("c", queue_next=1)  # drops the buffered writes it supersedes too
    st.commit()
    s = st.load().sessions["c"]
    assert (len(s.subscriptions), s.inflight, s.inbound_qos2, s.queue.count) == (1, {}, set(), 0)


def test_last_write_of_a_batch_wins(st: LMDBStorage) -> None:
    """An inflight entry acknowledged within the turn it was sent never reaches the disk."""
    st.put_inflight("c", 1, msg(), 1, False, None)
    st.delete_inflight("c", 1)
    assert st.has_pending
    st.commit()
    assert not st.has_pending
    with st.env.begin() as txn:
        assert txn.stat(st._dbs[3])["entries"] == 0


def test_on_pending_fires_once_per_batch(st: LMDBStorage) -> None:
    calls = []
    st.on_pending = lambda: calls.append(1)
    st.put_retained("a", msg("a"))
    st.put_retained("b", msg("b"))
    assert calls == [1]
    st.commit()
    st.delete_retained("a")
    assert calls == [1, 1]


def test_queue_read_sees_pending_and_committed_entries(st: LMDBStorage) -> None:
    st.queue_append("c", 0, b"committed")
    st.commit()
    st.queue_append("c", 1, b"pending")
    st.queue_pop("c", 0)
    assert st.queue_read("c", [0, 1, 2]) == [None, b"pending", None]


def test_last_alive_is_recorded(st: LMDBStorage) -> None:
    st.touch_alive()
    st.commit()
    assert st.load().last_alive > 0


# -- bad directories: one clear line, never a wipe ---------------------------------------------------

def test_foreign_lmdb_environment_is_refused(tmp_path: Path) -> None:
    env = lmdb.open(str(tmp_path), max_dbs=2)
    with env.begin(write=True) as txn:
        txn.put(b"someone", b"else's data")
    env.close()
    with pytest.raises(StorageError, match="not a fluxmq store"):
        LMDBStorage(tmp_path)
    env = lmdb.open(str(tmp_path))
    with env.begin() as txn:
        assert txn.get(b"someone") == b"else's data"  # untouched
    env.close()


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    s = LMDBStorage(tmp_path)
    with s.env.begin(write=True) as txn:
        txn.put(b"schema_version", struct.pack("<I", SCHEMA_VERSION + 1), db=s._dbs[0])
    s.abort()
    with pytest.raises(StorageError, match=f"newer fluxmq \\(schema version {SCHEMA_VERSION + 1}"):
        LMDBStorage(tmp_path)


def test_wrong_magic_is_refused(tmp_path: Path) -> None:
    s = LMDBStorage(tmp_path)
    with s.env.begin(write=True) as txn:
        txn.put(b"magic", b"other-product", db=s._dbs[0])
    s.abort()
    with pytest.raises(StorageError, match="not a fluxmq store"):
        LMDBStorage(tmp_path)


@pytest.mark.parametrize("content", [b"", b"\x00" * 8192, b"this is not an lmdb file at all" * 500])
def test_damaged_data_file_is_refused_and_kept(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "data.mdb").write_bytes(content)
    with pytest.raises(StorageError, match="data.mdb") as err:
        LMDBStorage(tmp_path)
    assert "\n" not in str(err.value)
    assert (tmp_path / "data.mdb").read_bytes() == content


def test_a_second_process_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    first = LMDBStorage(tmp_path)
    with pytest.raises(StorageError, match="in use by another fluxmq process"):
        LMDBStorage(tmp_path)
    first.close()
    LMDBStorage(tmp_path).close()  # free again once the holder closed (or died)


def test_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(StorageError, match="is a file"):
        LMDBStorage(path)


def test_stored_data_larger_than_map_size_is_refused_at_start(tmp_path: Path) -> None:
    s = LMDBStorage(tmp_path, map_size=16 * MiB)
    for i in range(40):
        s.put_retained(f"big/{i}", msg(f"big/{i}", b"x" * 100_000))
    s.commit()
    s.close()
    with pytest.raises(StorageError, match="does not fit storage.map_size"):
        LMDBStorage(tmp_path, map_size=1 * MiB)
    assert len(LMDBStorage(tmp_path, map_size=16 * MiB).load().retained) == 40


def test_map_size_reached_at_run_time_refuses_then_recovers(tmp_path: Path, caplog) -> None:
    s = LMDBStorage(tmp_path, map_size=2 * MiB)
    caplog.set_level(logging.ERROR, logger="fluxmq.storage")
    i = 0
    while not s.refusing:
        s.queue_append("c", i, b"x" * 50_000)
        s.commit()
        i += 1
        assert i < 200, "never refused"
    assert [r for r in caplog.records if r.getMessage() == "storage_full"]
    assert s.ping()[0] is False
    for j in range(i):
        s.queue_pop("c", j)
    s.commit()
    assert not s.refusing
    s.close()


def test_commit_beyond_the_headroom_fails_cleanly(tmp_path: Path) -> None:
    s = LMDBStorage(tmp_path, map_size=1 * MiB)
    for i in range(400):  # ~40 MiB in one batch: more than map_size + headroom
        s.queue_append("c", i, b"y" * 100_000)
    with pytest.raises(StorageFull):
        s.commit()
    assert s.refusing
    assert s.load().sessions == {}  # nothing half-written
    s.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_damaged_pages_are_refused_at_load(tmp_path: Path, seed: int) -> None:
    """Random bytes over a few pages of a valid store: load refuses with one line (LMDB checks page
    headers; values that no longer decode are skipped and counted)."""
    import random

    s = LMDBStorage(tmp_path, map_size=64 * MiB)
    s.put_session("c", 3600, 0.0, None)
    for i in range(5000):
        s.queue_append("c", i, b"x" * 300)
    s.commit()
    s.close()
    size = (tmp_path / "data.mdb").stat().st_size
    rnd = random.Random(seed)
    with open(tmp_path / "data.mdb", "r+b") as f:
        for _ in range(5):
            f.seek(rnd.randrange(2, size // 4096) * 4096 + rnd.randrange(0, 64))
            f.write(rnd.randbytes(16))
    with pytest.raises(StorageError, match="damaged"):
        LMDBStorage(tmp_path, map_size=64 * MiB).load()


def _queue_keys(st: LMDBStorage) -> int:
    with st.env.begin() as txn:
        return txn.stat(st._dbs[5])["entries"]


def test_a_long_queue_is_deleted_a_chunk_per_commit(st: LMDBStorage, monkeypatch) -> None:
    """Ending a session with a long queue never deletes it in one transaction (the event loop would
    stall); a new queue of the same client starts above the garbage, so it never loses an entry."""
    import fluxmq.storage.lmdb as mod

    monkeypatch.setattr(mod, "GC_CHUNK", 100)
    st.put_session("c", 10, 0.0, None)
    for i in range(1000):
        st.queue_append("c", i, _entry(f"old/{i}"))
    st.commit()
    wakes = []
    st.on_pending = lambda: wakes.append(1)
    st.delete_session("c", 1000)
    assert st.queue_floor("c") == 1000
    st.commit()
    assert 0 < _queue_keys(st) < 1000 and wakes  # one chunk gone, the next commit asked for
    # A new session of the same client meanwhile: its entries start at the floor.
    st.put_session("c", 10, 0.0, None)
    st.queue_append("c", 1000, _entry("new/0"))
    st.commit()
    # A restart in the middle of the deletion: the garbage is not loaded, the new entry is.
    st = reopen(st, map_size=64 * MiB)
    q = st.load().sessions["c"].queue
    assert (q.first, q.next, q.count) == (1000, 1001, 1)
    for _ in range(20):
        st.touch_alive()
        st.commit()
    assert _queue_keys(st) == 1
    assert st.queue_floor("c") == 0  # done: the mark is gone
    st = reopen(st, map_size=64 * MiB)
    assert st.load().sessions["c"].queue.count == 1
    st.close()


def test_an_empty_new_queue_starts_above_the_garbage_after_a_restart(st: LMDBStorage, monkeypatch) -> None:
    import fluxmq.storage.lmdb as mod

    monkeypatch.setattr(mod, "GC_CHUNK", 10)
    for i in range(100):
        st.queue_append("c", i, _entry("old"))
    st.commit()
    st.clear_session_state("c", 100)
    st.put_session("c", 10, 0.0, None)
    st.commit()
    st = reopen(st, map_size=64 * MiB)
    q = st.load().sessions["c"].queue
    assert (q.count, q.next) == (0, 100)
    st.close()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MiB tmpfs (needs root and mount; skipped where the test cannot mount)."""
    import subprocess

    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_refuses_then_recovers(small_disk: Path, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="fluxmq.storage")
    s = LMDBStorage(small_disk / "data", map_size=64 * MiB)
    written = 0
    with pytest.raises(StorageFull, match="disk full"):
        while True:
            s.queue_append("c", written, b"x" * 50_000)
            s.commit()
            written += 1
            assert written < 200
    assert s.refusing and [r for r in caplog.records if r.getMessage() == "storage_full"]
    for i in range(written // 2):
        s.queue_pop("c", i)
    s.commit()  # space freed: commits work again
    assert not s.refusing
    assert s.load().sessions == {}  # (no session record: the queue alone)
    s.close()
