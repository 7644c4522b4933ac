"""The HTTP bridge WSGI app over a real Broker: publish, retained reads, SSE streams, errors.

Requests go through the app's WSGI interface (PEP 3333 environ, ``wsgi.input``); subscribers are the
bridge's own SSE streams, read by iterating the response body in this greenlet. The node-level
tests (real gunicorn, paho clients) are in ``tests/e2e/test_http_bridge.py``.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from urllib.parse import quote
from wsgiref.util import setup_testing_defaults

import pytest

from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.broker.message import CONTENT_TYPE, USER_PROPERTY, Message
from fluxmq.http.bridge import SSE_CLIENT_PREFIX, BridgeSettings, HTTPBridge

HEARTBEAT = 0.05  # idle streams yield a heartbeat this often, so a read never waits long


class Response:
    """One WSGI response: status, headers and the body iterable (not consumed for streams)."""

    def __init__(self, status: int, headers: dict[str, str], body) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        data = b"".join(self.body)
        assert self.headers.get("Content-Length") == str(len(data))
        return json.loads(data)


def wsgi_call(
    app,
    method: str,
    path: str,
    body: bytes = b"",
    query: str = "",
    headers: dict[str, str] | None = None,
    chunked: bool = False,
    remote_addr: str = "127.0.0.1",
) -> Response:
    """Call a WSGI app as a server would; ``path`` is the decoded path (UTF-8 text)."""
    environ: dict = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path.encode("utf-8").decode("latin-1"),
        "QUERY_STRING": query,
        "wsgi.input": io.BytesIO(body),
        "REMOTE_ADDR": remote_addr,
        "RAW_URI": quote(path, safe="/%") + (f"?{query}" if query else ""),
    }
    if not chunked:
        environ["CONTENT_LENGTH"] = str(len(body))
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    setup_testing_defaults(environ)
    seen: dict = {}

    def start_response(status: str, response_headers: list[tuple[str, str]], exc_info=None) -> None:
        seen["status"] = int(status.split()[0])
        seen["headers"] = dict(response_headers)

    result = app(environ, start_response)
    return Response(seen["status"], seen["headers"], result)


def publish_json(app, doc) -> Response:
    return wsgi_call(app, "POST", "/publish", json.dumps(doc).encode())


class Stream:
    """Reads the events of one ``/subscribe`` response body (or of another SSE response whose
    client ids start with ``prefix``: the admin monitor's)."""

    def __init__(self, response: Response, prefix: str = "http-sse-") -> None:
        assert response.status == 200, response.json()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        self.response = response
        self._iter: Iterator[bytes] = iter(response.body)
        self.text = ""
        first = next(self._iter).decode()
        assert first.startswith(f": fluxmq stream {prefix}")
        self.client_id = first.split()[3]

    def events(self, count: int, max_reads: int = 200) -> list[tuple[str, dict]]:
        """The next ``count`` events (name, data), skipping heartbeats; bounded by ``max_reads`` chunks."""
        found: list[tuple[str, dict]] = []
        for _ in range(max_reads):
            while "\n\n" in self.text and len(found) < count:
                block, self.text = self.text.split("\n\n", 1)
                fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
                if "event" in fields:
                    found.append((fields["event"], json.loads(fields["data"])))
            if len(found) >= count:
                return found
            self.text += next(self._iter).decode()
        raise AssertionError(f"only {len(found)} of {count} events: {found}")

    def next_chunk(self) -> str:
        return next(self._iter).decode()

    def close(self) -> None:
        self.response.body.close()


@pytest.fixture
def broker() -> Broker:
    return Broker(BrokerSettings())


@pytest.fixture
def bridge(broker: Broker) -> HTTPBridge:
    return HTTPBridge(
        broker,
        BridgeSettings(max_body_size=1024, max_message_size=512, sse_heartbeat=HEARTBEAT, sse_queue_size=100),
    )


def subscribe(bridge: HTTPBridge, *filters: str, remote_addr: str = "127.0.0.1") -> Stream:
    query = "&".join("filter=" + quote(f, safe="") for f in filters)
    return Stream(wsgi_call(bridge, "GET", "/subscribe", query=query, remote_addr=remote_addr))


# -- POST /publish ---------------------------------------------------------------------------------


def test_publish_json_reaches_a_subscriber(bridge: HTTPBridge) -> None:
    stream = subscribe(bridge, "sensors/+/temp")
    resp = publish_json(bridge, {"topic": "sensors/k1/temp", "payload": "21.5", "qos": 1})
    assert resp.status == 200
    assert resp.json() == {
        "status": "published",
        "topic": "sensors/k1/temp",
        "qos": 1,
        "retain": False,
        "deliveries": 1,
    }
    [(name, data)] = stream.events(1)
    assert name == "message"
    assert data == {
        "topic": "sensors/k1/temp",
        "payload": "21.5",
        "payload_encoding": "utf8",
        "qos": 1,
        "retain": False,
    }
    stream.close()


def test_publish_base64_payload_and_binary_event(bridge: HTTPBridge) -> None:
    stream = subscribe(bridge, "bin")
    raw = bytes(range(256))
    resp = publish_json(
        bridge, {"topic": "bin", "payload": base64.b64encode(raw).decode(), "payload_encoding": "base64"}
    )
    assert resp.status == 200
    [(_, data)] = stream.events(1)
    assert data["payload_encoding"] == "base64"
    assert base64.b64decode(data["payload"]) == raw
    stream.close()


def test_publish_properties_are_forwarded_in_order(bridge: HTTPBridge, broker: Broker) -> None:
    stream = subscribe(bridge, "req")
    props = {
        "content_type": "application/json",
        "response_topic": "resp/1",
        "correlation_data": "abc",
        "payload_format_indicator": 1,
        "message_expiry_interval": 600,
        "user_properties": [["b", "2"], ["a", "1"], ["b", "3"]],
    }
    assert publish_json(bridge, {"topic": "req", "payload": "{}", "properties": props}).status == 200
    [(_, data)] = stream.events(1)
    got = data["properties"]
    assert got["user_properties"] == [["b", "2"], ["a", "1"], ["b", "3"]]  # order and duplicates kept
    assert got["content_type"] == "application/json"
    assert got["response_topic"] == "resp/1"
    assert got["correlation_data"] == "abc"
    assert got["payload_format_indicator"] == 1
    assert 0 < got["message_expiry_interval"] <= 600
    stream.close()


def test_user_properties_as_an_object(bridge: HTTPBridge, broker: Broker) -> None:
    resp = publish_json(
        bridge, {"topic": "t", "payload": "x", "retain": True, "properties": {"user_properties": {"k": "v"}}}
    )
    assert resp.status == 200
    stored = broker.retained.get("t")
    assert stored.properties[USER_PROPERTY] == [("k", "v")]


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ({"payload": "x"}, "topic is required"),
        ({"topic": "a/#"}, "invalid topic name"),
        ({"topic": "a/+/b"}, "invalid topic name"),
        ({"topic": ""}, "invalid topic name"),
        ({"topic": 5}, "topic must be a string"),
        ({"topic": "t", "payload_encoding": "hex"}, "payload_encoding"),
        ({"topic": "t", "payload": "***", "payload_encoding": "base64"}, "not valid base64"),
        ({"topic": "t", "payload": 5}, "payload must be a string"),
        ({"topic": "t", "qos": 3}, "qos must be 0, 1 or 2"),
        ({"topic": "t", "qos": "1"}, "qos must be 0, 1 or 2"),
        ({"topic": "t", "qos": True}, "qos must be 0, 1 or 2"),
        ({"topic": "t", "retain": "yes"}, "retain must be true or false"),
        ({"topic": "t", "extra": 1}, "unknown field 'extra'"),
        ({"topic": "t", "properties": {"topic_alias": 1}}, "unknown property"),
        ({"topic": "t", "properties": []}, "properties must be an object"),
        ({"topic": "t", "properties": {"response_topic": "r/#"}}, "response_topic"),
        ({"topic": "t", "properties": {"message_expiry_interval": -1}}, "message_expiry_interval"),
        ({"topic": "t", "properties": {"user_properties": [["a"]]}}, "user_properties"),
        ({"topic": "t", "properties": {"user_properties": {"a": 1}}}, "user_properties"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_publish_rejects_bad_requests_with_400(
    bridge: HTTPBridge, broker: Broker, doc: dict, fragment: str
) -> None:
    resp = publish_json(bridge, doc)
    assert resp.status == 400
    assert fragment in resp.json()["error"]
    assert broker.stats.publish_received == 0


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b"[1, 2]", b'"topic"', b""])
def test_publish_body_must_be_a_json_object(bridge: HTTPBridge, body: bytes) -> None:
    resp = wsgi_call(bridge, "POST", "/publish", body)
    assert resp.status == 400
    assert "JSON" in resp.json()["error"]


