"""The issue's own commands: Debian's ``mosquitto_sub`` / ``mosquitto_pub`` against a node (3.1.1, 3.1, 5.0)."""

from __future__ import annotations

import shutil
import subprocess
import threading

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.e2e.mqttraw import paho_connected, unique

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        shutil.which("mosquitto_sub") is None or shutil.which("stdbuf") is None,
        reason="mosquitto-clients (and coreutils stdbuf) needed",
    ),
]

WAIT_SECONDS = 15  # mosquitto_sub -W: its own bound on the whole exchange


class Subscriber:
    """``mosquitto_sub`` in debug mode (``-d``), so the test knows when its SUBACK arrived."""

    def __init__(self, node, *args: str) -> None:
        # stdbuf: mosquitto_sub block-buffers a piped stdout, which would hide the SUBACK line
        cmd = ["stdbuf", "-oL", "mosquitto_sub", "-h", node.host, "-p", str(node.mqtt_port), "-d", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._subscribed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if "SUBACK" in line:
                self._subscribed.set()

    def wait_subscribed(self, timeout: float = WAIT_SECONDS) -> None:
        assert self._subscribed.wait(timeout), f"mosquitto_sub got no SUBACK: {self.lines}"

    def finish(self, timeout: float = WAIT_SECONDS + 10) -> list[str]:
        """Wait for the process to end (``-C 1`` / ``-W``); its output lines without the debug ones."""
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        assert code == 0, f"mosquitto_sub exited {code}: {self.lines}"
        return [ln for ln in self.lines if not ln.startswith(("Client ", "Subscribed (mid"))]  # debug lines


def mosquitto_pub(node, *args: str) -> None:
    result = subprocess.run(
        ["mosquitto_pub", "-h", node.host, "-p", str(node.mqtt_port), *args],
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS,
    )
    assert result.returncode == 0, result


@pytest.mark.parametrize("version", ["mqttv311", "mqttv31", "mqttv5"])
def test_mosquitto_sub_receives_mosquitto_pub_qos2(node, version: str) -> None:
    """``mosquitto_sub -t 'a/#' -v`` receives what ``mosquitto_pub -t a/b -m hi -q 2`` sends."""
    # The topics exactly; other tests of this module use unique ones, so nothing else lands here.
    sub = Subscriber(node, "-V", version, "-t", "a/#", "-v", "-C", "1", "-W", str(WAIT_SECONDS))
    sub.wait_subscribed()
    mosquitto_pub(node, "-V", version, "-t", "a/b", "-m", "hi", "-q", "2")
    assert sub.finish() == ["a/b hi"]


@pytest.mark.parametrize(
    "sub_version,pub_version", [("mqttv311", "mqttv5"), ("mqttv5", "mqttv31"), ("mqttv31", "mqttv311")]
)
def test_mosquitto_across_versions(node, sub_version: str, pub_version: str) -> None:
    topic = unique("mixed")
    sub = Subscriber(
        node, "-V", sub_version, "-t", f"{topic}/#", "-v", "-q", "1", "-C", "1", "-W", str(WAIT_SECONDS)
    )
    sub.wait_subscribed()
    mosquitto_pub(node, "-V", pub_version, "-t", f"{topic}/x", "-m", "across", "-q", "1")
    assert sub.finish() == [f"{topic}/x across"]


def test_mosquitto_sub_311_and_50_get_the_same_qos0_bytes(node, tmp_path) -> None:
    """QoS 0 from 3.1.1 and 5.0 ``mosquitto_pub`` to a 3.1.1 and a 5.0 ``mosquitto_sub`` (the
    relay writes each subscriber's frame from the publisher's read buffer, in the subscriber's
    version): both print the same topics and payload bytes (``%x``: hex), an empty payload, a binary
    one and one whose frame needs a two-byte Remaining Length included."""
    topic = unique("q0bytes")
    payloads = [b"", b"\x00\xff binary", b"y" * 200]
    args = (
        "-t",
        f"{topic}/#",
        "-F",
        "%t %x",
        "-q",
        "0",
        "-C",
        str(2 * len(payloads)),
        "-W",
        str(WAIT_SECONDS),
    )
    subs = [Subscriber(node, "-V", version, *args) for version in ("mqttv311", "mqttv5")]
    for sub in subs:
        sub.wait_subscribed()
    for pub_version in ("mqttv311", "mqttv5"):
        for i, payload in enumerate(payloads):
            path = tmp_path / f"payload{i}"
            path.write_bytes(payload)
            mosquitto_pub(node, "-V", pub_version, "-t", f"{topic}/{pub_version}", "-f", str(path))
    want = [f"{topic}/{v} {p.hex()}".rstrip() for v in ("mqttv311", "mqttv5") for p in payloads]
    got = [[line.rstrip() for line in sub.finish()] for sub in subs]
    assert got[0] == got[1] == want


def test_mosquitto_retained_then_sub(node) -> None:
    """``mosquitto_pub -r`` then a later ``mosquitto_sub`` gets the retained message; ``-n -r`` clears it."""
    topic = unique("mretained")
    mosquitto_pub(node, "-t", topic, "-m", "kept", "-r", "-q", "1")
    sub = Subscriber(node, "-t", topic, "-v", "-C", "1", "-W", str(WAIT_SECONDS))
    assert sub.finish() == [f"{topic} kept"]
    mosquitto_pub(node, "-t", topic, "-n", "-r", "-q", "1")
    # cleared: a paho subscriber gets only a later live message
    check = paho_connected(node, unique("mretained-check"))
    try:
        check.subscribe(topic, 1)
        check.publish(topic, b"live", 1)
        assert check.get().payload == b"live"
    finally:
        check.disconnect()


def test_mosquitto_pub_v5_user_property_reaches_paho_v5(node) -> None:
    """``mosquitto_pub -V 5 -D publish user-property a b``: a paho 5.0 subscriber gets the user property."""
    topic = unique("userprop")
    sub = paho_connected(node, unique("paho5-sub"), protocol=mqtt.MQTTv5)
    try:
        sub.subscribe(topic, 1)
        mosquitto_pub(
            node,
            "-V",
            "5",
            "-t",
            topic,
            "-m",
            "with props",
            "-q",
            "1",
            "-D",
            "publish",
            "user-property",
            "a",
            "b",
        )
        msg = sub.get()
        assert msg.payload == b"with props"
        assert msg.properties.UserProperty == [("a", "b")]
    finally:
        sub.disconnect()


def test_mosquitto_sub_v5_sees_user_property(node) -> None:
    """The other way: paho 5.0 publishes with user properties, ``mosquitto_sub -V 5 -F %P`` prints them."""
    topic = unique("userprop-sub")
    sub = Subscriber(node, "-V", "5", "-t", topic, "-F", "%t %p %P", "-C", "1", "-W", str(WAIT_SECONDS))
    sub.wait_subscribed()
    pub = paho_connected(node, unique("paho5-pub"), protocol=mqtt.MQTTv5)
    try:
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("k1", "v1"), ("k2", "v2")]
        pub.publish(topic, b"hello", 1, properties=props)
    finally:
        pub.disconnect()
    out = sub.finish()
    assert len(out) == 1 and out[0].startswith(f"{topic} hello ")
    assert "k1:v1" in out[0] and "k2:v2" in out[0]
