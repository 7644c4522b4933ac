"""Test clients for the end-to-end suite.

``RawClient`` is a tiny raw-socket MQTT client built on ``fluxmq._core.codec`` (``encode``,
``Decoder``): it sends exactly the packets (or bytes) a test gives it and returns every packet the
broker sends, so tests can check DUP flags, packet ids, CONNACK return codes and what happens after
broken bytes. ``PahoClient`` wraps a paho-mqtt 2.x client the way the tests use it: callbacks feed
events and a queue, every wait is bounded, and the network loop never reconnects on its own (a test
that expects the broker to close a client must see it stay closed).

No helper sleeps for a fixed time: waits end when the awaited condition holds or raise
``AssertionError`` when their bound passes.
"""

from __future__ import annotations

import itertools
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fluxmq._core import codec as c

WAIT = 10.0  # default bound of every wait, seconds (generous: the machine is shared)

_ids = itertools.count(1)


def unique(prefix: str) -> str:
    """A name no other test of the run uses (client ids, topics)."""
    return f"{prefix}-{next(_ids)}-{int(time.time() * 1000) % 100000}"


class ConnectionClosed(AssertionError):
    """The broker closed the connection while a packet was expected."""


class RawClient:
    """One TCP connection speaking MQTT packet by packet (``version``: 3, 4 or 5)."""

    def __init__(
        self, host: str, port: int, version: int = 4, timeout: float = WAIT, source: tuple | None = None
    ) -> None:
        """``source``: the ``(address, port)`` to connect from (the SO_REUSEPORT listener a
        connection lands on follows from it: tests/e2e/test_workers_restart_claim.py)."""
        self.version = version
        self.sock = socket.create_connection((host, port), timeout=timeout, source_address=source)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = c.Decoder(version=version)
        self.pending: deque = deque()
        self.closed = False
        self.client_id: str | None = None

    @classmethod
    def to(cls, node: Any, version: int = 4) -> RawClient:
        """A raw connection to ``node`` (a ``RunningNode``)."""
        return cls(node.host, node.mqtt_port, version)

    # -- sending -----------------------------------------------------------------------------

    def send(self, *packets: Any) -> None:
        """Encode ``packets`` with this client's protocol version and send them in one write."""
        self.sock.sendall(b"".join(c.encode(p, self.version) for p in packets))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def connect(
        self,
        client_id: str,
        clean: bool = True,
        keepalive: int = 60,
        will: Any = None,
        properties: dict | None = None,
        username: str | None = None,
        password: bytes | None = None,
    ) -> Any:
        """Send CONNECT and return the CONNACK (whatever its return code)."""
        self.client_id = client_id
        self.send(
            c.Connect(client_id, clean, keepalive, self.version, None, username, password, will, properties)
        )
        return self.expect(c.Connack)

    def subscribe(self, packet_id: int, *subs: Any, properties: dict | None = None) -> Any:
        """SUBSCRIBE (``subs``: ``(filter, qos)`` pairs or Subscription objects) and return the
        SUBACK (other packets stay pending)."""
        items = [s if isinstance(s, c.Subscription) else c.Subscription(s[0], s[1]) for s in subs]
        self.send(c.Subscribe(packet_id, items, properties))
        return self.wait_for(lambda p: isinstance(p, c.Suback) and p.packet_id == packet_id)

    def publish(
        self,
        topic: str,
        payload: bytes = b"",
        qos: int = 0,
        retain: bool = False,
        packet_id: int = 0,
        dup: bool = False,
        properties: dict | None = None,
    ) -> None:
        self.send(c.Publish(topic, payload, qos, retain, dup, packet_id, properties))

    def publish_qos1(self, topic: str, payload: bytes, packet_id: int, retain: bool = False) -> None:
        """PUBLISH QoS 1 and wait for its PUBACK."""
        self.publish(topic, payload, 1, retain, packet_id)
        self.wait_for(lambda p: isinstance(p, c.Puback) and p.packet_id == packet_id)

    def publish_qos2(self, topic: str, payload: bytes, packet_id: int, retain: bool = False) -> None:
        """The whole QoS 2 exchange: PUBLISH, PUBREC, PUBREL, PUBCOMP."""
        self.publish(topic, payload, 2, retain, packet_id)
        self.wait_for(lambda p: isinstance(p, c.Pubrec) and p.packet_id == packet_id)
        self.send(c.Pubrel(packet_id))
        self.wait_for(lambda p: isinstance(p, c.Pubcomp) and p.packet_id == packet_id)

    def ack(self, publish: Any) -> None:
        """Acknowledge a received PUBLISH: PUBACK for QoS 1; PUBREC, the PUBREL, PUBCOMP for QoS 2."""
        pid = publish.packet_id
        if publish.qos == 1:
            self.send(c.Puback(pid))
        elif publish.qos == 2:
            self.send(c.Pubrec(pid))
            self.wait_for(lambda p: isinstance(p, c.Pubrel) and p.packet_id == pid)
            self.send(c.Pubcomp(pid))

    def disconnect(self, timeout: float = WAIT) -> None:
        """A normal DISCONNECT; returns once the broker closed its side too.

        The broker closes the socket only after it has finished with the session (will discarded,
        clean session ended), so whatever a test does next happens after that.
        """
        try:
            self.send(c.Disconnect())
            self.sock.shutdown(socket.SHUT_WR)
            self.wait_closed(timeout)
        except OSError:
            pass  # already closed by the broker
        finally:
            self.close()

    def drop(self, timeout: float = WAIT) -> list:
        """End the connection without DISCONNECT and return once the broker closed its side.

        Like ``close`` for MQTT (the will is published), but the broker has handled everything sent
        before when this returns, so a reconnect with the same client id is no takeover race.
        Returns the packets the broker sent meanwhile.
        """
        self.sock.shutdown(socket.SHUT_WR)
        return self.wait_closed(timeout)

    def close(self) -> None:
        """Close the socket without DISCONNECT (an ungraceful close as far as MQTT knows)."""
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    # -- receiving ---------------------------------------------------------------------------

    def _read(self, deadline: float) -> bool:
        """Read once from the socket into ``pending``; False at end of stream."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            return False
        self.pending.extend(self.decoder.feed(data))
        return True

    def recv(self, timeout: float = WAIT) -> Any:
        """The next packet from the broker; ConnectionClosed at end of stream, AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            try:
                if not self._read(deadline):
                    raise ConnectionClosed("broker closed the connection")
            except TimeoutError:
                raise AssertionError(f"no packet from the broker within {timeout}s") from None
        return self.pending.popleft()

    def publishes_so_far(self, ack: bool = True) -> list:
        """The PUBLISH packets the broker sent so far (bounded by a ping round trip: a PINGRESP
        follows them), each acknowledged if ``ack``."""
        self.send(c.Pingreq())
        got = []
        while True:
            packet = self.recv()
            if isinstance(packet, c.Pingresp):
                return got
            if isinstance(packet, c.Publish):
                got.append(packet)
                if ack:
                    self.ack(packet)

    def expect(self, kind: type, timeout: float = WAIT) -> Any:
        """The next packet, which must be of class ``kind``."""
        packet = self.recv(timeout)
        assert isinstance(packet, kind), f"expected {kind.__name__}, got {packet!r}"
        return packet

    def wait_for(self, predicate: Callable[[Any], bool], timeout: float = WAIT) -> Any:
        """The first packet matching ``predicate``; the others received meanwhile stay pending in order."""
        deadline = time.monotonic() + timeout
        skipped: list = []
        try:
            while True:
                packet = self.recv(max(0.0, deadline - time.monotonic()))
                if predicate(packet):
                    return packet
                skipped.append(packet)
        finally:
            self.pending.extendleft(reversed(skipped))

    def collect_until(self, predicate: Callable[[Any], bool], timeout: float = WAIT) -> tuple[list, Any]:
        """(packets before the first matching one, the matching one); used with a sentinel message."""
        deadline = time.monotonic() + timeout
        before: list = []
        while True:
            packet = self.recv(max(0.0, deadline - time.monotonic()))
            if predicate(packet):
                return before, packet
            before.append(packet)

    def wait_closed(self, timeout: float = WAIT) -> list:
        """Wait until the broker closes the connection; returns the packets it sent before that."""
        deadline = time.monotonic() + timeout
        got = list(self.pending)
        self.pending.clear()
        try:
            while self._read(deadline):
                got.extend(self.pending)
                self.pending.clear()
        except TimeoutError:
            raise AssertionError(f"connection still open after {timeout}s; received {got!r}") from None
        except Exception as exc:  # the broker's bytes did not decode: still report what came
            raise AssertionError(f"undecodable bytes from the broker after {got!r}: {exc!r}") from exc
        self.close()
        return got

    def answers_ping(self, timeout: float = WAIT) -> bool:
        """True when the broker answers a PINGREQ; False once it has closed the connection (what it
        sent before closing, a DISCONNECT say, is dropped). AssertionError if it is open and silent."""
        try:
            self.send(c.Pingreq())
            self.wait_for(lambda p: isinstance(p, c.Pingresp), timeout)
        except (ConnectionClosed, OSError):
            return False
        return True

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def raw_connected(
    node: Any,
    client_id: str,
    version: int = 4,
    clean: bool = True,
    keepalive: int = 60,
    will: Any = None,
    properties: dict | None = None,
) -> RawClient:
    """A RawClient whose CONNECT was accepted."""
    client = RawClient.to(node, version)
    connack = client.connect(client_id, clean, keepalive, will, properties)
    assert connack.reason_code == 0, connack
    return client


