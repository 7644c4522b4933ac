"""fluxmq/cluster/handover.py: ClusterSessions (Peers.claim_session over an ownership registry and a
control RPC) and takeover_handler (the answering end), between real Brokers.

``Registry``/``Ownership`` stand for etcd (C2's ``acquire_session`` compare-and-swap) and ``Network``
for the gRPC transport (C1's ``call``/``handle``): in-process doubles with the interfaces of
CLUSTER.md, because those parts are built elsewhere. The real end-to-end test over two node
processes is added with the transport."""

from __future__ import annotations

import gevent
import pytest

from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.broker.message import Message
from fluxmq.broker.session import Will
from fluxmq.broker.session_state import QueuedState
from fluxmq.cluster.handover import (
    MOVED_KIND,
    TAKEOVER_KIND,
    ClusterSessions,
    SessionState,
    decode_session_state,
    encode_session_state,
    moved_handler,
    takeover_handler,
)
from fluxmq.errors import ServerUnavailable
from tests.broker.test_session import RecordingDelivery
from tests.storage.test_worker_owners import _OTHER_WORKER


class Registry:
    """Owner of each client id, with etcd's guarantee: one owner at a time, moved only by CAS."""

    def __init__(self) -> None:
        self.owners: dict[str, str] = {}
        self.down = False  # no quorum
        self.before_cas = None  # hook run before a take_from CAS (a third node racing)

    def acquire(self, node: str, client_id: str, take_from: str | None) -> str | None:
        if self.down:
            raise ConnectionError("etcd: no quorum")
        owner = self.owners.get(client_id)
        if take_from is not None and self.before_cas is not None:
            hook, self.before_cas = self.before_cas, None
            hook()
            if self.down:
                raise ConnectionError("etcd: no quorum")
            owner = self.owners.get(client_id)
        if owner is None or owner == node or (take_from is not None and owner == take_from):
            self.owners[client_id] = node
            return None
        return owner


class Ownership:
    """One node's view of the registry (``acquire_session``/``release_session`` as in CLUSTER.md)."""

    def __init__(self, registry: Registry, node: str) -> None:
        self.registry = registry
        self.node = node

    def acquire_session(self, client_id: str, take_from: str | None = None) -> str | None:
        return self.registry.acquire(self.node, client_id, take_from)

    def release_session(self, client_id: str) -> None:
        if self.registry.down:
            raise ConnectionError("etcd: no quorum")
        if self.registry.owners.get(client_id) == self.node:
            del self.registry.owners[client_id]


class Network:
    """``call(node, kind, payload, timeout)`` to the handlers each node registered."""

    def __init__(self) -> None:
        self.handlers: dict[str, dict] = {}
        self.unreachable: set[str] = set()
        self.lose_replies = 0  # replies lost on the way back (the handler ran)
        self.calls: list[tuple[str, str, bytes]] = []

    def handle(self, node: str, kind: str, fn) -> None:
        self.handlers.setdefault(node, {})[kind] = fn

    @property
    def takeovers(self) -> list[tuple[str, str, bytes]]:
        """The takeover calls made (not the ``session.moved`` forwards that follow)."""
        return [c for c in self.calls if c[1] == TAKEOVER_KIND]

    def caller(self, from_node: str):
        def call(node: str, kind: str, payload: bytes, timeout: float) -> bytes:
            self.calls.append((node, kind, payload))
            if node in self.unreachable:
                raise ConnectionError(f"peer {node} unavailable")
            with gevent.Timeout(timeout):
                reply = self.handlers[node][kind](from_node, payload)
            if self.lose_replies:
                self.lose_replies -= 1
                raise ConnectionError("reply lost")
            return reply

        return call


class NodePeers(ClusterSessions):
    """ClusterSessions as a whole Peers (interest and forwarding are C1's, not exercised here)."""

    def interest_added(self, filter: str) -> None:
        pass

    def interest_removed(self, filter: str) -> None:
        pass

    def matches(self, topic):
        return False

    def forward(self, message, groups):
        return groups


class Cluster:
    def __init__(self) -> None:
        self.registry = Registry()
        self.network = Network()
        self.brokers: dict[str, Broker] = {}

    def node(self, name: str, forwarding: bool = False, **settings) -> Broker:
        """A node (``settings``: more ``BrokerSettings``); with ``forwarding`` its exports leave a
        stand-in that forwards to the taking node (``session.moved``), as a real node's do."""
        broker = Broker(BrokerSettings(node_id=name, **settings))
        call = self.network.caller(name)
        peers = NodePeers(
            Ownership(self.registry, name), call, timeout=2.0, max_kept_moved=broker.moved_max_queued
        )
        broker.set_peers(peers)
        handler = takeover_handler(broker, call if forwarding else None, None, peers.take_kept)
        self.network.handle(name, TAKEOVER_KIND, handler)
        self.network.handle(name, MOVED_KIND, moved_handler(broker, peers.pass_back))
        self.brokers[name] = broker
        return broker


def connect(broker: Broker, cid: str, clean: bool = False, will: Will | None = None, expiry: int = 3600):
    session, present = broker.open_session(cid, clean, expiry, will)
    d = RecordingDelivery()
    broker.attach(session, d, 100)
    gevent.sleep(0)
    return session, d, present


@pytest.fixture
def cluster() -> Cluster:
    return Cluster()


