"""LMDBStorage on real LMDB files in tmp dirs: each operation, load/restore, bad directories, full maps."""

from __future__ import annotations

import logging
from pathlib import Path

import lmdb
import pytest

from fluxmq.broker.message import Message
from fluxmq.errors import StorageError
from fluxmq.storage.lmdb import LMDBStorage, StorageFull

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


def test_stored_data_larger_than_map_size_still_opens_refusing_and_names_the_key(
    tmp_path: Path, caplog
) -> None:
    """A store over ``storage.map_size`` (the map filled at run time, or the key lowered) opens
    anyway: the node starts and serves what it holds, refuses new stored messages and logs which key
    to raise and to what. Before: StorageError at start, i.e. a node that cannot start."""
    s = LMDBStorage(tmp_path, map_size=16 * MiB)
    for i in range(40):
        s.put_retained(f"big/{i}", msg(f"big/{i}", b"x" * 100_000))
    s.commit()
    s.close()
    caplog.set_level(logging.ERROR, logger="fluxmq.storage")
    small = LMDBStorage(tmp_path, map_size=1 * MiB)
    assert small.refusing
    assert len(small.load().retained) == 40
    over = [r for r in caplog.records if r.getMessage() == "storage_over_map_size"]
    assert over and over[0].key == "storage.map_size" and over[0].raise_to > 4 * MiB
    for i in range(40):  # what it holds can still be deleted: the node recovers by itself
        small.delete_retained(f"big/{i}")
    small.commit()
    small.close()
    assert len(LMDBStorage(tmp_path, map_size=16 * MiB).load().retained) == 0


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


class _CountingEnv:
    """The store's LMDB environment, counting ``info()`` (what reading the usage costs)."""

    def __init__(self, env) -> None:
        self.env = env
        self.info_calls = 0

    def info(self):
        self.info_calls += 1
        return self.env.info()

    def __getattr__(self, name: str):
        return getattr(self.env, name)


def test_usage_is_read_rarely_far_from_map_size_and_at_every_commit_near_it(tmp_path: Path) -> None:
    """Reading the usage (``env.info()``, about 7,000 instructions) ran after every commit: far from
    ``storage.map_size`` it runs once per many commits now, and at every commit once the rate seen
    could fill what is left; the refusal still comes before the data passes map_size by more than a
    quarter of it."""
    s = LMDBStorage(tmp_path / "far", map_size=64 * MiB)
    env = s.env = _CountingEnv(s.env)
    for i in range(256):
        s.queue_append("c", i, b"x" * 200)
        s.commit()
    s.env = env.env
    s.close()
    assert env.info_calls <= 16
    s = LMDBStorage(tmp_path / "near", map_size=2 * MiB)
    i = 0
    while not s.refusing:
        s.queue_append("c", i, b"x" * 50_000)
        s.commit()
        i += 1
        assert i < 200, "never refused"
    assert s.used_bytes() < 2 * MiB + 2 * MiB // 4
    s.close()


def test_a_batch_beyond_the_headroom_grows_the_map_and_commits(tmp_path: Path) -> None:
    """A real MapFullError: one batch larger than map_size + headroom. The map grows to take it
    (space on disk permitting), so nothing recorded is thrown away; new stored messages are then
    refused until usage drops again. Before: StorageFull and the batch was gone."""
    s = LMDBStorage(tmp_path, map_size=1 * MiB)
    for i in range(400):  # ~40 MiB in one batch: more than map_size + headroom
        s.queue_append("c", i, b"y" * 100_000)
    s.put_session("c", 3600, 0.0, None)
    s.commit()
    assert s.refusing and not s.has_pending
    assert s.load().sessions["c"].queue.count == 400
    s.close()


class FailingStorage(LMDBStorage):
    """LMDBStorage whose next ``fail`` commits raise, as an I/O error would (an EIO from the disk
    cannot be produced on demand)."""

    fail = 0

    def write_batch(self, batch) -> None:
        if self.fail:
            self.fail -= 1
            raise StorageError(f"{self._where()}: commit failed: simulated I/O error")
        super().write_batch(batch)


