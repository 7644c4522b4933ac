"""SubscriptionTrie: matching (MQTT 4.7), shared groups (4.8.2), removal, pruning and the match cache."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fluxmq._core.trie import Match, SharedGroup, SubscriptionTrie
from fluxmq.errors import TopicFilterInvalid


def reference_match(topic_filter: str, topic: str) -> bool:
    """Plain level-by-level comparison of one filter against one topic name."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False  # MQTT-4.7.2-1
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, f_level in enumerate(f_levels):
        if f_level == "#":
            return True  # the parent level and everything below
        if i >= len(t_levels):
            return False
        if f_level != "+" and f_level != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


def subscribed(trie: SubscriptionTrie, topic: str) -> Counter:
    return Counter(trie.match(topic).subscribers)


def group_view(match: Match) -> Counter:
    return Counter((g.name, g.filter, tuple(sorted(g.members.items()))) for g in match.groups)


# -- matching rules ---------------------------------------------------------------------------------

# (filter, topic, matches) from the examples of MQTT 3.1.1 / 5.0 section 4.7.
SPEC_EXAMPLES = [
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("#", "sport/tennis", True),
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+/tennis/#", "sport/tennis/player1", True),
    ("sport/+/player1", "sport/tennis/player1", True),
    ("a//b", "a//b", True),
    ("a/+/b", "a//b", True),
    ("a/b", "a/b/c", False),
    ("a/b/c", "a/b", False),
    ("/#", "/", True),
    ("+/#", "a", True),
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), SPEC_EXAMPLES)
def test_spec_examples_mqtt_4_7_1(topic_filter: str, topic: str, expected: bool) -> None:
    """MQTT-4.7.1-2 ('#' matches the parent and any number of levels) and 4.7.1-3 ('+' one level)."""
    assert reference_match(topic_filter, topic) is expected  # the reference agrees with the spec...
    trie = SubscriptionTrie()
    trie.add(topic_filter, "k", "v")
    assert (trie.match(topic).subscribers == ["v"]) is expected  # ...and so does the trie


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("#", "$SYS/broker/clients", False),
        ("+/monitor/Clients", "$SYS/monitor/Clients", False),
        ("+", "$SYS", False),
        ("+/#", "$SYS/x", False),
        ("$SYS/#", "$SYS/monitor/Clients", True),
        ("$SYS/#", "$SYS", True),
        ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
        ("$/+", "$/a", True),
        ("a/+", "a/$x", True),  # only a '$' in the first character of the topic is special
        ("a/#", "a/$x/y", True),
    ],
)
def test_dollar_topics_not_matched_by_leading_wildcards_mqtt_4_7_2_1(
    topic_filter: str, topic: str, expected: bool
) -> None:
    """MQTT-4.7.2-1: filters starting with '#' or '+' do not match topic names starting with '$'."""
    trie = SubscriptionTrie()
    trie.add(topic_filter, "k", "v")
    assert (trie.match(topic).subscribers == ["v"]) is expected


def test_every_matching_filter_contributes() -> None:
    trie = SubscriptionTrie()
    filters = ["#", "a/#", "a/b/#", "a/b/c/#", "+/+/+", "a/+/c", "+/b/+", "a/b/c", "+/#", "a/b/+", "x/#"]
    for i, f in enumerate(filters):
        trie.add(f, i, f)
    assert sorted(trie.match("a/b/c").subscribers) == sorted(f for f in filters if f != "x/#")
    assert sorted(trie.match("a").subscribers) == ["#", "+/#", "a/#"]


def test_overlapping_filters_give_one_entry_per_filter() -> None:
    """The trie reports every (filter, key); the broker resolves overlap for one client."""
    trie = SubscriptionTrie()
    trie.add("a/+", "client", ("client", 1))
    trie.add("a/#", "client", ("client", 2))
    trie.add("a/b", "other", ("other", 0))
    assert subscribed(trie, "a/b") == Counter({("client", 1): 1, ("client", 2): 1, ("other", 0): 1})


def test_add_replaces_value_of_same_key_and_filter() -> None:
    trie = SubscriptionTrie()
    assert trie.add("a/b", "k", 1) is True
    assert trie.add("a/b", "k", 2) is False
    assert len(trie) == 1
    assert trie.match("a/b").subscribers == [2]
    assert trie.add("a/b", "k2", 3) is True
    assert len(trie) == 2


def test_add_rejects_invalid_filter() -> None:
    trie = SubscriptionTrie()
    for bad in ["", "a/#/b", "a+", "$share//x", "$share/g"]:
        with pytest.raises(TopicFilterInvalid):
            trie.add(bad, "k", 1)
    assert len(trie) == 0
    assert trie.node_count() == 1


