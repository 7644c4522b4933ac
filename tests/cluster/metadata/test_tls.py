"""etcd over TLS with client certificates: the node's client verifies etcd against cluster.etcd.tls.ca_file
and presents cert_file; a client without a certificate is refused (fluxmq/cluster/metadata/client.py)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from fluxmq.cluster.metadata import ClusterMetadata, EtcdSettings
from fluxmq.cluster.metadata.client import EtcdClient
from fluxmq.errors import ClusterError
from tests.certs import CertAuthority, Issued
from tests.cluster.metadata.conftest import wait_for
from tests.conftest import HOST, free_port


def _server_and_client(ca: CertAuthority) -> Issued:
    """etcd's certificate: with --client-cert-auth its own JSON gateway dials etcd presenting it, so it
    needs the clientAuth usage besides serverAuth (etcd 3.4 answers 503 otherwise)."""
    import datetime
    import ipaddress
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "etcd")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
            ),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    cert_file, key_file = ca.directory / "etcd.crt", ca.directory / "etcd.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(key_file).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return Issued(str(cert_file), str(key_file), "etcd")


@pytest.fixture
def tls_etcd(tmp_path):
    ca = CertAuthority(tmp_path / "pki")
    server = _server_and_client(ca)
    client_port, peer_port = free_port(), free_port()
    endpoint = f"https://{HOST}:{client_port}"
    peer = f"http://{HOST}:{peer_port}"
    log = open(tmp_path / "etcd.log", "wb")
    proc = subprocess.Popen(
        [
            shutil.which("etcd"),
            "--name",
            "tls",
            "--data-dir",
            str(tmp_path / "data"),
            "--listen-client-urls",
            endpoint,
            "--advertise-client-urls",
            endpoint,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"tls={peer}",
            "--cert-file",
            server.cert_file,
            "--key-file",
            server.key_file,
            "--trusted-ca-file",
            ca.cert_file,
            "--client-cert-auth",
            "--log-level",
            "warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield ca, endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def test_the_metadata_plane_runs_over_tls_with_a_client_certificate(tls_etcd, tmp_path):
    ca, endpoint = tls_etcd
    cert = ca.issue_client("node-a")
    client = EtcdClient(
        [endpoint], timeout=2.0, ca_file=ca.cert_file, cert_file=cert.cert_file, key_file=cert.key_file
    )

    def answers() -> bool:
        try:
            client.range("/", keys_only=True)
            return True
        except ClusterError:
            return False

    assert wait_for(answers, timeout=20)
    settings = EtcdSettings(
        endpoints=[endpoint],
        lease_ttl=2,
        tls_enabled=True,
        tls_ca_file=ca.cert_file,
        tls_cert_file=cert.cert_file,
        tls_key_file=cert.key_file,
    )
    meta = ClusterMetadata(settings, "a", "127.0.0.1:1", prefix="/tls/", state_dir=tmp_path / "a")
    meta.start()
    try:
        assert meta.acquire_session("c") is None
        assert wait_for(lambda: meta.members() == {"a": "127.0.0.1:1"})  # the watch runs over TLS too
        assert wait_for(lambda: meta.is_leader)
    finally:
        meta.stop()

    anonymous = EtcdClient(
        [endpoint], timeout=1.0, ca_file=ca.cert_file
    )  # verifies etcd, shows no certificate
    with pytest.raises(ClusterError):
        anonymous.get("/tls/nodes/a")
    stranger = EtcdClient([endpoint], timeout=1.0, cert_file=cert.cert_file, key_file=cert.key_file)
    with pytest.raises(ClusterError):  # etcd's certificate is not from a CA the system trusts
        stranger.get("/tls/nodes/a")
