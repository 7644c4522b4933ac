"""HTTP authentication (and optionally authorization) callout with a bounded TTL decision cache.

The broker POSTs JSON to ``auth.http.url`` and reads a JSON answer::

    -> {"action": "connect", "clientid": "c1", "username": "alice", "password": "...",
        "password_encoding": "utf8" | "base64", "peer": "10.0.0.5:51000"}
    -> {"action": "publish" | "subscribe", "clientid": "c1", "username": "alice", "topic": "a/b"}
    <- 200 {"result": "allow"}   or   {"result": "deny"}

With an ``https://`` URL the service's certificate is verified against the system CAs, or
against ``ca_file``; ``cert_file``/``key_file`` present a client certificate (mutual TLS). A plain
``http://`` URL to a host that is not loopback sends passwords in clear: it works, with one
warning at start-up naming the key.

401 and 403 mean deny. Anything else (a timeout after ``timeout`` seconds, a refused connection,
another status, a body that is not such JSON) is an error, and an error refuses: the callout
fails closed.

Decisions are cached (``cache_ttl`` for allow, ``negative_ttl`` for deny, errors not at all; at
most ``cache_size`` entries, least recently used dropped). A CONNECT waits for its callout when
nothing fresh is cached. A publish/subscribe decision is asked on first use of a topic; after
that a stale one is still used while a background greenlet asks again, so no PUBLISH waits on the
network after its topic's first one. The cache key of a CONNECT holds a keyed hash of the
password, never the password.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import ssl
import time
import urllib.parse
from collections import OrderedDict

import gevent
from gevent.event import AsyncResult

from fluxmq.errors import ConfigError

from .limits import LogGate

log = logging.getLogger("fluxmq.auth.http")

ALLOW = "allow"
DENY = "deny"
ERROR = "error"

_POOL_MAX = 8  # idle keep-alive connections kept to the service


def sends_in_clear(url: str) -> bool:
    """True when ``url`` is plain http to a host that is not loopback (a name is loopback only when
    it is ``localhost`` or under ``.localhost``, which resolve to loopback [RFC 6761]; other names
    are not resolved, as their address may change)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        return False
    host = (parts.hostname or "").rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def _tls_context(ca_file: str, cert_file: str, key_file: str) -> ssl.SSLContext:
    """The client context of an https service; ConfigError naming the key of a file that fails."""
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            "auth.http.ca_file", "a readable PEM CA bundle", got=f"{ca_file} ({_one_line(exc)})"
        ) from None
    if key_file and not cert_file:
        raise ConfigError("auth.http.key_file", "set together with auth.http.cert_file", got=key_file)
    if cert_file:
        try:
            context.load_cert_chain(cert_file, key_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "auth.http.cert_file",
                "a PEM client certificate with its key (or auth.http.key_file)",
                got=f"{cert_file} ({_one_line(exc)})",
            ) from None
    return context


class CalloutError(Exception):
    """The service could not be asked or gave no usable answer."""


