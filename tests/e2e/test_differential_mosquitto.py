"""Differential conformance: the same scripted packet exchanges against Mosquitto and fluxmq.

Each scenario of the table below writes raw MQTT packets (``tests/e2e/differential.py``) to one
broker and records what it answers, normalised: packet types, flags, reason codes, packet ids,
topic / payload / QoS / retain of deliveries, and whether the connection was closed. The same
script runs against a real Mosquitto and a real fluxmq node (one of each for the module, both
anonymous with default limits; fresh client ids and topics per scenario), and the transcripts must
be equal. Where the specifications allow both answers, or Mosquitto departs from them, the scenario
carries a ``Diverge`` with the statement that decides: fluxmq's transcript is then pinned to the
answer the text asks for, and Mosquitto must still answer differently (a change on either side
shows up). docs/conformance.rst lists those divergences.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests._core.wire_builders import frame, prop, s
from tests.e2e.differential import (
    CLOSED,
    CORRELATION,
    PAYLOAD_FORMAT,
    RECEIVE_MAXIMUM,
    SESSION_EXPIRY,
    SUBSCRIPTION_ID,
    TOPIC_ALIAS,
    TOPIC_ALIAS_MAXIMUM,
    USER_PROPERTY,
    WAIT,
    Wire,
    ack,
    connect,
    disconnect,
    props,
    publish,
    subscribe,
    u16,
    u32,
    unsubscribe,
)
from tests.e2e.mosquitto import MOSQUITTO, Mosquitto

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="Debian's mosquitto broker is needed")


@dataclass
class Broker:
    name: str
    host: str
    port: int


@dataclass
class Diverge:
    """An expected difference: ``ref`` says why (the statement that decides); ``flux`` pins
    fluxmq's answer at the steps (by label) where Mosquitto answers otherwise."""

    ref: str
    flux: dict


class Script:
    """The transcript of one scenario against one broker: (label, normalised packets) entries."""

    def __init__(self, broker: Broker, prefix: str) -> None:
        self.broker = broker
        self.u = prefix
        self.log: list = []
        self.wires: list[Wire] = []

    def wire(self, version: int = 4) -> Wire:
        w = Wire(self.broker.host, self.broker.port, version)
        self.wires.append(w)
        return w

    def rec(self, label: str, packets: list) -> list:
        self.log.append((label, packets))
        return packets

    def conn(self, name: str, version: int = 4, label: str | None = None, **kwargs: Any) -> Wire:
        """A connection whose CONNECT (client id ``<prefix>-name``) answer is recorded."""
        w = self.wire(version)
        self.rec(label or f"connect {name}", w.step(connect(f"{self.u}-{name}", version, **kwargs)))
        return w

    def t(self, name: str = "t") -> str:
        return f"{self.u}/{name}"

    def sentinel(
        self, sub: Wire, pub: Wire | None, label: str = "delivered", before: list | None = None
    ) -> list:
        """Deliveries to ``sub`` before the sentinel ``pub`` publishes now (None: was published
        already); ``sub`` subscribed to ``<prefix>/sentinel`` through ``watch``."""
        if pub is not None:
            pub.send(publish(self.t("sentinel"), b"end", version=pub.version))
        got: list = list(before or [])
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            packets = sub.step()
            for i, p in enumerate(packets):
                if p[0] == "PUBLISH" and p[1] == self.t("sentinel"):
                    return self.rec(label, got + packets[:i] + packets[i + 1 :])
            got.extend(packets)
            if CLOSED in packets:
                return self.rec(label, got)
        return self.rec(label, [*got, ("NO SENTINEL",)])

    def sentinel_after(self, sub: Wire, pub: Wire, label: str) -> list:
        """``sentinel`` for a ``sub`` that did not subscribe through ``watch``."""
        before = [
            q
            for q in sub.step(subscribe(99, (self.t("sentinel"), 0), version=sub.version))
            if q[:2] != ("SUBACK", 99)
        ]
        return self.sentinel(sub, pub, label, before)

    def pair(self, version: int, *subs: tuple, properties: bytes = b"") -> tuple[Wire, Wire]:
        """A subscriber ("c", subscribed to ``subs`` through ``watch``) and a publisher ("p")."""
        w = self.conn("c", version)
        self.watch(w, *subs, properties=properties)
        return w, self.conn("p", version)

    def watch(self, w: Wire, *subs: tuple, pid: int = 1, properties: bytes = b"") -> None:
        """SUBSCRIBE ``subs`` plus the sentinel topic, recording the SUBACK."""
        self.rec(
            "subscribe",
            w.step(subscribe(pid, *subs, (self.t("sentinel"), 0), version=w.version, properties=properties)),
        )

    def close(self) -> None:
        for w in self.wires:
            w.close()


SCENARIOS: dict[str, Callable[[Script], None]] = {}


def scenario() -> Callable:
    def register(fn: Callable[[Script], None]) -> Callable[[Script], None]:
        SCENARIOS[fn.__name__] = fn
        return fn

    return register


def one_step(version: int, *chunks: bytes, connect_first: bool = True) -> Callable[[Script], None]:
    """A scenario body: connect (unless ``connect_first`` is False), then send ``chunks``."""

    def body(x: Script) -> None:
        if connect_first:
            w = x.conn("c", version)
        else:
            w = x.wire(version)
        x.rec("step", w.step(*chunks))

    return body


def define(name: str, body: Callable[[Script], None]) -> None:
    SCENARIOS[name] = body


# -- CONNECT -----------------------------------------------------------------------------------------

V4, V5 = 4, 5
CID = b"dc"


def raw_connect(
    version: int, flags: int, tail: bytes, name: bytes | None = None, props5: bytes = b""
) -> bytes:
    if name is None:
        name = b"MQIsdp" if version == 3 else b"MQTT"
    body = s(name) + bytes([version, flags]) + u16(60) + (props5 or b"\x00" if version == 5 else b"") + tail
    return frame(0x10, body)


for _name, _packet in {
    # MQTT-3.1.2-1 (3.1.1): a wrong protocol name MAY be answered by a close without CONNACK.
    "connect_bad_protocol_name_311": raw_connect(4, 0x02, s(CID), name=b"MQTX"),
    # MQTT-3.1.2-2 (3.1.1): an unsupported level gets return code 1, then the close.
    "connect_bad_protocol_level_311": raw_connect(7, 0x02, s(CID), name=b"MQTT"),
    "connect_level_3_with_name_MQTT": raw_connect(3, 0x02, s(CID), name=b"MQTT"),
    "connect_level_4_with_name_MQIsdp": raw_connect(4, 0x02, s(CID), name=b"MQIsdp"),
    # MQTT-3.1.2-3: the reserved flag must be 0.
    "connect_reserved_flag_311": raw_connect(4, 0x03, s(CID)),
    "connect_reserved_flag_5": raw_connect(5, 0x03, s(CID)),
    # MQTT-3.1.2-11/13/15 (3.1.1): without the will flag, will QoS and will retain must be 0.
    "connect_will_qos_without_will_flag_311": raw_connect(4, 0x0A, s(CID)),
    "connect_will_retain_without_will_flag_311": raw_connect(4, 0x22, s(CID)),
    "connect_will_qos_without_will_flag_5": raw_connect(5, 0x0A, s(CID)),
    # MQTT-3.1.2-14: will QoS 3.
    "connect_will_qos_3_311": raw_connect(4, 0x1E, s(CID) + s(b"w") + s(b"x")),
    # MQTT-3.1.2-22 (3.1.1): a password flag without the user name flag.
    "connect_password_without_username_311": raw_connect(4, 0x42, s(CID) + s(b"pw")),
    # 5.0 allows a password without a user name (3.1.2.9).
    "connect_password_without_username_5": raw_connect(5, 0x42, s(b"dc5pw") + s(b"pw")),
    # MQTT-3.1.3-8 (3.1.1): an empty client id with clean session 0 gets return code 2.
    "connect_empty_client_id_clean_0_311": raw_connect(4, 0x00, s(b"")),
    # MQTT-1.5.3-1: ill-formed UTF-8 in the client id; MQTT-1.5.3-2: U+0000.
    "connect_client_id_bad_utf8_311": raw_connect(4, 0x02, s(b"\xff\xfe")),
    "connect_client_id_bad_utf8_5": raw_connect(5, 0x02, s(b"\xc3\x28")),
    "connect_client_id_nul_311": raw_connect(4, 0x02, s(b"a\x00b")),
    "connect_username_bad_utf8_311": raw_connect(4, 0x82, s(b"dcu") + s(b"\xed\xa0\x80")),
    # 5.0 2.2.2.2: a property not valid for the packet type is a Malformed Packet.
    "connect_property_not_for_connect_5": raw_connect(
        5, 0x02, s(b"dcp"), props5=props(prop(TOPIC_ALIAS, u16(1)))
    ),
    # 5.0 3.1.2.11: a property included twice is a Protocol Error.
    "connect_session_expiry_twice_5": raw_connect(
        5, 0x02, s(b"dcp2"), props5=props(prop(SESSION_EXPIRY, u32(1)), prop(SESSION_EXPIRY, u32(2)))
    ),
    "connect_receive_maximum_0_5": raw_connect(
        5, 0x02, s(b"dcp3"), props5=props(prop(RECEIVE_MAXIMUM, u16(0)))
    ),
    # 3.1: the client id is 1 to 23 characters; longer ones get return code 2.
    "connect_31_long_client_id": raw_connect(3, 0x02, s(b"x" * 30)),
}.items():
    define(_name, one_step(V4, _packet, connect_first=False))


def _fresh_connect(version: int, client_id: str, clean: bool = True, **kw: Any) -> Callable[[Script], None]:
    def body(x: Script) -> None:
        w = x.wire(version)
        x.rec("connect", w.step(connect(client_id.replace("{u}", x.u), version, clean, **kw)))
        x.rec("ping", w.step())

    return body


define("connect_empty_client_id_clean_1_311", _fresh_connect(4, "", True))
define("connect_empty_client_id_clean_0_5", _fresh_connect(5, "", False))
define("connect_31_short_client_id", _fresh_connect(3, "d31", True))
define("connect_client_id_with_slash_and_wildcards", _fresh_connect(4, "{u}/a+#", True))
define("connect_client_id_100_chars_311", _fresh_connect(4, "{u}" + "x" * 80, True))
define("connect_keepalive_0_311", _fresh_connect(4, "{u}", True, keepalive=0))


@scenario()
def connect_twice_311(x: Script) -> None:
    # MQTT-3.1.0-2: a second CONNECT is a protocol violation; the connection is closed.
    w = x.conn("c", 4)
    x.rec("second connect", w.step(connect(f"{x.u}-c", 4)))


