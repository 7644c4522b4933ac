"""Framing of forwarded messages: one bytes field per batch, expiry as time remaining."""

from __future__ import annotations

from fluxmq.broker.message import Message
from fluxmq.cluster.batch import BatchError, Outgoing, build_batch, decode_items
from fluxmq.storage.records import encode_message


def test_expiry_travels_as_time_remaining() -> None:
    m = Message("t", b"x", 1, expires_at=1000.0)
    entry = Outgoing(encode_message(m), (), True, m.expires_at)
    b, expired = build_batch("n1", 1, 1, [entry], now=990.0)
    assert expired == 0 and b.count == 1
    [(m, _groups, _match)] = list(decode_items(b.items, now=50.0))
    assert m.expires_at == 60.0  # 10 s left when sent, counted from the receiver's clock
    b, expired = build_batch("n1", 1, 2, [entry], now=1001.0)
    assert expired == 1 and b.count == 0 and b.items == b""  # expired while queued: not sent


def test_framing_keeps_groups_and_flags_and_refuses_a_damaged_batch() -> None:
    entries = [
        Outgoing(encode_message(Message("a", b"1", 0)), ("$share/g/a", "$share/h/#"), False, None),
        Outgoing(encode_message(Message("b", b"2", 2, True)), (), True, None),
    ]
    data = build_batch("n1", 1, 1, entries)[0].items
    got = [(m.topic, m.payload, m.qos, m.retain, g, ml) for m, g, ml in decode_items(data)]
    assert got == [("a", b"1", 0, False, ("$share/g/a", "$share/h/#"), False), ("b", b"2", 2, True, (), True)]
    for cut in (5, len(data) - 3):
        try:
            list(decode_items(data[:cut]))
        except BatchError:
            continue
        raise AssertionError(f"a batch cut at {cut} bytes decoded")
