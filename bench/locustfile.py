"""Locust user scenarios for an MQTT broker (fluxmq or any other), driving paho-mqtt 2.x.

Where ``bench/loadgen.py`` measures raw throughput, these are user-level scenarios with locust's
statistics (response-time percentiles per request name, failures, users ramping up):

- ``ConnectStormUser``: connect, wait for CONNACK, disconnect, again (``connect`` requests);
- ``MixedQosUser``: one connection subscribed to its own topic at QoS 1, publishing QoS 0 and QoS 1
  to it (``publish qos0`` = written, ``publish qos1`` = PUBACK received) and timing each message's
  way back (``deliver qos0/1``: end-to-end latency); messages not back by the end are failures;
- ``ManyTopicsUser``: subscribes to ``--mqtt-topics`` topics one by one (``subscribe``), then
  publishes to random ones of them and to topics nobody subscribed (routing misses).

Run headless and bounded (the host must be 127.0.0.1)::

    .venv/bin/locust -f bench/locustfile.py --headless -u 100 -r 20 --run-time 30s \\
        --host mqtt://127.0.0.1:1883 [ConnectStormUser MixedQosUser ManyTopicsUser]

Locust's custom-client pattern: each operation fires ``events.request`` with its response time.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import random
import struct
import time
from typing import Any
from urllib.parse import urlsplit

import gevent
import paho.mqtt.client as mqtt
from gevent.event import Event
from locust import User, between, constant, events, task
from locust.exception import StopUser
from paho.mqtt.enums import CallbackAPIVersion

DEFAULT_HOST = "mqtt://127.0.0.1:1883"
_STAMP = struct.Struct("<Q")  # send time (ns, CLOCK_MONOTONIC) at the start of each payload
_ids = itertools.count()


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--mqtt-topics", type=int, default=50, help="ManyTopicsUser: topics per user")
    parser.add_argument("--mqtt-payload", type=int, default=64, help="payload bytes (>= 8)")
    parser.add_argument("--mqtt-timeout", type=float, default=10.0, help="seconds to wait for a broker reply")


def broker_address(host: str | None) -> tuple[str, int]:
    """``mqtt://127.0.0.1:1883`` (or ``127.0.0.1:1883``) to (host, port); only loopback is allowed."""
    text = host or DEFAULT_HOST
    if "://" not in text:
        text = "mqtt://" + text
    u = urlsplit(text)
    if u.scheme not in ("mqtt", "tcp"):
        raise ValueError(f"unsupported scheme in {host!r} (mqtt://127.0.0.1:PORT)")
    addr = u.hostname or "127.0.0.1"
    if not ipaddress.ip_address(addr).is_loopback:
        raise ValueError(f"refusing non-loopback broker {addr} (127.0.0.1 only)")
    return addr, u.port or 1883


class MqttSession:
    """A paho client whose operations report to locust as requests (custom client pattern)."""

    def __init__(self, user: User, client_id: str, on_delivery: Any = None) -> None:
        self.env = user.environment
        self.host, self.port = broker_address(user.host)
        opts = self.env.parsed_options
        self.timeout = getattr(opts, "mqtt_timeout", 10.0) if opts else 10.0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.connected = Event()
        self.connect_rc: Any = None
        self._subacks: dict[int, Event] = {}
        self._on_delivery = on_delivery

    def _fire(self, name: str, start: float, exc: Exception | None = None, length: int = 0) -> None:
        self.env.events.request.fire(
            request_type="MQTT", name=name, response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length, exception=exc, context={},
        )  # fmt: skip

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self.connect_rc = reason_code
        self.connected.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        ev = self._subacks.get(mid)
        if ev is not None:
            ev.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if self._on_delivery is not None:
            self._on_delivery(msg, time.monotonic_ns())

    def connect(self) -> bool:
        """Connect and wait for CONNACK; reports ``connect``."""
        start = time.perf_counter()
        try:
            self.client.connect(self.host, self.port, keepalive=60)
            self.client.loop_start()
            if not self.connected.wait(self.timeout):
                raise TimeoutError("no CONNACK")
            if self.connect_rc is not None and self.connect_rc.is_failure:
                raise ConnectionError(f"CONNACK {self.connect_rc}")
        except Exception as e:
            self._fire("connect", start, e)
            self.close()
            return False
        self._fire("connect", start)
        return True

    def subscribe(self, topic_filter: str, qos: int = 0, name: str = "subscribe") -> bool:
        """Subscribe and wait for SUBACK; reports ``name``."""
        start = time.perf_counter()
        ev = Event()
        try:
            rc, mid = self.client.subscribe(topic_filter, qos)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                raise ConnectionError(mqtt.error_string(rc))
            self._subacks[mid] = ev
            if not ev.wait(self.timeout):
                raise TimeoutError("no SUBACK")
        except Exception as e:
            self._fire(name, start, e)
            return False
        finally:
            self._subacks = {k: v for k, v in self._subacks.items() if v is not ev}
        self._fire(name, start)
        return True

    def publish(self, topic: str, payload: bytes, qos: int) -> bool:
        """Publish; QoS 0 reports when written, QoS 1 when PUBACK arrives (``publish qosN``)."""
        start = time.perf_counter()
        name = f"publish qos{qos}"
        try:
            info = self.client.publish(topic, payload, qos)
            info.wait_for_publish(self.timeout)
            if not info.is_published():
                raise TimeoutError("not acknowledged" if qos else "not written")
        except Exception as e:
            self._fire(name, start, e, len(payload))
            return False
        self._fire(name, start, None, len(payload))
        return True

    def close(self) -> None:
        """DISCONNECT and stop the network loop."""
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def _payload(size: int) -> bytes:
    return _STAMP.pack(time.monotonic_ns()) + b"x" * max(0, size - _STAMP.size)


