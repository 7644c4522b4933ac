"""WebhookDispatcher against a real local HTTP server (gevent.pywsgi in the test's hub): retries
with backoff on 500s, the circuit breaker opening and closing, queue overflow counted by drop
policy, HMAC signatures that verify, and the drain on shutdown."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator

import gevent
import pytest

from fluxmq.broker.broker import Broker
from fluxmq.broker.message import Message
from fluxmq.webhook import EndpointSettings, RetryPolicy, WebhookDispatcher, WebhookSettings
from fluxmq.webhook.endpoint import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, signature
from tests.webhook.receiver import GeventReceiver

ALL = frozenset({"client.connected", "message.published", "subscription.created"})


@pytest.fixture
def receiver() -> Iterator[GeventReceiver]:
    r = GeventReceiver()
    try:
        yield r
    finally:
        r.close()


def dispatcher(url: str, start: bool = True, **kwargs) -> WebhookDispatcher:
    endpoint = dict(
        name="rx",
        url=url,
        events=ALL,
        timeout=2.0,
        retry=RetryPolicy(1, 0.01, 0.01, 1.0),
        failure_threshold=100,
        reset_timeout=60.0,
    )
    endpoint.update(kwargs.pop("endpoint", {}))
    d = WebhookDispatcher(WebhookSettings((EndpointSettings(**endpoint),), **kwargs), "node-a")
    if start:
        d.start()
    else:
        d.accepting = True  # queue without workers: nothing is taken out
    return d


def connected(d: WebhookDispatcher, client_id: str) -> None:
    d.client_connected(client_id, "alice", "127.0.0.1:5000", 4, True, 60, False, 0, "tcp")


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        gevent.sleep(0.01)


def test_an_event_arrives_with_its_envelope(receiver: GeventReceiver) -> None:
    d = dispatcher(receiver.url)
    try:
        connected(d, "c1")
        wait_for(lambda: receiver.requests)
        (event,) = receiver.events()
        assert set(event) == {"event_type", "event_id", "timestamp", "broker_id", "data"}
        assert event["event_type"] == "client.connected"
        assert event["broker_id"] == "node-a"
        assert event["timestamp"].endswith("Z") and len(event["event_id"]) == 32
        assert event["data"]["client_id"] == "c1" and event["data"]["protocol_version"] == "3.1.1"
        headers = receiver.requests[0][1]
        assert headers["X-Fluxmq-Event"] == "client.connected"
        assert headers["Content-Type"] == "application/json"
        assert d.endpoints[0].sent == 1
    finally:
        d.stop(1.0)


def test_retries_with_exponential_backoff_on_500(receiver: GeventReceiver) -> None:
    receiver.statuses = [500, 500, 500, 200]
    d = dispatcher(receiver.url, endpoint={"retry": RetryPolicy(4, 0.05, 1.0, 2.0)})
    try:
        connected(d, "c1")
        wait_for(lambda: d.endpoints[0].sent == 1)
        times = [t for t, _h, _b in receiver.requests]
        assert len(times) == 4
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        # The pauses are at least 0.05, 0.1, 0.2 s (each the previous one times the multiplier).
        for gap, pause in zip(gaps, (0.05, 0.1, 0.2), strict=True):
            assert gap >= pause * 0.95
        ids = {json.loads(body)["event_id"] for _t, _h, body in receiver.requests}
        assert len(ids) == 1  # the same event, attempted again
        ep = d.endpoints[0]
        assert (ep.sent, ep.retried, ep.failed) == (1, 3, 0)
    finally:
        d.stop(1.0)


def test_gives_up_after_max_attempts(receiver: GeventReceiver) -> None:
    receiver.statuses = [503]
    d = dispatcher(receiver.url, endpoint={"retry": RetryPolicy(3, 0.01, 0.01, 1.0)})
    try:
        connected(d, "c1")
        wait_for(lambda: d.endpoints[0].failed == 1)
        assert len(receiver.requests) == 3
        assert (d.endpoints[0].sent, d.endpoints[0].retried) == (0, 2)
    finally:
        d.stop(1.0)


def test_breaker_opens_then_closes_after_a_good_trial(receiver: GeventReceiver) -> None:
    receiver.statuses = [500]
    d = dispatcher(receiver.url, workers=1, endpoint={"failure_threshold": 2, "reset_timeout": 0.3})
    ep = d.endpoints[0]
    try:
        connected(d, "c1")
        connected(d, "c2")
        wait_for(lambda: ep.failed == 2)
        assert ep.breaker.state == OPEN and ep.breaker.opened == 1
        # While open, the endpoint gets no events at all: nothing is queued, no request is made.
        connected(d, "c3")
        assert not d.queue
        gevent.sleep(0.05)
        assert len(receiver.requests) == 2
        # After reset_timeout one trial goes; it succeeds and closes the breaker.
        receiver.statuses = [200]
        gevent.sleep(0.35)
        connected(d, "c4")
        wait_for(lambda: ep.sent == 1)
        assert ep.breaker.state == CLOSED
        assert receiver.events()[-1]["data"]["client_id"] == "c4"
        connected(d, "c5")
        wait_for(lambda: ep.sent == 2)
    finally:
        d.stop(1.0)


def test_an_open_breaker_turns_the_per_message_hooks_off(receiver: GeventReceiver) -> None:
    """A dead endpoint that wanted message events costs the broker nothing once its breaker is open:
    the broker's per-message slots go back to None, and come back after reset_timeout."""
    receiver.statuses = [500]
    broker = Broker()
    d = dispatcher(
        receiver.url,
        workers=1,
        endpoint={
            "events": frozenset({"message.published", "message.delivered"}),
            "failure_threshold": 1,
            "reset_timeout": 0.3,
        },
    )
    d.on_wants_changed = lambda: broker.set_events(d)
    broker.set_events(d)
    try:
        assert broker._on_published is not None and broker._on_delivered is not None
        broker.publish(Message("t", b"x"))
        wait_for(lambda: d.endpoints[0].breaker.state == OPEN)
        assert broker._on_published is None and broker._on_delivered is None
        receiver.statuses = [200]
        wait_for(lambda: broker._on_published is not None)  # the pause is over: half-open
        broker.publish(Message("t", b"y"))
        wait_for(lambda: d.endpoints[0].sent == 1)
        assert d.endpoints[0].breaker.state == CLOSED
    finally:
        d.stop(1.0)


