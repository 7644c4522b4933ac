"""A 3-node fluxmq mesh configured in the reference 001 spelling (``cluster.routes``).

Issue 14: "In a mesh of fluxmq nodes (A<->B, B<->C, A<->C) every message reaches every node exactly
once", and the ``$SYS/broker/cluster/*`` topics are right, including while one node is down.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from tests.conftest import NodeFactory, free_port
from tests.e2e.listener_clients import PahoTransportClient
from tests.e2e.test_bridge_mosquitto import drain, wait_status
from tests.e2e.test_http_bridge import http_request
from tests.e2e.test_metrics import scrape

WAIT = 15.0
TOKEN = "mesh-admin-token"
NAMES = ("a", "b", "c")


def cluster_topics(node) -> dict:
    with PahoTransportClient(f"status-{time.monotonic_ns()}") as c:
        c.connect(node.mqtt_port)
        c.subscribe("$SYS/broker/cluster/#", 0)
        got = {}
        try:
            while len(got) < 3:
                m = c.get(WAIT)  # retained: at once, but a loaded node may take seconds
                got[m.topic.rsplit("/", 1)[1]] = m.payload
        except AssertionError:
            pass
        return got


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    ports = {name: free_port() for name in NAMES}
    factory = NodeFactory(tmp_path_factory.mktemp("mesh"))
    nodes = {}
    try:
        for name in NAMES:
            routes = "\n".join(
                f"    - {{host: 127.0.0.1, port: {ports[peer]}, node_id: node-{name}, message_validity: 30s, "
                f"reconnect: {{initial: 0.2s, max: 1s}}}}"
                for peer in NAMES
                if peer != name
            )
            nodes[name] = factory(
                overrides={"server.tcp.plain.addr": f"127.0.0.1:{ports[name]}"},
                env={"FLUXMQ_ADMIN_TOKEN": TOKEN},
                config_text=f"cluster:\n  routes:\n{routes}\nbroker:\n  sys_interval: 1s\n",
            )
        for node in nodes.values():
            wait_status(node, "ok", 30)
        yield nodes
    finally:
        factory.close()


def test_every_message_reaches_every_node_exactly_once(mesh):
    subs = {}
    try:
        for name, node in mesh.items():
            subs[name] = PahoTransportClient(f"sub-{name}")
            subs[name].connect(node.mqtt_port)
            subs[name].subscribe("mesh/#", 2)
        for name, node in mesh.items():
            with PahoTransportClient(f"pub-{name}") as pub:
                pub.connect(node.mqtt_port)
                for i in range(30):
                    pub.publish(f"mesh/{name}/{i}", b"m", i % 3)
        expected = Counter(f"mesh/{name}/{i}" for name in NAMES for i in range(30))
        for name, sub in subs.items():
            got = Counter(m.topic for m in drain(sub, 2.0, want=len(NAMES) * 30))
            assert got == expected, f"node {name}: missing {expected - got}, extra {got - expected}"
    finally:
        for sub in subs.values():
            sub.close()


def test_status_topics_ok(mesh):
    got = cluster_topics(mesh["a"])
    assert got["status"] == b"ok"
    nodes = json.loads(got["nodes"])
    assert sorted(n["peer"] for n in nodes) == sorted(f"127.0.0.1:{mesh[p].mqtt_port}" for p in ("b", "c"))
    assert all(n["state"] == "connected" and n["client_id"] == "node-a" for n in nodes)
    sync = json.loads(got["sync"])
    assert set(sync) == {f"127.0.0.1:{mesh[p].mqtt_port}" for p in ("b", "c")}
    assert all(
        {"queued", "forwarded_out", "forwarded_in", "dropped_validity"} <= set(v) for v in sync.values()
    )


def test_admin_and_metrics_show_the_routes(mesh):
    """The same data on the admin API (GET /bridges) and /metrics; no credentials in either."""
    node = mesh["a"]
    status, _, body = http_request(
        node, "GET", "/bridges", headers={"Authorization": f"Bearer {TOKEN}"}, port=node.admin_port
    )
    assert status == 200 and body["status"] == "ok", body
    assert sorted(b["name"] for b in body["bridges"]) == sorted(
        f"127.0.0.1:{mesh[p].mqtt_port}" for p in ("b", "c")
    )
    assert all(b["state"] == "connected" and b["mesh"] for b in body["bridges"])
    samples = scrape(node)
    for p in ("b", "c"):
        name = f"127.0.0.1:{mesh[p].mqtt_port}"
        assert samples[("fluxmq_bridge_connected", (("bridge", name),))] == 1
        assert ("fluxmq_bridge_forwarded_total", (("bridge", name), ("direction", "out"))) in samples


def test_one_node_down(mesh):
    """C stops: A and B report degraded (C's route down, messages for C queued) and still mirror
    each other exactly once; /ready stays 200 with mode degraded."""
    c = mesh["c"]
    c.stop()
    for name in ("a", "b"):
        wait_status(mesh[name], "degraded", 30)
    got = cluster_topics(mesh["a"])
    states = {n["peer"]: n["state"] for n in json.loads(got["nodes"])}
    assert states[f"127.0.0.1:{c.mqtt_port}"] != "connected"
    assert states[f"127.0.0.1:{mesh['b'].mqtt_port}"] == "connected"
    status, body = mesh["a"].http_get("/ready")
    assert status == 200 and body["mode"] == "degraded", body
    with PahoTransportClient("sub-b2") as sub, PahoTransportClient("pub-a2") as pub:
        sub.connect(mesh["b"].mqtt_port)
        sub.subscribe("down/#", 1)
        pub.connect(mesh["a"].mqtt_port)
        for i in range(10):
            pub.publish(f"down/{i}", b"x", 1)
        assert sorted(m.topic for m in drain(sub, 2.0, want=10)) == sorted(f"down/{i}" for i in range(10))
    sync = wait_status(mesh["a"], "degraded")
    assert sync[f"127.0.0.1:{c.mqtt_port}"]["queued"] >= 10  # waiting on disk for C


def test_bridge_client_ids_are_reserved(mesh):
    """A client may not take over a bridge's local session ($bridge/NAME): CONNACK 2 (identifier rejected)."""
    from fluxmq._core import codec as c
    from tests.e2e.mqttraw import RawClient

    with RawClient.to(mesh["a"]) as client:
        connack = client.connect(f"$bridge/127.0.0.1:{mesh['b'].mqtt_port}", clean=False)
        assert connack == c.Connack(False, 2)
        assert client.wait_closed() == []
