"""RemoteInterest: one trie per peer, matched once per node."""

from __future__ import annotations

from fluxmq.cluster.interest import RemoteInterest


def test_a_node_matches_once_however_many_of_its_filters_match() -> None:
    r = RemoteInterest()
    for f in ("a/#", "a/+", "a/b"):
        r.add("n2", f)
    r.add("n3", "x")
    assert r.match("a/b") == (["n2"], {})
    assert r.match("x") == (["n3"], {})
    assert r.match("y") == ([], {})


def test_shared_groups_are_reported_per_group_with_the_nodes_holding_them() -> None:
    r = RemoteInterest()
    r.add("n2", "$share/g/t/#")
    r.add("n3", "$share/g/t/#")
    r.add("n3", "$share/h/t/1")
    nodes, groups = r.match("t/1")
    assert nodes == []
    assert {k: sorted(v) for k, v in groups.items()} == {"$share/g/t/#": ["n2", "n3"], "$share/h/t/1": ["n3"]}


def test_remove_replace_and_drop() -> None:
    r = RemoteInterest()
    r.add("n2", "a")
    r.add("n2", "b")
    r.remove("n2", "a")
    r.remove("n2", "never")
    assert r.filters("n2") == {"b"}
    r.replace("n2", ["c"])
    assert r.filters("n2") == {"c"} and r.match("b") == ([], {})
    r.replace("n3", [])
    assert "n3" in r and r.filters("n3") == set()
    r.drop("n2")
    assert "n2" not in r and r.match("c") == ([], {})
