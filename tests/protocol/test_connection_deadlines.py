"""Read deadlines and parking of MQTTConnection over plain TCP (issue 16).

The connection keeps its read deadlines (connect timeout, park, keep alive) on one libev timer
instead of a socket timeout per ``recv``; a parked connection answers PINGREQs from the hub; a
connection woken after a long quiet parks again once its input is served. These tests run a
listener and gevent clients in this process and look at the server-side connection's state; every
wait is bounded and nothing asserts on time.
"""

from __future__ import annotations

import gevent

from fluxmq._core import codec as c
from fluxmq.protocol.connection import HUB_READS
from tests.transport.harness import (
    WAIT,
    InProcessListener,
    MQTTPeer,
    SocketTransport,
    tcp_connect,
    wait_parked,
)


def peer(server: InProcessListener, version: int = 4) -> MQTTPeer:
    return MQTTPeer(SocketTransport(tcp_connect(server.port)), version)


def the_connection(server: InProcessListener, client_id: str):
    with gevent.Timeout(WAIT, AssertionError(f"no connection of {client_id}")):
        while True:
            for conn in server.listener.connections:
                if conn.client_id == client_id:
                    return conn
            gevent.sleep(0.01)


def test_reading_connection_has_no_socket_timeout_and_keep_alive_still_closes_it() -> None:
    """While it reads, the connection's socket carries no timeout (no gevent Timeout per recv):
    the deadline timer alone drops a client silent for 1.5 x keep alive [MQTT-3.1.2-24], here with a
    connect timeout (30 s) far longer than the keep-alive limit (1.5 s), and not parking."""
    with InProcessListener(connect_timeout=30.0, park_after=0.0) as server:
        client = peer(server, version=5)
        client.send(c.Connect(client_id="ka-timer", keepalive=1, protocol_version=5))
        assert client.expect(c.Connack).reason_code == 0
        conn = the_connection(server, "ka-timer")
        client.send(c.Pingreq())
        client.expect(c.Pingresp)
        assert conn.stream.sock.gettimeout() is None
        assert conn._parked is None and conn._reader is not None  # a greenlet reads it
        assert client.wait_closed(timeout=20)
        assert [(type(p), p.reason_code) for p in client.packets] == [(c.Disconnect, 0x8D)]


def test_pingreq_to_a_parked_connection_is_answered_without_waking_it() -> None:
    """A parked client that only pings gets its PINGRESPs from the hub and stays parked: no greenlet,
    no receive buffer."""
    with InProcessListener(park_after=0.05) as server:
        client = peer(server)
        client.connect("pinger")
        conn = the_connection(server, "pinger")
        assert wait_parked(server)
        for _ in range(3):
            client.send(c.Pingreq())
            client.expect(c.Pingresp)
            assert conn._parked is not None
            assert conn._reader is None
        client.send(c.Pingreq(), c.Pingreq())  # two in one segment: two answers
        client.expect(c.Pingresp)
        client.expect(c.Pingresp)
        assert conn._parked is not None
        assert len(conn.decoder) == 0 and not conn.out


def test_connection_woken_after_a_long_quiet_parks_again_once_served() -> None:
    """A parked client that publishes after being quiet for park_after or longer is served by a
    greenlet that ends with its input: when the PUBACK arrives the connection is parked again."""
    with InProcessListener(park_after=0.05) as server:
        client = peer(server)
        client.connect("sensor")
        conn = the_connection(server, "sensor")
        assert wait_parked(server)
        gevent.sleep(0.2)  # quiet for longer than park_after (pacing; nothing is asserted on time)
        client.send(c.Publish("sensors/1", b"21.5", qos=1, packet_id=7))
        assert client.expect(c.Puback).packet_id == 7
        assert conn._parked is not None
        assert conn._reader is None and len(conn.decoder) == 0 and not conn.out


def test_parked_then_woken_subscriber_gets_its_queued_messages() -> None:
    """QoS 1 messages beyond the subscriber's in-flight window wait in its session while it is
    parked; the PUBACKs that wake it release the rest, and a ping in between changes nothing."""
    with InProcessListener(park_after=0.05, max_inflight=2) as server:
        sub = peer(server)
        sub.connect("parked-sub")
        sub.send(c.Subscribe(1, [c.Subscription("q/#", 1)]))
        sub.expect(c.Suback)
        assert wait_parked(server)
        pub = peer(server)
        pub.connect("waker")
        for i in range(6):
            pub.send(c.Publish("q/x", b"m%d" % i, qos=1, packet_id=i + 1))
            pub.expect(c.Puback)
        sub.send(c.Pingreq())  # answered from the hub while parked: changes nothing
        got, pongs = [], 0
        while len(got) < 6:
            p = sub.recv()
            if isinstance(p, c.Pingresp):
                pongs += 1
                continue
            assert isinstance(p, c.Publish), p
            got.append(p.payload)
            sub.send(c.Puback(p.packet_id))  # wakes the parked subscriber, which releases the next
        assert pongs == 1 or (pongs == 0 and isinstance(sub.recv(), c.Pingresp))
        assert got == [b"m%d" % i for i in range(6)]
        assert wait_parked(server)


def test_input_served_in_the_hub_keeps_the_client_alive_and_silence_still_closes_it() -> None:
    """A connected reader waits on a watcher whose hub callback serves relay-covered PUBLISHes
    without waking the reader greenlet; each read so served restarts the keep-alive wait: QoS 0
    PUBLISHes spread over more than the 1.5 s allowance (keep alive 1) keep the client connected
    [MQTT-3.1.2-23], and once it goes silent it is closed [MQTT-3.1.2-24]."""
    with InProcessListener(park_after=0.0) as server:
        client = peer(server, version=5)
        client.send(c.Connect(client_id="ka-hub", keepalive=1, protocol_version=5))
        assert client.expect(c.Connack).reason_code == 0
        conn = the_connection(server, "ka-hub")
        client.send(c.Pingreq())
        client.expect(c.Pingresp)
        before = HUB_READS.served
        started = gevent.get_hub().loop.now()
        while gevent.get_hub().loop.now() - started < 3.0:
            client.send(c.Publish("ka/hub", b"alive"))
            gevent.sleep(0.25)  # pacing the client, well inside the keep alive; nothing is asserted on time
        assert HUB_READS.served - before >= 10  # served in the hub, not by the reader
        assert not conn.closed
        client.send(c.Pingreq())
        client.expect(c.Pingresp)
        assert client.wait_closed(timeout=20)
        assert [(type(p), p.reason_code) for p in client.packets] == [(c.Disconnect, 0x8D)]
