"""Token buckets, the per-IP connection gate, topic caps and log gates (explicit clocks, no sleeping)."""

from __future__ import annotations

from fluxmq.auth.limits import ConnectRateLimiter, LogGate, PublishLimits, TokenBucket


def test_bucket_starts_full_and_refills_at_its_rate() -> None:
    b = TokenBucket(10.0, 5, now=0.0)
    assert all(b.take(now=0.0) for _ in range(5))
    assert not b.take(now=0.0)
    assert not b.take(now=0.05)  # half a token
    assert b.take(now=0.1)
    assert not b.take(now=0.1)
    assert [b.take(now=100.0) for _ in range(6)] == [True] * 5 + [False]  # never more than the burst


def test_spend_lets_one_big_cost_through_then_owes() -> None:
    b = TokenBucket(100.0, 100, now=0.0)
    assert b.spend(250, now=0.0)  # larger than the burst: allowed on a full bucket
    assert b.tokens == -150
    assert not b.spend(1, now=1.0)  # -150 + 100: still in debt
    assert b.spend(1, now=1.6)


def test_connect_limiter_is_per_address_and_bounded() -> None:
    lim = ConnectRateLimiter(1.0, 2, max_addresses=3)
    assert lim.allow("a", 0.0) and lim.allow("a", 0.0)
    assert not lim.allow("a", 0.0)
    assert lim.allow("b", 0.0)
    assert lim.allow("a", 1.0)
    assert lim.refused == 1
    for name in "cdef":
        lim.allow(name, 1.0)
    assert len(lim) == 3


def test_topic_caps() -> None:
    caps = PublishLimits(max_topic_levels=3, max_topic_length=10)
    assert caps.topic_problem("a/b/c") is None
    assert "levels" in caps.topic_problem("a/b/c/d")
    assert "longer" in caps.topic_problem("abcdefghijk")
    assert "longer" in caps.topic_problem("ééééééé")  # bytes, not characters
    assert PublishLimits().topic_problem("x/" * 1000) is None
    assert not PublishLimits().active and PublishLimits(max_subscriptions=1).active
    assert PublishLimits(publish_rate=2.5).publish_burst == 2


def test_log_gate_once_per_key_per_interval() -> None:
    g = LogGate(60.0, max_keys=2)
    assert g.allow("k", 0.0)
    assert not g.allow("k", 30.0)
    assert g.allow("j", 30.0)
    assert g.allow("k", 61.0)
    assert g.suppressed == 1
    g.allow("x", 62.0)
    assert g.allow("j", 63.0)  # forgotten when the gate was full: allowed again


def test_topic_level_cap_counts_levels_at_the_cap_and_one_over() -> None:
    """limits.max_topic_levels (default 128 in the config): n levels are n-1 separators; empty
    levels count (MQTT 4.7.1.1: "a//b" has 3), and so do the $share/group prefix's two."""
    caps = PublishLimits(max_topic_levels=128)
    assert caps.topic_problem("/".join(["l"] * 128)) is None
    assert caps.topic_problem("/" * 127) is None  # 128 empty levels
    assert caps.topic_problem("/" * 128) == "topic with more than 128 levels"
    assert caps.topic_problem("/".join(["+"] * 128) + "/#") is not None
    assert caps.topic_problem("$share/g/" + "/".join(["l"] * 126)) is None
    assert caps.topic_problem("$share/g/" + "/".join(["l"] * 127)) is not None
    assert caps.active and caps.any_publish_check


def test_log_gate_let_through_counts_the_lines_held_back_per_key() -> None:
    g = LogGate(30.0)
    assert g.let_through("k", 0.0) == 0
    assert g.let_through("k", 1.0) is None
    assert g.let_through("k", 2.0) is None
    assert g.let_through("j", 2.0) == 0
    assert g.let_through("k", 31.0) == 2
    assert g.let_through("k", 32.0) is None
    assert g.let_through("k", 62.0) == 1
