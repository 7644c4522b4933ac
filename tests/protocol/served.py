"""A broker's client served as in the node, for the protocol tests: its ``MQTTConnection`` over one
end of a (gevent) socket pair, read by its own greenlet; the test holds the other end."""

from __future__ import annotations

import gevent
from gevent import socket

from fluxmq.broker.broker import Broker
from fluxmq.broker.session import EXPIRY_NEVER
from fluxmq.protocol.connection import MQTTConnection
from fluxmq.protocol.flush import FlushScheduler
from fluxmq.protocol.settings import ProtocolSettings
from fluxmq.transport.tcp import SocketStream


def serve(broker: Broker, flusher: FlushScheduler, client_id: str):
    """A connected client (as after CONNACK) served by its own reader greenlet; returns the
    connection, its reader and the client's socket."""
    server_side, client_side = socket.socketpair()
    conn = MQTTConnection(
        broker, SocketStream(server_side, ("127.0.0.1", 1)), ProtocolSettings(park_after=0), flusher
    )
    session, _ = broker.open_session(client_id, True, EXPIRY_NEVER)
    conn.version = 4
    conn.client_id = client_id
    conn.session = session
    broker.attach(session, conn, 100)
    return conn, gevent.spawn(conn.run), client_side


def read_exactly(sock, n: int) -> bytes:
    """``n`` bytes from ``sock`` (10 s at most; AssertionError if it closes first)."""
    data = b""
    with gevent.Timeout(10):
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "closed"
            data += chunk
    return data
