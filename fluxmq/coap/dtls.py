"""CoAP over DTLS 1.2 (RFC 7252 §9): python-mbedtls driven sans-IO from one gevent UDP socket.

Why python-mbedtls: the standard library has no DTLS; python-mbedtls wraps Mbed TLS (maintained,
built for constrained devices, PSK and certificate suites, HelloVerifyRequest cookies) and installs
as a wheel here. Its socket API connects a UDP socket per client and blocks; instead each peer gets a
``TLSWrappedBuffer`` (``ServerContext.wrap_buffers``) fed from the listener's one socket, so one
greenlet serves every peer, as the plain listener does.

Identity: the PSK identity (``psk_file``) or the CN of a verified client certificate is the request's
user name (authenticated by the handshake). A peer's state is created only after its ClientHello
carries a valid cookie (the HelloVerifyRequest exchange proves the address, so no amplification
and no state for spoofed sources); states are bounded (``MAX_PEERS``, least recently used first)
and dropped after ``IDLE_TIMEOUT`` without traffic.
"""

from __future__ import annotations

import logging
import os
import socket as stdsocket
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import gevent
from gevent import socket

from fluxmq.errors import ConfigError

from .bridge import CoapBridge
from .listener import BATCH

log = logging.getLogger("fluxmq.coap")

MAX_DATAGRAM = 65535
MAX_PEERS = 10000
IDLE_TIMEOUT = 300.0  # seconds without a datagram before a peer's DTLS state is dropped


class PSKStore(Mapping):
    """The pre-shared keys (identity -> key), remembering the identity Mbed TLS looked up last, so
    the listener learns which identity a handshake used (python-mbedtls exposes no getter)."""

    def __init__(self, keys: dict[str, bytes]) -> None:
        self.keys = keys
        self.last_identity: str | None = None

    def __getitem__(self, identity: str) -> bytes:
        key = self.keys[identity]
        self.last_identity = identity
        return key

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def load_psk_file(path: str, key: str = "server.coap.dtls.psk_file") -> dict[str, bytes]:
    """``identity:hexkey`` per line (``#`` comments and blank lines skipped); ConfigError with the line."""
    keys: dict[str, bytes] = {}
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as exc:
        raise ConfigError(key, "", got=path, problem=str(exc)) from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        identity, sep, hexkey = line.rpartition(":")
        try:
            secret = bytes.fromhex(hexkey.strip())
        except ValueError:
            secret = b""
        if not sep or not identity or not secret:
            raise ConfigError(key, "", source=path, line=number, problem="expected identity:hexkey")
        keys[identity] = secret
    return keys


def _load_key(path: str) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from mbedtls import pk

    with open(path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), None)
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return pk.ECC.from_DER(der)
    if isinstance(key, rsa.RSAPrivateKey):
        return pk.RSA.from_DER(der)
    raise ValueError("only EC and RSA keys are supported")


def _load_chain(path: str) -> list:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from mbedtls.x509 import CRT

    with open(path, "rb") as f:
        certs = x509.load_pem_x509_certificates(f.read())
    return [CRT.from_DER(c.public_bytes(serialization.Encoding.DER)) for c in certs]


def server_context(
    section: Any, key_prefix: str, require_client_cert: bool = False
) -> tuple[Any, PSKStore | None]:
    """The Mbed TLS server context of a DTLS listener section (``cert_file``, ``key_file``,
    ``ca_file``, ``client_auth``, ``psk_file``); ConfigError naming the key for a bad setting."""
    try:
        from mbedtls import tls
    except ImportError:
        raise ConfigError(
            f"{key_prefix}.addr",
            "",
            got=section.addr,
            problem="DTLS needs python-mbedtls: pip install 'fluxmq[coap-dtls]'",
        ) from None
    psk = PSKStore(load_psk_file(section.psk_file, f"{key_prefix}.psk_file")) if section.psk_file else None
    kwargs: dict[str, Any] = {"lowest_supported_version": tls.DTLSVersion.DTLSv1_2}
    if section.cert_file or section.key_file:
        if not (section.cert_file and section.key_file):
            raise ConfigError(f"{key_prefix}.cert_file", "", problem="cert_file and key_file go together")
        try:
            kwargs["certificate_chain"] = (_load_chain(section.cert_file), _load_key(section.key_file))
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{key_prefix}.cert_file", "", got=section.cert_file, problem=str(exc)
            ) from None
    elif psk is None:
        raise ConfigError(
            f"{key_prefix}.addr",
            "",
            got=section.addr,
            problem="a DTLS listener needs cert_file/key_file or psk_file",
        )
    client_auth = section.client_auth or ("require" if section.ca_file else "none")
    if require_client_cert:
        client_auth = "require"
    if client_auth != "none":
        if not section.ca_file:
            raise ConfigError(f"{key_prefix}.ca_file", "", problem="client certificates need ca_file")
        try:
            kwargs["trust_store"] = tls.TrustStore.from_pem_file(section.ca_file)
        except Exception as exc:
            raise ConfigError(f"{key_prefix}.ca_file", "", got=section.ca_file, problem=str(exc)) from None
    # Mbed TLS: validate_certificates on a server requires a client certificate; "request" would
    # need optional verification, which python-mbedtls does not offer, so it is treated as require.
    kwargs["validate_certificates"] = client_auth != "none"
    if psk is not None:
        kwargs["pre_shared_key_store"] = psk
    return tls.ServerContext(tls.DTLSConfiguration(**kwargs)), psk


class _Peer:
    __slots__ = ("buffer", "identity", "seen", "ready")

    def __init__(self, buffer: Any) -> None:
        self.buffer = buffer
        self.identity: str | None = None
        self.seen = time.monotonic()
        self.ready = False


