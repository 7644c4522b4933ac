"""The Unix-socket transport between workers (``fluxmq.cluster.unix``): a ``RawBatch`` is written as
one frame whose items travel as they are, and read back as a ``FramedBatch`` whose items are the
received frame from ``items_start`` on; a serialized ``pb.Batch`` frame still reads as one. Real
Unix socket pairs under gevent."""

from __future__ import annotations

import contextlib
from collections import deque

import gevent
import pytest
from gevent import socket

from fluxmq._core.forward import ForwardQueue
from fluxmq.broker.message import Message
from fluxmq.cluster.batch import FramedBatch, Outgoing, build_batch, build_raw_batch, decode_items
from fluxmq.cluster.proto import cluster_pb2 as pb
from fluxmq.cluster.unix import (
    LARGE_FRAME,
    MAX_PARTS,
    ROUTE,
    SEND_BUFFER,
    FrameReader,
    UnixChannel,
    _connect,
    read_batch,
    write_frame,
    write_raw_batch,
)
from fluxmq.storage.records import encode_message


def relay_runs(count: int, payload: bytes = b"p" * 64, run: int = 100) -> list:
    """``count`` plain messages appended by the relay's C path, sealed into runs of ``run``."""
    runs: deque = deque()
    fq = ForwardQueue(runs, 1 << 30, 1 << 40, run, 1 << 40)
    for i in range(count):
        fq.append(f"in/{i % 7}", "pub", i % 2, payload + i.to_bytes(4, "big"))
    fq.seal()
    return list(runs)


def messages(data: bytes, start: int = 0) -> list[tuple]:
    return [(m.topic, m.payload, m.qos, m.origin, g, ml) for m, g, ml in decode_items(data[start:], now=0.0)]


