"""Topic names and filters: wildcards, $-topics, invalid filters, overlapping and shared subscriptions."""

from __future__ import annotations

import pytest

from fluxmq._core import codec as c
from tests.e2e.mqttraw import paho_connected, raw_connected, unique

pytestmark = pytest.mark.e2e


def _deliveries(node, filters: list[tuple[str, int]], topics: list[str]) -> list:
    """Topics a fresh subscriber of ``filters`` receives when each of ``topics`` is published once.

    A sentinel on a topic of its own, published last, bounds the wait.
    """
    sentinel = unique("sentinel")
    sub = raw_connected(node, unique("match-sub"))
    pub = raw_connected(node, unique("match-pub"))
    try:
        suback = sub.subscribe(1, *filters, (sentinel, 0))
        assert all(code != 0x80 for code in suback.reason_codes), suback
        for i, t in enumerate(topics):
            pub.publish_qos1(t, b"m", i + 1)
        pub.publish_qos1(sentinel, b"S", len(topics) + 1)
        before, _ = sub.collect_until(lambda p: isinstance(p, c.Publish) and p.topic == sentinel)
        return [p.topic for p in before if isinstance(p, c.Publish)]
    finally:
        pub.disconnect()
        sub.disconnect()


def test_multi_level_wildcard_matches_parent_and_children_MQTT_4_7_1_2(node) -> None:
    """``base/#`` matches ``base``, ``base/x`` and ``base/x/y`` [MQTT-4.7.1-2]."""
    base = unique("hash")
    topics = [base, f"{base}/x", f"{base}/x/y", f"{base}x", unique("other")]
    assert _deliveries(node, [(f"{base}/#", 0)], topics) == topics[:3]


def test_single_level_wildcard_MQTT_4_7_1_3(node) -> None:
    """``+`` matches exactly one level, empty levels included [MQTT-4.7.1-3]."""
    base = unique("plus")
    topics = [f"{base}/a/end", f"{base}//end", f"{base}/a/b/end", f"{base}/end", f"{base}/a/endx"]
    assert _deliveries(node, [(f"{base}/+/end", 0)], topics) == topics[:2]


def test_topics_are_case_sensitive_and_exact_MQTT_4_7_3_4(node) -> None:
    base = unique("Case")
    topics = [f"{base}/A", f"{base}/a", f"{base}/A/", f"{base}/A "]
    assert _deliveries(node, [(f"{base}/A", 0)], topics) == [f"{base}/A"]


def test_dollar_topics_not_matched_by_leading_wildcards_MQTT_4_7_2_1(node) -> None:
    """``#`` and ``+/...`` do not match topics starting with ``$`` [MQTT-4.7.2-1]; ``$SYS/#`` does.

    A client cannot publish to ``$SYS`` (the broker owns it), so the check uses another ``$`` topic.
    """
    name = unique("x")
    dollar = f"$app/{name}"
    plain = f"app/{name}"
    got = _deliveries(node, [("#", 0)], [dollar, plain])
    assert dollar not in got and plain in got
    got = _deliveries(node, [("+/" + name, 0)], [dollar, plain])
    assert got == [plain]
    got = _deliveries(node, [("$app/#", 0)], [dollar, plain])
    assert got == [dollar]
    got = _deliveries(node, [("$app/+", 0)], [dollar, plain])
    assert got == [dollar]


def test_sys_topics_matched_by_sys_filter_not_by_hash_MQTT_4_7_2_1(node) -> None:
    """Retained ``$SYS/broker/...`` messages come with ``$SYS/#`` and never with ``#`` [MQTT-4.7.2-1]."""
    sub = raw_connected(node, unique("sys-vs-hash"))
    try:
        sub.send(c.Subscribe(1, [c.Subscription("#", 0)]), c.Pingreq())
        before, _ = sub.collect_until(lambda p: isinstance(p, c.Pingresp))
        assert not [p for p in before if isinstance(p, c.Publish) and p.topic.startswith("$")]
        sub.send(c.Subscribe(2, [c.Subscription("$SYS/#", 0)]), c.Pingreq())
        before, _ = sub.collect_until(lambda p: isinstance(p, c.Pingresp))
        sys_topics = [p.topic for p in before if isinstance(p, c.Publish) and p.topic.startswith("$SYS/")]
        assert "$SYS/broker/version" in sys_topics
    finally:
        sub.disconnect()


@pytest.mark.parametrize(
    "bad", ["", "a/#/b", "a/b#", "a+/b", "+a", "#/", "a/+b/c", "$share/g+/t", "$share//t", "$share/g"]
)
def test_invalid_filter_gets_suback_0x80_MQTT_4_7_1_2(node, bad: str) -> None:
    """An invalid filter (the empty one included [MQTT-4.7.3-1]) is refused with SUBACK 0x80 while the valid
    one beside it is granted; the connection stays usable [MQTT-4.7.1-2, -3, MQTT-3.8.4-5, MQTT-3.9.3-1]."""
    good = unique("valid")
    sub = raw_connected(node, unique("badfilter"))
    try:
        suback = sub.subscribe(7, (bad, 1), (good, 1))
        assert suback == c.Suback(7, [0x80, 1])
        sub.send(c.Pingreq())
        assert isinstance(sub.recv(), c.Pingresp)
    finally:
        sub.disconnect()


