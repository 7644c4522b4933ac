"""The plain forwarded item written in C (``fluxmq._core.forward``) is byte for byte what the
cluster's Python framing (``cluster.batch.build_batch`` of ``storage.records.encode_message``)
writes for the same message, and the queue keeps its count, bound and order."""

from __future__ import annotations

from collections import deque

import pytest

from fluxmq._core.forward import ForwardQueue, ForwardRun
from fluxmq.broker.message import Message
from fluxmq.cluster.batch import Outgoing, build_batch, decode_items
from fluxmq.storage.records import encode_message


def python_items(*messages: Message) -> bytes:
    entries = [Outgoing(encode_message(m), (), True, None) for m in messages]
    return build_batch("w0", 1, 1, entries)[0].items


@pytest.mark.parametrize(
    "topic,origin,qos,payload",
    [
        ("a/b", "pub", 0, b"x"),
        ("t", "c" * 300, 1, b"\x00" * 70000),
        ("ünï/cødé", "", 1, b""),
        ("t", None, 0, b"p"),
    ],
)
def test_plain_item_is_what_the_python_framing_writes(topic, origin, qos, payload) -> None:
    runs: deque = deque()
    fq = ForwardQueue(runs, 100, 1 << 30, 100, 1 << 30)
    fq.append(topic, origin, qos, payload)
    assert bytes(fq.tail) == python_items(Message(topic, payload, qos, False, None, None, origin))
    [(m, groups, match_local)] = list(decode_items(bytes(fq.tail)))
    assert (m.topic, m.payload, m.qos, m.origin or None, groups, match_local) == (
        topic,
        payload,
        qos,
        origin or None,
        (),
        True,
    )


@pytest.mark.parametrize("topic,origin,qos,payload", [("a/b", "pub", 0, b"x" * 200), ("t", None, 1, b"")])
def test_item_from_the_read_buffer_is_the_item_from_objects(topic, origin, qos, payload) -> None:
    """``append_raw`` (the relay's forward-only PUBLISH: the topic's bytes, the payload where it
    lies in the read) frames what ``append_plain`` frames from a ``str`` topic and ``bytes``."""
    runs: deque = deque()
    woken = []
    fq = ForwardQueue(runs, 100, 1 << 30, 100, 1 << 30, lambda: woken.append(1))
    fq.append_bytes(topic.encode(), origin, qos, payload)
    assert bytes(fq.tail) == python_items(Message(topic, payload, qos, False, None, None, origin))
    assert fq.queued == 1 and fq.queued_bytes == len(fq.tail) and woken == [1]


def test_queue_seals_runs_counts_and_bounds_and_wakes_once() -> None:
    runs: deque = deque()
    woken = []
    fq = ForwardQueue(runs, 5, 1 << 20, 2, 1 << 20, lambda: woken.append(1))
    for i in range(3):
        fq.append("t", "p", 0, str(i).encode())
    assert woken == [1]  # only when the first message went into an empty queue
    assert [type(r) for r in runs] == [ForwardRun] and runs[0].count == 2  # sealed at run_messages
    assert fq.tail_count == 1 and fq.queued == 3 and fq.has_room()
    fq.seal()
    assert [r.count for r in runs] == [2, 1] and fq.tail_count == 0 and bytes(fq.tail) == b""
    assert fq.queued_bytes == sum(len(r.data) for r in runs)
    data = b"".join(r.data for r in runs)
    assert [m.payload for m, _g, _l in decode_items(data)] == [b"0", b"1", b"2"]
    fq.append("t", "p", 0, b"3")
    fq.append("t", "p", 0, b"4")
    assert not fq.has_room()  # at max_messages: the relay leaves the next one to the Python path
    batch, expired = build_batch(
        "w0", 1, 1, [*runs, Outgoing(encode_message(Message("u", b"5")), (), True, None)]
    )
    assert expired == 0 and batch.count == 6  # runs of 2, 1 and 2, then the Outgoing