class CoapDTLSListener:
    """Serves ``bridge`` over DTLS on a UDP address (the transport named ``name``)."""

    def __init__(
        self, name: str, host: str, port: int, bridge: CoapBridge, context: Any, psk: PSKStore | None
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.bridge = bridge
        self.context = context
        self.psk = psk
        self.peers: OrderedDict[Any, _Peer] = OrderedDict()
        self.sock: Any = None
        self._cookie_secret = os.urandom(16)
        self._greenlets: list[gevent.Greenlet] = []
        self.handshakes_failed = 0

    def start(self) -> None:
        family = stdsocket.AF_INET6 if ":" in self.host else stdsocket.AF_INET
        sock = socket.socket(family, stdsocket.SOCK_DGRAM)
        sock.bind((self.host or "0.0.0.0", self.port))
        self.port = sock.getsockname()[1]
        self.sock = sock
        self._greenlets = [gevent.spawn(self._serve), gevent.spawn(self._expire_idle)]
        log.info(
            "listener_started",
            extra={"listener": self.name, "addr": f"{self.host}:{self.port}", "transport": "dtls"},
        )

    def stop(self) -> None:
        sock, self.sock = self.sock, None
        gevent.killall(self._greenlets, block=False)
        if sock is not None:
            sock.close()
        self.peers.clear()

    def _serve(self) -> None:
        from mbedtls import tls

        sock = self.sock
        in_a_row = 0
        while True:
            in_a_row += 1
            if in_a_row >= BATCH:  # as the plain listener: a flood must not starve the hub
                in_a_row = 0
                gevent.sleep(0)
            try:
                data, peer = sock.recvfrom(MAX_DATAGRAM)
            except OSError:
                if self.sock is None:
                    return
                continue
            try:
                self._datagram(tls, data, peer)
            except Exception as exc:  # a hostile record must not stop the listener
                self.peers.pop(peer, None)
                self.bridge.drop("dtls_error")
                log.debug("dtls_error", extra={"peer": str(peer), "error": str(exc)})

    def _datagram(self, tls: Any, data: bytes, peer: Any) -> None:
        state = self.peers.get(peer)
        if state is None:
            buffer = self.context.wrap_buffers()
            buffer.setcookieparam(self._cookie_secret + repr(peer).encode())
            state = _Peer(buffer)
            # kept only once the cookie is verified (below): a spoofed ClientHello leaves nothing
        else:
            self.peers.move_to_end(peer)
            state.seen = time.monotonic()
        buffer = state.buffer
        buffer.receive_from_network(data)
        if not state.ready:
            self._handshake(tls, state, peer)
            return
        while True:
            try:
                plain = buffer.read(MAX_DATAGRAM)
            except tls.WantReadError:
                break
            if not plain:  # nothing more in this datagram (a close_notify too: idle expiry ends it)
                break
            self.bridge.datagram(plain, peer, self, state.identity, verified=True)
        self._flush(buffer, peer)

    def _handshake(self, tls: Any, state: _Peer, peer: Any) -> None:
        from mbedtls.exceptions import TLSError

        buffer = state.buffer
        psk = self.psk
        try:
            while buffer._handshake_state is not tls.HandshakeStep.HANDSHAKE_OVER:
                try:
                    buffer.do_handshake()
                except tls.WantWriteError:
                    self._flush(buffer, peer)
                except tls.WantReadError:
                    break
                except tls.HelloVerifyRequest:
                    self._flush(buffer, peer)  # the cookie; the state is not kept (see the module docs)
                    self.peers.pop(peer, None)
                    return
        except TLSError as exc:
            self._flush(buffer, peer)  # the alert
            self.peers.pop(peer, None)
            self.handshakes_failed += 1
            log.info(
                "dtls_handshake_failed", extra={"listener": self.name, "peer": str(peer), "error": str(exc)}
            )
            return
        finally:
            if psk is not None and psk.last_identity is not None:
                state.identity = psk.last_identity
                psk.last_identity = None
        if peer not in self.peers:
            self.peers[peer] = state
            while len(self.peers) > MAX_PEERS:
                self.peers.popitem(last=False)
        self._flush(buffer, peer)
        if buffer._handshake_state is tls.HandshakeStep.HANDSHAKE_OVER:
            state.ready = True
            if state.identity is None:
                state.identity = _certificate_cn(buffer)
            log.debug("dtls_handshake_done", extra={"peer": str(peer), "identity": state.identity})

    def _flush(self, buffer: Any, peer: Any) -> None:
        out = buffer.peek_outgoing(MAX_DATAGRAM)
        while out:
            buffer.consume_outgoing(len(out))
            try:
                self.sock.sendto(out, peer)
            except (OSError, AttributeError):
                self.bridge.drop("send_failed")
                return
            out = buffer.peek_outgoing(MAX_DATAGRAM)

    def sendto(self, data: bytes, peer: Any) -> None:
        """Encrypt one CoAP datagram for ``peer`` (dropped when its DTLS state is gone)."""
        state = self.peers.get(peer)
        if state is None or not state.ready:
            self.bridge.drop("dtls_no_session")
            return
        state.seen = time.monotonic()  # an observer that only receives keeps its session
        state.buffer.write(data)
        self._flush(state.buffer, peer)

    def _expire_idle(self) -> None:
        while True:
            gevent.sleep(IDLE_TIMEOUT / 10)
            cutoff = time.monotonic() - IDLE_TIMEOUT
            for peer in [p for p, s in self.peers.items() if s.seen < cutoff]:
                self.peers.pop(peer, None)


def _certificate_cn(buffer: Any) -> str | None:
    """The CN of the peer's verified certificate, or None (PSK, or no client certificate)."""
    try:
        der = buffer.getpeercert(binary_form=True)
    except Exception:
        return None
    if not der:
        return None
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None