@pytest.mark.parametrize("topic", ["a/+", "a/#", "#", "+", "a/+/b"])
def test_wildcard_in_publish_topic_closes_connection_MQTT_3_3_2_2(node, topic: str) -> None:
    """A PUBLISH topic with ``+`` or ``#`` is a protocol violation: the connection is closed
    [MQTT-3.3.2-2, MQTT-4.7.1-1, MQTT-4.8.0-1]."""
    sub = paho_connected(node, unique("wild-watch"))
    try:
        sub.subscribe("#", 0)
        client = raw_connected(node, unique("wildpub"))
        client.publish(topic, b"never", 0)
        assert client.wait_closed() == []
        # and nothing was routed: a sentinel arrives with nothing from the bad PUBLISH before it
        sentinel = unique("wild/sentinel")
        pub = paho_connected(node, unique("wild-pub"))
        pub.publish(sentinel, b"S", 1)
        pub.disconnect()
        before, _ = sub.collect_until(sentinel)
        assert [m.payload for m in before if m.payload == b"never"] == []
    finally:
        sub.disconnect()


def test_overlapping_subscriptions_one_delivery_at_highest_qos_MQTT_3_3_5_1(node) -> None:
    """A message matching several subscriptions of one client is sent once, at the highest of their QoS
    [MQTT-3.3.5-1] (MQTT 5.0: MQTT-3.3.4-2)."""
    base = unique("overlap")
    topic = f"{base}/a/b"
    sentinel = unique("overlap/sentinel")
    sub = raw_connected(node, unique("overlap-sub"))
    pub = raw_connected(node, unique("overlap-pub"))
    try:
        suback = sub.subscribe(1, (f"{base}/#", 0), (f"{base}/+/b", 2), (topic, 1), (sentinel, 0))
        assert suback.reason_codes == [0, 2, 1, 0]
        pub.publish_qos2(topic, b"once", 1)
        pub.publish_qos1(sentinel, b"S", 2)
        before, _ = sub.collect_until(lambda p: isinstance(p, c.Publish) and p.topic == sentinel)
        pubs = [p for p in before if isinstance(p, c.Publish)]
        assert [(p.payload, p.qos) for p in pubs] == [(b"once", 2)]
        sub.ack(pubs[0])
    finally:
        pub.disconnect()
        sub.disconnect()


def test_overlapping_subscriptions_paho(node) -> None:
    """The same with paho on both ends: one message, QoS 1 (the higher of 0 and 1)."""
    base = unique("overlap-paho")
    sentinel = unique("overlap-paho/sentinel")
    sub = paho_connected(node, unique("op-sub"))
    pub = paho_connected(node, unique("op-pub"))
    try:
        sub.subscribe([(f"{base}/#", 0), (f"{base}/x", 1), (sentinel, 0)])
        pub.publish(f"{base}/x", b"one", 1)
        pub.publish(sentinel, b"S", 1)
        before, _ = sub.collect_until(sentinel)
        assert [(m.payload, m.qos) for m in before] == [(b"one", 1)]
    finally:
        pub.disconnect()
        sub.disconnect()


def test_shared_subscription_delivers_each_message_to_one_member(node) -> None:
    """``$share/g/t``: each message goes to exactly one of the group's two members, and both get some."""
    topic = unique("shared")
    group = unique("g")
    sentinel = unique("shared/sentinel")
    members = [raw_connected(node, unique(f"member{i}")) for i in range(2)]
    pub = raw_connected(node, unique("shared-pub"))
    try:
        for m in members:
            assert m.subscribe(1, (f"$share/{group}/{topic}", 1), (sentinel, 0)).reason_codes == [1, 0]
        n = 40
        for i in range(n):
            pub.publish_qos1(topic, str(i).encode(), i + 1)
        pub.publish_qos1(sentinel, b"S", n + 1)
        received = []
        for m in members:
            before, _ = m.collect_until(lambda p: isinstance(p, c.Publish) and p.topic == sentinel)
            got = [p for p in before if isinstance(p, c.Publish)]
            for p in got:
                m.send(c.Puback(p.packet_id))
            assert got, "a member of the group received nothing"
            received.append([int(p.payload) for p in got])
        assert sorted(received[0] + received[1]) == list(range(n))
    finally:
        pub.disconnect()
        for m in members:
            m.disconnect()