def test_publish_to_sys_is_forbidden(bridge: HTTPBridge) -> None:
    resp = publish_json(bridge, {"topic": "$SYS/broker/uptime", "payload": "0"})
    assert resp.status == 403
    assert "$SYS" in resp.json()["error"]


def test_body_over_the_limit_is_413(bridge: HTTPBridge, broker: Broker) -> None:
    doc = {"topic": "t", "payload": "x" * 2000}
    assert publish_json(bridge, doc).status == 413
    chunked = wsgi_call(bridge, "POST", "/publish", json.dumps(doc).encode(), chunked=True)
    assert chunked.status == 413
    assert "1024" in chunked.json()["error"]
    assert broker.stats.publish_received == 0


def test_payload_over_max_message_size_is_413(bridge: HTTPBridge) -> None:
    resp = publish_json(bridge, {"topic": "t", "payload": "x" * 600})
    assert resp.status == 413
    assert "max_message_size" in resp.json()["error"]


def test_qos_above_broker_maximum_is_400(broker: Broker) -> None:
    broker.settings.max_qos = 1
    bridge = HTTPBridge(broker)
    resp = publish_json(bridge, {"topic": "t", "qos": 2})
    assert resp.status == 400
    assert "maximum QoS 1" in resp.json()["error"]


def test_shutting_down_broker_answers_503(bridge: HTTPBridge, broker: Broker) -> None:
    broker.shutdown()
    assert publish_json(bridge, {"topic": "t"}).status == 503
    assert wsgi_call(bridge, "POST", "/topics/t", b"x").status == 503
    resp = wsgi_call(bridge, "GET", "/subscribe", query="filter=t")
    assert resp.status == 503
    assert resp.json() == {"error": "the broker is shutting down"}