@scenario()
def connect_twice_5(x: Script) -> None:
    w = x.conn("c", 5)
    x.rec("second connect", w.step(connect(f"{x.u}-c", 5)))


define("first_packet_publish_311", one_step(4, publish("a", b"x"), connect_first=False))
define("first_packet_pingreq_311", one_step(4, b"", connect_first=False))
define("first_packet_subscribe_5", one_step(5, subscribe(1, ("a", 0), version=5), connect_first=False))


@scenario()
def session_present_on_resume_311(x: Script) -> None:
    # MQTT-3.2.2-2: Session Present 1 when a stored session is resumed; -1/-3: 0 when clean.
    x.conn("p", 4, clean=False)
    w = x.wires[-1]
    x.rec("disconnect", w.step(disconnect(), fence=False))
    x.conn("p", 4, "resume", clean=False)
    x.rec("disconnect", x.wires[-1].step(disconnect(), fence=False))
    x.conn("p", 4, "clean", clean=True)
    x.rec("disconnect", x.wires[-1].step(disconnect(), fence=False))
    x.conn("p", 4, "after clean", clean=False)
    x.rec("disconnect", x.wires[-1].step(disconnect(), fence=False))
    x.conn("p", 4, "cleanup", clean=True)


@scenario()
def session_present_on_resume_5(x: Script) -> None:
    expiry = props(prop(SESSION_EXPIRY, u32(60)))
    x.conn("p", 5, clean=True, properties=expiry)
    x.rec("disconnect", x.wires[-1].step(disconnect(5), fence=False))
    x.conn("p", 5, "resume", clean=False, properties=expiry)
    x.rec(
        "disconnect 0 expiry",
        x.wires[-1].step(disconnect(5, 0, props(prop(SESSION_EXPIRY, u32(0)))), fence=False),
    )
    x.conn("p", 5, "after expiry 0", clean=False)
    x.rec("disconnect", x.wires[-1].step(disconnect(5), fence=False))


@scenario()
def session_resume_keeps_subscription_311(x: Script) -> None:
    s1 = x.conn("s", 4, clean=False)
    x.rec("subscribe", s1.step(subscribe(3, (x.t(), 1))))
    x.rec("disconnect", s1.step(disconnect(), fence=False))
    p = x.conn("p", 4)
    x.rec("publish qos1 offline", p.step(publish(x.t(), b"queued", 1, packet_id=9)))
    s2 = x.wire(4)
    x.rec("resume", s2.step(connect(f"{x.u}-s", 4, False)))
    x.rec("queued", s2.step())
    x.rec("cleanup", s2.step(disconnect(), fence=False))
    x.conn("s", 4, "end session", clean=True)


# -- SUBSCRIBE / UNSUBSCRIBE ------------------------------------------------------------------------------

define(
    "subscribe_valid_filters_311",
    one_step(4, subscribe(1, ("d/+", 0), ("d/#", 1), ("#", 2), ("+", 1), ("+/+/x", 2), ("/", 0))),
)
define("subscribe_hash_not_last_311", one_step(4, subscribe(1, ("a/#/b", 0))))
define("subscribe_hash_not_last_5", one_step(5, subscribe(1, ("a/#/b", 0), version=5)))
define("subscribe_plus_in_level_311", one_step(4, subscribe(1, ("a+", 0))))
define("subscribe_plus_in_level_5", one_step(5, subscribe(1, ("a/b+/c", 1), version=5)))
define("subscribe_hash_in_level_5", one_step(5, subscribe(1, ("a#", 1), version=5)))
define("subscribe_empty_filter_311", one_step(4, subscribe(1, ("", 0))))
define("subscribe_empty_filter_5", one_step(5, subscribe(1, ("", 0), version=5)))
define("subscribe_share_valid_5", one_step(5, subscribe(1, ("$share/g/a/#", 1), version=5)))
define("subscribe_share_without_filter_5", one_step(5, subscribe(1, ("$share/g", 1), version=5)))
define("subscribe_share_empty_group_5", one_step(5, subscribe(1, ("$share//a", 1), version=5)))
define("subscribe_share_wildcard_group_5", one_step(5, subscribe(1, ("$share/g+/a", 1), version=5)))
# MQTT-3.8.3-4: No Local on a shared subscription is a Protocol Error.
define("subscribe_share_no_local_5", one_step(5, subscribe(1, ("$share/g/a", 0x05), version=5)))
# MQTT-3.8.3-4 (3.1.1) / 3.8.3.1: QoS 3 in the options is malformed.
define("subscribe_qos_3_311", one_step(4, subscribe(1, ("a", 3))))
define("subscribe_qos_3_5", one_step(5, subscribe(1, ("a", 3), version=5)))
# MQTT-3.8.3-4 (3.1.1): reserved bits of the requested QoS byte.
define("subscribe_reserved_option_bits_311", one_step(4, subscribe(1, ("a", 0x04))))
# MQTT-3.8.3-5 (5.0): bits 6 and 7 of the options are reserved.
define("subscribe_reserved_option_bits_5", one_step(5, subscribe(1, ("a", 0xC0), version=5)))
define("subscribe_retain_handling_3_5", one_step(5, subscribe(1, ("a", 0x30), version=5)))
# MQTT-2.3.1-1: a packet id of 0.
define("subscribe_packet_id_0_311", one_step(4, subscribe(0, ("a", 0))))
define("subscribe_packet_id_0_5", one_step(5, subscribe(0, ("a", 0), version=5)))
# MQTT-3.8.3-3: a SUBSCRIBE with no filter.
define("subscribe_empty_payload_311", one_step(4, subscribe(1)))
define("subscribe_empty_payload_5", one_step(5, subscribe(1, version=5)))
# MQTT-3.8.1-1: fixed header flags 0010.
define("subscribe_bad_header_flags_311", one_step(4, subscribe(1, ("a", 0), first=0x80)))
# 3.8.2.1.2: a Subscription Identifier of 0 is a Protocol Error; twice too.
define(
    "subscribe_subscription_identifier_0_5",
    one_step(5, subscribe(1, ("a", 0), version=5, properties=props(prop(SUBSCRIPTION_ID, b"\x00")))),
)
define(
    "subscribe_subscription_identifier_twice_5",
    one_step(
        5,
        subscribe(
            1,
            ("a", 0),
            version=5,
            properties=props(prop(SUBSCRIPTION_ID, b"\x01"), prop(SUBSCRIPTION_ID, b"\x02")),
        ),
    ),
)
define(
    "subscribe_property_not_for_subscribe_5",
    one_step(5, subscribe(1, ("a", 0), version=5, properties=props(prop(TOPIC_ALIAS, u16(1))))),
)
define("unsubscribe_packet_id_0_311", one_step(4, unsubscribe(0, "a")))
define("unsubscribe_empty_payload_311", one_step(4, unsubscribe(1)))
define("unsubscribe_empty_payload_5", one_step(5, unsubscribe(1, version=5)))
define("unsubscribe_bad_header_flags_311", one_step(4, frame(0xA0, u16(1) + s(b"a"))))
define("unsubscribe_invalid_filter_311", one_step(4, unsubscribe(1, "a/#/b")))


@scenario()
def unsubscribe_reason_codes_5(x: Script) -> None:
    # 3.11.3: 0x00 for a subscription removed, 0x11 "No subscription existed".
    w = x.conn("c", 5)
    x.rec("subscribe", w.step(subscribe(1, (x.t("a"), 1), version=5)))
    x.rec("unsubscribe", w.step(unsubscribe(2, x.t("a"), x.t("b"), version=5)))
    x.rec("again", w.step(unsubscribe(3, x.t("a"), version=5)))


@scenario()
def unsubscribe_311(x: Script) -> None:
    w = x.conn("c", 4)
    x.rec("subscribe", w.step(subscribe(1, (x.t("a"), 1))))
    x.rec("unsubscribe", w.step(unsubscribe(2, x.t("a"), x.t("b"))))


@scenario()
def resubscribe_replaces_qos_311(x: Script) -> None:
    # MQTT-3.8.4-3: a SUBSCRIBE with an existing filter replaces it (new QoS); no duplicate delivery.
    w = x.conn("c", 4)
    x.watch(w, (x.t(), 2))
    x.rec("resubscribe", w.step(subscribe(2, (x.t(), 1))))
    p = x.conn("p", 4)
    x.rec("publish", p.step(publish(x.t(), b"m", 2, packet_id=4)))
    x.rec("pubrel", p.step(ack(6, 4)))
    x.sentinel(w, p)


@scenario()
def subscription_identifier_delivered_5(x: Script) -> None:
    w = x.conn("c", 5)
    x.watch(w, (x.t("a/#"), 1), properties=props(prop(SUBSCRIPTION_ID, b"\x07")))
    x.rec(
        "subscribe 2",
        w.step(
            subscribe(2, (x.t("a/+"), 0), version=5, properties=props(prop(SUBSCRIPTION_ID, b"\x81\x01")))
        ),
    )
    p = x.conn("p", 5)
    x.rec("publish", p.step(publish(x.t("a/b"), b"m", 1, packet_id=1, version=5)))
    x.sentinel(w, p)


# -- PUBLISH -------------------------------------------------------------------------------------------

for _v in (4, 5):
    _sfx = "311" if _v == 4 else "5"
    # MQTT-3.3.2-2: no wildcards in a Topic Name.
    define(f"publish_wildcard_plus_{_sfx}", one_step(_v, publish("a/+", b"x", version=_v)))
    define(f"publish_wildcard_hash_{_sfx}", one_step(_v, publish("a/#", b"x", 1, packet_id=1, version=_v)))
    # MQTT-3.3.1-4: QoS 3.
    define(f"publish_qos_3_{_sfx}", one_step(_v, publish("a", b"x", 3, packet_id=1, version=_v)))
    # MQTT-3.3.1-2: DUP must be 0 on QoS 0.
    define(f"publish_dup_on_qos_0_{_sfx}", one_step(_v, publish("a", b"x", 0, dup=True, version=_v)))
    # MQTT-2.3.1-1: a QoS 1 PUBLISH with packet id 0.
    define(f"publish_packet_id_0_{_sfx}", one_step(_v, publish("a", b"x", 1, packet_id=0, version=_v)))
    # MQTT-4.7.3-1: a Topic Name is at least one character.
    define(f"publish_empty_topic_{_sfx}", one_step(_v, publish("", b"x", 1, packet_id=1, version=_v)))
    define(f"publish_topic_bad_utf8_{_sfx}", one_step(_v, publish(b"a/\xff", b"x", version=_v)))
    define(f"publish_topic_nul_{_sfx}", one_step(_v, publish(b"a\x00b", b"x", version=_v)))

