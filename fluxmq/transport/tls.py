"""TLS for the MQTT listeners: an SSLContext from a listener's config, and a TLS stream.

``server_context(section, cfg)`` builds a server ``SSLContext`` from the keys of a TLS listener
section (``cert_file``, ``key_file``, ``ca_file``, ``client_auth``, ``min_version``,
``cipher_suites``); a missing or unreadable file, a key that does not match its certificate or an
unknown cipher suite is a one-line ``ConfigError`` naming the key.

``client_auth`` follows the Go broker's modes, mapped as closely as Python's ``ssl`` allows (it has
no "ask for a certificate but do not verify it" and no verify callback):

=================== ===================================== =============================================
mode                Go (crypto/tls)                       here
=================== ===================================== =============================================
``none``            NoClientCert                          ``CERT_NONE``: no certificate is asked for
``request``         RequestClientCert: ask, never verify  with ``ca_file``: ``CERT_OPTIONAL`` (a given
                                                          certificate must verify); without: as ``none``
``require_any``     RequireAnyClientCert: need one,       ``CERT_REQUIRED``: needs ``ca_file``, the
                    never verify                          certificate is verified against it
``verify_if_given`` VerifyClientCertIfGiven               ``CERT_OPTIONAL`` against ``ca_file``
``require``         RequireAndVerifyClientCert            ``CERT_REQUIRED`` against ``ca_file``
``""``              ``require`` if ``ca_file`` is set,    as Go
                    else ``none``
=================== ===================================== =============================================

``cipher_suites`` sets the TLS 1.2 suites (IANA/Go names such as
``TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256`` or OpenSSL names such as ``ECDHE-RSA-AES128-GCM-SHA256``).
Python cannot choose TLS 1.3 suites (OpenSSL's defaults always apply); their names are accepted
and ignored with a warning at start, as Go ignores them too.

``TLSHandshake`` wraps an accepted socket and runs the handshake in the connection's own greenlet
with a deadline; a failed handshake is one log line. ``TLSStream`` is the stream MQTTConnection
uses over the TLS socket (``recv``, ``settimeout``, ``send_nowait``, ``send_all``, ``shutdown``,
``close``, ``peer``, ``cert_username``).
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from collections.abc import Callable

import gevent
from gevent import ssl as gssl
from gevent.socket import wait_read, wait_write

from fluxmq.errors import ConfigError

log = logging.getLogger("fluxmq.transport")

__all__ = ["CLIENT_AUTH_MODES", "TLSHandshake", "TLSStream", "effective_client_auth", "server_context"]

CLIENT_AUTH_MODES = ("none", "request", "require_any", "verify_if_given", "require")

TLS_VERSIONS = {
    "TLS1.0": ssl.TLSVersion.TLSv1,
    "TLS1.1": ssl.TLSVersion.TLSv1_1,
    "TLS1.2": ssl.TLSVersion.TLSv1_2,
    "TLS1.3": ssl.TLSVersion.TLSv1_3,
}

# Go's crypto/tls names (IANA names; Go's short CHACHA20 aliases too) -> OpenSSL names.
TLS12_SUITES = {
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA": "DES-CBC3-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256": "AES128-SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA": "ECDHE-RSA-DES-CBC3-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": "ECDHE-ECDSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": "ECDHE-RSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
}

TLS13_SUITES = frozenset(
    {
        "TLS_AES_128_GCM_SHA256",
        "TLS_AES_256_GCM_SHA384",
        "TLS_CHACHA20_POLY1305_SHA256",
        "TLS_AES_128_CCM_SHA256",
        "TLS_AES_128_CCM_8_SHA256",
    }
)


def effective_client_auth(client_auth: str, ca_file: str) -> str:
    """The mode a listener runs: ``""`` is ``require`` when a CA is configured, else ``none``."""
    if client_auth:
        return client_auth
    return "require" if ca_file else "none"


Origin = Callable[[str], str]  # a key's leaf name -> where its value came from ("FILE:LINE", "env X")


def _origin(source: str | Origin) -> Origin:
    return source if callable(source) else (lambda leaf: source)


def readable_file(section: str, leaf: str, path: str, source: Origin, what: str, needed_by: str = "") -> None:
    """A ``ConfigError`` naming ``section.leaf`` and where it was set unless ``path`` names a file
    this process can read; ``needed_by`` says what makes the key required (default: the
    listener's ``section.addr``). The listeners' and Raft's TLS keys are checked alike."""
    if not path:
        needed_by = needed_by or f"the listener is enabled by {section}.addr"
        raise ConfigError(
            f"{section}.{leaf}",
            what,
            source(leaf),
            problem=f"is empty; expected {what} ({needed_by})",
        )
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError(
            f"{section}.{leaf}",
            what,
            source(leaf),
            got=path,
            problem=f"cannot read {path!r}: {exc.strerror or exc}",
        ) from None


def _ssl_reason(exc: ssl.SSLError) -> str:
    return exc.reason or exc.strerror or str(exc) or type(exc).__name__


def load_ca_file(ctx: ssl.SSLContext, section: str, ca_file: str, source: Origin) -> None:
    """``ctx`` verifies its peers against the CA certificates in ``ca_file`` (``section.ca_file``);
    a file that holds none is a ``ConfigError`` naming the key and where it was set."""
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{section}.ca_file",
            "PEM CA certificates",
            source("ca_file"),
            got=ca_file,
            problem=f"cannot load {ca_file!r}: {_ssl_reason(exc)}",
        ) from None


