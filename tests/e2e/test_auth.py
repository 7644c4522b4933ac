"""Authentication on a real node: a Mosquitto password file made by Debian's mosquitto_passwd (and
by fluxmq-passwd), CONNACK codes of refused logins in 3.1.1 and 5.0, log lines with the peer and
without the password, reload on SIGHUP, a bad file at start, and the HTTP callout with its cache."""

from __future__ import annotations

import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fluxmq._core import codec as c
from tests.auth.http_auth_server import AuthServer
from tests.certs import CertAuthority
from tests.conftest import REPO_ROOT, NodeFactory, RunningNode
from tests.e2e.mqttraw import RawClient, unique, wait_until

pytestmark = pytest.mark.e2e

MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")


def fluxmq_passwd(*args: str) -> None:
    """Run the fluxmq-passwd command (as a module of this interpreter, like the installed script)."""
    subprocess.run(
        [sys.executable, "-m", "fluxmq.auth.password_file", *args],
        check=True,
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=30,
    )


@pytest.fixture(scope="module")
def pwfile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "passwd"
    if MOSQUITTO_PASSWD is None:
        pytest.skip("mosquitto_passwd not installed (scripts/test installs the mosquitto package)")
    subprocess.run([MOSQUITTO_PASSWD, "-c", "-b", str(path), "alice", "wonderland"], check=True, timeout=30)
    subprocess.run(
        [MOSQUITTO_PASSWD, "-H", "sha512", "-b", str(path), "bob", "builder"], check=True, timeout=30
    )
    fluxmq_passwd("-b", str(path), "carol", "c4r0l")
    return path


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pwfile: Path) -> Iterator[RunningNode]:
    factory = NodeFactory(tmp_path_factory.mktemp("node"))
    try:
        yield factory({"auth.password_file": str(pwfile), "storage.type": "memory"})
    finally:
        factory.close()


def connack(node: RunningNode, version: int, username: str | None, password: bytes | None) -> int:
    with RawClient.to(node, version) as client:
        return client.connect(unique("auth"), username=username, password=password).reason_code


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize(
    "user, password", [("alice", b"wonderland"), ("bob", b"builder"), ("carol", b"c4r0l")]
)
def test_users_of_a_mosquitto_passwd_file_connect(node, version: int, user: str, password: bytes) -> None:
    """$7$ (mosquitto_passwd's default), $6$ (-H sha512) and fluxmq-passwd's $7$ all verify."""
    assert connack(node, version, user, password) == 0


def test_wrong_password_is_refused_3_1_1_with_return_code_4_MQTT_3_2_2_3(node) -> None:
    assert connack(node, 4, "alice", b"Wonderland") == 4
    assert connack(node, 4, "nobody", b"wonderland") == 4
    assert connack(node, 4, "alice", None) == 4


def test_wrong_password_is_refused_5_0_with_0x86(node) -> None:
    assert connack(node, 5, "alice", b"wonderlan") == 0x86
    assert connack(node, 5, "nobody", b"x") == 0x86


def test_anonymous_is_refused_when_a_password_file_is_set(node) -> None:
    """auth.allow_anonymous auto: refused once a source is configured (3.1.1 code 5, 5.0 0x87)."""
    assert connack(node, 4, None, None) == 5
    assert connack(node, 5, None, None) == 0x87
    assert connack(node, 3, None, None) == 5


def test_refused_connection_is_closed_after_connack(node) -> None:
    with RawClient.to(node, 4) as client:
        assert client.connect(unique("x"), username="alice", password=b"no").reason_code == 4
        client.wait_closed()


def test_failed_login_logged_with_peer_and_without_password(node) -> None:
    with RawClient.to(node, 4) as client:
        port = client.sock.getsockname()[1]
        client.connect(unique("log"), username="alice", password=b"hunter2-secret-guess")
        client.wait_closed()
    assert wait_until(lambda: f"127.0.0.1:{port}" in node.log_text())
    lines = [line for line in node.log_text().splitlines() if f"127.0.0.1:{port}" in line]
    assert any("authentication_failed" in line and "user=alice" in line for line in lines), lines
    assert "hunter2-secret-guess" not in node.log_text()


