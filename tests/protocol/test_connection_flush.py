"""Where a turn's output is written: by the turn's last reader before it waits, in one batch.

A lone PUBLISH is read, routed and written to its subscriber's socket by the publisher's reader
greenlet before it goes back to wait (no flush callback in the hub for it); when several connections
are ready in the same loop turn, only the last one writes, so the subscriber still gets one write
for the turn (flush batching for throughput). No timing: the tests record which greenlet ran each
flush and which deliveries it carried.
"""

from __future__ import annotations

from pathlib import Path

import gevent
import greenlet
import pytest

from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.protocol.flush import FlushScheduler
from fluxmq.storage.lmdb import LMDBStorage
from tests.protocol.frames import publish_packet
from tests.protocol.served import read_exactly, serve


class RecordingFlusher(FlushScheduler):
    """A FlushScheduler that records, for every flush, the greenlet it ran in and the connections
    it wrote."""

    __slots__ = ("runs",)

    def __init__(self, storage=None) -> None:
        super().__init__(storage)
        self.runs: list[tuple[object, list]] = []

    def _flush(self) -> None:
        self.runs.append((gevent.getcurrent(), list(self._dirty)))
        super()._flush()


@pytest.fixture
def broker(tmp_path: Path):
    storage = LMDBStorage(tmp_path / "data", map_size=16 << 20)
    b = Broker(BrokerSettings(), storage)
    b.restore(storage.load())
    yield b
    storage.close()


def test_a_lone_message_is_written_by_its_publishers_reader_before_it_waits(broker: Broker) -> None:
    flusher = RecordingFlusher(broker.storage)
    sub, sub_reader, sub_client = serve(broker, flusher, "sub")
    pub, pub_reader, pub_client = serve(broker, flusher, "pub")
    broker.subscribe(sub.session, "t", 1)
    gevent.sleep(0.05)  # both readers wait in recv
    flusher.runs.clear()
    try:
        pub_client.sendall(publish_packet("t", b"lone", qos=1, pid=7))
        assert read_exactly(pub_client, 4) == b"\x40\x02\x00\x07"  # the PUBACK (after the commit)
        got = read_exactly(sub_client, 11)
        assert got[0] == 0x32 and got.endswith(b"lone")
        # One flush, run by the publisher's reader greenlet (not a hub callback), carrying both the
        # subscriber's delivery and the publisher's ack.
        assert len(flusher.runs) == 1
        ran_in, conns = flusher.runs[0]
        assert ran_in is pub_reader
        assert set(conns) == {sub, pub}
    finally:
        for client in (pub_client, sub_client):
            client.close()
        gevent.joinall([pub_reader, sub_reader], timeout=5)


def test_connections_ready_in_one_turn_are_written_once_by_the_last_reader(broker: Broker) -> None:
    flusher = RecordingFlusher(broker.storage)
    sub, sub_reader, sub_client = serve(broker, flusher, "sub")
    pubs = [serve(broker, flusher, f"pub{i}") for i in range(3)]
    broker.subscribe(sub.session, "t/#", 0)
    gevent.sleep(0.05)
    flusher.runs.clear()
    try:
        # All three publishers' input is in their sockets before the hub polls again.
        for i, (_, _, client) in enumerate(pubs):
            client.sendall(publish_packet(f"t/{i}", b"m%d" % i))
        got = read_exactly(sub_client, 3 * 9)
        assert sorted(got[i * 9 + 7 : i * 9 + 9] for i in range(3)) == [b"m0", b"m1", b"m2"]
        # The three deliveries left in one flush, from a reader greenlet: the turn's last one.
        assert len(flusher.runs) == 1
        ran_in, conns = flusher.runs[0]
        assert ran_in in [reader for _, reader, _ in pubs]
        assert conns == [sub]
    finally:
        for _, _, client in pubs:
            client.close()
        sub_client.close()
        gevent.joinall([reader for _, reader, _ in pubs] + [sub_reader], timeout=5)


def test_a_lone_message_to_a_waiting_reader_is_served_in_the_hub_without_waking_it(broker: Broker) -> None:
    """Once a connected reader has emptied its socket it waits on a watcher whose hub callback
    reads, relays and writes a lone PUBLISH itself: one flush, run by the hub, carrying the
    delivery and the PUBACK, and no switch into the reader greenlet. A packet the relay does not
    cover (SUBSCRIBE) is handed to the reader, which answers it."""
    flusher = RecordingFlusher(broker.storage)
    sub, sub_reader, sub_client = serve(broker, flusher, "sub")
    pub, pub_reader, pub_client = serve(broker, flusher, "pub")
    broker.subscribe(sub.session, "t", 1)
    for client in (pub_client, sub_client):  # a first exchange: each reader empties its socket
        client.sendall(b"\xc0\x00")
        assert read_exactly(client, 2) == b"\xd0\x00"
    flusher.runs.clear()
    switched_to = []

    def trace(event, args):
        if event in ("switch", "throw"):
            switched_to.append(args[1])

    old = greenlet.settrace(trace)
    try:
        pub_client.sendall(publish_packet("t", b"lone", qos=1, pid=7))
        assert read_exactly(pub_client, 4) == b"\x40\x02\x00\x07"
        got = read_exactly(sub_client, 11)
        assert got[0] == 0x32 and got.endswith(b"lone")
        assert pub_reader not in switched_to
        assert len(flusher.runs) == 1
        ran_in, conns = flusher.runs[0]
        assert ran_in is gevent.get_hub()
        assert set(conns) == {sub, pub}
        pub_client.sendall(b"\x82\x06\x00\x01\x00\x01u\x00")  # SUBSCRIBE 1 to "u": the reader's
        assert read_exactly(pub_client, 5) == b"\x90\x03\x00\x01\x00"
        assert pub_reader in switched_to
    finally:
        greenlet.settrace(old)
        for client in (pub_client, sub_client):
            client.close()
        gevent.joinall([pub_reader, sub_reader], timeout=5)