def transfer(write, frames: int = 1) -> list[bytes]:
    """What ``write(sock)`` sent through a Unix socket pair, read back frame by frame (concurrently:
    a frame may be larger than the socket's buffer)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader = FrameReader(b)
    try:
        got = gevent.spawn(lambda: [reader.read() for _ in range(frames)])
        write(a)
        return got.get(timeout=30)
    finally:
        a.close()
        b.close()


def test_raw_batch_round_trip_keeps_head_items_and_order() -> None:
    entries = [
        *relay_runs(250),
        Outgoing(encode_message(Message("g/1", b"shared", 1)), ("$share/g/g/#",), False, None),
        Outgoing(encode_message(Message("e/1", b"exp", 0, expires_at=1000.0)), (), True, 1000.0),
        *relay_runs(3),
    ]
    interest = [("a/#", True), ("b", False)]
    raw, expired = build_raw_batch("w1", 7, 42, entries, interest, now=990.0)
    ref, ref_expired = build_batch("w1", 7, 42, entries, interest, now=990.0)
    assert expired == ref_expired == 0
    [frame] = transfer(lambda sock: write_raw_batch(sock, raw))
    got = read_batch(frame)
    assert type(got) is FramedBatch
    assert (got.sender, got.epoch, got.seq, got.snapshot, got.count) == ("w1", 7, 42, False, ref.count)
    assert [(c.filter, c.added) for c in got.interest] == [("a/#", True), ("b", False)]
    assert got.items is frame  # not copied out of the frame
    assert frame[got.items_start :] == ref.items  # byte for byte what the protobuf path carries
    assert messages(got.items, got.items_start) == messages(ref.items)


def test_a_raw_batch_larger_than_the_socket_buffer_and_many_parts_arrive_whole() -> None:
    big = relay_runs(3000, payload=b"x" * 1000)  # ~3 MB: sendmsg writes part of it
    many = [Outgoing(encode_message(Message(f"t/{i}", b"y", 0)), (), True, None) for i in range(MAX_PARTS)]
    batches = [build_raw_batch("w0", 1, 1, big)[0], build_raw_batch("w0", 1, 2, many)[0]]

    def write(sock) -> None:
        for batch in batches:
            write_raw_batch(sock, batch)

    frames = transfer(write, frames=2)
    for batch, frame in zip(batches, frames, strict=True):
        got = read_batch(frame)
        assert got.seq == batch.seq and frame[got.items_start :] == b"".join(batch.parts)
    assert len(messages(frames[0], read_batch(frames[0]).items_start)) == 3000
    assert [m[0] for m in messages(frames[1], read_batch(frames[1]).items_start)] == [
        f"t/{i}" for i in range(MAX_PARTS)
    ]


def test_frames_and_batches_go_through_the_socket_under_gevents_without_its_wrappers(monkeypatch) -> None:
    # a link's reads (after its wait for the socket to be readable), its batches' sendmsg and the
    # acks' send call the non-blocking socket under gevent's, a Python frame less each: gevent's
    # own methods are used only to wait, after EAGAIN
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader = FrameReader(b)
    batch = build_raw_batch("w0", 1, 7, relay_runs(300))[0]

    def wrapper(*_args, **_kw):
        raise AssertionError("gevent's wrapper called with room in the socket")

    try:
        for name in ("recv_into", "send", "sendmsg"):
            monkeypatch.setattr(type(a), name, wrapper)
        got = gevent.spawn(lambda: [reader.read() for _ in range(3)])
        gevent.sleep(0.01)  # (the reader waits for the socket to be readable)
        write_frame(a, b"ack")
        write_raw_batch(a, batch)
        write_frame(a, b"ack2")
        frames = got.get(timeout=10)
    finally:
        monkeypatch.undo()
        a.close()
        b.close()
    assert frames[0] == b"ack" and frames[2] == b"ack2"
    assert read_batch(frames[1]).seq == 7 and frames[1][read_batch(frames[1]).items_start :] == b"".join(
        batch.parts
    )


def test_a_frame_whose_rest_is_late_is_read_once_it_arrives() -> None:
    # the read on the socket under gevent's meets EAGAIN in the middle of a frame: it waits for the
    # rest and goes on (nothing lost, nothing read twice)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader = FrameReader(b)
    try:
        got = gevent.spawn(lambda: [reader.read() for _ in range(2)])
        frame = (5000).to_bytes(4, "big") + bytes(range(250)) * 20
        a.sendall(frame[:3])  # (not even the whole length)
        gevent.sleep(0.02)
        a.sendall(frame[3:2000])
        gevent.sleep(0.02)
        a.sendall(frame[2000:] + (2).to_bytes(4, "big") + b"ok")
        assert got.get(timeout=10) == [frame[4:], b"ok"]
    finally:
        a.close()
        b.close()


class CountedSends:
    """A socket whose ``sendmsg`` calls are counted."""

    def __init__(self, sock) -> None:
        self.sock = sock
        self.sends: list[int] = []

    def sendmsg(self, parts):
        sent = self.sock.sendmsg(parts)
        self.sends.append(sent)
        return sent


def test_a_links_socket_takes_a_fan_in_batch_in_one_send_while_the_peer_is_not_reading(tmp_path) -> None:
    # ~1,500 messages of 64 bytes: a fan-in batch between workers, more than the default send buffer
    # (208 KiB) holds; with it, the first sendmsg took part of it and the next one failed with EAGAIN
    with open("/proc/sys/net/core/wmem_max") as fh:
        if int(fh.read()) < 1 << 20:
            pytest.skip("net.core.wmem_max below 1 MiB: the kernel caps the send buffer under a batch")
    batch = build_raw_batch("w0", 1, 1, relay_runs(2500, run=2500))[0]
    assert batch.size > 256 << 10
    path = str(tmp_path / "s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    sock = _connect(path, ROUTE)
    peer, _ = listener.accept()
    try:
        counted = CountedSends(sock)
        with gevent.Timeout(10):  # (without the buffer: the write waits for a reader)
            write_raw_batch(counted, batch)
        assert len(counted.sends) == 1
        assert peer.recv(1) == ROUTE
        got = read_batch(FrameReader(peer).read())
        assert got.seq == 1 and got.items[got.items_start :] == b"".join(batch.parts)
    finally:
        for s in (sock, peer, listener):
            s.close()


class CountedRecvs:
    """A socket whose ``recv_into`` calls are counted (and the bytes each returned)."""

    def __init__(self, sock) -> None:
        self.sock = sock
        self.recvs: list[int] = []

    def recv_into(self, buf):
        got = self.sock.recv_into(buf)
        self.recvs.append(got)
        return got


def fan_in_batches(count: int, messages: int = 1900) -> list:
    """``count`` raw batches of a fan-in between workers (~230 KB each), each with its own payloads."""
    return [
        build_raw_batch("w0", 1, seq, relay_runs(messages, payload=bytes([seq]) * 64, run=messages))[0]
        for seq in range(1, count + 1)
    ]


def big_send_buffer(sock) -> None:
    with open("/proc/sys/net/core/wmem_max") as fh:
        if int(fh.read()) < 1 << 21:
            pytest.skip("net.core.wmem_max below 2 MiB: the batches do not fit the socket's buffer")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)


def test_a_fan_in_batch_is_received_into_its_own_bytes_in_two_reads_and_its_allocation_reused() -> None:
    """A ~230 KB batch frame is received straight into the ``bytes`` handed to the consumer: one read
    brings its head and the first 64 KiB, one more the rest (before: a read per 64 KiB, then a copy
    of the frame into a fresh ``bytes``); once the consumer dropped it, the next batch is received
    into the same allocation."""
    batches = fan_in_batches(4)
    assert all(b.size > 3 * LARGE_FRAME for b in batches)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        big_send_buffer(a)
        for batch in batches:
            write_raw_batch(a, batch)  # all of them wait in the socket (as a burst of batches)
        counted = CountedRecvs(b)
        reader = FrameReader(counted)
        idents = []
        with gevent.Timeout(10):
            for batch in batches:
                got = read_batch(reader.read())
                assert got.seq == batch.seq and got.items[got.items_start :] == b"".join(batch.parts)
                idents.append(id(got.items))
                del got  # (applied: the consumer holds it no more)
    finally:
        a.close()
        b.close()
    assert len(counted.recvs) <= 2 * len(batches)  # (before: 4 per batch)
    assert reader.frames.reused == len(batches) - 1 and reader.frames.allocated == 1
    assert len(set(idents)) == 1


def test_batches_still_held_by_their_consumer_keep_their_bytes_while_later_ones_arrive() -> None:
    """A consumer that keeps what it read (a batch object, its items, a memoryview over them) keeps
    valid bytes: a later batch is never received into an allocation still referenced."""
    batches = fan_in_batches(8)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        big_send_buffer(a)
        reader = FrameReader(b)
        writer = gevent.spawn(lambda: [write_raw_batch(a, batch) for batch in batches])
        held: list = []
        with gevent.Timeout(10):
            for i in range(len(batches)):
                got = read_batch(reader.read())
                held.append(got if i % 3 == 0 else memoryview(got.items) if i % 3 == 1 else got.items)
                del got
            writer.get()
    finally:
        a.close()
        b.close()
    for i, (batch, kept) in enumerate(zip(batches, held, strict=True)):
        items = kept.items[kept.items_start :] if i % 3 == 0 else bytes(kept)[-batch.size :]
        assert items == b"".join(batch.parts), i
        assert {m[1][0] for m in messages(items)} == {batch.seq}


def test_a_protobuf_batch_frame_still_reads_as_a_batch() -> None:
    ref = build_batch("w1", 1, 3, relay_runs(5), [("x/#", True)], snapshot=True)[0]
    [frame] = transfer(lambda sock: write_frame(sock, ref.SerializeToString()))
    got = read_batch(frame)
    assert type(got) is pb.Batch and got == ref


@pytest.mark.parametrize("frame", [b"\x00\x00\x00", b"\x00\x00\x00\x00\x09abc"])
def test_a_damaged_raw_frame_ends_the_stream(frame: bytes) -> None:
    with pytest.raises(EOFError):
        read_batch(frame)


def test_links_on_a_unix_channel_send_raw_batches() -> None:
    assert UnixChannel("unix:/nowhere").raw_batches is True


@contextlib.contextmanager
def linked_transports(tmp_path, on_batch, sender_settings: dict | None = None):
    """Two ``UnixTransport``s, ``w0`` -> ``w1``, both applying batches with ``on_batch``: yields
    ``w0``'s link to ``w1`` once it is connected; both stopped at the end."""
    from fluxmq.cluster.config import TransportSettings
    from fluxmq.cluster.unix import UnixTransport

    addrs = {"w0": f"unix:{tmp_path}/w0.sock", "w1": f"unix:{tmp_path}/w1.sock"}
    settings = TransportSettings(bind_addr=addrs["w0"], **(sender_settings or {}))
    sender = UnixTransport("w0", 1, settings, on_batch, lambda: [])
    receiver = UnixTransport("w1", 1, TransportSettings(bind_addr=addrs["w1"]), on_batch, lambda: [])
    sender.start()
    receiver.start()
    try:
        sender.set_peers(addrs)
        link = sender.links["w1"]
        with gevent.Timeout(30):
            while not link.connected:
                gevent.sleep(0.01)
        yield link
    finally:
        sender.stop(0.5)
        receiver.stop(0.5)