define(
    "publish_topic_alias_0_5",
    one_step(5, publish("a", b"x", version=5, properties=props(prop(TOPIC_ALIAS, u16(0))))),
)
define(
    "publish_alias_only_unknown_5",
    one_step(5, publish("", b"x", version=5, properties=props(prop(TOPIC_ALIAS, u16(1))))),
)
define(
    "publish_payload_format_twice_5",
    one_step(
        5,
        publish(
            "a",
            b"x",
            version=5,
            properties=props(prop(PAYLOAD_FORMAT, b"\x00"), prop(PAYLOAD_FORMAT, b"\x00")),
        ),
    ),
)
define(
    "publish_property_not_for_publish_5",
    one_step(5, publish("a", b"x", version=5, properties=props(prop(SESSION_EXPIRY, u32(1))))),
)
define(
    "publish_subscription_identifier_from_client_5",
    one_step(5, publish("a", b"x", version=5, properties=props(prop(SUBSCRIPTION_ID, b"\x01")))),
)


@scenario()
def publish_topic_alias_above_maximum_5(x: Script) -> None:
    # MQTT-3.3.2-9: an alias above the CONNACK's Topic Alias Maximum is a Protocol Error (0x94).
    w = x.conn("c", 5)
    top = w.connack.get(TOPIC_ALIAS_MAXIMUM, 0)
    x.rec("publish", w.step(publish("a", b"x", version=5, properties=props(prop(TOPIC_ALIAS, u16(top + 1))))))


@scenario()
def publish_topic_alias_flow_5(x: Script) -> None:
    w, p = x.pair(5, (x.t(), 1))
    x.rec(
        "set alias",
        p.step(publish(x.t(), b"1", 1, packet_id=1, version=5, properties=props(prop(TOPIC_ALIAS, u16(1))))),
    )
    x.rec(
        "alias only",
        p.step(publish("", b"2", 1, packet_id=2, version=5, properties=props(prop(TOPIC_ALIAS, u16(1))))),
    )
    x.sentinel(w, p)


@scenario()
def publish_properties_forwarded_5(x: Script) -> None:
    w, p = x.pair(5, (x.t(), 0))
    properties = props(
        prop(PAYLOAD_FORMAT, b"\x01"),
        prop(CORRELATION, s(b"corr")),
        prop(USER_PROPERTY, s(b"k") + s(b"v")),
        prop(USER_PROPERTY, s(b"k") + s(b"w")),
    )
    p.send(publish(x.t(), b"text", version=5, properties=properties))
    x.sentinel(w, p)


def _retain_scenario(version: int) -> Callable[[Script], None]:
    def body(x: Script) -> None:
        p = x.conn("p", version)
        x.rec("retain", p.step(publish(x.t(), b"kept", 1, True, 1, version=version)))
        s1 = x.conn("s1", version)
        x.watch(s1, (x.t(), 1))
        x.rec("retained on subscribe", s1.step())
        x.rec("live retained", p.step(publish(x.t(), b"live", 0, True, version=version)))
        x.sentinel(s1, p, "live delivery (retain 0)")
        x.rec("clear", p.step(publish(x.t(), b"", 0, True, version=version)))
        s2 = x.conn("s2", version)
        x.watch(s2, (x.t(), 1))
        x.sentinel(s2, p, "after clear")

    return body


define("retain_flow_311", _retain_scenario(4))
define("retain_flow_5", _retain_scenario(5))


@scenario()
def retain_handling_5(x: Script) -> None:
    p = x.conn("p", 5)
    x.rec("retain", p.step(publish(x.t("r"), b"kept", 0, True, version=5)))
    w = x.conn("c", 5)
    for pid, options in ((1, 0x01), (2, 0x01), (3, 0x11), (4, 0x21), (5, 0x11)):
        x.rec(f"subscribe options {options:#x}", w.step(subscribe(pid, (x.t("r"), options), version=5)))
    x.rec("unsubscribe", w.step(unsubscribe(6, x.t("r"), version=5)))
    x.rec("subscribe rh1 new", w.step(subscribe(7, (x.t("r"), 0x11), version=5)))
    x.rec("clear", p.step(publish(x.t("r"), b"", 0, True, version=5)))


@scenario()
def retain_as_published_5(x: Script) -> None:
    w, p = x.pair(5, (x.t("rap"), 0x09), (x.t("plain"), 0x01))
    p.send(publish(x.t("rap"), b"a", 0, True, version=5), publish(x.t("plain"), b"b", 0, True, version=5))
    x.sentinel(w, p)
    p.send(publish(x.t("rap"), b"", 0, True, version=5), publish(x.t("plain"), b"", 0, True, version=5))
    x.sentinel(w, p, "clears")


@scenario()
def dollar_topics_not_matched_by_wildcards(x: Script) -> None:
    # MQTT-4.7.2-1: filters starting with a wildcard do not match topics starting with $.
    w = x.conn("c", 4)
    x.watch(w, ("+/" + x.u + "/t", 0), ("$d" + x.u + "/#", 0))
    hash_sub = x.conn("h", 5)
    x.rec("subscribe #", hash_sub.step(subscribe(1, ("#", 0x20), version=5)))
    p = x.conn("p", 4)
    p.send(publish("$d" + x.u + "/" + x.u + "/t", b"dollar"), publish("x/" + x.u + "/t", b"plain"))
    x.sentinel(w, p)
    x.rec("hash subscriber", [q for q in hash_sub.step() if q[0] != "PUBLISH" or "$" in q[1]])


@scenario()
def qos_downgrade_and_no_upgrade_311(x: Script) -> None:
    # MQTT-3.8.4-6 / 3.3.5: delivered at min(published QoS, granted QoS).
    w, p = x.pair(4, (x.t("q0"), 0), (x.t("q2"), 2))
    x.rec("publish q2 to q0", p.step(publish(x.t("q0"), b"a", 2, packet_id=1)))
    x.rec("pubrel", p.step(ack(6, 1)))
    x.rec("publish q1 to q2", p.step(publish(x.t("q2"), b"b", 1, packet_id=2)))
    x.sentinel(w, p)


@scenario()
def no_local_5(x: Script) -> None:
    w = x.conn("c", 5)
    x.watch(w, (x.t("nl"), 0x04), (x.t("l"), 0x00))
    w.send(publish(x.t("nl"), b"own", version=5), publish(x.t("l"), b"own", version=5))
    x.sentinel(w, w)


@scenario()
def overlapping_subscriptions_5(x: Script) -> None:
    # 5.0 3.3.4: overlapping subscriptions; with identifiers the Server sends one copy per
    # subscription or one with all identifiers; here the 0x00-QoS and 0x01-QoS filters overlap.
    w, p = x.pair(5, (x.t("o/#"), 0), (x.t("o/+"), 1))
    x.rec("publish", p.step(publish(x.t("o/a"), b"m", 1, packet_id=1, version=5)))
    x.sentinel(w, p)


@scenario()
def shared_subscription_gets_no_retained_5(x: Script) -> None:
    # 5.0 4.8.2: retained messages are not sent when a shared subscription is made.
    p = x.conn("p", 5)
    x.rec("retain", p.step(publish(x.t("sh"), b"kept", 0, True, version=5)))
    w = x.conn("c", 5)
    x.rec("subscribe shared", w.step(subscribe(1, (f"$share/g/{x.t('sh')}", 1), version=5)))
    x.rec("live", p.step(publish(x.t("sh"), b"live", 1, packet_id=2, version=5)))
    x.sentinel_after(w, p, "delivered")
    x.rec("clear", p.step(publish(x.t("sh"), b"", 0, True, version=5)))


# -- QoS 1 / 2 flows ---------------------------------------------------------------------------------

for _v in (4, 5):
    _sfx = "311" if _v == 4 else "5"
    define(f"pubrel_unknown_id_{_sfx}", one_step(_v, ack(6, 77, _v)))
    define(f"pubrec_unknown_id_{_sfx}", one_step(_v, ack(5, 78, _v)))
    define(f"pubcomp_unknown_id_{_sfx}", one_step(_v, ack(7, 79, _v)))
    define(f"puback_unknown_id_{_sfx}", one_step(_v, ack(4, 80, _v)))
    # MQTT-3.6.1-1: PUBREL fixed header flags 0010.
    define(f"pubrel_bad_flags_{_sfx}", one_step(_v, frame(0x60, u16(5))))
    define(f"puback_bad_flags_{_sfx}", one_step(_v, frame(0x42, u16(5))))


def _qos2_duplicate(version: int) -> Callable[[Script], None]:
    def body(x: Script) -> None:
        # MQTT-4.3.3-2 / method B: a QoS 2 PUBLISH resent before PUBREL is delivered once.
        w, p = x.pair(version, (x.t(), 2))
        x.rec("publish", p.step(publish(x.t(), b"once", 2, packet_id=7, version=version)))
        x.rec("again (dup)", p.step(publish(x.t(), b"once", 2, packet_id=7, dup=True, version=version)))
        x.rec("pubrel", p.step(ack(6, 7, version)))
        x.rec("pubrel again", p.step(ack(6, 7, version)))
        x.sentinel(w, p)

    return body


define("qos2_duplicate_before_pubrel_311", _qos2_duplicate(4))
define("qos2_duplicate_before_pubrel_5", _qos2_duplicate(5))


@scenario()
def qos1_resent_with_dup_311(x: Script) -> None:
    w, p = x.pair(4, (x.t(), 1))
    x.rec("publish", p.step(publish(x.t(), b"a", 1, packet_id=3)))
    x.rec("again (dup)", p.step(publish(x.t(), b"a", 1, packet_id=3, dup=True)))
    x.sentinel(w, p)


@scenario()
def qos2_outgoing_flow_5(x: Script) -> None:
    w = x.conn("c", 5)
    w.auto_ack = False
    x.rec("subscribe", w.step(subscribe(1, (x.t(), 2), version=5)))
    p = x.conn("p", 5)
    x.rec("publish", p.step(publish(x.t(), b"q2", 2, packet_id=1, version=5)))
    x.rec("pubrel", p.step(ack(6, 1, 5)))
    x.sentinel_after(w, p, "delivered")
    real = w.real_id("#1")
    x.rec("pubrec", w.step(ack(5, real, 5)))
    x.rec("pubcomp", w.step(ack(7, real, 5)))


# -- malformed frames, DISCONNECT, will ---------------------------------------------------------------

define("remaining_length_five_bytes_311", one_step(4, b"\x30\xff\xff\xff\xff\x01"))
define("remaining_length_five_bytes_5", one_step(5, b"\x30\xff\xff\xff\xff\x01"))
define("packet_type_0_311", one_step(4, b"\x00\x00"))
define("packet_type_15_auth_in_311", one_step(4, b"\xf0\x00"))
define("connack_from_client_311", one_step(4, b"\x20\x02\x00\x00"))
define("disconnect_bad_flags_311", one_step(4, b"\xe1\x00"))
define("pingreq_bad_flags_311", one_step(4, b"\xc1\x00"))
define("publish_short_topic_length_311", one_step(4, b"\x30\x03\x00\x05a"))
define(
    "disconnect_property_not_for_disconnect_5",
    one_step(5, disconnect(5, 0, props(prop(TOPIC_ALIAS, u16(1))))),
)


