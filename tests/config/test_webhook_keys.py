"""webhook.endpoints as a FieldsList of Fields: a list of mappings in the strict config, with
one-line errors naming the item's field, the file and the field's own line."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxmq.config import load_config
from fluxmq.config.values import StrMap, Url
from fluxmq.errors import ConfigError

ENDPOINTS = """\
webhook:
  enabled: true
  endpoints:
    - name: audit
      url: https://hooks.example.com/mqtt
      events: [client.connected, client.disconnected]
      headers: {X-Env: prod}
      retry:
        max_attempts: 5
        initial_interval: 250ms
      secret_file: /etc/fluxmq/key
    - name: all
      url: http://127.0.0.1:9000/
"""


def load(tmp_path: Path, text: str, **kwargs):
    path = tmp_path / "fluxmq.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, env=kwargs.pop("env", {}), **kwargs), path


def error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert "\n" not in str(info.value)
    return info.value


def test_endpoints_are_typed_with_defaults(tmp_path: Path) -> None:
    cfg, _ = load(tmp_path, ENDPOINTS)
    audit, everything = cfg.webhook.endpoints
    assert audit["events"] == ["client.connected", "client.disconnected"]
    assert audit["headers"] == {"X-Env": "prod"}
    assert audit["retry"] == {
        "max_attempts": 5,
        "initial_interval": 0.25,
        "max_interval": None,
        "multiplier": None,
    }
    assert audit["timeout"] is None  # not set: webhook.defaults.timeout applies
    assert everything["events"] == ["*"] and everything["topic_filters"] == [] and everything["retry"] is None


@pytest.mark.parametrize(
    "bad, key, line, words",
    [
        ("    - name: c\n      url: ftp://x\n", "webhook.endpoints[2].url", 15, "http:// URL"),
        (
            "      events: [client.bogus]\n",
            "webhook.endpoints[1].events",
            14,
            "unknown event type 'client.bogus'",
        ),
        ("      retry: {max_attempts: 0}\n", "webhook.endpoints[1].retry.max_attempts", 14, "integer 1..100"),
        ("      colour: red\n", "webhook.endpoints[1].colour", 14, "unknown field"),
        ("      headers: {X-A: 1}\n", "webhook.endpoints[1].headers", 14, "must be strings"),
        ("      secret: hunter2\n", "webhook.endpoints[1].secret", 14, "not written in the config file"),
    ],
)
def test_an_item_error_names_the_field_file_and_line(
    tmp_path: Path, bad: str, key: str, line: int, words: str
) -> None:
    err = error(tmp_path, ENDPOINTS + bad)
    assert err.key == key
    assert err.line == line
    assert words in str(err)
    assert f"fluxmq.yaml:{line}" in str(err)
    assert "hunter2" not in str(err)


def test_a_missing_required_field_is_named(tmp_path: Path) -> None:
    err = error(tmp_path, "webhook:\n  endpoints:\n    - name: x\n")
    assert err.key == "webhook.endpoints[0]" and "missing field 'url'" in str(err)
    assert err.line == 3


def test_endpoints_from_the_environment_as_json() -> None:
    cfg = load_config(env={"FLUXMQ_WEBHOOK_ENDPOINTS": '[{"name": "a", "url": "http://127.0.0.1:1/"}]'})
    assert cfg.webhook.endpoints[0]["name"] == "a"
    with pytest.raises(ConfigError) as info:
        load_config(env={"FLUXMQ_WEBHOOK_ENDPOINTS": '[{"name": "a"}]'})
    assert info.value.key == "webhook.endpoints[0]" and "env FLUXMQ_WEBHOOK_ENDPOINTS" in str(info.value)


def test_str_map_and_url() -> None:
    assert StrMap().from_yaml({"A": "b"}) == {"A": "b"}
    with pytest.raises(ValueError):
        StrMap().from_yaml({"A": 1})
    assert Url("http", "https").from_yaml("https://h:8443/x") == "https://h:8443/x"
    for bad in ("ftp://h/", "http:///x", "http://h:99999/", 5):
        with pytest.raises(ValueError):
            Url("http", "https").from_yaml(bad)
