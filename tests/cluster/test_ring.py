"""The shared-memory ring of a Route stream between workers (``fluxmq.cluster.ring``, carried by
``fluxmq.cluster.unix``): a batch crosses through it (the socket carries its descriptor), a frame
that does not fit at the ring's end wraps to its start, a full ring sends inline with the order
kept, acknowledgements free regions, a re-opened stream sends its retries through a new ring, and a
bad descriptor ends its stream only. Real memfds, real Unix sockets under gevent."""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os

import gevent
import pytest
from gevent import socket

from fluxmq._core.framebuf import FrameBuffers
from fluxmq.cluster import ring as ring_mod
from fluxmq.cluster import unix
from fluxmq.cluster.batch import FramedBatch, build_raw_batch, decode_ack
from fluxmq.cluster.proto import cluster_pb2 as pb
from fluxmq.cluster.ring import DESC, RING_MARK, RecvRing, SendRing
from fluxmq.cluster.unix import read_batch

from .test_unix import linked_transports, messages, relay_runs

pytestmark = pytest.mark.skipif(not ring_mod.supported(), reason="no memfd_create or file seals here")


def place(
    ring: SendRing, seq: int, count: int, payload: bytes = b"p" * 64, plain: bool = False
) -> bytes | None:
    batch = build_raw_batch("w0", 1, seq, relay_runs(count, payload), plain=plain)[0]
    return ring.place(seq, batch.lead, batch.parts)


def pair(size: int) -> tuple[SendRing, RecvRing]:
    sender = SendRing(size)
    return sender, RecvRing(os.dup(sender.fd))


def region(desc: bytes) -> tuple[int, int]:
    _n, mark, at, n = DESC.unpack(desc)
    assert mark == RING_MARK
    return at, n


def test_a_placed_batch_reads_back_from_the_receivers_mapping_as_its_inline_frame() -> None:
    sender, receiver = pair(1 << 20)
    desc = place(sender, 7, 300)
    assert desc is not None and len(desc) == 13
    frame = receiver.take(desc[4:], FrameBuffers())
    got = read_batch(frame)
    assert type(got) is FramedBatch and got.seq == 7 and got.count == 300
    assert [m[1][-4:] for m in messages(got.items, got.items_start)] == [
        i.to_bytes(4, "big") for i in range(300)
    ]
    assert receiver.frames == 1 and sender.ring_frames == 1


def test_a_frame_that_does_not_fit_at_the_end_wraps_to_the_start_and_the_regions_in_use_stay_whole() -> None:
    sender, receiver = pair(64 << 10)
    a = place(sender, 1, 200, b"a" * 100)  # ~24 KB each: two fit, a third only at the start
    b = place(sender, 2, 200, b"b" * 100)
    assert region(a)[0] == 0 and region(b)[0] == region(a)[1]
    assert place(sender, 3, 200, b"c" * 100) is None  # the start is held by batch 1
    sender.acked(1)
    c = place(sender, 4, 200, b"c" * 100)
    assert c is not None and region(c)[0] == 0  # wrapped
    assert place(sender, 5, 200, b"d" * 100) is None  # between c's end and b: no room
    buffers = FrameBuffers()
    for desc, mark in ((b, b"b"), (c, b"c")):
        got = read_batch(receiver.take(desc[4:], buffers))
        assert {m[1][:1] for m in messages(got.items, got.items_start)} == {mark}


def test_acks_free_the_regions_of_every_batch_up_to_theirs_and_an_empty_ring_starts_at_zero() -> None:
    sender, _receiver = pair(1 << 20)
    for seq in (1, 2, 3):
        assert place(sender, seq, 100) is not None
    sender.acked(2)
    assert [r[0] for r in sender.regions] == [3]
    sender.acked(3)
    assert not sender.regions
    assert region(place(sender, 4, 100))[0] == 0


def test_a_frame_goes_to_the_rings_start_whenever_the_oldest_region_leaves_room_there() -> None:
    # the fewer pages a stream cycles through, the fewer page faults (each page faults once per
    # worker) and the warmer they stay: not around the whole ring while one batch is in flight
    sender, _receiver = pair(1 << 20)
    a = place(sender, 1, 200, b"a" * 100)
    b = place(sender, 2, 200, b"b" * 100)
    sender.acked(1)
    c = place(sender, 3, 100, b"c" * 100)  # the end has room too
    assert region(c)[0] == 0 and region(b)[0] == region(a)[1]
    sender.acked(2)
    d = place(sender, 4, 200, b"d" * 100)  # more than the room before c's region: after it
    assert region(d)[0] == region(c)[1]


def test_a_frame_larger_than_the_ring_is_not_placed() -> None:
    sender, _receiver = pair(16 << 10)
    assert place(sender, 1, 1000) is None
    assert sender.inline_frames == 1 and sender.ring_frames == 0 and not sender.regions


@pytest.mark.parametrize("at, n", [(0, 0), ((1 << 20) - 4, 5), (1 << 31, 10), (0, (1 << 20) + 1)])
def test_a_descriptor_outside_the_mapping_raises_eof(at: int, n: int) -> None:
    _sender, receiver = pair(1 << 20)
    with pytest.raises(EOFError):
        receiver.take(DESC.pack(9, RING_MARK, at, n)[4:], FrameBuffers())