def test_breaker_half_open_failure_opens_again() -> None:
    b = CircuitBreaker(failure_threshold=1, reset_timeout=10.0)
    assert b.allow(0.0)
    assert b.failure(0.0) and b.state == OPEN
    assert not b.allow(5.0)
    assert b.allow(10.0) and b.state == HALF_OPEN
    assert not b.allow(10.0)  # one trial at a time
    assert b.failure(10.5) and b.state == OPEN and b.opened == 2
    assert not b.allow(15.0)


@pytest.mark.parametrize("policy, kept", [("oldest", ["c7", "c8", "c9"]), ("newest", ["c0", "c1", "c2"])])
def test_queue_overflow_is_counted_by_policy(receiver: GeventReceiver, policy: str, kept: list[str]) -> None:
    d = dispatcher(receiver.url, start=False, queue_size=3, drop_policy=policy)
    for i in range(10):
        connected(d, f"c{i}")
    assert [event.data["client_id"] for _name, event in d.pending()] == kept
    assert d.endpoints[0].dropped["queue_full"] == 7
    d.start()
    try:
        wait_for(lambda: d.endpoints[0].sent == 3)
        assert sorted(e["data"]["client_id"] for e in receiver.events()) == kept  # workers may reorder
    finally:
        d.stop(1.0)


def test_signature_verifies(receiver: GeventReceiver) -> None:
    secret = b"s3cret-key"
    d = dispatcher(receiver.url, endpoint={"secret": secret})
    try:
        connected(d, "c1")
        wait_for(lambda: receiver.requests)
        _t, headers, body = receiver.requests[0]
        expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Fluxmq-Signature"], expected)
        assert signature(b"other", body) != headers["X-Fluxmq-Signature"]
    finally:
        d.stop(1.0)


def test_no_signature_without_a_secret(receiver: GeventReceiver) -> None:
    d = dispatcher(receiver.url)
    try:
        connected(d, "c1")
        wait_for(lambda: receiver.requests)
        assert "X-Fluxmq-Signature" not in receiver.requests[0][1]
    finally:
        d.stop(1.0)


def test_shutdown_drains_the_queue(receiver: GeventReceiver) -> None:
    d = dispatcher(receiver.url, workers=2)
    for i in range(50):
        connected(d, f"c{i}")
    d.stop(10.0)
    assert len(receiver.requests) == 50 and d.endpoints[0].sent == 50
    connected(d, "late")  # a stopped dispatcher takes nothing
    assert not d.queue