def test_two_unix_transports_carry_the_relays_runs_as_framed_batches_in_order(tmp_path) -> None:
    got: list = []

    def on_batch(batch):
        got.append(batch)
        return pb.BatchAck(seq=batch.seq)

    with linked_transports(tmp_path, on_batch) as link:
        with gevent.Timeout(30):
            fq = link.forward_queue
            for i in range(1000):
                fq.append("t", "pub", 0, i.to_bytes(4, "big"))
                if i % 97 == 0:
                    gevent.sleep(0)  # several batches
            while link.queued or link.unacked:
                gevent.sleep(0.01)
    framed = [b for b in got if b.count]
    assert framed and all(type(b) is FramedBatch for b in framed)
    payloads = [m[1] for b in framed for m in messages(b.items, b.items_start)]
    assert payloads == [i.to_bytes(4, "big") for i in range(1000)]


def test_an_acknowledged_batch_is_held_by_nothing_so_its_runs_bytes_are_free_for_the_next_tails(
    tmp_path,
) -> None:
    # once its ack is in, nothing of the link holds a batch (its runs' bytes are then spares the
    # relay's next tails are written into, not fresh allocations): the ack reader kept the last
    # acknowledged batch in its locals until the next ack
    import gc

    from fluxmq.cluster.batch import RawBatch

    count = [0]

    def on_batch(batch):
        count[0] += batch.count
        return pb.BatchAck(seq=batch.seq)

    with linked_transports(tmp_path, on_batch) as link:
        with gevent.Timeout(30):
            for i in range(3000):
                link.forward_queue.append("t", "pub", 0, i.to_bytes(4, "big") * 16)
            while link.queued or link.unacked:
                gevent.sleep(0.01)
            gevent.sleep(0.05)
        assert count[0] == 3000 and link.stats.batches > 1
        assert [o for o in gc.get_objects() if type(o) is RawBatch] == []


