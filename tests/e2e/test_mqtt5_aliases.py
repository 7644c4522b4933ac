"""Topic aliases in both directions: inbound (up to the broker's Topic Alias Maximum) and outbound
under ``broker.topic_alias_policy`` (lru, first_n, none) within the client's Topic Alias Maximum."""

from __future__ import annotations

import pytest

from fluxmq._core import codec as c
from tests.e2e.mqtt5raw import disconnect_of, module_node, paho5, props, raw5, unique

pytestmark = pytest.mark.e2e

ALIAS = c.TOPIC_ALIAS


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with module_node(tmp_path_factory) as n:  # broker.max_topic_alias 100, topic_alias_policy lru
        yield n


# -- inbound ---------------------------------------------------------------------------------------


def test_inbound_alias_is_set_then_used_MQTT_3_3_2_12(node) -> None:
    """PUBLISH with topic + alias sets the alias; later an empty topic + alias means that topic; the
    subscriber sees full topics and no Topic Alias of the publisher's connection."""
    topic = unique("al/in")
    sub = raw5(node, unique("al-in-sub"))
    pub = raw5(node, unique("al-in-pub"))
    try:
        assert pub.connack.properties[c.TOPIC_ALIAS_MAXIMUM] == 100
        sub.subscribe(1, (topic + "/#", 0))
        pub.publish(topic + "/a", b"1", properties={ALIAS: 7})
        pub.publish("", b"2", properties={ALIAS: 7})
        pub.publish(topic + "/b", b"3", properties={ALIAS: 7})  # re-mapped
        pub.publish("", b"4", 1, packet_id=1, properties={ALIAS: 7})
        got = [sub.expect(c.Publish) for _ in range(4)]
        assert [(p.topic, p.payload) for p in got] == [
            (topic + "/a", b"1"),
            (topic + "/a", b"2"),
            (topic + "/b", b"3"),
            (topic + "/b", b"4"),
        ]
        assert all(ALIAS not in p.properties for p in got)
    finally:
        sub.disconnect()
        pub.disconnect()


def test_inbound_alias_over_the_maximum_is_0x94_MQTT_3_2_2_17(node) -> None:
    client = raw5(node, unique("al-max"))
    client.publish(unique("al/max"), b"x", properties={ALIAS: 101})
    assert disconnect_of(client.wait_closed()).reason_code == 0x94


def test_inbound_alias_zero_is_refused_MQTT_3_3_2_8(node) -> None:
    """Topic Alias 0 is not permitted [MQTT-3.3.2-8]: DISCONNECT 0x94 Topic Alias invalid."""
    client = raw5(node, unique("al-zero"))
    client.send_bytes(b"\x30\x08\x00\x01t\x03\x23\x00\x00x")  # PUBLISH "t", properties: Topic Alias 0
    assert disconnect_of(client.wait_closed()).reason_code == 0x94


def test_unknown_alias_is_a_protocol_error(node) -> None:
    client = raw5(node, unique("al-unknown"))
    client.publish("", b"x", properties={ALIAS: 3})
    assert disconnect_of(client.wait_closed()).reason_code == 0x82


def test_aliases_do_not_carry_over_to_a_new_connection_MQTT_3_3_2_7(node) -> None:
    cid = unique("al-carry")
    first = raw5(node, cid)
    first.publish(unique("al/carry"), b"x", 1, packet_id=1, properties={ALIAS: 1})
    first.disconnect()
    second = raw5(node, cid)
    second.publish("", b"x", properties={ALIAS: 1})
    assert disconnect_of(second.wait_closed()).reason_code == 0x82


def test_paho_publishes_with_a_topic_alias(node) -> None:
    topic = unique("al/paho")
    sub = raw5(node, unique("al-psub"))
    pub = paho5(node, unique("al-ppub"))
    try:
        sub.subscribe(1, (topic, 1))
        pub.publish(topic, b"aliased", 1, properties=props(TopicAlias=5))
        got = sub.expect(c.Publish)
        assert (got.topic, got.payload) == (topic, b"aliased")
        sub.ack(got)
    finally:
        sub.disconnect()
        pub.disconnect()


# -- outbound --------------------------------------------------------------------------------------