def test_shutdown_is_bounded_and_counts_what_is_left() -> None:
    # A listening socket that never answers: every request waits for its timeout.
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    try:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/hook"
        d = dispatcher(url, workers=2, endpoint={"timeout": 30.0})
        for i in range(20):
            connected(d, f"c{i}")
        gevent.sleep(0.05)
        d.stop(0.2)
        ep = d.endpoints[0]
        assert ep.dropped["shutdown"] == 20 and ep.sent == 0
        assert not d.queue and d.busy == 0
    finally:
        silent.close()


def test_topic_filters_choose_message_events(receiver: GeventReceiver) -> None:
    d = dispatcher(
        receiver.url,
        include_payload=True,
        endpoint={"events": frozenset({"message.published"}), "topic_filters": ("a/+", "b/#")},
    )
    try:
        assert d.wants_published and not d.wants_delivered
        for topic in ("a/1", "c/1", "b/x/y", "$SYS/x", "a/1/2"):
            d.message_published(Message(topic, b"\x00\xff", 1, False, None, None, "pub"), "alice", 2)
        wait_for(lambda: d.endpoints[0].sent == 2)
        gevent.sleep(0.05)
        # the endpoint's worker greenlets POST side by side: the order of arrival is not the order sent
        events = sorted(receiver.events(), key=lambda e: e["data"]["topic"])
        assert [e["data"]["topic"] for e in events] == ["a/1", "b/x/y"]
        assert events[0]["data"]["payload"] == "AP8="
        assert events[0]["data"]["payload_size"] == 2
    finally:
        d.stop(1.0)


def test_broker_per_message_hooks_stay_empty_unless_wanted(receiver: GeventReceiver) -> None:
    broker = Broker()
    assert broker.events is None and broker._on_published is None and broker._on_delivered is None
    d = dispatcher(
        receiver.url, start=False, endpoint={"events": frozenset({"client.connected", "message.retained"})}
    )
    broker.set_events(d)
    assert broker.events is d and broker._on_published is None and broker._on_delivered is None
    broker.publish(Message("t", b"x"))
    assert not d.queue
    broker.publish(Message("r", b"x", 0, True))  # message.retained is wanted: it is queued
    assert [event.type for _name, event in d.pending()] == ["message.retained"]
    broker.set_events(None)
    assert broker.events is None


def test_no_payload_unless_include_payload(receiver: GeventReceiver) -> None:
    d = dispatcher(receiver.url, endpoint={"events": frozenset({"message.published"})})
    try:
        d.message_published(Message("a/1", b"secret", 0, False, None, None, "pub"), None, 0)
        wait_for(lambda: d.endpoints[0].sent == 1)
        data = receiver.events()[0]["data"]
        assert "payload" not in data and data["payload_size"] == 6
    finally:
        d.stop(1.0)


def test_event_ids_are_unique_and_stable_across_retries(receiver: GeventReceiver) -> None:
    receiver.statuses = [500, 200]
    d = dispatcher(receiver.url, endpoint={"retry": RetryPolicy(2, 0.01, 0.01, 1.0)})
    try:
        connected(d, "c1")
        connected(d, "c2")
        wait_for(lambda: d.endpoints[0].sent == 2)
        ids = [json.loads(body)["event_id"] for _t, _h, body in receiver.requests]
        headers = [h["X-Fluxmq-Event-Id"] for _t, h, _b in receiver.requests]
        assert ids == headers and len(ids) == 3 and len(set(ids)) == 2
    finally:
        d.stop(1.0)


def test_https_endpoint_verified_against_its_ca_file(tmp_path) -> None:
    from tests.certs import CertAuthority

    ca = CertAuthority(tmp_path, "webhook test CA")
    server = ca.issue_server("localhost")
    r = GeventReceiver(certfile=server.cert_file, keyfile=server.key_file)
    try:
        url = r.url.replace("http://127.0.0.1", "https://localhost")
        trusted = dispatcher(url, endpoint={"ca_file": ca.cert_file})
        untrusted = dispatcher(url, endpoint={"name": "other"})  # system CAs do not know the test CA
        try:
            connected(trusted, "c1")
            connected(untrusted, "c2")
            wait_for(lambda: trusted.endpoints[0].sent == 1 and untrusted.endpoints[0].failed == 1)
            assert [e["data"]["client_id"] for e in r.events()] == ["c1"]
        finally:
            trusted.stop(1.0)
            untrusted.stop(1.0)
    finally:
        r.close()
