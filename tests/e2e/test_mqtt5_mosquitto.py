"""Interop with Debian's mosquitto-clients speaking MQTT 5.0 (``-V 5``): properties set with ``-D``,
message expiry and topic aliases in both directions."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

import pytest

from fluxmq._core import codec as c
from tests.e2e.mqtt5raw import module_node, raw5, unique

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        shutil.which("mosquitto_sub") is None or shutil.which("stdbuf") is None,
        reason="mosquitto-clients and coreutils stdbuf are needed",
    ),
]

BOUND = 15  # seconds: every mosquitto client run is bounded by this (-W, or the subprocess timeout)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with module_node(tmp_path_factory) as n:
        yield n


def pub(node, *args: str) -> None:
    """Run ``mosquitto_pub -V 5`` with ``args``; it must succeed."""
    result = subprocess.run(
        ["mosquitto_pub", "-V", "5", "-h", node.host, "-p", str(node.mqtt_port), *args],
        capture_output=True,
        text=True,
        timeout=BOUND,
    )
    assert result.returncode == 0, result.stderr + result.stdout


class Sub:
    """``mosquitto_sub -V 5 -d`` in the background: the debug lines say when the SUBACK came."""

    def __init__(self, node, *args: str) -> None:
        cmd = [
            "stdbuf",
            "-oL",
            "mosquitto_sub",
            "-V",
            "5",
            "-h",
            node.host,
            "-p",
            str(node.mqtt_port),
            "-d",
            "-W",
            str(BOUND),
            *args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._subscribed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        assert self._subscribed.wait(BOUND), f"mosquitto_sub got no SUBACK: {self.lines}"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if "SUBACK" in line:
                self._subscribed.set()

    def output(self) -> list[str]:
        """Wait for the process (``-C n`` ends it) and return its non-debug lines."""
        try:
            code = self.proc.wait(BOUND + 5)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        assert code == 0, f"mosquitto_sub exited {code}: {self.lines}"
        return [ln for ln in self.lines if not ln.startswith(("Client ", "Subscribed (mid"))]


def test_mosquitto_pub_properties_reach_a_5_0_subscriber(node) -> None:
    """``mosquitto_pub -V 5 -D publish user-property a b`` and the other PUBLISH properties arrive
    unaltered, user properties in order with duplicates."""
    topic = unique("mq/props")
    sub = raw5(node, unique("mq-props-sub"))
    try:
        sub.subscribe(1, (topic, 1))
        pub(
            node,
            "-t",
            topic,
            "-m",
            "hello",
            "-q",
            "1",
            "-D",
            "publish",
            "user-property",
            "a",
            "b",
            "-D",
            "publish",
            "user-property",
            "a",
            "c",
            "-D",
            "publish",
            "content-type",
            "text/plain",
            "-D",
            "publish",
            "response-topic",
            "reply/here",
            "-D",
            "publish",
            "correlation-data",
            "corr-7",
            "-D",
            "publish",
            "payload-format-indicator",
            "1",
            "-D",
            "publish",
            "message-expiry-interval",
            "120",
        )
        got = sub.expect(c.Publish)
        sub.ack(got)
        p = got.properties
        assert got.payload == b"hello"
        assert p[c.USER_PROPERTY] == [("a", "b"), ("a", "c")]
        assert (
            p[c.CONTENT_TYPE],
            p[c.RESPONSE_TOPIC],
            p[c.CORRELATION_DATA],
            p[c.PAYLOAD_FORMAT_INDICATOR],
        ) == ("text/plain", "reply/here", b"corr-7", 1)
        assert 119 <= p[c.MESSAGE_EXPIRY_INTERVAL] <= 120
    finally:
        sub.disconnect()


def test_mosquitto_sub_prints_the_properties(node) -> None:
    """A 5.0 publisher's properties, as ``mosquitto_sub -V 5 -F`` prints them."""
    topic = unique("mq/subprops")
    sub = Sub(node, "-t", topic, "-C", "1", "-F", "%t|%p|%P|%C|%R|%D|%F|%E")
    client = raw5(node, unique("mq-subprops-pub"))
    try:
        client.publish(
            topic,
            b"body",
            1,
            packet_id=1,
            properties={
                c.USER_PROPERTY: [("k", "v1"), ("k", "v2")],
                c.CONTENT_TYPE: "ct",
                c.RESPONSE_TOPIC: "rt",
                c.CORRELATION_DATA: b"cd",
                c.PAYLOAD_FORMAT_INDICATOR: 1,
                c.MESSAGE_EXPIRY_INTERVAL: 300,
            },
        )
    finally:
        client.disconnect()
    (line,) = sub.output()
    fields = line.split("|")
    assert fields[:7] == [topic, "body", "k:v1 k:v2", "ct", "rt", "cd", "1"]
    assert 299 <= int(fields[7]) <= 300


