"""AuthService and ClientPolicy over real password and ACL files: who may connect (with the reason
codes of refusals), per-client checks, log-once, reload."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fluxmq.auth.limits import PublishLimits
from fluxmq.auth.password_file import hash_password
from fluxmq.auth.service import AuthService, AuthSettings
from fluxmq.errors import ConfigError


@pytest.fixture
def files(tmp_path: Path) -> tuple[str, str]:
    pw = tmp_path / "passwd"
    pw.write_text(f"alice:{hash_password('wonder')}\nbob:{hash_password('builder', 'sha512')}\n")
    acl = tmp_path / "acl"
    acl.write_text(
        "topic read public/#\nuser alice\ntopic readwrite a/#\ntopic deny a/secret\n"
        "pattern write clients/%c/#\n"
    )
    return str(pw), str(acl)


def test_nothing_configured_allows_all_and_needs_no_policy() -> None:
    svc = AuthService(AuthSettings())
    assert svc.authenticate("c", None, None, "1.2.3.4:5").ok
    assert svc.authenticate("c", "anyone", b"x", "1.2.3.4:5").ok
    assert svc.policy("c", None) is None
    assert svc.connect_gate is None
    assert not svc.checks_reads
    assert svc.can_read("c", None, "x") and svc.can_write("c", None, "x")


def test_password_file_refusals_have_the_right_codes(files, caplog) -> None:
    svc = AuthService(AuthSettings(password_file=files[0]))
    assert not svc.allow_anonymous  # auto: a source is configured
    assert svc.authenticate("c", "alice", b"wonder", "p").ok
    assert svc.authenticate("c", "bob", b"builder", "p").ok
    caplog.set_level(logging.INFO, "fluxmq.auth")
    bad = svc.authenticate("c", "alice", b"wrong-secret-value", "10.1.1.1:4000")
    assert (bad.ok, bad.reason_code, bad.return_code) == (False, 0x86, 4)
    unknown = svc.authenticate("c", "mallory", b"x", "p")
    assert (unknown.reason_code, unknown.return_code) == (0x86, 4)
    anon = svc.authenticate("c", None, None, "p")
    assert (anon.reason_code, anon.return_code) == (0x87, 5)
    assert svc.counters["auth_failed"] == 3
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "authentication_failed" in logged and "10.1.1.1:4000" in logged
    assert "wrong-secret-value" not in logged


def test_allow_anonymous_explicit(files) -> None:
    svc = AuthService(AuthSettings(password_file=files[0], allow_anonymous=True))
    assert svc.authenticate("c", None, None, "p").ok
    assert not svc.authenticate("c", "alice", b"nope", "p").ok
    strict = AuthService(AuthSettings(allow_anonymous=False))
    assert not strict.authenticate("c", None, None, "p").ok
    assert strict.authenticate("c", "u", b"p", "p").reason_code == 0x87  # nothing can check it


def test_policy_checks(files) -> None:
    svc = AuthService(
        AuthSettings(acl_file=files[1], limits=PublishLimits(max_subscriptions=2, max_topic_levels=3))
    )
    pol = svc.policy("c1", "alice", "p")
    assert pol is not None
    assert pol.check_publish("a/b", 10) == 0
    assert pol.check_publish("a/secret", 10) == 0x87
    assert pol.check_publish("public/x", 10) == 0x87
    assert pol.check_publish("clients/c1/x", 1) == 0
    assert pol.check_publish("a/b/c/d", 1) == 0x97  # 4 levels
    assert pol._topics == {"a/b": 0, "a/secret": 0x87, "public/x": 0x87, "clients/c1/x": 0, "a/b/c/d": 0x97}
    pol._topics["a/b"] = 0x87  # the per-topic answer is what the next PUBLISH gets
    assert pol.check_publish("a/b", 10) == 0x87
    assert pol.check_subscribe("a/#", 1) == 0
    assert pol.check_subscribe("#", 1) == 0x87
    assert pol.check_subscribe("a/x", 3) == 0x97  # third subscription
    assert pol.can_write_will("a/will") and not pol.can_write_will("public/x")
    anon = svc.policy("c2", None)
    assert anon.check_subscribe("public/#", 1) == 0 and anon.check_publish("public/x", 1) == 0x87
    assert svc.can_read("c2", None, "public/x") and not svc.can_read("c1", "alice", "public/x")


def test_publish_rates(files) -> None:
    svc = AuthService(AuthSettings(limits=PublishLimits(publish_rate=1.0, publish_burst=3)))
    pol = svc.policy("c", None)
    assert pol.fast is None  # a rate is checked on every PUBLISH
    assert [pol.check_publish("t", 1) for _ in range(4)] == [0, 0, 0, 0x96]
    svc2 = AuthService(AuthSettings(limits=PublishLimits(publish_bytes_rate=100)))
    pol2 = svc2.policy("c", None)
    assert pol2.check_publish("t", 500) == 0  # one large message on a full bucket
    assert pol2.check_publish("t", 1) == 0x96


def test_limit_hits_logged_once_per_client_per_minute(caplog) -> None:
    svc = AuthService(AuthSettings(limits=PublishLimits(publish_rate=0.001, publish_burst=1)))
    caplog.set_level(logging.INFO, "fluxmq.auth")
    a, b = svc.policy("a", None), svc.policy("b", None)
    for _ in range(50):
        a.check_publish("t", 1)
        b.check_publish("t", 1)
    lines = [r for r in caplog.records if r.getMessage() == "rate_limited"]
    assert sorted(r.client_id for r in lines) == ["a", "b"]
    assert svc.counters["rate_limited"] == 98


def test_bad_files_are_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "acl"
    bad.write_text("topic read ok\ntopic nope x y\n")
    with pytest.raises(ConfigError, match=f"{bad}:2"):
        AuthService(AuthSettings(acl_file=str(bad)))
    with pytest.raises(ConfigError, match="auth.password_file"):
        AuthService(AuthSettings(password_file=str(tmp_path / "missing")))


def test_reload_swaps_rules_and_keeps_them_on_error(files, tmp_path: Path) -> None:
    svc = AuthService(AuthSettings(password_file=files[0], acl_file=files[1]))
    changed = []
    svc.on_rules_changed = lambda: changed.append(1)
    pol = svc.policy("c1", "alice")
    assert pol.check_publish("a/x", 1) == 0
    Path(files[1]).write_text("user alice\ntopic read a/#\n")
    assert pol.fast == {"a/x": 0}  # what the protocol layer reads without calling check_publish
    assert svc.reload_files() == ["auth.password_file", "auth.acl_file"]
    assert changed == [1]
    assert pol.fast == {}  # a live connection forgets its answers when the rules change
    assert pol.check_publish("a/x", 1) == 0x87  # the live connection's policy follows
    Path(files[1]).write_text("topic bogus a b\n")
    with pytest.raises(ConfigError):
        svc.reload_files()
    assert pol.check_publish("a/x", 1) == 0x87 and pol.check_subscribe("a/x", 1) == 0


def test_connect_gate(files) -> None:
    svc = AuthService(AuthSettings(connect_rate=0.001, connect_burst=2))
    gate = svc.connect_gate
    assert gate("1.1.1.1") and gate("1.1.1.1") and not gate("1.1.1.1") and gate("2.2.2.2")
    assert svc.counters["connect_rate_limited"] == 1


def test_costly_hashes_are_checked_off_the_hub(tmp_path: Path) -> None:
    """A hash with many iterations goes through the hub's thread pool (same answer)."""
    pw = tmp_path / "passwd"
    pw.write_text(f"slow:{hash_password('x', iterations=5000)}\n")
    svc = AuthService(AuthSettings(password_file=str(pw)))
    assert svc.passwords.iterations("slow") == 5000
    assert svc.authenticate("c", "slow", b"x", "p").ok
    assert not svc.authenticate("c", "slow", b"y", "p").ok


