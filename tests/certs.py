"""Test PKI made at run time with ``cryptography``: a CA, server and client certificates as PEM files.

::

    ca = CertAuthority(tmp_path, "fluxmq test CA")
    server = ca.issue_server("localhost")            # .cert_file, .key_file (SAN localhost, 127.0.0.1)
    client = ca.issue_client("device-17")            # subject CN=device-17, clientAuth
    ssl_ctx.load_verify_locations(ca.cert_file)

Keys are EC P-256 (fast to make); certificates are valid from an hour ago for a day and carry the
extensions a strict verifier wants (basic constraints, key usage, SKI/AKI, extended key usage).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _builder(subject: x509.Name, issuer: x509.Name, public_key, ca: bool) -> x509.CertificateBuilder:
    """A certificate valid from an hour ago for a day, a CA's (signs certificates) or a leaf's
    (signs and agrees keys: ECDHE), its remaining extensions to be added."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=not ca,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )


@dataclass(frozen=True)
class Issued:
    """A certificate and its key as PEM files."""

    cert_file: str
    key_file: str
    common_name: str


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fluxmq tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


class CertAuthority:
    """A self-signed CA that issues server and client certificates into ``directory``."""

    def __init__(self, directory: Path, name: str = "fluxmq test CA") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self._slug = "".join(ch if ch.isalnum() else "-" for ch in name)
        self.key = ec.generate_private_key(ec.SECP256R1())
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.cert = (
            _builder(_name(name), _name(name), self.key.public_key(), ca=True)
            .add_extension(ski, critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_file = str(self.directory / f"{self._slug}.crt")
        Path(self.cert_file).write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def _issue(self, cn: str, usage, sans: list[x509.GeneralName] | None, stem: str) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            _builder(_name(cn), self.cert.subject, key.public_key(), ca=False)
            .add_extension(
                x509.ExtendedKeyUsage(usage if isinstance(usage, list) else [usage]), critical=False
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        base = self.directory / f"{self._slug}-{stem}"
        cert_file, key_file = Path(f"{base}.crt"), Path(f"{base}.key")
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_file, key)
        return Issued(str(cert_file), str(key_file), cn)

    def issue_server(
        self, cn: str = "localhost", hosts: tuple[str, ...] = ("localhost", "127.0.0.1")
    ) -> Issued:
        """A server certificate for ``hosts`` (DNS names and IP addresses)."""
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        return self._issue(cn, ExtendedKeyUsageOID.SERVER_AUTH, sans, f"server-{cn}")

    def issue_node(self, cn: str, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Issued:
        """A certificate a cluster node presents both as server and as client (mTLS between nodes)."""
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        return self._issue(
            cn, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], sans, f"node-{cn}"
        )

    def issue_client(self, cn: str) -> Issued:
        """A client certificate whose subject CN is ``cn``."""
        return self._issue(cn, ExtendedKeyUsageOID.CLIENT_AUTH, None, f"client-{cn}")
