"""FlushScheduler group commit: a turn's storage batch is committed before any socket is written."""

from __future__ import annotations

from pathlib import Path

import gevent
import pytest

from fluxmq.protocol.flush import FlushScheduler
from fluxmq.storage.lmdb import LMDBStorage


class RecordingConn:
    """The part of MQTTConnection the scheduler drives: an output buffer and ``flush_nowait``.

    Each flush records the bytes it "sent" and which of the acknowledged keys (``ack<key>;``) were not
    yet committed to LMDB at that moment (there must never be one)."""

    def __init__(self, flusher: FlushScheduler, storage: LMDBStorage) -> None:
        self.flusher = flusher
        self.storage = storage
        self.out = bytearray()
        self.sent: list[bytes] = []
        self.uncommitted_at_send: list[bytes] = []
        self._dirty = False
        self.peer = "test"
        self.abandoned: tuple | None = None

    def write(self, data: bytes) -> None:
        self.out += data
        if not self._dirty:
            self._dirty = True
            self.flusher.mark(self)

    def abandon_output(self, reason_code: int, reason: str) -> None:
        self.abandoned = (reason_code, bytes(self.out))
        self.out.clear()

    def flush_nowait(self, limit: int | None = None) -> None:
        self._dirty = False
        n = len(self.out) if limit is None else min(limit, len(self.out))
        if n:
            chunk = bytes(self.out[:n])
            committed = set(stored_keys(self.storage))
            acked = [a[3:] for a in chunk.split(b";") if a.startswith(b"ack")]
            self.uncommitted_at_send += [k for k in acked if k not in committed]
            self.sent.append(chunk)
            del self.out[:n]
        if self.out:
            self._dirty = True
            self.flusher.mark(self)


def stored_keys(st: LMDBStorage) -> list[bytes]:
    with st.env.begin() as txn:
        return [bytes(k) for k, _ in txn.cursor(st._dbs[6])]  # retained


@pytest.fixture(params=["batch", "always"])
def setup(request, tmp_path: Path):
    st = LMDBStorage(tmp_path, map_size=16 << 20, sync=request.param)
    flusher = FlushScheduler(st)
    yield st, flusher, RecordingConn(flusher, st)
    st.close()


def run_turns(n: int = 20) -> None:
    for _ in range(n):
        gevent.sleep(0.001)


def test_ack_leaves_only_after_its_state_is_committed(setup) -> None:
    st, flusher, conn = setup
    from fluxmq.broker.message import Message

    st.put_retained("a", Message("a", b"1", 1, True))
    conn.write(b"acka;")
    run_turns()
    assert conn.sent == [b"acka;"]
    assert conn.uncommitted_at_send == []
    assert stored_keys(st) == [b"a"]


def test_bytes_written_during_a_commit_wait_for_the_next_one(setup) -> None:
    st, flusher, conn = setup
    from fluxmq.broker.message import Message

    def turn(i: int) -> None:
        st.put_retained(f"t{i}", Message(f"t{i}", b"x", 1, True))
        conn.write(f"ackt{i};".encode())

    # Many greenlets writing while commits (and, for always, fsyncs in the threadpool) run.
    greenlets = [gevent.spawn_later(0.0005 * i, turn, i) for i in range(200)]
    gevent.joinall(greenlets)
    run_turns(50)
    flusher.ensure_committed()
    run_turns(5)
    assert b"".join(conn.sent) == b"".join(f"ackt{i};".encode() for i in range(200))  # never reordered
    assert conn.uncommitted_at_send == []
    assert len(stored_keys(st)) == 200


def test_a_batch_with_no_dirty_connection_is_committed_too(setup) -> None:
    st, flusher, conn = setup
    from fluxmq.broker.message import Message

    st.put_retained("solo", Message("solo", b"1", 1, True))  # e.g. a will published by a timer
    run_turns()
    assert not st.has_pending
    assert stored_keys(st) == [b"solo"]


def test_without_durable_storage_the_flush_is_unchanged() -> None:
    from fluxmq.storage import MemoryStorage

    flusher = FlushScheduler(MemoryStorage())
    assert flusher.storage is None
    sent = []

    class Conn:
        def flush_nowait(self) -> None:
            sent.append(1)

    flusher.mark(Conn())
    gevent.sleep(0)
    assert sent == [1]
    assert flusher.settle() is True


@pytest.mark.parametrize("sync", ["batch", "always"])
def test_a_failed_commit_sends_none_of_the_acks_and_closes_their_connections(tmp_path: Path, sync: str) -> None:
    st = LMDBStorage(tmp_path, map_size=1 << 20, sync=sync)  # 1 MiB + 8 MiB headroom
    flusher = FlushScheduler(st)
    conn = RecordingConn(flusher, st)
    for i in range(120):  # ~12 MiB in one turn: more than the map can take
        st.queue_append("c", i, b"x" * 100_000)
    conn.write(b"ackbig;")
    run_turns()
    assert conn.sent == []
    assert conn.abandoned == (0x97, b"ackbig;")
    assert st.refusing
    st.close()