def test_a_batch_between_unix_transports_wakes_three_greenlets(tmp_path) -> None:
    """A batch's fixed cost between workers: the link's sender writes it itself (no writer greenlet
    and queue round, no sleep(0) before taking it), the receiver's stream greenlet applies it and the
    link's acknowledgement reader reads the ack: three greenlets switched to per batch, one each."""
    import greenlet

    received: list = []

    def on_batch(batch):
        received.append(batch.count)
        return pb.BatchAck(seq=batch.seq)

    batches = 50
    me = gevent.getcurrent()
    hub = gevent.get_hub()
    woken: list = []

    def trace(event, args) -> None:
        if event in ("switch", "throw") and args[1] is not hub and args[1] is not me:
            woken.append(args[1])

    with linked_transports(tmp_path, on_batch) as link:
        with gevent.Timeout(30):
            start = link.stats.batches
            old = greenlet.settrace(trace)
            try:
                for i in range(batches):  # one at a time: each is acknowledged before the next
                    for j in range(3):
                        link.forward_queue.append("t", "pub", 0, (i * 3 + j).to_bytes(4, "big"))
                    while link.stats.batches < start + i + 1:
                        gevent.sleep(0.001)
            finally:
                greenlet.settrace(old)
    assert received[-batches:] == [3] * batches
    # (a few more for the link's watchdog, which wakes the sender every 0.5 s while a batch is out)
    assert len(woken) <= 3 * batches + 6, len(woken) / batches


