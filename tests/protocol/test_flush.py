"""FlushScheduler group commit: a turn's storage batch is committed before any socket is written."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import gevent
import pytest

from fluxmq.errors import StorageError
from fluxmq.protocol.flush import FlushScheduler
from fluxmq.storage.lmdb import LMDBStorage


class RecordingConn:
    """The part of MQTTConnection the scheduler drives: an output buffer and ``flush_nowait``.

    Each flush records the bytes it "sent" and which of the acknowledged keys (``ack<key>;``) were not
    yet committed to LMDB at that moment (there must never be one)."""

    def __init__(self, flusher: FlushScheduler, storage: LMDBStorage, client_id: str = "test") -> None:
        self.client_id = client_id
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


WAIT = 60.0  # the bound of every wait below: generous, a loaded machine may stall a commit for long


def wait_until(done: Callable[[], bool], timeout: float = WAIT) -> None:
    """Run loop turns until ``done()``: the event a test waits for, not a number of turns. Under
    ``sync: always`` a commit runs in the hub's threadpool (with an fsync), which a loaded machine
    can delay past any fixed number of turns. The test's own assertions then check the state, so a
    wait that ends at the deadline fails them."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        run_turns(1)


def committed(st: LMDBStorage, flusher: FlushScheduler) -> bool:
    """Nothing pending and no write in progress (``sync: always``: in the threadpool)."""
    lock = flusher._write_lock
    return not st.has_pending and not (lock is not None and lock.locked())


def test_ack_leaves_only_after_its_state_is_committed(setup) -> None:
    st, flusher, conn = setup
    from fluxmq.broker.message import Message

    st.put_retained("a", Message("a", b"1", 1, True))
    conn.write(b"acka;")
    wait_until(lambda: conn.sent)  # the flush that sends the ack (each send records what was committed)
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
    flusher.ensure_committed()
    wait_until(lambda: sum(map(len, conn.sent)) >= sum(len(f"ackt{i};") for i in range(200)))
    assert b"".join(conn.sent) == b"".join(f"ackt{i};".encode() for i in range(200))  # never reordered
    assert conn.uncommitted_at_send == []
    assert len(stored_keys(st)) == 200


def test_a_batch_with_no_dirty_connection_is_committed_too(setup) -> None:
    st, flusher, conn = setup
    from fluxmq.broker.message import Message

    st.put_retained("solo", Message("solo", b"1", 1, True))  # e.g. a will published by a timer
    wait_until(lambda: committed(st, flusher))  # sync always: has_pending clears when the write starts
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
def test_a_batch_over_the_map_grows_it_and_its_acks_leave(tmp_path: Path, sync: str) -> None:
    """A real MapFullError (one turn's batch larger than map_size + headroom): the map grows, the
    batch commits, the acks leave; new stored messages are refused from then on."""
    st = LMDBStorage(tmp_path, map_size=1 << 20, sync=sync)  # 1 MiB + 8 MiB headroom
    flusher = FlushScheduler(st)
    conn = RecordingConn(flusher, st, "c")
    for i in range(120):  # ~12 MiB in one turn: more than the map can take
        st.queue_append("c", i, b"x" * 100_000)
    conn.write(b"ackbig;")
    # under sync always the (twice written) batch is fsynced in a thread
    wait_until(lambda: conn.sent or conn.abandoned is not None)
    assert conn.sent == [b"ackbig;"] and conn.abandoned is None
    assert st.refusing and not st.has_pending
    st.close()


class FailingStorage(LMDBStorage):
    """Its next ``fail`` commits raise StorageError, as an I/O error would (not producible on demand)."""

    fail = 0

    def write_batch(self, batch) -> None:
        if self.fail:
            self.fail -= 1
            raise StorageError("simulated I/O error")
        super().write_batch(batch)


@pytest.mark.parametrize("sync", ["batch", "always"])
def test_a_failed_commit_abandons_only_the_output_that_acknowledges_it(tmp_path: Path, sync: str) -> None:
    """MQTT clients with nothing at stake keep their connection and output (a clean QoS 0
    subscriber); the connection whose session recorded an operation, and a publisher whose QoS 1
    message was queued for another client (note_stake), lose their unsent acks and are closed. The
    batch is kept and committed by the retry. Before: every connection with output was closed."""
    from fluxmq.broker.message import Message

    st = FailingStorage(tmp_path, map_size=16 << 20, sync=sync)
    flusher = FlushScheduler(st)
    bystander = RecordingConn(flusher, st, "qos0-subscriber")
    owner = RecordingConn(flusher, st, "persistent")
    publisher = RecordingConn(flusher, st, "publisher")
    st.fail = 1
    st.put_session("persistent", 60, 0.0, None)
    owner.write(b"ackconnack;")
    st.put_retained("r", Message("r", b"1", 1, True))
    st.note_stake("publisher")
    publisher.write(b"ackr;")
    bystander.write(b"qos0-publish;")
    # The failed commit (sync always: in the threadpool) decides each connection's output.
    wait_until(lambda: all(c.sent or c.abandoned is not None for c in (bystander, owner, publisher)))
    assert bystander.sent == [b"qos0-publish;"] and bystander.abandoned is None
    assert owner.abandoned == (0x97, b"ackconnack;") and owner.sent == []
    assert publisher.abandoned == (0x97, b"ackr;") and publisher.sent == []
    # The retry after the back-off (under sync always has_pending clears when the write starts;
    # refusing, when a commit succeeds).
    wait_until(lambda: not st.has_pending and not st.refusing)
    assert not st.has_pending and not st.refusing
    assert stored_keys(st) == [b"r"]
    st.close()


@pytest.mark.parametrize("sync", ["batch", "always"])
def test_after_commit_waits_for_the_batch_holding_the_operations(tmp_path: Path, sync: str) -> None:
    from fluxmq.broker.message import Message

    st = LMDBStorage(tmp_path, map_size=16 << 20, sync=sync)
    FlushScheduler(st)
    seen = []
    st.put_retained("w", Message("w", b"1", 1, True))
    st.after_commit(lambda exc: seen.append((exc, stored_keys(st))))
    assert seen == []
    wait_until(lambda: seen)
    assert seen == [(None, [b"w"])]
    st.close()


def test_ensure_committed_during_a_failure_holds_back_only_connections_with_a_stake(tmp_path: Path) -> None:
    """Paths that write a socket outside the flush (a slow client's drain, a close) ask
    ``ensure_committed(conn)``: while a failed batch waits for its retry, only a connection whose
    output acknowledges it is refused."""
    st = FailingStorage(tmp_path, map_size=16 << 20, sync="batch")
    flusher = FlushScheduler(st)
    bystander = RecordingConn(flusher, st, "qos0-subscriber")
    owner = RecordingConn(flusher, st, "persistent")
    st.fail = 1
    st.put_session("persistent", 60, 0.0, None)
    with pytest.raises(StorageError):
        flusher.ensure_committed(owner)
    flusher.ensure_committed(bystander)  # nothing at stake: its bytes may leave
    with pytest.raises(StorageError):
        flusher.ensure_committed()
    st.close()
