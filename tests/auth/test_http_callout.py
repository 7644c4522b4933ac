"""The HTTP callout against a real HTTP server in a thread: decisions, fail-closed errors, the
TTL cache (positive, negative, bounded) and stale decisions refreshed in the background."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import gevent
import pytest

from fluxmq.auth.http_callout import ALLOW, DENY, ERROR, DecisionCache, HTTPCallout
from fluxmq.errors import ConfigError


class AuthServer:
    """A tiny auth service: ``decide(doc) -> (status, body)``; records every request it got."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.delay = 0.0
        self.decide = lambda doc: (200, {"result": "allow" if doc.get("password") == "good" or
                                         doc.get("topic", "").startswith("ok/") else "deny"})
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(doc)
                if server.delay:
                    time.sleep(server.delay)
                status, body = server.decide(doc)
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/auth"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[AuthServer]:
    s = AuthServer()
    yield s
    s.close()


def test_allow_and_deny(server: AuthServer) -> None:
    call = HTTPCallout(server.url)
    assert call.authenticate("c1", "alice", b"good", "10.0.0.1:5") == ALLOW
    assert call.authenticate("c1", "alice", b"bad", "10.0.0.1:5") == DENY
    doc = server.requests[0]
    assert doc == {"action": "connect", "clientid": "c1", "username": "alice", "peer": "10.0.0.1:5",
                   "password": "good", "password_encoding": "utf8"}
    assert call.authorize("c1", "alice", "publish", "ok/x")
    assert not call.authorize("c1", "alice", "subscribe", "no/x")
    assert server.requests[-1] == {"action": "subscribe", "clientid": "c1", "username": "alice", "topic": "no/x"}


def test_binary_password_travels_as_base64(server: AuthServer) -> None:
    HTTPCallout(server.url).authenticate("c", "u", b"\xff\x00", "p")
    assert server.requests[0]["password"] == "/wA=" and server.requests[0]["password_encoding"] == "base64"


@pytest.mark.parametrize("status, body, expected", [
    (401, {}, DENY), (403, b"", DENY), (500, {"result": "allow"}, ERROR), (200, b"not json", ERROR),
    (200, {"result": "maybe"}, ERROR), (200, ["allow"], ERROR),
])
def test_statuses_and_bodies(server: AuthServer, status: int, body, expected: str) -> None:
    server.decide = lambda doc: (status, body)
    call = HTTPCallout(server.url)
    assert call.authenticate("c", "u", b"good", "p") == expected


def test_unreachable_and_slow_services_fail_closed(server: AuthServer) -> None:
    server.close()
    call = HTTPCallout(server.url, timeout=0.5)
    assert call.authenticate("c", "u", b"good", "p") == ERROR
    assert not call.authorize("c", "u", "publish", "ok/x")
    assert call.errors == 2
    slow = AuthServer()
    try:
        slow.delay = 1.5
        assert HTTPCallout(slow.url, timeout=0.3).authenticate("c", "u", b"good", "p") == ERROR
    finally:
        slow.close()


def test_decisions_are_cached_errors_are_not(server: AuthServer) -> None:
    call = HTTPCallout(server.url, cache_ttl=60, negative_ttl=60)
    for _ in range(3):
        assert call.authenticate("c", "u", b"good", "p") == ALLOW
        assert call.authenticate("c", "u", b"bad", "p") == DENY
        assert call.authorize("c", "u", "publish", "ok/1")
    assert len(server.requests) == 3
    server.decide = lambda doc: (500, {})
    call2 = HTTPCallout(server.url)
    call2.authenticate("c", "u", b"x", "p")
    call2.authenticate("c", "u", b"x", "p")
    assert len(server.requests) == 5


def test_negative_ttl_zero_asks_again(server: AuthServer) -> None:
    call = HTTPCallout(server.url, negative_ttl=0)
    call.authenticate("c", "u", b"bad", "p")
    call.authenticate("c", "u", b"bad", "p")
    assert len(server.requests) == 2


def test_cache_key_holds_no_password(server: AuthServer) -> None:
    call = HTTPCallout(server.url)
    call.authenticate("c", "u", b"good-password-123", "p")
    assert "good-password-123" not in repr(list(call.cache._entries))


def test_stale_publish_decision_is_used_while_it_is_refreshed(server: AuthServer) -> None:
    call = HTTPCallout(server.url, cache_ttl=0.05)
    assert call.authorize("c", "u", "publish", "ok/t")
    time.sleep(0.1)  # the decision is stale now
    server.decide = lambda doc: (200, {"result": "deny"})
    assert call.authorize("c", "u", "publish", "ok/t")  # answered from the stale entry, no waiting
    gevent.sleep(0)  # let the background refresh run
    deadline = time.monotonic() + 5
    while len(server.requests) < 2 and time.monotonic() < deadline:
        gevent.sleep(0.01)
    assert len(server.requests) == 2
    assert not call.authorize("c", "u", "publish", "ok/t")  # the refreshed decision


def test_cache_bounds() -> None:
    cache = DecisionCache(2, 10.0, 1.0)
    cache.put("a", ALLOW, 0.0)
    cache.put("b", DENY, 0.0)
    cache.put("c", ALLOW, 0.0)
    assert cache.get("a", 0.0) == (None, False) and len(cache) == 2
    assert cache.get("b", 0.5) == (DENY, True) and cache.get("b", 1.5) == (DENY, False)
    assert cache.get("c", 9.0) == (ALLOW, True)
    cache.put("d", ERROR, 0.0)
    assert cache.get("d", 0.0) == (None, False)


def test_bad_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="auth.http.url"):
        HTTPCallout("ftp://x/")