def test_while_batches_stream_the_ack_reader_sends_the_next_one(tmp_path) -> None:
    """Messages queued while a batch is in flight fill the next batch; when the ack leaves nothing in
    flight, the ack reader takes and writes that batch itself (the sender greenlet, waiting for it
    to fill, is not switched to per batch), and every message arrives once, in order."""
    import greenlet

    got: list = []

    def on_batch(batch):
        if batch.count:
            got.extend(m[1] for m in messages(batch.items, batch.items_start))
            gevent.sleep(0.003)  # a receiver busy for a while: the next batch fills meanwhile
        return pb.BatchAck(seq=batch.seq)

    sent = 0
    woken = 0
    with linked_transports(tmp_path, on_batch, dict(batch_max_size=4096, batch_max_delay=30.0)) as link:
        with gevent.Timeout(30):
            start = link.stats.batches

            def trace(event, args) -> None:
                nonlocal woken
                if event in ("switch", "throw") and args[1] is link._greenlet:
                    woken += 1

            old = greenlet.settrace(trace)
            try:
                while link.stats.batches < start + 40:
                    for _ in range(5):
                        link.forward_queue.append("t", "pub", 0, sent.to_bytes(4, "big"))
                        sent += 1
                    gevent.sleep(0.0005)
                while link.queued or link.unacked:
                    gevent.sleep(0.001)
            finally:
                greenlet.settrace(old)
            batches = link.stats.batches - start
    assert got == [i.to_bytes(4, "big") for i in range(sent)]
    assert woken < batches // 2, (woken, batches)


def test_two_writers_of_one_link_never_interleave_their_frames(tmp_path) -> None:
    """The ack reader and the sender greenlet both write a link's batches (``PeerLink._put``): a
    batch larger than the socket's buffer is written whole before the other writer's frame goes
    (interleaved frames made the receiver drop whole batches as damaged), in the order taken."""
    import gevent.event

    got: list = []
    gate = gevent.event.Event()

    def on_batch(batch):
        if batch.count:
            gate.wait(30)  # the receiver reads nothing more until both writes have started
            got.extend(messages(batch.items, batch.items_start))
        return pb.BatchAck(seq=batch.seq)

    with linked_transports(tmp_path, on_batch) as link:
        with gevent.Timeout(60):
            first = build_raw_batch("w0", link.epoch, link._next_seq(), relay_runs(10, b"a" * 100))[0]
            second = build_raw_batch("w0", link.epoch, link._next_seq(), relay_runs(1500, b"b" * 1000))[0]
            third = build_raw_batch("w0", link.epoch, link._next_seq(), relay_runs(1500, b"c" * 1000))[0]
            link._put(first)  # taken by the receiver, which then waits at the gate
            writers = [gevent.spawn(link._put, second), gevent.spawn(link._put, third)]
            gevent.sleep(0.05)  # both under way: the second's write waits for room in the socket
            gate.set()
            gevent.joinall(writers, timeout=30, raise_error=True)
            while len(got) < 3010:
                gevent.sleep(0.01)
    assert [p[1][:1] for p in got] == [b"a"] * 10 + [b"b"] * 1500 + [b"c"] * 1500


def route_stream(path: str) -> tuple:
    """A Route stream opened by hand on a transport's Unix socket: the socket and its frame reader."""
    sock = _connect(path, ROUTE)
    return sock, FrameReader(sock)


@pytest.mark.parametrize("answer", ["int", "message"])
def test_a_plain_ack_crosses_the_socket_as_its_sequence_id_without_a_protobuf_message(
    tmp_path, answer
) -> None:
    # the receiver frames an ack that names no busy group itself (a 0 byte, then the sequence id),
    # whether on_batch answered with the seq alone (ClusterPeers) or with a BatchAck: a BatchAck made,
    # serialized, parsed and read per batch cost four times as much on the two sides
    from fluxmq.cluster.batch import RAW_ACK, decode_ack
    from fluxmq.cluster.config import TransportSettings
    from fluxmq.cluster.unix import UnixTransport

    def on_batch(batch):
        return batch.seq if answer == "int" else pb.BatchAck(seq=batch.seq)

    addr = f"unix:{tmp_path}/w1.sock"
    receiver = UnixTransport("w1", 1, TransportSettings(bind_addr=addr), on_batch, lambda: [])
    receiver.start()
    sock, reader = route_stream(f"{tmp_path}/w1.sock")
    try:
        with gevent.Timeout(10):
            for seq in (5, 6, 1 << 40):
                write_raw_batch(sock, build_raw_batch("w0", 1, seq, relay_runs(3))[0])
                frame = reader.read()
                assert frame == RAW_ACK.pack(0, seq) == b"\x00" + seq.to_bytes(8, "big")
                assert decode_ack(frame) == seq
    finally:
        sock.close()
        receiver.stop(0.5)


