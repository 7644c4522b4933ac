"""The HTTP bridge of a real node: HTTP publishes reach MQTT subscribers, MQTT publishes reach SSE streams.

Clients are real: ``http.client`` for HTTP (the SSE stream is read line by line from a chunked
response) and paho-mqtt for MQTT. Every wait is bounded; nothing is timed.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes

from tests.certs import CertAuthority, Issued
from tests.conftest import NodeFactory, RunningNode, free_port
from tests.e2e.mqttraw import paho_connected, unique, wait_until

pytestmark = pytest.mark.e2e

WAIT = 10.0


def http_request(
    node: RunningNode,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    port: int | None = None,
) -> tuple[int, dict, Any]:
    """One request on a fresh connection -> (status, headers, decoded JSON body or raw bytes)."""
    conn = http.client.HTTPConnection(node.host, port or node.http_port, timeout=WAIT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        resp_headers = {k.lower(): v for k, v in resp.getheaders()}
        if resp_headers.get("content-type", "").startswith("application/json"):
            return resp.status, resp_headers, json.loads(data)
        return resp.status, resp_headers, data
    finally:
        conn.close()


def publish_json(node: RunningNode, doc: dict) -> tuple[int, Any]:
    status, _, body = http_request(
        node, "POST", "/publish", json.dumps(doc).encode(), {"Content-Type": "application/json"}
    )
    return status, body


class SSEReader:
    """A ``GET /subscribe`` stream read event by event (comment lines are heartbeats)."""

    def __init__(self, node: RunningNode, *filters: str, timeout: float = WAIT) -> None:
        self.conn = http.client.HTTPConnection(node.host, node.http_port, timeout=timeout)
        self.conn.request("GET", "/subscribe?" + urlencode([("filter", f) for f in filters]))
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200, self.resp.read()
        assert self.resp.getheader("Content-Type").startswith("text/event-stream")
        first = self.resp.readline().decode()
        assert first.startswith(": fluxmq stream "), first
        self.client_id = first.split()[3]
        self.heartbeats = 0

    def event(self) -> tuple[str, dict]:
        """The next event (name, JSON data); raises on timeout or end of stream."""
        fields: dict[str, str] = {}
        while True:
            line = self.resp.readline()
            if not line:
                raise EOFError("stream ended")
            text = line.decode().rstrip("\n")
            if not text:
                if "event" in fields:
                    return fields["event"], json.loads(fields["data"])
                continue
            if text.startswith(":"):
                self.heartbeats += text.startswith(": heartbeat")
                continue
            name, _, value = text.partition(": ")
            fields[name] = value

    def close(self) -> None:
        sock = self.conn.sock
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()


# -- HTTP -> MQTT ----------------------------------------------------------------------------------


def test_http_post_reaches_an_mqtt_subscriber(node: RunningNode) -> None:
    topic = f"bridge/{unique('in')}/temp"
    with paho_connected(node, unique("sub")) as sub:
        assert sub.subscribe(topic, 1) == [mqtt.ReasonCode(PacketTypes.SUBACK, identifier=1)]
        status, body = publish_json(node, {"topic": topic, "payload": "21.5", "qos": 1})
        assert status == 200 and body["deliveries"] == 1
        msg = sub.get(WAIT)
        assert (msg.topic, msg.payload, msg.qos, msg.retain) == (topic, b"21.5", 1, False)


def test_http_properties_reach_an_mqtt5_subscriber(node: RunningNode) -> None:
    topic = f"bridge/{unique('props')}"
    with paho_connected(node, unique("sub5"), protocol=mqtt.MQTTv5) as sub:
        sub.subscribe(topic, 0)
        status, _ = publish_json(
            node,
            {
                "topic": topic,
                "payload": base64.b64encode(b"\x00\xff").decode(),
                "payload_encoding": "base64",
                "properties": {
                    "content_type": "application/octet-stream",
                    "response_topic": "replies/1",
                    "user_properties": [["trace", "a1"], ["trace", "b2"]],
                },
            },
        )
        assert status == 200
        msg = sub.get(WAIT)
        assert msg.payload == b"\x00\xff"
        assert msg.properties.ContentType == "application/octet-stream"
        assert msg.properties.ResponseTopic == "replies/1"
        assert msg.properties.UserProperty == [("trace", "a1"), ("trace", "b2")]


def test_raw_topic_post_is_retained_for_later_subscribers(node: RunningNode) -> None:
    topic = f"bridge/{unique('raw')}/state"
    status, _, body = http_request(node, "POST", f"/topics/{quote(topic)}?qos=1&retain=true", b"\xfe\x01")
    assert status == 200 and body["retain"] is True
    status, _, stored = http_request(node, "GET", f"/retained/{quote(topic)}")
    assert status == 200
    assert stored == {
        "topic": topic,
        "payload": base64.b64encode(b"\xfe\x01").decode(),
        "payload_encoding": "base64",
        "qos": 1,
        "retain": True,
    }
    with paho_connected(node, unique("late")) as sub:
        sub.subscribe(topic, 1)
        msg = sub.get(WAIT)
        # a retained message goes to a new subscription with RETAIN set [MQTT-3.3.1-8]
        assert (msg.payload, msg.retain, msg.qos) == (b"\xfe\x01", True, 1)


# -- MQTT -> SSE -----------------------------------------------------------------------------------


def test_mqtt_publish_reaches_an_sse_stream(node: RunningNode) -> None:
    base = f"bridge/{unique('sse')}"
    stream = SSEReader(node, f"{base}/#")
    try:
        with paho_connected(node, unique("pub")) as pub:
            pub.publish(f"{base}/a", b"hello", qos=1)
            pub.publish(f"{base}/b", b"\x80\x81", qos=0)
        assert stream.event() == (
            "message",
            {"topic": f"{base}/a", "payload": "hello", "payload_encoding": "utf8", "qos": 1, "retain": False},
        )
        name, data = stream.event()
        assert name == "message" and base64.b64decode(data["payload"]) == b"\x80\x81"
    finally:
        stream.close()


def test_http_publish_reaches_an_sse_stream_and_an_mqtt_subscriber(node: RunningNode) -> None:
    topic = f"bridge/{unique('both')}"
    stream = SSEReader(node, topic)
    try:
        with paho_connected(node, unique("sub")) as sub:
            sub.subscribe(topic, 0)
            status, body = publish_json(node, {"topic": topic, "payload": "x"})
            assert status == 200 and body["deliveries"] == 2
            assert sub.get(WAIT).payload == b"x"
        assert stream.event()[1]["payload"] == "x"
    finally:
        stream.close()


def test_sse_session_is_removed_when_the_client_goes_away(node_factory: NodeFactory) -> None:
    n = node_factory({"server.http.plain.sse_heartbeat": "200ms"})
    stream = SSEReader(n, "gone/#")
    assert wait_until(lambda: n.http_get("/cluster/status")[1]["sessions"] == 1, WAIT)
    stream.close()
    # the next heartbeat write fails: the stream ends and its session and subscription go
    assert wait_until(lambda: n.http_get("/cluster/status")[1]["sessions"] == 0, WAIT), n.log_tail()
    with paho_connected(n, unique("pub")) as pub:
        pub.publish("gone/1", b"nobody", qos=1)
    assert n.stop() == 0


def test_idle_stream_gets_heartbeats(node_factory: NodeFactory) -> None:
    n = node_factory({"server.http.plain.sse_heartbeat": "100ms"})
    stream = SSEReader(n, "quiet")
    try:
        assert wait_until(lambda: stream.resp.readline().startswith(b": heartbeat"), WAIT)
    finally:
        stream.close()


def test_graceful_stop_ends_sse_streams(node_factory: NodeFactory) -> None:
    n = node_factory({"server.shutdown_timeout": "5s"})
    stream = SSEReader(n, "bye")
    assert n.stop() == 0, n.log_tail()
    name, data = stream.event()
    assert name == "close" and "shutting down" in data["reason"]
    with pytest.raises(EOFError):
        stream.event()
    stream.close()


# -- bounds (issue 17 item 10) ---------------------------------------------------------------------


def open_raw_streams(node: RunningNode, count: int, deadline: float) -> list[socket.socket]:
    """``count`` idle ``GET /subscribe`` requests on raw sockets (their answers are not read here)."""
    socks = []
    request = b"GET /subscribe?filter=idle%2F%23 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        sock = socket.create_connection((node.host, node.http_port), timeout=WAIT)
        sock.sendall(request)
        socks.append(sock)
    return socks


def status_of(sock: socket.socket) -> int:
    line = sock.makefile("rb").readline()
    return int(line.split()[1])


def test_idle_streams_cannot_exhaust_the_bridge(node_factory: NodeFactory) -> None:
    """1,000 idle SSE streams from one address took every greenlet of the bridge's pool: publishes
    then waited forever. Now the address's streams stop at max_streams_per_user (429) and a publish
    is still served."""
    n = node_factory()
    socks = open_raw_streams(n, 1000, time.monotonic() + 60)
    try:
        assert len(socks) == 1000
        status, body = publish_json(n, {"topic": "still/served", "payload": "x"})
        assert status == 200, body
        statuses = [status_of(s) for s in socks]
        assert statuses.count(200) == 100 and statuses.count(429) == 900  # the default per-user bound
    finally:
        for sock in socks:
            sock.close()


def test_publishes_are_served_with_every_stream_slot_taken(node_factory: NodeFactory) -> None:
    """The bridge's greenlet pool is max_streams + worker_connections: 1,000 streams at the bound
    leave room for requests."""
    n = node_factory({"server.http.plain.max_streams_per_user": 1000})
    socks = open_raw_streams(n, 1000, time.monotonic() + 60)
    try:
        assert len(socks) == 1000 and all(status_of(s) == 200 for s in socks)
        status, headers, _ = http_request(n, "GET", "/subscribe?filter=x")
        assert status == 429 and headers["retry-after"]
        status, body = publish_json(n, {"topic": "idle/all", "payload": "x"})
        assert status == 200 and body["deliveries"] == 1000, body
    finally:
        for sock in socks:
            sock.close()


def test_streams_past_the_total_bound_get_429_and_publishes_are_served(node_factory: NodeFactory) -> None:
    n = node_factory(
        {
            "server.http.plain.max_streams": 20,
            "server.http.plain.max_streams_per_user": 1000,
            "server.http.plain.sse_heartbeat": "200ms",
        }
    )
    socks = open_raw_streams(n, 25, time.monotonic() + 30)
    try:
        statuses = [status_of(s) for s in socks]
        assert statuses.count(200) == 20 and statuses.count(429) == 5
        status, headers, body = http_request(n, "GET", "/subscribe?filter=x")
        assert status == 429 and int(headers["retry-after"]) > 0 and "max_streams" in body["error"]
        status, body = publish_json(n, {"topic": "idle/1", "payload": "x"})
        assert status == 200 and body["deliveries"] == 20
    finally:
        for sock in socks:
            sock.close()

    # a gone client's stream ends at its next heartbeat and frees its slot
    def accepted() -> bool:
        (sock,) = open_raw_streams(n, 1, time.monotonic() + WAIT)
        with sock:
            return status_of(sock) == 200

    assert wait_until(accepted, WAIT), n.log_tail()


def test_deeply_nested_json_is_400(node: RunningNode) -> None:
    status, _, body = http_request(
        node, "POST", "/publish", b"[" * 100_000, {"Content-Type": "application/json"}
    )
    assert status == 400 and "nested" in body["error"]


# -- errors ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_body_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """A node whose bridge takes bodies of at most 1 KiB."""
    factory = NodeFactory(tmp_path_factory.mktemp("small-body"))
    try:
        yield factory({"server.http.plain.max_body_size": "1KiB"})
    finally:
        factory.close()


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/publish", b"{bad json", 400),
        ("POST", "/publish", b'{"topic": "a/#"}', 400),
        ("POST", "/publish", b'{"topic": "t", "payload": "x", "payload_encoding": "rot13"}', 400),
        ("POST", "/publish", b'{"topic": "t", "qos": 7}', 400),
        ("POST", "/publish", b'{"topic": "$SYS/x"}', 403),
        ("POST", "/publish", b'{"topic": "t", "payload": "' + b"x" * 2048 + b'"}', 413),
        ("POST", "/topics/t", b"x" * 1025, 413),
        ("POST", "/topics/t?qos=9", b"x", 400),
        ("GET", "/publish", None, 405),
        ("GET", "/retained/never/set", None, 404),
        ("GET", "/subscribe", None, 400),
        ("GET", "/nothing", None, 404),
    ],
)
def test_errors_are_json_with_a_message(
    small_body_node: RunningNode, method: str, path: str, body: bytes | None, status: int
) -> None:
    got, headers, payload = http_request(small_body_node, method, path, body)
    assert got == status
    assert headers["content-type"] == "application/json"
    assert isinstance(payload["error"], str) and payload["error"]


REFUSED_BY_THE_PARSER = {
    "path-not-utf8": (b"GET /retained/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # not percent-encoded
    "request-line-too-long": (b"GET /retained/" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    "negative-length": (b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400),
    "header-too-long": (b"GET /health HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
    "bad-chunk-size": (
        b"POST /publish HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
        400,
    ),
}
LISTENERS = ("http_port", "health_port", "admin_port")


@pytest.mark.parametrize(
    ("listener", "case"),
    [
        (port, case)
        for case in REFUSED_BY_THE_PARSER
        # a chunk's size is parsed when the app reads the body, as the bridge's /publish does
        for port in (LISTENERS[:1] if case == "bad-chunk-size" else LISTENERS)
    ],
)
def test_requests_the_http_parser_refuses_get_a_json_error(
    small_body_node: RunningNode, listener: str, case: str
) -> None:
    """Refused before any app sees them: gunicorn answered with an HTML page, now a JSON error
    naming the problem like every other error of the node's HTTP listeners."""
    request_bytes, status = REFUSED_BY_THE_PARSER[case]
    with socket.create_connection((small_body_node.host, getattr(small_body_node, listener)), WAIT) as sock:
        sock.sendall(request_bytes)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].split()[1] == str(status), data[:500]
    assert "Content-Type: application/json" in lines
    error = json.loads(body)["error"]
    assert isinstance(error, str) and 0 < len(error) <= 203