def _will_scenario(version: int, how: str) -> Callable[[Script], None]:
    def body(x: Script) -> None:
        w = x.conn("s", version)
        x.watch(w, (x.t("will"), 1))
        extra = {"properties": props(prop(SESSION_EXPIRY, u32(0)))} if version == 5 else {}
        c = x.conn("w", version, will=(x.t("will"), b"gone", 1, False), **extra)
        c.send(
            {
                "disconnect": disconnect(version),
                "disconnect 0x04": disconnect(5, 0x04),
                "expiry from 0": disconnect(5, 0, props(prop(SESSION_EXPIRY, u32(30)))),
                # A DISCONNECT that is malformed itself: no normal disconnection.
                "disconnect with a body": b"\xe0\x01\x00",
                "disconnect bad flags": b"\xe2\x00",
                "disconnect bad property": disconnect(5, 0, props(prop(TOPIC_ALIAS, u16(1)))),
                "disconnect unknown reason": disconnect(5, 0x05),
                "disconnect reason string twice": disconnect(
                    5, 0, props(prop(0x1F, s(b"a")), prop(0x1F, s(b"b")))
                ),
                "malformed": b"\x30\xff\xff\xff\xff\x01",  # the connection ends without DISCONNECT
            }[how]
        )
        x.rec("end", c.until_closed())
        p = x.conn("p", version)
        x.sentinel(w, p)

    return body


define("will_not_sent_on_disconnect_311", _will_scenario(4, "disconnect"))
define("will_sent_on_protocol_error_311", _will_scenario(4, "malformed"))
define("will_not_sent_on_disconnect_5", _will_scenario(5, "disconnect"))
define("will_sent_on_disconnect_0x04_5", _will_scenario(5, "disconnect 0x04"))
define("will_sent_on_protocol_error_5", _will_scenario(5, "malformed"))
define("will_sent_on_malformed_disconnect_311", _will_scenario(4, "disconnect with a body"))
define("will_sent_on_disconnect_bad_flags_311", _will_scenario(4, "disconnect bad flags"))
define("will_sent_on_disconnect_bad_flags_5", _will_scenario(5, "disconnect bad flags"))
define("will_sent_on_disconnect_bad_property_5", _will_scenario(5, "disconnect bad property"))
define("will_on_disconnect_unknown_reason_5", _will_scenario(5, "disconnect unknown reason"))
define("will_sent_on_disconnect_reason_string_twice_5", _will_scenario(5, "disconnect reason string twice"))
# MQTT-3.14.2-2: a DISCONNECT that sets a Session Expiry when the CONNECT had 0 is a Protocol Error.
define("disconnect_session_expiry_from_0_5", _will_scenario(5, "expiry from 0"))


@scenario()
def connect_31_then_publish(x: Script) -> None:
    w, p = x.pair(3, (x.t(), 1))
    x.rec("publish", p.step(publish(x.t(), b"31", 1, packet_id=2)))
    x.sentinel(w, p)


@scenario()
def wildcard_matching_rules_311(x: Script) -> None:
    # 4.7.1.2: "sport/#" matches "sport"; 4.7.1.3: "+" matches an empty level; "+/x" matches "/x".
    w, p = x.pair(4, (x.t("m/#"), 0), (x.t("e/+/b"), 0), ("+/" + x.u + "-lead", 0))
    p.send(
        publish(x.t("m"), b"parent"),
        publish(x.t("m/a/b"), b"deep"),
        publish(x.t("e//b"), b"empty level"),
        publish(x.t("e/b"), b"too short"),
        publish("/" + x.u + "-lead", b"leading slash"),
    )
    x.sentinel(w, p)


@scenario()
def retained_on_wildcard_subscribe_311(x: Script) -> None:
    p = x.conn("p", 4)
    p.send(publish(x.t("r"), b"top", 1, True, 1), publish(x.t("r/a"), b"child", 2, True, 2))
    x.rec("publishes", p.step())
    x.rec("pubrel", p.step(ack(6, 2)))
    w = x.conn("c", 4)
    got = w.step(subscribe(1, (x.t("r/#"), 1)))
    # The order of retained messages of different topics is not specified: compared as a set.
    x.rec("subscribe", sorted((q[:6] if q[0] == "PUBLISH" else q) for q in got))
    x.sentinel_after(w, p, "retained")
    x.rec("clear", p.step(publish(x.t("r"), b"", 0, True), publish(x.t("r/a"), b"", 0, True)))
    x.sentinel(w, p, "clears delivered")


@scenario()
def empty_retained_delivered_to_live_subscriber_5(x: Script) -> None:
    # 3.3.1.3: a zero-length retained PUBLISH clears the retained message and goes to subscribers.
    w, p = x.pair(5, (x.t(), 0))
    p.send(publish(x.t(), b"", 0, True, version=5))
    x.sentinel(w, p)


@scenario()
def same_filter_twice_in_one_subscribe_311(x: Script) -> None:
    w = x.conn("c", 4)
    x.rec("subscribe", w.step(subscribe(1, (x.t(), 0), (x.t(), 2), (x.t("sentinel"), 0))))
    p = x.conn("p", 4)
    x.rec("publish", p.step(publish(x.t(), b"m", 2, packet_id=1)))
    x.rec("pubrel", p.step(ack(6, 1)))
    x.sentinel(w, p)


@scenario()
def unsubscribe_stops_delivery_311(x: Script) -> None:
    w = x.conn("c", 4)
    x.watch(w, (x.t(), 1))
    x.rec("unsubscribe", w.step(unsubscribe(2, x.t())))
    p = x.conn("p", 4)
    x.rec("publish", p.step(publish(x.t(), b"m", 1, packet_id=1)))
    x.sentinel(w, p)


@scenario()
def unsubscribe_shared_and_unknown_5(x: Script) -> None:
    w = x.conn("c", 5)
    x.rec("subscribe", w.step(subscribe(1, (f"$share/g/{x.t()}", 1), version=5)))
    x.rec("unsubscribe", w.step(unsubscribe(2, f"$share/g/{x.t()}", f"$share/h/{x.t()}", x.t(), version=5)))


@scenario()
def qos2_delivered_before_pubrel_5(x: Script) -> None:
    # 4.3.3: the receiver MAY forward a QoS 2 message at its PUBLISH (method B) or at PUBREL.
    w, p = x.pair(5, (x.t(), 2))
    x.rec("publish", p.step(publish(x.t(), b"m", 2, packet_id=3, version=5)))
    x.sentinel(w, p, "before pubrel")
    x.rec("pubrel", p.step(ack(6, 3, 5)))
    x.sentinel(w, p, "after pubrel")


@scenario()
def qos2_same_id_after_pubcomp_is_new_311(x: Script) -> None:
    w, p = x.pair(4, (x.t(), 2))
    for n in (1, 2):
        x.rec(f"publish {n}", p.step(publish(x.t(), b"m%d" % n, 2, packet_id=5)))
        x.rec(f"pubrel {n}", p.step(ack(6, 5)))
    x.sentinel(w, p)


@scenario()
def qos2_resumed_after_reconnect_311(x: Script) -> None:
    # MQTT-4.4.0-1: a session resumed keeps the QoS 2 exchange; the PUBREL completes it.
    w = x.conn("c", 4)
    x.watch(w, (x.t(), 2))
    p = x.conn("p", 4, clean=False)
    x.rec("publish", p.step(publish(x.t(), b"m", 2, packet_id=9)))
    x.rec("drop", p.step(disconnect(), fence=False))
    p2 = x.conn("p", 4, "resume", clean=False)
    x.rec("pubrel", p2.step(ack(6, 9)))
    x.sentinel(w, p2)
    x.rec("end", p2.step(disconnect(), fence=False))
    x.conn("p", 4, "end session", clean=True)


@scenario()
def unacknowledged_qos1_redelivered_on_resume_311(x: Script) -> None:
    # MQTT-4.4.0-1: unacknowledged PUBLISH packets are resent with DUP 1 on a resumed session.
    w = x.conn("c", 4, clean=False)
    w.auto_ack = False
    x.rec("subscribe", w.step(subscribe(1, (x.t(), 1))))
    p = x.conn("p", 4)
    x.rec("publish", p.step(publish(x.t(), b"m", 1, packet_id=1)))
    x.sentinel_after(w, p, "received, not acked")
    x.rec("dropped", w.drop())
    w2 = x.conn("c", 4, "resume", clean=False)
    x.rec("redelivered", w2.step())
    x.rec("end", w2.step(disconnect(), fence=False))
    x.conn("c", 4, "end session", clean=True)


@scenario()
def offline_qos0_for_persistent_session_311(x: Script) -> None:
    # 3.1.2.4: QoS 0 messages for an offline session MAY be stored.
    w = x.conn("c", 4, clean=False)
    x.rec("subscribe", w.step(subscribe(1, (x.t(), 0), (x.t("q1"), 1))))
    x.rec("away", w.step(disconnect(), fence=False))
    p = x.conn("p", 4)
    x.rec("publish", p.step(publish(x.t(), b"q0"), publish(x.t("q1"), b"q1", 1, packet_id=1)))
    w2 = x.conn("c", 4, "resume", clean=False)
    x.rec("queued", w2.step())
    x.rec("end", w2.step(disconnect(), fence=False))
    x.conn("c", 4, "end session", clean=True)


def _takeover(version: int) -> Callable[[Script], None]:
    def body(x: Script) -> None:
        # MQTT-3.1.4-2: a second connection with the same client id closes the first.
        first = x.conn("same", version)
        x.conn("same", version, "second")
        x.rec("first", first.until_closed())

    return body


define("client_id_takeover_311", _takeover(4))
define("client_id_takeover_5", _takeover(5))


def _will_retained(version: int) -> Callable[[Script], None]:
    def body(x: Script) -> None:
        c = x.conn("w", version, will=(x.t("will"), b"last", 2, True))
        x.rec("dropped", c.drop())
        p = x.conn("p", version)
        w = x.conn("c", version)
        x.rec("subscribe", w.step(subscribe(1, (x.t("will"), 1), version=version)))
        x.sentinel_after(w, p, "retained will")
        x.rec("clear", p.step(publish(x.t("will"), b"", 0, True, version=version)))

    return body


