"""MQTT over WebSocket (``fluxmq.transport.websocket``): the upgrade, framing both ways, ping/pong, close.

Real listeners on 127.0.0.1 in this process (tests/transport/harness.py) with wsproto-driven
clients, so the tests choose exactly which frames go on the wire. The last tests drive
``WebSocketStream`` over in-memory inner streams that accept chosen amounts (plain TCP: any prefix;
TLS: all or nothing with OpenSSL's retry rule), which a socket cannot do on demand.
"""

from __future__ import annotations

import logging
import random
from collections import deque

import gevent
import pytest
from gevent import socket as gsocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    TextMessage,
)

from fluxmq._core import codec as c
from fluxmq.transport.tcp import SocketStream
from fluxmq.transport.websocket import OriginPolicy, WebSocketStream, WebSocketUpgrade, frame_header

from .harness import WAIT, InProcessListener, MQTTPeer, WSClient, tcp_connect, wait_parked


def ws_server(path: str = "/mqtt", origins: tuple[str, ...] = (), **settings):
    return InProcessListener(WebSocketUpgrade(path, list(origins), 5.0, "ws"), **settings)


@pytest.fixture
def server():
    with ws_server() as s:
        yield s


def connected(port: int, client_id: str, **kw) -> tuple[WSClient, MQTTPeer]:
    ws = WSClient(port, **kw)
    assert isinstance(ws.handshake(), AcceptConnection)
    peer = MQTTPeer(ws)
    peer.connect(client_id)
    return ws, peer


# -- the upgrade ------------------------------------------------------------------------------------


def test_upgrade_accepts_mqtt_subprotocol_and_echoes_it(server) -> None:
    """MQTT-6.0.0-3: the server selects "mqtt" when the client offers it."""
    ws = WSClient(server.port, subprotocols=("chat", "mqtt"))
    event = ws.handshake()
    assert isinstance(event, AcceptConnection)
    assert event.subprotocol == "mqtt"


def test_upgrade_accepts_mqttv31_subprotocol(server) -> None:
    ws = WSClient(server.port, subprotocols=("mqttv3.1",))
    assert ws.handshake().subprotocol == "mqttv3.1"
    peer = MQTTPeer(ws, version=3)
    peer.connect("v31-client")


def test_wrong_path_gets_404(server, caplog) -> None:
    caplog.set_level(logging.INFO, "fluxmq.transport")
    ws = WSClient(server.port, path="/other")
    event = ws.handshake()
    assert isinstance(event, RejectConnection) and event.status_code == 404
    assert ws.reject_body.startswith(b"unknown path")
    refused = [r for r in caplog.records if r.msg == "ws_handshake_refused"]
    assert len(refused) == 1 and refused[0].status == 404


def test_query_string_does_not_change_the_path(server) -> None:
    assert isinstance(WSClient(server.port, path="/mqtt?token=1").handshake(), AcceptConnection)


def test_missing_subprotocol_gets_400(server) -> None:
    ws = WSClient(server.port, subprotocols=())
    event = ws.handshake()
    assert isinstance(event, RejectConnection) and event.status_code == 400


def test_other_subprotocol_only_gets_400(server) -> None:
    event = WSClient(server.port, subprotocols=("chat",)).handshake()
    assert isinstance(event, RejectConnection) and event.status_code == 400


def raw_http(port: int, request: bytes) -> bytes:
    sock = tcp_connect(port)
    sock.sendall(request)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    sock.close()
    return data


def test_plain_http_get_without_upgrade_gets_400_and_closes(server) -> None:
    reply = raw_http(server.port, b"GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ")


