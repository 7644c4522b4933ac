"""Mosquitto ACL files: parsing (one ConfigError per bad line), decisions as Mosquitto 2.0 makes
them, the compiled trie against a naive rule scan (hypothesis), and the per-topic decision cache."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxmq.auth import acl as A
from fluxmq.errors import ConfigError

EXAMPLE = """\
# anonymous clients
topic read public/#
topic read $SYS/broker/uptime

user alice
topic readwrite sensors/#
topic deny sensors/secret
topic write alerts
topic   read   spaced topic/x

user bob
topic test/+/data

pattern readwrite devices/%c/#
pattern read users/%u/inbox
pattern deny devices/%c/locked
"""


@pytest.fixture(scope="module")
def acl() -> A.AclFile:
    return A.AclFile.parse(EXAMPLE, "example.acl")


def test_parse_sections(acl: A.AclFile) -> None:
    assert [(r.filter, r.access) for r in acl.anonymous] == [
        ("public/#", A.READ),
        ("$SYS/broker/uptime", A.READ),
    ]
    assert [(r.filter, r.access) for r in acl.users["alice"]] == [
        ("sensors/#", A.READWRITE),
        ("sensors/secret", A.DENY),
        ("alerts", A.WRITE),
        ("spaced topic/x", A.READ),
    ]
    assert [(r.filter, r.access) for r in acl.users["bob"]] == [("test/+/data", A.READWRITE)]
    assert [(r.filter, r.access, r.line) for r in acl.patterns] == [
        ("devices/%c/#", A.READWRITE, 14),
        ("users/%u/inbox", A.READ, 15),
        ("devices/%c/locked", A.DENY, 16),
    ]


def test_anonymous_section(acl: A.AclFile) -> None:
    c = acl.for_client("anon1", None)
    assert c.can_read("public/news") and c.can_read("public")
    assert not c.can_write("public/news")
    assert c.can_read("$SYS/broker/uptime")
    assert not c.can_read("$SYS/broker/load")
    assert c.can_write("devices/anon1/x")  # patterns apply to anonymous clients too
    assert not c.can_read("users/anon1/inbox")  # %u patterns are skipped without a user name


def test_user_section_with_deny(acl: A.AclFile) -> None:
    c = acl.for_client("c1", "alice")
    assert c.can_read("sensors/a") and c.can_write("sensors/a/b")
    assert not c.can_read("sensors/secret") and not c.can_write("sensors/secret")  # deny wins in its section
    assert c.can_read("sensors/secret/sub")
    assert c.can_write("alerts") and not c.can_read("alerts")
    assert c.can_read("spaced topic/x")
    assert not c.can_read("public/news")  # the anonymous section is not hers
    assert c.can_read("users/alice/inbox") and not c.can_write("users/alice/inbox")
    assert not c.can_read("users/bob/inbox")
    assert c.can_write("devices/c1/t") and not c.can_write("devices/c2/t")
    assert not c.can_write("devices/c1/locked")


def test_default_deny_for_a_user_without_rules(acl: A.AclFile) -> None:
    c = acl.for_client("c9", "carol")
    assert not c.can_read("sensors/a") and not c.can_write("public/x") and not c.can_read("public/x")
    assert c.can_read("users/carol/inbox")  # patterns still apply


def test_user_rule_allows_before_a_pattern_denies() -> None:
    f = A.AclFile.parse(
        "user u\ntopic readwrite devices/c1/locked\npattern readwrite devices/%c/#\n"
        "pattern deny devices/%c/locked\n"
    )
    assert f.for_client("c1", "u").can_write("devices/c1/locked")
    assert not f.for_client("c1", "v").can_write("devices/c1/locked")
    assert f.for_client("c1", "v").can_write("devices/c1/open")


def test_dangerous_names_get_no_pattern_access(acl: A.AclFile) -> None:
    assert not acl.for_client("+", "alice").can_write("devices/x/y")
    assert not acl.for_client("#", None).can_write("devices/#/y")
    assert not acl.for_client("c1", "a+b").can_write("devices/c1/y")
    assert acl.for_client("c1", "a+b").can_read("users/a+b/inbox") is False
    assert acl.for_client("+", "alice").can_read("sensors/x")  # her own rules still apply


def test_dollar_topics_need_a_dollar_rule() -> None:
    f = A.AclFile.parse("topic readwrite #\ntopic read +/x\n")
    c = f.for_client("c", None)
    assert c.can_read("a/b") and c.can_read("a/x")
    assert not c.can_read("$SYS/x") and not c.can_write("$SYS/broker")
    g = A.AclFile.parse("topic read $SYS/#\n").for_client("c", None)
    assert g.can_read("$SYS/broker/load") and g.can_read("$SYS")


def test_subscribe_checks_the_filter_literally(acl: A.AclFile) -> None:
    c = acl.for_client("c1", "alice")
    assert c.can_subscribe("sensors/#") and c.can_subscribe("sensors/+/t")
    assert not c.can_subscribe("#") and not c.can_subscribe("+/a")
    assert not c.can_subscribe("sensors/secret")
    assert c.can_subscribe("$share/g/sensors/a")
    assert not c.can_subscribe("$share/g/#")
    assert not c.can_subscribe("alerts")  # write-only
    b = acl.for_client("c2", "bob")
    assert b.can_subscribe("test/+/data") and b.can_subscribe("test/x/data") and not b.can_subscribe("test/#")


def test_decisions_are_cached_per_topic(acl: A.AclFile) -> None:
    c = acl.for_client("c1", "alice")
    assert c.can_write("sensors/a")
    assert c._write == {"sensors/a": True}
    assert not c.can_write("sensors/secret")
    assert c._write["sensors/secret"] is False
    c._write["sensors/a"] = False  # the cached answer is what the next check returns
    assert not c.can_write("sensors/a")


def test_cache_is_bounded(monkeypatch) -> None:
    monkeypatch.setattr(A, "CACHE_MAX", 10)
    c = A.AclFile.parse("topic read #\n").for_client("c", None)
    for i in range(25):
        assert c.can_read(f"t/{i}")
        assert len(c._read) <= 10


@pytest.mark.parametrize(
    "text, line, needle",
    [
        ("user\n", 1, "user line without a name"),
        ("topic\n", 1, "without a topic"),
        ("topic read\n", 1, "without a topic"),
        ("# x\ntopic rw a/b\n", 2, "invalid access type 'rw'"),
        ("topic read a/#/b\n", 1, "invalid topic filter"),
        ("\n\npattern read a/b+\n", 3, "invalid topic filter"),
        ("users alice\n", 1, "unknown keyword 'users'"),
    ],
)
def test_bad_line_is_one_config_error(tmp_path: Path, text: str, line: int, needle: str) -> None:
    path = tmp_path / "acl"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        A.AclFile.load(str(path))
    message = str(err.value)
    assert "auth.acl_file" in message and f"{path}:{line}" in message and needle in message


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        A.AclFile.load(str(tmp_path / "none"))


# -- the trie against a naive scan ------------------------------------------------------------------


def _matches(filter: str, topic: str) -> bool:
    """MQTT filter matching, levels literal (what mosquitto_topic_matches_sub does)."""
    if topic.startswith("$") and filter[:1] in ("+", "#"):
        return False
    f, t = filter.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(f) == len(t)


def _naive(rules: list[tuple[int, int, str]], topic: str, access: int) -> bool:
    """Mosquitto 2.0's scan: per group, a matching deny refuses, else a matching grant allows."""
    for tier in (0, 1):
        group = [(a, f) for t, a, f in rules if t == tier and _matches(f, topic)]
        if any(a == A.DENY for a, _ in group):
            return False
        if any(a & access for a, _ in group):
            return True
    return False


_levels = st.sampled_from(["a", "b", "c", "$SYS", "+", "#", ""])
_filters = (
    st.lists(_levels, min_size=1, max_size=4)
    .map("/".join)
    .filter(
        lambda f: (
            all(lv != "#" or i == len(f.split("/")) - 1 for i, lv in enumerate(f.split("/")))
            and "$SYS" not in f.split("/")[1:]
        )
    )
)
_topics = (
    st.lists(st.sampled_from(["a", "b", "c", "$SYS", "x", ""]), min_size=1, max_size=5)
    .map("/".join)
    .filter(lambda t: "$SYS" not in t.split("/")[1:])
)
_rules = st.lists(
    st.tuples(st.integers(0, 1), st.sampled_from([A.DENY, A.READ, A.WRITE, A.READWRITE]), _filters),
    max_size=8,
)


@settings(max_examples=400, deadline=None)
@given(_rules, _topics, st.sampled_from([A.READ, A.WRITE]))
def test_trie_decides_like_a_scan(rules, topic, access) -> None:
    assert A.ClientAcl(rules).decide(topic, access) == _naive(rules, topic, access)
