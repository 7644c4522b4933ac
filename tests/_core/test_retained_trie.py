"""RetainedTrie: set/get/delete, filter matching (MQTT 4.7) against a full scan, pruning and items()."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxmq._core.trie import RetainedTrie
from fluxmq.errors import TopicNameInvalid
from tests._core.test_trie import FILTERS, TOPICS, reference_match


def retained(trie: RetainedTrie, topic_filter: str) -> list:
    return sorted(trie.match(topic_filter))


def test_set_get_replace_delete() -> None:
    trie = RetainedTrie()
    trie.set("a/b", 1)
    trie.set("a", 2)
    assert len(trie) == 2
    assert trie.get("a/b") == 1
    assert trie.get("a") == 2
    assert trie.get("a/b/c") is None
    assert trie.get("x") is None
    trie.set("a/b", 3)  # replaces
    assert len(trie) == 2
    assert trie.get("a/b") == 3
    assert trie.delete("a/b") is True
    assert trie.delete("a/b") is False
    assert trie.delete("never/there") is False
    assert trie.get("a/b") is None
    assert len(trie) == 1


def test_none_is_a_retainable_value() -> None:
    trie = RetainedTrie()
    trie.set("a", None)
    assert len(trie) == 1
    assert "a" in trie
    assert "b" not in trie
    assert trie.match("#") == [None]
    assert trie.delete("a") is True
    assert "a" not in trie


def test_set_rejects_invalid_topic_names() -> None:
    trie = RetainedTrie()
    for bad in ["", "a/+", "a/#", "a\0"]:
        with pytest.raises(TopicNameInvalid):
            trie.set(bad, 1)
    assert len(trie) == 0
    assert trie.node_count() == 1


def test_empty_levels_are_distinct_topics() -> None:
    trie = RetainedTrie()
    for topic in ["a", "a/", "/a", "a//b", "/", "a/b"]:
        trie.set(topic, topic)
    assert retained(trie, "a/+") == ["a/", "a/b"]
    assert retained(trie, "+/+") == ["/", "/a", "a/", "a/b"]
    assert retained(trie, "a/+/b") == ["a//b"]
    assert retained(trie, "+") == ["a"]
    assert retained(trie, "/#") == ["/", "/a"]
    assert trie.get("a/") == "a/"


@pytest.mark.parametrize(
    ("topic_filter", "expected"),
    [
        (
            "sport/tennis/player1/#",
            ["sport/tennis/player1", "sport/tennis/player1/ranking", "sport/tennis/player1/score/wimbledon"],
        ),
        (
            "sport/#",
            [
                "sport",
                "sport/tennis/player1",
                "sport/tennis/player1/ranking",
                "sport/tennis/player1/score/wimbledon",
                "sport/tennis/player2",
            ],
        ),
        ("sport/tennis/+", ["sport/tennis/player1", "sport/tennis/player2"]),
        ("sport/+", []),
        (
            "+/tennis/#",
            [
                "sport/tennis/player1",
                "sport/tennis/player1/ranking",
                "sport/tennis/player1/score/wimbledon",
                "sport/tennis/player2",
            ],
        ),
        ("+", ["sport"]),
        ("sport", ["sport"]),
        ("sport/tennis/player1/score/wimbledon", ["sport/tennis/player1/score/wimbledon"]),
        ("sport/tennis/player3", []),
    ],
)
def test_match_spec_examples_mqtt_4_7_1(topic_filter: str, expected: list[str]) -> None:
    """MQTT-4.7.1-2 ('#' includes the parent level) and MQTT-4.7.1-3 ('+' is exactly one level)."""
    trie = RetainedTrie()
    for topic in [
        "sport",
        "sport/tennis/player1",
        "sport/tennis/player1/ranking",
        "sport/tennis/player1/score/wimbledon",
        "sport/tennis/player2",
    ]:
        trie.set(topic, topic)
    assert retained(trie, topic_filter) == sorted(expected)


@pytest.mark.parametrize(
    ("topic_filter", "expected"),
    [
        ("#", ["a", "a/$b"]),
        ("+", ["a"]),
        ("+/+", ["a/$b"]),
        ("+/#", ["a", "a/$b"]),
        ("$SYS/#", ["$SYS", "$SYS/load"]),
        ("$SYS/+", ["$SYS/load"]),
        ("$+/x", []),
        ("$/x", ["$/x"]),
        ("$/+", ["$/x"]),
    ],
)
def test_dollar_topics_not_matched_by_leading_wildcards_mqtt_4_7_2_1(
    topic_filter: str, expected: list[str]
) -> None:
    """MQTT-4.7.2-1: retained '$' topics are not returned for filters starting with '+' or '#'."""
    trie = RetainedTrie()
    for topic in ["$SYS", "$SYS/load", "a", "a/$b", "$/x"]:
        trie.set(topic, topic)
    assert retained(trie, topic_filter) == sorted(expected)


def test_delete_prunes_back_to_starting_node_count() -> None:
    trie = RetainedTrie()
    trie.set("resident/topic", 0)
    start = trie.node_count()
    topics = [f"site/{i % 97}/dev/{i}" if i % 2 else f"{i}/x/{i}" for i in range(10_000)]
    for i, topic in enumerate(topics):
        trie.set(topic, i)
    assert trie.node_count() > start + 10_000
    for topic in topics:
        assert trie.delete(topic)
    assert trie.node_count() == start
    assert len(trie) == 1
    assert trie.match("#") == [0]


def test_delete_keeps_parent_with_value_and_sibling() -> None:
    trie = RetainedTrie()
    trie.set("a", 1)
    trie.set("a/b/c", 2)
    trie.set("a/b/d", 3)
    assert trie.delete("a/b/c")
    assert retained(trie, "a/#") == [1, 3]
    assert trie.delete("a")
    assert retained(trie, "#") == [3]
    assert trie.delete("a/b") is False  # an inner node without a value
    assert trie.delete("a/b/d")
    assert trie.node_count() == 1


def test_items_lists_every_retained_topic() -> None:
    trie = RetainedTrie()
    model = {t: i for i, t in enumerate(["a", "a/b", "/", "/x", "a//c", "$SYS/x", "é/ü"])}
    for topic, value in model.items():
        trie.set(topic, value)
    assert dict(trie.items()) == model
    assert len(list(trie.items())) == len(model)


def test_items_tolerates_changes_during_iteration() -> None:
    trie = RetainedTrie()
    for i in range(50):
        trie.set(f"t/{i}", i)
    seen = []
    for topic, value in trie.items():
        seen.append(value)
        trie.delete(topic)
        trie.set(f"u/{value}", value)
    assert len(seen) >= 50
    assert len(trie) == 50
    assert sorted(v for _t, v in trie.items()) == list(range(50))


def test_deep_topic_match() -> None:
    trie = RetainedTrie()
    topic = "/".join(["a"] * 20_000)
    trie.set(topic, "deep")
    assert trie.match("/".join(["+"] * 20_000)) == ["deep"]
    assert trie.match("a/#") == ["deep"]
    assert trie.get(topic) == "deep"
    assert dict(trie.items()) == {topic: "deep"}
    assert trie.delete(topic)
    assert trie.node_count() == 1


@settings(max_examples=200, deadline=None)
@given(
    st.lists(TOPICS, max_size=30), st.lists(TOPICS, max_size=10), st.lists(FILTERS, min_size=1, max_size=10)
)
def test_match_agrees_with_scan(topics: list[str], deleted: list[str], filters: list[str]) -> None:
    trie = RetainedTrie()
    model = {}
    for i, topic in enumerate(topics):
        trie.set(topic, (topic, i))
        model[topic] = (topic, i)
    for topic in deleted:
        assert trie.delete(topic) is (topic in model)
        model.pop(topic, None)
    assert len(trie) == len(model)
    assert dict(trie.items()) == model
    for f in filters:
        expected = Counter(v for t, v in model.items() if reference_match(f, t))
        assert Counter(trie.match(f)) == expected, f
    for topic in list(model):
        trie.delete(topic)
    assert trie.node_count() == 1