class DecisionCache:
    """A bounded LRU of key -> (decision, expires_at)."""

    def __init__(self, size: int, ttl: float, negative_ttl: float) -> None:
        self.size = size
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self._entries: OrderedDict[object, tuple[str, float]] = OrderedDict()

    def get(self, key: object, now: float) -> tuple[str | None, bool]:
        """(cached decision or None, still fresh)."""
        entry = self._entries.get(key)
        if entry is None:
            return None, False
        self._entries.move_to_end(key)
        return entry[0], now < entry[1]

    def put(self, key: object, decision: str, now: float) -> None:
        if self.size <= 0 or decision == ERROR:
            return
        ttl = self.ttl if decision == ALLOW else self.negative_ttl
        if ttl <= 0:
            self._entries.pop(key, None)
            return
        self._entries[key] = (decision, now + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class HTTPCallout:
    """Asks an HTTP service whether a client may connect (and, with ``acl``, publish or subscribe)."""

    def __init__(
        self,
        url: str,
        timeout: float = 2.0,
        cache_ttl: float = 60.0,
        negative_ttl: float = 5.0,
        cache_size: int = 10000,
        acl: bool = False,
        ca_file: str = "",
        cert_file: str = "",
        key_file: str = "",
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("auth.http.url", "an http:// or https:// URL", got=url)
        self._https = parts.scheme == "https"
        self._tls = None
        if self._https:
            self._tls = _tls_context(ca_file, cert_file, key_file)
        elif ca_file or cert_file or key_file:
            key = (
                "auth.http.ca_file"
                if ca_file
                else "auth.http.cert_file"
                if cert_file
                else "auth.http.key_file"
            )
            raise ConfigError(key, "an https:// auth.http.url (it would be ignored)", got=url)
        # Logged without any user:password part of the URL.
        where = f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname
        self.url = f"{parts.scheme}://{where}{parts.path}" if parts.username or parts.password else url
        if sends_in_clear(url):
            log.warning(
                "auth_http_cleartext",
                extra={
                    "key": "auth.http.url",
                    "host": where,
                    "problem": "passwords are sent to the authentication service in clear; use https://",
                },
            )
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.timeout = timeout
        self.acl = acl
        self.cache = DecisionCache(cache_size, cache_ttl, negative_ttl)
        self.calls = 0
        self.errors = 0
        self._pool: list[http.client.HTTPConnection] = []
        self._pending: dict[object, AsyncResult] = {}
        self._key = os.urandom(16)  # keys the password hash in cache keys (never kept in the clear)
        self._log_gate = LogGate(60.0)

    # -- decisions ---------------------------------------------------------------------------------

    def authenticate(self, client_id: str, username: str | None, password: bytes | None, peer: str) -> str:
        """ALLOW, DENY or ERROR for a CONNECT; waits for the service unless a fresh decision is cached."""
        secret = hashlib.blake2b(password or b"", key=self._key, digest_size=16).digest()
        key = ("connect", client_id, username, password is not None, secret)
        cached, fresh = self.cache.get(key, time.monotonic())
        if fresh:
            return cached
        doc = {"action": "connect", "clientid": client_id, "username": username, "peer": peer}
        if password is not None:
            try:
                doc["password"] = password.decode("utf-8")
                doc["password_encoding"] = "utf8"
            except UnicodeDecodeError:
                doc["password"] = base64.b64encode(password).decode("ascii")
                doc["password_encoding"] = "base64"
        return self._decide(key, doc)

    def authorize(self, client_id: str, username: str | None, action: str, topic: str) -> bool:
        """May the client ``action`` ("publish" or "subscribe") ``topic``? Only the first use of a
        topic waits; a stale decision is used while it is asked again in the background."""
        key = (action, client_id, username, topic)
        cached, fresh = self.cache.get(key, time.monotonic())
        if cached is not None:
            if not fresh and key not in self._pending:
                doc = {"action": action, "clientid": client_id, "username": username, "topic": topic}
                gevent.spawn(self._decide, key, doc)
            return cached == ALLOW
        doc = {"action": action, "clientid": client_id, "username": username, "topic": topic}
        return self._decide(key, doc) == ALLOW

    def _decide(self, key: object, doc: dict) -> str:
        """Ask the service (one request per key at a time: others wait for the same answer)."""
        pending = self._pending.get(key)
        if pending is not None:
            return pending.get()
        result = self._pending[key] = AsyncResult()
        decision = ERROR
        try:
            decision = self._ask(doc)
            self.cache.put(key, decision, time.monotonic())
        except Exception as exc:  # any failure refuses (fail closed)
            self.errors += 1
            if self._log_gate.allow(type(exc).__name__):
                log.warning(
                    "auth_http_failed",
                    extra={"url": self.url, "action": doc.get("action"), "error": _one_line(exc)},
                )
        finally:
            del self._pending[key]
            result.set(decision)  # waiters get an answer even if this greenlet is killed
        return decision

    # -- HTTP --------------------------------------------------------------------------------------

    def _new_connection(self) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=self.timeout, context=self._tls
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)

    def _post(self, conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
        reusable = False
        try:
            conn.request(
                "POST", self._path, body, {"Content-Type": "application/json", "Accept": "application/json"}
            )
            resp = conn.getresponse()
            data = resp.read(65536)
            reusable = not resp.will_close
            return resp.status, data
        finally:
            if reusable and len(self._pool) < _POOL_MAX:
                self._pool.append(conn)
            else:
                conn.close()

    def _ask(self, doc: dict) -> str:
        """One POST; DENY on 401/403 or a deny answer; raises CalloutError for anything unusable."""
        self.calls += 1
        body = json.dumps(doc).encode("utf-8")
        with gevent.Timeout(self.timeout, CalloutError(f"no answer within {self.timeout:g}s")):
            status = data = None
            while self._pool and status is None:
                try:  # an idle keep-alive connection the service may have closed meanwhile
                    status, data = self._post(self._pool.pop(), body)
                except (OSError, http.client.HTTPException):
                    pass
            if status is None:
                try:
                    status, data = self._post(self._new_connection(), body)
                except ssl.SSLCertVerificationError as exc:
                    raise CalloutError(
                        f"{type(exc).__name__}: {exc} (auth.http.ca_file names the CA that "
                        "signed the service's certificate)"
                    ) from None
                except (OSError, http.client.HTTPException) as exc:
                    raise CalloutError(f"{type(exc).__name__}: {exc}") from None
        if status in (401, 403):
            return DENY
        if status != 200:
            raise CalloutError(f"HTTP status {status}")
        try:
            answer = json.loads(data)
        except ValueError:
            raise CalloutError("answer is not JSON") from None
        result = answer.get("result") if isinstance(answer, dict) else None
        if result == ALLOW:
            return ALLOW
        if result == DENY:
            return DENY
        raise CalloutError(f"answer without result allow or deny: {str(answer)[:80]!r}")

    def close(self) -> None:
        for conn in self._pool:
            conn.close()
        self._pool.clear()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