def test_a_failed_commit_keeps_its_batch_and_the_next_commit_applies_it(tmp_path: Path) -> None:
    """Never continue with diverged state: what a failed commit held is retried with the next one.
    Before: the batch was dropped, so the ended session came back at restart and a finished QoS 2
    exchange was redelivered."""
    s = FailingStorage(tmp_path, map_size=64 * MiB)
    s.put_session("gone", 3600, 0.0, None)
    s.put_subscription("gone", "a/#", 1, False, False, 0, 0)
    s.put_session("kept", 3600, 0.0, None)
    s.put_inflight("kept", 5, msg("x", b"1", 2), 2, False, None)
    s.commit()
    s.delete_session("gone")
    s.delete_inflight("kept", 5)
    s.fail = 1
    with pytest.raises(StorageError, match="simulated"):
        s.commit()
    assert s.has_pending and s.refusing  # kept, and new stored messages refused meanwhile
    assert s.queue_read("kept", [0]) == [None]  # reads still see the pending state
    s.put_retained("later", msg("later", b"2", 1, retain=True))  # recorded after the failure
    s.commit()
    assert not s.has_pending and not s.refusing and s.ping()[0]
    s = reopen(s, map_size=64 * MiB)
    state = s.load()
    assert "gone" not in state.sessions
    assert state.sessions["kept"].inflight == {}
    assert [f[0] for f in state.retained] == ["later"]
    s.close()


def test_a_failed_commit_merges_under_operations_recorded_after_it(tmp_path: Path) -> None:
    """The retried batch is the failed one with later operations on top: the last write of a key wins
    and a later prefix delete removes the failed batch's writes under it."""
    s = FailingStorage(tmp_path, map_size=64 * MiB)
    s.put_session("c", 10, 0.0, None)
    s.put_subscription("c", "x", 0, False, False, 0, 0)
    s.put_retained("t", msg("t", b"old", 1, retain=True))
    s.fail = 1
    with pytest.raises(StorageError):
        s.commit()
    s.delete_session("c")  # a prefix delete over the failed batch's subscription
    s.put_session("c", 20, 0.0, None)
    s.put_retained("t", msg("t", b"new", 1, retain=True))
    s.commit()
    s = reopen(s, map_size=64 * MiB)
    state = s.load()
    assert state.sessions["c"].expiry_interval == 20 and state.sessions["c"].subscriptions == []
    assert [f[1] for f in state.retained] == [b"new"]
    s.close()


def test_after_commit_callbacks_run_once_their_batch_is_committed_or_failed(tmp_path: Path) -> None:
    s = FailingStorage(tmp_path, map_size=64 * MiB)
    seen: list = []
    s.after_commit(lambda exc: seen.append(("idle", exc)))  # nothing pending: at once
    assert seen == [("idle", None)]
    s.put_retained("a", msg("a", b"1", 1, retain=True))
    s.after_commit(lambda exc: seen.append(("a", exc)))
    assert len(seen) == 1
    s.fail = 1
    with pytest.raises(StorageError):
        s.commit()
    assert seen[1][0] == "a" and isinstance(seen[1][1], StorageError)
    s.after_commit(lambda exc: seen.append(("retry", exc)))  # its ops are pending again
    s.commit()
    assert seen[2] == ("retry", None)
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

    monkeypatch.setattr(mod, "GC_CHUNK", 5)  # records (schema 4: segments of a commit's entries)
    st.put_session("c", 10, 0.0, None)
    for i in range(1000):
        st.queue_append("c", i, _entry(f"old/{i}"))
    st.commit()
    records = _queue_keys(st)
    assert records > 10
    wakes = []
    st.on_pending = lambda: wakes.append(1)
    st.delete_session("c", 1000)
    assert st.queue_floor("c") == 1000
    st.commit()
    assert 0 < _queue_keys(st) == records - 5 and wakes  # one chunk gone, the next commit asked for
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

    monkeypatch.setattr(mod, "GC_CHUNK", 1)  # records (the 100 entries are a few segments)
    for i in range(100):
        st.queue_append("c", i, _entry("old"))
    st.commit()
    assert _queue_keys(st) > 1
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