def test_unhashable_key_leaves_no_nodes_behind() -> None:
    trie = SubscriptionTrie()
    with pytest.raises(TypeError):
        trie.add("a/b/c", ["not", "hashable"], 1)
    assert trie.node_count() == 1
    assert len(trie) == 0


def test_none_is_a_type_error() -> None:
    trie = SubscriptionTrie()
    with pytest.raises(TypeError):
        trie.add(None, "k", 1)
    with pytest.raises(TypeError):
        trie.remove(None, "k")
    with pytest.raises(TypeError):
        trie.match(None)


def test_remove() -> None:
    trie = SubscriptionTrie()
    trie.add("a/+", "k1", 1)
    trie.add("a/+", "k2", 2)
    assert trie.remove("a/+", "k1") is True
    assert trie.remove("a/+", "k1") is False
    assert trie.remove("a/b", "k2") is False  # a literal level is not the '+' it would match
    assert trie.remove("a/#", "k2") is False
    assert trie.remove("nope/x", "k2") is False
    assert trie.remove("a/#/b", "k2") is False  # an invalid filter was never added
    assert trie.match("a/x").subscribers == [2]
    assert len(trie) == 1
    assert trie.remove("a/+", "k2") is True
    assert trie.match("a/x").subscribers == []
    assert len(trie) == 0
    assert trie.node_count() == 1


def test_remove_keeps_nodes_still_in_use() -> None:
    trie = SubscriptionTrie()
    trie.add("a/b/c", "k", "deep")
    trie.add("a", "k", "shallow")
    trie.add("a/b/+", "k", "plus")
    before = trie.node_count()
    assert trie.remove("a/b/c", "k")
    assert trie.node_count() == before - 1
    assert trie.match("a").subscribers == ["shallow"]
    assert trie.match("a/b/zz").subscribers == ["plus"]
    assert trie.remove("a", "k")
    assert trie.match("a/b/zz").subscribers == ["plus"]
    assert trie.remove("a/b/+", "k")
    assert trie.node_count() == 1


def test_churn_of_distinct_filters_returns_to_starting_node_count() -> None:
    """Memory must not grow with subscribe/unsubscribe churn: empty nodes are pruned."""
    trie = SubscriptionTrie()
    trie.add("keep/+/this", "resident", 0)
    start = trie.node_count()
    filters = []
    for i in range(10_000):
        shape = i % 4
        if shape == 0:
            f = f"dev/{i}/temp"
        elif shape == 1:
            f = f"dev/+/{i}/#"
        elif shape == 2:
            f = f"$share/g{i % 7}/site/{i}/+"
        else:
            f = f"keep/{i}/this/{i % 13}"
        filters.append(f)
        assert trie.add(f, i, i)
    assert len(trie) == 10_001
    assert trie.node_count() > start + 10_000
    for i, f in enumerate(filters):
        assert trie.remove(f, i)
    assert len(trie) == 1
    assert trie.node_count() == start
    assert trie.match("keep/x/this").subscribers == [0]


def test_deep_topics_do_not_exhaust_the_stack() -> None:
    """A long chain of '+' levels is walked without recursion (the pending branches live on the heap)."""
    depth = 20_000
    trie = SubscriptionTrie()
    trie.add("/".join(["+"] * depth), "plus", "plus")
    trie.add("/".join(["a"] * (depth - 1)) + "/#", "hash", "hash")
    trie.add("/".join(["a"] * depth), "literal", "literal")
    topic = "/".join(["a"] * depth)
    assert sorted(trie.match(topic).subscribers) == ["hash", "literal", "plus"]
    assert trie.match(topic + "/a").subscribers == ["hash"]


def test_match_with_more_levels_than_the_small_stack() -> None:
    levels = 40
    trie = SubscriptionTrie(cache_size=0)
    for i in range(levels):
        parts = ["x"] * levels
        parts[i] = "+"
        trie.add("/".join(parts), i, i)
    assert sorted(trie.match("/".join(["x"] * levels)).subscribers) == list(range(levels))
    assert trie.match("/".join(["y"] * levels)).subscribers == []


# -- shared subscriptions ---------------------------------------------------------------------------