define("will_retained_qos2_311", _will_retained(4))
define("will_retained_qos2_5", _will_retained(5))
define(
    "connect_will_topic_wildcard_311",
    one_step(4, connect("dcw", 4, will=("a/#", b"x", 0, False)), connect_first=False),
)
define(
    "connect_will_topic_wildcard_5",
    one_step(5, connect("dcw5", 5, will=("a/+", b"x", 0, False)), connect_first=False),
)
define(
    "connect_will_payload_format_invalid_5",
    one_step(
        5,
        connect(
            "dcw6", 5, will=("a", b"\xff", 0, False), will_properties=props(prop(PAYLOAD_FORMAT, b"\x01"))
        ),
        connect_first=False,
    ),
)
define(
    "publish_payload_format_invalid_utf8_5",
    one_step(
        5,
        publish("a", b"\xff\xfe", 1, packet_id=1, version=5, properties=props(prop(PAYLOAD_FORMAT, b"\x01"))),
    ),
)
define("publish_to_sys_topic_311", one_step(4, publish("$SYS/x", b"x", 1, packet_id=1)))
define("publish_to_sys_topic_5", one_step(5, publish("$SYS/x", b"x", 1, packet_id=1, version=5)))
define("auth_packet_without_method_5", one_step(5, frame(0xF0, b"\x18\x00")))
define("auth_packet_in_311", one_step(4, frame(0xF0, b"")))
define(
    "connect_unknown_auth_method_5",
    one_step(5, connect("dca", 5, properties=props(prop(0x15, s(b"NOPE")))), connect_first=False),
)


@scenario()
def maximum_packet_size_of_client_5(x: Script) -> None:
    # MQTT-3.1.2-24: the server does not send a packet over the client's Maximum Packet Size.
    w = x.conn("c", 5, properties=props(prop(0x27, u32(40))))
    x.watch(w, (x.t(), 0))
    p = x.conn("p", 5)
    p.send(publish(x.t(), b"small", version=5), publish(x.t(), b"x" * 60, version=5))
    x.sentinel(w, p)


@scenario()
def topic_alias_remapped_5(x: Script) -> None:
    w, p = x.pair(5, (x.t("al/#"), 0))
    alias = props(prop(TOPIC_ALIAS, u16(1)))
    p.send(
        publish(x.t("al/a"), b"1", version=5, properties=alias),
        publish(x.t("al/b"), b"2", version=5, properties=alias),
        publish("", b"3", version=5, properties=alias),
    )
    x.sentinel(w, p)


@scenario()
def receive_maximum_of_client_5(x: Script) -> None:
    # MQTT-3.3.4-7: no more unacknowledged QoS 1/2 PUBLISH packets than the client's Receive Maximum.
    w = x.conn("c", 5, properties=props(prop(RECEIVE_MAXIMUM, u16(1))))
    w.auto_ack = False
    x.rec("subscribe", w.step(subscribe(1, (x.t(), 1), version=5)))
    p = x.conn("p", 5)
    x.rec("publish", p.step(*(publish(x.t(), b"%d" % n, 1, packet_id=n, version=5) for n in (1, 2, 3))))
    got = x.rec("first", w.step())
    for packet in got:
        if packet[0] == "PUBLISH":
            w.auto_ack = True
            x.rec("ack", w.step(ack(4, w.real_id(packet[6]), 5)))


@scenario()
def receive_maximum_of_server_exceeded_5(x: Script) -> None:
    # MQTT-3.3.4-8 / 4.9: more unacknowledged QoS 2 PUBLISHes than the CONNACK's Receive Maximum:
    # DISCONNECT 0x93.
    w = x.conn("c", 5)
    top = w.connack.get(RECEIVE_MAXIMUM, 65535)
    assert top <= 1000, top
    within = w.step(*(publish(x.t(), b"m", 2, packet_id=n, version=5) for n in range(1, top + 1)))
    # Every one accepted (0x10 "no matching subscribers" or 0x00: the server's choice).
    x.rec("within", [len(within) == top and all(q[0] == "PUBREC" and q[2] < 0x80 for q in within)])
    x.rec("one more", w.step(publish(x.t(), b"m", 2, packet_id=top + 1, version=5)))


@scenario()
def pubrec_error_ends_the_exchange_5(x: Script) -> None:
    # 4.3.3 / 3.5.2.1: a PUBREC with a code of 0x80 or more ends the QoS 2 exchange: no PUBREL.
    w = x.conn("c", 5)
    w.auto_ack = False
    x.rec("subscribe", w.step(subscribe(1, (x.t(), 2), (x.t("sentinel"), 0), version=5)))
    p = x.conn("p", 5)
    x.rec("publish", p.step(publish(x.t(), b"m", 2, packet_id=1, version=5), ack(6, 1, 5)))
    x.sentinel(w, p, "delivered")
    x.rec("pubrec 0x80", w.step(ack(5, w.real_id("#1"), 5, 0x80)))
    x.rec("publish 2", p.step(publish(x.t(), b"n", 1, packet_id=2, version=5)))
    w.auto_ack = True
    x.sentinel(w, p, "next")


@scenario()
def unsubscribe_is_by_filter_not_by_match_311(x: Script) -> None:
    w = x.conn("c", 4)
    x.watch(w, (x.t("u/b"), 0))
    x.rec("unsubscribe", w.step(unsubscribe(2, x.t("u/+"))))
    p = x.conn("p", 4)
    p.send(publish(x.t("u/b"), b"still"))
    x.sentinel(w, p)


@scenario()
def retained_replaced_and_downgraded_311(x: Script) -> None:
    p = x.conn("p", 4)
    x.rec("first", p.step(publish(x.t(), b"one", 1, True, 1)))
    x.rec("second", p.step(publish(x.t(), b"two", 0, True)))
    w = x.conn("c", 4)
    x.rec("subscribe q2", w.step(subscribe(1, (x.t(), 2))))
    x.rec("clear", p.step(publish(x.t(), b"", 0, True)))


@scenario()
def overlapping_subscriptions_311(x: Script) -> None:
    w, p = x.pair(4, (x.t("o/#"), 0), (x.t("o/+"), 1))
    x.rec("publish", p.step(publish(x.t("o/a"), b"m", 2, packet_id=1)))
    x.rec("pubrel", p.step(ack(6, 1)))
    x.sentinel(w, p)


@scenario()
def empty_payload_qos0_not_retained_311(x: Script) -> None:
    w, p = x.pair(4, (x.t(), 0))
    p.send(publish(x.t(), b""))
    x.sentinel(w, p)


def _aliases_toward_client(maximum: int) -> Callable[[Script], None]:
    def body(x: Script) -> None:
        # 3.3.2.3.4: the Server MAY use Topic Aliases up to the client's Topic Alias Maximum.
        w = x.conn("c", 5, properties=props(prop(TOPIC_ALIAS_MAXIMUM, u16(maximum))))
        x.watch(w, (x.t(), 0))
        p = x.conn("p", 5)
        p.send(*(publish(x.t(), b"%d" % n, version=5) for n in range(3)))
        x.sentinel(w, p)

    return body


define("broker_topic_aliases_to_client_5", _aliases_toward_client(5))
define("client_topic_alias_maximum_0_gets_no_alias_5", _aliases_toward_client(0))


@scenario()
def publish_response_topic_and_content_type_forwarded_5(x: Script) -> None:
    w, p = x.pair(5, (x.t(), 1))
    properties = props(prop(0x08, s(b"reply/here")), prop(0x03, s(b"text/plain")))
    x.rec("publish", p.step(publish(x.t(), b"m", 1, packet_id=1, version=5, properties=properties)))
    x.sentinel(w, p)


@scenario()
def resubscribe_changes_options_5(x: Script) -> None:
    w = x.conn("c", 5)
    x.watch(w, (x.t(), 0x01))
    x.rec("resubscribe no local", w.step(subscribe(2, (x.t(), 0x05), version=5)))
    w.send(publish(x.t(), b"own", version=5))
    p = x.conn("p", 5)
    x.rec("publish", p.step(publish(x.t(), b"other", version=5)))
    x.sentinel(w, p)


@scenario()
def clean_start_with_expiry_replaces_session_5(x: Script) -> None:
    expiry = props(prop(SESSION_EXPIRY, u32(60)))
    w = x.conn("c", 5, clean=False, properties=expiry)
    x.rec("subscribe", w.step(subscribe(1, (x.t(), 1), version=5)))
    x.rec("away", w.step(disconnect(5), fence=False))
    w2 = x.conn("c", 5, "clean start", clean=True, properties=expiry)
    x.rec("away 2", w2.step(disconnect(5), fence=False))
    p = x.conn("p", 5)
    x.rec("publish", p.step(publish(x.t(), b"m", 1, packet_id=1, version=5)))
    w3 = x.conn("c", 5, "resume", clean=False)
    x.rec("queued", w3.step())
    x.rec("end", w3.step(disconnect(5, 0, props(prop(SESSION_EXPIRY, u32(0)))), fence=False))


define("connect_31_empty_client_id", one_step(3, raw_connect(3, 0x02, s(b"")), connect_first=False))
define(
    "connect_will_topic_empty_311",
    one_step(4, connect("dce", 4, will=("", b"x", 0, False)), connect_first=False),
)
define(
    "connect_will_topic_empty_5",
    one_step(5, connect("dce5", 5, will=("", b"x", 0, False)), connect_first=False),
)
define("connect_truncated_311", one_step(4, frame(0x10, s(b"MQTT") + b"\x04\x02\x00"), connect_first=False))
define("connect_truncated_5", one_step(5, frame(0x10, s(b"MQTT") + b"\x05\x02\x00"), connect_first=False))
define("connect_empty_username_311", one_step(4, connect("dcu2", 4, username=b""), connect_first=False))
define("unsubscribe_packet_id_0_5", one_step(5, unsubscribe(0, "a", version=5)))
define(
    "puback_with_reason_from_client_5",
    one_step(5, frame(0x40, u16(3) + b"\x10" + props(prop(0x1F, s(b"why"))))),
)
define("pingreq_with_body_311", one_step(4, b"\xc0\x01\x00"))
define(
    "publish_topic_with_space_and_unicode_311",
    one_step(4, publish("a b/\u00e9/\U0001f600", b"x", 1, packet_id=1)),
)


@scenario()
def subscription_identifier_on_retained_5(x: Script) -> None:
    # 3.3.4: a retained message sent for a SUBSCRIBE carries that subscription's identifier.
    p = x.conn("p", 5)
    x.rec("retain", p.step(publish(x.t(), b"kept", 0, True, version=5)))
    w = x.conn("c", 5)
    x.rec(
        "subscribe",
        w.step(subscribe(1, (x.t(), 1), version=5, properties=props(prop(SUBSCRIPTION_ID, b"\x05")))),
    )
    x.rec("clear", p.step(publish(x.t(), b"", 0, True, version=5)))


