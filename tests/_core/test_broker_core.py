"""``_core.broker_core``: the typed state of the broker, router, route and session that the relay
reads as C struct fields; Python code sees the fields as attributes, with their C types."""

from __future__ import annotations

from collections import deque

import pytest

from fluxmq._core.broker_core import BrokerCore, RouteCore, RouterCore, SessionCore
from fluxmq._core.codec import Puback
from fluxmq._core.conn_state import ConnState
from fluxmq._core.relay import PublishRelay
from fluxmq.broker.broker import Broker
from fluxmq.broker.message import Message
from fluxmq.broker.router import Route, Router
from fluxmq.broker.session import Inflight, PersistentSession, Session, SessionLimits
from fluxmq.broker.stats import BrokerStats


def test_the_broker_layer_classes_have_the_typed_bases() -> None:
    broker = Broker()
    assert isinstance(broker, BrokerCore) and isinstance(broker.router, RouterCore)
    assert broker.peers is None and broker._on_published is None and broker.queues is None
    assert broker.router._generation == -1 and broker.router._routes == {}
    assert issubclass(Route, RouteCore) and issubclass(PersistentSession, SessionCore)
    route = broker.router.route("a/b")
    assert type(route) is Route and route.targets == [] and route.groups == []
    broker.router.invalidate()
    assert broker.router._generation == -1


def test_the_session_fields_are_attributes_with_their_c_types() -> None:
    s = Session("c", SessionLimits(7, 10, 1000, "drop_new"), BrokerStats())
    assert (s.delivery, s.queue, s.inflight, s.send_quota, s._next_pid) == (None, (), {}, 7, 1)
    s.queue = deque([1])
    s.send_quota = 3
    s._next_pid = 65535
    assert (s.queue, s.send_quota, s._next_pid) == (deque([1]), 3, 65535)
    with pytest.raises(TypeError):
        s.inflight = [1]
    with pytest.raises(TypeError):
        s.send_quota = "3"
    with pytest.raises(TypeError):
        Router().trie = object()


def test_the_relay_refuses_session_classes_without_the_typed_state() -> None:
    class Plain:
        __slots__ = ()

    conn = type("Conn", (ConnState,), {"__slots__": ()})
    with pytest.raises(TypeError):
        PublishRelay(conn, Plain, Message, Inflight, Puback, 0)
    with pytest.raises(TypeError):
        PublishRelay(conn, Session, Message, Inflight, Puback, 0, persistent_class=Plain)
    PublishRelay(conn, Session, Message, Inflight, Puback, 0, persistent_class=PersistentSession)
