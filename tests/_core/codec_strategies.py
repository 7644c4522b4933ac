"""Hypothesis strategies of valid MQTT packets for the codec tests, and the MQTT 5.0 property table
(section 2.2.2.2) written from the specification on purpose, independently of the codec's own
table (tests/_core/test_properties.py cross-checks it against paho-mqtt's).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from fluxmq._core import codec
from fluxmq._core.codec import (
    AUTH,
    CONNACK,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def fuzz_examples(default: int) -> int:
    """A fuzz test's hypothesis example count: ``default``, or ``FUZZ_EXAMPLES`` when set (a
    long campaign, e.g. under scripts/asan: docs/development.rst)."""
    return int(os.environ.get("FUZZ_EXAMPLES") or default)


VERSIONS = (3, 4, 5)


WILL = "will"


# MQTT 5.0 section 2.2.2.2: identifier -> (value kind, packet types it may appear in).
SPEC_PROPERTIES: dict[int, tuple[str, set]] = {
    0x01: ("bool", {PUBLISH, WILL}),
    0x02: ("u32", {PUBLISH, WILL}),
    0x03: ("str", {PUBLISH, WILL}),
    0x08: ("str", {PUBLISH, WILL}),
    0x09: ("bin", {PUBLISH, WILL}),
    0x0B: ("subid", {PUBLISH, SUBSCRIBE}),
    0x11: ("u32", {CONNECT, CONNACK, DISCONNECT}),
    0x12: ("str", {CONNACK}),
    0x13: ("u16", {CONNACK}),
    0x15: ("str", {CONNECT, CONNACK, AUTH}),
    0x16: ("bin", {CONNECT, CONNACK, AUTH}),
    0x17: ("bool", {CONNECT}),
    0x18: ("u32", {WILL}),
    0x19: ("bool", {CONNECT}),
    0x1A: ("str", {CONNACK}),
    0x1C: ("str", {CONNACK, DISCONNECT}),
    0x1F: ("str", {CONNACK, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK, DISCONNECT, AUTH}),
    0x21: ("u16nz", {CONNECT, CONNACK}),
    0x22: ("u16", {CONNECT, CONNACK}),
    0x23: ("u16nz", {PUBLISH}),
    0x24: ("bool", {CONNACK}),
    0x25: ("bool", {CONNACK}),
    0x26: (
        "pairs",
        {
            CONNECT,
            CONNACK,
            PUBLISH,
            WILL,
            PUBACK,
            PUBREC,
            PUBREL,
            PUBCOMP,
            SUBSCRIBE,
            SUBACK,
            UNSUBSCRIBE,
            UNSUBACK,
            DISCONNECT,
            AUTH,
        },
    ),
    0x27: ("u32nz", {CONNECT, CONNACK}),
    0x28: ("bool", {CONNACK}),
    0x29: ("bool", {CONNACK}),
    0x2A: ("bool", {CONNACK}),
}


PROPERTY_KINDS = (
    WILL,
    CONNECT,
    CONNACK,
    PUBLISH,
    PUBACK,
    PUBREC,
    PUBREL,
    PUBCOMP,
    SUBSCRIBE,
    SUBACK,
    UNSUBSCRIBE,
    UNSUBACK,
    DISCONNECT,
    AUTH,
)


# -- strategies ------------------------------------------------------------------------------


TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=10)


TOPIC = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#"), min_size=1, max_size=12
)


BINARY = st.binary(max_size=16)


PACKET_ID = st.integers(1, 0xFFFF)


VALUES = {
    "bool": st.integers(0, 1),
    "u16": st.integers(0, 0xFFFF),
    "u16nz": st.integers(1, 0xFFFF),
    "u32": st.integers(0, 0xFFFFFFFF),
    "u32nz": st.integers(1, 0xFFFFFFFF),
    "str": TEXT,
    "bin": BINARY,
    "pairs": st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3),
}


@st.composite
def properties(draw, kind) -> dict:
    """Valid properties for ``kind`` (a packet type or WILL)."""
    allowed = sorted(pid for pid, (_, kinds) in SPEC_PROPERTIES.items() if kind in kinds)
    chosen = draw(st.lists(st.sampled_from(allowed), unique=True, max_size=4))
    props = {}
    for pid in chosen:
        value_kind = SPEC_PROPERTIES[pid][0]
        if value_kind == "subid":
            props[pid] = draw(
                st.lists(st.integers(1, 268_435_455), min_size=1, max_size=3 if kind == PUBLISH else 1)
            )
        else:
            props[pid] = draw(VALUES[value_kind])
    return props


def props_for(kind, version):
    return properties(kind) if version == 5 else st.just({})


@st.composite
def connects(draw, version) -> Connect:
    username = draw(st.none() | TEXT)
    password = draw(st.none() | BINARY)
    if version < 5 and username is None:
        password = None  # 3.1.1 MQTT-3.1.2-22
    will = None
    if draw(st.booleans()):
        will = Will(
            draw(TOPIC),
            draw(BINARY),
            draw(st.integers(0, 2)),
            draw(st.booleans()),
            draw(props_for(WILL, version)),
        )
    return Connect(
        client_id=draw(TEXT),
        clean_start=draw(st.booleans()),
        keepalive=draw(st.integers(0, 0xFFFF)),
        protocol_version=version,
        username=username,
        password=password,
        will=will,
        properties=draw(props_for(CONNECT, version)),
    )


@st.composite
def publishes(draw, version) -> Publish:
    qos = draw(st.integers(0, 2))
    props = draw(props_for(PUBLISH, version))
    topic = draw(TOPIC)
    if version == 5 and codec.TOPIC_ALIAS in props and draw(st.booleans()):
        topic = ""  # resolved by the protocol layer from the alias
    return Publish(
        topic,
        draw(st.binary(max_size=64)),
        qos,
        draw(st.booleans()),
        draw(st.booleans()) if qos else False,
        draw(PACKET_ID) if qos else 0,
        props,
    )


def publish_acks(cls, version):
    reason = st.integers(0, 255) if version == 5 else st.just(0)
    return st.builds(cls, PACKET_ID, reason, props_for(cls.type, version))


@st.composite
def subscribes(draw, version) -> Subscribe:
    subs = []
    for _ in range(draw(st.integers(1, 3))):
        if version == 5:
            subs.append(
                Subscription(
                    draw(TEXT),
                    draw(st.integers(0, 2)),
                    draw(st.booleans()),
                    draw(st.booleans()),
                    draw(st.integers(0, 2)),
                )
            )
        else:
            subs.append(Subscription(draw(TEXT), draw(st.integers(0, 2))))
    return Subscribe(draw(PACKET_ID), subs, draw(props_for(SUBSCRIBE, version)))


def packet_strategies(version) -> dict:
    """One strategy per packet type valid in ``version``."""
    codes = st.lists(st.integers(0, 255), min_size=1, max_size=4)
    reason = st.integers(0, 255) if version == 5 else st.just(0)
    strategies = {
        CONNECT: connects(version),
        CONNACK: st.builds(
            Connack,
            st.booleans() if version >= 4 else st.just(False),
            st.integers(0, 255),
            props_for(CONNACK, version),
        ),
        PUBLISH: publishes(version),
        PUBACK: publish_acks(Puback, version),
        PUBREC: publish_acks(Pubrec, version),
        PUBREL: publish_acks(Pubrel, version),
        PUBCOMP: publish_acks(Pubcomp, version),
        SUBSCRIBE: subscribes(version),
        SUBACK: st.builds(Suback, PACKET_ID, codes, props_for(SUBACK, version)),
        UNSUBSCRIBE: st.builds(
            Unsubscribe, PACKET_ID, st.lists(TEXT, min_size=1, max_size=3), props_for(UNSUBSCRIBE, version)
        ),
        UNSUBACK: st.builds(
            Unsuback, PACKET_ID, codes if version == 5 else st.none(), props_for(UNSUBACK, version)
        ),
        PINGREQ: st.builds(Pingreq),
        PINGRESP: st.builds(Pingresp),
        DISCONNECT: st.builds(Disconnect, reason, props_for(DISCONNECT, version)),
    }
    if version == 5:
        strategies[AUTH] = st.builds(Auth, reason, props_for(AUTH, version))
    return strategies


def any_packet(version, exclude=(CONNECT,)):
    return st.one_of([s for t, s in packet_strategies(version).items() if t not in exclude])
