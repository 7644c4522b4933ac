"""Shared subscriptions ``$share/{group}/{filter}``: the three strategies, offline and full members
skipped, and a leaving member's unfinished QoS 1/2 messages handed to another member (MQTT 5.0 4.8.2)."""

from __future__ import annotations

import pytest

from fluxmq._core import codec as c
from tests.e2e.mqtt5raw import Raw5, module_node, paho5, raw5, unique

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with module_node(tmp_path_factory) as n:  # broker.shared_subscription_strategy: round_robin
        yield n


def sync(client: Raw5) -> None:
    """Round trip: everything the client sent before was handled by the broker."""
    client.send(c.Pingreq())
    client.wait_for(lambda p: isinstance(p, c.Pingresp))


def publish_all(node, topic: str, payloads: list[bytes], qos: int = 1) -> None:
    pub = raw5(node, unique("sh-pub"))
    try:
        for i, payload in enumerate(payloads, 1):
            pub.publish(topic, payload, qos, packet_id=i)
            if qos == 2:
                pub.send(c.Pubrel(i))
                pub.wait_for(lambda p, i=i: isinstance(p, c.Pubcomp) and p.packet_id == i)
    finally:
        pub.disconnect()


def test_round_robin_alternates_and_delivers_each_message_once(node) -> None:
    group = unique("g")
    topic = unique("sh/rr")
    a, b = raw5(node, unique("rr-a")), raw5(node, unique("rr-b"))
    try:
        for client in (a, b):
            assert client.subscribe(1, (f"$share/{group}/{topic}", 1)).reason_codes == [1]
        payloads = [str(i).encode() for i in range(10)]
        publish_all(node, topic, payloads)
        got_a, got_b = a.publishes_so_far(), b.publishes_so_far()
        assert sorted(p.payload for p in got_a + got_b) == sorted(payloads)
        assert len(got_a) == len(got_b) == 5
    finally:
        a.disconnect()
        b.disconnect()


def test_shared_works_for_3_1_1_and_paho_members(node) -> None:
    """A 3.1.1 raw client and a paho MQTTv5 client share one group; each message reaches one of them."""
    group = unique("g")
    topic = unique("sh/mixed")
    old = Raw5(node, version=4)
    old.connect(unique("sh-311"))
    new = paho5(node, unique("sh-paho"))
    try:
        old.subscribe(1, (f"$share/{group}/{topic}", 1))
        new.subscribe(f"$share/{group}/{topic}", 1)
        payloads = [str(i).encode() for i in range(6)]
        publish_all(node, topic, payloads)
        got_old = old.publishes_so_far()
        got_new = [new.get() for _ in range(6 - len(got_old))]
        assert sorted([p.payload for p in got_old] + [m.payload for m in got_new]) == sorted(payloads)
        assert got_old and got_new
    finally:
        old.disconnect()
        new.disconnect()


def test_offline_member_is_skipped(node) -> None:
    """A persistent member that is offline gets nothing queued while another member is online."""
    group = unique("g")
    topic = unique("sh/offline")
    cid = unique("off-a")
    a = raw5(node, cid, clean_start=False, properties={c.SESSION_EXPIRY_INTERVAL: 300})
    a.subscribe(1, (f"$share/{group}/{topic}", 1))
    a.disconnect()
    b = raw5(node, unique("off-b"))
    try:
        b.subscribe(1, (f"$share/{group}/{topic}", 1))
        payloads = [str(i).encode() for i in range(6)]
        publish_all(node, topic, payloads)
        assert sorted(p.payload for p in b.publishes_so_far()) == sorted(payloads)
        again = raw5(node, cid, clean_start=False, properties={c.SESSION_EXPIRY_INTERVAL: 0})
        assert again.connack.session_present
        assert again.publishes_so_far() == []
        again.disconnect()
    finally:
        b.disconnect()


def test_full_member_is_skipped(node) -> None:
    """A member whose Receive Maximum window is full (1 unacknowledged) gets no more while another can."""
    group = unique("g")
    topic = unique("sh/full")
    a = raw5(node, unique("full-a"), properties={c.RECEIVE_MAXIMUM: 1})
    b = raw5(node, unique("full-b"))
    try:
        for client in (a, b):
            client.subscribe(1, (f"$share/{group}/{topic}", 1))
        publish_all(node, topic, [b"first"])
        first_to_a = a.publishes_so_far(ack=False)
        if not first_to_a:  # it went to b: send one more so a holds one
            b.publishes_so_far()
            publish_all(node, topic, [b"second"])
            first_to_a = a.publishes_so_far(ack=False)
        assert len(first_to_a) == 1
        payloads = [f"m{i}".encode() for i in range(6)]
        publish_all(node, topic, payloads)
        assert sorted(p.payload for p in b.publishes_so_far()) == sorted(payloads)
        assert a.publishes_so_far(ack=False) == []
    finally:
        a.disconnect()
        b.disconnect()