def test_full_disk_refuses_keeps_the_batch_then_recovers(small_disk: Path, caplog) -> None:
    """A full disk fails the commit: its batch is kept (retried, not dropped) and new stored messages
    are refused; once space is freed on the disk the retry commits everything, the failed write too."""
    caplog.set_level(logging.ERROR, logger="fluxmq.storage")
    filler = small_disk / "filler"
    filler.write_bytes(b"f" * (1 * MiB))  # what the operator frees
    s = LMDBStorage(small_disk / "data", map_size=64 * MiB)
    written = 0
    with pytest.raises(StorageFull, match="disk full"):
        while True:
            s.queue_append("c", written, b"x" * 50_000)
            s.commit()
            written += 1
            assert written < 200
    assert s.refusing and [r for r in caplog.records if r.getMessage() == "storage_full"]
    assert s.has_pending  # the failed append is kept
    for i in range(written // 2):
        s.queue_pop("c", i)
    filler.unlink()
    s.commit()  # space freed: the kept batch and the pops commit together
    assert not s.refusing and not s.has_pending
    seqs = list(range(written + 1))
    present = [e is not None for e in s.queue_read("c", seqs)]
    assert present == [False] * (written // 2) + [True] * (written + 1 - written // 2)
    s.close()


# -- the background tick (last alive, batch fsync) --------------------------------------------------


class _SyncSpy:
    """The real LMDB environment, counting the background tick's fsyncs."""

    def __init__(self, env) -> None:
        self._env = env
        self.syncs = 0

    def sync(self, force: bool = False) -> None:
        self.syncs += 1
        self._env.sync(force)

    def __getattr__(self, name: str):
        return getattr(self._env, name)


def _ticks(st: LMDBStorage, n: int = 20) -> None:
    import gevent

    gevent.sleep(st.sync_interval * n)


def test_background_tick_writes_and_syncs_nothing_at_rest(tmp_path: Path) -> None:
    """A node at rest with no persistent session online does not commit "last alive" nor fsync
    every storage.sync_interval: nothing at restart would read it, nothing is unsynced."""
    st = LMDBStorage(tmp_path / "data", map_size=64 * MiB, sync_interval=0.005)
    st.put_session("gone", 60, 1000.0, None)  # stored, offline
    st.commit()
    spy = st.env = _SyncSpy(st.env)
    st.start_background()
    try:
        for _ in range(200):  # bounded: the first tick fsyncs the commit above
            _ticks(st, 1)
            if spy.syncs:
                break
        synced = spy.syncs
        assert synced == 1
        _ticks(st)
        assert not st.has_pending, "the tick recorded last alive with no session online"
        assert spy.syncs == synced, "the tick fsynced with nothing committed since the last fsync"
    finally:
        st.env = spy._env
        st.close()


def test_background_tick_records_last_alive_while_a_session_is_online(tmp_path: Path) -> None:
    import time

    st = LMDBStorage(tmp_path / "data", map_size=64 * MiB, sync_interval=0.005)
    before = time.time()
    st.put_session("c", 60, 0.0, None)  # online: the same commit carries a fresh last alive
    st.commit()
    assert st.load().last_alive >= before
    st.start_background()
    try:
        later = time.time()
        for _ in range(200):  # bounded: the tick puts last alive while "c" is online
            _ticks(st, 1)
            if st.has_pending:
                break
        st.commit()
        assert st.load().last_alive >= later
        st.put_session("c", 60, time.time(), None)  # offline now: the tick stops writing
        st.commit()
        _ticks(st)
        assert not st.has_pending
    finally:
        st.close()