def test_a_sealed_run_takes_the_tails_bytes_and_the_next_tail_starts_at_its_size() -> None:
    # the run's data is the bytes the items were written into, shortened (not a copy of a buffer the
    # queue keeps): the queue holds nothing after a seal, and later appends leave the run alone
    runs: deque = deque()
    fq = ForwardQueue(runs, 1 << 20, 1 << 30, 1 << 20, 1 << 30)
    # grows the tail a few times (below 64 KiB, where a full tail grows rather than being sealed)
    payloads = [bytes([i % 251]) * (i * 37 % 400) for i in range(400)]
    for i, p in enumerate(payloads[:200]):
        fq.append(f"t/{i % 3}", "pub", i % 2, p)
    size = len(fq.tail)
    assert fq.capacity >= size > 4096
    fq.seal()
    assert fq.capacity == 0 and len(runs[0].data) == size
    first = bytes(runs[0].data)  # (a copy to compare with later)
    fq.append("t/2", "pub", 0, payloads[200])  # (as the loop below would)
    assert fq.capacity >= size  # one allocation for a run like the last one: no growing copies
    for i, p in enumerate(payloads[201:], 201):
        fq.append(f"t/{i % 3}", "pub", i % 2, p)
    fq.seal()
    assert runs[0].data == first
    got = [(m.topic, m.payload, m.qos) for r in runs for m, _g, _l in decode_items(r.data)]
    assert got == [(f"t/{i % 3}", p, i % 2) for i, p in enumerate(payloads)]
    assert fq.queued_bytes == sum(len(r.data) for r in runs)
    assert hash(runs[1].data) == hash(bytes(runs[1].data))


class _Feed:
    """A link's queue (its deque of runs and its ``ForwardQueue``, unbounded) and the numbered
    messages appended to it so far (``sent``: topic, QoS, payload), as the relay appends them."""

    def __init__(self) -> None:
        self.runs: deque = deque()
        self.fq = ForwardQueue(self.runs, 1 << 20, 1 << 30, 1 << 20, 1 << 30)
        self.sent: list = []

    def append(self, n: int) -> None:
        for _ in range(n):
            i = len(self.sent)
            self.sent.append((f"t/{i % 5}", i % 2, i.to_bytes(4, "big") * 16))
            self.fq.append(self.sent[-1][0], "pub", self.sent[-1][1], self.sent[-1][2])


def test_runs_of_a_nearly_full_tail_and_of_a_short_one_hold_exactly_their_items() -> None:
    # a run that fills at least three quarters of its tail's bytes keeps the allocation (its length
    # set); a shorter one is shortened by realloc: both hold exactly their items
    feed = _Feed()
    runs, fq, sent, append = feed.runs, feed.fq, feed.sent, feed.append

    append(300)
    fq.seal()
    append(1)
    cap = fq.capacity
    while len(fq.tail) < cap - cap // 5:  # ~4/5 of the tail's bytes: kept whole
        append(1)
    assert len(fq.tail) >= cap - (cap >> 2)
    fq.seal()
    append(2)  # a short run in a tail of ~the same size: shortened
    assert len(fq.tail) < fq.capacity // 4
    fq.seal()
    got = [(m.topic, m.qos, m.payload) for r in runs for m, _g, _l in decode_items(r.data)]
    assert got == sent and fq.queued == len(sent) == sum(r.count for r in runs)
    assert fq.queued_bytes == sum(len(r.data) for r in runs)
    for r in runs:
        assert r.data == bytes(bytearray(r.data)) and hash(r.data) == hash(bytes(bytearray(r.data)))