def test_a_client_connecting_to_another_node_takes_its_session_over(cluster: Cluster) -> None:
    a, b = cluster.node("A"), cluster.node("B")
    s, old, present = connect(a, "c1", will=Will(Message("w", b"gone", 1), 0))
    assert not present and cluster.registry.owners["c1"] == "A"
    a.subscribe(s, "t/#", 1, no_local=True, subscription_id=3)
    a.publish(Message("t/1", b"m", 1))
    new, d, present = connect(b, "c1")
    assert present and old.closed_with == 0x8E
    assert cluster.registry.owners["c1"] == "B"
    assert cluster.network.takeovers == [("A", TAKEOVER_KIND, b"c1")]
    assert "c1" not in a.sessions
    assert new.subscriptions["t/#"].no_local and new.subscriptions["t/#"].subscription_id == 3
    assert d.sent == [("t/1", 1, False, 1, True, (3,))]  # resent with DUP
    # Back to A: the same way.
    again, d2, present = connect(a, "c1")
    assert present and d.closed_with == 0x8E and cluster.registry.owners["c1"] == "A"
    assert d2.sent == [("t/1", 1, False, 1, True, (3,))]


def test_an_owner_that_does_not_answer_refuses_the_connect_with_0x88(cluster: Cluster) -> None:
    a, b = cluster.node("A"), cluster.node("B")
    s, old, _ = connect(a, "c1")
    cluster.network.unreachable.add("A")
    with pytest.raises(ServerUnavailable) as err:
        b.open_session("c1", False, 3600)
    assert err.value.reason_code == 0x88
    assert cluster.registry.owners["c1"] == "A" and a.sessions["c1"] is s and old.closed_with is None
    assert "c1" not in b.sessions


def test_a_registry_without_quorum_refuses_the_connect_with_0x88(cluster: Cluster) -> None:
    b = cluster.node("B")
    cluster.registry.down = True
    with pytest.raises(ServerUnavailable, match="no quorum"):
        b.open_session("c1", False, 3600)


def test_a_third_node_racing_is_asked_in_turn(cluster: Cluster) -> None:
    """Ownership moves to C between A's hand-over and B's CAS: B asks C (which has nothing yet), then
    owns the id, with the state A handed over."""
    a, b, _ = cluster.node("A"), cluster.node("B"), cluster.node("C")
    s, _, _ = connect(a, "c1")
    a.subscribe(s, "t", 1)
    cluster.registry.before_cas = lambda: cluster.registry.owners.__setitem__("c1", "C")
    new, _, present = connect(b, "c1")
    assert present and set(new.subscriptions) == {"t"}
    assert [n for n, _, _ in cluster.network.takeovers] == ["A", "C"]
    assert cluster.registry.owners["c1"] == "B"


def _claim_fails_after_the_handover(cluster: Cluster, a: Broker, b: Broker) -> None:
    """c1 (subscribed to ``t``) lives on A; B's claim takes its state, then the registry loses
    its quorum before B's compare-and-swap: B refuses the client and keeps the state."""
    s, _, _ = connect(a, "c1")
    a.subscribe(s, "t", 1)

    def quorum_lost() -> None:
        cluster.registry.down = True

    cluster.registry.before_cas = quorum_lost
    with pytest.raises(ServerUnavailable):
        b.open_session("c1", False, 3600)


def test_a_state_whose_claim_failed_is_kept_for_the_next_claim(cluster: Cluster) -> None:
    a, b = cluster.node("A"), cluster.node("B")
    _claim_fails_after_the_handover(cluster, a, b)
    assert "c1" not in a.sessions and "c1" in b.peers.kept  # A gave it up; B keeps it
    cluster.registry.down = False
    new, _, present = connect(b, "c1")  # the client retries
    assert present and set(new.subscriptions) == {"t"} and not b.peers.kept


def test_a_session_taken_back_from_a_node_whose_claim_failed_gets_the_state_kept_there(
    cluster: Cluster,
) -> None:
    """A handed the session to B, whose claim then failed (no quorum): B keeps the state, the
    registry still names A. The client's other connection reaches A, which takes the session back
    from B (``handed_to``): B hands over the state it keeps, not an empty answer that would start
    the client afresh on A and leave the state on B; with it what A's stand-in forwarded to B
    meanwhile (B had no session to give it to)."""
    a, b = cluster.node("A", forwarding=True), cluster.node("B", forwarding=True)
    _claim_fails_after_the_handover(cluster, a, b)
    cluster.registry.down = False
    assert "c1" in b.peers.kept and cluster.registry.owners["c1"] == "A"
    a.publish(Message("t", b"meanwhile", 1))  # A's stand-in forwards it to B, which keeps it
    new, d, present = connect(a, "c1")
    assert present and set(new.subscriptions) == {"t"}
    assert not b.peers.kept and cluster.registry.owners["c1"] == "A"
    assert [(topic, qos) for topic, qos, *_ in d.sent] == [("t", 1)]  # the one published meanwhile


def _went_on_at_c_and_ended(cluster: Cluster, c: Broker, release: bool) -> None:
    """After ``_claim_fails_after_the_handover``: the client connects to C with a Clean Start (C
    takes A's export copy over, the registry names C), subscribes to ``u``, and its session ends
    there with its connection; C's release of the id fails without ``release`` (no quorum a moment:
    the key stays C's until C's lease goes)."""
    cluster.registry.down = False
    s, d, present = connect(c, "c1", clean=True, expiry=0)
    c.subscribe(s, "u", 1)
    assert not present and cluster.registry.owners["c1"] == "C"
    cluster.registry.down = not release
    c.close_session(s, d, False)
    cluster.registry.down = False
    assert "c1" not in c.sessions and cluster.registry.owners.get("c1") == (None if release else "C")


