"""``_core.conn_state.ConnState``: the typed fields of an MQTT connection that the relay reads as C
struct fields, and the relay's refusal of a connection class without them."""

from __future__ import annotations

import pytest

from fluxmq._core.codec import Puback
from fluxmq._core.conn_state import ConnState
from fluxmq._core.relay import PublishRelay
from fluxmq.broker.message import Message
from fluxmq.broker.session import Inflight, Session


def test_the_fields_are_attributes_of_a_python_subclass_with_their_c_types() -> None:
    class Conn(ConnState):
        __slots__ = ("peer",)

    conn = Conn()
    assert conn._fd == -1 and conn.out is None and not conn.closed and conn.version == 0
    conn.out = bytearray(b"x")
    conn.out += b"y"
    conn.version = 5
    conn._npk += 2
    conn.closed = True
    assert (conn.out, conn.version, conn._npk, conn.closed) == (bytearray(b"xy"), 5, 2, True)
    with pytest.raises(TypeError):
        conn.out = b"bytes, not a bytearray"
    with pytest.raises(TypeError):
        conn.version = "5"


def test_the_relay_refuses_a_connection_class_without_the_typed_state() -> None:
    class Plain:
        __slots__ = ()

    with pytest.raises(TypeError):
        PublishRelay(Plain, Session, Message, Inflight, Puback, 0)
    PublishRelay(type("Conn", (ConnState,), {"__slots__": ()}), Session, Message, Inflight, Puback, 0)
