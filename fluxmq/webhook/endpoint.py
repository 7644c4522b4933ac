"""One webhook receiver: its HTTP connections, its circuit breaker and its counters."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import logging
import socket
import ssl
import time
import urllib.parse

import gevent
import gevent.socket
import gevent.ssl

from fluxmq import __version__
from fluxmq.auth.limits import LogGate

from .settings import EndpointSettings

log = logging.getLogger("fluxmq.webhook")

SIGNATURE_HEADER = "X-FluxMQ-Signature"

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
BREAKER_STATES = (CLOSED, HALF_OPEN, OPEN)  # gauge values 0, 1, 2


def signature(secret: bytes, body: bytes) -> str:
    """The ``X-FluxMQ-Signature`` value of ``body``: ``sha256=`` + hex HMAC-SHA256 keyed by ``secret``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class CircuitBreaker:
    """Closed: requests go. ``failure_threshold`` consecutive failures open it: requests are refused
    for ``reset_timeout`` seconds. Then it is half-open: one trial request goes; its success closes
    the breaker, its failure opens it again."""

    __slots__ = ("failure_threshold", "reset_timeout", "state", "failures", "opened_at", "opened", "_trial")

    def __init__(self, failure_threshold: int, reset_timeout: float) -> None:
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.state = CLOSED
        self.failures = 0  # consecutive
        self.opened_at = 0.0
        self.opened = 0  # times it opened
        self._trial = False  # a half-open trial request is out

    @property
    def level(self) -> int:
        """The state as a gauge value: 0 closed, 1 half-open, 2 open."""
        return BREAKER_STATES.index(self.state)

    def half_open(self) -> None:
        """The open breaker's pause is over: the next ``allow`` lets the trial request go."""
        if self.state == OPEN:
            self.state = HALF_OPEN
            self._trial = False

    def allow(self, now: float | None = None) -> bool:
        """May a request go now? (In half-open state only one at a time.)"""
        if self.state == CLOSED:
            return True
        now = time.monotonic() if now is None else now
        if self.state == OPEN:
            if now - self.opened_at < self.reset_timeout:
                return False
            self.state = HALF_OPEN
            self._trial = False
        if self._trial:
            return False
        self._trial = True
        return True

    def success(self) -> None:
        if self.state != CLOSED:
            log.info("webhook_breaker_closed", extra={"after_failures": self.failures})
        self.state = CLOSED
        self.failures = 0
        self._trial = False

    def failure(self, now: float | None = None) -> bool:
        """Count a failed request; True when this failure opened the breaker."""
        self.failures += 1
        self._trial = False
        if self.state == HALF_OPEN or (self.state == CLOSED and self.failures >= self.failure_threshold):
            self.state = OPEN
            self.opened_at = time.monotonic() if now is None else now
            self.opened += 1
            return True
        return False


def _connect(host: str, port: int, timeout: float) -> gevent.socket.socket:
    sock = gevent.socket.create_connection((host, port), timeout)
    # A request is one write; without this, Nagle holds a second segment for the peer's delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _client_context(ca_file: str) -> gevent.ssl.SSLContext:
    """gevent's SSLContext (its sockets wait on the hub; ``gevent.ssl.create_default_context`` gives
    the standard library's, whose handshake would block it) verifying the certificate and host name
    against the system CAs or ``ca_file``."""
    context = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_file:
        context.load_verify_locations(ca_file)
    else:
        context.load_default_certs()
    return context


class _GeventHTTPConnection(http.client.HTTPConnection):
    """http.client on gevent sockets, so a request yields to the hub with or without monkey patching."""

    def connect(self) -> None:
        self.sock = _connect(self.host, self.port, self.timeout)


class _GeventHTTPSConnection(http.client.HTTPSConnection):
    def connect(self) -> None:
        sock = _connect(self.host, self.port, self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class EndpointError(Exception):
    """A request to the endpoint failed (refused, timed out, or a status other than 2xx)."""


class Endpoint:
    """Sends event bodies to one URL; keeps idle keep-alive connections up to ``pool_size``."""

    def __init__(self, settings: EndpointSettings, pool_size: int = 8) -> None:
        self.settings = settings
        self.name = settings.name
        parts = urllib.parse.urlsplit(settings.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._tls = _client_context(settings.ca_file) if self._https else None
        where = f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname
        self.url = f"{parts.scheme}://{where}{parts.path}"  # for logs: never a user:password part
        self.breaker = CircuitBreaker(settings.failure_threshold, settings.reset_timeout)
        self._pool: list[http.client.HTTPConnection] = []
        self._pool_size = pool_size
        self._base_headers = {
            "Content-Type": "application/json",
            "User-Agent": f"fluxmq/{__version__}",
            **settings.headers,
        }
        self.log_gate = LogGate(60.0)
        # Counters read by /metrics.
        self.sent = 0  # events the endpoint accepted (2xx)
        self.failed = 0  # events given up after their last attempt
        self.retried = 0  # attempts after the first
        self.full_drops = 0  # events dropped unsent because the queue was full
        self.breaker_drops = 0  # queued events dropped because the breaker was open when their turn came
        self.shutdown_drops = 0  # events still queued or in flight when the stop's drain time ran out

    @property
    def dropped(self) -> dict[str, int]:
        """Events dropped unsent, by reason (the ``reason`` label on /metrics)."""
        return {
            "queue_full": self.full_drops,
            "breaker_open": self.breaker_drops,
            "shutdown": self.shutdown_drops,
        }

    def post(self, body: bytes, event_type: str, event_id: str) -> None:
        """One attempt; raises EndpointError unless the endpoint answers 2xx within its timeout."""
        headers = dict(self._base_headers)
        headers["X-FluxMQ-Event"] = event_type
        headers["X-FluxMQ-Event-Id"] = event_id
        if self.settings.secret:
            headers[SIGNATURE_HEADER] = signature(self.settings.secret, body)
        timeout = self.settings.timeout
        with gevent.Timeout(timeout, EndpointError(f"no answer within {timeout:g}s")):
            status = None
            while self._pool and status is None:
                try:  # an idle keep-alive connection the endpoint may have closed meanwhile
                    status = self._request(self._pool.pop(), body, headers)
                except (OSError, http.client.HTTPException):
                    pass
            if status is None:
                try:
                    status = self._request(self._new_connection(), body, headers)
                except (OSError, http.client.HTTPException) as exc:
                    raise EndpointError(f"{type(exc).__name__}: {' '.join(str(exc).split())}") from None
        if not 200 <= status < 300:
            raise EndpointError(f"HTTP status {status}")

    def _new_connection(self) -> http.client.HTTPConnection:
        if self._https:
            return _GeventHTTPSConnection(
                self._host, self._port, timeout=self.settings.timeout, context=self._tls
            )
        return _GeventHTTPConnection(self._host, self._port, timeout=self.settings.timeout)

    def _request(self, conn: http.client.HTTPConnection, body: bytes, headers: dict) -> int:
        reusable = False
        try:
            conn.request("POST", self._path, body, headers)
            resp = conn.getresponse()
            resp.read(65536)
            reusable = not resp.will_close
            return resp.status
        finally:
            if reusable and len(self._pool) < self._pool_size:
                self._pool.append(conn)
            else:
                conn.close()

    def close(self) -> None:
        for conn in self._pool:
            conn.close()
        self._pool.clear()
