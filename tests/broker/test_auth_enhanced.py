"""SCRAM-SHA-256 enhanced authentication (fluxmq/broker/auth_enhanced.py): RFC 7677 vector, failures,
credentials file parsing and the client side."""

from __future__ import annotations

import base64
import io
import sys

import pytest

from fluxmq.broker import auth_enhanced as ae
from fluxmq.errors import ConfigError

# RFC 7677 section 3.
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def rfc_authenticator() -> ae.ScramSha256Authenticator:
    cred = ae.ScramCredential.from_password("pencil", RFC_SALT, 4096)
    return ae.ScramSha256Authenticator({"user": cred}, server_nonce=lambda: RFC_SERVER_NONCE)


def test_server_reproduces_rfc7677_exchange() -> None:
    ex = rfc_authenticator().start("cid", None)
    first = ex.step(RFC_CLIENT_FIRST)
    assert (first.outcome, first.data) == (ae.CONTINUE, RFC_SERVER_FIRST)
    final = ex.step(RFC_CLIENT_FINAL)
    assert (final.outcome, final.data, final.username) == (ae.SUCCESS, RFC_SERVER_FINAL, "user")
    assert ex.step(b"again").outcome == ae.FAILURE


def test_client_reproduces_rfc7677_exchange() -> None:
    client = ae.ScramClient("user", "pencil", nonce=RFC_CLIENT_NONCE)
    assert client.first() == RFC_CLIENT_FIRST
    assert client.final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    assert client.verify(RFC_SERVER_FINAL)
    assert not client.verify(b"v=" + base64.b64encode(b"x" * 32))


def run_exchange(
    auth: ae.ScramSha256Authenticator, user: str, password: str, expect_user: str | None = None
) -> ae.AuthStep:
    client = ae.ScramClient(user, password)
    ex = auth.start("cid", expect_user)
    step = ex.step(client.first())
    if step.outcome != ae.CONTINUE:
        return step
    step = ex.step(client.final(step.data))
    if step.outcome == ae.SUCCESS:
        assert client.verify(step.data)
    return step


@pytest.fixture
def auth() -> ae.ScramSha256Authenticator:
    return ae.ScramSha256Authenticator(
        {
            "alice": ae.ScramCredential.from_password("secret", iterations=64),
            "a,b=c": ae.ScramCredential.from_password("pw", iterations=64),
        }
    )


def test_right_password_succeeds_with_the_user_name(auth) -> None:
    step = run_exchange(auth, "alice", "secret")
    assert (step.outcome, step.username) == (ae.SUCCESS, "alice")


def test_user_name_with_comma_and_equals_is_escaped(auth) -> None:
    assert run_exchange(auth, "a,b=c", "pw").username == "a,b=c"


def test_wrong_password_fails_with_bad_user_name_or_password(auth) -> None:
    step = run_exchange(auth, "alice", "wrong")
    assert (step.outcome, step.reason_code) == (ae.FAILURE, ae.BAD_USER_NAME_OR_PASSWORD)


def test_unknown_user_gets_a_challenge_then_fails(auth) -> None:
    """An unknown name is not revealed at the first step (no user enumeration)."""
    ex = auth.start("cid", None)
    first = ex.step(ae.ScramClient("mallory", "x").first())
    assert first.outcome == ae.CONTINUE
    assert run_exchange(auth, "mallory", "x").outcome == ae.FAILURE


def test_expected_user_must_match(auth) -> None:
    step = run_exchange(auth, "alice", "secret", expect_user="bob")
    assert step.outcome == ae.FAILURE


@pytest.mark.parametrize(
    "message",
    [
        b"p=tls-unique,,n=alice,r=abc",
        b"n,a=admin,n=alice,r=abc",
        b"n,,r=abc",
        b"n,,n=alice,r=",
        b"n,,n=al=zzice,r=x",
        b"garbage",
        b"\xff\xfe",
    ],
)
def test_malformed_client_first_fails(auth, message: bytes) -> None:
    assert auth.start("cid", None).step(message).outcome == ae.FAILURE


def test_tampered_nonce_or_binding_fails(auth) -> None:
    client = ae.ScramClient("alice", "secret")
    ex = auth.start("cid", None)
    challenge = ex.step(client.first()).data
    final = client.final(challenge)
    assert ex.step(final.replace(b"c=biws", b"c=eSws")).outcome == ae.FAILURE


def test_credentials_file_round_trip(tmp_path) -> None:
    line = ae.ScramCredential.from_password("pw", iterations=32).line("user:with:colons")
    path = tmp_path / "scram"
    path.write_text(f"# comment\n\n{line}\n")
    auth = ae.ScramSha256Authenticator.from_file(str(path))
    assert run_exchange(auth, "user:with:colons", "pw").outcome == ae.SUCCESS


@pytest.mark.parametrize(
    "line",
    [
        "alice:4096:abc",
        "alice:x:AAAA:AAAA:AAAA",
        "alice:4096:AAAA:AAAA:AAAA",
        ":4096:AAAA:" + "A" * 44 + ":" + "A" * 44,
    ],
)
def test_bad_credentials_line_is_a_config_error_naming_the_line(tmp_path, line: str) -> None:
    path = tmp_path / "scram"
    path.write_text(f"# first\n{line}\n")
    with pytest.raises(ConfigError) as err:
        ae.ScramSha256Authenticator.from_file(str(path))
    assert f"{path}:2" in str(err.value)


def test_missing_credentials_file_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError):
        ae.ScramSha256Authenticator.from_file(str(tmp_path / "nope"))


def test_cli_prints_a_usable_line(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("hunter2\n"))
    assert ae.main(["bob", "100"]) == 0
    creds = ae.parse_credentials(capsys.readouterr().out)
    assert creds["bob"].iterations == 100
    assert run_exchange(ae.ScramSha256Authenticator(creds), "bob", "hunter2").outcome == ae.SUCCESS