def test_retained_message_expiry_with_mosquitto_clients(node) -> None:
    """A retained message published with ``message-expiry-interval 1`` is gone after that second; one
    with 60 is served with the time it has left."""
    base = unique("mq/exp")
    pub(node, "-t", base + "/short", "-m", "short", "-r", "-D", "publish", "message-expiry-interval", "1")
    pub(node, "-t", base + "/long", "-m", "long", "-r", "-D", "publish", "message-expiry-interval", "60")
    time.sleep(1.6)
    try:
        sub = Sub(node, "-t", base + "/#", "-C", "1", "-F", "%t|%p|%E|%r")
        (line,) = sub.output()
        topic, payload, expiry, retained = line.split("|")
        assert (topic, payload, retained) == (base + "/long", "long", "1")
        assert int(expiry) <= 59
    finally:
        pub(node, "-t", base + "/long", "-r", "-n")


def test_mosquitto_pub_topic_alias(node) -> None:
    """``mosquitto_pub -D publish topic-alias 1`` with several lines: the broker resolves the alias."""
    topic = unique("mq/alias")
    sub = raw5(node, unique("mq-alias-sub"))
    try:
        sub.subscribe(1, (topic, 0))
        subprocess.run(
            [
                "mosquitto_pub",
                "-V",
                "5",
                "-h",
                node.host,
                "-p",
                str(node.mqtt_port),
                "-t",
                topic,
                "-l",
                "-D",
                "publish",
                "topic-alias",
                "1",
            ],
            input="one\ntwo\nthree\n",
            capture_output=True,
            text=True,
            timeout=BOUND,
            check=True,
        )
        got = [sub.expect(c.Publish) for _ in range(3)]
        assert [(p.topic, p.payload) for p in got] == [(topic, b"one"), (topic, b"two"), (topic, b"three")]
        assert all(c.TOPIC_ALIAS not in p.properties for p in got)
    finally:
        sub.disconnect()


def test_mosquitto_sub_receives_with_outbound_topic_aliases(node) -> None:
    """``mosquitto_sub -D connect topic-alias-maximum 2`` gets PUBLISHes that set aliases (``%A``), with
    the least recently used one reassigned for a third topic.

    Only first uses of a topic are sent here: libmosquitto 2.0 (Debian's mosquitto-clients 2.0.11) takes
    a PUBLISH with an empty topic name as a protocol error although it announced a Topic Alias Maximum,
    so a repeated topic (alias alone) would end its connection; the raw-client tests in
    test_mqtt5_aliases.py cover that half.
    """
    base = unique("mq/outalias")
    topics = [base + "/1", base + "/2", base + "/3"]
    sub = Sub(
        node,
        "-t",
        base + "/#",
        "-C",
        str(len(topics)),
        "-F",
        "%t|%A|%p",
        "-D",
        "connect",
        "topic-alias-maximum",
        "2",
    )
    client = raw5(node, unique("mq-outalias-pub"))
    try:
        for i, topic in enumerate(topics, 1):
            client.publish(topic, str(i).encode(), 1, packet_id=i)
    finally:
        client.disconnect()
    rows = [line.split("|") for line in sub.output()]
    assert rows == [[base + "/1", "1", "1"], [base + "/2", "2", "2"], [base + "/3", "1", "3"]]


def test_mosquitto_session_expiry_and_offline_delivery(node) -> None:
    """``mosquitto_sub -c -x 60`` keeps its session; a QoS 1 message sent meanwhile is delivered on return."""
    topic = unique("mq/sess")
    cid = unique("mq-sess")
    first = Sub(node, "-t", topic, "-q", "1", "-i", cid, "-c", "-x", "60", "-C", "1", "-F", "%p")
    pub(node, "-t", topic, "-m", "online", "-q", "1")
    assert first.output() == ["online"]
    pub(node, "-t", topic, "-m", "while-away", "-q", "1")
    again = subprocess.run(
        [
            "mosquitto_sub",
            "-V",
            "5",
            "-h",
            node.host,
            "-p",
            str(node.mqtt_port),
            "-t",
            topic,
            "-q",
            "1",
            "-i",
            cid,
            "-c",
            "-x",
            "0",
            "-C",
            "1",
            "-W",
            str(BOUND),
            "-F",
            "%p",
        ],
        capture_output=True,
        text=True,
        timeout=BOUND + 5,
    )
    assert again.returncode == 0 and again.stdout.split() == ["while-away"], again.stdout + again.stderr
