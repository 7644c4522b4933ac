"""MQTT 5.0 test clients for the end-to-end suite: a raw-packet client and a paho-mqtt 2.x MQTTv5 wrapper.

``Raw5`` sends exactly the packets a test builds with ``fluxmq._core.codec`` and returns every packet
the broker sends, decoded, so a test can check reason codes, properties and topic aliases byte for
byte. ``Paho5`` drives a paho-mqtt 2.x client with ``protocol=MQTTv5``: it keeps the CONNACK
properties, every message with its properties, every DISCONNECT reason, and never reconnects on its
own. ``module_node`` starts one node per test module with a config of its own.

Every wait is bounded and ends as soon as its condition holds; nothing sleeps a fixed time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from fluxmq._core import codec as c
from tests.conftest import NodeFactory, RunningNode
from tests.e2e.mqttraw import WAIT, ConnectionClosed, PahoThread, RawClient, new_paho
from tests.e2e.mqttraw import unique as unique  # re-exported: the 5.0 tests import it from here


@contextmanager
def module_node(tmp_path_factory: Any, overrides: Mapping[str, Any] | None = None) -> Iterator[RunningNode]:
    """One node with ``overrides`` (dotted config keys) for a module-scoped fixture; stopped at the end."""
    factory = NodeFactory(tmp_path_factory.mktemp("node5"))
    try:
        yield factory(dict(overrides or {}))
    finally:
        factory.close()


Closed = ConnectionClosed  # the broker closed the connection while a packet was expected


class Raw5(RawClient):
    """One TCP connection speaking MQTT (5.0 unless ``version`` says otherwise) packet by packet.

    The reading side (``recv``, ``expect``, ``wait_for``, ``wait_closed``, ``ack``) is RawClient's;
    this class adds 5.0-shaped CONNECT, SUBSCRIBE, PUBLISH and DISCONNECT helpers.
    """

    def __init__(
        self, node: Any, version: int = 5, timeout: float = WAIT, source: tuple | None = None
    ) -> None:
        super().__init__(node.host, node.mqtt_port, version, timeout, source)
        self.connack: Any = None

    def connect(
        self,
        client_id: str = "",
        clean_start: bool = True,
        keepalive: int = 60,
        properties: dict | None = None,
        will: Any = None,
        username: str | None = None,
        password: bytes | None = None,
    ) -> Any:
        """Send CONNECT and return the broker's answer (CONNACK, or AUTH during enhanced auth)."""
        self.client_id = client_id
        self.send(
            c.Connect(
                client_id, clean_start, keepalive, self.version, None, username, password, will, properties
            )
        )
        packet = self.recv()
        if isinstance(packet, c.Connack):
            self.connack = packet
        return packet

    def publish(
        self,
        topic: str,
        payload: bytes = b"",
        qos: int = 0,
        retain: bool = False,
        packet_id: int = 0,
        properties: dict | None = None,
    ) -> Any:
        """PUBLISH; for QoS 1 returns the PUBACK, for QoS 2 the PUBREC (the exchange is not finished)."""
        self.send(c.Publish(topic, payload, qos, retain, False, packet_id, properties))
        if qos == 1:
            return self.wait_for(lambda p: isinstance(p, c.Puback) and p.packet_id == packet_id)
        if qos == 2:
            return self.wait_for(lambda p: isinstance(p, c.Pubrec) and p.packet_id == packet_id)
        return None

    def disconnect(self, reason_code: int = 0, properties: dict | None = None) -> None:
        """DISCONNECT, then wait until the broker closed the socket: by then it has ended or stored the
        session, so a reconnect right after cannot overtake the DISCONNECT."""
        if self.closed:
            return
        try:
            self.send(c.Disconnect(reason_code, properties))
            self.wait_closed()
        except OSError:
            pass
        finally:
            self.close()

    def publishes_until(self, sentinel_topic: str, timeout: float = WAIT) -> list:
        """PUBLISH packets received before the one on ``sentinel_topic`` (all acknowledged)."""
        deadline = time.monotonic() + timeout
        got = []
        while True:
            packet = self.recv(max(0.0, deadline - time.monotonic()))
            if not isinstance(packet, c.Publish):
                continue
            self.ack(packet)
            if packet.topic == sentinel_topic:
                return got
            got.append(packet)


