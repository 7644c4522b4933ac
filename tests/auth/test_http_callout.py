"""The HTTP callout against a real HTTP server in a thread: decisions, fail-closed errors, the
TTL cache (positive, negative, bounded), stale decisions refreshed in the background, the warning
about passwords sent in clear, and https with a CA file (and a client certificate)."""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Iterator

import gevent
import pytest

from fluxmq.auth.http_callout import ALLOW, DENY, ERROR, DecisionCache, HTTPCallout, sends_in_clear
from fluxmq.errors import ConfigError
from tests.auth.http_auth_server import AuthServer
from tests.certs import CertAuthority


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
    assert doc == {
        "action": "connect",
        "clientid": "c1",
        "username": "alice",
        "peer": "10.0.0.1:5",
        "password": "good",
        "password_encoding": "utf8",
    }
    assert call.authorize("c1", "alice", "publish", "ok/x")
    assert not call.authorize("c1", "alice", "subscribe", "no/x")
    assert server.requests[-1] == {
        "action": "subscribe",
        "clientid": "c1",
        "username": "alice",
        "topic": "no/x",
    }


def test_binary_password_travels_as_base64(server: AuthServer) -> None:
    HTTPCallout(server.url).authenticate("c", "u", b"\xff\x00", "p")
    assert server.requests[0]["password"] == "/wA=" and server.requests[0]["password_encoding"] == "base64"


@pytest.mark.parametrize(
    "status, body, expected",
    [
        (401, {}, DENY),
        (403, b"", DENY),
        (500, {"result": "allow"}, ERROR),
        (200, b"not json", ERROR),
        (200, {"result": "maybe"}, ERROR),
        (200, ["allow"], ERROR),
    ],
)
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


@pytest.mark.parametrize(
    "url, clear",
    [
        ("http://auth.example.com/check", True),
        ("http://10.0.0.5:8080/auth", True),
        ("http://user:pw@192.168.1.2/auth", True),
        ("http://[2001:db8::1]/auth", True),
        ("http://127.0.0.1:8080/auth", False),
        ("http://127.8.9.10/auth", False),
        ("http://[::1]:9000/auth", False),
        ("http://localhost/auth", False),
        ("http://LOCALHOST:81/auth", False),
        ("http://auth.localhost/auth", False),
        ("https://auth.example.com/check", False),
    ],
)
def test_plain_http_to_another_host_sends_passwords_in_clear(url: str, clear: bool) -> None:
    assert sends_in_clear(url) is clear


def test_clear_text_url_is_warned_about_once_naming_the_key(caplog) -> None:
    caplog.set_level(logging.WARNING, "fluxmq.auth.http")
    HTTPCallout("http://user:secret@auth.example.com:8080/check")
    lines = [r for r in caplog.records if r.getMessage() == "auth_http_cleartext"]
    assert len(lines) == 1
    assert lines[0].key == "auth.http.url" and lines[0].host == "auth.example.com:8080"
    assert "secret" not in repr(lines[0].__dict__)
    caplog.clear()
    HTTPCallout("http://127.0.0.1:8080/check")
    HTTPCallout("https://auth.example.com/check")
    assert not [r for r in caplog.records if r.getMessage() == "auth_http_cleartext"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory):
    ca = CertAuthority(tmp_path_factory.mktemp("pki"))
    return ca, ca.issue_server("localhost"), ca.issue_client("fluxmq-node")


def _server_context(pki, require_client_cert: bool = False) -> ssl.SSLContext:
    ca, server, _ = pki
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(server.cert_file, server.key_file)
    if require_client_cert:
        ctx.load_verify_locations(ca.cert_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def test_https_service_verified_with_the_ca_file(pki, caplog) -> None:
    ca, _, _ = pki
    server = AuthServer(_server_context(pki))
    try:
        assert server.url.startswith("https://")
        assert HTTPCallout(server.url, ca_file=ca.cert_file).authenticate("c", "u", b"good", "p") == ALLOW
        caplog.set_level(logging.WARNING, "fluxmq.auth.http")
        unverified = HTTPCallout(server.url, timeout=2.0)  # the system CAs do not know the test CA
        assert unverified.authenticate("c", "u", b"good", "p") == ERROR
        failed = [r for r in caplog.records if r.getMessage() == "auth_http_failed"]
        assert len(failed) == 1
        assert "certificate verify failed" in failed[0].error and "auth.http.ca_file" in failed[0].error
        assert len(server.requests) == 1  # the password never reached the unverified service
    finally:
        server.close()


def test_client_certificate_for_a_service_that_requires_one(pki) -> None:
    ca, _, client = pki
    server = AuthServer(_server_context(pki, require_client_cert=True))
    try:
        with_cert = HTTPCallout(
            server.url, ca_file=ca.cert_file, cert_file=client.cert_file, key_file=client.key_file
        )
        assert with_cert.authenticate("c", "u", b"good", "p") == ALLOW
        assert (
            HTTPCallout(server.url, ca_file=ca.cert_file, timeout=2.0).authenticate("c", "u", b"good", "p")
            == ERROR
        )
    finally:
        server.close()


def test_tls_files_are_checked_at_start(pki, tmp_path) -> None:
    ca, _, client = pki
    with pytest.raises(ConfigError, match="auth.http.ca_file"):
        HTTPCallout("https://127.0.0.1/", ca_file=str(tmp_path / "missing.crt"))
    with pytest.raises(ConfigError, match="auth.http.cert_file"):
        HTTPCallout("https://127.0.0.1/", cert_file=ca.cert_file)  # no key in it, no key_file
    with pytest.raises(ConfigError, match="auth.http.key_file"):
        HTTPCallout("https://127.0.0.1/", key_file=client.key_file)  # a key without a certificate
    with pytest.raises(ConfigError, match="auth.http.ca_file"):
        HTTPCallout("http://127.0.0.1/", ca_file=ca.cert_file)  # would be ignored: plain http