@scenario()
def subscribe_mixed_valid_and_invalid_311(x: Script) -> None:
    w = x.conn("c", 4)
    x.rec("subscribe", w.step(subscribe(1, (x.t("a"), 1), (x.t("b/#/c"), 0), (x.t("c"), 2))))


@scenario()
def shared_subscription_delivers_each_message_once_5(x: Script) -> None:
    members = [x.conn(f"m{n}", 5) for n in range(2)]
    for n, m in enumerate(members):
        x.rec(f"subscribe {n}", m.step(subscribe(1, (f"$share/g/{x.t()}", 1), version=5)))
    p = x.conn("p", 5)
    x.rec("publish", p.step(*(publish(x.t(), b"%d" % n, 1, packet_id=n + 1, version=5) for n in range(6))))
    got = []
    for m in members:
        got += [q[2] for q in m.step() if q[0] == "PUBLISH"]
    # Which member gets which message is the server's choice: compared as a multiset.
    x.rec("delivered", sorted(got))


define("shared_subscription_in_311", one_step(4, subscribe(1, ("$share/g/a", 1))))


@scenario()
def order_kept_across_qos_311(x: Script) -> None:
    # 4.6: messages of one publisher on one topic arrive in order (QoS 1 and 2 ordered topics).
    w, p = x.pair(4, (x.t(), 2))
    x.rec(
        "publish",
        p.step(
            publish(x.t(), b"1", 1, packet_id=1),
            publish(x.t(), b"2", 2, packet_id=2),
            publish(x.t(), b"3", 1, packet_id=3),
            ack(6, 2),
            publish(x.t(), b"4", 2, packet_id=4),
            ack(6, 4),
        ),
    )
    x.sentinel(w, p)


@scenario()
def maximum_packet_size_qos1_dropped_5(x: Script) -> None:
    # MQTT-3.1.2-25: a message too big for the client is discarded as if it had been delivered.
    w = x.conn("c", 5, properties=props(prop(0x27, u32(40))))
    x.watch(w, (x.t(), 1))
    p = x.conn("p", 5)
    x.rec(
        "publish",
        p.step(
            publish(x.t(), b"x" * 60, 1, packet_id=1, version=5),
            publish(x.t(), b"ok", 1, packet_id=2, version=5),
        ),
    )
    x.sentinel(w, p)


define(
    "puback_reason_string_twice_5",
    one_step(5, frame(0x40, u16(3) + b"\x10" + props(prop(0x1F, s(b"a")), prop(0x1F, s(b"b"))))),
)
define(
    "connect_will_delay_twice_5",
    one_step(
        5,
        connect(
            "dwd",
            5,
            will=("a", b"x", 0, False),
            will_properties=props(prop(0x18, u32(1)), prop(0x18, u32(2))),
        ),
        connect_first=False,
    ),
)
define(
    "connect_will_property_not_for_will_5",
    one_step(
        5,
        connect("dwp", 5, will=("a", b"x", 0, False), will_properties=props(prop(TOPIC_ALIAS, u16(1)))),
        connect_first=False,
    ),
)
define(
    "connect_password_flag_without_password_311",
    one_step(4, raw_connect(4, 0xC2, s(b"dpw") + s(b"u")), connect_first=False),
)
define(
    "connect_maximum_packet_size_0_5",
    one_step(5, raw_connect(5, 0x02, s(b"dmp"), props5=props(prop(0x27, u32(0)))), connect_first=False),
)


@scenario()
def will_user_properties_forwarded_5(x: Script) -> None:
    w = x.conn("s", 5)
    x.watch(w, (x.t("will"), 1))
    will_props = props(
        prop(USER_PROPERTY, s(b"k") + s(b"v")), prop(0x03, s(b"text/plain")), prop(PAYLOAD_FORMAT, b"\x01")
    )
    c = x.conn("w", 5, will=(x.t("will"), b"gone", 1, False), will_properties=will_props)
    x.rec("dropped", c.drop())
    p = x.conn("p", 5)
    x.sentinel(w, p)


def _outgoing_qos2_resumed(version: int, pubrec_first: bool) -> Callable[[Script], None]:
    def body(x: Script) -> None:
        # MQTT-4.4.0-1 / 4.3.3: on a resumed session the server resends the unacknowledged PUBLISH
        # (DUP 1), or the PUBREL when the PUBREC came.
        keep = {"properties": props(prop(SESSION_EXPIRY, u32(60)))} if version == 5 else {}
        w = x.conn("c", version, clean=False, **keep)
        w.auto_ack = False
        x.rec("subscribe", w.step(subscribe(1, (x.t(), 2), (x.t("sentinel"), 0), version=version)))
        p = x.conn("p", version)
        x.rec("publish", p.step(publish(x.t(), b"m", 2, packet_id=1, version=version), ack(6, 1, version)))
        x.sentinel(w, p, "received")
        if pubrec_first:
            w.send(ack(5, w.real_id("#1"), version))
        x.rec("dropped", w.drop())
        w2 = x.conn("c", version, "resume", clean=False, **keep)
        w2.auto_ack = False
        got = x.rec("resent", w2.step())
        if got and got[0][0] in ("PUBLISH", "PUBREL"):
            pid = w2.real_id("#1")
            x.rec("finish", w2.step(ack(5, pid, version)) if got[0][0] == "PUBLISH" else [])
            x.rec("pubcomp", w2.step(ack(7, pid, version)))
        x.rec("end", w2.step(disconnect(version), fence=False))
        x.conn("c", version, "end session", clean=True)

    return body


define("outgoing_qos2_publish_resent_on_resume_311", _outgoing_qos2_resumed(4, False))
define("outgoing_qos2_pubrel_resent_on_resume_311", _outgoing_qos2_resumed(4, True))
define("outgoing_qos2_publish_resent_on_resume_5", _outgoing_qos2_resumed(5, False))
define("outgoing_qos2_pubrel_resent_on_resume_5", _outgoing_qos2_resumed(5, True))


def _incoming_qos2_resumed(version: int) -> Callable[[Script], None]:
    def body(x: Script) -> None:
        # A QoS 2 PUBLISH resent (DUP) on a resumed session before its PUBREL is not a new message.
        keep = {"properties": props(prop(SESSION_EXPIRY, u32(60)))} if version == 5 else {}
        w, _ = x.pair(version, (x.t(), 2))
        p = x.conn("p2", version, clean=False, **keep)
        x.rec("publish", p.step(publish(x.t(), b"m", 2, packet_id=4, version=version)))
        x.rec("dropped", p.drop())
        p2 = x.conn("p2", version, "resume", clean=False, **keep)
        x.rec("again (dup)", p2.step(publish(x.t(), b"m", 2, packet_id=4, dup=True, version=version)))
        x.rec("pubrel", p2.step(ack(6, 4, version)))
        x.sentinel(w, p2)
        x.rec("end", p2.step(disconnect(version), fence=False))
        x.conn("p2", version, "end session", clean=True)

    return body


define("incoming_qos2_resent_after_resume_311", _incoming_qos2_resumed(4))
define("incoming_qos2_resent_after_resume_5", _incoming_qos2_resumed(5))


@scenario()
def offline_queue_in_order_5(x: Script) -> None:
    keep = props(prop(SESSION_EXPIRY, u32(60)))
    w = x.conn("c", 5, clean=False, properties=keep)
    x.rec("subscribe", w.step(subscribe(1, (x.t(), 2), version=5)))
    x.rec("away", w.step(disconnect(5), fence=False))
    p = x.conn("p", 5)
    x.rec(
        "publish",
        p.step(*(publish(x.t(), b"%d" % n, 1 + n % 2, packet_id=n + 1, version=5) for n in range(5))),
    )
    x.rec("pubrels", p.step(*(ack(6, n + 1, 5) for n in range(5) if n % 2)))
    w2 = x.conn("c", 5, "resume", clean=False, properties=keep)
    x.rec("queued", w2.step())
    x.rec("end", w2.step(disconnect(5, 0, props(prop(SESSION_EXPIRY, u32(0)))), fence=False))


@scenario()
def session_expiry_0_drops_the_session_5(x: Script) -> None:
    w = x.conn("c", 5, clean=False)
    x.rec("subscribe", w.step(subscribe(1, (x.t(), 1), version=5)))
    x.rec("away", w.step(disconnect(5), fence=False))
    p = x.conn("p", 5)
    x.rec("publish", p.step(publish(x.t(), b"m", 1, packet_id=1, version=5)))
    w2 = x.conn("c", 5, "again", clean=False)
    x.rec("nothing queued", w2.step())


def _takeover_will(version: int) -> Callable[[Script], None]:
    def body(x: Script) -> None:
        # 3.1.4: the existing connection is closed; its will is published (no DISCONNECT came).
        w, p = x.pair(version, (x.t("will"), 1))
        first = x.conn("same", version, will=(x.t("will"), b"gone", 1, False))
        x.conn("same", version, "second")
        x.rec("first", [q for q in first.until_closed() if q[0] != "DISCONNECT"])
        x.sentinel(w, p)

    return body


define("takeover_publishes_will_311", _takeover_will(4))
define("takeover_publishes_will_5", _takeover_will(5))


@scenario()
def unsubscribe_completes_inflight_311(x: Script) -> None:
    # MQTT-3.10.4-3: QoS 1/2 deliveries already started are completed after UNSUBSCRIBE.
    w = x.conn("c", 4)
    w.auto_ack = False
    x.rec("subscribe", w.step(subscribe(1, (x.t(), 1), (x.t("sentinel"), 0))))
    p = x.conn("p", 4)
    x.rec("publish", p.step(publish(x.t(), b"m", 1, packet_id=1)))
    x.sentinel(w, p, "received")
    x.rec("unsubscribe", w.step(unsubscribe(2, x.t())))
    x.rec("puback", w.step(ack(4, w.real_id("#1"))))


@scenario()
def retained_flow_control_5(x: Script) -> None:
    # MQTT-3.3.4-7: retained messages sent on SUBSCRIBE respect the client's Receive Maximum too.
    p = x.conn("p", 5)
    x.rec("retain", p.step(*(publish(x.t(f"r/{n}"), b"%d" % n, 1, True, n + 1, version=5) for n in range(3))))
    w = x.conn("c", 5, properties=props(prop(RECEIVE_MAXIMUM, u16(1))))
    w.auto_ack = False
    got = w.step(subscribe(1, (x.t("r/+"), 1), version=5))
    x.rec("subscribe", [q[0] for q in got])
    x.rec("clear", p.step(*(publish(x.t(f"r/{n}"), b"", 0, True, version=5) for n in range(3))))