def test_sighup_rereads_the_password_file(node, pwfile: Path) -> None:
    subprocess.run([MOSQUITTO_PASSWD, "-b", str(pwfile), "dave", "first"], check=True, timeout=30)
    assert connack(node, 4, "dave", b"first") == 4  # not loaded yet
    node.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: connack(node, 4, "dave", b"first") == 0)
    subprocess.run([MOSQUITTO_PASSWD, "-D", str(pwfile), "dave"], check=True, timeout=30)
    node.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: connack(node, 4, "dave", b"first") == 4)
    assert connack(node, 4, "alice", b"wonderland") == 0


def test_bad_password_file_stops_the_node_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "passwd"
    bad.write_text("alice:$7$101$MDEyMzQ1Njc4OWFi$AAAA\nbob:plaintext\n")
    factory = NodeFactory(tmp_path / "n")
    try:
        node = factory({"auth.password_file": str(bad), "storage.type": "memory"}, wait_ready=False)
        assert node.wait(30) not in (None, 0)
        lines = [line for line in node.log_text().splitlines() if "auth.password_file" in line]
        assert len(lines) == 1, node.log_tail()
        assert f"{bad}:2" in lines[0] and "bob" in lines[0]
    finally:
        factory.close()


# -- HTTP callout -----------------------------------------------------------------------------------


class AuthService(AuthServer):
    """The auth service the node calls: alice/good may connect; topics under ok/ are allowed;
    ``broken``: every answer is a 503."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(tls, path="/mqtt/auth")
        self.broken = False
        self.decide = self._decide

    def _decide(self, doc: dict) -> tuple[int, dict]:
        if self.broken:
            return 503, {}
        if doc["action"] == "connect":
            ok = doc.get("username") == "alice" and doc.get("password") == "good"
            return 200, {"result": "allow" if ok else "deny"}
        return 200, {"result": "allow" if doc["topic"].startswith("ok/") else "deny"}


@pytest.fixture(scope="module")
def http_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AuthService, RunningNode]]:
    svc = AuthService()
    factory = NodeFactory(tmp_path_factory.mktemp("httpauth"))
    try:
        yield (
            svc,
            factory(
                {
                    "auth.http.url": svc.url,
                    "auth.http.acl": True,
                    "auth.http.timeout": "1s",
                    "auth.http.cache_negative_ttl": "60s",
                    "storage.type": "memory",
                }
            ),
        )
    finally:
        factory.close()
        svc.close()


def test_http_callout_decides_connects(http_auth) -> None:
    svc, node = http_auth
    assert connack(node, 4, "alice", b"good") == 0
    assert connack(node, 4, "alice", b"bad") == 4
    assert connack(node, 5, "mallory", b"good") == 0x86
    assert connack(node, 4, None, None) == 5
    doc = next(r for r in svc.requests if r.get("username") == "mallory")
    assert doc["action"] == "connect" and doc["peer"].startswith("127.0.0.1:") and doc["password"] == "good"


def test_http_callout_cache_spares_repeated_connects(http_auth) -> None:
    svc, node = http_auth
    cid = unique("cached")
    before = svc.count("connect")
    for _ in range(3):
        with RawClient.to(node, 4) as client:
            assert client.connect(cid, username="alice", password=b"good").reason_code == 0
            client.disconnect()
    assert svc.count("connect") == before + 1


def test_http_acl_asked_once_per_topic_not_per_publish(http_auth) -> None:
    svc, node = http_auth
    with RawClient.to(node, 5) as pub, RawClient.to(node, 4) as sub:
        assert pub.connect(unique("p"), username="alice", password=b"good").reason_code == 0
        assert sub.connect(unique("s"), username="alice", password=b"good").reason_code == 0
        assert sub.subscribe(1, ("ok/#", 0)).reason_codes == [0]
        assert sub.subscribe(2, ("no/#", 1)).reason_codes == [0x80]
        topic = unique("ok/t")
        before = svc.count("publish")
        for i in range(1, 201):
            pub.publish(topic, b"%d" % i, 1, packet_id=i)
        acks = [
            pub.wait_for(lambda p, i=i: isinstance(p, c.Puback) and p.packet_id == i) for i in range(1, 201)
        ]
        assert all(a.reason_code == 0 for a in acks)
        assert svc.count("publish") == before + 1
        got = [sub.wait_for(lambda p: isinstance(p, c.Publish)) for _ in range(200)]
        assert [g.payload for g in got][:3] == [b"1", b"2", b"3"]
        pub.publish("no/x", b"x", 1, packet_id=300)
        assert pub.wait_for(lambda p: isinstance(p, c.Puback) and p.packet_id == 300).reason_code == 0x87


def test_http_callout_fails_closed(http_auth) -> None:
    svc, node = http_auth
    svc.broken = True
    try:
        assert connack(node, 4, "alice", b"a-new-password") == 5
        assert connack(node, 5, "alice", b"another-new-one") == 0x87
    finally:
        svc.broken = False
    assert wait_until(lambda: "auth_http_failed" in node.log_text())


def test_http_callout_timeout_fails_closed(tmp_path: Path) -> None:
    """A service that accepts but never answers: the client is refused after auth.http.timeout."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    factory = NodeFactory(tmp_path)
    try:
        node = factory(
            {
                "auth.http.url": f"http://127.0.0.1:{silent.getsockname()[1]}/",
                "auth.http.timeout": "300ms",
                "storage.type": "memory",
            }
        )
        started = time.monotonic()
        assert connack(node, 4, "alice", b"good") == 5
        assert time.monotonic() - started < 10  # refused, not hung (bound generous on a shared machine)
    finally:
        factory.close()
        silent.close()