def test_a_kept_state_is_dropped_once_the_registry_names_another_node(cluster: Cluster) -> None:
    """B keeps the state of a claim that failed after the hand-over, the registry naming A. The
    session goes on at C and ends there, the registry still naming C (its release failed): B's
    next claim of c1 finds C, which has no session: it starts anew, the kept state is stale (not
    the old session back with its subscription ``t``)."""
    a, b, c = cluster.node("A"), cluster.node("B"), cluster.node("C")
    _claim_fails_after_the_handover(cluster, a, b)
    assert "c1" in b.peers.kept
    _went_on_at_c_and_ended(cluster, c, release=False)
    new, _, present = connect(b, "c1")
    assert not present and not new.subscriptions and not b.peers.kept
    assert b.peers.kept_dropped == 1 and b.peers.kept_bytes == 0


def test_a_kept_state_expires_after_kept_for(cluster: Cluster) -> None:
    """As above, C's release done (the registry names nobody: B cannot tell the session went on):
    the kept state lasts ``kept_for`` seconds (the export copy's ``exported_keep``), then a claim
    of c1 on B starts anew. Within them the retry resumes it."""
    a, b, c = cluster.node("A"), cluster.node("B"), cluster.node("C")
    now = [1000.0]
    b.peers.clock = lambda: now[0]
    _claim_fails_after_the_handover(cluster, a, b)
    _went_on_at_c_and_ended(cluster, c, release=True)
    now[0] += 31  # (kept_for: 30)
    new, _, present = connect(b, "c1")
    assert not present and not new.subscriptions and not b.peers.kept
    assert b.peers.kept_dropped == 1 and b.peers.kept_bytes == 0


def test_kept_states_are_bounded_in_count_and_bytes(cluster: Cluster) -> None:
    """The oldest kept state goes first past ``max_kept`` ids or ``max_kept_bytes`` bytes."""
    peers = cluster.node("B").peers
    peers.max_kept, peers.max_kept_bytes = 2, 10
    for n in range(3):
        peers._keep(f"c{n}", b"1234", "A")
    assert list(peers.kept) == ["c1", "c2"] and peers.kept_bytes == 8 and peers.kept_dropped == 1
    peers._keep("c3", b"12345678", "A")
    assert list(peers.kept) == ["c3"] and peers.kept_bytes == 8 and peers.kept_dropped == 3


def test_ownership_that_keeps_moving_is_refused(cluster: Cluster) -> None:
    b = cluster.node("B")
    peers = b.peers
    peers.ownership = type("Flapping", (), {"acquire_session": lambda self, cid, take_from=None: "X"})()
    cluster.network.handle("X", TAKEOVER_KIND, lambda frm, payload: b"")
    with pytest.raises(ServerUnavailable, match="kept moving"):
        peers.claim_session("c1", False)
    assert len(cluster.network.takeovers) == peers.max_moves + 1


def test_the_takeover_handler_answers_empty_for_no_session_and_bad_ids(cluster: Cluster) -> None:
    a = cluster.node("A")
    handle = takeover_handler(a)
    assert handle("B", b"nobody") == b""
    assert handle("B", b"\xff\xfe") == b""
    connect(a, "c1")
    state = decode_session_state(handle("B", b"c1"))
    assert state.client_id == "c1" and state.connected and state.expiry_interval == 3600


def test_release_goes_to_the_registry(cluster: Cluster) -> None:
    a = cluster.node("A")
    connect(a, "c1")
    a.release_sessions()
    assert "c1" not in cluster.registry.owners


def test_a_lost_takeover_reply_loses_nothing(cluster: Cluster) -> None:
    """A handed the state over but the reply never reached B: B refuses the client (0x88), A is still
    the registered owner, and the client's retry gets the whole session."""
    a, b = cluster.node("A"), cluster.node("B")
    s, old, _ = connect(a, "c1")
    a.subscribe(s, "t", 1)
    a.publish(Message("t", b"m", 1))
    cluster.network.lose_replies = 1
    with pytest.raises(ServerUnavailable):
        b.open_session("c1", False, 3600)
    assert old.closed_with == 0x8E and "c1" not in a.sessions and cluster.registry.owners["c1"] == "A"
    new, d, present = connect(b, "c1")
    assert present and set(new.subscriptions) == {"t"}
    assert d.sent == [("t", 1, False, 1, True, None)]
    assert cluster.registry.owners["c1"] == "B"


def test_an_adoption_takes_the_session_only_from_the_stopping_node(cluster: Cluster) -> None:
    """A stopping node (A) asks C to adopt its sessions; a client that reconnected to B meanwhile
    took its session over from A. C must not take it from B (that would close the live client with
    0x8E and leave the session on a node it is not connected to): the adoption is refused."""
    a, b, c = cluster.node("A"), cluster.node("B"), cluster.node("C")
    connect(a, "c1")
    live, d, present = connect(b, "c1")  # the client came back on B first
    assert present and cluster.registry.owners["c1"] == "B"
    from fluxmq.errors import ServerUnavailable

    with pytest.raises(ServerUnavailable):
        c.adopt_session("c1", from_node="A")
    assert cluster.registry.owners["c1"] == "B" and d.closed_with is None and "c1" not in c.sessions
    # From the node that does own it, the adoption goes through.
    assert c.adopt_session("c1", from_node="B")
    assert cluster.registry.owners["c1"] == "C"


def test_a_session_that_ends_in_the_turn_of_its_claim_releases_its_client_id(cluster: Cluster) -> None:
    """A client that connects with Session Expiry 0 and disconnects before the loop turn of its
    claim is over (its DISCONNECT already read when the CONNACK went out) ends its session while
    the claim is still open; the client id must be released once the claim closes, not stay owned
    by this node for good."""
    a = cluster.node("A")
    connect(a, "c1")  # an offline copy would be replaced by Clean Start: the id is owned here
    s, d, _ = connect(a, "c1")
    a.close_session(s, d, publish_will=False)
    gevent.sleep(0)
    assert "c1" not in cluster.registry.owners or cluster.registry.owners["c1"] == "A"
    session, _ = a.open_session("c1", True, 0)  # the claim's turn is not over yet
    d2 = RecordingDelivery()
    a.attach(session, d2, 100)
    a.close_session(session, d2, publish_will=False)  # ends now: expiry 0
    gevent.sleep(0.01)  # the turn ends, the claim closes
    assert "c1" not in a.sessions
    assert "c1" not in cluster.registry.owners, cluster.registry.owners


