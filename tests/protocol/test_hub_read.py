"""The lone message's path in C (``fluxmq.protocol._hub_read``): the connection's hot state as typed
fields of ``ConnectionCore`` (and the flusher's of ``FlushCore``), the hub callback that reads,
relays and releases the flush, the flush without durable storage, and the per-connection write
with libc on plain TCP.

Behaviour (bytes, order, counters, hand-overs) is covered by ``test_publish_relay.py`` and
``test_connection_flush.py`` through every path; these tests pin what is particular to the C path:
no Python frame of the connection, its stream or the flusher runs for a lone message, and a connection whose
socket is closed never writes to the descriptor number the next socket reuses.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import gevent
import pytest
from gevent import socket

from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.broker.session import EXPIRY_NEVER
from fluxmq.protocol._hub_read import loop_read_in_c
from fluxmq.protocol.connection import RELAY, MQTTConnection
from fluxmq.protocol.flush import FlushScheduler
from fluxmq.protocol.settings import ProtocolSettings
from fluxmq.storage.memory import MemoryStorage
from fluxmq.transport.tcp import SocketStream
from tests.protocol.frames import publish_packet, raw_publish
from tests.protocol.served import read_exactly, serve


@pytest.fixture
def broker():
    storage = MemoryStorage()
    b = Broker(BrokerSettings(), storage)
    b.restore(storage.load())
    return b


@contextmanager
def pub_sub(broker: Broker):
    """A publisher and a subscriber to ``t`` at QoS 0, each served by its reader after a first
    PINGREQ/PINGRESP (each reader has emptied its socket); yields (pub, sub, pub_client,
    sub_client) and closes both clients after."""
    flusher = FlushScheduler(broker.storage)
    sub, sub_reader, sub_client = serve(broker, flusher, "sub")
    pub, pub_reader, pub_client = serve(broker, flusher, "pub")
    broker.subscribe(sub.session, "t", 0)
    try:
        for client in (pub_client, sub_client):
            client.sendall(b"\xc0\x00")
            assert read_exactly(client, 2) == b"\xd0\x00"
        yield pub, sub, pub_client, sub_client
    finally:
        for client in (pub_client, sub_client):
            client.close()
        gevent.joinall([pub_reader, sub_reader], timeout=5)


_WATCHED = (
    str(Path(sys.modules[MQTTConnection.__module__].__file__)),
    str(Path(sys.modules[SocketStream.__module__].__file__)),
    str(Path(sys.modules[FlushScheduler.__module__].__file__)),
)


def test_a_lone_message_runs_no_python_frame_of_the_connection_its_stream_or_the_flusher(
    broker: Broker,
) -> None:
    """From the watcher's callback to the subscriber's send, a lone PUBLISH runs in C: the read,
    the decode, the relay, the flush and the subscriber's write call no Python function of
    ``connection.py``, of the TCP stream or of ``flush.py`` (the Python callback, ``recv_nowait``,
    ``mark``, ``release``, ``_flush``, ``flush_nowait`` and ``send_nowait`` did). The message
    still arrives whole."""
    called = []
    ours: set[int] = set()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename in _WATCHED:
            # A timer left by an earlier test in this process (a flusher's storage retry, say)
            # may fire in the window: only this test's connections, streams and flusher count.
            owner = frame.f_locals.get("self")
            if owner is None or id(owner) in ours:
                called.append(frame.f_code.co_name)

    with pub_sub(broker) as (pub, sub, pub_client, sub_client):
        ours.update(map(id, (pub, sub, pub.stream, sub.stream, pub.flusher)))
        sys.setprofile(profile)
        try:
            pub_client.sendall(publish_packet("t", b"lone"))
            got = read_exactly(sub_client, 9)
        finally:
            sys.setprofile(None)
        assert got == b"\x30\x07\x00\x01tlone"
        assert called == []


def test_a_served_read_takes_the_hub_loops_time_in_c_and_its_keep_alive_wait_starts_there(
    broker: Broker,
) -> None:
    """gevent's C loop is read in C by ``_on_input`` (libev's ``ev_now`` and ``ev_pending_count``
    on the loop's ``ptr``, its callback queue kept): a served read restarts the keep-alive wait at
    the loop's time, as ``loop.now()`` read it."""
    loop = gevent.get_hub().loop
    assert loop_read_in_c(loop)
    with pub_sub(broker) as (pub, _sub, pub_client, sub_client):
        pub._wait_from = 0.0
        pub_client.sendall(publish_packet("t", b"lone"))
        assert read_exactly(sub_client, 9) == b"\x30\x07\x00\x01tlone"
        assert 0.0 < pub._wait_from <= loop.now()