def test_shared_subscription_is_stored_in_a_group_mqtt_4_8_2() -> None:
    trie = SubscriptionTrie()
    assert trie.add("$share/workers/jobs/+", "c1", "v1") is True
    assert trie.add("$share/workers/jobs/+", "c2", "v2") is True
    assert trie.add("$share/workers/jobs/+", "c2", "v2b") is False
    match = trie.match("jobs/42")
    assert match.subscribers == []
    assert len(match.groups) == 1
    group = match.groups[0]
    assert isinstance(group, SharedGroup)
    assert (group.name, group.filter, group.members, group.cursor) == (
        "workers",
        "jobs/+",
        {"c1": "v1", "c2": "v2b"},
        0,
    )
    assert len(trie) == 2
    assert trie.match("other/42").groups == []


def test_shared_and_normal_subscriptions_of_one_key_are_separate() -> None:
    trie = SubscriptionTrie()
    trie.add("a/b", "k", "normal")
    trie.add("$share/g/a/b", "k", "shared-g")
    trie.add("$share/h/a/b", "k", "shared-h")
    assert len(trie) == 3
    match = trie.match("a/b")
    assert match.subscribers == ["normal"]
    assert sorted((g.name, g.members["k"]) for g in match.groups) == [("g", "shared-g"), ("h", "shared-h")]
    assert trie.remove("$share/g/a/b", "k")
    match = trie.match("a/b")
    assert match.subscribers == ["normal"]
    assert [g.name for g in match.groups] == ["h"]
    assert trie.remove("a/b", "k")
    assert trie.match("a/b").subscribers == []
    assert [g.name for g in trie.match("a/b").groups] == ["h"]


def test_same_group_name_on_different_filters_are_different_groups() -> None:
    trie = SubscriptionTrie()
    trie.add("$share/g/a/+", "k1", 1)
    trie.add("$share/g/a/#", "k2", 2)
    groups = trie.match("a/b").groups
    assert sorted((g.filter, tuple(g.members)) for g in groups) == [("a/#", ("k2",)), ("a/+", ("k1",))]


def test_removing_last_member_drops_group_and_prunes() -> None:
    trie = SubscriptionTrie()
    start = trie.node_count()
    trie.add("$share/g/s/+/t", "k1", 1)
    trie.add("$share/g/s/+/t", "k2", 2)
    group = trie.match("s/x/t").groups[0]
    group.cursor = 7
    assert trie.remove("$share/g/s/+/t", "k1")
    same = trie.match("s/x/t").groups[0]
    assert same is group and same.cursor == 7  # the caller's round-robin position survives
    assert same.members == {"k2": 2}
    assert trie.remove("$share/g/s/+/t", "k1") is False
    assert trie.remove("$share/other/s/+/t", "k2") is False
    assert trie.remove("s/+/t", "k2") is False  # not a normal subscription
    assert trie.remove("$share/g/s/+/t", "k2")
    assert trie.match("s/x/t").groups == []
    assert trie.node_count() == start
    trie.add("$share/g/s/+/t", "k3", 3)
    assert trie.match("s/x/t").groups[0].cursor == 0  # a new group after the old one was dropped


def test_shared_filter_dollar_rule_applies_to_inner_filter() -> None:
    trie = SubscriptionTrie()
    trie.add("$share/g/#", "k", 1)
    trie.add("$share/g/$SYS/#", "k", 2)
    assert [g.filter for g in trie.match("$SYS/load").groups] == ["$SYS/#"]
    assert sorted(g.filter for g in trie.match("load").groups) == ["#"]


# -- cache and generation ---------------------------------------------------------------------------


def test_cache_invalidated_by_add_and_remove() -> None:
    trie = SubscriptionTrie()
    trie.add("a/+", "k1", 1)
    first = trie.match("a/b")
    assert first.subscribers == [1]
    assert trie.match("a/b") is first  # cached until the next change
    gen = trie.generation
    trie.add("a/#", "k2", 2)
    assert trie.generation > gen
    assert sorted(trie.match("a/b").subscribers) == [1, 2]
    gen = trie.generation
    trie.remove("a/+", "k1")
    assert trie.generation > gen
    assert trie.match("a/b").subscribers == [2]
    trie.add("a/#", "k2", 3)  # replacing a value is a change too
    assert trie.match("a/b").subscribers == [3]
    trie.add("$share/g/a/b", "k3", 4)
    assert [g.name for g in trie.match("a/b").groups] == ["g"]


def test_empty_results_are_cached_and_invalidated() -> None:
    trie = SubscriptionTrie()
    assert trie.match("x/y").subscribers == []
    assert trie.cache_len() == 1
    trie.add("x/+", "k", 1)
    assert trie.cache_len() == 0
    assert trie.match("x/y").subscribers == [1]


def test_failed_remove_keeps_cache_and_generation() -> None:
    trie = SubscriptionTrie()
    trie.add("a", "k", 1)
    cached = trie.match("a")
    gen = trie.generation
    assert trie.remove("b", "k") is False
    assert trie.generation == gen
    assert trie.match("a") is cached