def raw5(node: Any, client_id: str = "", properties: dict | None = None, **kwargs: Any) -> Raw5:
    """A Raw5 client whose CONNECT was accepted (the CONNACK is in ``.connack``)."""
    client = Raw5(node)
    connack = client.connect(client_id, properties=properties, **kwargs)
    assert isinstance(connack, c.Connack) and connack.reason_code == 0, connack
    return client


def disconnect_of(packets: list) -> Any:
    """The DISCONNECT among ``packets`` (AssertionError when there is none)."""
    found = [p for p in packets if isinstance(p, c.Disconnect)]
    assert found, f"no DISCONNECT in {packets!r}"
    return found[-1]


def props(kind: int = PacketTypes.PUBLISH, **values: Any) -> Properties:
    """paho Properties of packet type ``kind`` with ``values`` (paho attribute names)."""
    p = Properties(kind)
    for name, value in values.items():
        setattr(p, name, value)
    return p


class Paho5(PahoThread):
    """A paho-mqtt 2.x MQTTv5 client on its own loop thread; bounded waits, no automatic reconnect."""

    def __init__(self, node: Any, client_id: str = "", clean_start: bool = True, keepalive: int = 60) -> None:
        super().__init__(node, new_paho(client_id, mqtt.MQTTv5), keepalive)
        self.clean_start = clean_start
        self.connack: tuple | None = None  # (reason code, session present, properties)
        self.disconnect_properties: Any = None

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connack = (reason_code, bool(flags.session_present), properties)
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.disconnect_properties = properties
        super()._on_disconnect(client, userdata, flags, reason_code, properties)

    def connect(self, properties: Properties | None = None, timeout: float = WAIT) -> tuple:
        """Connect and wait for the CONNACK; returns (reason code, session present, properties)."""
        return self._connect(timeout, clean_start=self.clean_start, properties=properties)

    def reconnect(self, node: Any, properties: Properties | None = None, timeout: float = WAIT) -> tuple:
        """Connect again (after ``disconnect``) to ``node``, resuming the session (no Clean Start),
        with the same paho client: its state of the QoS 2 messages received and not yet released
        goes on (paho gives such a message to ``on_message`` at its PUBREL)."""
        self.node = node
        self.clean_start = False
        self.connack = None
        self._connected.clear()
        self._disconnected.clear()
        return self.connect(properties, timeout)

    def subscribe(
        self,
        topic: str,
        qos: int = 0,
        options: SubscribeOptions | None = None,
        properties: Properties | None = None,
        timeout: float = WAIT,
    ) -> list:
        """Subscribe and wait for the SUBACK; returns its reason codes."""
        if options is None:
            options = SubscribeOptions(qos=qos)
        return self._suback(
            self.client.subscribe(topic, options=options, properties=properties), topic, timeout
        )

    def until(self, topic: str, timeout: float = WAIT) -> list:
        """Messages received before the first one on ``topic`` (the sentinel pattern)."""
        return self.collect_until(topic, timeout)[0]

    def disconnect(
        self, reason_code: int = 0, properties: Properties | None = None, timeout: float = WAIT
    ) -> None:
        """DISCONNECT with ``reason_code``; waits until the loop thread ended."""
        if not self._disconnected.is_set() and self._connected.is_set():
            self.client.disconnect(ReasonCode(PacketTypes.DISCONNECT, identifier=reason_code), properties)
            self._disconnected.wait(timeout)
        self.stop()


def paho5(
    node: Any,
    client_id: str = "",
    properties: Properties | None = None,
    clean_start: bool = True,
    keepalive: int = 60,
) -> Paho5:
    """A connected Paho5 client (CONNACK accepted)."""
    client = Paho5(node, client_id, clean_start, keepalive)
    rc, _, _ = client.connect(properties)
    assert not rc.is_failure, rc
    return client