def test_takeovers_keep_nothing_of_their_moves_once_the_state_is_imported_or_discarded(
    cluster: Cluster,
) -> None:
    """What a claim keeps of its move for the import (``_took_from``) goes when the state is
    imported and when it is discarded (Clean Start): many client lifetimes moving between nodes
    leave no entry behind."""
    a, b = cluster.node("A"), cluster.node("B")
    for i in range(20):
        cid = f"c{i}"
        connect(a, cid)
        new, d, present = connect(b, cid, clean=i % 2 == 0)
        assert present is (i % 2 == 1) and cluster.registry.owners[cid] == "B"
        b.close_session(new, d, False)
    assert b.peers._took_from == {} and a.peers._took_from == {}


# -- what reaches the old node after the move (fluxmq/broker/moved.py) -------------------------------


def moved_pair(cluster: Cluster, clean: bool = False):
    """c1 subscribed to ``t/#`` at QoS 1 on A, then taken over by B (``clean``: with Clean Start);
    c2 on B subscribed to the same filter. Returns (a, b, c1's delivery on B, c2's delivery)."""
    a, b = cluster.node("A", forwarding=True), cluster.node("B", forwarding=True)
    s, _, _ = connect(a, "c1")
    a.subscribe(s, "t/#", 1)
    s2, d2, _ = connect(b, "c2")
    b.subscribe(s2, "t/#", 1)
    new, d, present = connect(b, "c1", clean=clean)
    if not clean:
        assert present and set(new.subscriptions) == {"t/#"}
    return a, b, d, d2


def test_a_qos1_message_reaching_the_old_node_after_the_move_goes_to_the_moved_session_only(
    cluster: Cluster,
) -> None:
    a, b, d, d2 = moved_pair(cluster)
    assert "t/#" in a._interest  # the stand-in keeps it announced
    a.publish(Message("t/1", b"q1", 1))
    a.publish(Message("t/0", b"q0", 0))  # QoS 0 too (the gate on B, with markers, keeps it once)
    gevent.sleep(0.01)
    assert [x[:2] for x in d.sent] == [("t/1", 1), ("t/0", 0)] and d.sent[0][3] == 1
    assert d2.sent == []  # forwarded to the session, not routed again on B
    assert ("B", MOVED_KIND) in [c[:2] for c in cluster.network.calls]
    a._end_moved("c1")
    assert "t/#" not in a._interest and not a._moved


def test_a_clean_start_after_the_move_gets_nothing_of_the_old_session(cluster: Cluster) -> None:
    a, b, d, _ = moved_pair(cluster, clean=True)
    a.publish(Message("t/1", b"old", 1))
    gevent.sleep(0.01)
    assert d.sent == [] and ("B", MOVED_KIND) in [c[:2] for c in cluster.network.calls]


def test_the_stand_in_ends_after_its_grace_and_withdraws_the_interest(cluster: Cluster) -> None:
    a = cluster.node("A", forwarding=True)
    a.moved_forward_for = 0.05
    b = cluster.node("B", forwarding=True)
    s, _, _ = connect(a, "c1")
    a.subscribe(s, "t/#", 1)
    connect(b, "c1")
    assert "c1" in a._moved and "t/#" in a._interest
    gevent.sleep(0.2)
    assert not a._moved and "t/#" not in a._interest
    a.publish(Message("t/1", b"late", 1))
    gevent.sleep(0.01)
    assert ("B", MOVED_KIND) not in [c[:2] for c in cluster.network.calls]


def test_no_local_holds_for_the_moved_sessions_own_messages_forwarded_back(cluster: Cluster) -> None:
    """The client's own message (published on B, forwarded to A, matched there by the stand-in)
    comes back to B through ``session.moved``: with No Local it is not delivered to it
    [MQTT-3.8.3-3]; another's message is."""
    a, b = cluster.node("A", forwarding=True), cluster.node("B", forwarding=True)
    s, _, _ = connect(a, "c1")
    a.subscribe(s, "t/#", 1, no_local=True)
    _, d, present = connect(b, "c1")
    assert present
    a.publish(Message("t/1", b"own", 1, origin="c1"))
    a.publish(Message("t/1", b"other", 1, origin="c9"))
    gevent.sleep(0.01)
    assert [x[0] for x in d.sent] == ["t/1"] and len(d.sent) == 1


def test_a_client_back_on_the_node_that_just_handed_its_session_over_takes_it_back(cluster: Cluster) -> None:
    """B's claim holds A's state but has not written itself as the owner yet when the client
    connects to A again (the racing CONNECTs of tests/e2e/test_cluster_etcd.py). A, still named the
    owner, takes the session back from B (whose export waits for B's claim to end) instead of
    starting a new one beside B's: one live connection, on the node the registry names."""
    a, b = cluster.node("A", forwarding=True), cluster.node("B", forwarding=True)
    s, first, _ = connect(a, "c1")
    a.subscribe(s, "t/#", 1)
    again = []

    def connect_to_a_meanwhile() -> None:
        again.append(gevent.spawn(connect, a, "c1"))
        gevent.sleep(0.05)  # A's claim runs up to its takeover call to B, which waits for B's claim

    cluster.registry.before_cas = connect_to_a_meanwhile  # in B's claim, before its CAS
    _, on_b, present_b = connect(b, "c1")
    assert present_b and first.closed_with == 0x8E
    session, on_a, present_a = again[0].get(timeout=5)
    assert present_a and set(session.subscriptions) == {"t/#"}
    assert on_b.closed_with == 0x8E and on_a.closed_with is None
    assert cluster.registry.owners["c1"] == "A"
    assert "c1" in a.sessions and "c1" not in b.sessions