def test_cache_is_bounded() -> None:
    trie = SubscriptionTrie(cache_size=16)
    trie.add("t/+", "k", 1)
    sizes = []
    for i in range(100):
        assert trie.match(f"t/{i}").subscribers == [1]
        sizes.append(trie.cache_len())
    assert max(sizes) == 16
    assert min(sizes[16:]) >= 1


def test_cache_can_be_disabled() -> None:
    trie = SubscriptionTrie(cache_size=0)
    trie.add("a", "k", 1)
    assert trie.match("a").subscribers == [1]
    assert trie.cache_len() == 0


# -- properties against the reference matcher -------------------------------------------------------

_LEVEL = st.sampled_from(["", "a", "b", "$", "$SYS", "a$", "é"])
TOPICS = st.lists(_LEVEL, min_size=1, max_size=5).map("/".join).filter(bool)
FILTERS = st.builds(
    lambda levels, hash_last: "/".join(levels + (["#"] if hash_last else [])),
    st.lists(st.one_of(_LEVEL, st.just("+")), min_size=0, max_size=5),
    st.booleans(),
).filter(bool)
KEYS = st.integers(min_value=0, max_value=3)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(FILTERS, KEYS), max_size=30), st.lists(TOPICS, min_size=1, max_size=10))
def test_match_agrees_with_reference(subscriptions: list[tuple[str, int]], topics: list[str]) -> None:
    trie = SubscriptionTrie()
    model = {}
    for f, key in subscriptions:
        trie.add(f, key, (f, key))
        model[(f, key)] = (f, key)
    for topic in topics:
        expected = Counter(v for (f, _k), v in model.items() if reference_match(f, topic))
        assert subscribed(trie, topic) == expected, topic


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["g", "h"]), FILTERS, KEYS), max_size=20), TOPICS)
def test_shared_groups_agree_with_reference(subscriptions: list[tuple[str, str, int]], topic: str) -> None:
    trie = SubscriptionTrie()
    groups: dict[tuple[str, str], dict[int, str]] = {}
    for name, f, key in subscriptions:
        trie.add(f"$share/{name}/{f}", key, f"{name}:{key}")
        groups.setdefault((name, f), {})[key] = f"{name}:{key}"
    expected = Counter(
        (name, f, tuple(sorted(members.items())))
        for (name, f), members in groups.items()
        if reference_match(f, topic)
    )
    match = trie.match(topic)
    assert group_view(match) == expected
    assert match.subscribers == []


class SubscriptionModel(RuleBasedStateMachine):
    """Random add/remove/match sequences (cache included) against a dict of entries."""

    def __init__(self) -> None:
        super().__init__()
        self.trie = SubscriptionTrie(cache_size=8)
        self.entries: dict[tuple[str, int], tuple[str, int, int]] = {}
        self.counter = 0
        self.start_nodes = self.trie.node_count()

    @rule(f=FILTERS, key=KEYS, shared=st.booleans())
    def add(self, f: str, key: int, shared: bool) -> None:
        full = f"$share/g/{f}" if shared else f
        self.counter += 1
        value = (full, key, self.counter)
        assert self.trie.add(full, key, value) is ((full, key) not in self.entries)
        self.entries[(full, key)] = value

    @rule(data=st.data())
    def remove_existing(self, data: st.DataObject) -> None:
        if not self.entries:
            return
        full, key = data.draw(st.sampled_from(sorted(self.entries)))
        assert self.trie.remove(full, key) is True
        del self.entries[(full, key)]

    @rule(f=FILTERS, key=KEYS)
    def remove_any(self, f: str, key: int) -> None:
        assert self.trie.remove(f, key) is ((f, key) in self.entries)
        self.entries.pop((f, key), None)

    @rule(topic=TOPICS)
    def match(self, topic: str) -> None:
        result = self.trie.match(topic)
        plain = Counter(
            v
            for (f, _k), v in self.entries.items()
            if not f.startswith("$share/") and reference_match(f, topic)
        )
        shared = Counter(
            v
            for (f, _k), v in self.entries.items()
            if f.startswith("$share/") and reference_match(f[len("$share/g/") :], topic)
        )
        assert Counter(result.subscribers) == plain
        assert Counter(v for g in result.groups for v in g.members.values()) == shared

    @invariant()
    def sizes(self) -> None:
        assert len(self.trie) == len(self.entries)
        if not self.entries:
            assert self.trie.node_count() == self.start_nodes


SubscriptionModel.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_subscription_model = SubscriptionModel.TestCase
