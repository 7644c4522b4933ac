"""paho-mqtt clients for the listener tests: any transport (tcp, websockets) with or without TLS.

::

    sub = PahoTransportClient("sub", transport="websockets", path="/mqtt", ca_file=ca.cert_file)
    sub.connect(port)                       # waits for the CONNACK; raises Refused if there is none
    sub.subscribe("t/#", 1)
    pub.publish("t/x", b"hi", 1)
    assert sub.get().payload == b"hi"

Every wait is bounded; the network loop never reconnects by itself.
"""

from __future__ import annotations

import queue
import ssl
import threading

import paho.mqtt.client as mqtt

from tests.e2e.mqttraw import close_socket, new_paho

HOST = "127.0.0.1"
WAIT = 10.0


class Refused(AssertionError):
    """The connection did not reach an accepted CONNACK (TLS refusal, closed socket, refused code)."""


class PahoTransportClient:
    """A paho 2.x client with a loop thread, a message queue and bounded waits."""

    def __init__(
        self,
        client_id: str,
        transport: str = "tcp",
        path: str = "/mqtt",
        ca_file: str | None = None,
        cert=None,
        protocol: int = mqtt.MQTTv311,
        headers: dict | None = None,
    ) -> None:
        self.client = new_paho(client_id, protocol, transport=transport)
        if transport == "websockets":
            self.client.ws_set_options(path=path, headers=headers)
        if ca_file is not None:
            self.client.tls_set(
                ca_certs=ca_file,
                certfile=cert.cert_file if cert else None,
                keyfile=cert.key_file if cert else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        self.messages: queue.Queue = queue.Queue()
        self.reason_code = None
        self._connack = threading.Event()
        self._closed = threading.Event()
        self._subacks: dict[int, list] = {}
        self._suback = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda client, userdata, msg: self.messages.put(msg)
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = lambda *args: self._closed.set()
        self._looping = False

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.reason_code = reason_code
        self._connack.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._suback:
            self._subacks[mid] = list(reason_codes)
            self._suback.notify_all()

    def connect(self, port: int, timeout: float = WAIT) -> None:
        """Connect and wait for an accepted CONNACK; ``Refused`` otherwise."""
        try:
            self.client.connect(HOST, port, keepalive=30)
        except (OSError, ssl.SSLError, mqtt.WebsocketConnectionError) as exc:
            raise Refused(f"connect failed: {exc!r}") from None
        self.client.loop_start()
        self._looping = True
        deadline_hit = not self._wait_connack_or_close(timeout)
        if deadline_hit:
            raise Refused("no CONNACK within the bound")
        if not self._connack.is_set() or self.reason_code is None or self.reason_code.is_failure:
            raise Refused(f"closed without an accepted CONNACK ({self.reason_code})")

    def _wait_connack_or_close(self, timeout: float) -> bool:
        step = 0.05
        waited = 0.0
        while waited < timeout:
            if self._connack.wait(step) or self._closed.is_set():
                return True
            waited += step
        return False

    def subscribe(self, topic: str, qos: int = 0, timeout: float = WAIT) -> list:
        result, mid = self.client.subscribe(topic, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS, result
        with self._suback:
            assert self._suback.wait_for(lambda: mid in self._subacks, timeout), f"no SUBACK for {topic}"
            return self._subacks.pop(mid)

    def publish(self, topic: str, payload: bytes, qos: int = 0, timeout: float = WAIT) -> None:
        info = self.client.publish(topic, payload, qos)
        if qos:
            info.wait_for_publish(timeout)
            assert info.is_published(), f"publish to {topic} not acknowledged"

    def get(self, timeout: float = WAIT) -> mqtt.MQTTMessage:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message within {timeout}s") from None

    def close(self) -> None:
        if self._connack.is_set() and not self._closed.is_set():
            self.client.disconnect()
            self._closed.wait(WAIT)
        if self._looping:
            self.client.loop_stop()
        close_socket(self.client)

    def __enter__(self) -> PahoTransportClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def refused(port: int, client_id: str, **kwargs) -> bool:
    """True when a client made with ``kwargs`` cannot get an accepted CONNACK from ``port``."""
    client = PahoTransportClient(client_id, **kwargs)
    try:
        client.connect(port)
    except Refused:
        return True
    finally:
        client.close()
    return False


def port_of(addr: str) -> int:
    return int(addr.rpartition(":")[2])