def test_garbage_instead_of_http_gets_400(server) -> None:
    reply = raw_http(server.port, b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ")


def test_oversized_request_head_gets_431(server) -> None:
    reply = raw_http(server.port, b"GET /mqtt HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 431 ")


def test_upgrade_deadline_closes_a_silent_socket(caplog) -> None:
    caplog.set_level(logging.INFO, "fluxmq.transport")
    with InProcessListener(WebSocketUpgrade("/mqtt", [], 0.3, "ws")) as s:
        sock = tcp_connect(s.port)
        sock.sendall(b"GET /mqtt HTTP/1.1\r\n")  # and never the rest
        assert sock.recv(100) == b""
    failed = [r for r in caplog.records if r.msg == "ws_handshake_failed"]
    assert len(failed) == 1 and failed[0].error == "timeout"


def test_origin_refused_with_403_and_allowed_origin_accepted() -> None:
    with ws_server(origins=("https://app.example.com", "*.example.org")) as s:
        bad = WSClient(s.port, origin="https://evil.example.net")
        event = bad.handshake()
        assert isinstance(event, RejectConnection) and event.status_code == 403
        for origin in (
            "https://app.example.com",
            "HTTPS://APP.EXAMPLE.COM",
            "https://a.b.example.org:8443",
            None,
        ):
            ws = WSClient(s.port, origin=origin)
            assert isinstance(ws.handshake(), AcceptConnection), origin
            MQTTPeer(ws).connect(f"origin-{origin}")


@pytest.mark.parametrize(
    ("allowed", "origin", "ok"),
    [
        ([], "https://anything.test", True),
        (["*"], "https://anything.test", True),
        (["https://a.test"], None, True),  # not a browser: no Origin header
        (["https://a.test"], "", True),
        (["https://a.test"], "https://a.test/", True),
        (["https://a.test"], "http://a.test", False),
        (["https://a.test"], "https://a.test.evil", False),
        (["*.a.test"], "https://x.a.test", True),
        (["*.a.test"], "https://a.test", True),
        (["*.a.test"], "https://xa.test", False),
        (["*.a.test"], "null", False),
    ],
)
def test_origin_policy(allowed: list[str], origin: str | None, ok: bool) -> None:
    assert OriginPolicy(allowed).allows(origin) is ok


# -- MQTT over frames -------------------------------------------------------------------------------


def test_publish_between_two_websocket_clients(server) -> None:
    sub_ws, sub = connected(server.port, "sub")
    sub.send(c.Subscribe(1, [c.Subscription("ws/#", 1)]))
    assert sub.expect(c.Suback).reason_codes == [1]
    _, pub = connected(server.port, "pub")
    pub.send(c.Publish("ws/a", b"over websocket", 1, packet_id=5))
    assert pub.expect(c.Puback).packet_id == 5
    got = sub.expect(c.Publish)
    assert (got.topic, got.payload, got.qos) == ("ws/a", b"over websocket", 1)


def test_packet_split_across_frames(server) -> None:
    """One CONNECT carried by three separate binary messages, then byte by byte in continuation frames."""
    ws = WSClient(server.port)
    ws.handshake()
    data = c.encode(c.Connect(client_id="split-client", keepalive=30), 4)
    ws.send(data[:3])
    ws.send(data[3:9])
    ws.send(data[9:])
    peer = MQTTPeer(ws)
    assert peer.expect(c.Connack).reason_code == 0
    sub = c.encode(c.Subscribe(3, [c.Subscription("a/b", 0)]), 4)
    ws.send(sub, frame_size=1)  # one message, a continuation frame per byte
    assert peer.expect(c.Suback).packet_id == 3


def test_several_packets_in_one_frame(server) -> None:
    ws = WSClient(server.port)
    ws.handshake()
    packets = [
        c.Connect(client_id="batch", keepalive=30),
        c.Subscribe(1, [c.Subscription("b/+", 0)]),
        c.Publish("b/1", b"one"),
        c.Publish("b/2", b"two"),
        c.Pingreq(),
    ]
    ws.send(b"".join(c.encode(p, 4) for p in packets))
    peer = MQTTPeer(ws)
    peer.expect(c.Connack)
    peer.expect(c.Suback)
    got = [peer.expect(c.Publish).payload, peer.expect(c.Publish).payload]
    assert got == [b"one", b"two"]
    peer.expect(c.Pingresp)


def test_ping_gets_pong_with_the_same_payload(server) -> None:
    ws, peer = connected(server.port, "pinger")
    ws.send_event(Ping(payload=b"are you there"))
    pong = ws.wait_event(Pong)
    assert pong.payload == b"are you there"
    peer.send(c.Pingreq())
    peer.expect(c.Pingresp)  # MQTT still flows after control frames


def test_client_close_handshake_is_answered_and_ends_the_session(server) -> None:
    ws, peer = connected(server.port, "closer")
    assert "closer" in server.broker.sessions
    ws.send_event(CloseConnection(code=1000, reason="bye"))
    close = ws.wait_event(CloseConnection)
    assert close.code == 1000
    assert ws.recv() == b""  # then the TCP connection ends
    assert server.wait_no_connections()
    assert "closer" not in server.broker.sessions  # clean session ended with the connection


def test_text_frame_closes_the_connection_with_1003(server) -> None:
    """MQTT-6.0.0-1: a data frame that is not binary closes the network connection."""
    ws, peer = connected(server.port, "texter")
    ws.send_event(TextMessage(data="\x10hello"))
    close = ws.wait_event(CloseConnection)
    assert close.code == 1003
    assert server.wait_no_connections()


def test_unmasked_client_frame_is_a_protocol_error_1002(server) -> None:
    ws, peer = connected(server.port, "unmasked")
    ws.sock.sendall(frame_header(2) + b"\xc0\x00")  # a server-style (unmasked) frame from the client
    close = ws.wait_event(CloseConnection)
    assert close.code == 1002
    assert server.wait_no_connections()


def test_server_close_sends_a_close_frame(server) -> None:
    ws, peer = connected(server.port, "kicked")
    conn = next(iter(server.listener.connections))
    conn.close(0x98, "administrative action")
    close = ws.wait_event(CloseConnection)
    assert close.code == 1000


def test_tcp_close_without_close_frame_ends_the_connection(server) -> None:
    ws, peer = connected(server.port, "vanisher")
    ws.close()
    assert server.wait_no_connections()


def test_recv_timeout_is_not_reset_by_pings() -> None:
    """The stream's read timeout bounds the wait for data however many pings arrive meanwhile."""
    a, b = gsocket.socketpair()
    client = WSConnection(ConnectionType.CLIENT)
    stream = WebSocketStream(SocketStream(a, ("pair", 0)), _server_side_open(client))
    stream.settimeout(0.5)

    def pinger() -> None:
        while True:
            b.sendall(client.send(Ping(payload=b"p")))
            gevent.sleep(0.05)

    g = gevent.spawn(pinger)
    try:
        with pytest.raises(TimeoutError):
            with gevent.Timeout(WAIT, AssertionError("recv did not time out")):
                stream.recv(65536)
    finally:
        g.kill()
        a.close()
        b.close()


def test_websocket_pings_do_not_count_as_keepalive_traffic(server) -> None:
    """MQTT-3.1.2-24: only MQTT control packets keep the session alive, not WebSocket pings."""
    ws = WSClient(server.port)
    ws.handshake()
    peer = MQTTPeer(ws)
    peer.send(c.Connect(client_id="pings-only", keepalive=1))
    peer.expect(c.Connack)
    for _ in range(80):  # pings for longer than 1.5 s; the server must close meanwhile
        ws.send_event(Ping(payload=b"x"))
        try:
            ws.wait_event(Pong)
        except AssertionError:
            break  # closed
        if server.wait_no_connections(0.05):
            break
    assert server.wait_no_connections(3.0)


def test_large_messages_to_a_slow_reader_arrive_intact(server) -> None:
    """Output bigger than the socket buffers: partial frames are finished before anything else."""
    sub_ws, sub = connected(server.port, "slow-sub")
    sub.send(c.Subscribe(1, [c.Subscription("big/#", 0)]))
    sub.expect(c.Suback)
    _, pub = connected(server.port, "big-pub")
    rng = random.Random(7)
    payloads = [rng.randbytes(rng.choice([1, 300, 70000, 400000])) for _ in range(12)]
    for i, payload in enumerate(payloads):
        pub.send(c.Publish(f"big/{i}", payload))
    pub.send(c.Pingreq())
    pub.expect(c.Pingresp)  # the broker has routed them all
    sub_ws.send_event(Ping(payload=b"mid-frame"))  # a pong has to wait for a frame boundary
    got = [sub.expect(c.Publish).payload for _ in payloads]
    assert got == payloads
    assert sub_ws.wait_event(Pong).payload == b"mid-frame"


# -- the stream's write bookkeeping over inner streams that take chosen amounts ----------------------


class ScriptedInner:
    """An inner stream whose ``send_nowait`` takes at most ``budget`` bytes (TCP: any prefix; with
    ``all_or_nothing``, TLS: the whole buffer or nothing, and after a refusal the next write must
    start with the refused bytes and be at least as long, OpenSSL's retry rule)."""

    def __init__(self, all_or_nothing: bool) -> None:
        self.all_or_nothing = all_or_nothing
        self.budget = 0
        self.wire = bytearray()
        self.refused: bytes | None = None
        self.incoming: deque[bytes] = deque()
        self.peer = "scripted:0"

    def _check_retry(self, data) -> None:
        if self.refused is not None:
            assert bytes(data[: len(self.refused)]) == self.refused and len(data) >= len(self.refused), (
                "a refused TLS write was not retried with the same bytes"
            )
            self.refused = None

    def send_nowait(self, data) -> int:
        if self.all_or_nothing:
            self._check_retry(data)
            if len(data) > self.budget:
                self.refused = bytes(data)
                return 0
            n = len(data)
        else:
            n = min(len(data), self.budget)
        self.budget -= n
        self.wire += data[:n]
        return n

    def send_all(self, data, timeout) -> None:
        if self.all_or_nothing:
            self._check_retry(data)
        self.wire += data

    def recv(self, n: int) -> bytes:
        return self.incoming.popleft() if self.incoming else b""

    def settimeout(self, timeout) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def close(self) -> None:
        pass


def decode_server_frames(wire: bytes) -> tuple[bytes, list]:
    """What a client reads from the server's bytes: the binary payload stream and control events."""
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(bytes(wire))
    data = bytearray()
    controls = []
    for event in client.events():
        if isinstance(event, BytesMessage):
            data += event.data
        else:
            controls.append(event)
    return bytes(data), controls


op = st.one_of(
    st.tuples(st.just("data"), st.integers(1, 140000)),  # the connection buffers more output
    st.tuples(st.just("flush"), st.integers(0, 200000)),  # a send_nowait with that much room
    st.tuples(st.just("drain"), st.just(0)),  # the writer greenlet's send_all
    st.tuples(st.just("ping"), st.integers(0, 125)),  # the client pings (the reader answers)
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=25), all_or_nothing=st.booleans())
def test_framing_survives_any_sequence_of_partial_writes(ops, all_or_nothing: bool) -> None:
    inner = ScriptedInner(all_or_nothing)
    client = WSConnection(ConnectionType.CLIENT)
    stream = WebSocketStream(inner, _server_side_open(client))
    out = bytearray()  # the connection's output buffer, used as MQTTConnection uses it
    sent = bytearray()
    pings = []
    counter = 0
    for kind, arg in ops:
        if kind == "data":
            chunk = bytes((counter + i) % 251 for i in range(arg))
            counter += arg
            out += chunk
            sent += chunk
        elif kind == "flush":
            inner.budget = arg
            if out:
                n = stream.send_nowait(out)
                assert 0 <= n <= len(out)
                del out[:n]
        elif kind == "drain":
            if out:
                stream.send_all(bytes(out), None)
                out.clear()
        else:
            payload = bytes([arg % 256]) * (arg % 7)
            pings.append(payload)
            inner.incoming.append(client.send(Ping(payload=payload)) + client.send(BytesMessage(data=b"k")))
            assert stream.recv(65536) == b"k"
    if out:
        stream.send_all(bytes(out), None)
    stream.send_all(b"", None)  # pongs still queued behind the last frame
    data, controls = decode_server_frames(inner.wire)
    assert data == bytes(sent)
    assert [e.payload for e in controls if isinstance(e, Pong)] == pings