def test_client_ids_bound_to_user_names_when_user_names_are_verified(files) -> None:
    """auth.bind_client_id_to_username "auto": on with a password file or an HTTP service."""
    assert not AuthService(AuthSettings()).binds_client_ids
    assert not AuthService(AuthSettings(acl_file=files[1])).binds_client_ids  # names unverified
    assert AuthService(AuthSettings(password_file=files[0])).binds_client_ids
    assert AuthService(AuthSettings(http_url="http://127.0.0.1:9/auth")).binds_client_ids
    assert not AuthService(AuthSettings(password_file=files[0], bind_client_ids=False)).binds_client_ids
    assert AuthService(AuthSettings(bind_client_ids=True)).binds_client_ids
    bound = AuthService(AuthSettings(password_file=files[0]))
    assert bound.may_take_over("alice", "alice")
    assert not bound.may_take_over("alice", "bob")
    assert not bound.may_take_over("alice", None)  # an anonymous client is another user
    assert bound.may_take_over(None, "bob")  # no owner: any anonymous client could resume it anyway
    unbound = AuthService(AuthSettings(password_file=files[0], bind_client_ids=False))
    assert unbound.may_take_over("alice", "bob")


def test_topic_level_cap_alone_is_one_cached_lookup_per_topic() -> None:
    """The default cap (no ACL, no rate) keeps PUBLISH on the connection's per-topic dict; a long
    topic is checked without being cached, so a client cannot pin many of them per connection."""
    svc = AuthService(AuthSettings(limits=PublishLimits(max_topic_levels=128)))
    pol = svc.policy("c", None)
    assert pol is not None and pol.fast is pol._topics
    at, over = "/".join(["ll"] * 128), "/".join(["ll"] * 129)
    assert pol.check_publish("a/b", 1) == 0 and pol.fast == {"a/b": 0}
    assert pol.check_publish(at, 1) == 0 and pol.check_publish(over, 1) == 0x97
    assert set(pol.fast) == {"a/b"}  # 383 and 386 characters: longer than the topics it caches
    assert pol.check_subscribe(at, 1) == 0 and pol.check_subscribe(over, 1) == 0x97
    assert pol.can_write_will(at) and not pol.can_write_will(over)
    assert svc.counters["quota_exceeded"] == 3
    assert not svc.binds_client_ids and svc.allow_anonymous  # the cap alone changes nothing else
