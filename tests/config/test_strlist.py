"""The StrList value type (``fluxmq.config.values``) behind allowed_origins and cipher_suites."""

from __future__ import annotations

import pytest

from fluxmq.config import load_config
from fluxmq.config.values import Enum, StrList
from fluxmq.errors import ConfigError


def test_from_yaml_takes_a_list_of_non_empty_strings() -> None:
    t = StrList()
    assert t.from_yaml(["https://a.example", " *.b.example "]) == ["https://a.example", "*.b.example"]
    assert t.from_yaml([]) == []
    for bad in ("a,b", [1], [""], ["ok", None], {"a": 1}):
        with pytest.raises(ValueError):
            t.from_yaml(bad)


@pytest.mark.parametrize(
    ("text", "items"),
    [
        ("", []),
        ("[]", []),
        ("a", ["a"]),
        ("a, b,", ["a", "b"]),
        ("[\"https://x.example\", 'y']", ["https://x.example", "y"]),
    ],
)
def test_from_text_reads_comma_separated_or_a_flow_list(text: str, items: list[str]) -> None:
    assert StrList().from_text(text) == items


def test_list_keys_from_file_env_and_set(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text('server:\n  websocket:\n    plain:\n      allowed_origins: ["https://a.example"]\n')
    cfg = load_config(
        str(path),
        env={"FLUXMQ_SERVER_TCP_TLS_CIPHER_SUITES": "X1, X2"},
        overrides=["server.websocket.tls.allowed_origins=[p, q]"],
    )
    assert cfg.server.websocket.plain.allowed_origins == ["https://a.example"]
    assert cfg.server.tcp.tls.cipher_suites == ["X1", "X2"]
    assert cfg.server.websocket.tls.allowed_origins == ["p", "q"]


def test_a_scalar_where_a_list_is_expected_is_one_config_error(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  websocket:\n    plain:\n      allowed_origins: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path), env={})
    assert "server.websocket.plain.allowed_origins" in str(err.value)
    assert "\n" not in str(err.value)


def test_enum_shows_the_empty_choice_quoted() -> None:
    e = Enum("", "none", "require")
    assert e.summary == '"" | none | require'
    assert e.from_yaml("") == ""
