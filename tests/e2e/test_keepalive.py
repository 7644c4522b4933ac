"""Keep alive: PINGREQ/PINGRESP, and the broker closes a client silent for 1.5 x its keep alive."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from fluxmq._core import codec as c
from tests.conftest import NodeFactory, RunningNode
from tests.e2e.mqttraw import paho_connected, raw_connected, unique, wait_until
from tests.e2e.test_park_after import parked

pytestmark = pytest.mark.e2e


def test_pingreq_gets_pingresp_MQTT_3_12_4_1(node) -> None:
    """The server answers PINGREQ with PINGRESP [MQTT-3.12.4-1]."""
    client = raw_connected(node, unique("ping"))
    try:
        for _ in range(3):
            client.send(c.Pingreq())
            assert isinstance(client.recv(), c.Pingresp)
    finally:
        client.disconnect()


def test_silent_client_closed_after_one_and_a_half_keepalive_MQTT_3_1_2_24(node) -> None:
    """A client with keep alive 1 that sends nothing is disconnected [MQTT-3.1.2-24].

    Checks that it happens, not when: the bound is far above the 1.5 s the spec asks for.
    """
    client = raw_connected(node, unique("silent"), keepalive=1)
    assert client.wait_closed(timeout=20) == []


@pytest.fixture(scope="module")
def quick_park(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """A node whose connections park after 0.5 s of silence (broker.park_after; default 5 s): keep
    alive 1 (1.5 s allowed) is then longer than park_after, so the connection is parked when the
    keep alive is measured, without waiting out the default 5 s first."""
    factory = NodeFactory(tmp_path_factory.mktemp("quick-park"))
    try:
        yield factory({"broker.park_after": "500ms"})
    finally:
        factory.close()


def test_silent_parked_client_closed_MQTT_3_1_2_24(quick_park) -> None:
    """The keep-alive timer of a parked connection (no greenlet) closes a silent client too
    [MQTT-3.1.2-24]."""
    client = raw_connected(quick_park, unique("silent-parked"), keepalive=1)
    assert wait_until(lambda: parked(quick_park) == 1, 10)
    assert client.wait_closed(timeout=20) == []


def test_pinging_parked_client_stays_connected_MQTT_3_1_2_23(quick_park) -> None:
    """Keep alive 1 with a ping every 0.5 s for longer than twice its 1.5 s: a parked connection, whose
    PINGREQs are answered from the hub, keeps its keep alive measured from the last packet
    [MQTT-3.1.2-23]."""
    client = raw_connected(quick_park, unique("pinger-parked"), keepalive=1)
    try:
        assert wait_until(lambda: parked(quick_park) == 1, 10)
        started = time.monotonic()
        while time.monotonic() - started < 3.5:
            client.send(c.Pingreq())
            assert isinstance(client.recv(), c.Pingresp)
            time.sleep(0.5)  # pacing the client, well inside the keep alive; nothing is asserted on time
        assert parked(quick_park) == 1
    finally:
        client.disconnect()


def test_silent_v5_client_gets_disconnect_0x8d(node) -> None:
    """5.0: the keep-alive close is announced with DISCONNECT 0x8D (Keep Alive timeout)."""
    client = raw_connected(node, unique("silent5"), version=5, keepalive=1)
    packets = client.wait_closed(timeout=20)
    assert [(type(p), p.reason_code) for p in packets] == [(c.Disconnect, 0x8D)]


def test_pinging_client_stays_connected_MQTT_3_1_2_23(node) -> None:
    """A client that keeps sending within its keep alive is not disconnected: pings spread over more than
    its 3 s allowance (keep alive 2) all get answers [MQTT-3.1.2-23, -24]."""
    client = raw_connected(node, unique("pinger"), keepalive=2)
    try:
        started = time.monotonic()
        while time.monotonic() - started < 4.5:
            client.send(c.Pingreq())
            assert isinstance(client.recv(), c.Pingresp)
            time.sleep(0.5)  # pacing the client, well inside the keep alive; nothing is asserted on time
    finally:
        client.disconnect()


def test_any_packet_counts_as_activity_MQTT_3_1_2_23(node) -> None:
    """Control packets other than PINGREQ keep the connection alive too (here QoS 1 PUBLISHes)."""
    topic = unique("ka/activity")
    client = raw_connected(node, unique("ka-pub"), keepalive=2)
    try:
        started = time.monotonic()
        pid = 1
        while time.monotonic() - started < 4.5:
            client.publish_qos1(topic, b"alive", pid)
            pid += 1
            time.sleep(0.5)
        client.send(c.Pingreq())
        assert isinstance(client.recv(), c.Pingresp)
    finally:
        client.disconnect()


def test_paho_keepalive_pings_keep_it_connected(node) -> None:
    """paho with keep alive 2 pings on its own and stays connected well past 3 s (keep alive 1 would leave
    paho, whose loop wakes once a second, only half a second of margin)."""
    client = paho_connected(node, unique("paho-ka"), keepalive=2)
    try:
        topic = unique("ka/paho")
        client.subscribe(topic, 1)
        assert not client.wait_disconnected(timeout=5)
        client.publish(topic, b"still connected", 1)
        assert client.get().payload == b"still connected"
    finally:
        client.disconnect()
