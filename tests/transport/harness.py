"""In-process listeners and gevent test clients for the transport tests.

The broker, a ``TCPListener`` with a stream factory and the clients all run on this process's gevent
hub (no monkey patching): clients use gevent sockets, so waiting for a reply lets the listener's
greenlets run. Every wait is bounded by ``WAIT``; nothing sleeps for a fixed time to make a test pass.

::

    with InProcessListener(WebSocketUpgrade("/mqtt", [], 5.0, "ws")) as server:
        ws = WSClient(server.port)
        assert isinstance(ws.handshake(), AcceptConnection)
        peer = MQTTPeer(ws)
        peer.send(c.Connect(client_id="a"))
        peer.expect(c.Connack)
"""

from __future__ import annotations

import ssl

import gevent
from gevent import socket as gsocket
from gevent import ssl as gssl
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
)

from fluxmq._core import codec as c
from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.protocol.flush import FlushScheduler
from fluxmq.protocol.settings import ProtocolSettings
from fluxmq.transport.tcp import TCPListener

HOST = "127.0.0.1"
WAIT = 10.0


class InProcessListener:
    """A broker (over ``storage``, or in memory) and one TCPListener on a free 127.0.0.1 port,
    served by this process's hub."""

    def __init__(self, stream_factory=None, storage=None, **settings: object) -> None:
        self.broker = Broker(BrokerSettings(), storage)
        if storage is not None:
            self.broker.restore(storage.load())
        self.settings = ProtocolSettings(**settings)
        self.listener = TCPListener(
            "test",
            HOST,
            0,
            self.broker,
            self.settings,
            FlushScheduler(storage),
            stream_factory=stream_factory,
        )
        self.listener.start()
        self.port = self.listener.address[1]

    def stop(self) -> None:
        self.listener.stop_accepting()
        self.broker.shutdown()
        for conn in list(self.listener.connections):
            conn.close(0x8B, "test over")
        self.listener.wait_closed(WAIT)

    def wait_no_connections(self, timeout: float = WAIT) -> bool:
        return self.listener.wait_closed(timeout)

    def __enter__(self) -> InProcessListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tcp_connect(port: int) -> gsocket.socket:
    sock = gsocket.create_connection((HOST, port), timeout=WAIT)
    sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
    return sock


def tls_connect(port: int, ca_file: str | None, cert=None, server_hostname: str = "localhost"):
    """A TLS client socket (handshake done); ``cert`` is an ``Issued`` client certificate or None."""
    ctx = gssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_file:
        ctx.load_verify_locations(ca_file)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        ctx.load_cert_chain(cert.cert_file, cert.key_file)
    sock = tcp_connect(port)
    return ctx.wrap_socket(sock, server_hostname=server_hostname)


class SocketTransport:
    """Bytes over a (TLS) socket, the interface MQTTPeer drives."""

    def __init__(self, sock) -> None:
        self.sock = sock

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout: float = WAIT) -> bytes:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65536)
        except (ConnectionError, ssl.SSLError):
            return b""

    def close(self) -> None:
        self.sock.close()


