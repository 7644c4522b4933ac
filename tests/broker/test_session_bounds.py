"""Session bounds of the Broker: broker.max_sessions (new client ids refused past it) and
broker.max_session_expiry (every session's expiry capped, 3.1.1 persistent sessions included,
restored sessions too). In-memory storage unless a test says otherwise; real LMDB for restore."""

from __future__ import annotations

import time
from pathlib import Path

import gevent
import pytest

from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.broker.session import EXPIRY_NEVER
from fluxmq.errors import QuotaExceeded
from tests.broker.test_session import RecordingDelivery
from tests.storage.lmdb_node import Node


def connect(broker: Broker, cid: str, expiry: int, clean: bool = False):
    session, present = broker.open_session(cid, clean, expiry)
    d = RecordingDelivery()
    broker.attach(session, d, 10)
    return session, d, present


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        gevent.sleep(0.02)
    return condition()


def test_max_sessions_refuses_a_new_client_id_with_quota_exceeded() -> None:
    broker = Broker(BrokerSettings(max_sessions=2))
    connect(broker, "a", 60)
    connect(broker, "b", 0)
    with pytest.raises(QuotaExceeded, match="max_sessions"):
        broker.open_session("c", True, 0)
    assert set(broker.sessions) == {"a", "b"}


def test_max_sessions_lets_existing_ids_reconnect_and_take_over() -> None:
    broker = Broker(BrokerSettings(max_sessions=2))
    a, da, _ = connect(broker, "a", 60)
    connect(broker, "b", 60)
    broker.close_session(a, da, publish_will=False)
    _, _, present = connect(broker, "a", 60)  # resumes its offline session
    assert present
    _, _, present = connect(broker, "b", 60, clean=True)  # takeover with clean start: a new session, same id
    assert not present and set(broker.sessions) == {"a", "b"}


def test_max_sessions_room_frees_when_a_session_ends() -> None:
    broker = Broker(BrokerSettings(max_sessions=1))
    a, da, _ = connect(broker, "a", 0)
    broker.close_session(a, da, publish_will=False)  # expiry 0: the session ends with the connection
    connect(broker, "b", 0)
    assert set(broker.sessions) == {"b"}


def test_max_sessions_0_is_no_limit() -> None:
    broker = Broker(BrokerSettings(max_sessions=0))
    for i in range(50):
        connect(broker, f"c{i}", 60)
    assert len(broker.sessions) == 50


def test_max_session_expiry_caps_a_requested_expiry() -> None:
    broker = Broker(BrokerSettings(max_session_expiry=3600))
    s, _, _ = connect(broker, "long", 86400)
    assert s.expiry_interval == 3600
    s, _, _ = connect(broker, "short", 60)
    assert s.expiry_interval == 60
    s, _, _ = connect(broker, "clean", 0)
    assert s.expiry_interval == 0  # a clean session stays one
    assert broker.capped_expiry(EXPIRY_NEVER) == 3600


def test_3_1_1_persistent_session_expires_after_max_session_expiry() -> None:
    """A 3.1.1 clean session 0 asks for EXPIRY_NEVER; the cap makes it expire like Mosquitto's
    persistent_client_expiration."""
    broker = Broker(BrokerSettings(max_session_expiry=1))
    s, d, _ = connect(broker, "v311", EXPIRY_NEVER)
    assert s.expiry_interval == 1
    broker.close_session(s, d, publish_will=False)
    assert "v311" in broker.sessions
    assert wait_until(lambda: "v311" not in broker.sessions)


def test_restored_sessions_honour_the_expiry_cap(tmp_path: Path) -> None:
    node = Node(tmp_path / "data")
    s, d, _ = node.connect("forever", EXPIRY_NEVER)
    node.disconnect(s, d)
    s, d, _ = node.connect("day", 86400)
    node.disconnect(s, d)
    node.storage.abort()
    node = Node(tmp_path / "data", max_session_expiry=3600)
    try:
        assert node.broker.sessions["forever"].expiry_interval == 3600
        assert node.broker.sessions["day"].expiry_interval == 3600
    finally:
        node.storage.abort()


def test_restored_session_offline_longer_than_the_cap_is_gone(tmp_path: Path) -> None:
    node = Node(tmp_path / "data")
    s, d, _ = node.connect("old", EXPIRY_NEVER)
    node.disconnect(s, d)
    node.storage.abort()
    time.sleep(1.1)  # offline for longer than the cap below (wall clock, as across a downtime)
    node = Node(tmp_path / "data", max_session_expiry=1)
    try:
        assert "old" not in node.broker.sessions
    finally:
        node.storage.abort()
