"""Durable queues survive kill -9 (issue 10, Durability): 5,000 QoS 1 messages published to a work
queue, half acknowledged; after SIGKILL and a restart every unacknowledged message arrives again
and no acknowledged one does."""

from __future__ import annotations

import queue as stdqueue
import time

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.subscribeoptions import SubscribeOptions

from tests.e2e.mqtt5raw import paho5, props, unique

pytestmark = pytest.mark.e2e

N = 5000
# Half the messages stay unsettled with the one consumer: its window (broker.max_inflight, the
# queue's max_inflight) must hold them all.
CONFIG = "queues: [{name: jobs, max_inflight: 10000, visibility_timeout: 1h}]\nbroker: {max_inflight: 10000}"


def join(node, group: str):
    c5 = paho5(node, unique("crash-c"))
    p = props(PacketTypes.SUBSCRIBE)
    p.UserProperty = [("consumer-group", group)]
    codes = c5.subscribe("$queue/jobs/#", options=SubscribeOptions(qos=1), properties=p)
    assert [int(rc.value) for rc in codes] == [1]
    return c5


def test_kill_9_loses_no_ack_and_redelivers_every_unacked(node_factory) -> None:
    node = node_factory(config_text=CONFIG)
    consumer = join(node, "workers")
    with paho5(node, unique("crash-p")) as pub:
        infos = [pub.client.publish("$queue/jobs/k", f"m{i}".encode(), 1) for i in range(N)]
        deadline = time.monotonic() + 60
        for info in infos:  # every PUBACK: each append is committed
            info.wait_for_publish(max(0.01, deadline - time.monotonic()))
            assert info.is_published()
    acked, unacked = set(), set()
    deadline = time.monotonic() + 60
    ack_infos = []
    while len(acked) + len(unacked) < N:
        assert time.monotonic() < deadline, f"got {len(acked) + len(unacked)} of {N} deliveries"
        msg = consumer.get(max(0.01, deadline - time.monotonic()))
        up = dict(msg.properties.UserProperty)
        if int(up["offset"]) % 2 == 0:
            p = props(PacketTypes.PUBLISH)
            p.UserProperty = [("message-id", up["message-id"]), ("group-id", "workers")]
            ack_infos.append(consumer.client.publish("$queue/jobs/$ack", b"", 1, properties=p))
            acked.add(msg.payload)
        else:
            unacked.add(msg.payload)
    for info in ack_infos:  # the PUBACK of a settlement leaves after its commit: the ack is durable
        info.wait_for_publish(max(0.01, deadline - time.monotonic()))
        assert info.is_published()
    assert len(acked) == N // 2
    consumer.stop()
    node.kill()

    again = node_factory({"storage.path": str(node.data_dir)}, config_text=CONFIG)
    consumer = join(again, "workers")
    try:
        got = set()
        deadline = time.monotonic() + 60
        while len(got) < len(unacked) and time.monotonic() < deadline:
            try:
                got.add(consumer.messages.get(timeout=0.5).payload)
            except stdqueue.Empty:
                pass
        assert got == unacked, f"missing {len(unacked - got)}, acked redelivered {len(got & acked)}"
        try:
            extra = consumer.messages.get(timeout=1.0)
        except stdqueue.Empty:
            extra = None
        assert extra is None, f"delivered again after the restart: {extra.payload!r}"
    finally:
        consumer.disconnect()
