"""A connection's pending-output allowance (``broker.write_buffer_high``) grows from the node's output
budget while its client keeps reading, and stays put once the client has taken nothing for
``_READING_WITHIN`` seconds (issue 16).

The client's socket is a real one with small kernel buffers, so a write the kernel cannot take at
once starts the connection's drain greenlet exactly as in the node. No timing: "a second ago" is
set on the connection, never waited for.
"""

from __future__ import annotations

import socket as stdsocket
import time
from pathlib import Path

import gevent
import pytest
from gevent import socket

from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.broker.session import EXPIRY_NEVER
from fluxmq.protocol import connection as connection_module
from fluxmq.protocol.connection import MQTTConnection
from fluxmq.protocol.flush import FlushScheduler
from fluxmq.protocol.settings import ProtocolSettings
from fluxmq.storage.lmdb import LMDBStorage
from fluxmq.transport.tcp import SocketStream

BASE = 64 << 10  # the connection's write_buffer_high
BUDGET = 64 << 20  # the node's output_memory_limit


@pytest.fixture
def broker(tmp_path: Path):
    storage = LMDBStorage(tmp_path / "data", map_size=16 << 20)
    b = Broker(BrokerSettings(), storage)
    b.restore(storage.load())
    b.stats.output_budget.limit = BUDGET
    yield b
    storage.close()


@pytest.fixture
def conn_and_client(broker: Broker):
    server_side, client_side = socket.socketpair()
    for s, opt in ((server_side, stdsocket.SO_SNDBUF), (client_side, stdsocket.SO_RCVBUF)):
        s.setsockopt(stdsocket.SOL_SOCKET, opt, 4096)
    conn = MQTTConnection(
        broker,
        SocketStream(server_side, ("127.0.0.1", 1)),
        ProtocolSettings(park_after=0, write_buffer_high=BASE),
        FlushScheduler(broker.storage),
    )
    session, _ = broker.open_session("reader", True, EXPIRY_NEVER)
    conn.version = 4
    conn.client_id = "reader"
    conn.session = session
    broker.attach(session, conn, 100)
    yield conn, client_side
    client_side.close()
    conn.closed = True
    if conn._writer is not None:
        conn._writer.kill()
    server_side.close()


def _start_drain(conn: MQTTConnection) -> None:
    """More output than the kernel takes at once: the connection's drain greenlet starts."""
    conn.out += b"x" * (BASE // 2)
    conn.flush_nowait()
    assert conn._writer is not None and conn.out, "the kernel took everything: no drain started"


def test_a_client_whose_drain_just_started_grows_its_allowance(conn_and_client, broker: Broker) -> None:
    """The first congestion of a reading client: the drain greenlet has started, no chunk of it is
    done yet. The client took everything before (no writer was running), so it counts as reading
    and its allowance grows instead of its messages going to the 1,000-message session queue,
    where a fan-in burst overflowed it (lost QoS 0 messages in CI under load)."""
    conn, _ = conn_and_client
    _start_drain(conn)
    conn.out += b"y" * BASE  # past the base allowance
    assert not conn.is_congested()
    assert conn._high == 2 * BASE
    budget = broker.stats.output_budget
    assert (budget.grants, budget.in_use) == (1, BASE)


def test_a_client_that_took_nothing_for_a_while_keeps_its_allowance(conn_and_client, broker: Broker) -> None:
    conn, _ = conn_and_client
    _start_drain(conn)
    conn._progress_at = time.monotonic() - 2 * connection_module._READING_WITHIN  # "two seconds ago"
    conn.out += b"y" * BASE
    assert conn.is_congested()
    assert conn._high == BASE
    assert broker.stats.output_budget.grants == 0


def test_the_allowance_goes_back_to_the_budget_when_the_client_drains(
    conn_and_client, broker: Broker
) -> None:
    conn, client = conn_and_client
    _start_drain(conn)
    conn.out += b"y" * BASE
    assert not conn.is_congested()
    pending = len(conn.out) + 4096  # what is queued here, plus at most the kernel's buffers
    got = 0
    with gevent.Timeout(10):
        while conn._writer is not None or conn.out:
            got += len(client.recv(1 << 16))
            assert got <= pending + (1 << 16)
    assert conn._high == BASE
    assert broker.stats.output_budget.in_use == 0