def test_an_unsealed_memfd_is_refused() -> None:
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    os.ftruncate(fd, 1 << 20)
    with pytest.raises(EOFError):
        RecvRing(fd)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by RecvRing whatever it decided


# -- on a link between two Unix transports ------------------------------------------------------


def stream(link, count: int, payload: bytes, every: int = 97) -> None:
    fq = link.forward_queue
    with gevent.Timeout(60):
        for i in range(count):
            fq.append("t", "pub", 0, payload + i.to_bytes(4, "big"))
            if i % every == 0:
                gevent.sleep(0)  # several batches
        while link.queued or link.unacked:
            gevent.sleep(0.01)


def recording(delay: float = 0.0):
    """The batches received, and the ``on_batch`` that records and acknowledges each (``delay``
    seconds later: the ring fills while acks are late)."""
    got: list = []

    def on_batch(batch):
        got.append(batch)
        if delay:
            gevent.sleep(delay)
        return pb.BatchAck(seq=batch.seq)

    return got, on_batch


def assert_numbered(got: list, count: int) -> None:
    """``stream``'s ``count`` numbered payloads arrived, each once, in order."""
    payloads = [m[1][-4:] for b in got if b.count for m in messages(b.items, b.items_start)]
    assert payloads == [i.to_bytes(4, "big") for i in range(count)]


def test_a_links_batches_cross_through_its_streams_ring_and_acks_free_every_region(tmp_path) -> None:
    got, on_batch = recording()
    with linked_transports(tmp_path, on_batch) as link:
        stream(link, 3000, b"x" * 32)
        ring = link._call.ring
        assert ring is not None and ring.ring_frames == link.stats.batches - 1  # (the snapshot: protobuf)
        assert ring.inline_frames == 0 and not ring.regions
    framed = [b for b in got if b.count]
    assert framed and all(type(b) is FramedBatch for b in framed)
    assert_numbered(got, 3000)


def test_batches_a_full_ring_cannot_take_go_inline_in_order(tmp_path, monkeypatch) -> None:
    # a ring of 48 KiB and batches of ~20-110 KB, four in flight: some through the ring, some inline
    monkeypatch.setattr(unix, "RING_SIZE", 48 << 10)
    got, on_batch = recording(delay=0.001)  # acks late: the ring fills
    with linked_transports(tmp_path, on_batch, {"batch_max_size": 512}) as link:
        stream(link, 6000, b"y" * 200, every=301)
        ring = link._call.ring
        assert ring.ring_frames > 0 and ring.inline_frames > 0, (ring.ring_frames, ring.inline_frames)
        assert not ring.regions
    assert_numbered(got, 6000)


def test_a_reopened_stream_sends_the_unacknowledged_batches_again_through_a_new_ring(tmp_path) -> None:
    got: list = []
    broke: list = []

    def on_batch(batch):
        if batch.count and not broke:
            broke.append(batch.seq)
            raise RuntimeError("the receiving worker dies")  # the stream ends unacknowledged
        got.append(batch)
        return pb.BatchAck(seq=batch.seq)

    with linked_transports(tmp_path, on_batch) as link:
        first = link._call.ring
        stream(link, 500, b"z" * 16)
        second = link._call.ring
        assert second is not None and second is not first
        assert link.stats.resent >= 1 and second.ring_frames >= 1
        assert first.mm.closed  # the broken stream's ring was let go
    assert broke and broke[0] in [b.seq for b in got if type(b) is FramedBatch]
    assert_numbered(got, 500)


def test_a_stream_whose_ring_cannot_be_made_opens_and_sends_inline(tmp_path, monkeypatch) -> None:
    def no_ring(_size):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(ring_mod, "SendRing", no_ring)
    got, on_batch = recording()
    with linked_transports(tmp_path, on_batch) as link:
        stream(link, 300, b"i" * 16)
        assert link._call.ring is None and link.stats.failures == 0
    assert_numbered(got, 300)


class _Acks:
    """What the Unix server's Route stream needs of a transport: an ack per batch."""

    def __init__(self) -> None:
        self.batches: list = []

    def on_batch(self, batch):
        self.batches.append(batch)
        return pb.BatchAck(seq=batch.seq)


def _stream_with_ring(path: str, ring: SendRing) -> socket.socket:
    """A raw Route stream to ``path`` that offered ``ring``, and had it taken."""
    sock = unix._connect(path, unix.ROUTE_RING, ring.fd)
    ring.close_fd()
    assert unix.read_frame(sock) == unix.RING_TAKEN  # (the stream's first frame)
    return sock


@contextlib.contextmanager
def acking_server(tmp_path):
    """A Unix server of an ``_Acks`` transport, for 30 s at most: (its socket path, the transport)."""
    path = str(tmp_path / "w1.sock")
    transport = _Acks()
    server = unix._unix_server(transport, f"unix:{path}")
    try:
        with gevent.Timeout(30):
            yield path, transport
    finally:
        server.stop(timeout=0)