define(
    "connect_31_bad_protocol_name",
    one_step(3, raw_connect(3, 0x02, s(b"d31n"), name=b"MQIsdX"), connect_first=False),
)
define("connect_31_empty_client_id_clean_0", one_step(3, raw_connect(3, 0x00, s(b"")), connect_first=False))


@scenario()
def mqtt31_session_and_will(x: Script) -> None:
    w, p = x.pair(3, (x.t("will"), 1), (x.t("q"), 2))
    c = x.conn("w", 3, will=(x.t("will"), b"gone", 1, False))
    x.rec("unsubscribe", c.step(unsubscribe(1, x.t("nothing"))))
    x.rec("dropped", c.drop())
    x.rec("publish q2", p.step(publish(x.t("q"), b"m", 2, packet_id=1), ack(6, 1)))
    x.sentinel(w, p)


@scenario()
def mixed_versions_deliver_alike(x: Script) -> None:
    # One message to a 3.1, a 3.1.1 and a 5.0 subscriber: same topic, payload, QoS, flags.
    subs = []
    for n, version in enumerate((3, 4, 5)):
        s_ = x.conn(f"s{n}", version)
        x.watch(s_, (x.t(), 2))
        subs.append(s_)
    p = x.conn("p", 5)
    x.rec(
        "publish",
        p.step(
            publish(
                x.t(), b"all", 2, True, 1, version=5, properties=props(prop(USER_PROPERTY, s(b"k") + s(b"v")))
            ),
            ack(6, 1, 5),
        ),
    )
    p.send(publish(x.t("sentinel"), b"end", version=5))
    for n, s_ in enumerate(subs):
        x.sentinel(s_, None, f"subscriber {n}")
    x.rec("clear", p.step(publish(x.t(), b"", 0, True, version=5)))


define("puback_unknown_reason_code_5", one_step(5, ack(4, 9, 5, 0x05)))
define("pubrel_unknown_reason_code_5", one_step(5, ack(6, 9, 5, 0x10)))
define(
    "subscribe_with_user_property_5",
    one_step(5, subscribe(1, ("a", 0), version=5, properties=props(prop(USER_PROPERTY, s(b"k") + s(b"v"))))),
)


def _offline_retained(version: int) -> Callable[[Script], None]:
    def body(x: Script) -> None:
        # MQTT-3.3.1-9 / -12: a retained PUBLISH queued for a matching subscription goes with RETAIN
        # 0 (Retain As Published keeps it 1); the identifier and properties go with it (3.3.4).
        keep = {"properties": props(prop(SESSION_EXPIRY, u32(60)))} if version == 5 else {}
        w = x.conn("c", version, clean=False, **keep)
        sub_props = props(prop(SUBSCRIPTION_ID, b"\x09")) if version == 5 else b""
        rap = 0x08 if version == 5 else 0
        x.rec(
            "subscribe",
            w.step(subscribe(1, (x.t("a"), 1), (x.t("b"), 1 | rap), version=version, properties=sub_props)),
        )
        x.rec("away", w.step(disconnect(version), fence=False))
        p = x.conn("p", version)
        user = props(prop(USER_PROPERTY, s(b"k") + s(b"v"))) if version == 5 else b""
        x.rec(
            "publish",
            p.step(
                publish(x.t("a"), b"ra", 1, True, 1, version=version, properties=user),
                publish(x.t("b"), b"rb", 1, True, 2, version=version),
                publish(x.t("a"), b"q0", 0, version=version),
            ),
        )
        w2 = x.conn("c", version, "resume", clean=False, **keep)
        x.rec("queued", w2.step())
        x.rec(
            "clear",
            p.step(
                publish(x.t("a"), b"", 0, True, version=version),
                publish(x.t("b"), b"", 0, True, version=version),
            ),
        )
        x.rec("end", w2.step(disconnect(version), fence=False))
        x.conn("c", version, "end session", clean=True)

    return body


define("offline_retained_flag_and_properties_311", _offline_retained(4))
define("offline_retained_flag_and_properties_5", _offline_retained(5))


@scenario()
def qos0_behind_a_full_receive_maximum_5(x: Script) -> None:
    # 4.9: at a send quota of 0 the server MUST NOT send QoS 1/2 [MQTT-4.9.0-2]; it MAY go on
    # sending QoS 0 or suspend them too.
    w = x.conn("c", 5, properties=props(prop(RECEIVE_MAXIMUM, u16(1))))
    w.auto_ack = False
    x.rec("subscribe", w.step(subscribe(1, (x.t("q"), 1), (x.t("z"), 0), (x.t("sentinel"), 0), version=5)))
    p = x.conn("p", 5)
    x.rec(
        "publish",
        p.step(
            publish(x.t("q"), b"1", 1, packet_id=1, version=5),
            publish(x.t("q"), b"2", 1, packet_id=2, version=5),
            publish(x.t("z"), b"zero", version=5),
        ),
    )
    x.rec("quota 0", w.step())
    w.auto_ack = True
    x.rec("puback", w.step(ack(4, w.real_id("#1"), 5)))
    x.sentinel(w, p, "rest")


@scenario()
def no_reason_strings_when_not_requested_5(x: Script) -> None:
    # MQTT-3.1.2-29: with Request Problem Information 0, no Reason String or User Property on
    # anything but PUBLISH, CONNACK and DISCONNECT.
    w = x.conn("c", 5, properties=props(prop(0x17, b"\x00")))
    w.strings = True
    x.rec("refused publish", w.step(publish("$SYS/x", b"x", 1, packet_id=1, version=5)))
    x.rec("unknown pubrel", w.step(ack(6, 5, 5)))
    x.rec("unsubscribe unknown", w.step(unsubscribe(2, x.t(), version=5)))
    x.rec("subscribe", w.step(subscribe(3, (x.t(), 1), version=5)))


# -- expected divergences ---------------------------------------------------------------------------
# Where the texts let a server choose, or Mosquitto 2.0 departs from them. Topics read "~" for the
# scenario's prefix. docs/conformance.rst ("Differences from Mosquitto") sums these up.

CONNACK_OK = ("CONNACK", 0, 0)


def refused_connect(code: int) -> dict:
    return {"step": [("CONNACK", 0, code), CLOSED]}


def closed_with(code: int | None, label: str = "step") -> dict:
    return {label: [("DISCONNECT", code), CLOSED] if code is not None else [CLOSED]}


def answered(*packets: tuple, label: str = "step") -> dict:
    return {label: list(packets)}


# 5.0 4.13.1: an error in a CONNECT MAY be answered by a CONNACK with the reason code before the
# close [MQTT-3.2.2-7]; fluxmq does, Mosquitto closes without a word.
CONNACK_CODE = "5.0 4.13.1 / MQTT-3.2.2-7: CONNACK with the code, then close (Mosquitto: close only)"
# 5.0 4.13.1: after the CONNACK, the server SHOULD send a DISCONNECT with the reason code before it
# closes [MQTT-4.13.2-1 lets it]; Mosquitto closes without one.
DISCONNECT_CODE = "5.0 4.13.1: DISCONNECT with the reason code before the close (Mosquitto: close only)"
# The text names the code: "It is a Protocol Error ..." (0x82), Topic Name invalid (0x90), Topic
# Alias invalid (0x94); Mosquitto says Malformed Packet (0x81) or Protocol Error for all.
NAMED_CODE = "5.0 text names the reason code (3.8.3, 3.8.3.1, 3.8.2.1.2, 3.10.3, 3.3.2.1, 3.3.2.3.4)"
# An ill-formed Topic Filter is refused in the SUBACK (3.1.1 0x80 Failure, 5.0 0x8F Topic Filter
# invalid) and the connection stays; Mosquitto closes. Both are allowed: MQTT-4.7.1-1/-2 forbid the
# filter, 3.9.3 and 4.8.0-1 give the failure code or the close.
FILTER_REFUSED = "3.1.1 3.9.3 / 5.0 3.9.3 0x8F for an invalid filter, connection kept (Mosquitto: close)"