def server_context(
    section: str, cfg, source: str | Origin = "", require_client_cert: bool = False
) -> ssl.SSLContext:
    """A server SSLContext from the TLS keys of listener ``section`` (e.g. ``server.tcp.tls``).

    ``cfg`` is that config section (or any object with the same attributes); ``source`` names where
    the values came from for error messages (text, or a function of the key's leaf name).
    ``require_client_cert`` (the mTLS listener) refuses a mode that would let a client in without a
    verified certificate. Raises ``ConfigError``.
    """
    source = _origin(source)
    ctx = gssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # gevent's: cooperative without monkey patching
    # TLS 1.0/1.1 are offered only if the system OpenSSL allows them (OpenSSL 3 at its default
    # security level does not); we do not lower the security level behind the operator's back.
    ctx.minimum_version = TLS_VERSIONS[cfg.min_version]

    readable_file(section, "cert_file", cfg.cert_file, source, "a readable PEM certificate file")
    readable_file(section, "key_file", cfg.key_file, source, "a readable PEM private key file")
    try:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{section}.cert_file",
            "a PEM certificate matching key_file",
            source("cert_file"),
            got=cfg.cert_file,
            problem=f"cannot load {cfg.cert_file!r} with key {cfg.key_file!r}: {_ssl_reason(exc)}",
        ) from None

    mode = effective_client_auth(cfg.client_auth, cfg.ca_file)
    if require_client_cert and mode not in ("require", "require_any"):
        raise ConfigError(
            f"{section}.client_auth",
            "require or require_any (with ca_file)",
            source("client_auth"),
            got=cfg.client_auth,
            problem=f"an mTLS listener must require client certificates; got mode {mode!r}"
            + ("" if cfg.ca_file else " and no ca_file"),
        )
    if mode in ("require_any", "verify_if_given", "require") and not cfg.ca_file:
        raise ConfigError(
            f"{section}.ca_file",
            "a CA file",
            source("ca_file"),
            problem=f"client_auth {mode} needs ca_file (Python's ssl verifies every client "
            "certificate it accepts)",
        )
    if mode == "request" and not cfg.ca_file:
        log.warning(
            "tls_client_auth_request_without_ca",
            extra={"listener": section, "detail": "no certificate is asked for (acts as none)"},
        )
        mode = "none"
    if mode != "none":
        readable_file(section, "ca_file", cfg.ca_file, source, "a readable PEM CA file")
        load_ca_file(ctx, section, cfg.ca_file, source)
        ctx.verify_mode = ssl.CERT_REQUIRED if mode in ("require", "require_any") else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE

    if cfg.cipher_suites:
        _set_cipher_suites(ctx, section, list(cfg.cipher_suites), source)
    return ctx


def _set_cipher_suites(ctx: ssl.SSLContext, section: str, names: list[str], source: Origin) -> None:
    openssl_names = []
    ignored = []
    for name in names:
        if name in TLS13_SUITES:
            ignored.append(name)
            continue
        openssl = TLS12_SUITES.get(name, name)
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            probe.set_ciphers(openssl + ":@SECLEVEL=0")
        except ssl.SSLError:
            raise ConfigError(
                f"{section}.cipher_suites",
                "TLS 1.2 cipher suite names",
                source("cipher_suites"),
                got=name,
                problem=f"unknown cipher suite {name!r}",
            ) from None
        openssl_names.append(openssl)
    if ignored:
        log.warning(
            "tls13_cipher_suites_ignored",
            extra={
                "listener": section,
                "suites": ",".join(ignored),
                "detail": "Python cannot configure TLS 1.3 suites; OpenSSL's defaults apply",
            },
        )
    if openssl_names:
        try:
            ctx.set_ciphers(":".join(openssl_names))
        except ssl.SSLError:
            raise ConfigError(
                f"{section}.cipher_suites",
                "TLS 1.2 cipher suite names",
                source("cipher_suites"),
                got=names,
                problem="none of the cipher suites is allowed by OpenSSL's security level",
            ) from None