# the arbiter's new w1: adopts its restored sessions, then lives until told
_RESTARTED_WORKER = _OTHER_WORKER.replace(
    'assert owners.acquire_session("c-dead") is None\nowners.close()',
    'print("dropped", owners.adopt(["c-dead"]), flush=True)\nsys.stdin.readline()',
)


def test_a_take_back_from_a_worker_that_does_not_answer_leaves_the_id_to_its_restored_copy(tmp_path) -> None:
    """w0 handed a session to w1 a moment ago; w1 is killed -9 (its pid gone, its entry in the
    workers' real registry belongs to nobody), and its client connects to w0, which tries to take it
    back from w1: refused (0x88), and the id is not left as w0's. Left as w0's, the restarted w1
    dropped its restored copy as taken by another worker, w0 then took that copy back without what
    it had queued for w1 meanwhile, and those messages were lost (bench/chaos.py, session 20: 24
    per publisher at one worker kill, the client told its session was present)."""
    import subprocess
    import sys

    from fluxmq.storage.worker_owners import LocalOwnership

    path = str(tmp_path / "owners")
    subprocess.run([sys.executable, "-c", _OTHER_WORKER, path], check=True, timeout=60)  # w1, now dead
    assert "dropped" in _RESTARTED_WORKER
    w0 = LocalOwnership(path, "n1/w0")
    restarted = None
    try:

        def w1_does_not_answer(node: str, kind: str, payload: bytes, timeout: float) -> bytes:
            raise ConnectionError(f"peer {node}: UNAVAILABLE")

        with pytest.raises(ServerUnavailable, match="does not answer"):
            ClusterSessions(w0, w1_does_not_answer).claim_session("c-dead", False, handed_to="n1/w1")
        assert w0.owned_by("c-dead") is None
        restarted = subprocess.Popen(
            [sys.executable, "-c", _RESTARTED_WORKER, path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert restarted.stdout.readline().split() == ["dropped", "[]"]  # it keeps its restored copy
        assert w0.acquire_session("c-dead") == "n1/w1"  # the client's next claim takes it over there
    finally:
        w0.close()
        if restarted is not None:
            restarted.stdin.close()
            restarted.wait(timeout=30)


def test_what_the_stand_in_forwarded_to_a_claim_that_failed_reaches_the_clients_retry(
    cluster: Cluster,
) -> None:
    """B's claim failed after A handed the session over (no quorum for the compare-and-swap): B
    refuses the client (0x88) and keeps the state; A's stand-in forwards to B what A gets meanwhile.
    The client's retry on B asks A again (the registry still names A), which answers with the copy
    of its export: what B kept beside that state is not dropped with it."""
    a, b = cluster.node("A", forwarding=True), cluster.node("B", forwarding=True)
    _claim_fails_after_the_handover(cluster, a, b)
    cluster.registry.down = False
    a.publish(Message("t", b"meanwhile", 1))  # A's stand-in forwards it to B, which keeps it
    gevent.sleep(0.01)
    new, d, present = connect(b, "c1")  # the client retries
    assert present and set(new.subscriptions) == {"t"} and cluster.registry.owners["c1"] == "B"
    assert [(topic, qos) for topic, qos, *_ in d.sent] == [("t", 1)]


BACKLOG = 10500  # messages a stalled node's peers queued for it (more than moved.MAX_QUEUED)


def _held(session) -> int:
    return len(session.inflight) + len(session.queue)


def test_a_stand_in_forwards_a_backlog_beyond_10000_messages_that_the_sessions_queue_would_hold(
    cluster: Cluster,
) -> None:
    """A node stalled for a few seconds (its etcd lease lost meanwhile) exports a session as it
    wakes, before it applied what its peers' streams queued for it during the stall: the whole
    backlog reaches the stand-in at once, before its sender runs. It holds as many as the session's
    queue would (``Broker.moved_max_queued``), not 10,000: the e2e stall of node e2 lost 372 to
    1,061 numbers there (``moved_forward_ended ... dropped=``), on main as with the take-back."""
    a = cluster.node("A", forwarding=True, max_queued_messages=2 * BACKLOG)
    b = cluster.node("B", forwarding=True, max_queued_messages=2 * BACKLOG)
    s, _, _ = connect(a, "c1")
    a.subscribe(s, "t", 1)
    new, _, present = connect(b, "c1")
    assert present
    for i in range(BACKLOG):  # no yield: the stand-in's sender has not run yet
        a.publish(Message("t", str(i).encode(), 1))
    stand_in = a._moved["c1"]
    assert stand_in.dropped == 0
    gevent.sleep(0.05)  # the sender runs: one call per MAX_QUEUED messages
    assert stand_in.forwarded == BACKLOG and _held(new) == BACKLOG


def test_what_a_failed_claim_keeps_of_a_backlog_beyond_10000_messages_reaches_the_clients_retry(
    cluster: Cluster,
) -> None:
    """The same backlog forwarded to a node whose claim failed after the hand-over (the lease of
    the node lost meanwhile): it keeps as many as the session's queue would hold
    (``ClusterSessions``' ``max_kept_moved``), and the client's retry gets them all."""
    a = cluster.node("A", forwarding=True, max_queued_messages=2 * BACKLOG)
    b = cluster.node("B", forwarding=True, max_queued_messages=2 * BACKLOG)
    _claim_fails_after_the_handover(cluster, a, b)
    cluster.registry.down = False
    for i in range(BACKLOG):
        a.publish(Message("t", str(i).encode(), 1))
    gevent.sleep(0.05)
    assert a._moved["c1"].dropped == 0 and len(b.peers.kept_moved["c1"][1]) == BACKLOG
    new, _, present = connect(b, "c1")  # the client retries
    assert present and _held(new) == BACKLOG


def _reply_lost(cluster: Cluster, a: Broker, b: Broker, qos: int = 1) -> RecordingDelivery:
    """c1 (subscribed to ``t`` at ``qos``) lives on A; B's claim takes it over, but A's reply never
    reaches B: B refuses the client (0x88), A is still the registered owner. Returns c1's delivery
    on A."""
    s, old, _ = connect(a, "c1")
    a.subscribe(s, "t", qos)
    cluster.network.lose_replies = 1
    with pytest.raises(ServerUnavailable):
        b.open_session("c1", False, 3600)
    assert old.closed_with == 0x8E and "c1" not in a.sessions and cluster.registry.owners["c1"] == "A"
    return old


def test_what_the_stand_in_forwarded_after_a_lost_takeover_reply_reaches_the_clients_retry(
    cluster: Cluster,
) -> None:
    """A handed the session over but its reply never reached B: B refuses the client (0x88) with no
    state to keep, while A's stand-in forwards to B what A gets meanwhile. The client's retry takes
    the state again from A (the copy of its export): what was forwarded meanwhile is in it."""
    a, b = cluster.node("A", forwarding=True), cluster.node("B", forwarding=True)
    _reply_lost(cluster, a, b)
    a.publish(Message("t", b"meanwhile", 1))  # A's stand-in forwards it to B
    gevent.sleep(0.01)
    new, d, present = connect(b, "c1")  # the client retries
    assert present and set(new.subscriptions) == {"t"} and cluster.registry.owners["c1"] == "B"
    assert [(topic, qos) for topic, qos, *_ in d.sent] == [("t", 1)]


def test_the_stand_in_lasts_a_grace_from_the_clients_retry_after_a_failed_claim(cluster: Cluster) -> None:
    """B's claim failed after A's export; the client's retry on B asks A again: A's stand-in lasts a
    grace from that second answer (the new claim, its import and its interest reaching the peers
    come after it), not from the first export, so what still reaches A then goes to the session."""
    a, b = cluster.node("A", forwarding=True), cluster.node("B", forwarding=True)
    a.moved_forward_for = 0.05  # the first export's grace
    _claim_fails_after_the_handover(cluster, a, b)
    cluster.registry.down = False
    a.moved_forward_for = 60.0  # the retry's
    new, d, present = connect(b, "c1")  # the client retries: A answers again
    assert present and cluster.registry.owners["c1"] == "B"
    gevent.sleep(0.1)  # past the first export's grace
    a.publish(Message("t", b"late", 1))  # a peer that does not know B's interest yet sent it to A
    gevent.sleep(0.01)
    assert [(topic, qos) for topic, qos, *_ in d.sent] == [("t", 1)]


def test_a_claim_waits_for_a_killed_worker_being_restarted_and_takes_the_session_over_from_it(
    tmp_path,
) -> None:
    """w1, owning c1, was killed -9 and the arbiter restarts it: w0's claim (no Clean Start) waits in
    its greenlet, without blocking the others, until the new w1 adopted its restored copy, then asks
    w1 for the session (a takeover, its link maybe not up yet: asked again); a Clean Start does not
    wait, it takes the id from the dead w1."""
    import subprocess
    import sys

    from fluxmq.storage.worker_owners import LocalOwnership
    from tests.storage.test_worker_owners import _KILLED_WORKER, restarted_w1

    path = str(tmp_path / "owners")
    subprocess.run([sys.executable, "-c", _KILLED_WORKER, path, "c1", "c-clean"], check=True, timeout=60)
    w0 = LocalOwnership(path, "n1/w0", restarts=lambda member: member == "n1/w1")
    asked = []

    def call(node: str, kind: str, payload: bytes, timeout: float) -> bytes:
        asked.append((node, kind, payload))
        if len(asked) == 1:
            raise ConnectionError(f"peer {node}: UNAVAILABLE")  # the link to the new w1 is not up yet
        return b""  # (the state w1 exports: none here)

    sessions = ClusterSessions(w0, call, restart_wait=30.0)
    try:
        assert sessions.claim_session("c-clean", True) is None and asked == []  # no wait
        assert w0.owned_by("c-clean") == "n1/w0"
        claim = gevent.spawn(sessions.claim_session, "c1", False)
        others = gevent.spawn(lambda: [gevent.sleep(0.01) for _ in range(10)])
        others.join(timeout=10)
        assert others.successful() and not claim.ready() and asked == []  # waiting, the hub free
        with restarted_w1(path, "c1") as dropped:
            assert dropped == ["[]"]
            assert claim.get(timeout=30) is None
        assert [node for node, kind, _ in asked] == ["n1/w1", "n1/w1"]
        assert w0.owned_by("c1") == "n1/w0"
    finally:
        w0.close()


def test_a_claim_whose_killed_worker_is_not_back_in_time_is_refused_with_0x88(tmp_path) -> None:
    """Never a fresh session while the restored copy may come back: refused (the client retries),
    the id left to the dead worker (its restart adopts it)."""
    import subprocess
    import sys

    from fluxmq.storage.worker_owners import LocalOwnership
    from tests.storage.test_worker_owners import _KILLED_WORKER

    path = str(tmp_path / "owners")
    subprocess.run([sys.executable, "-c", _KILLED_WORKER, path, "c1"], check=True, timeout=60)
    w0 = LocalOwnership(path, "n1/w0", restarts=lambda member: member == "n1/w1")
    try:

        def call(node: str, kind: str, payload: bytes, timeout: float) -> bytes:
            raise AssertionError("nobody to ask")

        with pytest.raises(ServerUnavailable, match="not back from its restart") as refused:
            ClusterSessions(w0, call, restart_wait=0.3).claim_session("c1", False)
        assert refused.value.reason_code == 0x88
        assert w0.owned_by("c1") is None  # still the dead w1's entry
    finally:
        w0.close()


def test_a_take_back_from_a_killed_worker_being_restarted_waits_for_it_instead_of_failing(tmp_path) -> None:
    """w0 handed c1 to w1 a moment ago (the registry still names w0), w1 is killed -9, its client
    is back on w0: the take-back's call fails, the id is given back to the killed w1 (not released:
    a retry before w1's restart found it nobody's, a fresh session) and the claim waits for w1's
    restart, then takes the session over from the restored copy."""
    import subprocess
    import sys

    from fluxmq.storage.worker_owners import LocalOwnership
    from tests.storage.test_worker_owners import _KILLED_WORKER, restarted_w1

    path = str(tmp_path / "owners")
    subprocess.run([sys.executable, "-c", _KILLED_WORKER, path], check=True, timeout=60)
    w0 = LocalOwnership(path, "n1/w0", restarts=lambda member: member == "n1/w1")
    asked = []

    def call(node: str, kind: str, payload: bytes, timeout: float) -> bytes:
        asked.append(node)
        if len(asked) == 1:
            raise ConnectionError(f"peer {node}: UNAVAILABLE")  # killed
        return b""

    try:
        assert w0.acquire_session("c1") is None  # (what the hand-over left)
        claim = gevent.spawn(
            ClusterSessions(w0, call, restart_wait=30.0).claim_session, "c1", False, None, "n1/w1"
        )
        gevent.sleep(0.3)
        assert not claim.ready() and asked == ["n1/w1"]  # waiting for the restart, not refused
        with restarted_w1(path, "c1") as dropped:
            assert dropped == ["[]"]  # the id is the killed w1's again: its restored copy is kept
            assert claim.get(timeout=30) is None
        assert asked == ["n1/w1", "n1/w1"] and w0.owned_by("c1") == "n1/w0"
    finally:
        w0.close()


def test_a_client_retrying_on_the_old_node_after_a_lost_takeover_reply_resumes_its_session(
    cluster: Cluster,
) -> None:
    """A handed the session to B but its reply never reached B: B refuses the client (0x88) with no
    state, while A's stand-in forwards to B what A gets meanwhile (B keeps it). The client's retry
    lands on A, still the registered owner, which takes the session back from B (``handed_to``): B
    has no state, so A resumes the copy of its export (not a new session), and B's answer brings
    back what the stand-in forwarded there. Subscriptions, the in-flight QoS 2 message, the queued
    one and the forwarded one, each once."""
    a, b = cluster.node("A", forwarding=True), cluster.node("B", forwarding=True)
    s, old, _ = connect(a, "c1")
    a.subscribe(s, "t", 2)
    a.publish(Message("t", b"inflight", 2))  # sent, not acknowledged
    a.close_session(s, old, publish_will=False)  # offline: the next one is queued
    a.publish(Message("t", b"queued", 2))
    cluster.network.lose_replies = 1
    with pytest.raises(ServerUnavailable):
        b.open_session("c1", False, 3600)
    assert "c1" not in a.sessions and cluster.registry.owners["c1"] == "A"
    a.publish(Message("t", b"meanwhile", 2))  # A's stand-in forwards it to B, which keeps it
    gevent.sleep(0.01)
    assert [len(q) for _, q in b.peers.kept_moved.values()] == [1]
    new, d, present = connect(a, "c1")  # the client retries on A
    assert present and set(new.subscriptions) == {"t"} and new.subscriptions["t"].qos == 2
    assert [(topic, qos, dup) for topic, qos, _, _, dup, _ in d.sent] == [
        ("t", 2, True),
        ("t", 2, False),
        ("t", 2, False),
    ]
    payloads = [new.inflight[pid].message.payload for pid in sorted(new.inflight)]
    assert payloads == [b"inflight", b"queued", b"meanwhile"]
    assert cluster.registry.owners["c1"] == "A" and "c1" not in b.sessions
    assert [q for _, q in b.peers.kept_moved.values()] == [[]]  # handed back
    a.publish(Message("t", b"after", 2))  # the session lives on A: no stand-in forwards it away
    gevent.sleep(0.01)
    assert d.sent[-1][:2] == ("t", 2) and len(d.sent) == 4


def test_a_take_back_whose_answer_is_lost_still_resumes_the_old_nodes_copy_at_the_next_attempt(
    cluster: Cluster,
) -> None:
    """As above, and the answer of B to A's take-back is lost too (0x88 again): the client's next
    attempt on A still resumes the copy of A's export, not a new session."""
    a, b = cluster.node("A", forwarding=True), cluster.node("B", forwarding=True)
    _reply_lost(cluster, a, b)
    cluster.network.lose_replies = 1
    with pytest.raises(ServerUnavailable):
        a.open_session("c1", False, 3600)  # the take-back's answer is lost
    new, d, present = connect(a, "c1")
    assert present and set(new.subscriptions) == {"t"}
    assert cluster.registry.owners["c1"] == "A"


def test_what_a_lost_take_back_answer_carried_reaches_the_session_once(cluster: Cluster) -> None:
    """A's reply to B is lost (B refuses, keeps what A's stand-in forwards), and so is B's answer
    to A's take-back, which carried that message: B keeps what it answered with, and A's next
    claim asks B again for it (only then: A did not get it; a claim the registry refuses before
    asking keeps that for the next). That claim gets it but fails at the registry after (0x88
    again): A keeps it with the copy and does not ask B again, so the client's last attempt
    resumes it once at QoS 2, not twice (and not never: it was lost)."""
    a, b = cluster.node("A", forwarding=True), cluster.node("B", forwarding=True)
    _reply_lost(cluster, a, b, qos=2)
    a.publish(Message("t", b"meanwhile", 2))  # A's stand-in forwards it to B, which keeps it
    gevent.sleep(0.01)
    cluster.network.lose_replies = 1
    with pytest.raises(ServerUnavailable):
        a.open_session("c1", False, 3600)  # the take-back's answer, with "meanwhile", is lost
    cluster.registry.down = True
    with pytest.raises(ServerUnavailable):
        a.open_session("c1", False, 3600)  # refused before asking B
    cluster.registry.down = False
    cluster.registry.before_cas = lambda: setattr(cluster.registry, "down", True)
    with pytest.raises(ServerUnavailable):
        a.open_session("c1", False, 3600)  # B answers again; A's claim fails after
    assert [n for n, *_ in cluster.network.takeovers] == ["A", "B", "B"]
    cluster.registry.down = False
    new, d, present = connect(a, "c1")
    assert [n for n, *_ in cluster.network.takeovers] == ["A", "B", "B"]  # not asked a third time
    assert present and set(new.subscriptions) == {"t"}
    assert [e.message.payload for e in new.inflight.values()] == [b"meanwhile"]
    assert cluster.registry.owners["c1"] == "A"


def test_a_take_back_after_a_lost_reply_never_resumes_an_older_copy_of_the_other_node(
    cluster: Cluster,
) -> None:
    """A handed the session to B (A keeps a copy), B took it on; then A's claim of it fails (B's
    reply lost) and the client retries on B, which takes it back from A. A's copy is of the first
    move, older than B's: it must not come back (the e2e run: thousands doubled and lost). B
    resumes the copy of its own export, with what was queued on B."""
    a, b = cluster.node("A", forwarding=True), cluster.node("B", forwarding=True)
    s, _, _ = connect(a, "c1")
    a.subscribe(s, "t", 1)
    on_b, d, present = connect(b, "c1")  # A -> B
    assert present
    b.close_session(on_b, d, publish_will=False)
    b.publish(Message("t", b"queued on B", 1))
    cluster.network.lose_replies = 1
    with pytest.raises(ServerUnavailable):
        a.open_session("c1", False, 3600)  # B -> A, the reply lost
    new, d2, present = connect(b, "c1")  # the client retries on B
    assert present and set(new.subscriptions) == {"t"}
    assert [e.message.payload for e in new.inflight.values()] == [b"queued on B"]
    assert cluster.registry.owners["c1"] == "B"


def test_a_claim_that_fails_at_the_registry_before_asking_leaves_the_copy_to_its_staleness_check(
    cluster: Cluster,
) -> None:
    """A handed the session to B, whose claim succeeded. A client of the id then reaches A while
    A's etcd lease is lost (the registry refuses A before any node is asked: 0x88, ``node A holds
    no live etcd lease``). Nothing moved, so A's copy of its export stays where it was, checked at
    the next claim; it is not kept as the client's state (``kept``), where no check applies: after
    the session ended on B (a Clean Start with expiry 0, its id released), the client's next
    connect to A resumed that copy (present, its old subscription) instead of starting afresh."""
    a, b = cluster.node("A", forwarding=True), cluster.node("B", forwarding=True)
    s, _, _ = connect(a, "c1")
    a.subscribe(s, "t", 1)
    on_b, d, present = connect(b, "c1")  # A -> B: B owns the session, A keeps the copy
    assert present and cluster.registry.owners["c1"] == "B"
    cluster.registry.down = True  # A's lease lost
    with pytest.raises(ServerUnavailable):
        a.open_session("c1", False, 3600)
    assert "c1" not in a.peers.kept
    cluster.registry.down = False
    clean, d2 = b.open_session("c1", True, 0)[0], RecordingDelivery()  # the client cleans it on B
    b.attach(clean, d2, 100)
    b.close_session(clean, d2, publish_will=False)  # ends: expiry 0, the id released
    gevent.sleep(0.01)
    assert "c1" not in cluster.registry.owners
    new, _, present = connect(a, "c1")
    assert not present and not new.subscriptions


def test_what_the_stand_in_sends_after_the_take_back_answer_reaches_the_resumed_session(
    cluster: Cluster,
) -> None:
    """As in the lost-reply take-back above, and A's stand-in sends B one more batch after B
    answered the take-back (its send was on the way): B passes it on to A, where the session
    resumed, instead of keeping it for a claim on B that does not come (lost: the e2e run's tail)."""
    a, b = cluster.node("A", forwarding=True), cluster.node("B", forwarding=True)
    _reply_lost(cluster, a, b, qos=2)
    new, d, present = connect(a, "c1")  # the take-back: B answered with what it kept (nothing)
    assert present and d.sent == []
    late = encode_session_state(SessionState("c1", queued=[QueuedState(Message("t", b"late", 2), 2, False)]))
    assert cluster.network.handlers["B"][MOVED_KIND]("A", late) == b"1"  # passed on to A
    assert [e.message.payload for e in new.inflight.values()] == [b"late"]
    assert [q for _, q in b.peers.kept_moved.values()] == [[]]