def test_keep_alive_serves_several_requests_on_one_connection(node: RunningNode) -> None:
    conn = http.client.HTTPConnection(node.host, node.http_port, timeout=WAIT)
    try:
        for i in range(3):
            conn.request("POST", f"/topics/bridge/ka/{i}", body=b"x")
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["topic"] == f"bridge/ka/{i}"
    finally:
        conn.close()


def test_head_answers_as_get_without_a_body_and_holds_no_stream(node: RunningNode) -> None:
    """Through gunicorn, on one keep-alive connection per listener: each HEAD gets the GET's status
    and headers and no body (else the next response would not parse), and a HEAD on /subscribe
    holds no stream open (else the next request would wait)."""
    topic = unique("bridge/head")
    assert http_request(node, "POST", f"/topics/{topic}?retain=true", b"kept")[0] == 200
    for port, requests in (
        (node.http_port, [f"/subscribe?filter={topic}", f"/retained/{topic}", "/retained/none", "/publish"]),
        (node.health_port, ["/health", "/metrics", "/nothing"]),
    ):
        conn = http.client.HTTPConnection(node.host, port, timeout=WAIT)
        try:
            for path in requests:
                conn.request("HEAD", path)
                head = conn.getresponse()
                assert head.read() == b""
                if path.startswith("/subscribe"):
                    assert head.status == 200
                    assert head.getheader("Content-Type") == "text/event-stream; charset=utf-8"
                    continue
                conn.request("GET", path)
                get = conn.getresponse()
                body = get.read()
                assert head.status == get.status, path
                assert head.getheader("Content-Type") == get.getheader("Content-Type"), path
                if path != "/metrics":  # (two scrapes differ in their figures)
                    assert (
                        head.getheader("Content-Length") == get.getheader("Content-Length") == str(len(body))
                    )
                if path == "/publish":
                    assert head.status == 405 and head.getheader("Allow") == "POST"
        finally:
            conn.close()


