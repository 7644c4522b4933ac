"""TLS and mTLS listeners (``fluxmq.transport.tls``): SSLContext from config, handshakes, the TLS stream.

A CA and certificates are made per test module with ``cryptography`` (tests/certs.py); listeners run
in this process on 127.0.0.1 with gevent TLS clients (tests/transport/harness.py).
"""

from __future__ import annotations

import logging
import random
import ssl
from types import SimpleNamespace

import pytest
from wsproto.events import AcceptConnection

from fluxmq._core import codec as c
from fluxmq.errors import ConfigError
from fluxmq.transport.tls import TLSHandshake, effective_client_auth, server_context
from fluxmq.transport.websocket import WebSocketUpgrade
from tests.certs import CertAuthority

from .harness import (
    InProcessListener,
    MQTTPeer,
    SocketTransport,
    WSClient,
    tcp_connect,
    tls_connect,
    wait_parked,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The test CA with a server and two client certificates, and a foreign CA with its own client."""
    d = tmp_path_factory.mktemp("pki")
    ca = CertAuthority(d, "fluxmq test CA")
    foreign = CertAuthority(d, "foreign CA")
    return SimpleNamespace(
        ca=ca,
        server=ca.issue_server("localhost"),
        alice=ca.issue_client("alice"),
        bob=ca.issue_client("bob"),
        foreign=foreign,
        mallory=foreign.issue_client("mallory"),
    )


def tls_cfg(pki, **over):
    cfg = dict(
        cert_file=pki.server.cert_file,
        key_file=pki.server.key_file,
        ca_file="",
        client_auth="",
        min_version="TLS1.2",
        cipher_suites=[],
        use_cert_cn_as_username=False,
    )
    cfg.update(over)
    return SimpleNamespace(**cfg)


def tls_server(pki, require_client_cert: bool = False, use_cn: bool = False, **over):
    ctx = server_context("server.tcp.tls", tls_cfg(pki, **over), require_client_cert=require_client_cert)
    return InProcessListener(TLSHandshake(ctx, 5.0, "tls", use_cert_cn_as_username=use_cn))


def tls_peer(port: int, pki, cert=None, ca_file: str | None = "default") -> MQTTPeer:
    sock = tls_connect(port, pki.ca.cert_file if ca_file == "default" else ca_file, cert)
    return MQTTPeer(SocketTransport(sock))


def refused(port: int, pki, cert=None, ca_file: str | None = "default") -> bool:
    """True when the server refuses the TLS client (during the handshake or right after it: in TLS 1.3
    the client finishes its side before the server has checked the client certificate)."""
    try:
        peer = tls_peer(port, pki, cert, ca_file)
        peer.send(c.Connect(client_id="should-not-connect", keepalive=30))
        peer.recv()
    except (ssl.SSLError, ConnectionError):
        return True
    return False


# -- SSLContext from config -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "ca", "effective"),
    [
        ("", "", "none"),
        ("", "ca.pem", "require"),
        ("none", "ca.pem", "none"),
        ("request", "", "request"),
        ("verify_if_given", "ca.pem", "verify_if_given"),
    ],
)
def test_effective_client_auth(mode: str, ca: str, effective: str) -> None:
    assert effective_client_auth(mode, ca) == effective


@pytest.mark.parametrize(
    ("mode", "verify"),
    [
        ("none", ssl.CERT_NONE),
        ("request", ssl.CERT_OPTIONAL),
        ("verify_if_given", ssl.CERT_OPTIONAL),
        ("require_any", ssl.CERT_REQUIRED),
        ("require", ssl.CERT_REQUIRED),
        ("", ssl.CERT_REQUIRED),
    ],
)
def test_client_auth_modes_map_to_verify_modes(pki, mode: str, verify: int) -> None:
    ctx = server_context("s", tls_cfg(pki, ca_file=pki.ca.cert_file, client_auth=mode))
    assert ctx.verify_mode == verify


def test_request_without_ca_asks_for_nothing_and_warns(pki, caplog) -> None:
    ctx = server_context("s", tls_cfg(pki, client_auth="request"))
    assert ctx.verify_mode == ssl.CERT_NONE
    assert [r.msg for r in caplog.records] == ["tls_client_auth_request_without_ca"]


@pytest.mark.parametrize("mode", ["require_any", "verify_if_given", "require"])
def test_verifying_modes_need_a_ca_file(pki, mode: str) -> None:
    with pytest.raises(ConfigError) as err:
        server_context("server.tcp.tls", tls_cfg(pki, client_auth=mode))
    assert str(err.value).startswith("config error: server.tcp.tls.ca_file")


def test_mtls_listener_must_require_client_certificates(pki) -> None:
    for over in ({}, {"ca_file": pki.ca.cert_file, "client_auth": "verify_if_given"}):
        with pytest.raises(ConfigError) as err:
            server_context("server.tcp.mtls", tls_cfg(pki, **over), require_client_cert=True)
        assert "server.tcp.mtls.client_auth" in str(err.value)
    ctx = server_context("server.tcp.mtls", tls_cfg(pki, ca_file=pki.ca.cert_file), require_client_cert=True)
    assert ctx.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    ("over", "key", "text"),
    [
        ({"cert_file": ""}, "cert_file", "is empty"),
        ({"cert_file": "/nonexistent/server.crt"}, "cert_file", "No such file"),
        ({"key_file": "/nonexistent/server.key"}, "key_file", "No such file"),
        ({"ca_file": "/nonexistent/ca.crt"}, "ca_file", "No such file"),
        ({"cipher_suites": ["TLS_NOT_A_SUITE"]}, "cipher_suites", "unknown cipher suite"),
    ],
)
def test_bad_tls_config_is_one_line_naming_the_key(pki, over: dict, key: str, text: str) -> None:
    with pytest.raises(ConfigError) as err:
        server_context("server.tcp.tls", tls_cfg(pki, **over), source="conf.yaml")
    message = str(err.value)
    assert message.startswith(f"config error: server.tcp.tls.{key} (conf.yaml)")
    assert text in message and "\n" not in message


def test_key_not_matching_the_certificate(pki) -> None:
    with pytest.raises(ConfigError) as err:
        server_context("server.tcp.tls", tls_cfg(pki, key_file=pki.alice.key_file))
    assert "server.tcp.tls.cert_file" in str(err.value) and "\n" not in str(err.value)


def test_a_file_that_is_not_pem(pki, tmp_path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError):
        server_context("s", tls_cfg(pki, cert_file=str(junk)))
    with pytest.raises(ConfigError) as err:
        server_context("s", tls_cfg(pki, ca_file=str(junk)))
    assert "s.ca_file" in str(err.value)


def test_cipher_suites_by_go_and_openssl_names(pki) -> None:
    ctx = server_context(
        "s",
        tls_cfg(
            pki, cipher_suites=["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"]
        ),
    )
    tls12 = {s["name"] for s in ctx.get_ciphers() if s["protocol"] == "TLSv1.2"}
    assert tls12 == {"ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"}


def test_tls13_suites_are_accepted_and_ignored_with_a_warning(pki, caplog) -> None:
    ctx = server_context("s", tls_cfg(pki, cipher_suites=["TLS_AES_128_GCM_SHA256"]))
    assert any(s["protocol"] == "TLSv1.3" for s in ctx.get_ciphers())
    assert [r.msg for r in caplog.records] == ["tls13_cipher_suites_ignored"]


def test_min_version(pki) -> None:
    assert server_context("s", tls_cfg(pki)).minimum_version == ssl.TLSVersion.TLSv1_2
    ctx = server_context("s", tls_cfg(pki, min_version="TLS1.3"))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3


def test_tls13_only_server_refuses_a_tls12_client(pki) -> None:
    with tls_server(pki, min_version="TLS1.3") as s:
        ctx = ssl.create_default_context(cafile=pki.ca.cert_file)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        from gevent import ssl as gssl

        gctx = gssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        gctx.load_verify_locations(pki.ca.cert_file)
        gctx.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(ssl.SSLError):
            gctx.wrap_socket(tcp_connect(s.port), server_hostname="localhost")
        tls_peer(s.port, pki).connect("tls13-client")


# -- TLS listener ---------------------------------------------------------------------------------


def test_tls_client_with_the_test_ca_exchanges_messages(pki) -> None:
    with tls_server(pki) as s:
        sub = tls_peer(s.port, pki)
        sub.connect("tls-sub")
        sub.send(c.Subscribe(1, [c.Subscription("tls/#", 2)]))
        sub.expect(c.Suback)
        pub = tls_peer(s.port, pki)
        pub.connect("tls-pub")
        pub.send(c.Publish("tls/x", b"secret", 1, packet_id=9))
        pub.expect(c.Puback)
        got = sub.expect(c.Publish)
        assert (got.topic, got.payload) == ("tls/x", b"secret")


def test_failed_handshakes_are_one_log_line_and_the_listener_keeps_serving(pki, caplog) -> None:
    caplog.set_level(logging.INFO, "fluxmq.transport")
    with tls_server(pki) as s:
        plain = MQTTPeer(SocketTransport(tcp_connect(s.port)))  # MQTT without TLS
        plain.send(c.Connect(client_id="plaintext", keepalive=30))
        assert plain.wait_closed()
        assert refused(s.port, pki, ca_file=pki.foreign.cert_file)  # the client does not trust us
        good = tls_peer(s.port, pki)
        good.connect("still-served")
        good.send(c.Pingreq())
        good.expect(c.Pingresp)
    failed = [r for r in caplog.records if r.msg == "tls_handshake_failed"]
    assert len(failed) == 2
    assert all(r.exc_info is None and r.listener == "tls" and r.error for r in failed)
    assert failed[0].error in (
        "WRONG_VERSION_NUMBER",
        "HTTP_REQUEST",
        "UNEXPECTED_MESSAGE",
        "RECORD_LAYER_FAILURE",
    ), failed[0].error


def test_handshake_deadline(pki, caplog) -> None:
    caplog.set_level(logging.INFO, "fluxmq.transport")
    ctx = server_context("s", tls_cfg(pki))
    with InProcessListener(TLSHandshake(ctx, 0.3, "tls")) as s:
        silent = tcp_connect(s.port)
        assert silent.recv(10) == b""  # closed by the server, no handshake ever started
    failed = [r for r in caplog.records if r.msg == "tls_handshake_failed"]
    assert len(failed) == 1 and failed[0].error == "timeout"


def test_large_messages_to_a_slow_tls_reader_arrive_intact(pki) -> None:
    """Output bigger than the socket buffers goes through OpenSSL's want-write retry path."""
    with tls_server(pki) as s:
        sub = tls_peer(s.port, pki)
        sub.connect("slow-tls")
        sub.send(c.Subscribe(1, [c.Subscription("big/#", 0)]))
        sub.expect(c.Suback)
        pub = tls_peer(s.port, pki)
        pub.connect("big-tls-pub")
        rng = random.Random(11)
        payloads = [rng.randbytes(rng.choice([5, 1000, 90000, 500000])) for _ in range(12)]
        for i, payload in enumerate(payloads):
            pub.send(c.Publish(f"big/{i}", payload))
        pub.send(c.Pingreq())
        pub.expect(c.Pingresp)
        assert [sub.expect(c.Publish).payload for _ in payloads] == payloads


# -- mTLS -------------------------------------------------------------------------------------------


def test_mtls_refuses_no_certificate_and_a_foreign_ca_and_keeps_serving(pki, caplog) -> None:
    caplog.set_level(logging.INFO, "fluxmq.transport")
    with tls_server(pki, require_client_cert=True, ca_file=pki.ca.cert_file) as s:
        assert refused(s.port, pki)  # no client certificate
        assert refused(s.port, pki, cert=pki.mallory)  # signed by another CA
        alice = tls_peer(s.port, pki, cert=pki.alice)
        alice.connect("alice")
        alice.send(c.Pingreq())
        alice.expect(c.Pingresp)
    errors = [r.error for r in caplog.records if r.msg == "tls_handshake_failed"]
    assert len(errors) == 2, errors
    assert all(r.exc_info is None for r in caplog.records)


def test_verify_if_given_accepts_no_certificate_but_refuses_a_bad_one(pki) -> None:
    with tls_server(pki, ca_file=pki.ca.cert_file, client_auth="verify_if_given") as s:
        tls_peer(s.port, pki).connect("anonymous")
        tls_peer(s.port, pki, cert=pki.bob).connect("bob")
        assert refused(s.port, pki, cert=pki.mallory)


def test_cert_cn_becomes_the_username(pki) -> None:
    with tls_server(pki, use_cn=True, ca_file=pki.ca.cert_file, client_auth="verify_if_given") as s:
        alice = tls_peer(s.port, pki, cert=pki.alice)
        alice.send(c.Connect(client_id="dev-1", keepalive=30, username="claimed-name"))
        alice.expect(c.Connack)
        anonymous = tls_peer(s.port, pki)
        anonymous.send(c.Connect(client_id="dev-2", keepalive=30, username="own-name"))
        anonymous.expect(c.Connack)
        assert s.broker.sessions["dev-1"].username == "alice"
        assert s.broker.sessions["dev-2"].username == "own-name"  # no certificate: its own username


def test_without_the_option_the_connect_username_stays(pki) -> None:
    with tls_server(pki, ca_file=pki.ca.cert_file) as s:
        bob = tls_peer(s.port, pki, cert=pki.bob)
        bob.send(c.Connect(client_id="dev-3", keepalive=30, username="whatever"))
        bob.expect(c.Connack)
        assert s.broker.sessions["dev-3"].username == "whatever"


# -- WebSocket over TLS -----------------------------------------------------------------------------


def test_wss_carries_mqtt_and_the_certificate_username(pki) -> None:
    ctx = server_context("server.websocket.tls", tls_cfg(pki, ca_file=pki.ca.cert_file))
    upgrade = WebSocketUpgrade("/mqtt", [], 5.0, "wss", inner=TLSHandshake(ctx, 5.0, "wss", True))
    with InProcessListener(upgrade) as s:
        ws = WSClient(s.port, sock=tls_connect(s.port, pki.ca.cert_file, pki.alice))
        assert isinstance(ws.handshake(), AcceptConnection)
        peer = MQTTPeer(ws)
        peer.connect("wss-client")
        assert s.broker.sessions["wss-client"].username == "alice"
        peer.send(c.Subscribe(1, [c.Subscription("w/#", 0)]))
        peer.expect(c.Suback)
        payload = random.Random(3).randbytes(300000)
        peer.send(c.Publish("w/big", payload))
        assert peer.expect(c.Publish).payload == payload
        assert refused(s.port, pki)  # no client certificate: refused before any HTTP


# -- the TLS stream's write contract on a real SSL object ----------------------------------------------


def test_refused_writes_retried_with_more_bytes_lose_and_repeat_nothing(pki) -> None:
    """OpenSSL may send part of a write it reports as refused (want-write, so send_nowait returns 0);
    the connection's next write starts with the same bytes and may carry more. Measured here on a
    real SSL object over a socket whose buffers fill up: every byte arrives exactly once, in order."""
    import gevent
    from gevent import socket as gsocket
    from gevent import ssl as gssl

    server_sock, client_sock = gsocket.socketpair()
    ctx = server_context("s", tls_cfg(pki))
    client_ctx = gssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(pki.ca.cert_file)
    handshake = gevent.spawn(TLSHandshake(ctx, 10.0, "pair"), server_sock, ("pair", 0))
    client = client_ctx.wrap_socket(client_sock, server_hostname="localhost")
    stream = handshake.get(timeout=10)
    assert stream is not None
    rng = random.Random(5)
    total = bytearray()
    out = bytearray()  # as MQTTConnection.out: unsent bytes stay at the front
    refusals = 0
    for _ in range(3):  # three rounds of: fill until refused, add more, finish with send_all
        for _ in range(2000):
            chunk = rng.randbytes(rng.randint(1, 60000))
            out += chunk
            total += chunk
            n = stream.send_nowait(out)
            assert n in (0, len(out))  # all or nothing
            del out[:n]
            if n == 0:
                refusals += 1
                break
        extra = rng.randbytes(30000)
        out += extra
        total += extra
        received = bytearray()
        reader = gevent.spawn(_read_exactly, client, received, len(total))
        stream.send_all(bytes(out), 10.0)
        out.clear()
        reader.get(timeout=30)
        assert bytes(received) == bytes(total)
        total.clear()
    assert refusals == 3  # the socket really filled up each round
    stream.close()
    client.close()


def _read_exactly(sock, into: bytearray, expected: int) -> None:
    while len(into) < expected:
        data = sock.recv(1 << 20)
        assert data, "closed early"
        into.extend(data)


def test_a_parked_tls_connection_wakes_for_packets(pki) -> None:
    ctx = server_context("s", tls_cfg(pki))
    with InProcessListener(TLSHandshake(ctx, 5.0, "tls"), park_after=0.05) as s:
        sub = tls_peer(s.port, pki)
        sub.connect("parked-tls")
        sub.send(c.Subscribe(1, [c.Subscription("p/#", 0)]))
        sub.expect(c.Suback)
        assert wait_parked(s)
        pub = tls_peer(s.port, pki)
        pub.connect("tls-waker")
        pub.send(c.Publish("p/1", b"x" * 70000))  # several TLS records
        assert sub.expect(c.Publish).payload == b"x" * 70000
        assert wait_parked(s)
        sub.send(c.Pingreq(), c.Pingreq())
        sub.expect(c.Pingresp)
        sub.expect(c.Pingresp)
