"""``fluxmq._core.outbuf.out_resize``, the growth of a connection's output buffer for an append (used
by ``encoder.append_publish``, ``publish_frame.append_publish_frame`` and the relay's copies): a
small buffer doubles, so a send's worth of PUBLISHes costs a few reallocs instead of one per message;
a large one grows as CPython grows it; the bytes are those of plain appends in every case."""

from __future__ import annotations

import pytest

from fluxmq._core import outbuf
from fluxmq._core import publish_frame as pf
from fluxmq._core.encoder import append_publish

FRAME = pf.frame(b"bench/topic/1", b"x" * 64, 0, 0, 4)  # 81 bytes, a fan-out's QoS 0 message


def _fill(out: bytearray, count: int) -> list[int]:
    """Append ``count`` FRAMEs; the allocation after each."""
    allocs = []
    for _ in range(count):
        append_publish(out, FRAME, 0, False)
        allocs.append(out.__alloc__())
    return allocs


def test_a_send_worth_of_messages_into_an_empty_buffer_takes_a_few_reallocs() -> None:
    out = bytearray()
    allocs = _fill(out, 70)
    assert bytes(out) == FRAME * 70
    # doubling: 162, 324, 648, ... 10,368 (CPython's own growth: 23 allocations for the same appends)
    assert len(set(allocs)) <= 7
    assert allocs[-1] <= 2 * len(out)


def test_the_next_appends_keep_the_doubled_allocation() -> None:
    """CPython shrinks a buffer asked for less than half its allocation: the doubled size must not
    be undone by the next append through ``PyByteArray_Resize`` (``out += ...``)."""
    out = bytearray()
    _fill(out, 3)
    alloc = out.__alloc__()
    out += b"\xd0\x00"
    assert out.__alloc__() == alloc
    assert bytes(out) == FRAME * 3 + b"\xd0\x00"


def test_a_large_buffer_grows_as_cpython_grows_it() -> None:
    """Past 256 KiB (a reader's backlog) no doubling: at most CPython's 1/8 over what is held."""
    out = bytearray(b"q" * 270_000)
    allocs = _fill(out, 500)
    assert bytes(out) == b"q" * 270_000 + FRAME * 500
    assert max(a / (270_000 + 81 * (i + 1)) for i, a in enumerate(allocs)) < 1.2


def test_a_fan_in_batch_into_one_output_takes_a_few_reallocs() -> None:
    """A receiving worker appends a whole batch (~1,650 messages, ~130 KB) to one subscriber's
    output: it still doubles there (CPython's growth: ~40 reallocs, each copying the buffer)."""
    out = bytearray()
    allocs = _fill(out, 1_650)
    assert bytes(out) == FRAME * 1_650
    assert len(set(allocs)) <= 12


def test_an_exported_buffer_refuses_the_append_and_keeps_its_bytes() -> None:
    """While a memoryview holds the buffer (a send in progress) no resize, as PyByteArray_Resize
    says, even when the allocation has room (the path that only moves the size)."""
    out = bytearray()
    _fill(out, 5)
    assert out.__alloc__() > len(out) + len(FRAME)  # (and its trailing NUL)
    with memoryview(out):
        with pytest.raises(BufferError):
            append_publish(out, FRAME, 0, False)
    assert bytes(out) == FRAME * 5
    append_publish(out, FRAME, 0, False)
    assert bytes(out) == FRAME * 6


def test_a_buffer_with_a_sent_prefix_appends_after_what_is_left() -> None:
    """After a partial send (``del out[:n]``: the logical start moved) the append is CPython's."""
    out = bytearray()
    _fill(out, 10)
    del out[:100]
    append_publish(out, FRAME, 0, False)
    assert bytes(out) == (FRAME * 10)[100:] + FRAME
    out.clear()
    _fill(out, 2)
    assert bytes(out) == FRAME * 2


# The process's spare output allocations (``outbuf.keep`` is what the send that empties an output
# calls, ``_hub_read._clear``; the adoption is inside ``out_resize``).


@pytest.fixture
def no_spare():
    outbuf.release()
    yield
    outbuf.release()


def test_an_emptied_large_output_hands_its_allocation_to_the_next_large_one(no_spare) -> None:
    """A fan-in's send (~190 KB): the emptied output keeps no allocation; the next output that
    grows past 32 KiB takes it (no fresh allocation), with the bytes it held copied over."""
    first = bytearray()
    _fill(first, 2_300)
    alloc = first.__alloc__()
    assert alloc >= 128 * 1024  # (an mmapped chunk in glibc: the case this is for)
    assert outbuf.keep(first)
    assert first.__alloc__() == 0 and first == b""
    assert outbuf.spare_size() == alloc
    kept, adopted = outbuf.spare_counts()
    second = bytearray()
    allocs = _fill(second, 2_300)
    assert bytes(second) == FRAME * 2_300
    assert outbuf.spare_size() == 0
    assert outbuf.spare_counts() == (kept, adopted + 1)
    assert second.__alloc__() == alloc  # taken when it grew past 32 KiB, and enough for the rest
    assert max(a for a in allocs if a < alloc) < 128 * 1024  # below that, heap blocks as before
    # the emptied output appends as a new one
    _fill(first, 3)
    assert bytes(first) == FRAME * 3


def _large(count: int = 2_300) -> bytearray:
    """An output of ``count`` FRAMEs (2,300: a fan-in subscriber's ~190 KB send)."""
    out = bytearray()
    _fill(out, count)
    return out