def _a_publish_breaks_one_connection(broker: Broker, break_it) -> None:
    """Two clients pinged; ``break_it(conn)`` on the first, which then publishes: its reader ends
    and its socket closes, while the other client is still answered."""
    flusher = RecordingFlusher(broker.storage)
    conn, reader, client = serve(broker, flusher, "broken")
    other, other_reader, other_client = serve(broker, flusher, "other")
    try:
        for c in (client, other_client):
            c.sendall(b"\xc0\x00")
            assert read_exactly(c, 2) == b"\xd0\x00"
        break_it(conn)
        client.sendall(publish_packet("t", b"x"))
        reader.join(timeout=10)
        assert reader.dead and conn.closed
        with gevent.Timeout(10):
            assert client.recv(10) == b""
        other_client.sendall(b"\xc0\x00")
        assert read_exactly(other_client, 2) == b"\xd0\x00"
    finally:
        for c in (client, other_client):
            c.close()
        gevent.joinall([reader, other_reader], timeout=5)


def test_an_unexpected_error_in_the_hub_callback_ends_the_connection_as_in_its_reader(broker: Broker) -> None:
    """An error the hub callback meets (here a decoder that fails) is raised in the reader
    greenlet, which logs it and closes the connection as if its own recv had read the input; the
    hub and the other connections carry on."""

    class FailingDecoder:
        def feed(self, data):
            raise RuntimeError("decoder broke")

        def __len__(self) -> int:
            return 0

    _a_publish_breaks_one_connection(broker, lambda conn: setattr(conn, "decoder", FailingDecoder()))


def test_an_error_in_the_relays_raw_path_ends_the_connection_as_in_its_reader(broker: Broker) -> None:
    """An error the relay meets serving a read from its bytes (here a client policy whose verdicts
    fail) is raised in the reader greenlet as the decoder's are (the hub callback checks the relay's
    -1 itself: no try on the lone message's path), which closes the connection; the hub and the
    other connections carry on."""

    class FailingVerdicts:
        def get(self, topic):
            raise RuntimeError("policy broke")

    class FailingPolicy:
        fast = FailingVerdicts()

    _a_publish_breaks_one_connection(broker, lambda conn: setattr(conn, "_policy", FailingPolicy()))


class _CountingLoop:
    """The hub's loop, counting the callbacks scheduled through it (everything else passes)."""

    def __init__(self, loop) -> None:
        self._loop = loop
        self.callbacks = 0

    def run_callback(self, func, *args):
        self.callbacks += 1
        return self._loop.run_callback(func, *args)

    def __getattr__(self, name: str):
        return getattr(self._loop, name)


def test_a_lone_message_served_in_the_hub_schedules_no_flush_callback(broker: Broker) -> None:
    """The hub callback holds the flusher while it serves a read: the delivery and the PUBACK only
    queue their connections, and the callback writes them itself as the turn's last reader; no
    loop callback is made for the flush (and cancelled). Input handed to the reader (a SUBSCRIBE
    after a PUBLISH in one read) still gets the delivery and both acks out."""
    flusher = RecordingFlusher(broker.storage)
    counting = flusher._loop = _CountingLoop(flusher._loop)
    sub, sub_reader, sub_client = serve(broker, flusher, "sub")
    pub, pub_reader, pub_client = serve(broker, flusher, "pub")
    broker.subscribe(sub.session, "t", 1)
    for client in (pub_client, sub_client):  # a first exchange: each reader empties its socket
        client.sendall(b"\xc0\x00")
        assert read_exactly(client, 2) == b"\xd0\x00"
    flusher.runs.clear()
    counting.callbacks = 0
    try:
        pub_client.sendall(publish_packet("t", b"lone", qos=1, pid=7))
        assert read_exactly(pub_client, 4) == b"\x40\x02\x00\x07"
        got = read_exactly(sub_client, 11)
        assert got[0] == 0x32 and got.endswith(b"lone")
        assert len(flusher.runs) == 1 and flusher.runs[0][0] is gevent.get_hub()
        assert counting.callbacks == 0
        # PUBLISH + SUBSCRIBE in one read: the hub serves the PUBLISH, the reader the SUBSCRIBE.
        pub_client.sendall(publish_packet("t", b"next", qos=1, pid=8) + b"\x82\x06\x00\x09\x00\x01u\x00")
        assert read_exactly(pub_client, 4 + 5) == b"\x40\x02\x00\x08" + b"\x90\x03\x00\x09\x00"
        got = read_exactly(sub_client, 11)
        assert got[0] == 0x32 and got.endswith(b"next")
    finally:
        for client in (pub_client, sub_client):
            client.close()
        gevent.joinall([pub_reader, sub_reader], timeout=5)