def test_https_callout_verified_with_auth_http_ca_file(node_factory: NodeFactory, tmp_path: Path) -> None:
    """An https service with a certificate from a private CA: with auth.http.ca_file the node verifies
    it and authenticates; without, verification fails, the client is refused and one log line says
    why and which key fixes it. Loopback https: no clear-text warning."""
    ca = CertAuthority(tmp_path / "pki")
    server = ca.issue_server("localhost")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(server.cert_file, server.key_file)
    svc = AuthService(tls)
    try:
        assert svc.url.startswith("https://127.0.0.1:")
        node = node_factory(
            {"auth.http.url": svc.url, "auth.http.ca_file": ca.cert_file, "storage.type": "memory"}
        )
        assert connack(node, 4, "alice", b"good") == 0
        assert connack(node, 5, "alice", b"bad") == 0x86
        assert svc.count("connect") == 2
        unverified = node_factory({"auth.http.url": svc.url, "storage.type": "memory"})
        assert connack(unverified, 4, "alice", b"good") == 5
        assert connack(unverified, 5, "alice", b"good") == 0x87
        assert svc.count("connect") == 2  # the password never reached a service it could not verify
        assert wait_until(lambda: "auth_http_failed" in unverified.log_text())
        failed = [line for line in unverified.log_text().splitlines() if "auth_http_failed" in line]
        assert len(failed) == 1
        assert "certificate verify failed" in failed[0] and "auth.http.ca_file" in failed[0]
        assert "auth_http_cleartext" not in node.log_text() + unverified.log_text()
    finally:
        svc.close()


def test_plain_http_callout_to_another_host_is_warned_about_at_start(node_factory: NodeFactory) -> None:
    node = node_factory({"auth.http.url": "http://auth.invalid:8080/mqtt", "storage.type": "memory"})
    lines = [line for line in node.log_text().splitlines() if "auth_http_cleartext" in line]
    assert len(lines) == 1 and "auth.http.url" in lines[0], node.log_tail()