def receive(client, n: int) -> list[tuple[str, int | None, str]]:
    """``n`` PUBLISHes as (topic on the wire, alias, resolved topic), resolving aliases like a client."""
    table = client.__dict__.setdefault("aliases", {})
    out = []
    for _ in range(n):
        p = client.expect(c.Publish)
        client.ack(p)
        alias = p.properties.get(ALIAS)
        if alias is not None and p.topic:
            table[alias] = p.topic
        resolved = p.topic or table[alias]
        out.append((p.topic, alias, resolved))
    return out


def send_topics(node, topics: list[str]) -> None:
    pub = raw5(node, unique("al-out-pub"))
    try:
        for i, topic in enumerate(topics, 1):
            pub.publish(topic, str(i).encode(), 1, packet_id=i)
    finally:
        pub.disconnect()


def test_outbound_aliases_lru_within_the_client_maximum_MQTT_3_1_2_29(node) -> None:
    """Client Topic Alias Maximum 2, policy lru: a topic gets an alias with its name once, then the alias
    alone; a third topic takes the least recently used alias; never an alias above 2 [MQTT-3.1.2-29]."""
    base = unique("al/lru")
    t1, t2, t3 = base + "/1", base + "/2", base + "/3"
    sub = raw5(node, unique("al-lru"), properties={c.TOPIC_ALIAS_MAXIMUM: 2})
    try:
        sub.subscribe(1, (base + "/#", 1))
        send_topics(node, [t1, t1, t2, t3, t2, t1])
        got = receive(sub, 6)
        assert got == [(t1, 1, t1), ("", 1, t1), (t2, 2, t2), (t3, 1, t3), ("", 2, t2), (t1, 1, t1)]
    finally:
        sub.disconnect()


def test_client_without_topic_alias_maximum_gets_none_MQTT_3_1_2_30(node) -> None:
    base = unique("al/noalias")
    sub = raw5(node, unique("al-none"))
    try:
        sub.subscribe(1, (base + "/#", 1))
        send_topics(node, [base + "/a", base + "/a"])
        assert receive(sub, 2) == [(base + "/a", None, base + "/a")] * 2
    finally:
        sub.disconnect()


def test_each_connection_has_its_own_aliases(node) -> None:
    """Two subscribers with different maxima get the same messages with their own alias numbering."""
    base = unique("al/two")
    a = raw5(node, unique("al-two-a"), properties={c.TOPIC_ALIAS_MAXIMUM: 1})
    b = raw5(node, unique("al-two-b"), properties={c.TOPIC_ALIAS_MAXIMUM: 5})
    try:
        a.subscribe(1, (base + "/#", 1))
        b.subscribe(1, (base + "/#", 1))
        send_topics(node, [base + "/x", base + "/y", base + "/x"])
        assert receive(a, 3) == [
            (base + "/x", 1, base + "/x"),
            (base + "/y", 1, base + "/y"),
            (base + "/x", 1, base + "/x"),
        ]
        assert receive(b, 3) == [
            (base + "/x", 1, base + "/x"),
            (base + "/y", 2, base + "/y"),
            ("", 1, base + "/x"),
        ]
    finally:
        a.disconnect()
        b.disconnect()


def test_outbound_aliases_first_n_and_none(node_factory) -> None:
    """first_n: the first topics keep their aliases, later ones go by name; none: never an alias."""
    first_n = node_factory({"broker.topic_alias_policy": "first_n"})
    none = node_factory({"broker.topic_alias_policy": "none"})
    base = unique("al/policy")
    t1, t2, t3 = base + "/1", base + "/2", base + "/3"
    sub = raw5(first_n, unique("al-first"), properties={c.TOPIC_ALIAS_MAXIMUM: 2})
    sub_none = raw5(none, unique("al-nonepol"), properties={c.TOPIC_ALIAS_MAXIMUM: 2})
    try:
        sub.subscribe(1, (base + "/#", 1))
        sub_none.subscribe(1, (base + "/#", 1))
        send_topics(first_n, [t1, t2, t3, t3, t1])
        assert receive(sub, 5) == [(t1, 1, t1), (t2, 2, t2), (t3, None, t3), (t3, None, t3), ("", 1, t1)]
        send_topics(none, [t1, t1])
        assert receive(sub_none, 2) == [(t1, None, t1), (t1, None, t1)]
    finally:
        sub.disconnect()
        sub_none.disconnect()