def test_a_tail_reuses_a_sealed_runs_bytes_once_nothing_else_holds_them() -> None:
    # a run's bytes (kept whole) is written again for a later tail once the link dropped its batch:
    # no new allocation, and the tail's items are only the new ones; a run still held is left alone
    import tracemalloc

    runs: deque = deque()
    fq = ForwardQueue(runs, 1 << 20, 1 << 30, 1 << 20, 1 << 30)
    msgs = [(f"t/{i % 5}", i % 2, i.to_bytes(4, "big") * 16) for i in range(20000)]
    sent = [0, 0]  # messages appended, bytes sealed (the tail's length without ``tail``'s copy)

    def fill_and_seal(least: int = 0) -> tuple:
        """A tail of at least ``least`` messages filled to ~4/5 of its bytes (a run kept whole),
        sealed: the run and its items."""
        first = sent[0]
        while True:
            topic, qos, payload = msgs[sent[0]]
            sent[0] += 1
            fq.append(topic, "pub", qos, payload)
            if sent[0] - first >= least and fq.queued_bytes - sent[1] >= fq.capacity - fq.capacity // 5:
                break
        fq.seal()
        got = list(runs)  # (more than one run: a tail over 64 KiB filled up and was sealed)
        runs.clear()
        sent[1] += sum(len(r.data) for r in got)
        assert least or len(got) == 1
        return got[-1], msgs[first : sent[0]]

    def items(run) -> list:
        return [(m.topic, m.qos, m.payload) for m, _g, _l in decode_items(run.data)]

    fill_and_seal(2000)  # (sets the runs' size, ~200 KB: the next tails are allocated at it)
    held, held_items = fill_and_seal()
    kept = bytes(bytearray(held.data))
    other, other_items = fill_and_seal()  # held is not reused while held
    assert held.data == kept and items(held) == held_items and items(other) == other_items
    cap = len(held.data)
    assert cap > 100_000
    del held, other  # (what the link does once the batches are acknowledged)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        run, run_items = fill_and_seal()
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < cap // 4  # (a new tail's bytes would be ~cap)
    assert items(run) == run_items and run.count == len(run_items)
    assert hash(run.data) == hash(bytes(bytearray(run.data)))


def test_a_large_full_tail_is_sealed_as_a_run_not_copied_into_a_larger_allocation() -> None:
    # a round longer than the recent ones: its tail, once full, goes to the queue as a run and the
    # next item starts a tail as large instead of the items being copied into one twice as large
    # (a fresh mapping whose pages the copy faulted in); the round's whole length sizes the next
    # tails, so a round as long fits one tail again
    feed = _Feed()
    runs, fq, sent, append = feed.runs, feed.fq, feed.sent, feed.append
    taken = []

    def take() -> list:
        fq.seal()
        got = list(runs)
        runs.clear()
        taken.extend(got)
        return got

    append(1500)  # ~160 KB: the recent runs' size
    first = take()
    assert len(first) > 1 and max(len(r.data) for r in first) <= 65536  # (sealed full from 64 KiB)
    append(1)
    cap = fq.capacity
    assert cap >= 1.25 * sum(len(r.data) for r in first)
    while not runs:
        append(1)
    # sealed once full, its bytes kept whole; the last item began a tail as large
    assert fq.capacity == cap and fq.tail_count == 1 and len(runs) == 1
    assert cap - 200 < len(runs[0].data) <= cap
    append(500)
    round_bytes = sum(len(r.data) for r in take())
    append(1)
    assert fq.capacity >= round_bytes  # the whole round's length: a round as long fits one tail
    round_messages = sum(r.count for r in taken[len(first) :])
    append(round_messages - 1)
    assert not runs and fq.capacity >= len(fq.tail)
    take()
    got = [(m.topic, m.qos, m.payload) for r in taken for m, _g, _l in decode_items(r.data)]
    assert got == sent and fq.queued == len(sent) == sum(r.count for r in taken)
    assert fq.queued_bytes == sum(len(r.data) for r in taken)


