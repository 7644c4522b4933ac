"""The cluster readiness check and /cluster/status in reference 003's shapes, from real metadata
planes (fluxmq/cluster/metadata/health.py through fluxmq/http/health.py)."""

from __future__ import annotations

from fluxmq.cluster.metadata.health import ClusterHealth
from fluxmq.http.health import make_health_app
from tests.cluster.metadata.conftest import SHORT_TTL, crash, wait_for
from tests.http.test_health import UP, StubSource, call


def test_ready_is_503_until_the_node_is_registered_in_etcd(meta_factory):
    meta = meta_factory("a", start=False)
    app = make_health_app(StubSource(UP), ClusterHealth(meta))
    status, _, body = call(app, "/ready")
    assert status == 503
    assert body["status"] == "not_ready"
    assert body["details"] == "cluster unavailable"
    assert body["checks"]["cluster"]["status"] == "down"
    meta.start()
    status, _, body = call(app, "/ready")
    assert (status, body) == (
        200,
        {
            "status": "ready",
            "mode": "nominal",
            "checks": {"broker": {"status": "up"}, "storage": {"status": "up"}, "cluster": {"status": "up"}},
        },
    )


def test_ready_is_degraded_with_one_of_two_peers_reachable(meta_factory):
    a = meta_factory("a")
    meta_factory("b"), meta_factory("c")
    reachable = {"b": {"reachable": True}, "c": {"reachable": False}}
    app = make_health_app(StubSource(UP), ClusterHealth(a, lambda: reachable))
    assert wait_for(lambda: set(a.members()) == {"a", "b", "c"})
    status, _, body = call(app, "/ready")
    assert (status, body) == (
        200,
        {
            "status": "ready",
            "mode": "degraded",
            "checks": {
                "broker": {"status": "up"},
                "storage": {"status": "up"},
                "cluster": {"status": "up", "details": "1/2 peers reachable"},
            },
        },
    )
    reachable["c"]["reachable"] = True
    assert call(app, "/ready")[2]["mode"] == "nominal"


def test_without_a_transport_a_peer_that_left_etcd_counts_as_unreachable(meta_factory):
    a, b = meta_factory("a"), meta_factory("b")
    app = make_health_app(StubSource(UP), ClusterHealth(a, lambda: {"b": {"reachable": True}}))
    health = ClusterHealth(a)  # etcd liveness only
    assert wait_for(lambda: health.check() == (True, ""))
    crash(b)
    assert wait_for(lambda: health.check() == (True, "0/1 peers reachable"), timeout=SHORT_TTL * 5)
    assert call(app, "/ready")[0] == 200


def test_cluster_status_names_the_node_the_leader_and_the_members(meta_factory):
    a, b = meta_factory("a"), meta_factory("b")
    assert wait_for(lambda: set(a.members()) == {"a", "b"} and a.is_leader)
    app_a = make_health_app(
        StubSource(UP, sessions=128), ClusterHealth(a, lambda: {"b": {"reachable": False}})
    )
    status, _, body = call(app_a, "/cluster/status")
    assert status == 200
    assert {k: body[k] for k in ("node_id", "is_leader", "cluster_mode", "sessions")} == {
        "node_id": "a",
        "is_leader": True,
        "cluster_mode": True,
        "sessions": 128,
    }
    assert body["members"] == [
        {
            "node_id": "a",
            "addr": a.transport_addr,
            "self": True,
            "live": True,
            "reachable": True,
            "leader": True,
        },
        {
            "node_id": "b",
            "addr": b.transport_addr,
            "self": False,
            "live": True,
            "reachable": False,
            "leader": False,
        },
    ]
    body_b = call(make_health_app(StubSource(UP), ClusterHealth(b)), "/cluster/status")[2]
    assert (body_b["node_id"], body_b["is_leader"]) == ("b", False)


def test_a_peer_that_stopped_gracefully_is_no_longer_counted(meta_factory):
    a, b = meta_factory("a"), meta_factory("b")
    health = ClusterHealth(a)
    assert wait_for(lambda: set(a.members()) == {"a", "b"})
    b.stop()
    assert wait_for(lambda: set(a.members()) == {"a"})
    assert health.check() == (True, "")


def test_the_admin_api_answers_the_same_cluster_status(meta_factory):
    from types import SimpleNamespace

    from openapi_core import OpenAPI

    from fluxmq.broker.broker import Broker
    from fluxmq.http.admin import AdminAPI
    from tests.http.test_admin import SPEC_PATH, TOKEN, json_call

    a = meta_factory("a")
    assert wait_for(lambda: a.is_leader)
    service = SimpleNamespace(broker=Broker(), listeners=[], cluster_health=ClusterHealth(a))
    status, _, body = json_call(
        OpenAPI.from_file_path(str(SPEC_PATH)), AdminAPI(service, TOKEN), "GET", "/cluster/status"
    )
    assert status == 200
    assert (body["node_id"], body["is_leader"], body["cluster_mode"], body["sessions"]) == (
        "a",
        True,
        True,
        0,
    )
    assert [m["node_id"] for m in body["members"]] == ["a"]


def test_a_node_whose_members_are_its_workers_is_reported_once(meta_factory):
    """Node a runs two workers (members a/w0, a/w1), node b one: /cluster/status lists nodes a and b
    once each, from a worker of a and from b alike; the check counts nodes, and this node's own
    workers apart (docs/cluster.rst, "Several workers on a cluster node")."""
    a0, a1, b = meta_factory("a/w0"), meta_factory("a/w1"), meta_factory("b")
    assert wait_for(lambda: all(set(m.members()) == {"a/w0", "a/w1", "b"} for m in (a0, a1, b)))
    assert wait_for(lambda: b.election.leader is not None and a0.election.leader == b.election.leader)
    leader_node = b.election.leader.partition("/")[0]
    states = {"a/w1": {"reachable": True}, "b": {"reachable": False}}
    status, _, body = call(
        make_health_app(StubSource(UP, sessions=3), ClusterHealth(a0, lambda: states)), "/cluster/status"
    )
    assert status == 200
    assert (body["node_id"], body["sessions"], body["is_leader"]) == ("a", 3, leader_node == "a")
    assert [(m["node_id"], m["self"], m["reachable"], m["leader"]) for m in body["members"]] == [
        ("a", True, True, leader_node == "a"),
        ("b", False, False, leader_node == "b"),
    ]
    assert [(w["worker_id"], w["addr"]) for w in body["members"][0]["workers"]] == [
        ("a/w0", a0.transport_addr),
        ("a/w1", a1.transport_addr),
    ]
    assert ClusterHealth(a0, lambda: states).check() == (True, "0/1 peers reachable")
    states["a/w1"]["reachable"], states["b"]["reachable"] = False, True
    assert ClusterHealth(a0, lambda: states).check() == (True, "0/1 other workers of this node reachable")
    body_b = call(make_health_app(StubSource(UP), ClusterHealth(b)), "/cluster/status")[2]
    assert [(m["node_id"], len(m["workers"])) for m in body_b["members"]] == [("b", 1), ("a", 2)]
    assert body_b["node_id"] == "b"
