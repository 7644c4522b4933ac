"""Subscription options (No Local, Retain As Published, Retain Handling 0/1/2) and Subscription
Identifiers, including several identifiers on one PUBLISH when several subscriptions match."""

from __future__ import annotations

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.subscribeoptions import SubscribeOptions

from fluxmq._core import codec as c
from tests.e2e.mqtt5raw import disconnect_of, module_node, paho5, props, raw5, unique

pytestmark = pytest.mark.e2e

SUBID = c.SUBSCRIPTION_IDENTIFIER


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with module_node(tmp_path_factory) as n:
        yield n


def test_no_local_MQTT_3_8_3_3(node) -> None:
    """With No Local a client does not get its own messages [MQTT-3.8.3-3]; without it, it does; other
    clients get them either way."""
    topic = unique("so/nolocal")
    me = raw5(node, unique("so-nl"))
    other = raw5(node, unique("so-nl-other"))
    try:
        me.subscribe(1, c.Subscription(topic + "/nl", 1, no_local=True), c.Subscription(topic + "/all", 1))
        other.subscribe(1, (topic + "/#", 1))
        me.publish(topic + "/nl", b"mine", 1, packet_id=1)
        me.publish(topic + "/all", b"echo", 1, packet_id=2)
        assert [(p.topic, p.payload) for p in me.publishes_so_far()] == [(topic + "/all", b"echo")]
        assert [p.payload for p in other.publishes_so_far()] == [b"mine", b"echo"]
    finally:
        me.disconnect()
        other.disconnect()


def test_no_local_overlapping_subscription_still_delivers(node) -> None:
    """Two matching subscriptions, one with No Local: the own message comes once, at the QoS of the
    subscription without No Local."""
    topic = unique("so/nloverlap")
    me = raw5(node, unique("so-nlo"))
    try:
        base = topic[: topic.rfind("/")]
        ack = me.subscribe(1, c.Subscription(topic, 2, no_local=True), c.Subscription(base + "/+", 1))
        assert ack.reason_codes == [2, 1]
        me.publish(topic, b"x", 2, packet_id=1)
        me.send(c.Pubrel(1))
        got = me.publishes_so_far()
        assert [(p.payload, p.qos) for p in got] == [(b"x", 1)]
    finally:
        me.disconnect()


def test_no_local_on_a_shared_subscription_is_a_protocol_error_MQTT_3_8_3_4(node) -> None:
    client = raw5(node, unique("so-nlshare"))
    client.send(c.Subscribe(1, [c.Subscription(f"$share/g/{unique('so/x')}", 1, no_local=True)]))
    assert disconnect_of(client.wait_closed()).reason_code == 0x82


@pytest.mark.parametrize("rap", [False, True])
def test_retain_as_published_MQTT_3_3_1_12(node, rap: bool) -> None:
    """An existing subscription gets a retained PUBLISH with RETAIN 0 unless Retain As Published is set
    [MQTT-3.3.1-12, MQTT-3.3.1-13]; retained messages sent on subscribe always have RETAIN 1."""
    topic = unique("so/rap")
    sub = raw5(node, unique("so-rap"))
    pub = raw5(node, unique("so-rap-pub"))
    try:
        sub.subscribe(1, c.Subscription(topic, 1, retain_as_published=rap))
        pub.publish(topic, b"r", 1, retain=True, packet_id=1)
        (live,) = sub.publishes_so_far()
        assert live.retain is rap
        sub.subscribe(2, c.Subscription(topic, 1, retain_as_published=rap))
        (again,) = sub.publishes_so_far()
        assert again.retain is True
    finally:
        pub.publish(topic, b"", 1, retain=True, packet_id=2)
        sub.disconnect()
        pub.disconnect()


def test_retain_handling_MQTT_3_3_1_9_to_11(node) -> None:
    """Retain Handling 0 sends retained messages on every SUBSCRIBE [MQTT-3.3.1-9], 1 only when the
    subscription is new [MQTT-3.3.1-10], 2 never [MQTT-3.3.1-11]."""
    topic = unique("so/rh")
    pub = raw5(node, unique("so-rh-pub"))
    pub.publish(topic, b"kept", 1, retain=True, packet_id=1)
    client = raw5(node, unique("so-rh"))
    try:
        counts = {}
        base = topic[: topic.rfind("/")]
        for rh, f in ((0, topic), (1, base + "/+"), (2, base + "/#")):
            first = client.subscribe(10 + rh, c.Subscription(f, 1, retain_handling=rh))
            assert first.reason_codes == [1]
            n_first = len(client.publishes_so_far())
            client.subscribe(20 + rh, c.Subscription(f, 1, retain_handling=rh))
            n_again = len(client.publishes_so_far())
            counts[rh] = (n_first, n_again)
            client.send(c.Unsubscribe(30 + rh, [f]))
            client.expect(c.Unsuback)
        assert counts == {0: (1, 1), 1: (1, 0), 2: (0, 0)}
    finally:
        pub.publish(topic, b"", 1, retain=True, packet_id=2)
        pub.disconnect()
        client.disconnect()