def test_publish_needs_post(bridge: HTTPBridge) -> None:
    resp = wsgi_call(bridge, "GET", "/publish")
    assert resp.status == 405
    assert resp.headers["Allow"] == "POST"


# -- POST /topics/{topic} --------------------------------------------------------------------------


def test_raw_publish_with_query_options_is_retained(bridge: HTTPBridge, broker: Broker) -> None:
    stream = subscribe(bridge, "home/#")
    resp = wsgi_call(bridge, "POST", "/topics/home/kitchen/light", b"\xff\x01on", query="qos=2&retain=true")
    assert resp.status == 200
    assert resp.json()["retain"] is True and resp.json()["qos"] == 2
    [(_, data)] = stream.events(1)
    assert data["topic"] == "home/kitchen/light"
    assert base64.b64decode(data["payload"]) == b"\xff\x01on"
    assert data["qos"] == 2
    stored = broker.retained.get("home/kitchen/light")
    assert stored is not None and stored.payload == b"\xff\x01on"
    stream.close()


def test_raw_publish_topic_is_utf8_and_keeps_empty_levels(bridge: HTTPBridge, broker: Broker) -> None:
    assert wsgi_call(bridge, "POST", "/topics/caf\u00e9//x", b"1", query="retain=1").status == 200
    assert broker.retained.get("caf\u00e9//x").payload == b"1"


def test_raw_publish_empty_retained_body_clears_it(bridge: HTTPBridge, broker: Broker) -> None:
    """An empty retained payload removes the retained message [MQTT-3.3.1-10]."""
    wsgi_call(bridge, "POST", "/topics/r", b"keep", query="retain=true")
    assert broker.retained.get("r") is not None
    assert wsgi_call(bridge, "POST", "/topics/r", b"", query="retain=true").status == 200
    assert broker.retained.get("r") is None


@pytest.mark.parametrize(
    ("path", "query", "status"),
    [
        ("/topics/t", "qos=5", 400),
        ("/topics/t", "qos=x", 400),
        ("/topics/t", "retain=maybe", 400),
        ("/topics/t", "qos=1&qos=2", 400),
        ("/topics/t", "color=red", 400),
        ("/topics/", "", 400),
        ("/topics/a/#", "", 400),
        ("/topics/$SYS/x", "", 403),
    ],
)
def test_raw_publish_errors(bridge: HTTPBridge, path: str, query: str, status: int) -> None:
    resp = wsgi_call(bridge, "POST", path, b"x", query=query)
    assert resp.status == status
    assert isinstance(resp.json()["error"], str)


def test_raw_publish_needs_post(bridge: HTTPBridge) -> None:
    resp = wsgi_call(bridge, "PUT", "/topics/t", b"x")
    assert resp.status == 405
    assert resp.headers["Allow"] == "POST"


# -- GET /retained/{topic} -------------------------------------------------------------------------


def test_get_retained_message(bridge: HTTPBridge, broker: Broker) -> None:
    broker.publish(Message("dev/1/state", b"up", 1, True, {CONTENT_TYPE: "text/plain"}))
    resp = wsgi_call(bridge, "GET", "/retained/dev/1/state")
    assert resp.status == 200
    assert resp.json() == {
        "topic": "dev/1/state",
        "payload": "up",
        "payload_encoding": "utf8",
        "qos": 1,
        "retain": True,
        "properties": {"content_type": "text/plain"},
    }


def test_get_retained_missing_and_invalid(bridge: HTTPBridge) -> None:
    assert wsgi_call(bridge, "GET", "/retained/nothing/here").status == 404
    assert wsgi_call(bridge, "GET", "/retained/a/+").status == 400
    assert wsgi_call(bridge, "DELETE", "/retained/a").status == 405


def test_unknown_path_is_404(bridge: HTTPBridge) -> None:
    resp = wsgi_call(bridge, "GET", "/nope")
    assert resp.status == 404


# -- GET /subscribe (server-sent events) -----------------------------------------------------------


def test_subscribe_sends_retained_first_with_retain_set(bridge: HTTPBridge, broker: Broker) -> None:
    """Retained messages go to a new subscription with the retain flag set [MQTT-3.3.1-8];
    live ones without it [MQTT-3.3.1-9]."""
    broker.publish(Message("r/1", b"old", 0, True))
    stream = subscribe(bridge, "r/#")
    broker.publish(Message("r/1", b"new", 0, True))
    events = stream.events(2)
    assert [(d["payload"], d["retain"]) for _, d in events] == [("old", True), ("new", False)]
    stream.close()


