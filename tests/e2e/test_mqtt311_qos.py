"""QoS 0/1/2 in both directions (MQTT 3.1.1): acknowledgements, exactly once, resend with DUP, packet ids."""

from __future__ import annotations

import pytest

from fluxmq._core import codec as c
from tests.conftest import NodeFactory
from tests.e2e.mqttraw import RawClient, end_session, paho_connected, raw_connected, unique

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["memory", "lmdb"])
def node(request, tmp_path_factory):
    """The module's node, once per storage type: session state lives in memory or in lmdb."""
    factory = NodeFactory(tmp_path_factory.mktemp(f"node-{request.param}"))
    try:
        yield factory({"storage.type": request.param})
    finally:
        factory.close()


@pytest.mark.parametrize("pub_qos", [0, 1, 2])
@pytest.mark.parametrize("sub_qos", [0, 1, 2])
def test_delivered_qos_is_min_of_publish_and_subscription_MQTT_3_8_4_6(
    node, pub_qos: int, sub_qos: int
) -> None:
    """paho publisher and subscriber: the message arrives once at min(publish QoS, granted QoS) [MQTT-3.8.4-6]."""
    topic = unique(f"qos/{pub_qos}{sub_qos}")
    sentinel = unique("qos/sentinel")
    sub = paho_connected(node, unique("qsub"))
    pub = paho_connected(node, unique("qpub"))
    try:
        assert sub.subscribe(topic, sub_qos) == [sub_qos]
        # The sentinel goes at QoS 2: order is kept only within a QoS level, and paho hands an
        # inbound QoS 2 message to the application after PUBREL, so a QoS 1 sentinel could overtake it.
        sub.subscribe(sentinel, 2)
        pub.publish(topic, b"payload", pub_qos)
        pub.publish(sentinel, b"S", 2)
        before, _ = sub.collect_until(sentinel)
        assert [(m.topic, m.payload, m.qos) for m in before] == [(topic, b"payload", min(pub_qos, sub_qos))]
    finally:
        pub.disconnect()
        sub.disconnect()


def test_qos1_puback_carries_the_publish_packet_id_MQTT_2_3_1_6(node) -> None:
    """PUBACK has the packet id of the PUBLISH [MQTT-2.3.1-6, MQTT-4.3.2-2]."""
    client = raw_connected(node, unique("q1ack"))
    try:
        for pid in (1, 77, 65535):
            client.publish(unique("q1ack/t"), b"x", 1, packet_id=pid)
            assert client.expect(c.Puback) == c.Puback(pid)
    finally:
        client.disconnect()


def test_qos2_pubrec_pubcomp_carry_the_publish_packet_id_MQTT_4_3_3_2(node) -> None:
    """PUBREC and PUBCOMP carry the packet id of the PUBLISH / PUBREL [MQTT-2.3.1-6, MQTT-4.3.3-2]."""
    client = raw_connected(node, unique("q2ack"))
    try:
        client.publish(unique("q2ack/t"), b"x", 2, packet_id=4242)
        assert client.expect(c.Pubrec) == c.Pubrec(4242)
        client.send(c.Pubrel(4242))
        assert client.expect(c.Pubcomp) == c.Pubcomp(4242)
    finally:
        client.disconnect()


def test_outbound_qos1_and_qos2_flows_MQTT_4_3_2_1(node) -> None:
    """The broker sends QoS 1/2 with a non-zero packet id, DUP 0 on first delivery, and completes QoS 2
    with PUBREL after PUBREC [MQTT-2.3.1-4, MQTT-3.3.1-1, MQTT-4.3.2-1, MQTT-4.3.3-1]."""
    topic = unique("outflow")
    sub = raw_connected(node, unique("outflow-sub"))
    pub = paho_connected(node, unique("outflow-pub"))
    try:
        assert sub.subscribe(1, (topic, 2)).reason_codes == [2]
        pub.publish(topic, b"one", 1)
        p1 = sub.expect(c.Publish)
        assert (p1.payload, p1.qos, p1.dup) == (b"one", 1, False) and p1.packet_id != 0
        sub.send(c.Puback(p1.packet_id))
        pub.publish(topic, b"two", 2)
        p2 = sub.expect(c.Publish)
        assert (p2.payload, p2.qos, p2.dup) == (b"two", 2, False) and p2.packet_id != 0
        sub.send(c.Pubrec(p2.packet_id))
        assert sub.expect(c.Pubrel) == c.Pubrel(p2.packet_id)
        sub.send(c.Pubcomp(p2.packet_id))
    finally:
        pub.disconnect()
        sub.disconnect()