def test_subscription_identifier_on_matching_publishes_MQTT_3_3_4_3(node) -> None:
    """The Subscription Identifier of the matching subscription is on each PUBLISH [MQTT-3.3.4-3]; a
    subscription without one gives none; replacing a subscription replaces its identifier."""
    topic = unique("so/subid")
    client = raw5(node, unique("so-subid"))
    pub = raw5(node, unique("so-subid-pub"))
    try:
        client.subscribe(1, (topic + "/a", 1), properties={SUBID: [7]})
        client.subscribe(2, (topic + "/b", 1))
        pub.publish(topic + "/a", b"1", 1, packet_id=1)
        pub.publish(topic + "/b", b"2", 1, packet_id=2)
        got = client.publishes_so_far()
        assert [(p.payload, p.properties.get(SUBID)) for p in got] == [(b"1", [7]), (b"2", None)]
        client.subscribe(3, (topic + "/a", 1), properties={SUBID: 268435455})
        pub.publish(topic + "/a", b"3", 1, packet_id=3)
        assert [p.properties[SUBID] for p in client.publishes_so_far()] == [[268435455]]
    finally:
        client.disconnect()
        pub.disconnect()


def test_several_matching_subscriptions_give_all_identifiers_in_one_publish_MQTT_3_3_4_4(node) -> None:
    """Overlapping subscriptions with identifiers 1, 2 and one without: a single PUBLISH at the highest
    granted QoS carrying identifiers 1 and 2 [MQTT-3.3.4-2, MQTT-3.3.4-4]."""
    topic = unique("so/multi")
    base = topic[: topic.rfind("/")]
    client = raw5(node, unique("so-multi"))
    pub = raw5(node, unique("so-multi-pub"))
    try:
        client.subscribe(1, (topic, 0), properties={SUBID: [1]})
        client.subscribe(2, (base + "/#", 2), properties={SUBID: [2]})
        client.subscribe(3, (base + "/+", 1))
        pub.publish(topic, b"m", 2, packet_id=1)
        pub.send(c.Pubrel(1))
        (got,) = client.publishes_so_far()
        assert got.qos == 2 and sorted(got.properties[SUBID]) == [1, 2]
    finally:
        client.disconnect()
        pub.disconnect()


def test_retained_delivery_carries_the_subscription_identifier(node) -> None:
    topic = unique("so/retid")
    pub = raw5(node, unique("so-retid-pub"))
    pub.publish(topic, b"r", 1, retain=True, packet_id=1)
    client = raw5(node, unique("so-retid"))
    try:
        client.subscribe(1, (topic, 1), properties={SUBID: [99]})
        (got,) = client.publishes_so_far()
        assert (got.retain, got.properties[SUBID]) == (True, [99])
    finally:
        pub.publish(topic, b"", 1, retain=True, packet_id=2)
        pub.disconnect()
        client.disconnect()


def test_paho_subscription_options_and_identifiers(node) -> None:
    """paho MQTTv5 SubscribeOptions (noLocal, retainAsPublished, retainHandling) and identifiers."""
    topic = unique("so/paho")
    pub = raw5(node, unique("so-ppub"))
    pub.publish(topic + "/r", b"old", 1, retain=True, packet_id=1)
    client = paho5(node, unique("so-paho"))
    try:
        client.subscribe(
            topic + "/r",
            options=SubscribeOptions(qos=1, retainHandling=2, retainAsPublished=True),
            properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=5),
        )
        client.subscribe(topic + "/own", options=SubscribeOptions(qos=1, noLocal=True))
        client.publish(topic + "/own", b"self", 1)
        pub.publish(topic + "/r", b"new", 1, retain=True, packet_id=2)
        msg = client.get()
        assert (msg.payload, msg.retain, msg.properties.SubscriptionIdentifier) == (b"new", True, [5])
    finally:
        pub.publish(topic + "/r", b"", 1, retain=True, packet_id=3)
        pub.disconnect()
        client.disconnect()
