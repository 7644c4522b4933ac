"""SessionState codec (fluxmq/broker/session_state.py): every field survives a round trip, and
damaged or foreign bytes are refused with SessionStateError, never anything else."""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fluxmq.broker.message import (
    CONTENT_TYPE,
    CORRELATION_DATA,
    MESSAGE_EXPIRY_INTERVAL,
    PAYLOAD_FORMAT_INDICATOR,
    RESPONSE_TOPIC,
    USER_PROPERTY,
    Message,
)
from fluxmq.broker.session_state import (
    MAGIC,
    VERSION,
    InflightState,
    QueuedState,
    SessionState,
    SessionStateError,
    SubscriptionState,
    decode_session_state,
    encode_session_state,
    queued_item,
)
from fluxmq.storage import records as r

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)
u16 = st.integers(1, 0xFFFF)
sub_ids = st.none() | st.lists(st.integers(1, 268_435_455), min_size=1, max_size=3).map(tuple)

properties = st.none() | st.fixed_dictionaries(
    {},
    optional={
        PAYLOAD_FORMAT_INDICATOR: st.integers(0, 1),
        CONTENT_TYPE: text,
        RESPONSE_TOPIC: text,
        CORRELATION_DATA: st.binary(max_size=20),
        USER_PROPERTY: st.lists(st.tuples(text, text), min_size=1, max_size=3),
        MESSAGE_EXPIRY_INTERVAL: st.integers(0, 0xFFFFFFFF),  # a will keeps it in its properties
    },
).map(lambda d: d or None)


@st.composite
def messages(draw) -> Message:
    expiry = draw(st.none() | st.floats(-100, 1e6))
    return Message(
        draw(text.filter(bool)),
        draw(st.binary(max_size=64)),
        draw(st.integers(0, 2)),
        draw(st.booleans()),
        draw(properties),
        None if expiry is None else time.monotonic() + expiry,
        draw(st.none() | text.filter(bool)),
    )


subscriptions = st.builds(
    SubscriptionState,
    text.filter(bool),
    st.integers(0, 2),
    st.booleans(),
    st.booleans(),
    st.integers(0, 2),
    st.integers(0, 268_435_455),
    st.none() | text.filter(bool),
)


@st.composite
def states(draw) -> SessionState:
    pids = draw(st.lists(u16, unique=True, max_size=5))
    inflight = [
        InflightState(
            pid,
            draw(messages()),
            draw(st.integers(1, 2)),
            draw(st.booleans()),
            draw(sub_ids),
            draw(st.booleans()),
        )
        for pid in pids
    ]
    queued = draw(
        st.lists(st.builds(QueuedState, messages(), st.integers(0, 2), st.booleans(), sub_ids), max_size=5)
    )
    will = draw(st.none() | st.tuples(messages(), st.integers(0, 0xFFFFFFFF)))
    return SessionState(
        draw(text),
        draw(st.none() | text),
        draw(st.integers(0, 0xFFFFFFFF)),
        draw(st.sampled_from([0.0, time.time() - 5])),
        draw(st.booleans()),
        draw(u16),
        draw(st.lists(subscriptions, max_size=5)),
        inflight,
        sorted(draw(st.sets(u16, max_size=5))),
        queued,
        will,
        draw(st.lists(st.tuples(text, text, st.booleans()), max_size=3)),
    )


def same_message(a: Message, b: Message) -> None:
    assert (a.topic, a.payload, a.qos, a.retain, a.properties, a.origin) == (
        b.topic,
        b.payload,
        b.qos,
        b.retain,
        b.properties,
        b.origin,
    )
    if a.expires_at is None:
        assert b.expires_at is None
    else:  # stored as wall-clock time, read back as a monotonic deadline
        assert b.expires_at == pytest.approx(a.expires_at, abs=0.01)


def assert_same(a: SessionState, b: SessionState) -> None:
    assert (a.client_id, a.username, a.expiry_interval, a.disconnected_at, a.connected, a.next_packet_id) == (
        b.client_id,
        b.username,
        b.expiry_interval,
        b.disconnected_at,
        b.connected,
        b.next_packet_id,
    )
    assert a.subscriptions == b.subscriptions
    assert a.inbound_qos2 == b.inbound_qos2
    assert len(a.inflight) == len(b.inflight)
    for x, y in zip(a.inflight, b.inflight, strict=True):
        assert (x.packet_id, x.qos, x.retain, x.subscription_ids, x.released) == (
            y.packet_id,
            y.qos,
            y.retain,
            y.subscription_ids,
            y.released,
        )
        same_message(x.message, y.message)
    assert len(a.queued) == len(b.queued)
    for x, y in zip(a.queued, b.queued, strict=True):
        assert (x.qos, x.retain, x.subscription_ids) == (y.qos, y.retain, y.subscription_ids)
        same_message(x.message, y.message)
    assert (a.will is None) == (b.will is None)
    if a.will is not None:
        same_message(a.will[0], b.will[0])
        assert a.will[1] == b.will[1]
    assert a.queue_members == b.queue_members


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states())
def test_every_field_survives_a_round_trip(state: SessionState) -> None:
    assert_same(state, decode_session_state(encode_session_state(state)))


