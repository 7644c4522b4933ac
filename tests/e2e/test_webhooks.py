"""Webhooks from a real node to a real HTTP receiver (a WSGI app on wsgiref in a thread of the test):
every event type arrives with every field filled and a signature that verifies; a dead endpoint is
counted (failed, retried, dropped, breaker open) on /metrics while MQTT traffic goes on; the queue
drains when the node stops."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socket
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fluxmq._core import codec as c
from fluxmq.auth.password_file import hash_password
from tests.conftest import NodeFactory
from tests.e2e.mqttraw import RawClient, unique, wait_until
from tests.webhook.receiver import ThreadReceiver

pytestmark = pytest.mark.e2e

SECRET = "wh-secret"

ACL = """\
user alice
topic readwrite wh/#
user bob
topic readwrite wh/#
"""

# Every event type and the fields its data must carry (none of them null in this scenario).
FIELDS = {
    "client.connected": {
        "client_id",
        "username",
        "peer",
        "protocol_version",
        "clean_start",
        "keepalive",
        "session_present",
        "session_expiry",
        "listener",
    },
    "client.disconnected": {
        "client_id",
        "username",
        "peer",
        "protocol_version",
        "reason",
        "will_published",
        "connected_seconds",
    },
    "client.session_takeover": {"client_id", "username", "previous_username", "session_resumed"},
    "message.published": {
        "client_id",
        "username",
        "topic",
        "qos",
        "retain",
        "payload_size",
        "deliveries",
        "payload",
    },
    "message.delivered": {"client_id", "username", "publisher", "topic", "qos", "retain", "payload_size"},
    "message.retained": {"client_id", "topic", "qos", "payload_size", "cleared"},
    "subscription.created": {
        "client_id",
        "username",
        "filter",
        "qos",
        "requested_qos",
        "no_local",
        "retain_as_published",
        "retain_handling",
        "subscription_id",
        "share_group",
        "replaced",
    },
    "subscription.removed": {"client_id", "username", "filter"},
    "auth.success": {"client_id", "username", "peer", "protocol_version", "method"},
    "auth.failure": {"client_id", "username", "peer", "protocol_version", "method", "reason", "reason_code"},
    "authz.publish_denied": {"client_id", "username", "peer", "topic", "qos", "retain", "reason_code"},
    "authz.subscribe_denied": {"client_id", "username", "peer", "filter", "qos", "reason_code"},
}


@pytest.fixture
def receiver() -> Iterator[ThreadReceiver]:
    r = ThreadReceiver()
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def auth_files(tmp_path: Path) -> tuple[Path, Path]:
    pw = tmp_path / "passwd"
    pw.write_text("".join(f"{u}:{hash_password(u + '-pw')}\n" for u in ("alice", "bob")))
    acl = tmp_path / "acl"
    acl.write_text(ACL)
    return pw, acl


def webhook_yaml(url: str, extra: str = "", endpoint_extra: str = "") -> str:
    secret_file = Path(tempfile.mkdtemp(prefix="webhook-")) / "key"
    secret_file.write_text(SECRET + "\n")
    return f"""