def test_a_tail_takes_a_free_spare_of_at_least_half_its_size_and_is_sealed_once_it_is_full() -> None:
    # the runs grew: a free spare smaller than the next tail's size (but at least half of it, and
    # 64 KiB or more) is written again rather than freed for a fresh allocation; when it is full it
    # is sealed and the round goes on in another tail
    feed = _Feed()
    runs, fq, sent, append = feed.runs, feed.fq, feed.sent, feed.append
    taken = []

    def take() -> int:
        fq.seal()
        got = [(m.topic, m.qos, m.payload) for r in runs for m, _g, _l in decode_items(r.data)]
        taken.extend(got)
        parts = len(runs)
        runs.clear()  # (the link dropped the batch: its runs' bytes are free spares)
        return parts

    append(1000)
    take()
    append(1200)  # a tail allocated at the runs' size, filled to ~4/5: kept as a spare
    spare = fq.capacity
    assert take() == 1
    append(1)  # the next tail is asked for a quarter more than that run: the spare is taken
    assert fq.capacity == spare
    append(2000 - 1)
    assert take() >= 2  # (sealed when full, the round went on in another tail)
    assert taken == [(t, q, p) for t, q, p in sent] and fq.queued == len(sent)


def test_a_large_run_that_fills_half_its_tail_keeps_its_bytes_for_a_later_tail() -> None:
    # a round shorter than the recent ones (a batch taken at an ack) fills only part of its tail:
    # from 64 KiB on, a run that fills at least half keeps its allocation whole, and a later tail
    # writes it again once nothing holds it, rather than a fresh allocation
    feed = _Feed()
    runs, fq, sent, append = feed.runs, feed.fq, feed.sent, feed.append
    taken = []

    def take() -> None:
        fq.seal()
        taken.extend((m.topic, m.qos, m.payload) for r in runs for m, _g, _l in decode_items(r.data))
        runs.clear()  # (the link dropped the batch once acknowledged)

    append(2000)  # the recent runs' size (~210 KB)
    take()
    append(1)
    cap = fq.capacity
    append(1500 - 1)  # ~60 % of the tail
    assert cap // 2 <= len(fq.tail) < cap - cap // 4
    take()
    append(1)  # asked for less than before (the runs' size went down by an eighth): the spare fits
    assert fq.capacity == cap
    append(1000)
    take()
    assert taken == sent and fq.queued == len(sent)


def test_a_sealed_run_is_kept_in_an_empty_slot_before_one_whose_spare_is_free() -> None:
    # keeping a sealed run's bytes must not free a spare that nothing holds while an empty slot is
    # there: that spare is what the next tail is written into while the run is in flight
    import tracemalloc

    runs: deque = deque()
    fq = ForwardQueue(runs, 1 << 20, 1 << 30, 1 << 20, 1 << 30)

    def fill(n: int = 2000) -> None:
        for i in range(n):
            fq.append(f"t/{i % 5}", "pub", 0, i.to_bytes(4, "big") * 16)

    def take():
        fq.seal()
        got = list(runs)
        runs.clear()
        return got[-1]

    fill()
    take()  # (sets the runs' size; sealed in parts of 64 KiB, none kept)
    fill()
    run1 = take()  # kept in a slot, held (in flight)
    fill()
    run2 = take()  # kept in the next slot, held
    before = fq.allocations
    fill()  # both spares held: a new allocation
    assert fq.allocations == before + 1
    del run1  # acknowledged: its bytes are a free spare in the first slot
    run3 = take()  # kept in an empty slot: run1's bytes stay
    before = fq.allocations
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        fill()  # run2 and run3 in flight: written into run1's bytes
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    run4 = take()
    assert fq.allocations == before and peak < len(run4.data) // 4
    assert run2.count == run3.count == run4.count == 2000