def end_session(node: Any, client_id: str) -> None:
    """Drop the stored session of ``client_id`` (a clean session connect, then DISCONNECT)."""
    with RawClient.to(node) as client:
        client.connect(client_id, clean=True)
        client.disconnect()


def new_paho(client_id: str, protocol: int, **kwargs: Any) -> mqtt.Client:
    """A paho-mqtt 2.x client that never reconnects on its own: a client the broker closed must
    stay closed. ``kwargs`` go to ``mqtt.Client`` (transport, clean_session)."""
    return mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=protocol,
        reconnect_on_failure=False,
        **kwargs,
    )


def close_socket(client: mqtt.Client) -> None:
    """Close a paho client's socket, if it has one (no DISCONNECT)."""
    sock = client.socket()
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


class PahoThread:
    """What the paho wrappers share: a paho-mqtt 2.x client driven by its own loop thread, its
    messages in a queue, its SUBACKs by message id, bounded waits. A subclass sets ``connack`` in
    ``_on_connect`` and defines ``disconnect``."""

    def __init__(self, node: Any, client: mqtt.Client, keepalive: int) -> None:
        self.client = client
        self.node = node
        self.keepalive = keepalive
        self.messages: queue.Queue = queue.Queue()
        self.connack: tuple | None = None
        self.disconnect_reason: ReasonCode | None = None
        self._connected = threading.Event()
        self._disconnected = threading.Event()
        self._subacks: dict[int, list] = {}
        self._suback_event = threading.Condition()
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect

    # -- callbacks (paho's thread) -------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        raise NotImplementedError

    def _on_message(self, client, userdata, msg) -> None:
        self.messages.put(msg)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._suback_event:
            self._subacks[mid] = list(reason_codes)
            self._suback_event.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.disconnect_reason = reason_code
        self._disconnected.set()

    # -- actions ---------------------------------------------------------------------------------

    def _connect(self, timeout: float, **kwargs: Any) -> tuple:
        """Connect (``kwargs``: paho's clean_start, properties) and wait for the CONNACK."""
        self.client.connect(self.node.host, self.node.mqtt_port, self.keepalive, **kwargs)
        self.client.loop_start()
        assert self._connected.wait(timeout), "no CONNACK within the bound"
        return self.connack

    def _suback(self, subscribed: tuple[int, int], topic: Any, timeout: float) -> list:
        """The reason codes of the SUBACK of ``subscribed`` (paho's ``subscribe`` result)."""
        result, mid = subscribed
        assert result == mqtt.MQTT_ERR_SUCCESS, result
        deadline = time.monotonic() + timeout
        with self._suback_event:
            while mid not in self._subacks:
                left = deadline - time.monotonic()
                assert left > 0, f"no SUBACK for {topic!r} within {timeout}s"
                self._suback_event.wait(left)
            return self._subacks.pop(mid)

    def publish(
        self,
        topic: str,
        payload: bytes | str = b"",
        qos: int = 0,
        retain: bool = False,
        *,
        properties: Properties | None = None,
        timeout: float = WAIT,
    ) -> Any:
        """Publish and, for QoS 1/2, wait until the broker acknowledged it (PUBACK / PUBCOMP);
        returns the MQTTMessageInfo."""
        info = self.client.publish(topic, payload, qos, retain, properties)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
        if qos:
            info.wait_for_publish(timeout)
            assert info.is_published(), f"QoS {qos} publish to {topic!r} not acknowledged within {timeout}s"
        return info

    def get(self, timeout: float = WAIT) -> mqtt.MQTTMessage:
        """The next message received; AssertionError when none comes within ``timeout``."""
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message within {timeout}s") from None

    def collect_until(self, topic: str, timeout: float = WAIT) -> tuple[list, mqtt.MQTTMessage]:
        """(messages received before the first on ``topic``, that message): the sentinel pattern."""
        deadline = time.monotonic() + timeout
        before = []
        while True:
            msg = self.get(max(0.0, deadline - time.monotonic()))
            if msg.topic == topic:
                return before, msg
            before.append(msg)

    def wait_disconnected(self, timeout: float = WAIT) -> bool:
        return self._disconnected.wait(timeout)

    def disconnect(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """End the network thread and close the socket (no DISCONNECT if still connected)."""
        self.client.loop_stop()
        close_socket(self.client)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.disconnect()


class PahoClient(PahoThread):
    """A paho-mqtt 2.x client driven by its own loop thread, with bounded waits and a message queue."""

    def __init__(
        self,
        node: Any,
        client_id: str,
        protocol: int = mqtt.MQTTv311,
        clean_session: bool = True,
        keepalive: int = 60,
    ) -> None:
        kwargs = {} if protocol == mqtt.MQTTv5 else {"clean_session": clean_session}
        super().__init__(node, new_paho(client_id, protocol, **kwargs), keepalive)
        self.protocol = protocol
        self.clean = clean_session

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connack = (reason_code, bool(flags.session_present))
        self._connected.set()

    def set_will(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.client.will_set(topic, payload, qos, retain)

    def connect(
        self, timeout: float = WAIT, clean_start: bool | None = None, properties: Properties | None = None
    ) -> tuple[ReasonCode, bool]:
        """Connect and wait for the CONNACK; returns (reason code, session present)."""
        kwargs: dict = {}
        if self.protocol == mqtt.MQTTv5:
            kwargs["clean_start"] = True if clean_start is None else clean_start
            kwargs["properties"] = properties
        return self._connect(timeout, **kwargs)

    def subscribe(self, topic: str | list, qos: int = 0, timeout: float = WAIT, **kwargs: Any) -> list:
        """Subscribe and wait for the SUBACK; returns its reason codes."""
        if isinstance(topic, list):
            return self._suback(self.client.subscribe(topic, **kwargs), topic, timeout)
        return self._suback(self.client.subscribe(topic, qos, **kwargs), topic, timeout)

    def unsubscribe(self, topic: str) -> None:
        self.client.unsubscribe(topic)

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set() and not self._disconnected.is_set()

    def disconnect(self, timeout: float = WAIT) -> None:
        """A normal DISCONNECT; waits until the loop thread ended."""
        if not self._disconnected.is_set():
            self.client.disconnect()
            self._disconnected.wait(timeout)
        self.stop()


def paho_connected(
    node: Any, client_id: str, protocol: int = mqtt.MQTTv311, clean_session: bool = True, keepalive: int = 60
) -> PahoClient:
    """A connected PahoClient (CONNACK accepted)."""
    client = PahoClient(node, client_id, protocol, clean_session, keepalive)
    rc, _ = client.connect()
    assert not rc.is_failure, rc
    return client


def unsubscribed(client: mqtt.Client, topic: str, timeout: float = WAIT) -> None:
    """UNSUBSCRIBE ``topic`` on a connected paho ``client`` and wait for its UNSUBACK. paho hands
    the packets over in the order they came, so what the broker sent for ``topic`` before (a $SYS
    republish that crossed the UNSUBSCRIBE) has reached ``on_message`` when this returns, and
    nothing for it follows."""
    acked: set[int] = set()
    cond = threading.Condition()

    def on_unsubscribe(cl, userdata, mid, reason_codes, properties) -> None:
        with cond:
            acked.add(mid)
            cond.notify_all()

    client.on_unsubscribe = on_unsubscribe
    try:
        result, mid = client.unsubscribe(topic)
        assert result == mqtt.MQTT_ERR_SUCCESS, result
        with cond:
            assert cond.wait_for(lambda: mid in acked, timeout), (
                f"no UNSUBACK for {topic!r} within {timeout}s"
            )
    finally:
        client.on_unsubscribe = None


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