def test_subscribe_several_filters_one_stream(bridge: HTTPBridge, broker: Broker) -> None:
    stream = subscribe(bridge, "a/#", "b/+")
    for topic in ("a/1", "c/1", "b/2", "b/2/3"):
        broker.publish(Message(topic, topic.encode()))
    broker.publish(Message("a/end", b""))
    assert [d["topic"] for _, d in stream.events(3)] == ["a/1", "b/2", "a/end"]
    stream.close()


def test_stream_is_a_session_and_cleanup_removes_it(bridge: HTTPBridge, broker: Broker) -> None:
    stream = subscribe(bridge, "x/#")
    assert stream.client_id.startswith(SSE_CLIENT_PREFIX)
    session = broker.sessions[stream.client_id]
    assert session.delivery is not None and list(session.subscriptions) == ["x/#"]
    assert broker.subscription_count() == 1 and broker.connected == 1
    stream.close()  # what the server does when the client went away (a write failed)
    assert stream.client_id not in broker.sessions
    assert broker.subscription_count() == 0 and broker.connected == 0
    assert bridge.streams == set()
    assert broker.publish(Message("x/1", b"")) == 0


def test_idle_stream_sends_heartbeats(bridge: HTTPBridge) -> None:
    stream = subscribe(bridge, "quiet")
    assert stream.next_chunk() == ": heartbeat\n\n"
    stream.close()


def test_slow_stream_drops_oldest_and_counts(broker: Broker) -> None:
    bridge = HTTPBridge(broker, BridgeSettings(sse_heartbeat=HEARTBEAT, sse_queue_size=3))
    stream = subscribe(bridge, "burst")
    for i in range(10):
        assert broker.publish(Message("burst", str(i).encode())) == 1  # never refused, never blocks
    assert broker.stats.drops == {"sse_queue_full": 7}
    assert bridge.queued() == 3
    assert [d["payload"] for _, d in stream.events(3)] == ["7", "8", "9"]
    assert bridge.queued() == 0
    stream.close()


def test_kick_closes_the_stream_with_a_close_event(bridge: HTTPBridge, broker: Broker) -> None:
    stream = subscribe(bridge, "k")
    assert broker.kick(stream.client_id)
    [(name, data)] = stream.events(1)
    assert name == "close"
    assert "administrator" in data["reason"]
    with pytest.raises(StopIteration):
        stream.next_chunk()
    stream.close()
    assert stream.client_id not in broker.sessions


def test_shutdown_closes_streams(bridge: HTTPBridge, broker: Broker) -> None:
    stream = subscribe(bridge, "s")
    broker.shutdown()
    [(name, data)] = stream.events(1)
    assert name == "close" and "shutting down" in data["reason"]
    stream.close()


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("", "at least one filter"),
        ("filter=a/%23/b", "invalid topic filter"),
        ("filter=ok&filter=bad%23", "invalid topic filter"),
        ("topic=a", "unknown parameter"),
        ("filter=%24queue/orders/%23", "durable queues are consumed over MQTT"),
    ],
)
def test_subscribe_errors_leave_no_session(
    bridge: HTTPBridge, broker: Broker, query: str, fragment: str
) -> None:
    resp = wsgi_call(bridge, "GET", "/subscribe", query=query)
    assert resp.status == 400
    assert fragment in resp.json()["error"]
    assert broker.sessions == {} and broker.subscription_count() == 0 and bridge.streams == set()


def test_subscribe_method_and_path(bridge: HTTPBridge) -> None:
    assert wsgi_call(bridge, "POST", "/subscribe", query="filter=a").status == 405
    assert wsgi_call(bridge, "GET", "/subscribe/x", query="filter=a").status == 404


def test_request_counts_by_endpoint_and_status(bridge: HTTPBridge) -> None:
    publish_json(bridge, {"topic": "t"})
    publish_json(bridge, {"topic": "t/#"})
    wsgi_call(bridge, "POST", "/topics/t", b"")
    assert bridge.requests == {("publish", 200): 1, ("publish", 400): 1, ("topics", 200): 1}


def test_reload_applies_bridge_keys_but_keeps_max_message_size(broker: Broker) -> None:
    from fluxmq.config import load_config

    bridge = HTTPBridge(broker, BridgeSettings(max_body_size=10, max_message_size=100))
    cfg = load_config(
        None, env={}, overrides=["server.http.plain.max_body_size=2KiB", "broker.max_message_size=5000"]
    )
    applied = bridge.reload(cfg)
    assert "server.http.plain.max_body_size" in applied and "broker.max_message_size" not in applied
    assert bridge.settings.max_body_size == 2048
    assert bridge.settings.max_message_size == 100