def test_bridge_can_be_turned_off(node_factory: NodeFactory) -> None:
    n = node_factory({"server.http.plain.addr": ""})
    assert n.http_port is None
    listening = next(line for line in n.log_text().splitlines() if "Listening at:" in line)
    urls = listening.split("Listening at: ")[1].split()[0].rstrip('"').split(",")
    assert sorted(urls) == sorted([f"http://{n.host}:{n.health_port}", f"http://{n.host}:{n.admin_port}"])
    with paho_connected(n, unique("still")) as client:
        assert client.is_connected
    assert n.stop() == 0


# -- HTTPS -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def https_node(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RunningNode, CertAuthority, Issued]]:
    """A node with the bridge on plain HTTP, TLS and mTLS, and the test CA with a client certificate."""
    ca = CertAuthority(tmp_path_factory.mktemp("pki"))
    server = ca.issue_server("localhost")
    factory = NodeFactory(tmp_path_factory.mktemp("https"))
    overrides: dict[str, Any] = {}
    for mode in ("tls", "mtls"):
        overrides.update(
            {
                f"server.http.{mode}.addr": f"127.0.0.1:{free_port()}",
                f"server.http.{mode}.cert_file": server.cert_file,
                f"server.http.{mode}.key_file": server.key_file,
            }
        )
    overrides["server.http.mtls.ca_file"] = ca.cert_file
    try:
        yield factory(overrides), ca, ca.issue_client("http-device")
    finally:
        factory.close()