def _cert_common_name(cert: dict | None) -> str | None:
    """The subject CN of a certificate as ``SSLSocket.getpeercert()`` returns it."""
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return value
    return None


class TLSStream:
    """The MQTTConnection stream over a TLS socket whose handshake is done.

    Reads and writes go to the socket's SSL object directly (the OS socket is non-blocking) and wait
    with gevent, so ``recv`` timeouts raise ``TimeoutError`` like the plain stream. OpenSSL writes
    all or nothing here: ``send_nowait`` returns ``len(data)`` or 0 (want-write). After a 0, OpenSSL
    may already have sent part of the records, and the next write must start with the same bytes:
    the connection does exactly that (it keeps unsent output at the front of its buffer and
    ``send_all`` gets it next), and OpenSSL then skips what it already sent.
    """

    __slots__ = ("sock", "raw", "sslobj", "fd", "peer", "cert_username", "_timeout")

    # The connection bounds recv with its own timer (as a socket timeout would, at any of recv's
    # waits): no gevent Timeout per recv.
    deadline_by_caller = True

    def __init__(self, sock: gssl.SSLSocket, peer: str, cert_username: str | None = None) -> None:
        self.sock = sock
        self.raw = sock._sock  # the OS socket (gevent's SSLSocket wraps it)
        self.sslobj = sock._sslobj  # the _ssl object over the non-blocking OS socket
        self.fd = sock.fileno()
        self.peer = peer
        self.cert_username = cert_username
        self._timeout: float | None = None

    def recv(self, n: int) -> bytes:
        while True:
            try:
                return self.sslobj.read(n)
            except ssl.SSLWantReadError:
                wait_read(self.fd, timeout=self._timeout, timeout_exc=TimeoutError("read timeout"))
            except ssl.SSLWantWriteError:
                wait_write(self.fd, timeout=self._timeout, timeout_exc=TimeoutError("read timeout"))
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""  # close_notify, or a TCP close without one

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def send_nowait(self, data) -> int:
        """Encrypt and write ``data`` if the socket takes all of it now; else 0. Never switches."""
        try:
            return self.sslobj.write(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return 0

    def send_all(self, data, timeout: float | None) -> None:
        """Write everything, waiting for writability (at most ``timeout`` s per wait)."""
        if not data:
            return
        while True:
            try:
                self.sslobj.write(data)
                return
            except ssl.SSLWantWriteError:
                wait_write(self.fd, timeout=timeout, timeout_exc=TimeoutError("write timeout"))
            except ssl.SSLWantReadError:
                wait_read(self.fd, timeout=timeout, timeout_exc=TimeoutError("write timeout"))

    def fileno(self) -> int:
        return self.fd

    def has_buffered(self) -> bool:
        """Decrypted bytes OpenSSL holds that recv has not returned yet."""
        return self.sslobj.pending() > 0

    def shutdown(self) -> None:
        # The OS socket, not the SSL object: a reader waiting in recv sees EOF and tears down.
        try:
            self.raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class TLSHandshake:
    """Turns an accepted socket into a TLSStream in the connection's greenlet (a stream factory).

    The handshake must finish within ``timeout`` seconds; a failure or timeout is logged as one
    line (``tls_handshake_failed`` with the OpenSSL reason), the socket is closed and None returned.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        timeout: float | None,
        listener: str,
        use_cert_cn_as_username: bool = False,
    ) -> None:
        self.context = context
        self.timeout = timeout or None
        self.listener = listener
        self.use_cert_cn_as_username = use_cert_cn_as_username

    @classmethod
    def from_config(
        cls, section: str, cfg, timeout: float | None, listener: str, source: str | Origin = ""
    ) -> TLSHandshake:
        """The handshake of listener ``section`` from its config keys (``*.mtls`` must verify clients)."""
        context = server_context(section, cfg, source, require_client_cert=section.endswith(".mtls"))
        return cls(context, timeout, listener, cfg.use_cert_cn_as_username)

    def __call__(self, sock, address) -> TLSStream | None:
        host, port = address[:2]
        peer = f"{host}:{port}"
        ssock = None
        try:
            ssock = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            with gevent.Timeout(self.timeout, TimeoutError("handshake timeout")):
                ssock.do_handshake()
            username = None
            if self.use_cert_cn_as_username:
                username = _cert_common_name(ssock.getpeercert())
            return TLSStream(ssock, peer, username)
        except (OSError, TimeoutError, ValueError) as exc:
            log.info(
                "tls_handshake_failed",
                extra={"listener": self.listener, "peer": peer, "error": _handshake_error(exc)},
            )
            for s in (ssock, sock):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass
            return None


def _handshake_error(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return _ssl_reason(exc)
    if isinstance(exc, TimeoutError):
        return "timeout"
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno)
    return text or type(exc).__name__
