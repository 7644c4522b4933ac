"""fluxmq/_core/entry.pyx: the Cython entry encoder writes exactly the records.py format."""

from __future__ import annotations

import struct
import time

import pytest

from fluxmq._core.entry import plain_entry
from fluxmq.broker.message import Message
from fluxmq.storage import records as r

_ENTRY = struct.Struct("<BBBH")


def _reference(message: Message, qos: int, retain: bool) -> bytes:
    """The general (pure Python) layout: entry header, then the message blob."""
    fresh = message.copy()
    return _ENTRY.pack(r.FORMAT, qos, 1 if retain else 0, 0) + r.encode_message(fresh)


@pytest.mark.parametrize("topic", ["t", "a/b/ü/€", "x" * 300])
@pytest.mark.parametrize("origin", [None, "", "pub", "client-ü"])
@pytest.mark.parametrize("payload", [b"", b"\x00\xff" * 40, bytes(70000)])
@pytest.mark.parametrize("msg_qos,msg_retain", [(0, False), (1, True), (2, False)])
@pytest.mark.parametrize("qos,retain", [(0, False), (1, False), (1, True), (2, True)])
def test_plain_entry_matches_the_python_layout(
    topic, origin, payload, msg_qos, msg_retain, qos, retain
) -> None:
    m = Message(topic, payload, msg_qos, msg_retain, origin=origin)
    entry = r.encode_entry(m, qos, retain, None)
    assert entry == _reference(m, qos, retain)
    fields, got_qos, got_retain, ids, released = r.decode_entry(entry)
    assert fields == (topic, payload, msg_qos, msg_retain, None, None, origin or None)
    assert (got_qos, got_retain, ids, released) == (qos, retain, None, False)


def test_plain_entry_is_encoded_once_per_shape() -> None:
    m = Message("t", b"p", 1, origin="pub")
    first = r.encode_entry(m, 1, False, None)
    assert r.encode_entry(m, 1, False, None) is first  # the fan-out to the next persistent session
    assert r.encode_entry(m, 1, True, None) is not first
    m.wire_cache["other"] = b"protocol layer's"  # the cache is shared with the wire encodings
    assert r.encode_entry(m, 1, False, None) is first


def test_messages_that_are_not_plain_go_to_the_general_encoder() -> None:
    with_props = Message("t", b"p", 1, properties={0x03: "text/plain"})
    with_expiry = Message("t", b"p", 1, expires_at=time.monotonic() + 60)
    with_buffer = Message("t", bytearray(b"p"), 1)
    for m in (with_props, with_expiry, with_buffer):
        assert plain_entry(m, 1, False) is None
        assert m.wire_cache is None  # untouched
        entry = r.encode_entry(m, 1, False, None)
        assert r.decode_entry(entry)[0][:4] == ("t", b"p", 1, False)
    assert r.decode_entry(r.encode_entry(with_props, 1, False, None))[0][4] == {0x03: "text/plain"}


def test_too_long_fields_are_refused() -> None:
    with pytest.raises(OverflowError):
        plain_entry(Message("t" * 0x10000, b"", 1), 1, False)
    with pytest.raises(ValueError):
        plain_entry(Message("t", b"", 1), 3, False)