webhook:
  enabled: true
  include_payload: true
  workers: 2
{extra}
  endpoints:
    - name: rx
      url: "{url}"
      events: ["*"]
      secret_file: "{secret_file}"
{endpoint_extra}
"""


def login(node, user: str, client_id: str, version: int = 5, password: str | None = None) -> RawClient:
    raw = RawClient.to(node, version)
    raw.connect(client_id, username=user, password=(password or user + "-pw").encode())
    return raw


def test_every_event_type_arrives_with_every_field(
    node_factory: NodeFactory, receiver: ThreadReceiver, auth_files
) -> None:
    pw, acl = auth_files
    node = node_factory(
        {
            "auth.password_file": str(pw),
            "auth.acl_file": str(acl),
            "storage.type": "memory",
            "broker.sys_interval": "0s",
        },
        webhook_yaml(receiver.url),
    )
    alice_id, bob_id = unique("alice"), unique("bob")
    bad = RawClient.to(node, 5)
    assert bad.connect(unique("mallory"), username="alice", password=b"wrong").reason_code == 0x86
    bad.close()
    alice = login(node, "alice", alice_id)
    assert alice.subscribe(1, ("wh/#", 1)).reason_codes == [1]
    assert alice.subscribe(2, ("secret/#", 0)).reason_codes == [0x87]
    bob = login(node, "bob", bob_id, version=4)
    bob.publish_qos1("wh/a", b"\x00hi", 1, retain=True)
    got = alice.wait_for(lambda p: isinstance(p, c.Publish) and p.topic == "wh/a")
    alice.ack(got)
    bob.publish_qos1("secret/x", b"no", 2)  # 3.1.1: acknowledged and dropped by the ACL
    alice.send(c.Unsubscribe(3, ["wh/#"]))
    alice.wait_for(lambda p: isinstance(p, c.Unsuback))
    again = login(node, "alice", alice_id)  # takes the session over; the first connection is closed
    alice.wait_closed()
    bob.disconnect()
    again.disconnect()
    bob_empty = login(node, "bob", unique("bob"), version=4)
    bob_empty.publish_qos1("wh/a", b"", 3, retain=True)  # clears the retained message
    bob_empty.disconnect()

    def seen() -> set[str]:
        return {e["event_type"] for e in receiver.events()}

    assert wait_until(
        lambda: (
            set(FIELDS) <= seen()
            and sum(1 for e in receiver.events() if e["event_type"] == "message.retained") == 2
        ),
        timeout=15,
    ), sorted(set(FIELDS) - seen())
    events = receiver.events()
    for event in events:
        assert set(event) == {"event_type", "event_id", "timestamp", "broker_id", "data"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["timestamp"])
        assert event["broker_id"]
    by_type: dict[str, list[dict]] = {}
    for event in events:
        by_type.setdefault(event["event_type"], []).append(event["data"])
    for event_type, fields in FIELDS.items():
        data = next(
            d
            for d in by_type[event_type]
            if d.get("client_id") in (alice_id, bob_id) or event_type in ("auth.failure",)
        )
        assert set(data) == fields, event_type
        if event_type == "client.session_takeover":
            data = {**data, "share_group": None}
        missing = sorted(k for k, v in data.items() if v is None and k != "share_group")
        assert not missing, (event_type, missing)

    def one(event_type: str, **match) -> dict:
        found = [d for d in by_type[event_type] if all(d.get(k) == v for k, v in match.items())]
        assert found, (event_type, match, by_type[event_type])
        return found[0]

    assert one("auth.failure", username="alice")["reason_code"] == 0x86
    assert one("auth.success", client_id=alice_id)["method"] == "password"
    conn = one("client.connected", client_id=bob_id)
    assert conn["protocol_version"] == "3.1.1" and conn["username"] == "bob" and conn["listener"] == "tcp"
    assert conn["peer"].startswith("127.0.0.1:")
    assert one("subscription.created", client_id=alice_id, filter="wh/#")["qos"] == 1
    assert one("authz.subscribe_denied", client_id=alice_id)["filter"] == "secret/#"
    published = one("message.published", client_id=bob_id, topic="wh/a", payload_size=3)
    assert published["payload"] == "AGhp" and published["username"] == "bob" and published["deliveries"] == 1
    assert published["retain"] is True and published["qos"] == 1
    delivered = one("message.delivered", client_id=alice_id, topic="wh/a")
    assert delivered["publisher"] == bob_id and delivered["username"] == "alice" and delivered["qos"] == 1
    assert one("message.retained", topic="wh/a", cleared=False)["payload_size"] == 3
    assert one("message.retained", topic="wh/a", cleared=True)["payload_size"] == 0
    assert one("authz.publish_denied", client_id=bob_id)["topic"] == "secret/x"
    assert one("subscription.removed", client_id=alice_id)["filter"] == "wh/#"
    takeover = one("client.session_takeover", client_id=alice_id)
    assert takeover["previous_username"] == "alice" and takeover["session_resumed"] is False
    assert one("client.disconnected", client_id=alice_id, reason="session_taken_over")["username"] == "alice"
    assert one("client.disconnected", client_id=bob_id)["reason"] == "client_disconnect"
    # Every request carries a signature that verifies over its exact body.
    for _t, headers, body in receiver.requests:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Fluxmq-Signature"], expected)
        assert headers["X-Fluxmq-Event"] == json.loads(body)["event_type"]
    status, _ = node.http_get("/ready")
    assert status == 200


def scrape(node) -> str:
    with urllib.request.urlopen(f"http://{node.host}:{node.health_port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{want}}} not in /metrics")


def test_a_dead_endpoint_is_counted_and_mqtt_goes_on(node_factory: NodeFactory) -> None:
    """An endpoint that takes the connections and never answers holds both workers: the queue fills
    and overflows (counted) while every MQTT message is delivered. Then it goes away (its
    connections reset, every new one refused): the requests fail, are retried, fail, and the
    breaker opens, dropping what was queued (counted).

    Each step waits on what the node did, not on time: the endpoint holds its requests until the
    test closes it (the timeout, 60 s, is never reached). Before, with a refusing endpoint from the
    start, the breaker opened on the first connects' events when the machine was loaded, before the
    flood, and the queue never overflowed."""
    held = socket.socket()  # listens, never accepts: the kernel takes the connections, nobody answers
    held.bind(("127.0.0.1", 0))
    held.listen(64)
    dead = f"http://127.0.0.1:{held.getsockname()[1]}/hook"
    extra = (
        "  queue_size: 5\n  defaults:\n    timeout: 60s\n"
        "    retry: {max_attempts: 2, initial_interval: 10ms}\n"
        "    circuit_breaker: {failure_threshold: 3, reset_timeout: 1h}\n"
    )
    try:
        node = node_factory(
            {"storage.type": "memory", "broker.sys_interval": "0s"}, webhook_yaml(dead, extra)
        )
        sub = RawClient.to(node, 4)
        sub.connect(unique("sub"))
        sub.subscribe(1, ("dead/#", 0))
        pub = RawClient.to(node, 4)
        pub.connect(unique("pub"))
        for i in range(200):
            pub.publish("dead/t", str(i).encode(), 0)
        pub.publish_qos1("dead/end", b"end", 1)
        got, _ = sub.collect_until(lambda p: isinstance(p, c.Publish) and p.topic == "dead/end")
        assert len([p for p in got if isinstance(p, c.Publish)]) == 200  # every message delivered meanwhile
        sub.close()
        pub.close()
        text = ""

        def overflowed() -> bool:
            nonlocal text
            text = scrape(node)
            return metric(text, "fluxmq_webhook_dropped_total", endpoint="rx", reason="queue_full") > 0

        assert wait_until(overflowed, timeout=15), text
        assert metric(text, "fluxmq_webhook_breaker_state", endpoint="rx") == 0  # nothing failed yet
        assert metric(text, "fluxmq_webhook_failed_total", endpoint="rx") == 0
    finally:
        held.close()  # the endpoint goes away: its connections are reset, new ones refused

    def opened() -> bool:
        nonlocal text
        text = scrape(node)
        return metric(text, "fluxmq_webhook_breaker_state", endpoint="rx") == 2

    assert wait_until(opened, timeout=15), text
    # the queued events' turns come: each is dropped, the breaker being open
    assert wait_until(lambda: metric(scrape(node), "fluxmq_webhook_queue_events") == 0, timeout=15)
    text = scrape(node)
    assert metric(text, "fluxmq_webhook_failed_total", endpoint="rx") >= 1
    assert metric(text, "fluxmq_webhook_retried_total", endpoint="rx") >= 1
    assert metric(text, "fluxmq_webhook_dropped_total", endpoint="rx", reason="breaker_open") >= 1
    assert metric(text, "fluxmq_webhook_sent_total", endpoint="rx") == 0
    assert metric(text, "fluxmq_webhook_breaker_opened_total", endpoint="rx") == 1


def test_the_queue_drains_when_the_node_stops(node_factory: NodeFactory, receiver: ThreadReceiver) -> None:
    yaml = webhook_yaml(receiver.url, "  shutdown_timeout: 10s\n")
    node = node_factory(
        {"storage.type": "memory", "broker.sys_interval": "0s", "server.shutdown_timeout": "15s"}, yaml
    )
    ids = [unique("drain") for _ in range(20)]
    clients = []
    for cid in ids:
        raw = RawClient.to(node, 4)
        raw.connect(cid)
        clients.append(raw)
    assert node.stop() == 0
    gone = {
        e["data"]["client_id"]: e["data"]["reason"]
        for e in receiver.events()
        if e["event_type"] == "client.disconnected"
    }
    assert set(ids) <= set(gone)  # the shutdown's own disconnects were sent before the node exited
    assert {gone[cid] for cid in ids} == {"server_shutdown"}
    for raw in clients:
        raw.close()
