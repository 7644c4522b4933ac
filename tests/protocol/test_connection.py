"""MQTTConnection as the broker's Delivery: a real connection over a socket pair, a real Broker on a
real LMDBStorage.

A connection is ``closed`` well before its teardown detaches the session (a failed send, a drain
timeout, an admin kick, a limit, the fsync wait under ``sync: always``). Meanwhile it can take
nothing more, but that is "not now", not "never": a QoS 1/2 message for it must stay with the
session (a persistent one delivers it on reconnect), not be dropped as if too large.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from gevent import socket

from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.broker.message import Message
from fluxmq.broker.session import EXPIRY_NEVER, PersistentSession
from fluxmq.protocol.connection import MQTTConnection
from fluxmq.protocol.flush import FlushScheduler
from fluxmq.protocol.settings import ProtocolSettings
from fluxmq.storage.lmdb import LMDBStorage
from fluxmq.transport.tcp import SocketStream
from tests.broker.test_session import RecordingDelivery


@pytest.fixture
def broker(tmp_path: Path):
    storage = LMDBStorage(tmp_path / "data", map_size=16 << 20)
    b = Broker(BrokerSettings(), storage)
    b.restore(storage.load())
    yield b
    storage.close()


def attached_connection(
    broker: Broker,
    client_id: str,
    closed: bool = False,
) -> tuple[MQTTConnection, PersistentSession, socket.socket]:
    """A connection whose CONNECT was accepted (as ``_accept`` leaves it), and the client's socket;
    ``closed``: the connection was closed before the session was attached (a kick right after CONNACK)."""
    server_side, client_side = socket.socketpair()
    conn = MQTTConnection(
        broker,
        SocketStream(server_side, ("127.0.0.1", 1)),
        ProtocolSettings(),
        FlushScheduler(broker.storage),
    )
    session, _ = broker.open_session(client_id, False, EXPIRY_NEVER)
    conn.version = 4
    conn.client_id = client_id
    conn.session = session
    conn.closed = closed
    broker.attach(session, conn, 100)
    assert isinstance(session, PersistentSession)
    return conn, session, client_side


def test_qos1_for_a_closing_connection_stays_queued_and_is_delivered_on_reconnect(broker: Broker) -> None:
    conn, session, client_side = attached_connection(broker, "c1")
    broker.subscribe(session, "t", 1)
    conn.closed = True  # as after a failed send: the session is still attached until teardown
    assert broker.publish(Message("t", b"m1", 1)) == 1
    assert broker.publish(Message("t", b"m2", 2)) == 1
    assert "packet_too_large" not in broker.stats.drops
    assert len(session.queue) == 2 and not session.inflight
    broker.close_session(session, conn, False)  # teardown
    client_side.close()

    session2, present = broker.open_session("c1", False, EXPIRY_NEVER)
    assert present and session2 is session
    d = RecordingDelivery()
    broker.attach(session2, d, 100)
    assert [(topic, qos) for topic, qos, *_ in d.sent] == [("t", 1), ("t", 1)]


def test_inflight_resend_to_a_closing_connection_keeps_the_message_in_flight(broker: Broker) -> None:
    first = RecordingDelivery()
    session, _ = broker.open_session("c2", False, EXPIRY_NEVER)
    broker.attach(session, first, 100)
    broker.subscribe(session, "t", 1)
    broker.publish(Message("t", b"m", 1))
    assert list(session.inflight) == [1]
    broker.close_session(session, first, False)

    conn, session2, client_side = attached_connection(broker, "c2", closed=True)
    assert session2 is session
    assert list(session.inflight) == [1]
    assert "packet_too_large" not in broker.stats.drops
    broker.close_session(session, conn, False)
    client_side.close()