def test_a_changed_max_message_size_is_applied_by_the_relay_to_the_next_read(broker: Broker) -> None:
    """The relay reads ``max_message_size`` from the settings' slot at each read (not a copy
    kept): lowered on a live connection, the next larger message is left to ``serve``, which
    refuses it; a smaller one still goes the raw path."""
    with pub_sub(broker) as (pub, _sub, pub_client, sub_client):
        pub.decoder.version = 4  # (as after CONNECT: the raw path takes a known version only)
        raw = RELAY.raw_served
        pub_client.sendall(publish_packet("t", b"lone"))
        assert read_exactly(sub_client, 9) == b"\x30\x07\x00\x01tlone"
        assert RELAY.raw_served == raw + 1
        pub.settings.max_message_size = 3
        dropped = broker.stats.drops.get("message_too_large", 0)
        pub_client.sendall(publish_packet("t", b"long") + publish_packet("t", b"ok!"))
        assert read_exactly(sub_client, 8) == b"\x30\x06\x00\x01tok!"
        assert RELAY.raw_served == raw + 1  # the run stopped at the first: serve took both
        assert broker.stats.drops["message_too_large"] == dropped + 1
        pub_client.sendall(publish_packet("t", b"ok?"))
        assert read_exactly(sub_client, 8) == b"\x30\x06\x00\x01tok?"
        assert RELAY.raw_served == raw + 2


def test_a_closed_connection_never_writes_to_the_descriptor_number_the_next_socket_reuses(
    broker: Broker,
) -> None:
    """The C write goes to the socket's descriptor number; once the connection has closed its
    socket, output appended later (a delivery racing the close) must fail as a write to a closed
    socket, not reach whichever socket the kernel gave that number next."""
    flusher = FlushScheduler(broker.storage)
    conn, reader, client = serve(broker, flusher, "gone")
    client.sendall(b"\xc0\x00")
    assert read_exactly(client, 2) == b"\xd0\x00"
    old_fd = conn.stream.fileno()
    client.close()
    reader.join(timeout=10)
    assert reader.dead
    held = []
    try:
        for _ in range(20):  # the next socket given the closed one's number
            pair = socket.socketpair()
            held.append(pair)
            if old_fd in (pair[0].fileno(), pair[1].fileno()):
                break
        else:
            pytest.skip("the kernel did not reuse the descriptor number")
        reused = pair[0] if pair[0].fileno() == old_fd else pair[1]
        peer = pair[1] if reused is pair[0] else pair[0]
        conn.out += b"\xd0\x00"
        conn.flush_nowait()
        peer.setblocking(False)
        with pytest.raises(BlockingIOError):
            peer.recv(10)
        assert conn.closed
    finally:
        for a, b in held:
            a.close()
            b.close()


class _WrappedStream(SocketStream):
    """A stream with the plain-TCP interface whose bytes are not the socket's own (as a TLS or
    WebSocket stream's are not): it must be read and written through its methods."""

    __slots__ = ("reads", "writes")
    plain_socket = False

    def __init__(self, sock, address) -> None:
        super().__init__(sock, address)
        self.reads = self.writes = 0

    def recv_nowait(self, n: int) -> bytes:
        self.reads += 1
        return super().recv_nowait(n)

    def send_nowait(self, data) -> int:
        self.writes += 1
        return super().send_nowait(data)