def test_a_rounds_short_last_run_keeps_its_allocation_so_the_next_rounds_tails_allocate_nothing() -> None:
    # a fan-in batch: a run sealed at run_messages and the few messages after it; the short run's
    # bytes (from 64 KiB of allocation) are kept whole while a spare's slot is free, so the next
    # rounds write into the two allocations again (shortened, the short run's tail was a fresh
    # allocation each round)
    runs: deque = deque()
    fq = ForwardQueue(runs, 1 << 20, 1 << 30, 2048, 1 << 30)
    sent = []
    taken = []

    def round_(n: int = 2048 + 100) -> list:
        for _ in range(n):
            i = len(sent)
            sent.append((f"t/{i % 5}", i % 2, i.to_bytes(4, "big") * 16))
            fq.append(sent[-1][0], "pub", sent[-1][1], sent[-1][2])
        fq.seal()
        got = list(runs)
        runs.clear()
        taken.extend((m.topic, m.qos, m.payload) for r in got for m, _g, _l in decode_items(r.data))
        return got

    held = round_()
    for _ in range(3):
        held = round_()  # (the runs' size settles)
    before = fq.allocations
    for _ in range(10):
        in_flight = round_()  # the previous round's batch acknowledged now, this one in flight
        assert [r.count for r in in_flight] == [2048, 100]
        held = in_flight
    assert fq.allocations == before
    assert held and taken == sent and fq.queued == len(sent)


def test_three_batches_of_two_runs_in_flight_and_one_filling_allocate_nothing() -> None:
    # fan-in batches of two runs each, three held (unacknowledged) while the next round fills: the
    # spares (8) cover them all once the runs' size settled (with 4, a tail every round or so)
    runs: deque = deque()
    fq = ForwardQueue(runs, 1 << 20, 1 << 30, 2048, 1 << 30)
    in_flight: deque = deque()

    def round_() -> None:
        for i in range(2048 + 100):
            fq.append(f"t/{i % 5}", "pub", 0, i.to_bytes(4, "big") * 16)
        fq.seal()
        in_flight.append(list(runs))
        runs.clear()
        if len(in_flight) > 3:
            in_flight.popleft()  # the oldest batch acknowledged

    for _ in range(8):
        round_()
    before = fq.allocations
    for _ in range(12):
        round_()
    assert fq.allocations == before
    assert all([r.count for r in batch] == [2048, 100] for batch in in_flight)


def _busy_queue_with_spares() -> ForwardQueue:
    """A queue whose link sent large runs and dropped them (acknowledged): it keeps their bytes as
    spares for its next tails."""
    runs: deque = deque()
    fq = ForwardQueue(runs, 1 << 20, 1 << 30, 1 << 20, 1 << 30)
    payload = b"p" * 100
    for _ in range(3):
        for i in range(3000):
            fq.append(f"t/{i % 5}", "pub", 0, payload)
        fq.seal()
        runs.clear()
    return fq


def test_an_idle_links_spares_are_freed_at_the_second_look_and_a_busy_ones_kept() -> None:
    from fluxmq._core import forward

    idle, busy = _busy_queue_with_spares(), _busy_queue_with_spares()
    held = idle.spare_bytes()
    assert held > 300_000 and busy.spare_bytes() == held
    forward.release_unused()  # (both used their spares since the last look: in use)
    assert idle.spare_bytes() == held and busy.spare_bytes() == held
    for i in range(3000):  # the busy link sends again meanwhile: it takes a spare and keeps one
        busy.append(f"t/{i % 5}", "pub", 0, b"p" * 100)
    busy.seal()
    busy.runs.clear()
    busy_held = busy.spare_bytes()
    assert forward.release_unused() >= held
    assert idle.spare_bytes() == 0  # idle between two looks: nothing kept
    assert busy.spare_bytes() == busy_held > 0
    made = idle.allocations
    idle.append("t/1", "pub", 0, b"p" * 100)  # a later tail is allocated afresh, and works
    assert idle.allocations == made + 1 and idle.tail_count == 1


