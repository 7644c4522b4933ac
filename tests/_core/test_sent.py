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


def _reference_take(
    table: SentTable, changed: set, ops: tuple, trims: dict, logs: list, batch, seg: int
) -> None:
    """``LMDBStorage._write_sent`` as it was in Python (schema 4), with ``records``' encoders."""
    from fluxmq.storage.lmdb import _SEQ

    queue_ops, sent_ops, done_ops = ops
    for state in changed:
        if table.states.get(state.client_id) is not state:
            continue
        if state.staged:
            runs = state.closed
            runs.append((state.staged_first, state.staged))
            state.staged = []
            state.closed = []
            floor = state.floor
            added = False
            for first, entries in runs:
                if first < floor:
                    if first + len(entries) <= floor:
                        continue
                    entries = entries[floor - first :]
                    first = floor
                if len(entries) == 1:
                    queue_ops[state.prefix + _SEQ.pack(first)] = entries[0]
                else:
                    n = len(entries)
                    per = max(1, seg * n // max(1, sum(map(len, entries))))
                    for i in range(0, n, per):
                        part = entries[i : i + per]
                        queue_ops[state.prefix + _SEQ.pack(first + i)] = (
                            part[0] if len(part) == 1 else records.encode_segment(part)
                        )
                if not added:
                    logs.append(state)
                    added = True
                state.unwritten.append((batch, first, entries))
        if state.done_dirty:
            state.done_dirty = False
            ranges = list(state.ranges)
            done_ops[state.prefix] = records.encode_done(state.floor, ranges)
            trims[state.prefix] = (state.floor, ranges)
        buckets, disk = state.slots, state.disk
        for bucket in state.dirty:
            key = records.sent_key(state.prefix, bucket)
            slots = buckets.get(bucket)
            if slots is not None and slots.count(0) != records.SENT_SLOTS:
                sent_ops[key] = records.encode_sent(slots)
                disk.add(bucket)
                continue
            if slots is not None:
                del buckets[bucket]
                state.uncache()
            if bucket in disk:
                sent_ops[key] = None
                disk.discard(bucket)
        state.clean()
        if not buckets and not disk and not state.unwritten and not state.ranges and state.floor >= state.end:
            table.drop(state.client_id)


def _snapshot(table: SentTable) -> dict:
    return {
        cid: (
            st.floor,
            list(st.ranges),
            st.end,
            {b: list(v) for b, v in st.slots.items()},
            sorted(st.disk),
            [(first, list(entries)) for _, first, entries in st.unwritten],
        )
        for cid, st in table.states.items()
    }


@pytest.mark.parametrize("seed", range(6))
def test_take_ops_writes_what_the_python_commit_wrote(seed: int) -> None:
    """``SentTable.take_ops`` (the commit's records, in C) against the Python ``_write_sent`` it
    replaced: two tables fed the same random sends, queueings, acknowledgements and pops of three
    clients (entries of random sizes, some done before their first commit) give byte-identical
    operations, trims and states, commit after commit."""
    rnd = random.Random(seed)
    tables = [SentTable(_Store(), records.client_prefix) for _ in range(2)]
    nxt = {cid: 0 for cid in ("a", "b", "c")}
    flight: dict[str, dict[int, int]] = {cid: {} for cid in nxt}
    queued: dict[str, list[int]] = {cid: [] for cid in nxt}
    pid_next = {cid: 1 for cid in nxt}
    for turn in range(60):
        for table in tables:
            table.dirty = set()
        for _ in range(rnd.randrange(0, 40)):
            cid = rnd.choice("abc")
            kind = rnd.random()
            entry = bytes([1]) + bytes(rnd.randrange(0, 300))
            if kind < 0.35 and len(flight[cid]) < 40:
                pid = pid_next[cid]
                pid_next[cid] = pid % 300 + 1
                while pid in flight[cid]:
                    pid = pid_next[cid]
                    pid_next[cid] = pid % 300 + 1
                seq = nxt[cid]
                nxt[cid] += 1
                flight[cid][pid] = seq
                for table in tables:
                    table.put_sent_entry(cid, pid, seq, entry)
            elif kind < 0.6:
                seq = nxt[cid]
                nxt[cid] += 1
                queued[cid].append(seq)
                for table in tables:
                    table.queue_append(cid, seq, entry)
            elif kind < 0.85 and flight[cid]:
                pid = rnd.choice(list(flight[cid]))
                del flight[cid][pid]
                for table in tables:
                    table.delete_inflight(cid, pid)
            elif queued[cid]:
                seq = queued[cid].pop(rnd.randrange(len(queued[cid])))
                for table in tables:
                    table.queue_pop(cid, seq)
        outs = []
        for n, table in enumerate(tables):
            ops = ({}, {}, {})
            trims: dict = {}
            logs: list = []
            batch = object()
            changed = table.dirty
            if n == 0:
                table.take_ops(changed, *ops, trims, logs, batch, 200)
            else:
                _reference_take(table, changed, ops, trims, logs, batch, 200)
            outs.append((ops, trims, sorted(s.client_id for s in logs), _snapshot(table)))
            for st in list(table.states.values()):  # the batch written: its runs leave unwritten
                st.unwritten = [u for u in st.unwritten if u[0] is not batch]
        assert outs[0] == outs[1], turn
