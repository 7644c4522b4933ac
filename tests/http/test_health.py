"""The health WSGI app answers exactly the shapes of reference 003 (single-node mode)."""

from __future__ import annotations

import json

import pytest

from fluxmq.http.health import make_health_app
from tests.http.test_bridge import wsgi_call


class StubSource:
    """The two methods the health app reads, with values a test sets."""

    def __init__(self, checks: dict[str, tuple[bool, str]], sessions: int = 0) -> None:
        self.checks = checks
        self.sessions = sessions

    def is_ready(self) -> dict[str, tuple[bool, str]]:
        return dict(self.checks)

    def session_count(self) -> int:
        return self.sessions


class BrokenSource(StubSource):
    def is_ready(self) -> dict[str, tuple[bool, str]]:
        raise RuntimeError("storage handle closed")


def call(app, path: str, method: str = "GET") -> tuple[int, dict[str, str], dict]:
    """Run one request through the WSGI app; returns (status, headers, decoded JSON body)."""
    response = wsgi_call(app, method, path)
    body = b"".join(response.body)
    assert response.headers["Content-Length"] == str(len(body))
    return response.status, response.headers, json.loads(body)


UP = {"broker": (True, ""), "storage": (True, "")}


def test_health_is_healthy_without_checking_dependencies() -> None:
    app = make_health_app(StubSource({"broker": (False, "x"), "storage": (False, "y")}))
    status, headers, body = call(app, "/health")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert body == {"status": "healthy"}


def test_ready_single_node_nominal() -> None:
    status, headers, body = call(make_health_app(StubSource(UP)), "/ready")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert body == {
        "status": "ready",
        "mode": "nominal",
        "checks": {"broker": {"status": "up"}, "storage": {"status": "up"}},
    }
    assert list(body) == ["status", "mode", "checks"]


def test_ready_not_ready_names_first_failing_component() -> None:
    source = StubSource({"broker": (True, ""), "storage": (False, "lmdb: closed")})
    status, _, body = call(make_health_app(source), "/ready")
    assert status == 503
    assert body == {
        "status": "not_ready",
        "details": "storage unavailable",
        "checks": {"broker": {"status": "up"}, "storage": {"status": "down", "details": "lmdb: closed"}},
    }
    assert "mode" not in body


def test_ready_first_failing_component_in_reported_order() -> None:
    source = StubSource({"broker": (False, "broker not initialized"), "storage": (False, "")})
    status, _, body = call(make_health_app(source), "/ready")
    assert status == 503
    assert body["details"] == "broker unavailable"
    assert body["checks"]["storage"] == {"status": "down"}


def test_ready_cluster_up_with_details_is_degraded() -> None:
    source = StubSource({**UP, "cluster": (True, "1/2 peers reachable")})
    status, _, body = call(make_health_app(source), "/ready")
    assert status == 200
    assert body == {
        "status": "ready",
        "mode": "degraded",
        "checks": {
            "broker": {"status": "up"},
            "storage": {"status": "up"},
            "cluster": {"status": "up", "details": "1/2 peers reachable"},
        },
    }


def test_ready_cluster_all_up_is_nominal_with_cluster_check() -> None:
    status, _, body = call(make_health_app(StubSource({**UP, "cluster": (True, "")})), "/ready")
    assert status == 200
    assert body["mode"] == "nominal"
    assert body["checks"]["cluster"] == {"status": "up"}


def test_ready_check_that_raises_is_503_not_500() -> None:
    status, _, body = call(make_health_app(BrokenSource({})), "/ready")
    assert status == 503
    assert body["status"] == "not_ready"
    assert body["details"] == "broker unavailable"
    assert "storage handle closed" in body["checks"]["broker"]["details"]


@pytest.mark.parametrize("sessions", [0, 42])
def test_cluster_status_single_node(sessions: int) -> None:
    status, headers, body = call(make_health_app(StubSource(UP, sessions)), "/cluster/status")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert body == {"node_id": "single-node", "is_leader": False, "cluster_mode": False, "sessions": sessions}


@pytest.mark.parametrize("path", ["/", "/healthz", "/ready/", "/cluster", "/metrics"])
def test_unknown_path_is_404_json(path: str) -> None:
    status, headers, body = call(make_health_app(StubSource(UP)), path)
    assert status == 404
    assert headers["Content-Type"] == "application/json"
    assert body["path"] == path


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
@pytest.mark.parametrize("path", ["/health", "/ready", "/cluster/status"])
def test_non_get_is_405(path: str, method: str) -> None:
    status, headers, body = call(make_health_app(StubSource(UP)), path, method)
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"
    assert body["method"] == method
