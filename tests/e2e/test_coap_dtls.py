"""CoAP over DTLS on a real node (RFC 7252 §9), with a DTLS client made from python-mbedtls, the
library the server uses: pre-shared keys, a server certificate, and mDTLS with client certificates.
The PSK identity or the certificate CN is the user name the password-less ACL decides on."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from mbedtls import pk, tls, x509
from mbedtls.exceptions import TLSError

from fluxmq.coap import codec
from fluxmq.coap.codec import CoapMessage
from tests.certs import CertAuthority
from tests.conftest import NodeFactory, RunningNode, free_port
from tests.e2e.mqttraw import paho_connected, unique

pytestmark = pytest.mark.e2e

WAIT = 10.0
PSK = ("sensor-7", bytes.fromhex("00112233445566778899aabbccddeeff"))
ACL = """\
topic read #
user sensor-7
topic readwrite sensors/7/#
user device-9
topic readwrite devices/9/#
"""


def port_of(node: RunningNode, section: str) -> int:
    return int(node.config["server"]["coap"][section]["addr"].rpartition(":")[2])


class DTLSCoap:
    """A blocking DTLS client socket speaking CoAP through the codec."""

    def __init__(self, port: int, timeout: float = WAIT, **conf) -> None:
        context = tls.ClientContext(tls.DTLSConfiguration(**conf))
        self.sock = context.wrap_socket(
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM), server_hostname="localhost"
        )
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.sock.do_handshake()
        self.mid = 0

    def request(
        self, method: int, path: str, query: tuple[str, ...] = (), payload: bytes = b""
    ) -> CoapMessage:
        self.mid += 1
        options = [(codec.URI_PATH, p.encode()) for p in path.split("/")]
        options += [(codec.URI_QUERY, q.encode()) for q in query]
        self.sock.send(codec.serialize(CoapMessage(codec.CON, method, self.mid, b"d1", options, payload)))
        return codec.parse(self.sock.recv(65535))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[CertAuthority, Path]:
    d = tmp_path_factory.mktemp("dtlspki")
    ca = CertAuthority(d)
    (d / "psk").write_text(f"# identity:hexkey\n{PSK[0]}:{PSK[1].hex()}\n")
    (d / "acl").write_text(ACL)
    return ca, d


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pki) -> Iterator[RunningNode]:
    ca, d = pki
    server = ca.issue_server()
    factory = NodeFactory(tmp_path_factory.mktemp("node"))
    try:
        yield factory(
            {
                "server.coap.dtls.addr": f"127.0.0.1:{free_port()}",
                "server.coap.dtls.psk_file": str(d / "psk"),
                "server.coap.dtls.cert_file": server.cert_file,
                "server.coap.dtls.key_file": server.key_file,
                "server.coap.mdtls.addr": f"127.0.0.1:{free_port()}",
                "server.coap.mdtls.cert_file": server.cert_file,
                "server.coap.mdtls.key_file": server.key_file,
                "server.coap.mdtls.ca_file": ca.cert_file,
                "auth.acl_file": str(d / "acl"),
                "auth.allow_anonymous": True,
                "storage.type": "memory",
            }
        )
    finally:
        factory.close()


def test_psk_client_publishes_as_its_identity(node: RunningNode) -> None:
    client = DTLSCoap(
        port_of(node, "dtls"),
        pre_shared_key=PSK,
        validate_certificates=False,
        ciphers=[c for c in tls.ciphers_available() if c.startswith("TLS-PSK-")],
    )
    try:
        with paho_connected(node, unique("sub")) as sub:
            sub.subscribe("sensors/7/t", 1)
            answer = client.request(codec.POST, "sensors/7/t", ("qos=1",), b"21.5")
            assert answer.code == codec.CHANGED
            assert sub.get(WAIT).payload == b"21.5"
        # the ACL of user sensor-7 (the PSK identity) allows sensors/7/# only
        assert client.request(codec.POST, "devices/9/t", (), b"x").code == codec.FORBIDDEN
        assert client.request(codec.GET, "health").payload == b"healthy"
    finally:
        client.close()


def test_certificate_server_with_an_anonymous_client(node: RunningNode, pki) -> None:
    ca, _ = pki
    client = DTLSCoap(port_of(node, "dtls"), trust_store=tls.TrustStore([x509.CRT.from_file(ca.cert_file)]))
    try:
        assert client.request(codec.GET, "health").payload == b"healthy"
        assert client.request(codec.POST, "sensors/7/t", (), b"x").code == codec.FORBIDDEN  # not sensor-7
    finally:
        client.close()


def test_mdtls_client_certificate_cn_is_the_user_name(node: RunningNode, pki) -> None:
    ca, _ = pki
    issued = ca.issue_client("device-9")
    trust = tls.TrustStore([x509.CRT.from_file(ca.cert_file)])
    key = load_key(issued.key_file)
    client = DTLSCoap(
        port_of(node, "mdtls"),
        trust_store=trust,
        certificate_chain=([x509.CRT.from_file(issued.cert_file)], key),
    )
    try:
        with paho_connected(node, unique("sub")) as sub:
            sub.subscribe("devices/9/#", 0)
            assert client.request(codec.POST, "devices/9/state", (), b"on").code == codec.CHANGED
            assert sub.get(WAIT).payload == b"on"
        assert client.request(codec.POST, "sensors/7/t", (), b"x").code == codec.FORBIDDEN
    finally:
        client.close()


def test_mdtls_refuses_a_client_without_a_certificate(node: RunningNode, pki) -> None:
    ca, _ = pki
    with pytest.raises((TLSError, OSError)):
        DTLSCoap(
            port_of(node, "mdtls"),
            timeout=2.0,
            trust_store=tls.TrustStore([x509.CRT.from_file(ca.cert_file)]),
        )


def load_key(path: str) -> pk.ECC:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(path).read_bytes(), None)
    return pk.ECC.from_DER(
        key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