def test_leaving_member_hands_its_unacknowledged_qos1_to_another(node) -> None:
    """QoS 1 messages a member got but did not acknowledge go to another member when it disconnects
    (MQTT 5.0 4.8.2: the Server MAY send it to another Client as soon as it loses the connection)."""
    group = unique("g")
    topic = unique("sh/leave")
    a, b = raw5(node, unique("leave-a")), raw5(node, unique("leave-b"))
    try:
        for client in (a, b):
            client.subscribe(1, (f"$share/{group}/{topic}", 1))
        payloads = [str(i).encode() for i in range(6)]
        publish_all(node, topic, payloads)
        held = a.publishes_so_far(ack=False)
        assert held
        a.close()  # no DISCONNECT, no PUBACK
        got_b = [b.expect(c.Publish) for _ in range(6)]
        for p in got_b:
            b.ack(p)
        assert sorted(p.payload for p in got_b) == sorted(payloads)
    finally:
        b.disconnect()


def test_leaving_member_hands_its_queued_messages_to_another(node) -> None:
    """Messages queued for a member (its window was full and it was the only member) go to a member
    that joined meanwhile when the first one leaves; a queued QoS 2 message was never sent, so it moves too."""
    group = unique("g")
    topic = unique("sh/queued")
    a = raw5(node, unique("queued-a"), properties={c.RECEIVE_MAXIMUM: 1})
    a.subscribe(1, (f"$share/{group}/{topic}", 2))
    publish_all(node, topic, [b"q1", b"q2"], qos=1)
    publish_all(node, topic, [b"q3"], qos=2)
    held = a.publishes_so_far(ack=False)
    assert [p.payload for p in held] == [b"q1"]
    b = raw5(node, unique("queued-b"))
    try:
        b.subscribe(1, (f"$share/{group}/{topic}", 2))
        a.disconnect()
        got = [b.expect(c.Publish) for _ in range(3)]
        for p in got:
            b.ack(p)
        assert sorted((p.payload, p.qos) for p in got) == [(b"q1", 1), (b"q2", 1), (b"q3", 2)]
    finally:
        b.disconnect()


def test_persistent_member_hands_its_stored_queue_to_an_online_member(node) -> None:
    """A persistent member (its queue kept by the storage) that goes offline: its unacknowledged QoS 1
    and queued messages go to the online member; its session stays, empty of them."""
    group = unique("g")
    topic = unique("sh/pqueue")
    cid = unique("pq-a")
    a = raw5(node, cid, clean_start=False, properties={c.SESSION_EXPIRY_INTERVAL: 300, c.RECEIVE_MAXIMUM: 1})
    a.subscribe(1, (f"$share/{group}/{topic}", 1))
    publish_all(node, topic, [b"p1", b"p2", b"p3"])
    assert [p.payload for p in a.publishes_so_far(ack=False)] == [b"p1"]
    b = raw5(node, unique("pq-b"))
    try:
        b.subscribe(1, (f"$share/{group}/{topic}", 1))
        a.close()
        got = [b.expect(c.Publish) for _ in range(3)]
        for p in got:
            b.ack(p)
        assert [p.payload for p in got] == [b"p1", b"p2", b"p3"]
        again = raw5(node, cid, clean_start=False, properties={c.SESSION_EXPIRY_INTERVAL: 0})
        assert again.connack.session_present and again.publishes_so_far() == []
        again.disconnect()
    finally:
        b.disconnect()


def test_sent_qos2_stays_with_a_persistent_member_MQTT_4_8_2_5(node) -> None:
    """A QoS 2 PUBLISH already sent to a persistent member that drops is completed with that member
    when it reconnects (resent with DUP), not given to another [MQTT-4.8.2-5]."""
    group = unique("g")
    topic = unique("sh/q2")
    cid = unique("q2-a")
    a = raw5(node, cid, clean_start=False, properties={c.SESSION_EXPIRY_INTERVAL: 300})
    a.subscribe(1, (f"$share/{group}/{topic}", 2))
    publish_all(node, topic, [b"only-a"], qos=2)
    assert [p.payload for p in a.publishes_so_far(ack=False)] == [b"only-a"]
    b = raw5(node, unique("q2-b"))
    b.subscribe(1, (f"$share/{group}/{topic}", 2))
    a.close()
    try:
        again = raw5(node, cid, clean_start=False, properties={c.SESSION_EXPIRY_INTERVAL: 0})
        resent = again.expect(c.Publish)
        assert (resent.payload, resent.qos, resent.dup) == (b"only-a", 2, True)
        again.ack(resent)
        again.disconnect()
        assert b.publishes_so_far() == []
    finally:
        b.disconnect()


