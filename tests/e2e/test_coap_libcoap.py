"""The CoAP bridge of a real node driven by libcoap's own command-line client (Debian's libcoap3-bin).

README's CoAP examples are ``coap-client-notls`` and ``coap-client-openssl`` command lines; these
tests run them as written against a node, so a second, independent CoAP implementation (C, not
aiocoap) is held to the same answers. MQTT subscribers are paho; every wait is bounded.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import NodeFactory, RunningNode, free_port
from tests.e2e.mqttraw import paho_connected, unique

pytestmark = pytest.mark.e2e  # no skip: scripts/test installs libcoap3-bin, and a missing one fails

WAIT = 10.0
PSK_IDENTITY = "sensor-7"
PSK_KEY = "secret-psk-7"


def coap_client(binary: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary, "-B", "10", *args], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    d: Path = tmp_path_factory.mktemp("libcoap")
    (d / "psk").write_text(f"{PSK_IDENTITY}:{PSK_KEY.encode().hex()}\n")
    factory = NodeFactory(tmp_path_factory.mktemp("node"))
    try:
        yield factory(
            {
                "server.coap.plain.addr": f"127.0.0.1:{free_port()}",
                "server.coap.dtls.addr": f"127.0.0.1:{free_port()}",
                "server.coap.dtls.psk_file": str(d / "psk"),
                "storage.type": "memory",
            }
        )
    finally:
        factory.close()


def base(node: RunningNode, section: str = "plain") -> str:
    port = int(node.config["server"]["coap"][section]["addr"].rpartition(":")[2])
    scheme = "coap" if section == "plain" else "coaps"
    return f"{scheme}://127.0.0.1:{port}"


def test_post_from_coap_client_reaches_an_mqtt_subscriber(node: RunningNode) -> None:
    topic = f"sensors/{unique('lc')}/temp"
    with paho_connected(node, unique("sub")) as sub:
        sub.subscribe(topic, 1)
        done = coap_client(
            "coap-client-notls", "-m", "post", "-e", "21.5", f"{base(node)}/mqtt/publish/{topic}?qos=1"
        )
        assert done.returncode == 0, done.stderr
        msg = sub.get(WAIT)
        assert (msg.topic, msg.payload, msg.qos) == (topic, b"21.5", 1)


def test_put_retains_and_get_reads_it_back(node: RunningNode) -> None:
    topic = f"lamp/{unique('lc')}/state"
    put = coap_client(
        "coap-client-notls",
        "-m",
        "put",
        "-t",
        "json",
        "-e",
        '{"on":true}',
        f"{base(node)}/{topic}?retain=true",
    )
    assert put.returncode == 0, put.stderr
    got = coap_client("coap-client-notls", f"{base(node)}/{topic}")
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == '{"on":true}'
    missing = coap_client("coap-client-notls", f"{base(node)}/lamp/{unique('none')}")
    assert "4.04" in missing.stdout + missing.stderr


def test_observe_gets_a_publish_made_over_mqtt(node: RunningNode) -> None:
    room = unique("lc")
    observer = subprocess.Popen(
        ["coap-client-notls", "-B", "20", "-s", "6", f"{base(node)}/lamp/{room}/%23"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with paho_connected(node, unique("pub")) as pub:
            # The observation is registered when the first notification (4.04 or empty) is sent;
            # publish until the observer's output shows the payload, bounded.
            for i in range(40):
                pub.publish(f"lamp/{room}/1", f"on-{i}", qos=1)
                try:
                    out, err = observer.communicate(timeout=0.25)
                    break
                except subprocess.TimeoutExpired:
                    continue
            else:
                out, err = observer.communicate(timeout=30)
    finally:
        if observer.poll() is None:
            observer.kill()
            observer.wait(10)
    assert "on-" in out, (out, err)


def test_psk_client_publishes_over_dtls(node: RunningNode) -> None:
    topic = f"sensors/{unique('psk')}/t"
    with paho_connected(node, unique("sub")) as sub:
        sub.subscribe(topic, 1)
        done = coap_client(
            "coap-client-openssl",
            "-u",
            PSK_IDENTITY,
            "-k",
            PSK_KEY,
            "-m",
            "post",
            "-e",
            "22",
            f"{base(node, 'dtls')}/{topic}",
        )
        assert done.returncode == 0, done.stderr
        msg = sub.get(WAIT)
        assert (msg.topic, msg.payload) == (topic, b"22")
