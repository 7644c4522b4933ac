"""fluxmq.coap.dtls settings: PSK files and the Mbed TLS context refuse bad settings with one line."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from fluxmq.coap.dtls import PSKStore, load_psk_file, server_context
from fluxmq.errors import ConfigError


def section(**keys: str) -> SimpleNamespace:
    base = {"addr": "127.0.0.1:5684", "cert_file": "", "key_file": "", "ca_file": "", "client_auth": "",
            "psk_file": ""}
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
        server_context(section(cert_file=str(tmp_path / "none.crt"), key_file=str(tmp_path / "none.key")),
                       "server.coap.dtls")


def test_psk_store_remembers_the_identity_looked_up() -> None:
    store = PSKStore({"a": b"\x01"})
    assert store["a"] == b"\x01" and store.last_identity == "a"
    with pytest.raises(KeyError):
        store["b"]