class WSClient:
    """A WebSocket client driven with wsproto over a gevent (TLS) socket."""

    def __init__(
        self,
        port: int,
        path: str = "/mqtt",
        subprotocols: tuple[str, ...] = ("mqtt",),
        origin: str | None = None,
        sock=None,
    ) -> None:
        self.sock = sock if sock is not None else tcp_connect(port)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.path = path
        self.subprotocols = list(subprotocols)
        self.origin = origin
        self.pending: list = []  # events other than data, in arrival order (Pong, CloseConnection, ...)
        self.reject_status: int | None = None
        self.reject_body = b""
        self.accepted: AcceptConnection | None = None
        self.data = bytearray()  # binary payload received and not yet returned by recv
        self.eof = False

    def handshake(self, timeout: float = WAIT):
        """Send the upgrade request; returns AcceptConnection or RejectConnection."""
        headers = [(b"origin", self.origin.encode())] if self.origin else []
        self.sock.sendall(
            self.ws.send(
                Request(
                    host="localhost", target=self.path, subprotocols=self.subprotocols, extra_headers=headers
                )
            )
        )
        with gevent.Timeout(timeout, AssertionError("no handshake answer")):
            while True:
                data = self.sock.recv(65536)
                self.ws.receive_data(data or None)
                result = None
                for event in self.ws.events():
                    if isinstance(event, AcceptConnection):
                        self.accepted = event
                        result = event
                    elif isinstance(event, RejectConnection):
                        self.reject_status = event.status_code
                        result = event
                        if not event.has_body:
                            return result
                    elif isinstance(event, RejectData):
                        self.reject_body += event.data
                        if event.body_finished:
                            return RejectConnection(status_code=self.reject_status)
                    else:
                        self.pending.append(event)
                if isinstance(result, AcceptConnection):
                    return result
                if not data:
                    return result

    def send(self, data: bytes, frame_size: int | None = None) -> None:
        """``data`` as one binary message: one frame, or continuation frames of ``frame_size`` bytes."""
        if frame_size is None:
            self.sock.sendall(self.ws.send(BytesMessage(data=data)))
            return
        out = bytearray()
        for i in range(0, len(data), frame_size):
            chunk = data[i : i + frame_size]
            out += self.ws.send(BytesMessage(data=chunk, message_finished=i + frame_size >= len(data)))
        self.sock.sendall(bytes(out))

    def send_event(self, event) -> None:
        self.sock.sendall(self.ws.send(event))

    def _read_once(self) -> None:
        """One socket read: binary payload to ``data``, other events to ``pending`` (pings answered)."""
        try:
            raw = self.sock.recv(65536)
        except (ConnectionError, ssl.SSLError):
            raw = b""
        if not raw:
            self.eof = True
            return
        self.ws.receive_data(raw)
        for event in self.ws.events():
            if isinstance(event, Message):
                assert isinstance(event, BytesMessage), f"server sent {event!r}"
                self.data += event.data
            else:
                self.pending.append(event)
                if isinstance(event, CloseConnection):
                    self.eof = True
                if isinstance(event, Ping):
                    self.sock.sendall(self.ws.send(event.response()))

    def recv(self, timeout: float = WAIT) -> bytes:
        """Payload bytes of binary data received so far or next; b"" at close/EOF."""
        with gevent.Timeout(timeout, AssertionError("nothing received")):
            while not self.data and not self.eof:
                self._read_once()
        data = bytes(self.data)
        self.data.clear()
        return data

    def wait_event(self, kind: type, timeout: float = WAIT):
        """The first pending event of ``kind``, reading until it comes (data read meanwhile is kept)."""
        with gevent.Timeout(timeout, AssertionError(f"no {kind.__name__} within {timeout}s")):
            while True:
                for i, event in enumerate(self.pending):
                    if isinstance(event, kind):
                        return self.pending.pop(i)
                if self.eof:
                    raise AssertionError(f"closed before a {kind.__name__}: {self.pending!r}")
                self._read_once()

    def close(self) -> None:
        self.sock.close()


class MQTTPeer:
    """MQTT packets over a transport with ``send(bytes)`` and ``recv(timeout) -> bytes``."""

    def __init__(self, transport, version: int = 4) -> None:
        self.transport = transport
        self.version = version
        self.decoder = c.Decoder(version=version)
        self.packets: list = []
        self.closed = False

    def send(self, *packets) -> None:
        self.transport.send(b"".join(c.encode(p, self.version) for p in packets))

    def recv(self, timeout: float = WAIT):
        while not self.packets:
            data = self.transport.recv(timeout)
            if not data:
                self.closed = True
                raise ConnectionError("closed by the server")
            self.packets.extend(self.decoder.feed(data))
        return self.packets.pop(0)

    def expect(self, kind: type, timeout: float = WAIT):
        packet = self.recv(timeout)
        assert isinstance(packet, kind), f"expected {kind.__name__}, got {packet!r}"
        return packet

    def connect(self, client_id: str, username: str | None = None):
        self.send(
            c.Connect(client_id=client_id, keepalive=60, protocol_version=self.version, username=username)
        )
        connack = self.expect(c.Connack)
        assert connack.reason_code == 0, connack
        return connack

    def wait_closed(self, timeout: float = WAIT) -> bool:
        """True once the server closed the connection (packets until then are kept)."""
        with gevent.Timeout(timeout, False):
            while True:
                data = self.transport.recv(timeout)
                if not data:
                    self.closed = True
                    return True
                self.packets.extend(self.decoder.feed(data))
        return False


__all__ = [
    "HOST",
    "WAIT",
    "InProcessListener",
    "MQTTPeer",
    "Pong",
    "SocketTransport",
    "WSClient",
    "tcp_connect",
    "tls_connect",
]


def wait_parked(server: InProcessListener, timeout: float = WAIT) -> bool:
    """True once every connection of ``server`` is parked (its greenlet ended, a watcher waits)."""
    with gevent.Timeout(timeout, False):
        while not server.listener.connections or any(
            getattr(conn, "_parked", None) is None for conn in server.listener.connections
        ):
            gevent.sleep(0.01)
        return True
    return False
