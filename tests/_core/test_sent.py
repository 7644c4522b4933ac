"""``fluxmq._core.sent``: a client's done marks against a plain set, and the table's bookkeeping.

(The records made from them, and a restart after random acknowledgement orders, are
``tests/storage/test_lmdb_segments.py``'s; the relay's use of the table is
``tests/protocol/test_publish_relay.py``'s.)"""

from __future__ import annotations

import random

import pytest

from fluxmq._core.sent import SentState, SentTable
from fluxmq.storage import records  # noqa: F401  (configures the slots factory)


@pytest.mark.parametrize("seed", range(5))
def test_done_marks_match_a_set_in_any_order(seed: int) -> None:
    rnd = random.Random(seed)
    st = SentState("c", b"c\x00")
    for seq in range(10, 210):
        st.stage(seq, b"e%d" % seq)
    order = list(range(10, 210))
    rnd.shuffle(order)
    done: set[int] = set()
    for seq in order[:150]:
        st.done(seq)
        st.done(seq)  # twice: no change
        done.add(seq)
        for probe in range(0, 215, 7):
            assert st.is_done(probe) == (probe < 10 or probe in done)
    # the floor is the first live seq; the ranges are apart, sorted and cover the rest exactly
    live = sorted(set(range(10, 210)) - done)
    assert st.floor == live[0]
    covered = {s for a, b in st.ranges for s in range(a, b)}
    assert covered == {s for s in done if s > st.floor}
    assert all(b < c for (_, b), (c, _) in zip(st.ranges, st.ranges[1:], strict=False))


class _Store:
    """What the table touches of a store: has_pending, _wake."""

    def __init__(self) -> None:
        self.op_count = 0
        self.has_pending = False
        self.wakes = 0

    def _wake(self) -> None:
        self.wakes += 1
        self.has_pending = True


def test_table_records_mark_dirty_count_ops_and_wake_once_per_batch() -> None:
    store = _Store()
    table = SentTable(store, lambda cid: cid.encode() + b"\x00")
    batch = table.dirty = set()
    table.put_sent_entry("a", 1, 0, b"e0")
    table.queue_append("a", 1, b"e1")
    table.put_sent("a", 2, 1)
    table.delete_inflight("a", 1)
    state = table.states["a"]
    assert batch == {state} and table.ops == 5 and store.wakes == 1
    assert state.get(1) == 0 and state.get(2) == (1 + 1) << 1
    assert state.floor == 1 and state.staged == [b"e0", b"e1"]
    # the store took the batch: a new set, has_pending cleared, woken reset
    store.has_pending = False
    table.dirty = set()
    table.woken = False
    table.delete_inflight("a", 2)
    assert table.dirty == {state} and store.wakes == 2 and state.floor == 2


def test_a_bucket_changed_again_after_a_commit_is_dirty_again() -> None:
    st = SentState("c", b"c\x00")
    st.set(1, 4)
    st.set(2, 6)
    st.set(40, 8)  # another bucket (a send and an acknowledgement take turns at two)
    assert st.dirty == {0, 2}
    st.clean()  # the commit wrote them
    assert st.dirty == set()
    st.set(3, 10)
    st.set(41, 0)
    assert st.dirty == {0, 2} and st.get(3) == 10 and st.get(40) == 8 and st.get(41) == 0
    st.set(100, 2)  # a third bucket takes a cached one's place
    st.clean()
    st.set(1, 0)
    assert st.dirty == {0} and st.slots[0][1] == 0


def test_free_slots_and_lengths() -> None:
    from array import array

    from fluxmq._core.sent import free_slots, lengths

    slots = array("Q", bytes(128))
    slots[3] = 5
    assert free_slots(slots) == 15
    lens, total = lengths([b"ab", b"", b"xyz", bytearray(b"q")])
    assert list(lens) == [2, 0, 3, 1] and lens.typecode == "I" and total == 6