class _MqttUser(User):
    abstract = True
    host = DEFAULT_HOST

    def option(self, name: str, default: Any) -> Any:
        """A --mqtt-* command-line option."""
        opts = self.environment.parsed_options
        return getattr(opts, name, default) if opts else default

    def client_id(self, kind: str) -> str:
        """A client id unique in this locust process."""
        return f"locust-{os.getpid()}-{kind}-{next(_ids)}"


class ConnectStormUser(_MqttUser):
    """Connect, CONNACK, DISCONNECT, over and over."""

    wait_time = between(0.0, 0.05)

    @task
    def connect_disconnect(self) -> None:
        """One connect/disconnect cycle."""
        s = MqttSession(self, self.client_id("storm"))
        if s.connect():
            s.close()


class _DeliveryTracker:
    """Messages a user published to itself and is still waiting for."""

    def __init__(self, session_user: _MqttUser) -> None:
        self.user = session_user
        self.outstanding: dict[bytes, tuple[int, float]] = {}

    def sent(self, payload: bytes, qos: int) -> None:
        self.outstanding[payload[:8]] = (qos, time.perf_counter())

    def delivered(self, msg: Any, now_ns: int) -> None:
        key = msg.payload[:8]
        item = self.outstanding.pop(key, None)
        sent_ns = _STAMP.unpack_from(msg.payload)[0] if len(msg.payload) >= 8 else now_ns
        qos = item[0] if item else msg.qos
        self.user.environment.events.request.fire(
            request_type="MQTT", name=f"deliver qos{qos}", response_time=(now_ns - sent_ns) / 1e6,
            response_length=len(msg.payload), exception=None if item else KeyError("unexpected message"),
            context={},
        )  # fmt: skip

    def report_missing(self, grace: float) -> None:
        end = time.monotonic() + grace
        while self.outstanding and time.monotonic() < end:
            gevent.sleep(0.05)
        for qos, start in self.outstanding.values():
            self.user.environment.events.request.fire(
                request_type="MQTT", name=f"deliver qos{qos}", response_time=(time.perf_counter() - start) * 1000,
                response_length=0, exception=TimeoutError("not delivered"), context={},
            )  # fmt: skip
        self.outstanding.clear()


class MixedQosUser(_MqttUser):
    """One connection, subscribed to its own topic; publishes QoS 0 and QoS 1 and times the way back."""

    wait_time = constant(0.01)

    def on_start(self) -> None:
        """Connect and subscribe to this user's topic."""
        self.tracker = _DeliveryTracker(self)
        self.topic = f"bench/locust/mixed/{self.client_id('t')}"
        self.size = max(8, self.option("mqtt_payload", 64))
        self.session = MqttSession(self, self.client_id("mixed"), on_delivery=self.tracker.delivered)
        if not self.session.connect() or not self.session.subscribe(self.topic, 1):
            raise StopUser()

    def _publish(self, qos: int) -> None:
        payload = _payload(self.size)
        self.tracker.sent(payload, qos)
        if not self.session.publish(self.topic, payload, qos):
            self.tracker.outstanding.pop(payload[:8], None)

    @task(3)
    def publish_qos0(self) -> None:
        """QoS 0 to our own topic."""
        self._publish(0)

    @task(2)
    def publish_qos1(self) -> None:
        """QoS 1 to our own topic."""
        self._publish(1)

    def on_stop(self) -> None:
        """Count what did not come back, then disconnect."""
        if hasattr(self, "session"):
            self.tracker.report_missing(grace=2.0)
            self.session.close()


class ManyTopicsUser(_MqttUser):
    """Subscribes to many topics, then publishes to random ones of them and to unsubscribed topics."""

    wait_time = constant(0.01)

    def on_start(self) -> None:
        """Connect and subscribe to --mqtt-topics topics, one SUBSCRIBE each."""
        self.tracker = _DeliveryTracker(self)
        uid = self.client_id("t")
        n = max(1, self.option("mqtt_topics", 50))
        self.topics = [f"bench/locust/many/{uid}/{k}" for k in range(n)]
        self.size = max(8, self.option("mqtt_payload", 64))
        self.session = MqttSession(self, self.client_id("many"), on_delivery=self.tracker.delivered)
        if not self.session.connect():
            raise StopUser()
        for t in self.topics:
            if not self.session.subscribe(t, 1):
                raise StopUser()

    @task(4)
    def publish_subscribed(self) -> None:
        """QoS 0 or 1 to one of our topics: comes back to us."""
        qos = random.randint(0, 1)
        payload = _payload(self.size)
        self.tracker.sent(payload, qos)
        if not self.session.publish(random.choice(self.topics), payload, qos):
            self.tracker.outstanding.pop(payload[:8], None)

    @task(1)
    def publish_unsubscribed(self) -> None:
        """QoS 1 to a topic nobody subscribed: a routing miss."""
        self.session.publish(f"bench/locust/nobody/{random.randrange(100000)}", _payload(self.size), 1)

    def on_stop(self) -> None:
        """Count what did not come back, then disconnect."""
        if hasattr(self, "session"):
            self.tracker.report_missing(grace=2.0)
            self.session.close()