def https_post(
    node: RunningNode, mode: str, path: str, body: bytes, ca: CertAuthority, cert: Issued | None = None
) -> tuple[int, Any]:
    port = int(node.config["server"]["http"][mode]["addr"].rpartition(":")[2])
    ctx = ssl.create_default_context(cafile=ca.cert_file)
    if cert is not None:
        ctx.load_cert_chain(cert.cert_file, cert.key_file)
    conn = http.client.HTTPSConnection(node.host, port, timeout=WAIT, context=ctx)
    try:
        conn.request("POST", path, body=body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_https_publish_reaches_an_mqtt_subscriber(https_node) -> None:
    n, ca, _ = https_node
    topic = f"bridge/{unique('tls')}"
    with paho_connected(n, unique("sub")) as sub:
        sub.subscribe(topic, 1)
        status, body = https_post(
            n, "tls", "/publish", json.dumps({"topic": topic, "payload": "sealed", "qos": 1}).encode(), ca
        )
        assert status == 200 and body["deliveries"] == 1
        assert sub.get(WAIT).payload == b"sealed"
    # the plain listener is still there, and serves the same broker
    assert http_request(n, "POST", f"/topics/{topic}", b"plain")[0] == 200


def test_plain_http_on_the_tls_port_is_refused(https_node) -> None:
    n, _, _ = https_node
    port = int(n.config["server"]["http"]["tls"]["addr"].rpartition(":")[2])
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        http_request(n, "POST", "/topics/x", b"x", port=port)
    assert wait_until(lambda: "tls_handshake_failed" in n.log_text(), WAIT)


def test_mtls_bridge_needs_a_client_certificate(https_node) -> None:
    n, ca, client = https_node
    status, body = https_post(n, "mtls", "/topics/bridge/mtls", b"signed", ca, client)
    assert (status, body["topic"]) == (200, "bridge/mtls")
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        https_post(n, "mtls", "/topics/bridge/mtls", b"anonymous", ca)


def test_https_without_a_certificate_refuses_to_start(node_factory: NodeFactory) -> None:
    n = node_factory({"server.http.tls.addr": f"127.0.0.1:{free_port()}"}, wait_ready=False)
    assert n.wait(30) == 2
    lines = n.log_text().splitlines()
    assert len(lines) == 1 and "server.http.tls.cert_file" in lines[0], lines
