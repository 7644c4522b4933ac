"""WebhookSettings.from_config: endpoint defaults, checks the loader cannot make, secrets from a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxmq.config import load_config
from fluxmq.config.schema import WEBHOOK_EVENTS
from fluxmq.errors import ConfigError
from fluxmq.webhook import RetryPolicy, WebhookSettings


def settings(tmp_path: Path, endpoints: str, extra: str = "") -> WebhookSettings:
    path = tmp_path / "fluxmq.yaml"
    path.write_text("webhook:\n  enabled: true\n" + extra + "  endpoints:\n" + endpoints, encoding="utf-8")
    return WebhookSettings.from_config(load_config(path, env={}))


def test_defaults_fill_what_an_endpoint_leaves_out(tmp_path: Path) -> None:
    s = settings(
        tmp_path,
        "    - {name: a, url: 'http://127.0.0.1:1/', retry: {max_attempts: 7}}\n",
        "  defaults:\n    timeout: 2s\n    retry: {initial_interval: 100ms}\n"
        "    circuit_breaker: {failure_threshold: 3, reset_timeout: 10s}\n",
    )
    (a,) = s.endpoints
    assert a.timeout == 2.0 and a.events == frozenset(WEBHOOK_EVENTS) and a.topic_filters == ("#",)
    assert a.retry == RetryPolicy(7, 0.1, 30.0, 2.0)
    assert (a.failure_threshold, a.reset_timeout) == (3, 10.0)
    assert a.secret == b""


def test_backoff_pauses_grow_to_the_cap() -> None:
    r = RetryPolicy(10, 1.0, 5.0, 2.0)
    assert [r.pause(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_secret_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUXMQ_TEST_WH_KEY", "from-env")
    s = settings(tmp_path, "    - {name: a, url: 'http://h/', secret_env: FLUXMQ_TEST_WH_KEY}\n")
    assert s.endpoints[0].secret == b"from-env"


def test_secret_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("k3y\n")
    s = settings(tmp_path, f"    - {{name: a, url: 'http://h/', secret_file: '{tmp_path / 'key'}'}}\n")
    assert s.endpoints[0].secret == b"k3y"


@pytest.mark.parametrize(
    "endpoints, key, words",
    [
        (
            "    - {name: a, url: 'http://h/'}\n    - {name: a, url: 'http://h/2'}\n",
            "webhook.endpoints[1].name",
            "a name no other endpoint has",
        ),
        (
            "    - {name: a, url: 'http://h/', topic_filters: ['a/#/b']}\n",
            "webhook.endpoints[0].topic_filters",
            "'a/#/b'",
        ),
        (
            "    - {name: a, url: 'http://h/', topic_filters: ['$share/g/a']}\n",
            "webhook.endpoints[0].topic_filters",
            "without $share",
        ),
        (
            "    - {name: a, url: 'http://h/', secret_file: '/nonexistent/key'}\n",
            "webhook.endpoints[0].secret_file",
            "readable file",
        ),
        (
            "    - {name: a, url: 'http://h/', secret_env: FLUXMQ_TEST_WH_KEY, secret_file: '/k'}\n",
            "webhook.endpoints[0].secret_file",
            "not both",
        ),
        (
            "    - {name: a, url: 'http://h/', secret_env: FLUXMQ_TEST_WH_UNSET}\n",
            "webhook.endpoints[0].secret_env",
            "non-empty environment variable",
        ),
    ],
)
def test_bad_endpoints_are_config_errors(
    tmp_path: Path, endpoints: str, key: str, words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLUXMQ_TEST_WH_KEY", "k")
    with pytest.raises(ConfigError) as info:
        settings(tmp_path, endpoints)
    assert info.value.key == key and words in str(info.value)
    assert "fluxmq.yaml:3" in str(info.value)  # the line of webhook.endpoints


def test_ca_file_needs_https_and_a_readable_bundle(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        settings(tmp_path, "    - {name: a, url: 'http://h/', ca_file: '/etc/hostname'}\n")
    assert info.value.key == "webhook.endpoints[0].ca_file" and "https://" in str(info.value)
    with pytest.raises(ConfigError) as info:
        settings(tmp_path, "    - {name: a, url: 'https://h/', ca_file: '/nonexistent/ca.pem'}\n")
    assert info.value.key == "webhook.endpoints[0].ca_file" and "readable PEM CA bundle" in str(info.value)