def test_a_spare_still_held_by_a_queued_run_keeps_its_bytes_when_released() -> None:
    from fluxmq._core import forward

    runs: deque = deque()
    fq = ForwardQueue(runs, 1 << 20, 1 << 30, 1 << 20, 1 << 30)
    for i in range(3000):
        fq.append(f"t/{i % 5}", "pub", 0, i.to_bytes(4, "big") * 25)
    fq.seal()
    queued = list(runs)  # still queued (not sent yet): the queue's spares are these runs' bytes
    kept = [bytes(r.data) for r in queued]
    assert fq.spare_bytes() > 0
    forward.release_unused()
    forward.release_unused()
    assert fq.spare_bytes() == 0
    assert [r.data for r in queued] == kept
    assert [m.payload for r in queued for m, _g, _l in decode_items(r.data)] == [
        i.to_bytes(4, "big") * 25 for i in range(3000)
    ]


def test_take_seals_the_tail_bounds_a_batch_by_messages_and_bytes_and_keeps_the_counters_exact() -> None:
    # PeerLink's take in C: the tail sealed first, entries from the front while fewer than
    # max_messages messages and (past the first entry) fewer than max_bytes bytes; a relay's run
    # counts its messages and bytes, an Outgoing one message and its blob's bytes
    runs: deque = deque()
    fq = ForwardQueue(runs, 1000, 1 << 20, 3, 1 << 20)

    def enqueue(payload: bytes) -> Outgoing:  # as PeerLink.enqueue
        entry = Outgoing(encode_message(Message("u", payload)), (), True, None)
        fq.seal()
        runs.append(entry)
        fq.queued += 1
        fq.queued_bytes += len(entry.blob)
        return entry

    def remaining() -> tuple[int, int]:
        n = sum(e.count if type(e) is ForwardRun else 1 for e in runs) + fq.tail_count
        size = sum(len(e.data) if type(e) is ForwardRun else len(e.blob) for e in runs) + len(fq.tail)
        return n, size

    assert fq.take(10, 1 << 20) == ([], 0)
    for i in range(4):  # a run of 3 sealed at run_messages, 1 in the tail
        fq.append("t", "p", 0, bytes([i]))
    big = enqueue(b"B" * 5000)  # seals the tail (a run of 1) before it
    for i in range(5):  # a run of 3, 2 in the tail
        fq.append("t", "p", 0, bytes([10 + i]))
    assert (fq.queued, fq.queued_bytes) == remaining() == (10, fq.queued_bytes)

    entries, n = fq.take(4, 1 << 20)  # the run of 3, then the run of 1: 4 messages
    assert [e.count for e in entries] == [3, 1] and n == 4
    assert (fq.queued, fq.queued_bytes) == remaining()

    entries, n = fq.take(100, 10)  # past the bytes bound at once: the first entry alone
    assert entries == [big] and n == 1
    assert (fq.queued, fq.queued_bytes) == remaining()

    entries, n = fq.take(100, 1 << 20)  # the rest, the tail sealed into a run first
    assert [e.count for e in entries] == [3, 2] and n == 5 and fq.tail_count == 0
    assert [m.payload for m, _g, _l in decode_items(b"".join(e.data for e in entries))] == [
        bytes([10 + i]) for i in range(5)
    ]
    assert (fq.queued, fq.queued_bytes) == (0, 0) == remaining()
    assert fq.take(100, 1 << 20) == ([], 0) and not runs


def test_append_bytes_refuses_none_for_the_topic_or_the_payload() -> None:
    """None where bytes are read raises TypeError (a crash in C before: ASan run, session 18)."""
    fq = ForwardQueue(deque(), 100, 1 << 30, 100, 1 << 30)
    with pytest.raises(TypeError):
        fq.append_bytes(None, "o", 0, b"p")
    with pytest.raises(TypeError):
        fq.append_bytes(b"t", "o", 0, None)
    fq.append_bytes(b"t", "o", 1, b"p")
    assert bytes(fq.tail) == python_items(Message("t", b"p", 1, False, None, None, "o"))