def test_publish_refused_with_503_when_the_store_is_full(tmp_path) -> None:
    """A retained QoS 1 message must be stored; a full LMDB store refuses it and the bridge says 503."""
    from fluxmq.storage.lmdb import LMDBStorage

    store = LMDBStorage(tmp_path / "data")
    broker = Broker(BrokerSettings(), storage=store)
    bridge = HTTPBridge(
        broker,
        BridgeSettings(max_body_size=1024, max_message_size=512, sse_heartbeat=HEARTBEAT, sse_queue_size=100),
    )
    try:
        store.refusing = True  # the state a StorageFull commit leaves the store in
        resp = publish_json(bridge, {"topic": "kept", "payload": "x", "qos": 1, "retain": True})
        assert resp.status == 503
        assert "storage full" in resp.json()["error"]
        assert broker.retained.get("kept") is None
    finally:
        store.close()


def test_subscribe_past_broker_max_sessions_is_503_not_a_crash() -> None:
    """An SSE stream is a broker session: past broker.max_sessions it is refused with a clear 503."""
    broker = Broker(BrokerSettings(max_sessions=1))
    bridge = HTTPBridge(
        broker,
        BridgeSettings(max_body_size=1024, max_message_size=512, sse_heartbeat=HEARTBEAT, sse_queue_size=100),
    )
    stream = subscribe(bridge, "a/#")
    resp = wsgi_call(bridge, "GET", "/subscribe", query="filter=b")
    assert resp.status == 503 and "max_sessions" in resp.json()["error"]
    assert len(broker.sessions) == 1
    stream.close()


def test_topic_cap_alone_leaves_authorization_headers_alone(bridge: HTTPBridge, broker: Broker) -> None:
    """A node with only the default limits.max_topic_levels has an AuthService, but nothing that
    reads user names: a request's Authorization header is ignored as on a node without one, and the
    cap still applies (400)."""
    from fluxmq.auth.limits import PublishLimits
    from fluxmq.auth.service import AuthService, AuthSettings

    broker.set_auth(AuthService(AuthSettings(limits=PublishLimits(max_topic_levels=128))))
    for header in ("Bearer some-token", "Basic not-base64!", "Basic " + base64.b64encode(b"u:p").decode()):
        resp = wsgi_call(
            bridge,
            "POST",
            "/publish",
            json.dumps({"topic": "a/b"}).encode(),
            headers={"Authorization": header},
        )
        assert resp.status == 200, (header, resp.json())
    over = publish_json(bridge, {"topic": "/" * 128})
    assert over.status == 400


def test_exposed_bridge_refuses_every_request_and_the_same_bridge_elsewhere_does_not(
    bridge: HTTPBridge, broker: Broker
) -> None:
    """``HTTPBridge.exposed()`` (a network listener with nothing to check user names, issue 17 item
    11): 401 with the Basic challenge and an error naming auth.allow_anonymous, with or without
    credentials, on every endpoint; the bridge as served on a loopback listener still answers."""
    exposed = bridge.exposed()
    basic = {"Authorization": "Basic " + base64.b64encode(b"mallory:x").decode()}
    for method, path, query, headers in (
        ("POST", "/publish", "", None),
        ("POST", "/publish", "", basic),
        ("POST", "/topics/a/b", "", None),
        ("GET", "/retained/a/b", "", None),
        ("GET", "/subscribe", "filter=a/%23", None),
    ):
        body = json.dumps({"topic": "a/b"}).encode() if path == "/publish" else b"x"
        resp = wsgi_call(exposed, method, path, body, query=query, headers=headers)
        assert resp.status == 401, (path, resp.status)
        assert resp.headers["WWW-Authenticate"].startswith("Basic")
        assert "auth.allow_anonymous" in resp.json()["error"]
    assert len(broker.sessions) == 0  # no SSE session was opened
    assert exposed.pool_size(10) == bridge.pool_size(10)
    assert publish_json(bridge, {"topic": "a/b"}).status == 200


# -- bounds (issue 17 item 10) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000, b'{"topic": "a", "properties": ' + b'{"a": ' * 50_000, b"[" * 100_000 + b"]" * 100_000],
)
def test_deeply_nested_json_is_400(broker: Broker, body: bytes) -> None:
    """The JSON parser recurses per nesting level: past the interpreter's limit that must be a 400."""
    bridge = HTTPBridge(broker, BridgeSettings(max_body_size=1 << 20))
    resp = wsgi_call(bridge, "POST", "/publish", body)
    assert resp.status == 400
    assert "nested" in resp.json()["error"]


def test_qos_in_other_digits_is_400(bridge: HTTPBridge) -> None:
    """``str.isdigit`` takes ``²`` (and other digits ``int`` refuses): that was a 500."""
    resp = wsgi_call(bridge, "POST", "/topics/a", b"x", query="qos=%C2%B2")
    assert resp.status == 400
    assert resp.json() == {"error": "qos must be 0, 1 or 2, got '\u00b2'"}