def test_a_stream_that_is_not_the_plain_socket_is_read_and_written_through_its_methods(
    broker: Broker,
) -> None:
    """Only a stream that says its bytes are the socket's (``plain_socket``: SocketStream) is read
    and written with libc on its descriptor; any other goes through ``recv_nowait`` and
    ``send_nowait``, on the same C path (served in the hub, one flush)."""
    flusher = FlushScheduler(broker.storage)
    server_side, client = socket.socketpair()
    stream = _WrappedStream(server_side, ("127.0.0.1", 1))
    conn = MQTTConnection(broker, stream, ProtocolSettings(park_after=0), flusher)
    session, _ = broker.open_session("wrapped", True, EXPIRY_NEVER)
    conn.version = 4
    conn.client_id = "wrapped"
    conn.session = session
    broker.attach(session, conn, 100)
    broker.subscribe(session, "t", 0)
    reader = gevent.spawn(conn.run)
    try:
        client.sendall(b"\xc0\x00")
        assert read_exactly(client, 2) == b"\xd0\x00"
        reads, writes = stream.reads, stream.writes
        client.sendall(publish_packet("t", b"self"))
        assert read_exactly(client, 9) == b"\x30\x07\x00\x01tself"
        assert conn._fd == -1
        assert stream.reads == reads + 1 and stream.writes == writes + 1
    finally:
        client.close()
        gevent.joinall([reader], timeout=5)


def test_a_sent_small_output_buffer_keeps_its_memory_and_a_large_one_gives_it_back(broker: Broker) -> None:
    """A send that empties the output keeps an allocation of at most ``KEEP_OUT`` bytes (the next
    lone message is appended without a realloc down and up again; ``sys.getsizeof`` of a
    bytearray counts its allocation) and gives a larger one back; the bytes are whole either way."""
    empty = sys.getsizeof(bytearray())
    with pub_sub(broker) as (_pub, sub, pub_client, sub_client):
        for payload in (b"lone", b"x" * 100_000, b"two"):
            pub_client.sendall(
                publish_packet("t", payload) if len(payload) < 100 else raw_publish(b"t", payload)
            )
            got = read_exactly(
                sub_client, len(publish_packet("t", payload)) if len(payload) < 100 else 100_007
            )
            assert got.endswith(b"t" + payload)
            assert len(sub.out) == 0
            kept = sys.getsizeof(sub.out) - empty
            if len(payload) < 100:
                assert kept >= 9  # the packet's bytes stay allocated
            else:
                assert kept <= 1


def test_packets_split_across_reads_are_decoded_from_the_read_buffer_whole(broker: Broker) -> None:
    """The hub callback decodes a plain-TCP read straight from its C read buffer (no bytes object
    unless the reader is handed the read): a packet's tail that a read leaves unfinished is kept by
    the decoder and completed by the next read; a read the reader is handed (a SUBSCRIBE after a
    PUBLISH) keeps its bytes."""
    with pub_sub(broker) as (_pub, _sub, pub_client, sub_client):
        one, two = publish_packet("t", b"first"), publish_packet("t", b"second")
        pub_client.sendall(one + two[:4])  # the second packet's first bytes only
        assert read_exactly(sub_client, len(one)) == one
        gevent.sleep(0.05)
        pub_client.sendall(two[4:])
        assert read_exactly(sub_client, len(two)) == two
        subscribe = b"\x82\x06\x00\x01\x00\x01u\x00"  # SUBSCRIBE id 1 to "u" at QoS 0
        pub_client.sendall(publish_packet("t", b"third") + subscribe)
        assert read_exactly(sub_client, len(publish_packet("t", b"third"))) == publish_packet("t", b"third")
        assert read_exactly(pub_client, 5) == b"\x90\x03\x00\x01\x00"  # SUBACK from the reader
