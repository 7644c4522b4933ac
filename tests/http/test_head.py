"""HEAD on every GET route of every HTTP surface (RFC 9110 §9.3.2: a server MUST support GET and
HEAD): the status, ``Content-Type`` and ``Content-Length`` of the GET, no body; a streaming route
answers with its headers and opens no stream. A route without GET still refuses HEAD (405)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.broker.message import Message
from fluxmq.http.admin import AdminAPI
from fluxmq.http.bridge import BridgeSettings, HTTPBridge
from fluxmq.http.health import make_health_app
from fluxmq.http.metrics import make_metrics_app, make_registry
from tests.http.test_admin import AUTH, TOKEN
from tests.http.test_bridge import wsgi_call
from tests.http.test_health import UP, StubSource

COMPARED = ("Content-Type", "Content-Length", "Allow", "Location")


@pytest.fixture
def broker() -> Broker:
    broker = Broker(BrokerSettings())
    broker.publish(Message("kept", b"retained payload", 0, True))
    return broker


def get_and_head(app, path: str, query: str = "", headers: dict | None = None) -> tuple:
    """The GET's and the HEAD's status and compared headers, and the HEAD's body."""
    get = wsgi_call(app, "GET", path, query=query, headers=headers)
    got_body = b"".join(get.body)
    head = wsgi_call(app, "HEAD", path, query=query, headers=headers)
    head_body = b"".join(head.body)
    assert "Content-Length" not in get.headers or int(get.headers["Content-Length"]) == len(got_body)
    return (
        (get.status, {k: v for k, v in get.headers.items() if k in COMPARED}),
        (head.status, {k: v for k, v in head.headers.items() if k in COMPARED}),
        head_body,
    )


@pytest.mark.parametrize("path", ["/health", "/ready", "/cluster/status", "/metrics", "/nothing"])
def test_health_and_metrics_answer_head_as_get(broker: Broker, path: str) -> None:
    app = make_health_app(StubSource(UP))
    app.mount("/metrics", make_metrics_app(make_registry(SimpleNamespace(broker=broker, listeners=[]))))
    get, head, body = get_and_head(app, path)
    if path == "/metrics":  # (two scrapes differ in their figures, not in their type)
        assert head[0] == get[0] == 200 and head[1]["Content-Type"] == get[1]["Content-Type"]
    else:
        assert head == get
    assert body == b""


def admin_paths(app: AdminAPI) -> list[str]:
    """A path of each GET route of the admin API (``*`` and ``**`` filled in)."""
    return [
        "/" + pattern.replace("**", "kept").replace("*", "x")
        for method, pattern, _ in app._routes
        if method == "GET"
    ]


def test_every_admin_get_route_answers_head_as_get(broker: Broker) -> None:
    app = AdminAPI(SimpleNamespace(broker=broker, listeners=[]), TOKEN, lambda: {})
    paths = [*admin_paths(app), "/openapi.yaml", "/", "/dashboard/", "/dashboard/nothing"]
    assert "/retained/kept" in paths and "/stats" in paths
    for path in paths:
        get, head, body = get_and_head(app, path, headers=AUTH)
        if path == "/stats":  # (uptime and figures move between two calls; the shape does not)
            assert head[0] == get[0] == 200 and head[1]["Content-Type"] == get[1]["Content-Type"]
        else:
            assert head == get, path
        assert body == b"", path
    assert get_and_head(app, "/stats")[1][0] == 401  # the token is still asked for


def test_the_admin_monitor_answers_head_with_its_headers_and_opens_no_stream(broker: Broker) -> None:
    app = AdminAPI(SimpleNamespace(broker=broker, listeners=[]), TOKEN, lambda: {})
    head = wsgi_call(app, "HEAD", "/monitor", query="filter=a/%23", headers=AUTH)
    assert head.status == 200 and head.headers["Content-Type"].startswith("text/event-stream")
    assert b"".join(head.body) == b""
    assert not app.monitor.streams and not broker.sessions
    bad = wsgi_call(app, "HEAD", "/monitor", query="filter=a/%23/b", headers=AUTH)
    assert bad.status == 400 and not broker.sessions


@pytest.fixture
def bridge(broker: Broker) -> HTTPBridge:
    return HTTPBridge(broker, BridgeSettings(max_streams=1))


@pytest.mark.parametrize("path", ["/retained/kept", "/retained/none", "/retained/", "/nothing"])
def test_bridge_reads_answer_head_as_get(bridge: HTTPBridge, path: str) -> None:
    get, head, body = get_and_head(bridge, path)
    assert head == get and body == b""


@pytest.mark.parametrize(
    "query, status",
    [("filter=a/%23", 200), ("filter=a/%23/b", 400), ("", 400), ("filter=a&x=1", 400)],
)
def test_a_head_on_subscribe_answers_the_gets_status_and_opens_no_stream(
    bridge: HTTPBridge, query: str, status: int
) -> None:
    head = wsgi_call(bridge, "HEAD", "/subscribe", query=query)
    assert head.status == status and b"".join(head.body) == b""
    if status == 200:
        assert head.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert not bridge.streams and not bridge.broker.sessions


def test_a_head_on_subscribe_answers_429_as_the_get_would(bridge: HTTPBridge) -> None:
    """The stream bound (``max_streams`` 1 here) is checked as for the GET."""
    stream = wsgi_call(bridge, "GET", "/subscribe", query="filter=a")
    try:
        assert wsgi_call(bridge, "HEAD", "/subscribe", query="filter=a").status == 429
    finally:
        stream.body.close()
    assert wsgi_call(bridge, "HEAD", "/subscribe", query="filter=a").status == 200


@pytest.mark.parametrize(
    "app_name, path, allow",
    [("bridge", "/publish", "POST"), ("bridge", "/topics/t", "POST"), ("admin", "/reload", "POST")],
)
def test_head_where_there_is_no_get_is_405(broker: Broker, app_name: str, path: str, allow: str) -> None:
    app = (
        HTTPBridge(broker)
        if app_name == "bridge"
        else AdminAPI(SimpleNamespace(broker=broker, listeners=[]), TOKEN, lambda: {})
    )
    head = wsgi_call(app, "HEAD", path, headers=AUTH)
    assert head.status == 405 and head.headers["Allow"] == allow
