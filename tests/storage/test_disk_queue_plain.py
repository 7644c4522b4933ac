"""``DiskQueue``'s C operations for the relay (``QueueCore.append_plain`` / ``pop_plain``): which heads
``pop_plain`` takes (a plain QoS 1 message, its ``expires_at`` read from the message class's slot or,
for a class without one, by attribute) and that the in-memory tail keeps working after the queue
empties and fills again."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxmq.broker.message import Message
from fluxmq.storage.lmdb import LMDBStorage
from fluxmq.storage.queue import DiskQueue


class _PropertyExpiry(Message):
    """A message class whose ``expires_at`` is a property, not a slot (read by name)."""

    __slots__ = ("_expiry",)

    def __init__(self, topic: str, payload: bytes, expiry: float | None) -> None:
        super().__init__(topic, payload, 1)
        self._expiry = expiry

    @property
    def expires_at(self):
        return self._expiry

    @expires_at.setter
    def expires_at(self, value) -> None:
        self._expiry = value


@pytest.fixture
def queue(tmp_path: Path):
    store = LMDBStorage(tmp_path / "db", map_size=16 << 20, verify=False)
    q = DiskQueue(store, "c1", Message)
    q.cache_tail(True)
    try:
        yield q
    finally:
        store.close()


def _seqs(q: DiskQueue) -> tuple[int, int, int]:
    return q.first, q.next, q.count


@pytest.mark.parametrize("cls", ["slot", "property"])
def test_pop_plain_leaves_a_head_that_expires_to_the_python_path(queue: DiskQueue, cls: str) -> None:
    """Plain heads are popped in order; a head with an expiry (slot or property) is left where it
    is, the queue untouched, for ``pump`` (which checks the expiry); after it the plain ones go on."""

    def make(payload: bytes, expiry: float | None):
        if cls == "slot":
            m = Message("t/x", payload, 1)
            m.expires_at = expiry
            return m
        return _PropertyExpiry("t/x", payload, expiry)

    items = [make(b"a", None), make(b"b", 1e12), make(b"c", None)]
    for m in items:
        queue.append((m, 1, False, None))
    first = queue.pop_plain()
    assert first is not None and first[1][0] is items[0]
    before = _seqs(queue)
    assert queue.pop_plain() is None  # b expires: the Python path's
    assert _seqs(queue) == before
    head = queue.pop_head()
    assert head[1][0] is items[1]
    last = queue.pop_plain()
    assert last is not None and last[1][0] is items[2]
    assert queue.count == 0 and queue.pop_plain() is None


def test_the_in_memory_tail_keeps_its_order_after_the_queue_empties(queue: DiskQueue) -> None:
    """Rounds of appends and ``pop_plain``s down to empty (``_reset`` clears the tail) and up again:
    every message comes out once, in order, and the tail's byte count returns to zero."""
    out = []
    sent = []
    for round_ in range(3):
        for i in range(5):
            m = Message("t/x", b"%d-%d" % (round_, i), 1)
            sent.append(m)
            queue.append((m, 1, False, None))
        while queue.count:
            head = queue.pop_plain()
            assert head is not None
            out.append(head[1][0])
        assert queue._mem_bytes == 0 and len(queue._mem) == 0
    assert out == sent
