"""``FrameBuffers``: a large received frame's ``bytes``, written in place through a view and written
again for a later frame only once nothing else holds it."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from fluxmq._core.framebuf import FrameBuffers

N = 230_000  # a fan-in batch between workers


def fill(frames: FrameBuffers, n: int, byte: int, data: bytes | None = None) -> bytes:
    frame, view = frames.take(n)
    try:
        view[:] = bytes([byte]) * n if data is None else data
    finally:
        view.release()
    return frame


def test_a_frame_is_a_bytes_of_its_length_written_through_its_view() -> None:
    frames = FrameBuffers()
    frame, view = frames.take(5)
    view[:] = b"hello"
    view.release()
    assert type(frame) is bytes and frame == b"hello" and len(frame) == 5
    assert frame + b"!" == b"hello!" and hash(frame) == hash(b"hello")
    assert frames.allocated == 1 and frames.reused == 0


def test_a_dropped_frames_allocation_is_written_again_and_allocates_nothing() -> None:
    frames = FrameBuffers()
    first = fill(frames, N, 1)
    ident = id(first)
    hash(first)  # a hash cached on the object must not survive its reuse
    del first
    gc.collect()
    data = b"\x02" * (N - 1000)
    tracemalloc.start()
    try:
        second = fill(frames, N - 1000, 2, data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < N // 4  # (a new frame: its ~230 KB)
    assert id(second) == ident and frames.reused == 1 and frames.allocated == 1
    assert second == b"\x02" * (N - 1000) and hash(second) == hash(b"\x02" * (N - 1000))


@pytest.mark.parametrize("holder", ["bytes", "memoryview", "list"])
def test_a_frame_still_held_is_never_written_again(holder) -> None:
    """Whatever keeps a frame (the frame itself, a memoryview over it, a container) keeps its bytes:
    the later frames go elsewhere and the held one keeps its content."""
    frames = FrameBuffers()
    first = fill(frames, N, 1)
    kept = {"bytes": first, "memoryview": memoryview(first), "list": [first]}[holder]
    del first
    later = [fill(frames, N, b) for b in range(2, 9)]
    held = {"bytes": lambda: kept, "memoryview": lambda: kept.tobytes(), "list": lambda: kept[0]}[holder]()
    assert held == b"\x01" * N
    assert [f[0] for f in later] == list(range(2, 9)) and all(f == bytes([f[0]]) * N for f in later)


def test_allocations_are_kept_for_frames_of_the_same_order_only() -> None:
    frames = FrameBuffers(keep_max=1 << 20)
    fill(frames, N, 1)  # allocated N + N/4, dropped at once
    assert fill(frames, N // 3, 2) and frames.reused == 1  # (at least a quarter of its allocation)
    fill(frames, N // 5, 3)  # too small for it: a new one
    assert frames.reused == 1 and frames.allocated == 2
    fill(frames, N // 5, 4)  # the smaller one fits it better
    assert frames.reused == 2 and sorted(cap for _n, cap, _refs in frames.kept()) == [
        N // 5 + N // 20,
        N + N // 4,
    ]
    fill(frames, 2 << 20, 4)  # over keep_max: not kept
    assert all(cap <= 1 << 20 for _n, cap, _refs in frames.kept())
    assert len(frames.kept()) <= 3
