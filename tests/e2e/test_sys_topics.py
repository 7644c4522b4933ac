"""``$SYS/broker/...`` basics: retained broker figures, refreshed periodically, owned by the broker."""

from __future__ import annotations

import re

import pytest

from fluxmq import __version__
from fluxmq._core import codec as c
from tests.conftest import NodeFactory
from tests.e2e.mqttraw import paho_connected, raw_connected, unique

pytestmark = pytest.mark.e2e

EXPECTED = (
    "version",
    "uptime",
    "clients/connected",
    "clients/total",
    "messages/received",
    "messages/sent",
    "publish/messages/received",
    "publish/messages/sent",
    "bytes/received",
    "bytes/sent",
    "subscriptions/count",
)


@pytest.fixture(scope="module")
def sys_node(tmp_path_factory):
    """A node publishing $SYS every second, so refreshes are seen within a short bound."""
    factory = NodeFactory(tmp_path_factory.mktemp("sysnode"))
    try:
        yield factory({"broker.sys_interval": "1s"})
    finally:
        factory.close()


def _retained_now(node, filter: str) -> dict[str, c.Publish]:
    sub = raw_connected(node, unique("sys-snap"))
    try:
        sub.send(c.Subscribe(1, [c.Subscription(filter, 0)]), c.Pingreq())
        before, _ = sub.collect_until(lambda p: isinstance(p, c.Pingresp))
        return {p.topic: p for p in before if isinstance(p, c.Publish)}
    finally:
        sub.disconnect()


def test_sys_broker_version_is_retained(sys_node) -> None:
    """A new ``$SYS/broker/version`` subscriber gets it at once, retained, naming the version."""
    got = _retained_now(sys_node, "$SYS/broker/version")
    msg = got["$SYS/broker/version"]
    assert msg.retain is True
    assert __version__ in msg.payload.decode()


def test_sys_hash_lists_the_basic_figures(sys_node) -> None:
    got = _retained_now(sys_node, "$SYS/#")
    for suffix in EXPECTED:
        assert f"$SYS/broker/{suffix}" in got, suffix
    assert re.fullmatch(rb"\d+ seconds", got["$SYS/broker/uptime"].payload)
    assert got["$SYS/broker/clients/connected"].payload.isdigit()


def test_sys_figures_refresh_clients_connected(sys_node) -> None:
    """With three more clients connected, a later ``clients/connected`` shows at least 3."""
    extra = [paho_connected(sys_node, unique("sys-extra")) for _ in range(3)]
    watcher = paho_connected(sys_node, unique("sys-watch"))
    try:
        watcher.subscribe("$SYS/broker/clients/connected", 0)
        for _ in range(20):  # one per second: a bound of ~20 refreshes
            msg = watcher.get(timeout=15)
            if int(msg.payload) >= 4:
                break
        else:
            raise AssertionError(f"clients/connected never reached 4, last {msg.payload!r}")
    finally:
        watcher.disconnect()
        for cl in extra:
            cl.disconnect()


def test_client_cannot_publish_to_sys(sys_node) -> None:
    """``$SYS`` belongs to the broker: a client PUBLISH there is acknowledged but neither routed nor retained."""
    fake = "$SYS/broker/" + unique("fake")
    sentinel = unique("sys/sentinel")
    sub = raw_connected(sys_node, unique("sys-sub"))
    pub = raw_connected(sys_node, unique("sys-pub"))
    try:
        sub.subscribe(1, (fake, 0), (sentinel, 0))
        pub.publish_qos1(fake, b"spoof", 1, retain=True)
        pub.publish_qos1(sentinel, b"S", 2)
        before, _ = sub.collect_until(lambda p: isinstance(p, c.Publish) and p.topic == sentinel)
        assert before == []
        assert fake not in _retained_now(sys_node, "$SYS/#")
    finally:
        pub.disconnect()
        sub.disconnect()


def test_sys_not_delivered_to_hash_subscriber_over_refreshes_MQTT_4_7_2_1(sys_node) -> None:
    """Across several $SYS refreshes a ``#`` subscriber sees none of them [MQTT-4.7.2-1]."""
    sub = paho_connected(sys_node, unique("sys-hash"))
    watcher = paho_connected(sys_node, unique("sys-uptime"))
    try:
        sub.subscribe("#", 0)
        watcher.subscribe("$SYS/broker/uptime", 0)
        for _ in range(3):  # the retained one, then two refreshes
            watcher.get(timeout=15)
        sentinel = unique("sys/hash-sentinel")
        watcher.publish(sentinel, b"S", 1)
        before, _ = sub.collect_until(sentinel)
        assert [m.topic for m in before if m.topic.startswith("$")] == []
    finally:
        watcher.disconnect()
        sub.disconnect()


def test_sys_messages_sent_counts_packets_the_broker_wrote(sys_node) -> None:
    """``messages/sent`` counts MQTT packets written to clients: after this test's CONNACKs, SUBACK,
    PUBLISHes and PUBACKs a later refresh is above zero and above what it was before them."""
    watcher = paho_connected(sys_node, unique("sys-sent"))
    try:
        watcher.subscribe("$SYS/broker/messages/sent", 0)
        first = int(watcher.get(timeout=15).payload)
        topic = unique("sys/sent")
        pub = paho_connected(sys_node, unique("sys-sent-pub"))
        try:
            watcher.subscribe(topic, 1)
            for i in range(5):
                pub.publish(topic, b"m%d" % i, 1)
        finally:
            pub.disconnect()
        for _ in range(20):  # one refresh per second: a bound of ~20 refreshes
            msg = watcher.get(timeout=15)
            if msg.topic == "$SYS/broker/messages/sent" and int(msg.payload) > first + 5:
                break
        else:
            raise AssertionError(f"messages/sent stayed near {first}")
    finally:
        watcher.disconnect()