def test_an_acks_frame_is_its_encoding_after_its_length_and_a_damaged_one_is_refused() -> None:
    # ack_frame (C, written by the receiving stream as it is) holds what write_frame(encode_ack) did
    from fluxmq.cluster.batch import RAW_ACK, ack_frame, ack_seq, decode_ack, encode_ack
    from fluxmq.cluster.unix import HEADER

    acks = [0, 7, (1 << 64) - 1, pb.BatchAck(seq=9), pb.BatchAck(seq=3, busy_groups=["g1", "g2"])]
    for ack in acks:
        body = encode_ack(ack)
        assert ack_frame(ack) == HEADER.pack(len(body)) + body
        back = decode_ack(body)
        assert ack_seq(back) == ack_seq(ack)
        if type(ack) is not int and ack.busy_groups:
            assert back == ack  # (the message, as it was)
        else:
            assert type(back) is int and body == RAW_ACK.pack(0, ack_seq(ack))
    with pytest.raises(OverflowError):
        ack_frame(-1)
    for damaged in (b"\x00", b"\x00" * 10):
        with pytest.raises(EOFError):
            decode_ack(damaged)


def test_an_ack_naming_busy_groups_still_travels_as_the_message_and_reaches_on_ack(tmp_path) -> None:
    from fluxmq.cluster.batch import decode_ack, encode_ack

    ack = pb.BatchAck(seq=9, busy_groups=["$share/g/t"])
    assert encode_ack(ack) == ack.SerializeToString()
    assert decode_ack(encode_ack(ack)) == ack
    assert decode_ack(encode_ack(pb.BatchAck(seq=9))) == 9 == decode_ack(encode_ack(9))
    with pytest.raises(EOFError):
        decode_ack(b"\x00\x01")  # a truncated plain ack ends the stream

    seen: list = []

    def on_batch(batch):
        if batch.count:
            return pb.BatchAck(seq=batch.seq, busy_groups=["$share/g/t"])
        return batch.seq

    with linked_transports(tmp_path, on_batch) as link:
        link._on_ack = lambda node_id, ack: seen.append((node_id, ack.seq, list(ack.busy_groups)))
        with gevent.Timeout(30):
            link.forward_queue.append("t", "pub", 0, b"x")
            while link.queued or link.unacked:
                gevent.sleep(0.01)
    assert seen and all(s == ("w1", s[1], ["$share/g/t"]) for s in seen)


def test_a_plain_raw_batch_carries_its_seq_and_count_in_its_lead_and_names_its_sender_when_asked() -> None:
    # a batch without interest changes or snapshot is plain on a Unix link: its lead is 0x02, the
    # u64 seq and u32 count, no protobuf head; its items, count and expired messages are a headed
    # one's, and ``named`` gives it the head a fresh batch has (a stream's first batch must name
    # the sender and epoch); a batch with interest changes or a snapshot keeps its head
    from fluxmq.cluster.batch import PLAIN_LEAD, PLAIN_MARK

    expiring = Outgoing(encode_message(Message("e", b"x", 0, expires_at=100.0)), (), True, 100.0)
    cases = [
        (1, relay_runs(10), (), False),
        (2, [*relay_runs(3), expiring], (), False),
        (3, relay_runs(2), [("a/#", True)], False),
        (4, [], (), False),
        (5, [], [("a/#", True)], True),
        (1 << 40, relay_runs(4), (), False),
    ]
    for now in (50.0, 150.0):  # the expiring message kept, then left out
        for seq, entries, interest, snapshot in cases:
            plain, expired = build_raw_batch("w0", 7, seq, entries, interest, snapshot, now=now, plain=True)
            headed, headed_expired = build_raw_batch("w0", 7, seq, entries, interest, snapshot, now=now)
            assert plain.parts == headed.parts and plain.size == headed.size and expired == headed_expired
            assert plain.count == headed.count == pb.Batch.FromString(headed.lead[5:]).count
            if interest or snapshot:
                assert plain.lead == headed.lead and not plain.plain
            else:
                assert plain.plain and plain.lead == PLAIN_LEAD.pack(PLAIN_MARK, seq, plain.count)
                assert len(plain.lead) == 13 and plain.lead[0] == 2
            assert plain.named("w0", 7).lead == headed.lead
            assert plain.named("w0", 7).parts == headed.parts
    assert plain.count == 4


