"""Safe by default (issue 17 item 11), as Mosquitto 2: a listener bound to a non-loopback address
takes no anonymous client unless ``auth.allow_anonymous: true`` says so, or a password file / HTTP
auth service checks user names. The node starts (a config copied from the reference documents
starts, issue 15) and says so in one warning line per exposed listener; loopback listeners stay
anonymous (the quick start).

Every node binds ``0.0.0.0`` (exposed by its bind address, which is what decides) and every client
connects to 127.0.0.1: no traffic leaves the machine.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fluxmq._core import codec as c
from tests.conftest import REPO_ROOT, NodeFactory, RunningNode, free_port
from tests.e2e.listener_clients import PahoTransportClient
from tests.e2e.mqttraw import RawClient, unique
from tests.e2e.test_http_bridge import http_request

pytestmark = pytest.mark.e2e

RC_NOT_AUTHORIZED = 5  # MQTT 3.1.1 CONNACK return code 5 (3.2.2.3)
NOT_AUTHORIZED = 0x87  # MQTT 5.0 CONNACK reason code 0x87 (3.2.2.2)


def exposed_node(node_factory: NodeFactory, **overrides: object) -> RunningNode:
    """A node whose MQTT TCP listener and HTTP bridge are on every interface, its WebSocket on loopback."""
    return node_factory(
        {
            "server.tcp.plain.addr": f"0.0.0.0:{free_port()}",
            "server.http.plain.addr": f"0.0.0.0:{free_port()}",
            "server.websocket.plain.addr": f"127.0.0.1:{free_port()}",
            "storage.type": "memory",
            **overrides,
        }
    )


def connack(node: RunningNode, version: int, username: str | None = None, password: bytes | None = None):
    with RawClient.to(node, version) as client:
        return client.connect(unique("anon"), username=username, password=password)


def bridge_publish(node: RunningNode, credentials: tuple[str, str] | None = None) -> tuple[int, dict, object]:
    headers = {"Content-Type": "application/json"}
    if credentials is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
    return http_request(
        node, "POST", "/publish", json.dumps({"topic": "anon/t", "payload": "x"}).encode(), headers
    )


def ws_anonymous_accepted(node: RunningNode) -> bool:
    port = int(node.config["server"]["websocket"]["plain"]["addr"].rpartition(":")[2])
    client = PahoTransportClient(unique("ws"), transport="websockets")
    try:
        client.connect(port)
        return True
    finally:
        client.close()


def warnings_of(node: RunningNode) -> list[str]:
    return [line for line in node.log_text().splitlines() if "anonymous_refused_on_network_listener" in line]


def test_network_listener_starts_and_refuses_anonymous_clients(node_factory: NodeFactory) -> None:
    """MQTT 3.1.1 CONNACK 5 and 5.0 CONNACK 0x87 (with a reason string naming the key) on the exposed
    TCP listener, 401 on the exposed bridge; the loopback WebSocket listener still takes anonymous."""
    n = exposed_node(node_factory)
    lines = warnings_of(n)
    assert len(lines) == 2, n.log_tail()
    tcp_line = next(line for line in lines if "server.tcp.plain.addr" in line)
    assert "WARNING" in tcp_line and f"0.0.0.0:{n.mqtt_port}" in tcp_line
    assert "auth.allow_anonymous: true" in tcp_line and "auth.password_file" in tcp_line
    assert any("server.http.plain.addr" in line for line in lines)

    assert connack(n, 4).reason_code == RC_NOT_AUTHORIZED
    refused = connack(n, 5)
    assert refused.reason_code == NOT_AUTHORIZED
    reason = refused.properties[c.REASON_STRING]
    assert "anonymous" in reason and "network listener" in reason and "auth.allow_anonymous" in reason
    # A user name nothing can check is no credential either (no password file, no HTTP service).
    assert connack(n, 4, "mallory", b"x").reason_code == RC_NOT_AUTHORIZED

    status, headers, body = bridge_publish(n)
    assert status == 401 and "auth.allow_anonymous" in body["error"], body
    assert headers["www-authenticate"].startswith("Basic")

    assert ws_anonymous_accepted(n)  # loopback: the quick start keeps working
    assert n.stop() == 0


def test_allow_anonymous_true_opens_a_network_listener(node_factory: NodeFactory) -> None:
    n = exposed_node(node_factory, **{"auth.allow_anonymous": True})
    assert warnings_of(n) == []
    assert connack(n, 4).reason_code == 0
    assert connack(n, 5).reason_code == 0
    assert bridge_publish(n)[0] == 200
    assert n.stop() == 0


def test_password_file_users_connect_on_a_network_listener(node_factory: NodeFactory, tmp_path: Path) -> None:
    """With a password file the usual rules hold: its users connect, anonymous is refused (``auto``)."""
    pwfile = tmp_path / "passwd"
    subprocess.run(
        [sys.executable, "-m", "fluxmq.auth.password_file", "-c", "-b", str(pwfile), "alice", "s3cret"],
        check=True,
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=30,
    )
    n = exposed_node(node_factory, **{"auth.password_file": str(pwfile)})
    assert warnings_of(n) == []
    assert connack(n, 4, "alice", b"s3cret").reason_code == 0
    assert connack(n, 5, "alice", b"s3cret").reason_code == 0
    assert connack(n, 4).reason_code == RC_NOT_AUTHORIZED
    assert bridge_publish(n, ("alice", "s3cret"))[0] == 200
    assert bridge_publish(n)[0] == 401
    assert n.stop() == 0


def test_enhanced_authentication_connects_on_a_network_listener(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    """A SCRAM-SHA-256 exchange (MQTT 5.0 4.12) authenticates the client: the refusal is for CONNECTs
    nothing authenticates."""
    from fluxmq.broker.auth_enhanced import ScramCredential
    from tests.e2e.test_mqtt5_enhanced_auth import METHOD, PASSWORD, USER, scram_connect

    creds = tmp_path / "scram.txt"
    creds.write_text(ScramCredential.from_password(PASSWORD).line(USER) + "\n")
    n = exposed_node(
        node_factory, **{"auth.enhanced.method": METHOD, "auth.enhanced.credentials_file": str(creds)}
    )
    client, answer, _ = scram_connect(n)
    try:
        assert isinstance(answer, c.Connack) and answer.reason_code == 0, answer
    finally:
        client.close()
    assert connack(n, 5).reason_code == NOT_AUTHORIZED
    assert n.stop() == 0
