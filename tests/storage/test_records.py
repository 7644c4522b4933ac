"""Record formats of fluxmq/storage/records.py: round trips, versions, damage."""

from __future__ import annotations

import time

import pytest

from fluxmq.broker.message import Message
from fluxmq.storage import records as r


def _props() -> dict:
    return {
        0x01: 1,
        0x03: "text/plain",
        0x08: "reply/here",
        0x09: b"\x00corr\xff",
        0x26: [("k", "v"), ("k", "v2"), ("ü", "")],
    }


def test_message_round_trip_keeps_every_field() -> None:
    m = Message("a/b/ü", b"\x00payload\xff" * 10, 2, True, _props(), time.monotonic() + 100, "client-1")
    topic, payload, qos, retain, props, expires_at, origin = r.decode_message(r.encode_message(m))
    assert (topic, payload, qos, retain, origin) == ("a/b/ü", m.payload, 2, True, "client-1")
    assert props == _props()
    assert abs(expires_at - m.expires_at) < 0.05


def test_message_without_optional_fields() -> None:
    m = Message("t", b"", 0, False)
    assert r.decode_message(r.encode_message(m)) == ("t", b"", 0, False, None, None, None)


def test_encoded_message_is_cached_for_fan_out() -> None:
    m = Message("t", b"x", 1)
    blob = r.encode_message(m)
    assert m.wire_cache[r.CACHE_KEY] is blob
    assert r.encode_message(m) is blob


def test_entry_round_trip_with_subscription_ids_and_release() -> None:
    m = Message("t", b"p", 2)
    entry = r.encode_entry(m, 1, True, (3, 70000))
    fields, qos, retain, ids, released = r.decode_entry(entry)
    assert (fields[0], qos, retain, ids, released) == ("t", 1, True, (3, 70000), False)
    assert r.entry_qos(entry) == 1
    assert r.decode_entry(r.mark_released(entry))[4] is True


def test_session_subscription_will_round_trip() -> None:
    assert r.decode_session(r.encode_session(3600, 12.5, "user")) == (3600, 12.5, "user")
    assert r.decode_session(r.encode_session(0xFFFFFFFF, 0.0, None)) == (0xFFFFFFFF, 0.0, None)
    assert r.decode_subscription(r.encode_subscription(2, True, True, 2, 77)) == (2, True, True, 2, 77)
    fields, delay = r.decode_will(r.encode_will(Message("w", b"gone", 1, True), 30))
    assert (fields[0], fields[1], fields[2], fields[3], delay) == ("w", b"gone", 1, True, 30)


def test_unknown_format_version_is_refused() -> None:
    blob = bytearray(r.encode_message(Message("t", b"x")))
    blob[0] = r.FORMAT + 1
    with pytest.raises(r.RecordError):
        r.decode_message(bytes(blob))
    session = bytearray(r.encode_session(1, 0.0, None))
    session[0] = 9
    with pytest.raises(r.RecordError):
        r.decode_session(bytes(session))


def test_truncated_message_is_refused() -> None:
    blob = r.encode_message(Message("topic", b"payload"))
    with pytest.raises(r.RecordError):
        r.decode_message(blob[:-1])


def test_keys_sort_numerically_and_split() -> None:
    prefix = r.client_prefix("c")
    keys = [r.seq_key(prefix, s) for s in (1, 255, 256, 70000)]
    assert keys == sorted(keys)
    assert r.split_key(keys[2]) == ("c", keys[2][2:])
    assert r.key_seq(r.split_key(keys[3])[1]) == 70000
    assert r.key_pid(r.split_key(r.pid_key(prefix, 513))[1]) == 513


def test_entries_of_plain_messages_match_the_general_encoding() -> None:
    # encode_entry builds entries of messages without properties or expiry from constant headers;
    # they must be byte for byte what the general encoder writes (and decode back).
    for qos in (0, 1, 2):
        for retain in (False, True):
            for origin in (None, "client-\u00e9"):
                fast = r.encode_entry(
                    Message("a/b", b"p" * 70, qos, not retain, origin=origin), qos, retain, None
                )
                general = r._ENTRY.pack(r.FORMAT, qos, int(retain), 0) + r.encode_message(
                    Message("a/b", b"p" * 70, qos, not retain, origin=origin)
                )
                assert fast == general
                fields, q, ret, ids, released = r.decode_entry(fast)
                assert fields == ("a/b", b"p" * 70, qos, not retain, None, None, origin)
                assert (q, ret, ids, released) == (qos, retain, None, False)