def full_state() -> SessionState:
    props = {
        CONTENT_TYPE: "text/plain",
        USER_PROPERTY: [("k", "v"), ("k", "w")],
        CORRELATION_DATA: b"\x00\x01",
        RESPONSE_TOPIC: "r/1",
        PAYLOAD_FORMAT_INDICATOR: 1,
    }
    return SessionState(
        "cid-é",
        "alice",
        3600,
        0.0,
        True,
        42,
        [
            SubscriptionState("a/+", 2, True, True, 2, 7, None),
            SubscriptionState("$share/g1/b/#", 1, False, False, 1, 9, "g1"),
        ],
        [
            InflightState(
                5, Message("a/1", b"p5", 2, False, props, time.monotonic() + 60), 2, False, (7,), True
            ),
            InflightState(6, Message("a/2", b"p6", 1, True, props), 1, True, (7, 9), False),
        ],
        [3, 4],
        [
            QueuedState(Message("a/3", b"q", 2, False, props), 2, False, (7,)),
            QueuedState(Message("a/4", b"", 0, False, None), 0, False, None),
        ],
        (Message("will/t", b"bye", 1, True, {MESSAGE_EXPIRY_INTERVAL: 30, **props}), 10),
        [("$queue/orders/#", "billing", False), ("$queue/q", "q-é", True)],
    )


def test_a_full_state_round_trips() -> None:
    state = full_state()
    assert_same(state, decode_session_state(encode_session_state(state)))


def test_unknown_version_and_foreign_bytes_are_refused() -> None:
    blob = bytearray(encode_session_state(full_state()))
    blob[4] = VERSION + 1
    with pytest.raises(SessionStateError, match="version"):
        decode_session_state(bytes(blob))
    with pytest.raises(SessionStateError, match="not a session state"):
        decode_session_state(b"XXXX" + bytes(blob[4:]))
    with pytest.raises(SessionStateError):
        decode_session_state(b"")
    with pytest.raises(SessionStateError, match="trailing"):
        decode_session_state(encode_session_state(full_state()) + b"\x00")


def test_every_truncation_is_refused() -> None:
    blob = encode_session_state(full_state())
    for n in range(len(blob)):
        with pytest.raises(SessionStateError):
            decode_session_state(blob[:n])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 400), st.binary(min_size=1, max_size=4))
def test_damaged_bytes_raise_only_session_state_error(noise: bytes, at: int, patch: bytes) -> None:
    blob = bytearray(encode_session_state(full_state()))
    at %= len(blob)
    blob[at : at + len(patch)] = patch
    for data in (bytes(blob), MAGIC + struct.pack("<B", VERSION) + noise):
        try:
            decode_session_state(data)
        except SessionStateError:
            pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states())
def test_queued_entries_pass_through_as_stored_with_raw_queue(state: SessionState) -> None:
    """A persistent session's queue is handed on as its stored entries: encoded as they are, read back
    as bytes (framing checked), and the same messages once decoded."""
    raw = SessionState(
        **{
            **state.__dict__,
            "queued": [r.encode_entry(q.message, q.qos, q.retain, q.subscription_ids) for q in state.queued],
        }
    )
    blob = encode_session_state(raw)
    assert blob == encode_session_state(state)
    back = decode_session_state(blob, raw_queue=True)
    assert all(isinstance(item, bytes) for item in back.queued)
    assert_same(state, SessionState(**{**back.__dict__, "queued": [queued_item(i) for i in back.queued]}))


def test_a_raw_entry_with_bad_framing_is_refused() -> None:
    state = full_state()
    entry = bytearray(r.encode_entry(Message("t", b"p", 1), 1, False, None))
    for damaged in (entry[:-1], entry + b"x", b"\x09" + entry[1:], entry[:3]):
        state.queued = [bytes(damaged)]
        with pytest.raises(SessionStateError):
            decode_session_state(encode_session_state(state), raw_queue=True)