def test_outgoing_dup_flag_set_independently_MQTT_3_3_1_3(node) -> None:
    """A PUBLISH received with DUP 1 reaches subscribers with DUP 0 [MQTT-3.3.1-3]."""
    topic = unique("dupin")
    sub = raw_connected(node, unique("dupin-sub"))
    pub = raw_connected(node, unique("dupin-pub"))
    try:
        sub.subscribe(1, (topic, 1))
        pub.publish(topic, b"d", 1, packet_id=9, dup=True)
        pub.expect(c.Puback)
        msg = sub.expect(c.Publish)
        assert msg.payload == b"d" and msg.dup is False
    finally:
        pub.disconnect()
        sub.disconnect()


def test_qos2_exactly_once_across_reconnect_MQTT_4_3_3_2(node) -> None:
    """QoS 2 PUBLISH, no PUBREL, reconnect (clean session 0), resend with DUP and the same id:
    PUBREC again, and the subscriber gets the message once [MQTT-4.3.3-2, MQTT-4.4.0-1]."""
    topic = unique("exactly-once")
    sentinel = unique("exactly-once/sentinel")
    sub = raw_connected(node, unique("eo-sub"))
    cid = unique("eo-pub")
    try:
        sub.subscribe(1, (topic, 2), (sentinel, 2))
        pub = raw_connected(node, cid, clean=False)
        pub.publish(topic, b"once", 2, packet_id=321)
        assert pub.expect(c.Pubrec) == c.Pubrec(321)
        pub.drop()  # no PUBREL
        pub = RawClient.to(node)
        assert pub.connect(cid, clean=False) == c.Connack(True, 0)
        pub.publish(topic, b"once", 2, packet_id=321, dup=True)
        assert pub.expect(c.Pubrec) == c.Pubrec(321)
        pub.send(c.Pubrel(321))
        assert pub.expect(c.Pubcomp) == c.Pubcomp(321)
        pub.publish_qos1(sentinel, b"S", 322)
        pub.disconnect()
        before, _ = sub.collect_until(lambda p: isinstance(p, c.Publish) and p.topic == sentinel)
        assert [p.payload for p in before] == [b"once"]
        sub.ack(before[0])
    finally:
        sub.disconnect()
        end_session(node, cid)


def test_qos2_duplicate_on_same_connection_not_redelivered_MQTT_4_3_3_2(node) -> None:
    """Before PUBREL, a resent QoS 2 PUBLISH with the same id is acknowledged but not routed again
    [MQTT-4.3.3-2]; after PUBCOMP the id is free and a new message with it is routed [MQTT-2.3.1-2]."""
    topic = unique("eo-same")
    sentinel = unique("eo-same/sentinel")
    sub = raw_connected(node, unique("eos-sub"))
    pub = raw_connected(node, unique("eos-pub"))
    try:
        sub.subscribe(1, (topic, 2), (sentinel, 0))
        pub.publish(topic, b"first", 2, packet_id=5)
        assert pub.expect(c.Pubrec) == c.Pubrec(5)
        pub.publish(topic, b"first", 2, packet_id=5, dup=True)
        assert pub.expect(c.Pubrec) == c.Pubrec(5)
        pub.send(c.Pubrel(5))
        assert pub.expect(c.Pubcomp) == c.Pubcomp(5)
        pub.publish_qos2(topic, b"second", 5)  # the id is reusable now
        pub.publish_qos1(sentinel, b"S", 6)
        before, _ = sub.collect_until(lambda p: isinstance(p, c.Publish) and p.topic == sentinel)
        assert [p.payload for p in before if isinstance(p, c.Publish)] == [b"first", b"second"]
    finally:
        pub.disconnect()
        sub.disconnect()


def test_outbound_qos1_resent_with_dup_on_reconnect_MQTT_4_4_0_1(node) -> None:
    """A subscriber that did not PUBACK gets the PUBLISH again after reconnecting with clean session 0,
    with the same packet id and DUP 1 [MQTT-4.4.0-1, MQTT-3.3.1-1, MQTT-2.3.1-3]."""
    topic = unique("resend1")
    cid = unique("resend1-sub")
    sub = raw_connected(node, cid, clean=False)
    pub = paho_connected(node, unique("resend1-pub"))
    try:
        sub.subscribe(1, (topic, 1))
        pub.publish(topic, b"unacked", 1)
        first = sub.expect(c.Publish)
        assert first.dup is False and first.qos == 1
        sub.drop()  # no PUBACK
        sub = RawClient.to(node)
        assert sub.connect(cid, clean=False) == c.Connack(True, 0)
        again = sub.expect(c.Publish)
        assert (again.packet_id, again.dup, again.qos, again.payload, again.topic) == (
            first.packet_id,
            True,
            1,
            b"unacked",
            topic,
        )
        sub.send(c.Puback(again.packet_id))
        # acknowledged now: a third connection gets nothing resent (a ping answers first)
        sub.drop()
        sub = RawClient.to(node)
        assert sub.connect(cid, clean=False) == c.Connack(True, 0)
        sub.send(c.Pingreq())
        assert isinstance(sub.recv(), c.Pingresp)
    finally:
        pub.disconnect()
        sub.close()
        end_session(node, cid)


