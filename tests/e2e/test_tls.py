"""TLS and mTLS listeners on a real node with paho clients; certificates made with cryptography."""

from __future__ import annotations

import pytest

from tests.certs import CertAuthority
from tests.conftest import HOST, free_port

from .listener_clients import PahoTransportClient, port_of, refused

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = CertAuthority(d, "fluxmq e2e CA")
    foreign = CertAuthority(d, "someone else's CA")
    return {
        "ca": ca,
        "server": ca.issue_server("localhost"),
        "device": ca.issue_client("device-1"),
        "foreign_ca": foreign,
        "intruder": foreign.issue_client("intruder"),
    }


def tls_overrides(section: str, pki, **extra) -> dict:
    out = {
        f"{section}.addr": f"{HOST}:{free_port()}",
        f"{section}.cert_file": pki["server"].cert_file,
        f"{section}.key_file": pki["server"].key_file,
    }
    out.update({f"{section}.{k}": v for k, v in extra.items()})
    return out


def test_tls_client_with_the_test_ca_exchanges_messages_with_a_tcp_client(node_factory, pki) -> None:
    node = node_factory(tls_overrides("server.tcp.tls", pki))
    tls_port = port_of(node.config["server"]["tcp"]["tls"]["addr"])
    with (
        PahoTransportClient("tls-sub", ca_file=pki["ca"].cert_file) as tls_client,
        PahoTransportClient("tcp-pub") as tcp_client,
    ):
        tls_client.connect(tls_port)
        tcp_client.connect(node.mqtt_port)
        tls_client.subscribe("e2e/tls/#", 1)
        tcp_client.subscribe("e2e/back", 1)
        tcp_client.publish("e2e/tls/a", b"to the TLS client", 1)
        assert tls_client.get().payload == b"to the TLS client"
        tls_client.publish("e2e/back", b"from the TLS client", 1)
        assert tcp_client.get().payload == b"from the TLS client"
    # A client that does not trust the server's CA gives up; the node logs one line and serves on.
    assert refused(tls_port, "distrustful", ca_file=pki["foreign_ca"].cert_file)
    with PahoTransportClient("tls-again", ca_file=pki["ca"].cert_file) as again:
        again.connect(tls_port)


def test_mtls_refuses_clients_without_a_valid_certificate_and_keeps_serving(node_factory, pki) -> None:
    node = node_factory(tls_overrides("server.tcp.mtls", pki, ca_file=pki["ca"].cert_file))
    mtls_port = port_of(node.config["server"]["tcp"]["mtls"]["addr"])
    ca_file = pki["ca"].cert_file
    assert refused(mtls_port, "no-cert", ca_file=ca_file)
    assert refused(mtls_port, "foreign-cert", ca_file=ca_file, cert=pki["intruder"])
    with (
        PahoTransportClient("device-1", ca_file=ca_file, cert=pki["device"]) as device,
        PahoTransportClient("tcp-sub") as tcp_client,
    ):
        device.connect(mtls_port)
        tcp_client.connect(node.mqtt_port)
        tcp_client.subscribe("e2e/mtls", 1)
        device.publish("e2e/mtls", b"from a verified device", 1)
        assert tcp_client.get().payload == b"from a verified device"
    log = node.log_text()
    failures = [line for line in log.splitlines() if "tls_handshake_failed" in line]
    assert len(failures) == 2, failures
    assert "listener=mtls" in failures[0]
    assert "Traceback" not in log


def test_wss_and_tls_listeners_share_one_node(node_factory, pki) -> None:
    overrides = tls_overrides("server.tcp.tls", pki)
    overrides.update(tls_overrides("server.websocket.tls", pki))
    node = node_factory(overrides)
    tls_port = port_of(node.config["server"]["tcp"]["tls"]["addr"])
    wss_port = port_of(node.config["server"]["websocket"]["tls"]["addr"])
    with (
        PahoTransportClient("over-wss", transport="websockets", ca_file=pki["ca"].cert_file) as wss,
        PahoTransportClient("over-tls", ca_file=pki["ca"].cert_file) as tls,
    ):
        wss.connect(wss_port)
        tls.connect(tls_port)
        wss.subscribe("e2e/mix", 0)
        tls.publish("e2e/mix", b"tls to wss", 0)
        assert wss.get().payload == b"tls to wss"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("cert_file", "/nonexistent/server.crt"),
        ("key_file", "/nonexistent/server.key"),
    ],
)
def test_bad_certificate_path_stops_the_node_with_one_line(node_factory, pki, key: str, value: str) -> None:
    overrides = tls_overrides("server.tcp.tls", pki)
    overrides[f"server.tcp.tls.{key}"] = value
    node = node_factory(overrides, wait_ready=False)
    code = node.wait()
    assert code not in (None, 0)
    log = node.log_text()
    lines = [line for line in log.splitlines() if f"server.tcp.tls.{key}" in line]
    assert len(lines) == 1, log
    assert "No such file" in lines[0]
    assert "Traceback" not in log


def test_mtls_without_a_ca_is_a_config_error(node_factory, pki) -> None:
    node = node_factory(tls_overrides("server.tcp.mtls", pki), wait_ready=False)
    assert node.wait() not in (None, 0)
    assert "server.tcp.mtls.client_auth" in node.log_text()
