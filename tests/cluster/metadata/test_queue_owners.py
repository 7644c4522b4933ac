"""The owning node of each durable queue in etcd (fluxmq/cluster/metadata/queue_owners.py): claimed
once by the first node, never two owners, permanent (no lease), read by every node at start and
watched; an operator's reassign (the owner gone for good) is a compare-and-swap every node follows."""

from __future__ import annotations

import gevent
import gevent.event
import pytest

from fluxmq.cluster.metadata.client import EtcdClient
from fluxmq.cluster.metadata.queue_owners import OwnerChangeRefused, QueueOwners
from tests.cluster.metadata.conftest import wait_for

ROUNDS = 20


@pytest.fixture
def owners_of(etcd_server, etcd_prefix):
    clients: list[EtcdClient] = []

    def make(node: str) -> QueueOwners:
        client = EtcdClient([etcd_server.endpoint], timeout=3.0)
        clients.append(client)
        return QueueOwners(client, etcd_prefix, node)

    yield make
    for client in clients:
        client.close()


def register(client: EtcdClient, prefix: str, *members: str) -> None:
    """Registrations of live nodes (``nodes/{member}``, as a node's membership puts them)."""
    for member in members:
        client.put(f"{prefix}nodes/{member}", b"{}")


def test_racing_nodes_end_with_one_owner_that_every_claim_returns(owners_of) -> None:
    nodes = [owners_of(f"n{i}") for i in range(4)]
    for r in range(ROUNDS):
        name = f"race-{r}"
        greenlets = [gevent.spawn(o.claim, name) for o in nodes]
        gevent.joinall(greenlets, raise_error=True)
        results = {g.value for g in greenlets}
        assert len(results) == 1, (name, results)
        (owner,) = results
        assert owner in {o.node for o in nodes}
        assert sum(o.claimed for o in nodes) == r + 1  # one transaction won each round
    # a claim made later (another node, nothing cached) returns the recorded owner
    late = owners_of("n9")
    assert late.claim("race-0") == nodes[0].owner("race-0")
    assert late.claimed == 0


def test_owners_are_read_at_start_and_outlive_their_node(owners_of, etcd_server, etcd_prefix) -> None:
    a = owners_of("a")
    assert a.claim("orders") == "a"
    assert a.claim("orders.audit") == "a"
    a.client.close()  # node a is gone: its records are not bound to any lease
    b = owners_of("b")
    assert b.owner("orders") is None  # nothing read yet
    assert b.load() == {"orders": "a", "orders.audit": "a"}
    assert b.owner("orders") == "a"
    assert b.claim("orders") == "a"
    assert b.claim("payments") == "b"


def test_a_reassign_is_refused_while_the_owner_is_live_and_to_a_node_that_is_not(
    owners_of, etcd_prefix
) -> None:
    gone = owners_of("gone")
    assert gone.claim("orders") == "gone"
    b = owners_of("b")
    register(b.client, etcd_prefix, "gone", "b/w0", "b/w1")  # b runs two workers
    assert b.live_nodes() == {"gone", "b"}
    with pytest.raises(OwnerChangeRefused) as err:
        b.reassign("orders", "b")
    assert err.value.status == 409 and "'gone' is live" in str(err.value)
    b.client.delete(f"{etcd_prefix}nodes/gone")  # its lease expired: gone
    with pytest.raises(OwnerChangeRefused) as err:
        b.reassign("orders", "nobody")
    assert err.value.status == 409 and "'nobody' is not live" in str(err.value)
    with pytest.raises(OwnerChangeRefused) as err:
        b.reassign("never-used", "b")
    assert err.value.status == 404
    assert b.reassign("orders", "b") == ("gone", "b")
    assert b.owner("orders") == "b"
    assert b.reassign("orders", "b") == ("b", "b")  # already: nothing to do