def test_a_plain_frame_reads_back_with_its_streams_sender_and_epoch_and_is_refused_before_them() -> None:
    batch = build_raw_batch("w0", 7, 42, relay_runs(30), plain=True)[0]
    frame = transfer(lambda sock: write_raw_batch(sock, batch))[0]
    assert frame[:1] == b"\x02"
    got = read_batch(frame, "w0", 7)
    assert type(got) is FramedBatch
    assert (got.sender, got.epoch, got.seq, got.count, got.snapshot, list(got.interest)) == (
        "w0",
        7,
        42,
        30,
        False,
        [],
    )
    assert got.items_start == 13 and len(messages(got.items, got.items_start)) == 30
    with pytest.raises(EOFError):
        read_batch(frame)  # no sender named yet on the stream
    for cut in (1, 5, 12):
        with pytest.raises(EOFError):
            read_batch(frame[:cut], "w0", 7)  # truncated lead


def test_a_links_batches_make_no_protobuf_message_each(tmp_path, monkeypatch) -> None:
    # a Unix link's batch heads are serialized from the link's one pb.Batch, and its plain acks are
    # framed without a BatchAck: in steady streaming neither side makes a protobuf message per batch
    import fluxmq.cluster.batch as batch_mod

    made: list = []

    class CountingPb:
        def __getattr__(self, name):
            real = getattr(pb, name)
            if name not in ("Batch", "BatchAck", "InterestChange"):
                return real
            return lambda *a, **kw: (made.append(name), real(*a, **kw))[1]

    got: list = []

    def on_batch(batch):
        got.append(batch.count)
        return batch.seq

    with linked_transports(tmp_path, on_batch) as link:
        monkeypatch.setattr(batch_mod, "pb", CountingPb())
        with gevent.Timeout(30):
            start = link.stats.batches
            for i in range(20):
                link.forward_queue.append("t", "pub", 0, i.to_bytes(4, "big"))
                while link.stats.batches < start + i + 1:
                    gevent.sleep(0.001)
        monkeypatch.undo()
    assert got[-20:] == [1] * 20
    assert made == []


@pytest.mark.parametrize("through", ["ring", "inline"])
def test_a_links_plain_batches_cross_with_no_protobuf_message_made_or_parsed(
    tmp_path, monkeypatch, through
) -> None:
    # a plain batch (no interest change, no snapshot) carries its seq and count in the transport's
    # frame (lead 0x02), its sender and epoch those of the stream's first batch: neither side makes,
    # sets, serializes or parses a protobuf Batch for it, whether its frame goes through the
    # stream's shared-memory ring or inline on the socket
    import fluxmq.cluster._linkframe as linkframe_mod
    import fluxmq.cluster.batch as batch_mod
    import fluxmq.cluster.unix as unix_mod
    from fluxmq.cluster import ring as ring_mod

    if through == "ring" and not ring_mod.supported():
        pytest.skip("no memfd_create or file seals here")
    if through == "inline":
        monkeypatch.setattr(unix_mod, "RING_SIZE", 0)
    used: list = []

    class Counting:
        def __init__(self, name, real) -> None:
            self.name, self.real = name, real

        def __call__(self, *a, **kw):
            used.append(self.name)
            return self.real(*a, **kw)

        def FromString(self, data):  # noqa: N802 (protobuf's name)
            used.append(self.name + ".FromString")
            return self.real.FromString(data)

    class CountingPb:
        def __getattr__(self, name):
            real = getattr(pb, name)
            return Counting(name, real) if name in ("Batch", "BatchAck", "InterestChange") else real

    leads: list = []
    real_read_batch = unix_mod.read_batch

    def read_batch_seen(frame, *args):
        leads.append(frame[:1])
        return real_read_batch(frame, *args)

    got: list = []

    def on_batch(batch):
        got.append((batch.sender, batch.epoch, batch.count, type(batch) is FramedBatch))
        return batch.seq

    with linked_transports(tmp_path, on_batch) as link:
        monkeypatch.setattr(batch_mod, "pb", CountingPb())
        monkeypatch.setattr(unix_mod, "pb", CountingPb())
        monkeypatch.setattr(linkframe_mod, "pb", CountingPb())  # (read_batch's parse, the acks: C)
        monkeypatch.setattr(unix_mod, "read_batch", read_batch_seen)
        with gevent.Timeout(30):
            start = link.stats.batches
            for i in range(20):
                for _j in range(i % 3 + 1):
                    link.forward_queue.append("t", "pub", 0, i.to_bytes(4, "big"))
                while link.stats.batches < start + i + 1:
                    gevent.sleep(0.001)
        ring, epoch = link._call.ring, link.epoch
        monkeypatch.undo()
    assert used == []
    assert leads == [b"\x02"] * 20
    assert got[-20:] == [("w0", epoch, i % 3 + 1, True) for i in range(20)]
    if through == "ring":
        assert ring is not None and ring.ring_frames >= 20 and ring.inline_frames == 0
    else:
        assert ring is None


