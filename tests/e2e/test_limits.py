"""Limits and caps on real nodes: per-IP connection rate, max_connections per listener, the CONNECT
deadline (silent and trickling sockets), per-client publish rate and bytes, subscription count,
topic levels and length (5.0 reason codes 0x96/0x97, 3.1.1 disconnect or SUBACK 0x80), log lines
once per client per minute, and slow consumers isolated by bounded queues with each overflow policy.

Nothing here measures time: waits are bounded and end as soon as their condition holds.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from fluxmq._core import codec as c
from tests.conftest import NodeFactory, RunningNode
from tests.e2e.mqttraw import ConnectionClosed, RawClient, paho_connected, unique, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeFactory]:
    f = NodeFactory(tmp_path_factory.mktemp("limits"))
    yield f
    f.close()


@pytest.fixture(scope="module")
def node(factory: NodeFactory) -> RunningNode:
    """Per-client limits: 20 PUBLISH/s (burst 20), 4 KiB/s payload (burst 8 KiB), 3 subscriptions,
    4 topic levels, 40-byte topics; CONNECT within 1 s."""
    return factory(
        {
            "storage.type": "memory",
            "server.connect_timeout": "1s",
            "limits.publish_rate": 20,
            "limits.publish_burst": 20,
            "limits.publish_bytes_rate": 4096,
            "limits.max_subscriptions": 3,
            "limits.max_topic_levels": 4,
            "limits.max_topic_length": 40,
        }
    )


def connected(node: RunningNode, version: int = 4, client_id: str | None = None) -> RawClient:
    raw = RawClient.to(node, version)
    assert raw.connect(client_id or unique("lim")).reason_code == 0
    return raw


def log_lines(node: RunningNode, event: str, needle: str) -> list[str]:
    return [line for line in node.log_text().splitlines() if f"event={event}" in line and needle in line]


# -- CONNECT deadline -------------------------------------------------------------------------------


def test_silent_socket_closed_after_connect_timeout(node) -> None:
    with socket.create_connection((node.host, node.mqtt_port)) as s:
        s.settimeout(15)
        assert s.recv(10) == b""  # closed by the broker, nothing sent


def test_half_a_connect_is_closed_after_connect_timeout(node) -> None:
    data = c.encode(c.Connect(client_id=unique("half")), 4)
    with socket.create_connection((node.host, node.mqtt_port)) as s:
        s.sendall(data[: len(data) // 2])
        s.settimeout(15)
        assert s.recv(10) == b""


def test_trickled_connect_is_closed_at_the_deadline_not_per_byte(node) -> None:
    """One byte every 0.3 s keeps each read under connect_timeout (1 s); the CONNECT as a whole is
    still due within it, so the broker closes the socket before the client got to the end."""
    data = c.encode(c.Connect(client_id=unique("slowloris") + "x" * 40), 4)
    closed = False
    with socket.create_connection((node.host, node.mqtt_port)) as s:
        s.settimeout(0.3)
        for byte in data:
            try:
                s.sendall(bytes([byte]))
                if s.recv(10) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
    assert closed, "the broker kept a trickling pre-CONNECT socket open for the whole CONNECT"


# -- publish rate and bytes ---------------------------------------------------------------------------


def test_publish_rate_disconnects_3_1_1_client(node) -> None:
    cid = unique("fast311")
    raw = connected(node, 4, cid)
    raw.send(*[c.Publish("rate/t", b"x", 0) for _ in range(200)])
    raw.wait_closed()
    assert wait_until(lambda: len(log_lines(node, "rate_limited", cid)) == 1)


def test_publish_rate_gets_0x96_for_5_0(node) -> None:
    raw = connected(node, 5)
    raw.send(*[c.Publish("rate/t", b"x", 1, packet_id=i + 1) for i in range(200)])
    got = raw.wait_closed()
    disconnects = [p for p in got if isinstance(p, c.Disconnect)]
    assert [d.reason_code for d in disconnects] == [0x96]
    acks = [p for p in got if isinstance(p, c.Puback)]
    assert 1 <= len(acks) < 200 and all(a.reason_code in (0, 0x10) for a in acks)


def test_publish_bytes_rate(node) -> None:
    raw = connected(node, 5)
    payload = b"b" * 3000
    raw.send(*[c.Publish("bytes/t", payload, 1, packet_id=i + 1) for i in range(20)])
    got = raw.wait_closed()
    assert [p.reason_code for p in got if isinstance(p, c.Disconnect)] == [0x96]
    assert len([p for p in got if isinstance(p, c.Puback)]) < 20


def test_rate_limit_logged_once_per_client_per_minute(node) -> None:
    cid = unique("repeat")
    for _ in range(3):
        raw = connected(node, 4, cid)
        raw.send(*[c.Publish("rate/t", b"x", 0) for _ in range(100)])
        raw.wait_closed()
    marker = unique("marker")  # a later client's line: once it is in the log, so are cid's
    raw = connected(node, 4, marker)
    raw.send(*[c.Publish("rate/t", b"x", 0) for _ in range(100)])
    raw.wait_closed()
    assert wait_until(lambda: len(log_lines(node, "rate_limited", marker)) == 1)
    assert len(log_lines(node, "rate_limited", cid)) == 1


def test_a_client_within_its_rate_is_served(node) -> None:
    with connected(node, 5) as raw:
        for i in range(1, 11):
            raw.publish("rate/ok", b"fine", 1, packet_id=i)
            assert raw.wait_for(lambda p, i=i: isinstance(p, c.Puback) and p.packet_id == i).reason_code in (
                0,
                0x10,
            )


# -- subscriptions and topic caps -----------------------------------------------------------------------


def test_subscription_count_3_1_1_gets_0x80(node) -> None:
    with connected(node, 4) as raw:
        assert raw.subscribe(1, ("s/1", 0), ("s/2", 0), ("s/3", 0), ("s/4", 0)).reason_codes == [
            0,
            0,
            0,
            0x80,
        ]
        assert raw.subscribe(2, ("s/2", 1)).reason_codes == [1]  # replacing one is not a new one
        raw.send(c.Unsubscribe(3, ["s/1"]))
        raw.wait_for(lambda p: isinstance(p, c.Unsuback))
        assert raw.subscribe(4, ("s/5", 0)).reason_codes == [0]


def test_subscription_count_5_0_gets_0x97(node) -> None:
    with connected(node, 5) as raw:
        ack = raw.subscribe(1, ("s/1", 0), ("s/2", 0), ("s/3", 0), ("s/4", 0), ("s/5", 0))
        assert ack.reason_codes == [0, 0, 0, 0x97, 0x97]


def test_topic_caps_on_publish(node) -> None:
    with connected(node, 5) as raw:
        raw.publish("a/b/c/d/e", b"x", 1, packet_id=1)  # 5 levels
        assert raw.wait_for(lambda p: isinstance(p, c.Puback)).reason_code == 0x97
        raw.publish("t" * 41, b"x", 1, packet_id=2)
        assert raw.wait_for(lambda p: isinstance(p, c.Puback)).reason_code == 0x97
        raw.publish("a/b/c/d", b"x", 1, packet_id=3)
        assert raw.wait_for(lambda p: isinstance(p, c.Puback)).reason_code in (0, 0x10)
        raw.publish("a/b/c/d/e", b"x", 0)  # QoS 0 has no ack to carry 0x97
        assert [p.reason_code for p in raw.wait_closed() if isinstance(p, c.Disconnect)] == [0x97]
    raw = connected(node, 4)
    raw.publish("a/b/c/d/e", b"x", 1, packet_id=1)
    assert not [p for p in raw.wait_closed() if isinstance(p, c.Puback)]  # 3.1.1: disconnected


def test_topic_caps_on_subscribe(node) -> None:
    with connected(node, 5) as raw:
        assert raw.subscribe(1, ("a/b/c/#", 0), ("a/b/c/d/#", 0), ("x" * 41, 0)).reason_codes == [
            0,
            0x97,
            0x97,
        ]
    with connected(node, 4) as raw:
        assert raw.subscribe(1, ("a/+/+/+/+", 0)).reason_codes == [0x80]


# -- the default topic level cap (limits.max_topic_levels: 128), a denial-of-service guard ----------

AT_CAP = "/".join(["l"] * 128)  # 128 levels
OVER_CAP = AT_CAP + "/x"  # 129


@pytest.fixture(scope="module")
def default_node(factory: NodeFactory) -> RunningNode:
    """No limits configured at all: only the defaults apply."""
    return factory({"storage.type": "memory"})


def test_default_topic_level_cap_on_publish_5_0(default_node) -> None:
    with connected(default_node, 5) as sub, connected(default_node, 5) as raw:
        assert sub.subscribe(1, ("#", 1)).reason_codes == [1]
        raw.publish(OVER_CAP, b"over", 1, packet_id=1)
        assert raw.wait_for(lambda p: isinstance(p, c.Puback)).reason_code == 0x97
        raw.publish(OVER_CAP, b"over", 2, packet_id=2)
        assert raw.wait_for(lambda p: isinstance(p, c.Pubrec)).reason_code == 0x97
        raw.publish(AT_CAP, b"at", 1, packet_id=3)
        assert raw.wait_for(lambda p: isinstance(p, c.Puback) and p.packet_id == 3).reason_code == 0
        got = sub.wait_for(lambda p: isinstance(p, c.Publish))
        assert (got.topic, got.payload) == (AT_CAP, b"at")  # the first one through: nothing over the cap
        raw.publish(OVER_CAP, b"over", 0)  # QoS 0 has no ack to carry 0x97
        assert [p.reason_code for p in raw.wait_closed() if isinstance(p, c.Disconnect)] == [0x97]


def test_default_topic_level_cap_on_publish_3_1_1(default_node) -> None:
    with connected(default_node, 4) as raw:
        raw.publish(AT_CAP, b"at", 1, packet_id=1)
        assert raw.wait_for(lambda p: isinstance(p, c.Puback)).packet_id == 1
        raw.publish(OVER_CAP, b"over", 1, packet_id=2)
        assert not [p for p in raw.wait_closed() if isinstance(p, c.Puback)]  # no negative ack: closed


def test_default_topic_level_cap_on_subscribe(default_node) -> None:
    with connected(default_node, 5) as raw:
        ack = raw.subscribe(
            1, (AT_CAP, 0), (OVER_CAP, 0), ("/".join(["+"] * 129), 0), ("/".join(["+"] * 127) + "/#", 0)
        )
        assert ack.reason_codes == [0, 0x97, 0x97, 0]
    with connected(default_node, 4) as raw:
        assert raw.subscribe(1, (AT_CAP, 1), (OVER_CAP, 1)).reason_codes == [1, 0x80]


def test_default_topic_level_cap_on_will_topics(default_node) -> None:
    """A will is a PUBLISH the broker makes later: its topic is held to the caps at CONNECT, and a
    refusal looks like a will the ACL denies (return code 5 / 0x87)."""
    for version, refused in ((4, 5), (5, 0x87)):
        with RawClient.to(default_node, version) as raw:
            assert raw.connect(unique("will"), will=c.Will(OVER_CAP, b"gone")).reason_code == refused
        with RawClient.to(default_node, version) as raw:
            assert raw.connect(unique("will"), will=c.Will(AT_CAP, b"gone")).reason_code == 0
            raw.disconnect()


def test_default_topic_level_cap_on_the_http_bridge(default_node) -> None:
    import http.client
    import json

    def post(topic: str) -> int:
        conn = http.client.HTTPConnection(default_node.host, default_node.http_port, timeout=10)
        try:
            conn.request(
                "POST",
                "/publish",
                json.dumps({"topic": topic, "payload": "x"}),
                {"Content-Type": "application/json"},
            )
            return conn.getresponse().status
        finally:
            conn.close()

    assert post(AT_CAP) == 200
    assert post(OVER_CAP) == 400


# -- connections: per-IP rate and per-listener maximum ----------------------------------------------------


def test_connect_rate_per_ip(factory: NodeFactory) -> None:
    node = factory({"storage.type": "memory", "limits.connect_rate": 0.05, "limits.connect_burst": 5})
    accepted, refused = 0, 0
    for _ in range(12):
        raw = RawClient.to(node, 4)
        try:
            if raw.connect(unique("cr")).reason_code == 0:
                accepted += 1
        except (ConnectionClosed, OSError):
            refused += 1
        finally:
            raw.close()
    assert accepted <= 5 and refused >= 7  # the readiness probes used some of the burst too
    assert wait_until(lambda: len(log_lines(node, "connect_rate_limited", "127.0.0.1")) == 1)
    node.stop()


def test_max_connections_per_listener(factory: NodeFactory) -> None:
    node = factory({"storage.type": "memory", "server.tcp.plain.max_connections": 3})
    held = []
    try:
        for _ in range(3):
            held.append(connected(node, 4))
        with RawClient.to(node, 4) as extra:
            assert extra.connect(unique("extra")).reason_code == 3
        with RawClient.to(node, 5) as extra:
            assert extra.connect(unique("extra")).reason_code == 0x97
    finally:
        for raw in held:
            raw.close()
    node.stop()


#: RLIMIT_NOFILE of the node in the fd-limit tests: a few dozen descriptors for the node's own
#: work (listeners, storage, HTTP, the workers' links), the rest for clients
FD_LIMIT = 160


def _try_connect(node: RunningNode) -> RawClient | None:
    """A connected client, or None when the broker refused it (CONNACK 3 or a close, never silence)."""
    raw = RawClient.to(node, 4)
    try:
        ack = raw.connect(unique("fd"))
    except ConnectionClosed:
        ack = None
    if ack is not None and ack.reason_code == 0:
        return raw
    assert ack is None or ack.reason_code == 3, ack
    raw.close()
    return None


@pytest.mark.parametrize("workers", [1, 2])
def test_fd_limit_refuses_new_clients_and_keeps_serving(node_factory: NodeFactory, workers: int) -> None:
    """A worker near its file-descriptor limit refuses new clients at once (CONNACK "server
    unavailable", or a close) and logs it, never leaving them unanswered or crashing; the clients it
    holds keep being served, and a freed descriptor takes a client again."""
    node = node_factory({"storage.type": "memory", "server.workers": workers}, nofile=FD_LIMIT)
    held: list[RawClient] = []
    refused = 0
    try:
        for _ in range(FD_LIMIT * workers + 50):  # bounded: more than the workers' descriptors hold
            raw = _try_connect(node)
            if raw is None:
                refused += 1
                if refused == 10:
                    break
            else:
                held.append(raw)
        assert refused == 10, f"{len(held)} held, {refused} refused"
        assert len(held) >= (FD_LIMIT - 60) * workers // 2
        for raw in held:
            raw.send(c.Pingreq())
        for raw in held:
            raw.expect(c.Pingresp)
        for raw in held[10:]:
            raw.close()
        del held[10:]
        assert wait_until(lambda: (raw := _try_connect(node)) is not None and (held.append(raw) or True))
        assert node.process.poll() is None
        log = node.log_text()
        assert "event=connection_refused_fd_limit" in log
        assert "Traceback" not in log
    finally:
        for raw in held:
            raw.close()


# -- slow consumers -------------------------------------------------------------------------------------


def flood(node: RunningNode, topic: str, count: int, payload: int = 200) -> None:
    """Publish ``count`` QoS 1 messages (payload = sequence number, padded) and wait for every PUBACK:
    the publisher is never held up by a stalled subscriber."""
    with connected(node, 4) as pub:
        window = 50
        for start in range(0, count, window):
            ids = range(start + 1, min(count, start + window) + 1)
            pub.send(*[c.Publish(topic, b"%06d" % (i - 1) + b"." * payload, 1, packet_id=i) for i in ids])
            for i in ids:
                pub.wait_for(lambda p, i=i: isinstance(p, c.Puback) and p.packet_id == i)


def drain(raw: RawClient, expect: int) -> list[int]:
    """Read and acknowledge until ``expect`` messages came (then nothing more within a PINGREQ)."""
    got = []
    while len(got) < expect:
        p = raw.wait_for(lambda p: isinstance(p, c.Publish))
        got.append(int(p.payload[:6]))
        raw.send(c.Puback(p.packet_id))
    raw.send(c.Pingreq())
    rest, _ = raw.collect_until(lambda p: isinstance(p, c.Pingresp))
    got += [int(p.payload[:6]) for p in rest if isinstance(p, c.Publish)]
    return got


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_new"])
def test_stalled_subscriber_has_a_bounded_queue(factory: NodeFactory, policy: str) -> None:
    """A QoS 1 subscriber that stops acknowledging holds 10 in flight plus a queue of 20; of 300
    messages the rest are dropped by the policy, while another subscriber gets all 300."""
    node = factory(
        {
            "storage.type": "memory",
            "broker.max_inflight": 10,
            "broker.max_queued_messages": 20,
            "broker.queue_overflow": policy,
        }
    )
    topic = unique("stall")
    slow = connected(node, 4)
    assert slow.subscribe(1, (topic, 1)).reason_codes == [1]
    fast = paho_connected(node, unique("fast"))
    fast.subscribe(topic, 0)
    flood(node, topic, 300)
    assert [int(fast.get().payload[:6]) for _ in range(300)] == list(range(300))
    got = drain(slow, 30)
    expected_queue = list(range(280, 300)) if policy == "drop_oldest" else list(range(10, 30))
    assert got == list(range(10)) + expected_queue
    slow.close()
    fast.disconnect()
    node.stop()


def test_stalled_subscriber_queue_bounded_in_bytes(factory: NodeFactory) -> None:
    node = factory(
        {
            "storage.type": "memory",
            "broker.max_inflight": 5,
            "broker.max_queued_messages": 1000,
            "broker.max_queued_bytes": "4KiB",
            "broker.queue_overflow": "drop_new",
        }
    )
    topic = unique("bytes")
    slow = connected(node, 4)
    slow.subscribe(1, (topic, 1))
    flood(node, topic, 100, payload=1000)  # ~1 KiB each: 4 fit in the queue
    got = drain(slow, 5)
    assert got[:5] == list(range(5)) and 5 + 2 <= len(got) <= 5 + 4
    slow.close()
    node.stop()


def test_stalled_subscriber_disconnected_by_policy(factory: NodeFactory) -> None:
    node = factory(
        {
            "storage.type": "memory",
            "broker.max_inflight": 5,
            "broker.max_queued_messages": 10,
            "broker.queue_overflow": "disconnect",
        }
    )
    topic = unique("disc")
    slow = connected(node, 5)
    slow.subscribe(1, (topic, 1))
    other = connected(node, 4)
    other.subscribe(1, (topic, 0))
    flood(node, topic, 50)
    got = slow.wait_closed()
    assert [p.reason_code for p in got if isinstance(p, c.Disconnect)] == [0x97]
    assert len([p for p in got if isinstance(p, c.Publish)]) <= 15
    other.send(c.Pingreq())
    before, _ = other.collect_until(lambda p: isinstance(p, c.Pingresp))
    assert len([p for p in before if isinstance(p, c.Publish)]) == 50
    other.close()
    node.stop()