def test_sent_qos2_of_an_ending_session_goes_to_nobody_else_MQTT_4_8_2_5(node) -> None:
    """A clean member that got a QoS 2 PUBLISH and leaves before PUBREC: no other member gets it
    [MQTT-4.8.2-5]; a QoS 1 one sent with it does move."""
    group = unique("g")
    topic = unique("sh/q2end")
    a = raw5(node, unique("q2end-a"))
    a.subscribe(1, (f"$share/{group}/{topic}", 2))
    publish_all(node, topic, [b"two"], qos=2)
    publish_all(node, topic, [b"one"], qos=1)
    assert sorted(p.payload for p in a.publishes_so_far(ack=False)) == [b"one", b"two"]
    b = raw5(node, unique("q2end-b"))
    try:
        b.subscribe(1, (f"$share/{group}/{topic}", 2))
        a.close()
        moved = b.expect(c.Publish)
        b.ack(moved)
        assert (moved.payload, moved.qos) == (b"one", 1)
        assert b.publishes_so_far() == []
    finally:
        b.disconnect()


def test_shared_subscription_gets_no_retained_messages_and_carries_its_identifier(node) -> None:
    """Retained messages are not sent for a shared subscription; its Subscription Identifier is on
    the messages it gets."""
    topic = unique("sh/ret")
    pub = raw5(node, unique("ret-pub"))
    pub.publish(topic, b"retained", 1, retain=True, packet_id=1)
    a = raw5(node, unique("ret-a"))
    try:
        a.subscribe(1, (f"$share/{unique('g')}/{topic}", 1), properties={c.SUBSCRIPTION_IDENTIFIER: [42]})
        assert a.publishes_so_far() == []
        pub.publish(topic, b"live", 1, packet_id=2)
        (got,) = a.publishes_so_far()
        assert (got.payload, got.retain, got.properties[c.SUBSCRIPTION_IDENTIFIER]) == (b"live", False, [42])
    finally:
        pub.publish(topic, b"", 1, retain=True, packet_id=3)
        pub.disconnect()
        a.disconnect()


def test_random_strategy_delivers_each_message_once(node_factory) -> None:
    n = node_factory({"broker.shared_subscription_strategy": "random"})
    topic = unique("sh/rand")
    members = [raw5(n, unique(f"rand-{i}")) for i in range(2)]
    try:
        for m in members:
            m.subscribe(1, (f"$share/g/{topic}", 1))
        payloads = [str(i).encode() for i in range(40)]
        publish_all(n, topic, payloads)
        got = [m.publishes_so_far() for m in members]
        assert sorted(p.payload for g in got for p in g) == sorted(payloads)
        assert all(got), "40 random picks all went to one member"
    finally:
        for m in members:
            m.disconnect()


def test_least_inflight_prefers_the_member_with_fewer_unacknowledged(node_factory) -> None:
    """least_inflight: a member holding an unacknowledged message gets no more while another has none."""
    n = node_factory({"broker.shared_subscription_strategy": "least_inflight"})
    topic = unique("sh/least")
    slow, fast = raw5(n, unique("least-slow")), raw5(n, unique("least-fast"))
    pub = raw5(n, unique("least-pub"))
    try:
        for m in (slow, fast):
            m.subscribe(1, (f"$share/g/{topic}", 1))
        received = {"slow": [], "fast": []}
        for i in range(8):
            pub.publish(topic, str(i).encode(), 1, packet_id=i + 1)
            received["slow"] += slow.publishes_so_far(ack=False)
            received["fast"] += fast.publishes_so_far()  # acknowledged after drain's ping went out, so:
            fast.send(c.Pingreq())  # a second round trip on the same connection: the broker has
            fast.expect(c.Pingresp)  # handled the PUBACK before the next PUBLISH is even sent
        assert len(received["slow"]) == 1 and len(received["fast"]) == 7
    finally:
        for m in (slow, fast, pub):
            m.disconnect()


def test_persistent_members_long_queue_is_handed_over_in_steps_each_message_once(node) -> None:
    """A persistent member holding more messages than a hand-over step (broker HAND_OVER_CHUNK) drops
    its connection: the online member gets every one of them once, in order, over several loop turns;
    the leaving member's session stays, empty of them."""
    count = 700
    group = unique("g")
    topic = unique("sh/long")
    cid = unique("long-a")
    a = raw5(node, cid, clean_start=False, properties={c.SESSION_EXPIRY_INTERVAL: 300, c.RECEIVE_MAXIMUM: 1})
    a.subscribe(1, (f"$share/{group}/{topic}", 1))
    payloads = [str(i).encode() for i in range(count)]
    publish_all(node, topic, payloads)
    assert [p.payload for p in a.publishes_so_far(ack=False)] == [b"0"]
    b = raw5(node, unique("long-b"))
    try:
        b.subscribe(1, (f"$share/{group}/{topic}", 1))
        a.close()
        got = []
        for _ in range(count):
            packet = b.expect(c.Publish)
            b.ack(packet)
            got.append(packet.payload)
        assert got == payloads
        assert b.publishes_so_far() == []
        again = raw5(node, cid, clean_start=False, properties={c.SESSION_EXPIRY_INTERVAL: 0})
        assert again.connack.session_present and again.publishes_so_far() == []
        again.disconnect()
    finally:
        b.disconnect()