def test_shared_and_plain_subscriptions_both_deliver(node) -> None:
    """A client with a plain and a shared subscription matching the same topic gets the plain copy, and
    the group gets its own copy."""
    topic = unique("shared-plain")
    group = unique("g")
    plain = paho_connected(node, unique("plain"))
    member = paho_connected(node, unique("member"))
    pub = paho_connected(node, unique("sp-pub"))
    try:
        plain.subscribe(topic, 1)
        member.subscribe(f"$share/{group}/{topic}", 1)
        pub.publish(topic, b"both", 1)
        assert plain.get().payload == b"both"
        assert member.get().payload == b"both"
    finally:
        for cl in (pub, plain, member):
            cl.disconnect()


def test_unsubscribe_stops_delivery_MQTT_3_10_4_2(node) -> None:
    """After UNSUBACK no new message on the filter arrives [MQTT-3.10.4-2]; UNSUBACK carries the packet id
    [MQTT-3.10.4-4] and is sent even for a filter the client never had [MQTT-3.10.4-5]."""
    topic = unique("unsub")
    sentinel = unique("unsub/sentinel")
    sub = raw_connected(node, unique("unsub-sub"))
    pub = raw_connected(node, unique("unsub-pub"))
    try:
        sub.subscribe(1, (topic, 1), (sentinel, 0))
        sub.send(c.Unsubscribe(33, [topic]))
        assert sub.expect(c.Unsuback) == c.Unsuback(33)
        sub.send(c.Unsubscribe(34, [unique("never-subscribed")]))
        assert sub.expect(c.Unsuback) == c.Unsuback(34)
        pub.publish_qos1(topic, b"X", 1)
        pub.publish_qos1(sentinel, b"S", 2)
        before, _ = sub.collect_until(lambda p: isinstance(p, c.Publish) and p.topic == sentinel)
        assert before == []
    finally:
        pub.disconnect()
        sub.disconnect()


def test_suback_packet_id_and_one_code_per_filter_MQTT_3_8_4_2(node) -> None:
    """SUBACK has the SUBSCRIBE's packet id [MQTT-3.8.4-2] and one code per filter in order [MQTT-3.8.4-5,
    MQTT-3.9.3-1]."""
    sub = raw_connected(node, unique("suback"))
    try:
        suback = sub.subscribe(4321, (unique("s/a"), 2), (unique("s/b"), 0), (unique("s/c"), 1))
        assert suback == c.Suback(4321, [2, 0, 1])
    finally:
        sub.disconnect()


def test_long_and_unicode_topics_round_trip_MQTT_4_7_3_3(node) -> None:
    """Topic names are UTF-8: non-ASCII and long (many levels) names are routed unchanged. Deep
    means 128 levels here, the default limits.max_topic_levels (tests/e2e/test_limits.py has one over)."""
    topics = [unique("ünï/cødé/主题"), unique("deep") + "/l" * 127, unique("sp ace/tab\t")]
    assert _deliveries(node, [(t, 0) for t in topics], topics) == topics


def test_resubscribe_replaces_subscription_MQTT_3_8_4_3(node) -> None:
    """A second SUBSCRIBE with the same filter replaces the first: one delivery, at the new QoS [MQTT-3.8.4-3]."""
    topic = unique("replace")
    sentinel = unique("replace/sentinel")
    sub = raw_connected(node, unique("replace-sub"))
    pub = raw_connected(node, unique("replace-pub"))
    try:
        assert sub.subscribe(1, (topic, 0), (sentinel, 0)).reason_codes == [0, 0]
        assert sub.subscribe(2, (topic, 1)).reason_codes == [1]
        pub.publish_qos1(topic, b"one", 1)
        pub.publish_qos1(sentinel, b"S", 2)
        before, _ = sub.collect_until(lambda p: isinstance(p, c.Publish) and p.topic == sentinel)
        assert [(p.payload, p.qos) for p in before] == [(b"one", 1)]
        sub.ack(before[0])
    finally:
        pub.disconnect()
        sub.disconnect()


def test_unsubscribe_one_of_overlapping_keeps_the_other_MQTT_3_10_4_1(node) -> None:
    """UNSUBSCRIBE removes only the filter named, compared character by character [MQTT-3.10.4-1]: the
    overlapping wildcard subscription still delivers, at its own QoS."""
    base = unique("unsub-overlap")
    topic = f"{base}/x"
    sentinel = unique("unsub-overlap/sentinel")
    sub = raw_connected(node, unique("uo-sub"))
    pub = raw_connected(node, unique("uo-pub"))
    try:
        sub.subscribe(1, (f"{base}/#", 0), (topic, 1), (sentinel, 0))
        sub.send(c.Unsubscribe(2, [topic]))
        assert sub.expect(c.Unsuback) == c.Unsuback(2)
        pub.publish_qos1(topic, b"via wildcard", 1)
        pub.publish_qos1(sentinel, b"S", 2)
        before, _ = sub.collect_until(lambda p: isinstance(p, c.Publish) and p.topic == sentinel)
        assert [(p.payload, p.qos) for p in before] == [(b"via wildcard", 0)]
    finally:
        pub.disconnect()
        sub.disconnect()
