"""``fluxmq-node`` command line: flags, --check output, precedence wiring, config errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from ruamel.yaml import YAML

import fluxmq
from fluxmq.node.cli import build_parser, main
from tests.conftest import REPO_ROOT


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's FLUXMQ_* variables must not leak into these tests."""
    for name in list(os.environ):
        if name.startswith("FLUXMQ_"):
            monkeypatch.delenv(name)


def check(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    assert main(["--check", *argv]) == 0
    return YAML(typ="safe", pure=True).load(capsys.readouterr().out)


def test_help_describes_every_flag(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert flag in out
        assert action.help, f"{action.option_strings} has no help text"
    assert "KEY=VALUE" in out
    assert "shutdown_timeout" in out


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fluxmq-node {fluxmq.__version__}"


def test_check_without_config_prints_defaults(capsys: pytest.CaptureFixture) -> None:
    effective = check(capsys)
    assert effective["server"]["health_addr"] == "127.0.0.1:8081"
    assert effective["server"]["health_enabled"] is True


def test_check_precedence_cli_over_env_over_file(tmp_path, monkeypatch, capsys) -> None:
    conf = tmp_path / "node.yaml"
    conf.write_text("server:\n  health_addr: 127.0.0.1:7001\n  connect_timeout: 3s\n  shutdown_timeout: 4s\n")
    monkeypatch.setenv("FLUXMQ_SERVER_HEALTH_ADDR", "127.0.0.1:7002")
    monkeypatch.setenv("FLUXMQ_SERVER_SHUTDOWN_TIMEOUT", "5s")
    effective = check(capsys, "--config", str(conf), "--set", "server.health_addr=127.0.0.1:7003")
    assert effective["server"]["health_addr"] == "127.0.0.1:7003"  # --set
    assert effective["server"]["shutdown_timeout"] == 5.0  # env over file
    assert effective["server"]["connect_timeout"] == 3.0  # file over defaults


def test_config_path_from_fluxmq_config_env(tmp_path, monkeypatch, capsys) -> None:
    conf = tmp_path / "env.yaml"
    conf.write_text("server:\n  health_addr: 127.0.0.1:7010\n")
    monkeypatch.setenv("FLUXMQ_CONFIG", str(conf))
    assert check(capsys)["server"]["health_addr"] == "127.0.0.1:7010"
    other = tmp_path / "flag.yaml"
    other.write_text("server:\n  health_addr: 127.0.0.1:7011\n")
    assert check(capsys, "--config", str(other))["server"]["health_addr"] == "127.0.0.1:7011"


def test_repeated_set(capsys: pytest.CaptureFixture) -> None:
    effective = check(
        capsys, "--set", "server.health_addr=127.0.0.1:7020", "--set", "server.health_enabled=false"
    )
    assert effective["server"]["health_addr"] == "127.0.0.1:7020"
    assert effective["server"]["health_enabled"] is False


def test_config_error_is_one_stderr_line_and_exit_2(tmp_path, capsys) -> None:
    conf = tmp_path / "bad.yaml"
    conf.write_text("server:\n  health_addr: 127.0.0.1:7030\n  no_such_key: 1\n")
    assert main(["--config", str(conf)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert "server.no_such_key" in lines[0] and f"{conf}:3" in lines[0]


def test_unknown_set_key_is_config_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["--check", "--set", "server.nope=1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "server.nope" in err[0]


def test_missing_config_file_is_config_error(tmp_path, capsys) -> None:
    assert main(["--check", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_set_without_equals_is_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--set", "server.health_addr"])
    assert exit_info.value.code == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_module_entry_point_runs_main() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fluxmq.node.cli", "--version"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert result.stdout.strip() == f"fluxmq-node {fluxmq.__version__}"


def _secret_str_keys() -> list:
    from fluxmq.config import SCHEMA
    from fluxmq.config.values import Str

    keys = [key for key in SCHEMA.keys.values() if key.secret and isinstance(key.type, Str)]
    return keys or [pytest.param(None, marks=pytest.mark.skip(reason="no secret string key declared yet"))]


@pytest.mark.parametrize("key", _secret_str_keys())
def test_check_redacts_secrets(key, monkeypatch, capsys) -> None:
    monkeypatch.setenv(key.env, "s3cr3t-value-from-env")
    assert main(["--check"]) == 0
    out = capsys.readouterr().out
    assert "s3cr3t-value-from-env" not in out
    assert key.leaf in out


# -- --check reads the files the configuration names; --print-config ---------------------------------


def test_check_reports_every_problem_one_line_each(tmp_path, capsys) -> None:
    from tests.certs import CertAuthority

    ca = CertAuthority(tmp_path / "ca")
    server = ca.issue_server()
    other = CertAuthority(tmp_path / "other", "other CA").issue_server()
    acl = tmp_path / "acl"
    acl.write_text("topic read a/#\nfrobnicate everything\n")
    conf = tmp_path / "node.yaml"
    conf.write_text(
        "auth:\n"
        f"  password_file: {tmp_path / 'absent-passwd'}\n"
        f"  acl_file: {acl}\n"
        "server:\n"
        "  tcp:\n"
        "    tls:\n"
        "      addr: 127.0.0.1:0\n"
        f"      cert_file: {tmp_path / 'absent.crt'}\n"
        f"      key_file: {server.key_file}\n"
        "    mtls:\n"
        "      addr: 127.0.0.1:0\n"
        f"      cert_file: {server.cert_file}\n"
        f"      key_file: {other.key_file}\n"  # not the key of cert_file
        f"      ca_file: {ca.cert_file}\n"
    )
    assert main(["--check", "--config", str(conf)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 4, lines
    assert any("auth.password_file" in line and "absent-passwd" in line for line in lines)
    assert any("auth.acl_file" in line and f"{acl}:2" in line for line in lines)
    assert any("server.tcp.tls.cert_file" in line and f"{conf}:8" in line for line in lines)
    assert any("server.tcp.mtls.cert_file" in line for line in lines)


def test_check_reports_every_config_error(tmp_path, capsys) -> None:
    conf = tmp_path / "node.yaml"
    conf.write_text("log:\n  level: loud\nbroker:\n  max_inflight: lots\n")
    assert main(["--check", "--config", str(conf), "--set", "server.nope=1"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3, lines
    assert [f"{conf}:2" in lines[0], f"{conf}:4" in lines[1], "server.nope" in lines[2]] == [True] * 3


def test_check_passes_with_good_files(tmp_path, capsys) -> None:
    from fluxmq.auth.password_file import hash_password
    from tests.certs import CertAuthority

    server = CertAuthority(tmp_path / "ca").issue_server()
    passwd = tmp_path / "passwd"
    passwd.write_text(f"alice:{hash_password('pw', iterations=1000)}\n")
    effective = check(
        capsys,
        "--set",
        f"auth.password_file={passwd}",
        "--set",
        "server.tcp.tls.addr=127.0.0.1:0",
        "--set",
        f"server.tcp.tls.cert_file={server.cert_file}",
        "--set",
        f"server.tcp.tls.key_file={server.key_file}",
    )
    assert effective["auth"]["password_file"] == str(passwd)


def test_check_prints_reference_notices_to_stderr(tmp_path, capsys) -> None:
    conf = tmp_path / "node.yaml"
    # reference 002's top-level ``queue`` section (fluxmq configures queues under ``queues``)
    conf.write_text("queue:\n  enabled: true\nlog:\n  level: warn\n")
    assert main(["--check", "--config", str(conf)]) == 0
    captured = capsys.readouterr()
    assert "queue" in captured.err and "not implemented yet" in captured.err
    assert YAML(typ="safe", pure=True).load(captured.out)["log"]["level"] == "warn"


def test_print_config_writes_the_commented_default(capsys) -> None:
    assert main(["--print-config"]) == 0
    out = capsys.readouterr().out
    assert out == (REPO_ROOT / "conf" / "fluxmq.yaml").read_text(encoding="utf-8")
    assert out.startswith("# fluxmq configuration")


def test_without_config_every_listener_is_on_loopback(capsys) -> None:
    """No --config: a node listens on loopback only (an operator opens it up by setting an address)."""
    from fluxmq.config import SCHEMA, parse_addr

    effective = check(capsys)
    addrs = {key: effective for key in SCHEMA.keys if key.endswith("addr")}
    enabled = {}
    for key in addrs:
        node = effective
        for part in key.split("."):
            node = node[part]
        if node:
            enabled[key] = node
    assert "server.tcp.plain.addr" in enabled and "server.health_addr" in enabled
    for key, addr in enabled.items():
        assert parse_addr(addr)[0] == "127.0.0.1", f"{key} = {addr!r} is not loopback"


def test_check_warns_of_anonymous_exposure_and_passes(capsys) -> None:
    """--check names a network listener that will refuse anonymous clients: a warning, not an error
    (the node starts with it, as Mosquitto 2)."""
    assert main(["--check", "--set", "server.tcp.plain.addr=:0"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("warning: ") and "server.tcp.plain.addr" in lines[0]
    assert "anonymous" in lines[0] and "auth.allow_anonymous: true" in lines[0]


def test_check_reports_anonymous_exposure_with_the_other_problems(tmp_path, capsys) -> None:
    """--check lists the problems the node would stop on, and the exposure warning with them."""
    assert (
        main(
            [
                "--check",
                "--set",
                "server.tcp.plain.addr=:0",
                "--set",
                f"auth.acl_file={tmp_path / 'absent-acl'}",
            ]
        )
        == 2
    )
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert any(
        line.startswith("warning: ") and "server.tcp.plain.addr" in line and "anonymous" in line
        for line in lines
    )
    assert any("auth.acl_file" in line for line in lines)