def _server_side_open(client: WSConnection) -> WSConnection:
    """A server WSConnection past the handshake with ``client`` (both in memory)."""
    from wsproto.events import Request

    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="x", target="/mqtt", subprotocols=["mqtt"])))
    next(server.events())
    client.receive_data(server.send(AcceptConnection(subprotocol="mqtt")))
    next(client.events())
    return server


def test_frame_header_lengths() -> None:
    assert frame_header(0) == b"\x82\x00"
    assert frame_header(125) == b"\x82\x7d"
    assert frame_header(126) == b"\x82\x7e\x00\x7e"
    assert frame_header(65535) == b"\x82\x7e\xff\xff"
    assert frame_header(65536) == b"\x82\x7f" + (65536).to_bytes(8, "big")


def test_a_parked_websocket_connection_wakes_for_pings_and_packets() -> None:
    """An idle connection parks (no greenlet); a ping or an MQTT packet wakes it, deliveries need neither."""
    with ws_server(park_after=0.05) as s:
        sub_ws, sub = connected(s.port, "parked-sub")
        sub.send(c.Subscribe(1, [c.Subscription("p/#", 0)]))
        sub.expect(c.Suback)
        assert wait_parked(s)
        sub_ws.send_event(Ping(payload=b"wake"))
        assert sub_ws.wait_event(Pong).payload == b"wake"
        assert wait_parked(s)
        _, pub = connected(s.port, "waker")
        pub.send(c.Publish("p/1", b"to a parked subscriber"))
        assert sub.expect(c.Publish).payload == b"to a parked subscriber"
        sub.send(c.Pingreq())
        sub.expect(c.Pingresp)