@pytest.mark.parametrize(
    "path, query", [("/subscribe", "filter=%FF"), ("/topics/a", "qos=1&retain=%FF"), ("/topics/a", "%FF=1")]
)
def test_a_query_string_not_utf8_is_400(bridge: HTTPBridge, path: str, query: str) -> None:
    """``%FF`` was decoded to U+FFFD: a stream subscribed to another filter than the one sent."""
    method = "GET" if path == "/subscribe" else "POST"
    resp = wsgi_call(bridge, method, path, b"x", query=query)
    assert resp.status == 400
    assert resp.json() == {"error": "the query string is not valid UTF-8"}
    assert not bridge.streams and not bridge.broker.sessions


@pytest.mark.parametrize(
    "properties",
    [
        b'{"content_type": "\\ud800"}',
        b'{"user_properties": {"k": "\\udfff"}}',
        b'{"user_properties": [["\\ud800x", "v"]]}',
    ],
)
def test_a_property_string_with_a_lone_surrogate_is_400(
    bridge: HTTPBridge, broker: Broker, properties: bytes
) -> None:
    """JSON's ``\\ud800`` escape is no UTF-8 text: it was a 500 after the message was retained,
    and every MQTT 5.0 subscriber it reached was disconnected by the PUBLISH its encoder refused."""
    body = b'{"topic": "sur/t", "retain": true, "payload": "x", "properties": ' + properties + b"}"
    resp = wsgi_call(bridge, "POST", "/publish", body)
    assert resp.status == 400
    assert "UTF-8 text" in resp.json()["error"]
    assert broker.retained.get("sur/t") is None


def test_a_settlement_whose_offset_is_not_ascii_digits_is_409(bridge: HTTPBridge, broker: Broker) -> None:
    """``message-id`` ``w:²``: the offset passed ``str.isdigit`` and failed ``int()``, a 500."""
    from fluxmq.queues import QueueManager
    from fluxmq.queues.config import QueueConfig

    broker.queues = QueueManager(broker.storage, [QueueConfig("w")])
    user = {"message-id": "w:\u00b2", "group-id": "g"}
    resp = publish_json(bridge, {"topic": "$queue/w/$ack", "qos": 1, "properties": {"user_properties": user}})
    assert resp.status == 409
    assert "settle" in resp.json()["error"]


def test_streams_past_max_streams_get_429_with_retry_after(broker: Broker) -> None:
    bridge = HTTPBridge(
        broker, BridgeSettings(sse_heartbeat=HEARTBEAT, max_streams=3, max_streams_per_user=100)
    )
    streams = [subscribe(bridge, "a", remote_addr=f"10.0.0.{i}") for i in range(3)]
    resp = wsgi_call(bridge, "GET", "/subscribe", query="filter=a", remote_addr="10.0.0.9")
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) > 0
    assert "server.http.plain.max_streams" in resp.json()["error"]
    assert len(broker.sessions) == 3 and len(bridge.streams) == 3
    assert publish_json(bridge, {"topic": "a", "payload": "still served"}).status == 200
    assert bridge.requests[("subscribe", 429)] == 1
    streams[0].close()  # a slot is free again
    subscribe(bridge, "a", remote_addr="10.0.0.9").close()
    for stream in streams[1:]:
        stream.close()
    assert bridge.streams == set() and bridge.stream_owners == {}


def test_streams_per_user_are_bounded_by_user_name_or_address(broker: Broker) -> None:
    bridge = HTTPBridge(
        broker, BridgeSettings(sse_heartbeat=HEARTBEAT, max_streams=100, max_streams_per_user=2)
    )
    mine = [subscribe(bridge, "a", remote_addr="10.0.0.1") for _ in range(2)]
    resp = wsgi_call(bridge, "GET", "/subscribe", query="filter=a", remote_addr="10.0.0.1")
    assert resp.status == 429 and "server.http.plain.max_streams_per_user" in resp.json()["error"]
    other = subscribe(bridge, "a", remote_addr="10.0.0.2")  # another address is another owner
    for stream in [*mine, other]:
        stream.close()
    assert bridge.stream_owners == {}


def test_refused_stream_releases_its_slot(broker: Broker) -> None:
    bridge = HTTPBridge(
        broker, BridgeSettings(sse_heartbeat=HEARTBEAT, max_streams=1, max_streams_per_user=1)
    )
    assert wsgi_call(bridge, "GET", "/subscribe", query="filter=" + quote("a/#/b", safe="")).status == 400
    subscribe(bridge, "a").close()  # the bad filter's slot did not stay taken


def test_bridge_pool_leaves_room_for_requests_beside_the_streams(broker: Broker) -> None:
    bridge = HTTPBridge(broker, BridgeSettings(max_streams=5000))
    assert bridge.pool_size(1000) >= 5000 + 1000


# -- compiled ACLs (issue 17 item 9) ---------------------------------------------------------------