def test_a_reassign_racing_the_old_owner_s_restart_is_refused(owners_of, etcd_prefix) -> None:
    """The liveness read and the compare-and-swap are two steps: an old owner that registers in
    between (it restarted; a node of one worker or a worker of a node of several) fails the
    transaction, which names it, and the record is unchanged. A node whose name only begins with
    the old owner's is not it."""
    owners_of("gone").claim("orders")
    owners_of("many").claim("audit")
    b = owners_of("b")
    register(b.client, etcd_prefix, "b")
    live = b.live_nodes()  # read before the old owners came back (as reassign_node reads it once)
    register(b.client, etcd_prefix, "gone", "many/w1")
    for name, old in (("orders", "gone"), ("audit", "many")):
        with pytest.raises(OwnerChangeRefused) as err:
            b.reassign(name, "b", live)
        assert err.value.status == 409 and f"{old!r} registered in etcd meanwhile" in str(err.value)
        assert b.client.get(b.key(name))["value"].decode() == old
    b.client.delete(f"{etcd_prefix}nodes/gone")
    register(b.client, etcd_prefix, "gone2", "gone-x/w0")
    assert b.reassign("orders", "b", live) == ("gone", "b")


def test_two_operators_racing_to_reassign_one_queue_one_wins(owners_of, etcd_prefix) -> None:
    """Each reassign is a compare-and-swap on the record's mod_revision: of two at once one wins,
    the other is refused. Each reads the record, then pauses, so both read it before either
    writes: the loser's compare fails (the record changed meanwhile). A barrier, not a pause, holds
    each read until the other's is done, so a loaded machine cannot order them otherwise."""
    a, b = owners_of("a"), owners_of("b")
    register(a.client, etcd_prefix, "a", "b")
    reads: list = []
    both_read = gevent.event.Event()
    for o in (a, b):
        read = o.client.get

        def held_get(key, read=read):
            kv = read(key)
            reads.append(key)
            if len(reads) == 2:
                both_read.set()
            assert both_read.wait(timeout=30), "the other operator never read the record"
            return kv

        o.client.get = held_get
    for r in range(ROUNDS):
        name = f"race-{r}"
        owners_of("gone").claim(name)
        reads.clear()
        both_read.clear()
        greenlets = [gevent.spawn(o.reassign, name, o.node) for o in (a, b)]
        gevent.joinall(greenlets)
        won = [g.value for g in greenlets if g.successful()]
        lost = [g.exception for g in greenlets if not g.successful()]
        assert len(won) == 1 and len(lost) == 1, (won, lost)
        assert isinstance(lost[0], OwnerChangeRefused) and lost[0].status == 409
        assert "changed meanwhile" in str(lost[0])
        old, new = won[0]
        assert old == "gone" and a.client.get(a.key(name))["value"].decode() == new


def test_every_node_s_cache_follows_a_reassign_through_its_watch(owners_of, etcd_prefix) -> None:
    """Node c cached "gone" as the owner (read at start); an operator on node b reassigns: c's cache
    converges without a restart and its ``on_change`` callbacks hear of it."""
    gone = owners_of("gone")
    assert gone.claim("orders") == "gone"
    assert gone.claim("audit") == "gone"
    assert gone.claim("kept") == "gone"
    c = owners_of("c")
    c.start()
    try:
        heard: list[tuple] = []
        c.on_change.append(lambda *change: heard.append(change))
        assert c.owner("orders") == "gone"
        b = owners_of("b")
        register(b.client, etcd_prefix, "b", "c")
        assert b.reassign("orders", "c") == ("gone", "c")
        assert wait_for(lambda: c.owner("orders") == "c"), c.owners
        assert heard == [("orders", "gone", "c")]
        result = b.reassign_node("gone", "b")  # the rest of gone's queues, in one call
        assert result == {"moved": ["audit", "kept"], "failed": []}
        assert wait_for(lambda: c.owner("audit") == c.owner("kept") == "b"), c.owners
        assert sorted(heard) == [("audit", "gone", "b"), ("kept", "gone", "b"), ("orders", "gone", "c")]
        with pytest.raises(OwnerChangeRefused) as err:
            b.reassign_node("c", "b")  # c is live
        assert err.value.status == 409 and "'c' is live" in str(err.value)
    finally:
        c.stop()
