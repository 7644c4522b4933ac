"""Durable queues: a record a member can never take (over its 5.0 Maximum Packet Size). It goes to
a member that can take it; when none of the group's members can, it is set aside (stored,
counted as ``undeliverable``, shown per group), the records behind it go on, and it is not tried
again until a member joins the group. Before, the record was offered to the same member at every
dispatch (each refusal counted as a ``packet_too_large`` drop) and, with one member, every record
behind it waited forever.

One real node, paho 5.0 consumers; every wait is bounded.
"""

from __future__ import annotations

import queue as stdqueue
import time

import pytest
from paho.mqtt.packettypes import PacketTypes

from tests.e2e.mqtt5raw import paho5, props, unique
from tests.e2e.test_metrics import sample, scrape
from tests.e2e.test_queues import WAIT, consumer, queue_state, receive, settle
from tests.e2e.test_queues_ops import join

pytestmark = pytest.mark.e2e

BIG = b"B" * 2000
SMALL_MPS = 600  # the deliveries of the small records fit; BIG's never does


def small_consumer(node, name: str, group: str):
    c5, codes = join(node, name, group, properties=props(PacketTypes.CONNECT, MaximumPacketSize=SMALL_MPS))
    assert codes == [1], codes
    return c5


def too_large_drops(node) -> float:
    return sample(scrape(node), "fluxmq_messages_dropped_total", reason="packet_too_large")


def publish_all(node, topic: str, payloads) -> None:
    with paho5(node, unique("qp")) as pub:
        for payload in payloads:
            pub.publish(topic, payload, 1)


def test_a_record_too_large_for_one_member_goes_to_the_other(node_factory) -> None:
    node = node_factory(config_text="queues: [{name: mixed}]")
    small = small_consumer(node, "mixed", "g")
    large, codes = join(node, "mixed", "g")
    assert codes == [1]
    try:
        publish_all(node, "$queue/mixed/x", [BIG] + [b"s%d" % i for i in range(6)])
        got = drain("mixed", {"large": large, "small": small}, 7)
        got_large, got_small = got["large"], got["small"]
        assert len(got_large) + len(got_small) == 7, got
        assert any(m.payload == BIG for m in got_large)
        assert not any(m.payload == BIG for m in got_small)
        # the small member was offered BIG once at most (before: twice, the second time by the
        # dispatch that had just seen it refuse)
        assert too_large_drops(node) <= 1
        state = queue_state(node, "mixed")
        assert state["groups"]["g"]["undeliverable"] == 0, state
        assert state["counters"].get("undeliverable", 0) == 0, state
    finally:
        small.disconnect()
        large.disconnect()


def drain(queue: str, clients: dict, n: int, timeout: float = WAIT) -> dict[str, list]:
    """The messages ``clients`` (name -> client) get from ``queue`` until ``n`` came in all, each
    acknowledged."""
    got: dict[str, list] = {name: [] for name in clients}
    deadline = time.monotonic() + timeout
    total = 0
    while total < n and time.monotonic() < deadline:
        for name, client in clients.items():
            try:
                m = client.messages.get(timeout=0.02)
            except stdqueue.Empty:
                continue
            got[name].append(m)
            settle(client, queue, "$ack", m)
            total += 1
    return got


def test_a_record_no_member_can_take_is_set_aside_and_the_rest_go_on(node_factory) -> None:
    node = node_factory(config_text="queues: [{name: solo}]")
    small = small_consumer(node, "solo", "g")
    try:
        publish_all(node, "$queue/solo/x", [BIG] + [b"s%d" % i for i in range(5)])
        got = receive(small, 5)  # before: none of them came (BIG was offered again and again)
        assert [m.payload for m in got] == [b"s%d" % i for i in range(5)]
        for m in got:
            settle(small, "solo", "$ack", m)
        drops = too_large_drops(node)
        assert drops == 1, drops
        # more records and settlements: more dispatch runs, BIG is not offered again
        publish_all(node, "$queue/solo/x", [b"t%d" % i for i in range(5)])
        again = receive(small, 5)
        for m in again:
            settle(small, "solo", "$ack", m)
        assert too_large_drops(node) == 1
        # not lost: stored, counted, shown per group
        state = queue_state(node, "solo")
        assert state["groups"]["g"]["undeliverable"] == 1, state
        assert state["groups"]["g"]["lag"] == 1, state
        assert state["counters"]["undeliverable"] == 1, state
        samples = scrape(node)
        assert sample(samples, "fluxmq_queue_undeliverable_total", queue="solo") == 1
        assert sample(samples, "fluxmq_queue_group_undeliverable", queue="solo", group="g") == 1
        # a member that can take it joins: it gets it
        large = consumer(node, "g", "$queue/solo/#")
        try:
            m = large.get(WAIT)
            assert m.payload == BIG
            settle(large, "solo", "$ack", m)
        finally:
            large.disconnect()
        assert queue_state(node, "solo")["groups"]["g"]["undeliverable"] == 0
    finally:
        small.disconnect()