def test_a_bad_descriptor_frame_ends_its_stream_and_the_server_serves_the_next_one(tmp_path) -> None:
    with acking_server(tmp_path) as (path, transport):
        ring = SendRing(1 << 20)
        bad = _stream_with_ring(path, ring)
        good = place(ring, 1, 10)
        bad.sendall(good)  # a good batch first: applied and acknowledged
        assert decode_ack(unix.FrameReader(bad).read()) == 1  # (a plain ack: its seq)
        bad.sendall(DESC.pack(9, RING_MARK, (1 << 20) - 8, 64))  # past the ring's end
        assert bad.recv(16) == b""  # that stream ended
        bad.close()
        ring2 = SendRing(1 << 20)
        sock = _stream_with_ring(path, ring2)  # the server still serves
        sock.sendall(place(ring2, 2, 10))
        assert decode_ack(unix.FrameReader(sock).read()) == 2  # (a plain ack: its seq)
        sock.close()
        assert [b.seq for b in transport.batches] == [1, 2]


def test_a_plain_batch_through_the_ring_takes_its_streams_sender_and_is_refused_before_it(tmp_path) -> None:
    with acking_server(tmp_path) as (path, transport):
        ring = SendRing(1 << 20)
        early = _stream_with_ring(path, ring)
        early.sendall(place(ring, 1, 10, plain=True))  # the stream's first batch names no sender
        assert early.recv(16) == b""  # that stream ended, the batch unapplied
        early.close()
        ring2 = SendRing(1 << 20)
        sock = _stream_with_ring(path, ring2)  # the server still serves
        reader = unix.FrameReader(sock)
        sock.sendall(place(ring2, 1, 10))  # named: w0, epoch 1
        assert decode_ack(reader.read()) == 1
        sock.sendall(place(ring2, 2, 30, plain=True))
        assert decode_ack(reader.read()) == 2
        sock.close()
        got = [(b.sender, b.epoch, b.seq, b.count, type(b) is FramedBatch) for b in transport.batches]
        assert got == [("w0", 1, 1, 10, True), ("w0", 1, 2, 30, True)]
        assert ring2.ring_frames == 2


def test_a_descriptor_frame_on_a_stream_without_a_ring_ends_it(tmp_path) -> None:
    with acking_server(tmp_path) as (path, transport):
        sock = unix._connect(path, unix.ROUTE)
        sock.sendall(DESC.pack(9, RING_MARK, 0, 64))
        assert sock.recv(16) == b""
        sock.close()
        assert transport.batches == []


def test_a_ring_offered_without_its_descriptor_is_refused_and_the_stream_runs_inline(tmp_path) -> None:
    # (a receiving worker with no descriptor left gets the method byte without the memfd)
    with acking_server(tmp_path) as (path, transport):
        sock = unix._connect(path, unix.ROUTE_RING)
        assert unix.read_frame(sock) == unix.RING_REFUSED
        unix.write_raw_batch(sock, build_raw_batch("w0", 1, 1, relay_runs(10, b"p"))[0])
        assert decode_ack(unix.FrameReader(sock).read()) == 1
        sock.sendall(DESC.pack(9, RING_MARK, 0, 64))  # the stream has no ring
        assert sock.recv(16) == b""
        sock.close()
        assert [b.seq for b in transport.batches] == [1]


def test_the_memfd_a_stream_sends_is_sealed_against_resizing() -> None:
    ring = SendRing(1 << 16)
    try:
        seals = fcntl.fcntl(ring.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        with pytest.raises(PermissionError):
            os.ftruncate(ring.fd, 1 << 12)
        assert len(mmap.mmap(ring.fd, 1 << 16)) == 1 << 16
    finally:
        ring.close()


def test_only_large_frames_take_a_reused_allocation_so_small_batches_never_evict_a_large_one() -> None:
    # a small batch in one of FrameBuffers' slots freed the large allocation kept there: the next
    # fan-in batch was a fresh allocation, faulted in page by page
    sender, receiver = pair(4 << 20)
    buffers = FrameBuffers()
    for seq in range(1, 9):
        count = 2000 if seq % 2 else 20
        frame = receiver.take(place(sender, seq, count)[4:], buffers)
        assert read_batch(frame).count == count
        del frame
        sender.acked(seq)
    assert buffers.allocated == 1 and buffers.reused == 3


def test_a_ring_the_receiver_cannot_map_leaves_its_stream_inline_and_the_link_up(
    tmp_path, monkeypatch
) -> None:
    # a ring over the receiver's MAX_RING (as one it cannot map: no memory, no address space, a
    # descriptor it did not get) was refused by closing the stream, and the re-opened stream offered
    # the same: the link never came up. The receiver answers the offer; a refused ring goes.
    monkeypatch.setattr(unix, "RING_SIZE", ring_mod.MAX_RING * 2)
    got, on_batch = recording()
    with linked_transports(tmp_path, on_batch) as link:
        stream(link, 300, b"r" * 16)
        assert link._call.ring is None and link.stats.failures == 0
    assert_numbered(got, 300)