def test_outbound_qos2_resend_publish_then_pubrel_on_reconnect_MQTT_4_4_0_1(node) -> None:
    """QoS 2 to a subscriber: without PUBREC the PUBLISH is resent with DUP 1; after PUBREC the PUBREL is
    resent; both keep the original packet id [MQTT-4.4.0-1]."""
    topic = unique("resend2")
    cid = unique("resend2-sub")
    sub = raw_connected(node, cid, clean=False)
    pub = paho_connected(node, unique("resend2-pub"))
    try:
        sub.subscribe(1, (topic, 2))
        pub.publish(topic, b"q2", 2)
        first = sub.expect(c.Publish)
        assert first.qos == 2 and first.dup is False
        sub.drop()  # no PUBREC
        sub = RawClient.to(node)
        assert sub.connect(cid, clean=False).session_present
        again = sub.expect(c.Publish)
        assert (again.packet_id, again.dup, again.payload) == (first.packet_id, True, b"q2")
        sub.send(c.Pubrec(again.packet_id))
        assert sub.expect(c.Pubrel) == c.Pubrel(first.packet_id)
        sub.drop()  # no PUBCOMP
        sub = RawClient.to(node)
        assert sub.connect(cid, clean=False).session_present
        assert sub.expect(c.Pubrel) == c.Pubrel(first.packet_id)
        sub.send(c.Pubcomp(first.packet_id))
        sub.send(c.Pingreq())
        assert isinstance(sub.recv(), c.Pingresp)  # nothing else pending
    finally:
        pub.disconnect()
        sub.close()
        end_session(node, cid)


def test_inflight_packet_ids_are_distinct_and_nonzero_MQTT_2_3_1_2(node) -> None:
    """Unacknowledged QoS 1/2 PUBLISHes to one client use distinct, non-zero packet ids [MQTT-2.3.1-2, -4]."""
    topic = unique("pids")
    sub = raw_connected(node, unique("pids-sub"))
    pub = raw_connected(node, unique("pids-pub"))
    try:
        sub.subscribe(1, (topic, 2))
        for i in range(30):
            pub.publish(topic, str(i).encode(), 1 + i % 2, packet_id=i + 1)
        got = [sub.expect(c.Publish) for _ in range(30)]
        ids = [p.packet_id for p in got]
        assert 0 not in ids and len(set(ids)) == 30
        assert [p.payload for p in got] == [str(i).encode() for i in range(30)]
        # acknowledge everything; the ids are then free for new messages
        for p in got:
            sub.send(c.Puback(p.packet_id) if p.qos == 1 else c.Pubrec(p.packet_id))
        for p in got:
            if p.qos == 2:
                assert sub.wait_for(lambda x, pid=p.packet_id: isinstance(x, c.Pubrel) and x.packet_id == pid)
                sub.send(c.Pubcomp(p.packet_id))
    finally:
        pub.disconnect()
        sub.disconnect()


def test_qos1_messages_keep_publish_order_MQTT_4_6_0_6(node) -> None:
    """Messages on one topic reach a subscriber in the order they were published [MQTT-4.6.0-6]."""
    topic = unique("order")
    sub = paho_connected(node, unique("order-sub"))
    pub = paho_connected(node, unique("order-pub"))
    try:
        sub.subscribe(topic, 1)
        for i in range(199):
            pub.client.publish(topic, str(i).encode(), 1 if i % 3 else 2)
        pub.publish(topic, b"199", 1)
        got = [sub.get().payload for _ in range(200)]
        assert got == [str(i).encode() for i in range(200)]
    finally:
        pub.disconnect()
        sub.disconnect()


def test_large_payload_round_trip_and_over_limit_refused(node) -> None:
    """A payload of exactly ``broker.max_message_size`` (1 MiB) goes through intact at QoS 1; one byte more is
    acknowledged (3.1.1 has no way to refuse) but not routed, and the connection stays usable."""
    topic = unique("big")
    sentinel = unique("big/sentinel")
    limit = 1 << 20
    sub = paho_connected(node, unique("big-sub"))
    pub = raw_connected(node, unique("big-pub"))
    try:
        sub.subscribe(topic, 1)
        sub.subscribe(sentinel, 1)
        body = bytes(range(256)) * (limit // 256)
        pub.publish_qos1(topic, body, 1)
        pub.publish_qos1(topic, body + b"!", 2)
        pub.publish_qos1(sentinel, b"S", 3)
        before, _ = sub.collect_until(sentinel, timeout=30)
        assert [len(m.payload) for m in before] == [limit]
        assert before[0].payload == body
    finally:
        pub.disconnect()
        sub.disconnect()
