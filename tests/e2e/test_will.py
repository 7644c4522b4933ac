"""Will messages: published on an ungraceful close and on keep-alive timeout, never after DISCONNECT."""

from __future__ import annotations

import pytest

from fluxmq._core import codec as c
from tests.e2e.mqttraw import PahoClient, end_session, paho_connected, raw_connected, unique

pytestmark = pytest.mark.e2e


@pytest.fixture
def watcher(node):
    client = paho_connected(node, unique("will-watch"))
    yield client
    client.disconnect()


@pytest.mark.parametrize("clean", [True, False])
def test_will_published_on_ungraceful_close_MQTT_3_1_2_8(node, watcher, clean: bool) -> None:
    """Closing the socket without DISCONNECT publishes the will, for a clean and a persistent session
    alike [MQTT-3.1.2-8]."""
    topic = unique("will/close")
    watcher.subscribe(topic, 1)
    cid = unique("will-close")
    client = raw_connected(node, cid, clean=clean, will=c.Will(topic, b"bye", 1))
    client.close()
    msg = watcher.get()
    assert (msg.topic, msg.payload, msg.qos, msg.retain) == (topic, b"bye", 1, False)
    if not clean:
        end_session(node, cid)


def test_no_will_after_disconnect_MQTT_3_14_4_3(node, watcher) -> None:
    """After DISCONNECT the will is discarded [MQTT-3.14.4-3, MQTT-3.1.2-10]."""
    topic = unique("will/graceful")
    watcher.subscribe(topic, 1)
    client = raw_connected(node, unique("will-graceful"), will=c.Will(topic, b"must not appear", 1))
    client.disconnect()  # returns after the broker closed its side: the will is gone by then
    pub = paho_connected(node, unique("will-graceful-pub"))
    pub.publish(topic, b"sentinel", 1)
    pub.disconnect()
    before, _ = watcher.collect_until(topic)
    assert before == []


def test_will_published_on_keepalive_timeout_MQTT_3_1_2_24(node, watcher) -> None:
    """A client silent for 1.5 x keep alive is disconnected and its will published [MQTT-3.1.2-24, MQTT-3.1.2-8]."""
    topic = unique("will/keepalive")
    watcher.subscribe(topic, 0)
    client = raw_connected(node, unique("will-ka"), keepalive=1, will=c.Will(topic, b"timed out"))
    try:
        msg = watcher.get(timeout=15)  # 1.5 s by the spec; the bound is generous on purpose
        assert (msg.topic, msg.payload) == (topic, b"timed out")
        client.wait_closed(timeout=15)
    finally:
        client.close()


def test_will_retain_is_stored_as_retained_MQTT_3_1_2_17(node, watcher) -> None:
    """Will Retain 1: the will is published as a retained message [MQTT-3.1.2-17]."""
    topic = unique("will/retain")
    watcher.subscribe(topic, 1)
    client = raw_connected(node, unique("will-ret"), will=c.Will(topic, b"last words", 1, True))
    client.close()
    live = watcher.get()
    assert (live.payload, live.retain) == (b"last words", False)  # live delivery: RETAIN 0 [MQTT-3.3.1-9]
    late = paho_connected(node, unique("will-ret-late"))
    try:
        late.subscribe(topic, 1)
        msg = late.get()
        assert (msg.payload, msg.retain) == (b"last words", True)
        late.publish(topic, b"", 1, retain=True)  # clean up
    finally:
        late.disconnect()


def test_will_retain_0_is_not_retained_MQTT_3_1_2_16(node, watcher) -> None:
    """Will Retain 0: published as a non-retained message [MQTT-3.1.2-16]."""
    topic = unique("will/noretain")
    sentinel = unique("will/noretain-sentinel")
    watcher.subscribe(topic, 1)
    client = raw_connected(node, unique("will-noret"), will=c.Will(topic, b"w", 0, False))
    client.close()
    assert watcher.get().payload == b"w"
    late = raw_connected(node, unique("will-noret-late"))
    try:
        late.send(c.Subscribe(1, [c.Subscription(topic, 1), c.Subscription(sentinel, 1)]))
        late.expect(c.Suback)
        late.send(c.Pingreq())
        before, _ = late.collect_until(lambda p: isinstance(p, c.Pingresp))
        assert before == []
    finally:
        late.disconnect()


@pytest.mark.parametrize("will_qos,sub_qos", [(0, 2), (1, 2), (2, 2), (2, 1)])
def test_will_qos_MQTT_3_1_2_14(node, watcher, will_qos: int, sub_qos: int) -> None:
    """The will goes out with its Will QoS [MQTT-3.1.2-14], capped by the subscription."""
    topic = unique(f"will/qos{will_qos}{sub_qos}")
    watcher.subscribe(topic, sub_qos)
    client = raw_connected(node, unique("will-qos"), will=c.Will(topic, b"q", will_qos))
    client.close()
    assert watcher.get().qos == min(will_qos, sub_qos)


def test_will_published_once_MQTT_3_1_2_10(node, watcher) -> None:
    """The will is removed once published: it appears exactly once [MQTT-3.1.2-10]."""
    topic = unique("will/once")
    watcher.subscribe(topic, 1)
    client = raw_connected(node, unique("will-once"), will=c.Will(topic, b"once", 1))
    client.close()
    assert watcher.get().payload == b"once"
    pub = paho_connected(node, unique("will-once-pub"))
    pub.publish(topic, b"sentinel", 1)
    pub.disconnect()
    before, _ = watcher.collect_until(topic)
    assert before == []


def test_will_published_on_protocol_error_close_MQTT_4_8_0_1(node, watcher) -> None:
    """A connection the server closes for a malformed packet had no DISCONNECT: its will is published."""
    topic = unique("will/malformed")
    watcher.subscribe(topic, 1)
    client = raw_connected(node, unique("will-bad"), will=c.Will(topic, b"broken", 1))
    client.send_bytes(b"\x30\xff\xff\xff\xff\x7f")  # Remaining Length of 5 bytes
    client.wait_closed()
    assert watcher.get().payload == b"broken"


def test_will_published_after_truncated_packet_then_close(node, watcher) -> None:
    """A client that dies in the middle of a packet: the partial bytes are dropped, the will published."""
    topic = unique("will/truncated")
    watcher.subscribe(topic, 1)
    client = raw_connected(node, unique("will-trunc"), will=c.Will(topic, b"cut", 1))
    data = c.encode(c.Publish(unique("will/never"), b"x" * 100, 1, packet_id=1), 4)
    client.send_bytes(data[:40])
    client.close()
    assert watcher.get().payload == b"cut"


def test_paho_will_on_ungraceful_stop(node, watcher) -> None:
    """paho's will_set, and a paho client that vanishes without DISCONNECT."""
    topic = unique("will/paho")
    watcher.subscribe(topic, 2)
    client = paho_connected_with_will(node, topic)
    client.stop()  # closes the socket without DISCONNECT
    msg = watcher.get()
    assert (msg.topic, msg.payload, msg.qos) == (topic, b"paho gone", 2)


def paho_connected_with_will(node, topic: str) -> PahoClient:
    client = PahoClient(node, unique("will-paho"))
    client.set_will(topic, b"paho gone", 2)
    rc, _ = client.connect()
    assert rc == 0
    return client
