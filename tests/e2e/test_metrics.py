"""``/metrics`` of a real node: parses with prometheus_client's parser and moves when traffic flows.

The health endpoints on the same listener keep the exact shapes of reference 003.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import paho.mqtt.client as mqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import NodeFactory, RunningNode
from tests.e2e.mqttraw import paho_connected, unique, wait_until
from tests.e2e.test_http_bridge import SSEReader, publish_json

pytestmark = pytest.mark.e2e

WAIT = 10.0


def scrape(node: RunningNode) -> dict[tuple[str, tuple], float]:
    """GET /metrics on the health listener -> {(sample name, sorted labels): value}; checks the types."""
    url = f"http://{node.host}:{node.health_port}/metrics"
    with urllib.request.urlopen(url, timeout=WAIT) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    samples = {}
    types = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert types["fluxmq_messages_received"] == "counter"
    assert types["fluxmq_delivery_latency_seconds"] == "histogram"
    return samples


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_parse_and_counters_move_with_mqtt_traffic(node_factory: NodeFactory) -> None:
    n = node_factory()
    before = scrape(n)
    topic = f"metrics/{unique('t')}"
    count = 70  # more than one latency sample (1 in 64 publishes, $SYS publishes included)
    with paho_connected(n, unique("sub")) as sub, paho_connected(n, unique("pub")) as pub:
        sub.subscribe(topic, 1)
        for i in range(count):
            pub.publish(topic, f"m{i:03d}".encode(), qos=1)
        for _ in range(count):
            sub.get(WAIT)
        during = scrape(n)
        assert sample(during, "fluxmq_clients_connected") == 2
        assert sample(during, "fluxmq_listener_connections", listener="tcp") == 2
        assert sample(during, "fluxmq_subscriptions") >= 1
    after = scrape(n)
    grew = {
        name: sample(after, name, **labels) - sample(before, name, **labels)
        for name, labels in [
            ("fluxmq_messages_received_total", {"qos": "1"}),
            ("fluxmq_messages_sent_total", {"qos": "1"}),
            ("fluxmq_message_bytes_received_total", {"qos": "1"}),
            ("fluxmq_message_bytes_sent_total", {"qos": "1"}),
            ("fluxmq_connections_total", {}),
        ]
    }
    assert grew == {
        "fluxmq_messages_received_total": count,
        "fluxmq_messages_sent_total": count,
        "fluxmq_message_bytes_received_total": 4 * count,
        "fluxmq_message_bytes_sent_total": 4 * count,
        "fluxmq_connections_total": 2,
    }
    assert sample(after, "fluxmq_network_bytes_received_total") > sample(
        before, "fluxmq_network_bytes_received_total"
    )
    assert sample(after, "fluxmq_packets_received_total") > sample(before, "fluxmq_packets_received_total")
    assert sample(after, "fluxmq_delivery_latency_seconds_count") >= 1
    assert sample(after, "fluxmq_delivery_latency_seconds_bucket", le="+Inf") == sample(
        after, "fluxmq_delivery_latency_seconds_count"
    )
    assert sample(after, "fluxmq_retained_messages") > 0  # the $SYS topics
    assert sample(after, "process_resident_memory_bytes") > 0
    assert sample(after, "process_cpu_seconds_total") > 0
    assert wait_until(lambda: sample(scrape(n), "fluxmq_clients_connected") == 0, WAIT)


def test_qos0_between_311_and_50_clients_is_delivered_whole_and_counted_exactly(
    node_factory: NodeFactory,
) -> None:
    """QoS 0 from a 3.1.1 and a 5.0 publisher to a 3.1.1 and a 5.0 subscriber (the relay writes
    these from the read's bytes, each subscriber's frame in its own version): every payload
    arrives whole and in order, and the per-QoS message and byte counters move by exactly what
    was published and delivered."""
    n = node_factory({"broker.sys_interval": "0s"})  # ($SYS publishes would count as received QoS 0)
    topic = f"metrics/{unique('q0')}"
    count = 70
    payloads = [bytes([i % 256]) * (i * 7 % 300) for i in range(count)]
    before = scrape(n)
    with (
        paho_connected(n, unique("s4")) as s4,
        paho_connected(n, unique("s5"), mqtt.MQTTv5) as s5,
        paho_connected(n, unique("p4")) as p4,
        paho_connected(n, unique("p5"), mqtt.MQTTv5) as p5,
    ):
        s4.subscribe(f"{topic}/#", 0)
        s5.subscribe(f"{topic}/#", 0)
        for i, payload in enumerate(payloads):
            (p4 if i % 2 else p5).publish(f"{topic}/{i % 2}", payload, qos=0)
        for sub in (s4, s5):
            got = [sub.get(WAIT) for _ in range(count)]
            for parity in (0, 1):
                assert [m.payload for m in got if m.topic == f"{topic}/{parity}"] == payloads[parity::2]
            assert all(m.qos == 0 and not m.retain for m in got)
        after = scrape(n)
    size = sum(map(len, payloads))
    grew = {
        name: sample(after, name, qos="0") - sample(before, name, qos="0")
        for name in (
            "fluxmq_messages_received_total",
            "fluxmq_messages_sent_total",
            "fluxmq_message_bytes_received_total",
            "fluxmq_message_bytes_sent_total",
        )
    }
    assert grew == {
        "fluxmq_messages_received_total": count,
        "fluxmq_messages_sent_total": 2 * count,
        "fluxmq_message_bytes_received_total": size,
        "fluxmq_message_bytes_sent_total": 2 * size,
    }


def test_http_bridge_traffic_and_sse_streams_are_counted(node_factory: NodeFactory) -> None:
    n = node_factory({"server.http.plain.sse_queue_size": 1})
    stream = SSEReader(n, "m/sse")
    try:
        assert publish_json(n, {"topic": "m/sse", "payload": "a"})[0] == 200
        assert publish_json(n, {"topic": "m/#"})[0] == 400
        samples = scrape(n)
        assert sample(samples, "fluxmq_http_requests_total", endpoint="publish", code="200") == 1
        assert sample(samples, "fluxmq_http_requests_total", endpoint="publish", code="400") == 1
        assert sample(samples, "fluxmq_http_requests_total", endpoint="subscribe", code="200") == 1
        assert sample(samples, "fluxmq_listener_connections", listener="http_sse") == 1
        assert stream.event()[1]["payload"] == "a"
    finally:
        stream.close()


def test_health_endpoints_keep_reference_shapes_next_to_metrics(node: RunningNode) -> None:
    assert node.http_get("/health") == (200, {"status": "healthy"})
    assert node.http_get("/ready") == (
        200,
        {
            "status": "ready",
            "mode": "nominal",
            "checks": {"broker": {"status": "up"}, "storage": {"status": "up"}},
        },
    )
    status, body = node.http_get("/cluster/status")
    assert status == 200
    assert list(body) == ["node_id", "is_leader", "cluster_mode", "sessions"]
    assert (body["node_id"], body["is_leader"], body["cluster_mode"]) == ("single-node", False, False)
    assert type(body["sessions"]) is int
    scrape(node)


def test_metrics_can_be_turned_off(node_factory: NodeFactory) -> None:
    n = node_factory({"server.metrics_enabled": False})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://{n.host}:{n.health_port}/metrics", timeout=WAIT)
    assert err.value.code == 404
    assert json.loads(err.value.read()) == {"error": "not found", "path": "/metrics"}
    assert n.http_get("/health")[0] == 200