def test_several_emptied_outputs_each_take_a_spare(no_spare) -> None:
    """Several busy subscribers on one worker: all four outputs are sent before the next read
    fills them; each gives its block to the spares and each takes one back (with one spare per
    process, three of the four grew afresh every send: ~10 page faults per 1,000 deliveries)."""
    sent = [_large() for _ in range(4)]
    allocs = sorted(out.__alloc__() for out in sent)
    assert all(outbuf.keep(out) for out in sent)
    assert all(out.__alloc__() == 0 for out in sent)
    assert outbuf.spare_allocs() == allocs and outbuf.spare_size() == sum(allocs)
    kept, adopted = outbuf.spare_counts()
    refilled = [_large() for _ in range(4)]
    assert outbuf.spare_counts() == (kept, adopted + 4)
    assert sorted(out.__alloc__() for out in refilled) == allocs  # no fresh allocation
    assert outbuf.spare_size() == 0
    assert all(bytes(out) == FRAME * 2_300 for out in refilled)


def test_an_output_takes_the_smallest_spare_that_holds_it(no_spare) -> None:
    """A spare too small for the output that grows past it is traded for a larger one, and goes
    back to the spares (another output may fit in it) rather than to the C library."""
    small, big = _large(1_000), _large(5_000)
    small_alloc, big_alloc = small.__alloc__(), big.__alloc__()
    assert 64 * 1024 <= small_alloc < 128 * 1024 < 2 * small_alloc < big_alloc
    assert outbuf.keep(big) and outbuf.keep(small)
    out = _large(600)  # grew past 32 KiB: the smaller spare
    assert out.__alloc__() == small_alloc and outbuf.spare_allocs() == [big_alloc]
    _fill(out, 1_400)  # past it: the larger one, the smaller back among the spares
    assert out.__alloc__() == big_alloc and outbuf.spare_allocs() == [small_alloc]
    assert bytes(out) == FRAME * 2_000


def test_the_spares_are_bounded_in_number_and_bytes(no_spare) -> None:
    """At most sixteen spares and 4 MiB in all; once full, only a larger block replaces the
    smallest (which is freed); an output over 1 MiB, under 64 KiB or exported is not taken (it is
    emptied by CPython as before)."""
    outs = [bytearray(b"q" * 100_000) for _ in range(18)]  # (made whole: they take no spare)
    larger = bytearray(b"q" * 700_000)
    taken = [outbuf.keep(out) for out in outs]
    assert taken == [True] * 16 + [False] * 2  # equal blocks: the 17th and 18th replace none
    assert all(len(out) == 100_000 for out in outs[16:])
    assert outbuf.spare_allocs() == [100_001] * 16 and outbuf.spare_size() == 1_600_016
    assert outbuf.keep(larger)  # replaces the smallest, which is freed
    assert outbuf.spare_allocs() == [100_001] * 15 + [700_001]
    outbuf.release()
    mib = [bytearray(b"q" * 1_000_000) for _ in range(6)]  # ~1 MiB blocks: the bytes bound
    assert [outbuf.keep(out) for out in mib] == [True] * 4 + [False] * 2
    assert outbuf.spare_size() <= 4 * 1024 * 1024
    outbuf.release()
    huge = bytearray(b"q" * 2_000_000)
    assert not outbuf.keep(huge) and len(huge) == 2_000_000
    tiny = bytearray()
    _fill(tiny, 10)
    assert not outbuf.keep(tiny)
    other = _large(5_000)
    with memoryview(other):
        assert not outbuf.keep(other)
    assert bytes(other) == FRAME * 5_000 and outbuf.spare_size() == 0


def test_spares_no_output_used_are_released(no_spare) -> None:
    """``release_unused`` (the node's heap trim, every few seconds) frees the spares when no output
    gave or took one since its previous call: a worker whose busy subscribers went quiet holds no
    spare for long."""
    outbuf.release_unused()
    assert outbuf.keep(_large())
    assert outbuf.release_unused() == 0  # used since the last look
    held = outbuf.spare_size()
    assert held > 0
    assert outbuf.release_unused() == held  # unused since: freed
    assert outbuf.spare_size() == 0 and outbuf.spare_allocs() == []
    assert outbuf.keep(_large()) and outbuf.release_unused() == 0


def test_an_output_with_a_sent_prefix_takes_the_spare_with_what_is_left(no_spare) -> None:
    """A partial send moved the logical start: the adoption copies from there."""
    donor = bytearray()
    _fill(donor, 2_300)
    assert outbuf.keep(donor)
    out = bytearray()
    _fill(out, 300)
    del out[:1_000]
    _fill(out, 2_000)
    assert outbuf.spare_size() == 0
    assert bytes(out) == (FRAME * 300)[1_000:] + FRAME * 2_000


def test_an_output_whose_sent_prefix_hides_a_larger_block_frees_it(no_spare) -> None:
    """A partial send left the logical start 20,000 bytes in a 324 KiB block: growing past the
    block's end takes a smaller spare (it holds the rest), and the larger block is freed rather
    than kept in the smaller one's place (the spares' bytes never grow by an adoption)."""
    out = _large()
    whole = bytes(out)
    block = out.__alloc__()
    del out[:20_000]
    assert out.__alloc__() == block  # (CPython keeps the block: more than half of it still held)
    assert outbuf.keep(bytearray(b"q" * 320_000))
    _fill(out, 1_800)  # 312,100 bytes: past the block's end (311,775 from the start), within the spare
    assert out.__alloc__() == 320_001 < block
    assert outbuf.spare_allocs() == []
    assert bytes(out) == whole[20_000:] + FRAME * 1_800


def test_an_exported_output_does_not_take_the_spare(no_spare) -> None:
    donor = bytearray()
    _fill(donor, 2_300)
    assert outbuf.keep(donor)
    out = bytearray()
    _fill(out, 500)
    with memoryview(out):
        with pytest.raises(BufferError):
            _fill(out, 1_000)
    assert outbuf.spare_size() > 0
    assert bytes(out) == FRAME * 500