def test_a_plain_frame_before_its_stream_named_the_sender_or_truncated_ends_that_stream_only(
    tmp_path,
) -> None:
    from fluxmq.cluster.config import TransportSettings
    from fluxmq.cluster.unix import HEADER, UnixTransport

    got: list = []

    def on_batch(batch):
        got.append((batch.sender, batch.epoch, batch.seq, batch.count))
        return batch.seq

    addr = f"unix:{tmp_path}/w1.sock"
    receiver = UnixTransport("w1", 1, TransportSettings(bind_addr=addr), on_batch, lambda: [])
    receiver.start()
    path = f"{tmp_path}/w1.sock"
    try:
        with gevent.Timeout(10):
            sock, reader = route_stream(path)
            write_raw_batch(sock, build_raw_batch("w0", 3, 1, relay_runs(2), plain=True)[0])
            with pytest.raises(EOFError):
                reader.read()  # no sender named on this stream yet: it ends, unapplied
            sock.close()
            sock, reader = route_stream(path)  # the server still serves
            write_raw_batch(sock, build_raw_batch("w0", 3, 1, relay_runs(2))[0])  # named
            assert reader.read() == b"\x00" + (1).to_bytes(8, "big")
            write_raw_batch(sock, build_raw_batch("w0", 3, 2, relay_runs(5), plain=True)[0])
            assert reader.read() == b"\x00" + (2).to_bytes(8, "big")
            sock.sendall(HEADER.pack(9) + b"\x02" + bytes(8))  # a plain lead cut short
            with pytest.raises(EOFError):
                reader.read()
            sock.close()
            sock, reader = route_stream(path)
            write_raw_batch(sock, build_raw_batch("w0", 3, 3, relay_runs(1))[0])
            assert reader.read() == b"\x00" + (3).to_bytes(8, "big")
            sock.close()
    finally:
        receiver.stop(0.5)
    assert got == [("w0", 3, 1, 2), ("w0", 3, 2, 5), ("w0", 3, 3, 1)]


def test_a_link_waiting_out_its_backoff_reconnects_once_its_peer_is_back(tmp_path, monkeypatch) -> None:
    """w0's link to w1, refused while w1 was down, waits out a (here 60 s) reconnect backoff; w1
    starts and its own link to w0 delivers its interest snapshot to w0's ``ClusterPeers``, which
    ends that wait: w0 reaches w1 at once, not a backoff later (a restarted worker or node waits
    for its peers' links before it opens its listeners)."""
    from fluxmq.broker.broker import Broker
    from fluxmq.cluster import forwarder
    from fluxmq.cluster.config import TransportSettings
    from fluxmq.cluster.peers import ClusterPeers
    from fluxmq.cluster.unix import UnixTransport

    monkeypatch.setattr(forwarder, "RECONNECT_MIN", 60.0)
    monkeypatch.setattr(forwarder, "RECONNECT_MAX", 60.0)
    addrs = {"w0": f"unix:{tmp_path}/w0.sock", "w1": f"unix:{tmp_path}/w1.sock"}
    broker = Broker()
    peers = ClusterPeers("w0", broker, None)
    w0 = UnixTransport("w0", 1, TransportSettings(bind_addr=addrs["w0"]), peers.apply_batch, lambda: [])
    peers.transport = w0
    w1 = UnixTransport(
        "w1", 1, TransportSettings(bind_addr=addrs["w1"]), lambda b: pb.BatchAck(seq=b.seq), list
    )
    w0.start()
    try:
        w0.set_peers(addrs)
        link = w0.links["w1"]
        with gevent.Timeout(30):
            while not link.stats.failures:  # refused: w1 is not listening
                gevent.sleep(0.01)
        assert not link.connected
        w1.start()
        w1.set_peers(addrs)
        with gevent.Timeout(30, AssertionError("w0's link stayed in its backoff though w1 was back")):
            while not ("w1" in peers.snapshots_from and link.connected):
                gevent.sleep(0.01)
    finally:
        w0.stop(0.5)
        w1.stop(0.5)
