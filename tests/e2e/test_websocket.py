"""MQTT over WebSocket on a real node: paho ``transport="websockets"`` (ws:// and wss://) against TCP clients,
and the upgrade refusals seen by the websocket-client package."""

from __future__ import annotations

import paho.mqtt.client as mqtt
import pytest
import websocket  # websocket-client

from fluxmq._core import codec as c
from tests.certs import CertAuthority
from tests.conftest import HOST, free_port

from .listener_clients import PahoTransportClient, port_of

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = CertAuthority(tmp_path_factory.mktemp("pki"), "fluxmq e2e CA")
    return ca, ca.issue_server("localhost")


def ws_node(node_factory, **extra):
    overrides = {"server.websocket.plain.addr": f"{HOST}:{free_port()}"}
    overrides.update({f"server.websocket.plain.{k}": v for k, v in extra.items()})
    node = node_factory(overrides)
    return node, port_of(node.config["server"]["websocket"]["plain"]["addr"])


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5])
def test_paho_websocket_client_exchanges_messages_with_a_tcp_client(node_factory, protocol: int) -> None:
    node, ws_port = ws_node(node_factory)
    with (
        PahoTransportClient("ws-sub", transport="websockets", protocol=protocol) as ws_client,
        PahoTransportClient("tcp-peer", protocol=protocol) as tcp_client,
    ):
        ws_client.connect(ws_port)
        tcp_client.connect(node.mqtt_port)
        ws_client.subscribe("e2e/ws/#", 1)
        tcp_client.subscribe("e2e/tcp/#", 1)
        tcp_client.publish("e2e/ws/a", b"tcp to websocket", 1)
        got = ws_client.get()
        assert (got.topic, got.payload) == ("e2e/ws/a", b"tcp to websocket")
        big = bytes(range(256)) * 2000  # 512 KB: several frames' worth of socket writes
        ws_client.publish("e2e/tcp/b", big, 1)
        got = tcp_client.get()
        assert (got.topic, got.payload) == ("e2e/tcp/b", big)


def test_custom_path(node_factory) -> None:
    node, ws_port = ws_node(node_factory, path="/brokers/mqtt")
    with PahoTransportClient("custom-path", transport="websockets", path="/brokers/mqtt") as client:
        client.connect(ws_port)
    with pytest.raises(websocket.WebSocketBadStatusException) as err:
        websocket.create_connection(f"ws://{HOST}:{ws_port}/mqtt", subprotocols=["mqtt"], timeout=10)
    assert err.value.status_code == 404


def test_upgrade_refusals_and_a_raw_mqtt_exchange(node_factory) -> None:
    node, ws_port = ws_node(node_factory, allowed_origins=["https://app.example.com"])
    url = f"ws://{HOST}:{ws_port}/mqtt"
    with pytest.raises(websocket.WebSocketBadStatusException) as err:
        websocket.create_connection(f"ws://{HOST}:{ws_port}/nope", subprotocols=["mqtt"], timeout=10)
    assert err.value.status_code == 404
    with pytest.raises(websocket.WebSocketBadStatusException) as err:
        websocket.create_connection(url, suppress_origin=True, timeout=10)  # no subprotocol
    assert err.value.status_code == 400
    with pytest.raises(websocket.WebSocketBadStatusException) as err:
        websocket.create_connection(url, subprotocols=["mqtt"], origin="https://evil.example.net", timeout=10)
    assert err.value.status_code == 403

    ws = websocket.create_connection(url, subprotocols=["mqtt"], origin="https://app.example.com", timeout=10)
    try:
        assert ws.subprotocol == "mqtt"
        ws.send_binary(c.encode(c.Connect(client_id="raw-ws", keepalive=30), 4))
        decoder = c.Decoder(version=4)
        packets = decoder.feed(ws.recv())
        assert isinstance(packets[0], c.Connack) and packets[0].reason_code == 0
        ws.ping(b"hello")
        ws.send_binary(c.encode(c.Pingreq(), 4))
        opcode, data = ws.recv_data(control_frame=True)
        assert (opcode, data) == (websocket.ABNF.OPCODE_PONG, b"hello")
        assert isinstance(decoder.feed(ws.recv())[0], c.Pingresp)
    finally:
        ws.close()
    assert node.mqtt_accepts()
    log = node.log_text()
    assert log.count("ws_handshake_refused") == 3  # one line per refused upgrade: 404, 400, 403
    assert "Traceback" not in log


def test_paho_wss_client_exchanges_messages_with_a_tcp_client(node_factory, pki) -> None:
    ca, server = pki
    addr = f"{HOST}:{free_port()}"
    node = node_factory(
        {
            "server.websocket.tls.addr": addr,
            "server.websocket.tls.cert_file": server.cert_file,
            "server.websocket.tls.key_file": server.key_file,
        }
    )
    with (
        PahoTransportClient("wss-sub", transport="websockets", ca_file=ca.cert_file) as wss_client,
        PahoTransportClient("tcp-pub") as tcp_client,
    ):
        wss_client.connect(port_of(addr))
        tcp_client.connect(node.mqtt_port)
        wss_client.subscribe("e2e/wss/#", 2)
        tcp_client.publish("e2e/wss/x", b"tcp to wss", 2)
        got = wss_client.get()
        assert (got.topic, got.payload, got.qos) == ("e2e/wss/x", b"tcp to wss", 2)
