"""Durable queues from the operations side (issue 10): the HTTP bridge appends to a queue,
/metrics and $SYS/broker/queues/... count per queue, ACL rules apply to $queue/ topics."""

from __future__ import annotations

import time

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.subscribeoptions import SubscribeOptions

from tests.e2e.mqtt5raw import paho5, props, unique
from tests.e2e.test_http_bridge import publish_json
from tests.e2e.test_metrics import sample, scrape

pytestmark = pytest.mark.e2e

WAIT = 10.0


def join(node, name: str, group: str, client_id: str = "", **kw):
    c5 = paho5(node, client_id or unique("ops"), **kw)
    p = props(PacketTypes.SUBSCRIBE)
    p.UserProperty = [("consumer-group", group)]
    return c5, [
        int(rc.value)
        for rc in c5.subscribe(f"$queue/{name}/#", options=SubscribeOptions(qos=1), properties=p)
    ]


def test_http_bridge_appends_and_metrics_and_sys_count(node_factory) -> None:
    node = node_factory({"broker.sys_interval": "200ms"}, config_text="queues: [{name: web}]")
    c5, codes = join(node, "web", "g")
    try:
        assert codes == [1]
        status, body = publish_json(node, {"topic": "$queue/web/orders/1", "payload": "hello", "qos": 1})
        assert status == 200 and body["deliveries"] == 1
        msg = c5.get()
        assert msg.payload == b"hello" and msg.topic == "$queue/web/orders/1"
        up = dict(msg.properties.UserProperty)
        ack = props(PacketTypes.PUBLISH)
        ack.UserProperty = [("message-id", up["message-id"]), ("group-id", "g")]
        c5.publish("$queue/web/$ack", b"", 1, properties=ack)

        samples = scrape(node)
        assert sample(samples, "fluxmq_queue_appended_total", queue="web") == 1
        assert sample(samples, "fluxmq_queue_delivered_total", queue="web") == 1
        assert sample(samples, "fluxmq_queue_acked_total", queue="web") == 1
        assert sample(samples, "fluxmq_queue_consumers", queue="web") == 1
        assert sample(samples, "fluxmq_queue_group_lag", queue="web", group="g") == 0

        sys_reader = paho5(node, unique("sys"))
        try:
            sys_reader.subscribe("$SYS/broker/queues/web/#", options=SubscribeOptions(qos=0))
            seen = {}
            deadline = time.monotonic() + WAIT
            while seen.get("$SYS/broker/queues/web/acked") != b"1" and time.monotonic() < deadline:
                m = sys_reader.get(max(0.01, deadline - time.monotonic()))
                seen[m.topic] = m.payload
            assert seen["$SYS/broker/queues/web/acked"] == b"1"
        finally:
            sys_reader.disconnect()

        status, body = publish_json(node, {"topic": "$queue/missing.dlq/x", "payload": "x", "qos": 1})
        assert status == 200  # auto_create on (a DLQ name is always allowed)
    finally:
        c5.disconnect()


def test_acl_write_to_append_and_ack_read_to_consume(node_factory, tmp_path) -> None:
    acl = tmp_path / "acl"
    acl.write_text(
        "user producer\ntopic write $queue/jobs/#\n\n"
        "user worker\ntopic read $queue/jobs/#\ntopic write $queue/jobs/$ack\n"
    )
    pw = tmp_path / "passwd"
    from fluxmq.auth.password_file import hash_password

    pw.write_text("".join(f"{u}:{hash_password('pw')}\n" for u in ("producer", "worker", "nobody")))
    node = node_factory({"auth.password_file": str(pw), "auth.acl_file": str(acl)})

    from tests.e2e.mqtt5raw import Paho5

    def connect(user: str) -> Paho5:
        c = Paho5(node, unique(user))
        c.client.username_pw_set(user, "pw")
        rc, _, _ = c.connect()
        assert not rc.is_failure, rc
        return c

    nobody = connect("nobody")
    try:
        codes = nobody.subscribe("$queue/jobs/#", options=SubscribeOptions(qos=1))
        assert [int(rc.value) for rc in codes] == [0x87]  # read is needed to consume
    finally:
        nobody.disconnect()
    worker = connect("worker")
    producer = connect("producer")
    try:
        p = props(PacketTypes.SUBSCRIBE)
        p.UserProperty = [("consumer-group", "w")]
        codes = worker.subscribe("$queue/jobs/#", options=SubscribeOptions(qos=1), properties=p)
        assert [int(rc.value) for rc in codes] == [1]
        producer.publish("$queue/jobs/a", b"job", 1)
        msg = worker.get()
        assert msg.payload == b"job"
    finally:
        worker.disconnect()
        producer.disconnect()
