"""Mosquitto password files: files made by Debian's mosquitto_passwd verify here, files made by
fluxmq-passwd are accepted by a real Mosquitto broker, and bad lines are one ConfigError each."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from fluxmq.auth import password_file as pw
from fluxmq.errors import ConfigError
from tests.conftest import free_port

MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
)
needs_mosquitto_passwd = pytest.mark.skipif(MOSQUITTO_PASSWD is None, reason="mosquitto_passwd not installed")
needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto not installed")


def mosquitto_passwd(*args: str) -> None:
    subprocess.run([MOSQUITTO_PASSWD, *args], check=True, capture_output=True, timeout=30)


@needs_mosquitto_passwd
def test_pbkdf2_file_from_mosquitto_passwd_verifies(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    mosquitto_passwd("-c", "-b", str(path), "alice", "s3cret")
    mosquitto_passwd("-b", str(path), "bob", "pässwörd")
    assert path.read_text().startswith("alice:$7$101$")
    pf = pw.PasswordFile.load(str(path))
    assert pf.verify("alice", b"s3cret")
    assert pf.verify("bob", "pässwörd".encode())
    assert not pf.verify("alice", b"s3cret ")
    assert not pf.verify("alice", b"")
    assert not pf.verify("alice", None)
    assert not pf.verify("bob", b"s3cret")
    assert not pf.verify("carol", b"s3cret")


@needs_mosquitto_passwd
def test_sha512_file_from_mosquitto_passwd_verifies(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    mosquitto_passwd("-H", "sha512", "-c", "-b", str(path), "old", "legacy")
    assert path.read_text().startswith("old:$6$")
    pf = pw.PasswordFile.load(str(path))
    assert pf.verify("old", b"legacy")
    assert not pf.verify("old", b"Legacy")


@needs_mosquitto_passwd
def test_mosquitto_passwd_edits_a_file_written_by_fluxmq_passwd(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    assert pw.main(["-c", "-b", str(path), "alice", "one"]) == 0
    mosquitto_passwd("-b", str(path), "bob", "two")  # appends to our file
    mosquitto_passwd("-D", str(path), "alice")
    pf = pw.PasswordFile.load(str(path))
    assert list(pf.users()) == ["bob"]
    assert pf.verify("bob", b"two")


@needs_mosquitto
def test_mosquitto_broker_accepts_a_file_written_by_fluxmq_passwd(tmp_path: Path) -> None:
    """Interoperability the other way: Mosquitto itself checks our $7$ and $6$ hashes."""
    path = tmp_path / "pw"
    assert pw.main(["-c", "-b", str(path), "alice", "wonderland"]) == 0
    assert pw.main(["-H", "sha512", "-b", str(path), "bob", "builder"]) == 0
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    # As root, mosquitto would drop to its own user, which cannot read the test's private tmp dir.
    user = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(f"{user}listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {path}\n")
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "mosquitto did not start"
                time.sleep(0.05)
        assert _mosquitto_connect(port, "alice", "wonderland") == 0
        assert _mosquitto_connect(port, "bob", "builder") == 0
        assert _mosquitto_connect(port, "alice", "wrong") == 0x87  # 3.1.1 code 5, as paho reports it
    finally:
        proc.terminate()
        proc.wait(10)


def _mosquitto_connect(port: int, user: str, password: str) -> int:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.username_pw_set(user, password)
    client.connect("127.0.0.1", port)
    sock = client.socket()
    sock.settimeout(5)
    result = None
    deadline = time.monotonic() + 10

    def on_connect(c, u, flags, rc, props) -> None:
        nonlocal result
        result = rc.value if hasattr(rc, "value") else int(rc)

    client.on_connect = on_connect
    while result is None and time.monotonic() < deadline:
        client.loop(0.1)
    client.disconnect()
    assert result is not None, "no CONNACK from mosquitto"
    return result


def test_hash_password_matches_the_format_and_verifies() -> None:
    line = pw.hash_password("x", salt=b"0123456789ab")
    assert line.startswith("$7$101$MDEyMzQ1Njc4OWFi$")
    assert pw.PasswordHash.parse(line).verify(b"x")
    assert pw.hash_password("x", salt=b"0123456789ab") == line  # deterministic for a given salt
    six = pw.hash_password("x", pw.SHA512, salt=b"0123456789ab")
    assert six.startswith("$6$MDEyMzQ1Njc4OWFi$")
    assert pw.PasswordHash.parse(six).verify(b"x")
    assert not pw.PasswordHash.parse(six).verify(b"y")
    assert pw.hash_password("x", iterations=1000).startswith("$7$1000$")


@pytest.mark.parametrize(
    "line, needle",
    [
        ("alice", "expected username:hash"),
        (":$7$101$MDEy$MDEy", "expected username:hash"),
        ("alice:plaintext", "not a $6$ or $7$"),
        ("alice:$7$abc$MDEy$MDEy", "bad iteration count"),
        ("alice:$7$0$MDEy$MDEy", "bad iteration count"),
        ("alice:$7$\u00b2$MDEy$MDEy", "bad iteration count"),  # a digit to str.isdigit, not to int()
        ("alice:$6$not base64!$MDEy", "base64"),
        ("alice:$5$MDEy$MDEy", "not a $6$ or $7$"),
    ],
)
def test_bad_line_is_one_config_error_with_file_and_line(tmp_path: Path, line: str, needle: str) -> None:
    path = tmp_path / "pw"
    good = pw.hash_password("p")
    path.write_text(f"# users\nbob:{good}\n\n{line}\n")
    with pytest.raises(ConfigError) as err:
        pw.PasswordFile.load(str(path))
    text = str(err.value)
    assert "auth.password_file" in text and f"{path}:4" in text and needle in text
    assert "\n" not in text


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        pw.PasswordFile.load(str(tmp_path / "missing"))


def test_comments_and_order_survive_a_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    a, b = pw.hash_password("1"), pw.hash_password("2")
    path.write_text(f"# team\nalice:{a}\n\n# ops\nbob:{b}\n")
    pf = pw.PasswordFile.load(str(path))
    pf.set("carol", "3")
    assert pf.delete("alice")
    assert not pf.delete("nobody")
    pf.save(str(path))
    text = path.read_text()
    assert text.startswith("# team\n\n# ops\nbob:" + b + "\ncarol:$7$101$")
    assert os.stat(path).st_mode & 0o777 == 0o600
    again = pw.PasswordFile.load(str(path))
    assert again.verify("carol", b"3") and again.verify("bob", b"2") and "alice" not in again


def test_cli_create_update_delete(tmp_path: Path, capsys) -> None:
    path = tmp_path / "pw"
    assert pw.main(["-c", "-b", str(path), "alice", "one"]) == 0
    assert pw.main(["-b", str(path), "bob", "two"]) == 0
    assert pw.main(["-b", str(path), "alice", "uno"]) == 0  # change
    assert pw.main(["-I", "500", "-b", str(path), "carol", "tres"]) == 0
    pf = pw.PasswordFile.load(str(path))
    assert list(pf.users()) == ["alice", "bob", "carol"]
    assert pf.verify("alice", b"uno") and not pf.verify("alice", b"one")
    assert pf.hash_of("carol").startswith("$7$500$")
    assert pw.main(["-D", str(path), "bob"]) == 0
    assert "bob" not in pw.PasswordFile.load(str(path))
    assert pw.main(["-D", str(path), "bob"]) == 0
    assert "not found" in capsys.readouterr().err


def test_cli_interactive_prompts_twice(tmp_path: Path, monkeypatch) -> None:
    answers = iter(["secret", "secret"])
    monkeypatch.setattr(pw.getpass, "getpass", lambda prompt="": next(answers))
    path = tmp_path / "pw"
    assert pw.main(["-c", str(path), "alice"]) == 0
    assert pw.PasswordFile.load(str(path)).verify("alice", b"secret")
    answers = iter(["a", "b"])
    assert pw.main([str(path), "alice"]) == 1  # passwords do not match: nothing changes
    assert pw.PasswordFile.load(str(path)).verify("alice", b"secret")


def test_cli_update_hashes_a_plain_text_file(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    keep = pw.hash_password("kept")
    path.write_text(f"alice:plain1\nbob:{keep}\n")
    assert pw.main(["-U", str(path)]) == 0
    pf = pw.PasswordFile.load(str(path))
    assert pf.verify("alice", b"plain1")
    assert pf.hash_of("bob") == keep  # already hashed: untouched


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["-b", "f", "u"],
        ["-c", "-D", "f", "u"],
        ["-U"],
        ["-b", "f", "a:b", "p"],
        ["-H", "md5", "f", "u"],
        ["-I", "0", "-b", "f", "u", "p"],
    ],
)
def test_cli_usage_errors_exit_1(tmp_path: Path, monkeypatch, args: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert pw.main(args) == 1


def test_cli_refuses_a_missing_file_without_c(tmp_path: Path, capsys) -> None:
    assert pw.main(["-b", str(tmp_path / "nope"), "u", "p"]) == 1
    assert "-c" in capsys.readouterr().err


class _CountingHash:
    """Stands in for the decoy hash and records what it was asked to check."""

    def __init__(self) -> None:
        self.checked: list[bytes] = []

    def verify(self, password: bytes) -> bool:
        self.checked.append(password)
        return False


def test_unknown_user_costs_a_hash(monkeypatch) -> None:
    """No shortcut for names that are not in the file (timing would reveal which exist)."""
    pf = pw.PasswordFile.parse("alice:" + pw.hash_password("x") + "\n")
    decoy = _CountingHash()
    monkeypatch.setattr(pw, "_DECOY", decoy)
    assert not pf.verify("mallory", b"x")
    assert not pf.verify("alice", b"y")
    assert decoy.checked == [b"x"]
    assert pw._DECOY is decoy and isinstance(pw.PasswordHash.parse(pf.hash_of("alice")), pw.PasswordHash)


def test_fluxmq_passwd_console_script_is_declared() -> None:
    import tomllib

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    target = tomllib.loads(pyproject.read_text())["project"]["scripts"]["fluxmq-passwd"]
    module, _, name = target.partition(":")
    assert (module, name) == (pw.__name__, "main")
    installed = shutil.which("fluxmq-passwd", path=str(Path(os.sys.executable).parent))
    if installed:  # present once the venv was (re)installed by scripts/test or scripts/run
        out = subprocess.run([installed], capture_output=True, text=True, timeout=30)
        assert out.returncode == 1 and "mosquitto_passwd's format" in out.stdout