DIVERGENCES: dict[str, Diverge] = {
    **{
        name: Diverge(CONNACK_CODE, refused_connect(code))
        for name, code in {
            "connect_client_id_bad_utf8_5": 0x81,
            "connect_property_not_for_connect_5": 0x81,
            "connect_receive_maximum_0_5": 0x82,
            "connect_reserved_flag_5": 0x81,
            "connect_session_expiry_twice_5": 0x82,
            "connect_will_qos_without_will_flag_5": 0x81,
            "connect_will_topic_wildcard_5": 0x90,
            "connect_will_topic_empty_5": 0x90,
            "connect_truncated_5": 0x81,
            "connect_maximum_packet_size_0_5": 0x82,
            "connect_will_delay_twice_5": 0x82,
            "connect_will_property_not_for_will_5": 0x81,
        }.items()
    },
    **{
        name: Diverge(DISCONNECT_CODE, closed_with(code, label))
        for name, (code, label) in {
            "connect_twice_5": (0x82, "second connect"),
            "disconnect_property_not_for_disconnect_5": (0x81, "step"),
            "publish_payload_format_twice_5": (0x82, "step"),
            "pubrel_bad_flags_5": (0x81, "step"),
            "remaining_length_five_bytes_5": (0x81, "step"),
            "subscribe_subscription_identifier_twice_5": (0x82, "step"),
            "auth_packet_without_method_5": (0x82, "step"),
            "puback_reason_string_twice_5": (0x82, "step"),
            "will_sent_on_protocol_error_5": (0x81, "end"),
            "will_sent_on_disconnect_bad_flags_5": (0x81, "end"),
            "will_sent_on_disconnect_bad_property_5": (0x81, "end"),
            "will_sent_on_disconnect_reason_string_twice_5": (0x82, "end"),
            # 5.0 3.1.4: the existing connection gets DISCONNECT 0x8E Session taken over.
            "client_id_takeover_5": (0x8E, "first"),
        }.items()
    },
    **{
        name: Diverge(NAMED_CODE, closed_with(code))
        for name, code in {
            "publish_topic_alias_0_5": 0x94,
            "publish_wildcard_hash_5": 0x90,
            "publish_wildcard_plus_5": 0x90,
            "subscribe_empty_payload_5": 0x82,
            "subscribe_qos_3_5": 0x82,
            "subscribe_retain_handling_3_5": 0x82,
            "subscribe_subscription_identifier_0_5": 0x82,
            "unsubscribe_empty_payload_5": 0x82,
        }.items()
    },
    **{
        name: Diverge(FILTER_REFUSED, answered(("SUBACK", 1, (code,))))
        for name, code in {
            "subscribe_empty_filter_311": 0x80,
            "subscribe_empty_filter_5": 0x8F,
            "subscribe_hash_in_level_5": 0x8F,
            "subscribe_hash_not_last_311": 0x80,
            "subscribe_hash_not_last_5": 0x8F,
            "subscribe_plus_in_level_311": 0x80,
            "subscribe_plus_in_level_5": 0x8F,
            # MQTT-4.8.2-2: the ShareName must not contain "/", "+" or "#".
            "subscribe_share_wildcard_group_5": 0x8F,
            # MQTT-4.8.2-1: "$share/{ShareName}/{filter}" with a ShareName of at least one
            # character and a filter; Mosquitto grants these as if they were plain filters.
            "subscribe_share_empty_group_5": 0x8F,
            "subscribe_share_without_filter_5": 0x8F,
        }.items()
    },
    "unsubscribe_invalid_filter_311": Diverge(FILTER_REFUSED, answered(("UNSUBACK", 1, ()))),
    "subscribe_mixed_valid_and_invalid_311": Diverge(
        FILTER_REFUSED, answered(("SUBACK", 1, (1, 0x80, 2)), label="subscribe")
    ),
    **{
        name: Diverge(
            "MQTT-2.2.1-3: a packet id of 0 is an error the text gives no code; fluxmq says 0x82",
            closed_with(0x82),
        )
        for name in ("subscribe_packet_id_0_5", "unsubscribe_packet_id_0_5")
    },
    # Mosquitto accepts what the text forbids.
    "receive_maximum_of_server_exceeded_5": Diverge(
        "5.0 4.9: over the Receive Maximum, DISCONNECT 0x93 (Mosquitto: PUBREC 0x97)",
        closed_with(0x93, "one more"),
    ),
    "resubscribe_changes_options_5": Diverge(
        "MQTT-3.8.4-3: a SUBSCRIBE to an existing filter replaces the subscription (its options too)",
        answered(("PUBLISH", "~/t", b"other", 0, False, False, None, ()), label="delivered"),
    ),
    "pingreq_with_body_311": Diverge(
        "3.1.1 3.12.1: a PINGREQ has remaining length 0; anything else is malformed [MQTT-4.8.0-1]",
        closed_with(None),
    ),
    "subscribe_share_no_local_5": Diverge(
        "MQTT-3.8.3-4: No Local on a shared subscription is a Protocol Error", closed_with(0x82)
    ),
    "publish_subscription_identifier_from_client_5": Diverge(
        "MQTT-3.3.4-6: a client's PUBLISH must not carry a Subscription Identifier", closed_with(0x82)
    ),
    "pingreq_bad_flags_311": Diverge("MQTT-2.2.2-2: invalid fixed header flags close", closed_with(None)),
    "puback_bad_flags_311": Diverge("MQTT-2.2.2-2: invalid fixed header flags close", closed_with(None)),
    "puback_bad_flags_5": Diverge(
        "5.0 2.1.3: invalid fixed header flags, Malformed Packet", closed_with(0x81)
    ),
    "publish_dup_on_qos_0_311": Diverge("MQTT-3.3.1-2: DUP must be 0 on QoS 0", closed_with(None)),
    "publish_dup_on_qos_0_5": Diverge("MQTT-3.3.1-2: DUP must be 0 on QoS 0", closed_with(0x81)),
    "connect_31_long_client_id": Diverge(
        "MQTT 3.1 3.1: a client id over 23 characters gets return code 2", refused_connect(2)
    ),
    "shared_subscription_gets_no_retained_5": Diverge(
        "5.0 4.8.2: retained messages are not sent for a shared subscription",
        answered(("SUBACK", 1, (1,)), label="subscribe shared"),
    ),
    # Both allowed; fluxmq chooses otherwise.
    "broker_topic_aliases_to_client_5": Diverge(
        "5.0 3.3.2.3.4: the Server MAY use Topic Aliases up to the client's Topic Alias Maximum",
        answered(
            ("PUBLISH", "~/t", b"0", 0, False, False, None, (("alias",),)),
            ("PUBLISH", "", b"1", 0, False, False, None, (("alias",),)),
            ("PUBLISH", "", b"2", 0, False, False, None, (("alias",),)),
            label="delivered",
        ),
    ),
    **{
        name: Diverge(
            "MQTT-3.1.2-1 (3.1.1): close, or go on by another specification (return code 1)",
            refused_connect(1),
        )
        for name in ("connect_bad_protocol_name_311", "connect_31_bad_protocol_name")
    },
    "overlapping_subscriptions_5": Diverge(
        "5.0 3.3.4 / MQTT-3.3.4-2: one copy at the highest QoS, further copies MAY be sent",
        answered(("PUBLISH", "~/o/a", b"m", 1, False, False, "#1", ()), label="delivered"),
    ),
    "subscription_identifier_delivered_5": Diverge(
        "MQTT-3.3.4-4 / -5: one copy with every identifier, or one copy per subscription",
        answered(("PUBLISH", "~/a/b", b"m", 1, False, False, "#1", ((11, 7), (11, 129))), label="delivered"),
    ),
    "qos2_delivered_before_pubrel_5": Diverge(
        "5.0 4.3.3 (Figure 4.3, method B): a QoS 2 message MAY be forwarded at its PUBLISH",
        {
            "before pubrel": [("PUBLISH", "~/t", b"m", 2, False, False, "#1", ())],
            "after pubrel": [],
        },
    ),
    "order_kept_across_qos_311": Diverge(
        "MQTT-4.6.0-5 orders messages of the same topic and QoS; a QoS 2 message MAY go on at its "
        "PUBLISH (4.3.3 method B, fluxmq) or at its PUBREL (Mosquitto)",
        answered(
            *(
                ("PUBLISH", "~/t", payload, qos, False, False, f"#{n}", ())
                for n, (payload, qos) in enumerate(((b"1", 1), (b"2", 2), (b"3", 1), (b"4", 2)), 1)
            ),
            label="delivered",
        ),
    ),
    "offline_queue_in_order_5": Diverge(
        "MQTT-4.6.0-5 orders messages of the same topic and QoS; QoS 2 messages go on at PUBLISH here",
        answered(
            ("CONNACK", 1, 0),
            *(("PUBLISH", "~/t", b"%d" % n, 1 + n % 2, False, False, f"#{n + 1}", ()) for n in range(5)),
            label="resume",
        ),
    ),
    "will_on_disconnect_unknown_reason_5": Diverge(
        "MQTT-3.14.4-3: only reason 0x00 discards the will; 0x05 is no DISCONNECT code [MQTT-3.14.2-1]:"
        " a Malformed Packet, DISCONNECT 0x81 before the close [MQTT-4.13.1-1]",
        {
            **closed_with(0x81, "end"),
            **answered(("PUBLISH", "~/will", b"gone", 1, False, False, "#1", ()), label="delivered"),
        },
    ),
    "qos0_behind_a_full_receive_maximum_5": Diverge(
        "5.0 4.9: at a send quota of 0 QoS 0 MAY go on or be suspended too [MQTT-4.9.0-2]; fluxmq "
        "keeps the subscriber's order and holds it behind the window",
        {
            "quota 0": [("PUBLISH", "~/q", b"1", 1, False, False, "#1", ())],
            "puback": [
                ("PUBLISH", "~/q", b"2", 1, False, False, "#2", ()),
                ("PUBLISH", "~/z", b"zero", 0, False, False, None, ()),
            ],
        },
    ),
    "pubrel_unknown_id_5": Diverge(
        "5.0 3.7.2.1: PUBCOMP 0x92 Packet Identifier not found", answered(("PUBCOMP", 77, 0x92, 0))
    ),
    "pubrel_unknown_reason_code_5": Diverge(
        "5.0 3.7.2.1: PUBCOMP 0x92 Packet Identifier not found", answered(("PUBCOMP", 9, 0x92, 0))
    ),
    "no_reason_strings_when_not_requested_5": Diverge(
        "5.0 3.7.2.1: PUBCOMP 0x92 Packet Identifier not found",
        answered(("PUBCOMP", 5, 0x92, 0, ("strings", False)), label="unknown pubrel"),
    ),
    "pubrec_unknown_id_5": Diverge(
        "5.0 3.6.2.1: PUBREL 0x92 Packet Identifier not found", answered(("PUBREL", 78, 0x92, 2))
    ),
    "qos2_duplicate_before_pubrel_5": Diverge(
        "5.0 3.7.2.1: PUBCOMP 0x92 for a PUBREL whose exchange is over",
        answered(("PUBCOMP", 7, 0x92, 0), label="pubrel again"),
    ),
    "publish_payload_format_invalid_utf8_5": Diverge(
        "5.0 3.3.2.3.2: the receiver MAY check a payload marked UTF-8 (0x99)",
        answered(("PUBACK", 1, 0x99, 0)),
    ),
    "connect_will_payload_format_invalid_5": Diverge(
        "5.0 3.1.3.2.3: the Server MAY check a will payload marked UTF-8 (0x99)", refused_connect(0x99)
    ),
}


# -- the run -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def brokers(tmp_path_factory: pytest.TempPathFactory, node: Any) -> Any:
    mosq = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    try:
        yield Broker("mosquitto", mosq.host, mosq.port), Broker("fluxmq", node.host, node.mqtt_port)
    finally:
        mosq.stop()


def _unprefixed(value: Any, prefix: str) -> Any:
    if isinstance(value, str):
        return value.replace(prefix + "/", "~/").replace(prefix + "-", "~-")
    if isinstance(value, (list, tuple)):
        return type(value)(_unprefixed(v, prefix) for v in value)
    return value


def transcript(broker: Broker, name: str) -> list:
    """The scenario's transcript against ``broker`` (topics and client ids with ``~`` for the prefix)."""
    prefix = f"df{sorted(SCENARIOS).index(name)}"
    script = Script(broker, prefix)
    try:
        SCENARIOS[name](script)
    finally:
        script.close()
    return _unprefixed(script.log, prefix)


def test_divergences_name_scenarios() -> None:
    assert set(DIVERGENCES) <= set(SCENARIOS), set(DIVERGENCES) - set(SCENARIOS)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_same_answers_as_mosquitto(brokers: Any, name: str) -> None:
    mosq, flux = brokers
    expected = transcript(mosq, name)
    got = transcript(flux, name)
    diverge = DIVERGENCES.get(name)
    if diverge is None:
        assert got == expected, f"fluxmq {got!r}\n!= mosquitto {expected!r}"
        return
    # Mosquitto's transcript with fluxmq's pinned answers at the diverging steps.
    pinned = [(label, diverge.flux.get(label, packets)) for label, packets in expected]
    assert got == pinned, f"fluxmq {got!r}\n!= {pinned!r} ({diverge.ref}; mosquitto {expected!r})"
    still = [label for label, packets in expected if label in diverge.flux and packets != diverge.flux[label]]
    assert still, f"mosquitto now answers as fluxmq: drop the divergence ({diverge.ref})"