def test_streams_refused_by_the_acl_leave_no_compiled_acl(broker: Broker, tmp_path) -> None:
    """Each stream is its own client id: a refused one must drop the ACL compiled for it."""
    from fluxmq.auth.service import AuthService, AuthSettings

    acl = tmp_path / "acl"
    acl.write_text("topic read open/#\n")
    auth = AuthService(AuthSettings(acl_file=str(acl), allow_anonymous=True))
    broker.set_auth(auth)
    bridge = HTTPBridge(broker, BridgeSettings(sse_heartbeat=HEARTBEAT))
    for _ in range(50):
        resp = wsgi_call(bridge, "GET", "/subscribe", query="filter=open%2F%23&filter=closed%2F%23")
        assert resp.status == 403
    assert len(auth._acls) == 0, f"{len(auth._acls)} compiled ACLs kept after 50 refused streams"
    stream = subscribe(bridge, "open/#")
    assert set(auth._acls) == {stream.client_id}
    stream.close()
    assert len(auth._acls) == 0


def test_streams_per_user_name_and_refusals_at_the_bound_leave_no_compiled_acl(
    broker: Broker, tmp_path
) -> None:
    from fluxmq.auth.password_file import hash_password
    from fluxmq.auth.service import AuthService, AuthSettings

    passwd = tmp_path / "passwd"
    passwd.write_text(f"alice:{hash_password('a-pw')}\nbob:{hash_password('b-pw')}\n")
    acl = tmp_path / "acl"
    acl.write_text("pattern read open/#\n")
    auth = AuthService(AuthSettings(password_file=str(passwd), acl_file=str(acl)))
    broker.set_auth(auth)
    bridge = HTTPBridge(
        broker, BridgeSettings(sse_heartbeat=HEARTBEAT, max_streams=10, max_streams_per_user=1)
    )

    def basic(user: str, password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    alice = Stream(
        wsgi_call(
            bridge,
            "GET",
            "/subscribe",
            query="filter=open%2Fx",
            headers=basic("alice", "a-pw"),
            remote_addr="10.0.0.1",
        )
    )
    for _ in range(20):  # alice from another address is still alice
        resp = wsgi_call(
            bridge,
            "GET",
            "/subscribe",
            query="filter=open%2Fx",
            headers=basic("alice", "a-pw"),
            remote_addr="10.0.0.2",
        )
        assert resp.status == 429 and "'alice'" in resp.json()["error"]
    bob = Stream(
        wsgi_call(
            bridge,
            "GET",
            "/subscribe",
            query="filter=open%2Fx",
            headers=basic("bob", "b-pw"),
            remote_addr="10.0.0.1",
        )
    )
    assert set(auth._acls) == {alice.client_id, bob.client_id}
    alice.close()
    bob.close()
    assert bridge.stream_owners == {} and len(auth._acls) == 0


def _committed_retained(store) -> list[bytes]:
    with store.env.begin() as txn:
        return [bytes(k) for k, _ in txn.cursor(store._dbs[6])]


@pytest.mark.parametrize("sync", ["none", "batch", "always"])
def test_publish_answers_only_after_the_message_is_committed(tmp_path, sync: str) -> None:
    """The 200 leaves after the commit holding the message (after its fsync under sync: always), as
    an MQTT PUBACK does. Before: the response was written before the loop turn's commit."""
    from fluxmq.protocol.flush import FlushScheduler
    from fluxmq.storage.lmdb import LMDBStorage

    store = LMDBStorage(tmp_path / "data", sync=sync)
    FlushScheduler(store)
    broker = Broker(BrokerSettings(), storage=store)
    bridge = HTTPBridge(
        broker,
        BridgeSettings(max_body_size=1024, max_message_size=512, sse_heartbeat=HEARTBEAT, sse_queue_size=100),
    )
    try:
        resp = publish_json(bridge, {"topic": "kept", "payload": "x", "qos": 1, "retain": True})
        assert resp.status == 200
        assert _committed_retained(store) == [b"kept"] and not store.has_pending
    finally:
        store.close()


def test_publish_answers_503_when_its_commit_fails(tmp_path) -> None:
    from fluxmq.protocol.flush import FlushScheduler
    from tests.storage.test_lmdb import FailingStorage

    store = FailingStorage(tmp_path / "data")
    FlushScheduler(store)
    broker = Broker(BrokerSettings(), storage=store)
    bridge = HTTPBridge(
        broker,
        BridgeSettings(max_body_size=1024, max_message_size=512, sse_heartbeat=HEARTBEAT, sse_queue_size=100),
    )
    try:
        store.fail = 1
        resp = publish_json(bridge, {"topic": "kept", "payload": "x", "qos": 1, "retain": True})
        assert resp.status == 503
        assert "not committed" in resp.json()["error"]
    finally:
        store.close()


def test_a_closed_stream_counts_its_qos0_drops_as_offline_not_too_large(broker: Broker) -> None:
    """A stream the broker closed but whose session is still attached takes nothing more: a QoS 0
    message for it is an offline drop, never ``packet_too_large`` (which would hide a real cause)."""
    from fluxmq.http.bridge import SSEStream

    stream = SSEStream("sse-closed", 10, broker)
    session, _ = broker.open_session(stream.client_id, True, 0, None, None)
    broker.attach(session, stream, 0)
    broker.subscribe(session, "closed/#", 0)
    stream.close(0x8B)
    broker.publish(Message("closed/x", b"late", 0))
    assert broker.stats.drops.get("packet_too_large", 0) == 0
    assert broker.stats.drops.get("offline_qos0") == 1
    assert not stream.queue


def test_publish_to_a_queue_appends_and_refusals_have_their_status(
    bridge: HTTPBridge, broker: Broker
) -> None:
    resp = publish_json(bridge, {"topic": "$queue/orders/1", "payload": "x", "qos": 1})
    assert resp.status == 404  # no queue manager on this broker: like auto_create off
    from fluxmq.queues import QueueManager
    from fluxmq.queues.config import LimitsConfig, QueueConfig

    broker.queues = QueueManager(broker.storage, [QueueConfig("orders", limits=LimitsConfig(max_depth=1))])
    resp = publish_json(bridge, {"topic": "$queue/orders/1", "payload": "x", "qos": 1})
    assert resp.status == 200 and resp.json()["deliveries"] == 1
    assert broker.queues.queues["orders"].log.count == 1
    resp = publish_json(bridge, {"topic": "$queue/orders/2", "payload": "y", "qos": 1})
    assert resp.status == 503 and "full" in resp.json()["error"]


def test_a_settlement_that_settles_nothing_is_409_never_200(tmp_path) -> None:
    """``$queue/{name}/$ack`` (``$nack``, ``$reject``) through the bridge: 200 when it settled the
    delivery, 409 with a reason when it settled nothing (settled already, an unknown offset or
    group), as an MQTT 5.0 PUBACK says 0x10 and never 0x00. Before: 200 either way, so a client
    could not tell its settlement had no effect (its record is delivered again)."""
    from fluxmq.protocol.flush import FlushScheduler
    from fluxmq.queues import QueueManager
    from fluxmq.queues.config import QueueConfig
    from fluxmq.storage.lmdb import LMDBStorage
    from tests.queues.test_group import end_of_turn, member, up

    store = LMDBStorage(tmp_path / "data", map_size=64 << 20)
    FlushScheduler(store)
    broker = Broker(BrokerSettings(), storage=store)
    broker.queues = QueueManager(store, [QueueConfig("w")])
    bridge = HTTPBridge(
        broker,
        BridgeSettings(max_body_size=1024, max_message_size=512, sse_heartbeat=HEARTBEAT, sse_queue_size=100),
    )
    try:
        _, consumer = member(broker, "c", "$queue/w/#", "g")
        assert publish_json(bridge, {"topic": "$queue/w", "payload": "job", "qos": 1}).status == 200
        end_of_turn()
        props = up(consumer.sent[-1][1])

        def settle(action: str, message_id: str, qos: int = 1) -> Response:
            user = {"message-id": message_id, "group-id": props["group-id"]}
            doc = {"topic": f"$queue/w/{action}", "qos": qos, "properties": {"user_properties": user}}
            return publish_json(bridge, doc)

        assert settle("$ack", props["message-id"]).status == 200
        again = settle("$ack", props["message-id"])
        assert again.status == 409 and "settle" in again.json()["error"]
        assert settle("$nack", "w:99").status == 409
        assert settle("$reject", "w:99", qos=0).status == 409
        raw = wsgi_call(bridge, "POST", "/topics/$queue/w/$ack", b"")
        assert raw.status == 409  # no message-id at all
        assert bridge.requests[("publish", 409)] >= 1
    finally:
        store.close()


def test_a_client_that_goes_away_ends_its_stream_at_once(broker: Broker) -> None:
    """A reader that closes its connection frees its stream, session, subscriptions and slot
    without a heartbeat write failing first (none here: ``sse_heartbeat`` 0, no message for it),
    as gunicorn's environ carries the connection (a real socket pair stands in for it)."""
    from gevent import socket as gsocket

    bridge = HTTPBridge(broker, BridgeSettings(sse_heartbeat=0))
    server_side, client_side = gsocket.socketpair()
    try:
        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": "/subscribe",
            "QUERY_STRING": "filter=gone/%23",
            "RAW_URI": "/subscribe?filter=gone/%23",
            "REMOTE_ADDR": "127.0.0.1",
            "wsgi.input": io.BytesIO(),
            "gunicorn.socket": server_side,
        }
        setup_testing_defaults(environ)
        stream = Stream(
            Response(200, {"Content-Type": "text/event-stream"}, bridge(environ, lambda *a: None))
        )
        assert broker.subscription_count() == 1 and len(bridge.streams) == 1
        client_side.close()
        assert stream.events(1, max_reads=2) == [("close", {"reason": "the client closed the stream"})]
        stream.close()
        assert broker.sessions == {} and broker.subscription_count() == 0
        assert bridge.streams == set() and bridge.stream_owners == {}
    finally:
        server_side.close()
