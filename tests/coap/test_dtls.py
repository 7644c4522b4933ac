"""fluxmq.coap.dtls settings: PSK files and the Mbed TLS context refuse bad settings with one line."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from fluxmq.coap.dtls import PSKStore, load_psk_file, server_context
from fluxmq.errors import ConfigError


def section(**keys: str) -> SimpleNamespace:
    base = {
        "addr": "127.0.0.1:5684",
        "cert_file": "",
        "key_file": "",
        "ca_file": "",
        "client_auth": "",
        "psk_file": "",
    }
    base.update(keys)
    return SimpleNamespace(**base)


def test_psk_file_lines_and_comments(tmp_path: Path) -> None:
    f = tmp_path / "psk"
    f.write_text("# devices\n\nsensor-7:00112233\nurn:dev:9:aabb\n")
    assert load_psk_file(str(f)) == {"sensor-7": bytes.fromhex("00112233"), "urn:dev:9": b"\xaa\xbb"}


@pytest.mark.parametrize("line", ["no-colon", "dev:zz", ":00ff", "dev:"])
def test_bad_psk_line_names_the_key_and_line(tmp_path: Path, line: str) -> None:
    f = tmp_path / "psk"
    f.write_text(f"ok:00\n{line}\n")
    with pytest.raises(ConfigError, match=r"server.coap.dtls.psk_file.*:2"):
        load_psk_file(str(f))


def test_a_dtls_listener_needs_a_certificate_or_keys() -> None:
    with pytest.raises(ConfigError, match="server.coap.dtls.addr"):
        server_context(section(), "server.coap.dtls")


def test_mdtls_needs_a_ca_file(tmp_path: Path) -> None:
    f = tmp_path / "psk"
    f.write_text("a:00\n")
    with pytest.raises(ConfigError, match="server.coap.mdtls.ca_file"):
        server_context(section(psk_file=str(f)), "server.coap.mdtls", require_client_cert=True)


def test_missing_certificate_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="server.coap.dtls.cert_file"):
        server_context(
            section(cert_file=str(tmp_path / "none.crt"), key_file=str(tmp_path / "none.key")),
            "server.coap.dtls",
        )


def test_psk_store_remembers_the_identity_looked_up() -> None:
    store = PSKStore({"a": b"\x01"})
    assert store["a"] == b"\x01" and store.last_identity == "a"
    with pytest.raises(KeyError):
        store["b"]


def test_random_datagrams_leave_the_dtls_listener_serving(tmp_path: Path) -> None:
    """Hostile records (random bytes, mutated ClientHellos) are dropped; a real client then completes
    a PSK handshake and gets its answer. The client runs in a thread (its socket API blocks)."""
    import random
    import socket
    import threading

    import gevent
    from mbedtls import tls

    from fluxmq.broker.broker import Broker, BrokerSettings
    from fluxmq.coap import codec
    from fluxmq.coap.bridge import CoapBridge
    from fluxmq.coap.dtls import CoapDTLSListener

    f = tmp_path / "psk"
    f.write_text("dev:00112233445566778899aabbccddeeff\n")
    context, psk = server_context(section(psk_file=str(f)), "server.coap.dtls")
    bridge = CoapBridge(Broker(BrokerSettings()))
    listener = CoapDTLSListener("coap_dtls", "127.0.0.1", 0, bridge, context, psk)
    listener.start()
    rng = random.Random(7)
    noise = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    result: list = []

    def client() -> None:
        try:
            conf = tls.DTLSConfiguration(
                pre_shared_key=("dev", bytes.fromhex("00112233445566778899aabbccddeeff")),
                validate_certificates=False,
            )
            sock = tls.ClientContext(conf).wrap_socket(
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM), server_hostname=None
            )
            sock.settimeout(10)
            sock.connect(("127.0.0.1", listener.port))
            sock.do_handshake()
            sock.send(
                codec.serialize(
                    codec.CoapMessage(codec.CON, codec.GET, 1, b"t", [(codec.URI_PATH, b"health")])
                )
            )
            result.append(codec.parse(sock.recv(4096)).payload)
            sock.close()
        except Exception as exc:  # reported by the assertion below
            result.append(exc)

    try:
        for i in range(2000):
            if i % 2:
                data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200)))
            else:  # a DTLS 1.2 handshake record header with garbage after it
                data = b"\x16\xfe\xfd" + bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 120)))
            noise.sendto(data, ("127.0.0.1", listener.port))
            if i % 200 == 0:
                gevent.sleep(0.01)
        thread = threading.Thread(target=client)
        thread.start()
        for _ in range(1000):
            if not thread.is_alive():
                break
            gevent.sleep(0.01)
        assert result == [b"healthy"]
        assert len(listener.peers) <= 1  # no state for the noise (no cookie was ever returned)
    finally:
        noise.close()
        listener.stop()
