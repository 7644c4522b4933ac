"""The Prometheus exporter over a real Broker: the output parses and follows the broker's counters.

Traffic goes through the real broker (``Broker.publish``) to the HTTP bridge's SSE streams; the
node-level test (a scrape over HTTP while MQTT clients publish) is ``tests/e2e/test_metrics.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import gevent
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fluxmq.broker.broker import Broker
from fluxmq.broker.message import Message
from fluxmq.broker.stats import LATENCY_BUCKETS, LATENCY_SAMPLE_MASK
from fluxmq.http.bridge import BridgeSettings, HTTPBridge
from fluxmq.http.metrics import make_metrics_app, make_registry
from tests.http.test_admin import hub_turns_during
from tests.http.test_bridge import subscribe, wsgi_call


class Listener:
    """A listener as the collector sees it (name and open connections)."""

    def __init__(self, name: str, connections: int) -> None:
        self.name = name
        self.connections = set(range(connections))


def scrape(app, accept: str = "") -> dict[str, dict]:
    """GET /metrics and parse it: family name -> {"type": ..., "samples": {(name, labels): value}}."""
    resp = wsgi_call(app, "GET", "/metrics", headers={"Accept": accept} if accept else None)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = b"".join(resp.body).decode()
    families = {}
    for family in text_string_to_metric_families(text):
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        families[family.name] = {"type": family.type, "samples": samples}
    return families


def value(families: dict, family: str, sample: str | None = None, **labels: str) -> float:
    return families[family]["samples"][(sample or family, tuple(sorted(labels.items())))]


@pytest.fixture
def broker() -> Broker:
    return Broker()


@pytest.fixture
def bridge(broker: Broker) -> HTTPBridge:
    return HTTPBridge(broker, BridgeSettings(sse_heartbeat=0.05, sse_queue_size=2))


@pytest.fixture
def app(broker: Broker, bridge: HTTPBridge):
    service = SimpleNamespace(broker=broker, listeners=[Listener("tcp", 3)])
    return make_metrics_app(make_registry(service, bridge))


def test_output_parses_with_the_expected_types(app) -> None:
    families = scrape(app)
    expected = {
        "fluxmq_clients_connected": "gauge",
        "fluxmq_connections": "counter",
        "fluxmq_listener_connections": "gauge",
        "fluxmq_listener_connections_parked": "gauge",
        "fluxmq_messages_received": "counter",
        "fluxmq_messages_sent": "counter",
        "fluxmq_message_bytes_received": "counter",
        "fluxmq_message_bytes_sent": "counter",
        "fluxmq_messages_dropped": "counter",
        "fluxmq_retained_messages": "gauge",
        "fluxmq_subscriptions": "gauge",
        "fluxmq_sessions": "gauge",
        "fluxmq_session_queue_messages": "gauge",
        "fluxmq_inflight_messages": "gauge",
        "fluxmq_delivery_latency_seconds": "histogram",
        "fluxmq_http_requests": "counter",
        "fluxmq_sse_queue_messages": "gauge",
        "fluxmq_build_info": "gauge",
        "process_cpu_seconds": "counter",
        "process_resident_memory_bytes": "gauge",
    }
    for name, kind in expected.items():
        assert families[name]["type"] == kind, name
    assert value(families, "fluxmq_listener_connections", listener="tcp") == 3
    assert value(families, "fluxmq_listener_connections", listener="http_sse") == 0
    assert value(families, "fluxmq_listener_connections_parked", listener="tcp") == 0


def test_counters_follow_traffic(app, broker: Broker, bridge: HTTPBridge) -> None:
    before = scrape(app)
    stream = subscribe(bridge, "m/#")
    broker.publish(Message("m/1", b"abcd", 1))
    broker.publish(Message("m/2", b"xy", 0))
    broker.publish(Message("other", b"zzz", 2, retain=True))
    after = scrape(app)
    assert (
        value(after, "fluxmq_messages_received", "fluxmq_messages_received_total", qos="1")
        == value(before, "fluxmq_messages_received", "fluxmq_messages_received_total", qos="1") + 1
    )
    assert value(after, "fluxmq_messages_received", "fluxmq_messages_received_total", qos="2") == 1
    assert value(after, "fluxmq_message_bytes_received", "fluxmq_message_bytes_received_total", qos="1") == 4
    # the stream subscribes at QoS 0, so both deliveries are QoS 0 and 6 payload bytes
    assert value(after, "fluxmq_messages_sent", "fluxmq_messages_sent_total", qos="0") == 2
    assert value(after, "fluxmq_message_bytes_sent", "fluxmq_message_bytes_sent_total", qos="0") == 6
    assert value(after, "fluxmq_retained_messages") == 1
    assert value(after, "fluxmq_subscriptions") == 1
    assert value(after, "fluxmq_clients_connected") == 1
    assert value(after, "fluxmq_connections", "fluxmq_connections_total") == 1
    assert value(after, "fluxmq_sessions", state="connected") == 1
    assert value(after, "fluxmq_listener_connections", listener="http_sse") == 1
    assert value(after, "fluxmq_sse_queue_messages") == 2
    assert (
        value(after, "fluxmq_http_requests", "fluxmq_http_requests_total", endpoint="subscribe", code="200")
        == 1
    )
    stream.close()
    assert value(scrape(app), "fluxmq_clients_connected") == 0


def test_drops_by_reason(app, broker: Broker, bridge: HTTPBridge) -> None:
    stream = subscribe(bridge, "d")
    for _ in range(5):
        broker.publish(Message("d", b"."))
    families = scrape(app)
    assert (
        value(families, "fluxmq_messages_dropped", "fluxmq_messages_dropped_total", reason="sse_queue_full")
        == 3
    )
    stream.close()


def test_queue_depths_of_offline_sessions(app, broker: Broker) -> None:
    session, _ = broker.open_session("offline-1", False, 3600)
    broker.subscribe(session, "q", 1)
    for _ in range(4):
        broker.publish(Message("q", b"12345", 1))
    families = scrape(app)
    assert value(families, "fluxmq_session_queue_messages") == 4
    assert value(families, "fluxmq_session_queue_bytes") == 4 * (5 + 1)  # payload + topic
    assert value(families, "fluxmq_session_queue_max_messages") == 4
    assert value(families, "fluxmq_sessions", state="offline") == 1


def test_latency_histogram_is_sampled(app, broker: Broker, bridge: HTTPBridge) -> None:
    stream = subscribe(bridge, "lat")
    n = 2 * (LATENCY_SAMPLE_MASK + 1)
    for i in range(n):
        broker.publish(Message("lat", str(i).encode()))
        if i % 50 == 0:
            stream.events(1)  # keep the bounded queue from mattering
    gevent.sleep(0)  # let the hub run the sample callbacks registered by publish
    families = scrape(app)
    count = value(families, "fluxmq_delivery_latency_seconds", "fluxmq_delivery_latency_seconds_count")
    assert count == 2
    buckets = [
        value(families, "fluxmq_delivery_latency_seconds", "fluxmq_delivery_latency_seconds_bucket", le=le)
        for le in [*map(repr, LATENCY_BUCKETS), "+Inf"]
    ]
    assert buckets == sorted(buckets) and buckets[-1] == count  # cumulative, +Inf is the count
    assert value(families, "fluxmq_delivery_latency_seconds", "fluxmq_delivery_latency_seconds_sum") > 0
    stream.close()


def test_before_the_broker_starts_only_build_info() -> None:
    app = make_metrics_app(make_registry(SimpleNamespace(broker=None, listeners=[])))
    families = scrape(app)
    assert "fluxmq_build_info" in families
    assert not any(name.startswith("fluxmq_") and name != "fluxmq_build_info" for name in families)


def test_openmetrics_when_asked(app) -> None:
    resp = wsgi_call(
        app, "GET", "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    assert b"".join(resp.body).rstrip().endswith(b"# EOF")


def test_method_and_path(app) -> None:
    assert wsgi_call(app, "POST", "/metrics").status == 405
    assert wsgi_call(app, "GET", "/metrics/x").status == 404
    head = wsgi_call(app, "HEAD", "/metrics")
    assert head.status == 200 and b"".join(head.body) == b""


def test_a_scrape_over_many_sessions_lets_other_greenlets_run(broker: Broker, app) -> None:
    """Summing the queues of 100,000 sessions held the hub ~15 ms per scrape; it now yields between slices."""
    for i in range(10_000):
        broker.open_session(f"s{i}", False, 3600)
    during, families = hub_turns_during(lambda: scrape(app))
    assert value(families, "fluxmq_sessions", state="offline") == 10_000
    assert during >= 3


def test_output_budget_gauges(app, broker: Broker) -> None:
    budget = broker.stats.output_budget
    budget.limit = 64 << 20
    budget.grow(1 << 20, 1 << 20)
    families = scrape(app)
    assert value(families, "fluxmq_output_budget_bytes") == 64 << 20
    assert value(families, "fluxmq_output_budget_used_bytes") == 1 << 20
    assert value(families, "fluxmq_output_budget_peak_bytes") == 1 << 20
    assert value(families, "fluxmq_output_budget_grants", "fluxmq_output_budget_grants_total") == 1
