"""A session moving between two real Brokers (Broker.export_session / import_session / open_session
with peers): one broker on a real LMDBStorage in a tmp dir, the other in memory. ``LinkPeers`` is
only the network between them (ownership in a shared dict, the takeover a direct call of the other
broker's export_session); everything else is the real broker, session and storage code."""

from __future__ import annotations

from pathlib import Path

import gevent
import gevent.event
import pytest

from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.broker.message import CONTENT_TYPE, USER_PROPERTY, Message
from fluxmq.broker.session import PersistentSession, Session, Will
from fluxmq.broker.session_state import SessionStateError
from fluxmq.errors import ServerUnavailable
from fluxmq.storage.lmdb import LMDBStorage
from tests.broker.test_session import RecordingDelivery

PROPS = {CONTENT_TYPE: "application/json", USER_PROPERTY: [("trace", "42"), ("trace", "43")]}


class LinkPeers:
    """The Peers of one broker of a two-broker test cluster."""

    def __init__(self, name: str, owners: dict, nodes: dict) -> None:
        self.name = name
        self.owners = owners
        self.nodes = nodes
        self.released: list[str] = []
        self.interest: list[str] = []
        self.claims: list[tuple[str, bool]] = []
        self.refuse = False

    def interest_added(self, filter: str) -> None:
        self.interest.append(filter)

    def interest_removed(self, filter: str) -> None:
        pass

    def matches(self, topic):
        return False

    def forward(self, message, groups):
        return groups

    def claim_session(self, client_id: str, clean_start: bool) -> bytes | None:
        self.claims.append((client_id, clean_start))
        if self.refuse:
            raise ServerUnavailable("no quorum")
        owner = self.owners.get(client_id)
        self.owners[client_id] = self.name
        if owner is None or owner == self.name:
            return None
        return self.nodes[owner].broker.export_session(client_id)

    def release_session(self, client_id: str) -> None:
        self.released.append(client_id)
        if self.owners.get(client_id) == self.name:
            del self.owners[client_id]


class Node:
    def __init__(self, name: str, owners: dict, nodes: dict, path: Path | None = None, **settings) -> None:
        self.path = path
        self.storage = LMDBStorage(path, map_size=32 << 20) if path is not None else None
        self.broker = Broker(BrokerSettings(node_id=name, **settings), self.storage)
        if self.storage is not None:
            self.broker.restore(self.storage.load())
        self.peers = LinkPeers(name, owners, nodes)
        self.broker.set_peers(self.peers)
        nodes[name] = self

    def commit(self) -> None:
        if self.storage is not None:
            self.storage.commit()

    def connect(
        self, cid: str, clean: bool = False, expiry: int = 3600, will: Will | None = None, quota: int = 100
    ) -> tuple[Session, RecordingDelivery, bool]:
        session, present = self.broker.open_session(cid, clean, expiry, will)
        d = RecordingDelivery()
        self.broker.attach(session, d, quota)
        self.commit()
        gevent.sleep(0)  # the loop turn of the CONNECT ends (the claim with it)
        return session, d, present

    def publish(self, topic: str, payload: bytes, qos: int, origin: Session | None = None, **kw) -> int:
        n = self.broker.publish(Message(topic, payload, qos, **kw), origin)
        self.commit()
        return n


@pytest.fixture
def cluster(tmp_path: Path):
    owners: dict = {}
    nodes: dict = {}
    made: list[Node] = []

    def make(name: str, durable: bool) -> Node:
        node = Node(name, owners, nodes, tmp_path / name if durable else None)
        made.append(node)
        return node

    yield make
    for node in made:
        if node.storage is not None:
            node.storage.close()


def fill(node: Node, cid: str, will: Will | None = None) -> tuple[Session, RecordingDelivery]:
    """A session on ``node`` with every kind of state: subscriptions with every option, QoS 1 and
    QoS 2 in flight (one PUBREC'd), queued QoS 1/2 behind a full window, an inbound QoS 2 id."""
    s, d, _ = node.connect(cid, will=will, quota=3)
    b = node.broker
    b.subscribe(s, "a/#", 2, no_local=True, retain_as_published=True, retain_handling=2, subscription_id=7)
    b.subscribe(s, "$share/g/b/+", 1, subscription_id=9)
    node.publish("a/1", b"one", 1, properties=dict(PROPS))
    node.publish("a/2", b"two", 2, properties=dict(PROPS))
    node.publish("a/3", b"three", 2, retain=True)
    for i in range(5):
        node.publish(f"a/q{i}", f"q{i}".encode(), 1 + i % 2, properties=dict(PROPS))
    node.publish("b/x", b"shared", 1)
    assert s.on_pubrec(2)  # PUBREC'd, PUBREL sent, PUBCOMP not yet
    s.inbound_qos2.add(77)  # an inbound QoS 2 awaiting PUBREL
    node.commit()
    assert sorted(s.inflight) == [1, 2, 3] and len(s.queue) == 6
    return s, d


def check_moved(new: Session, d: RecordingDelivery) -> None:
    """What a client reconnecting to the new node gets: in-flight resent with DUP, the PUBREL, then
    every queued message once, with their subscription ids."""
    assert set(new.inbound_qos2) == {77}
    subs = {
        f: (s.qos, s.no_local, s.retain_as_published, s.retain_handling, s.subscription_id, s.share_group)
        for f, s in new.subscriptions.items()
    }
    assert subs == {"a/#": (2, True, True, 2, 7, None), "$share/g/b/+": (1, False, False, 0, 9, "g")}
    assert d.pubrels == [2]
    assert d.sent[:2] == [("a/1", 1, False, 1, True, (7,)), ("a/3", 2, True, 3, True, (7,))]
    assert [(t, q, dup, ids) for t, q, _r, _p, dup, ids in d.sent[2:]] == [
        ("a/q0", 1, False, (7,)),
        ("a/q1", 2, False, (7,)),
        ("a/q2", 1, False, (7,)),
        ("a/q3", 2, False, (7,)),
        ("a/q4", 1, False, (7,)),
        ("b/x", 1, False, (9,)),
    ]
    assert new.inflight[1].message.properties == PROPS
    assert new.inflight[2].message.properties == PROPS and new.inflight[2].released


@pytest.mark.parametrize("durable_a, durable_b", [(True, False), (False, True), (True, True)])
def test_session_moves_with_everything_and_the_old_connection_closes_0x8E(
    cluster, durable_a, durable_b
) -> None:
    a, b = cluster("A", durable_a), cluster("B", durable_b)
    watcher, wd, _ = a.connect("watcher", clean=True, expiry=0)
    a.broker.subscribe(watcher, "will/#", 1)
    old, old_d = fill(a, "c1", Will(Message("will/c1", b"gone", 1, properties=dict(PROPS)), 0))

    new, present = b.broker.open_session("c1", False, 3600)
    b.commit()
    a.commit()
    assert present
    assert old_d.closed_with == 0x8E
    assert "c1" not in a.broker.sessions
    assert a.publish("a/after", b"x", 1) == 0  # no subscription left on A
    assert wd.sent == []  # no will: the session moved, it did not end
    assert a.peers.released == []  # ownership moves with the claim, A releases nothing
    assert a.peers.owners["c1"] == "B"
    assert isinstance(new, PersistentSession) is durable_b
    d = RecordingDelivery()
    b.broker.attach(new, d, 100)
    check_moved(new, d)
    if durable_a:  # nothing of the session is left in A's storage
        assert "c1" not in a.storage.load().sessions


def test_a_moved_session_is_written_through_to_lmdb(cluster, tmp_path: Path) -> None:
    a, b = cluster("A", False), cluster("B", True)
    fill(a, "c1", Will(Message("will/c1", b"gone", 1), 30))
    new, present = b.broker.open_session("c1", False, 3600)
    b.commit()
    stored = b.storage.load().sessions["c1"]
    assert stored.expiry_interval == 3600
    assert sorted(stored.inflight) == [1, 2, 3] and stored.inflight[2][4]  # released
    assert stored.inbound_qos2 == {77}
    assert stored.queue.count == 6
    assert {f for f, *_ in stored.subscriptions} == {"a/#", "$share/g/b/+"}
    assert ("a/#", 2, True, True, 2, 7) in stored.subscriptions
    # A restart of B (a new Broker on the same LMDB) has the session as it was moved.
    b.storage.close()
    storage = LMDBStorage(tmp_path / "B", map_size=32 << 20)
    try:
        again = Broker(BrokerSettings(), storage)
        again.restore(storage.load())
        session = again.sessions["c1"]
        d = RecordingDelivery()
        again.attach(session, d, 100)
        check_moved(session, d)
    finally:
        storage.close()
    b.storage = None


def test_no_local_still_holds_after_the_move(cluster) -> None:
    a, b = cluster("A", True), cluster("B", False)
    s, _d, _ = a.connect("c1")
    a.broker.subscribe(s, "n/#", 1, no_local=True)
    new, _ = b.broker.open_session("c1", False, 3600)
    d = RecordingDelivery()
    b.broker.attach(new, d, 100)
    assert b.publish("n/1", b"own", 1, origin=new) == 0  # its own publish is not sent back
    assert b.publish("n/2", b"other", 1) == 1
    assert [t for t, *_ in d.sent] == ["n/2"]


def test_clean_start_discards_the_moved_state_and_publishes_the_old_connection_will(cluster) -> None:
    """As a local takeover with Clean Start: the session ends, so the will of the connection that
    was open goes (once, on the new node); the old connection is closed all the same."""
    a, b = cluster("A", True), cluster("B", False)
    watcher, wd, _ = b.connect("watcher", clean=True, expiry=0)
    b.broker.subscribe(watcher, "will/#", 1)
    _, old_d = fill(a, "c1", Will(Message("will/c1", b"gone", 1), 0))
    new, present = b.broker.open_session("c1", True, 3600)
    assert not present and old_d.closed_with == 0x8E
    assert new.subscriptions == {} and not new.inflight and not new.queue and not new.inbound_qos2
    assert "c1" not in a.broker.sessions
    assert [t for t, *_ in wd.sent] == ["will/c1"]


def test_resuming_a_moved_offline_session_cancels_its_pending_will(cluster) -> None:
    a, b = cluster("A", True), cluster("B", True)
    watcher, wd, _ = b.connect("watcher", clean=True, expiry=0)
    b.broker.subscribe(watcher, "will/#", 1)
    s, d, _ = a.connect("c1", will=Will(Message("will/c1", b"gone", 1), 60))
    a.broker.close_session(s, d, True)  # offline, will pending for 60 s
    a.commit()
    assert a.broker.sessions["c1"].will is not None
    new, present = b.broker.open_session("c1", False, 3600)
    b.commit()
    assert present and new.will is None and new.timer is None
    assert b.storage.load().sessions["c1"].will is None
    assert wd.sent == []


def test_import_session_rebuilds_an_offline_session_with_its_timers(cluster) -> None:
    a, b = cluster("A", True), cluster("B", False)
    s, d, _ = a.connect("c1", expiry=600, will=Will(Message("will/c1", b"gone", 1), 30))
    a.broker.subscribe(s, "x", 1)
    a.broker.close_session(s, d, True)
    blob = a.broker.export_session("c1")
    assert "c1" not in a.broker.sessions
    session = b.broker.import_session("c1", blob)
    assert session.delivery is None and session.will is not None and session.will.delay == 30
    assert session.timer is not None  # will delay / expiry keep counting here
    assert b.broker.sessions["c1"] is session and b.publish("x", b"m", 1) == 1
    with pytest.raises(SessionStateError):
        b.broker.import_session("other", blob)
    with pytest.raises(SessionStateError):
        b.broker.import_session("c1", blob[:-3])


def test_a_refused_claim_changes_nothing_and_reaches_the_caller(cluster) -> None:
    a = cluster("A", True)
    s, d, _ = a.connect("c1")
    a.peers.refuse = True
    with pytest.raises(ServerUnavailable) as err:
        a.broker.open_session("c1", False, 3600)
    assert err.value.reason_code == 0x88
    assert a.broker.sessions["c1"] is s and s.delivery is d and d.closed_with is None


def test_a_damaged_handed_over_state_gives_a_new_session(cluster) -> None:
    a, b = cluster("A", True), cluster("B", False)
    a.connect("c1")
    b.peers.claim_session = lambda cid, clean: b"FXSS\x01garbage"
    new, present = b.broker.open_session("c1", False, 3600)
    assert not present and new.subscriptions == {}


def test_ownership_is_released_when_a_session_ends_and_at_the_end_of_a_stop(cluster) -> None:
    a = cluster("A", True)
    s, d, _ = a.connect("clean", clean=True, expiry=0)
    a.broker.close_session(s, d, False)  # a session with expiry 0 ends with its connection
    assert a.peers.released == ["clean"]
    s, d, _ = a.connect("kept")
    a.broker.close_session(s, d, False)
    assert a.peers.released == ["clean"]  # a persistent session lives on offline
    # Clean Start over a session held here ends it, but the client id stays owned by the claim.
    s, d, _ = a.connect("kept", clean=True)
    assert a.peers.released == ["clean"] and a.peers.owners["kept"] == "A"
    a.connect("other")
    a.broker.shutdown()
    assert a.peers.released == ["clean"]  # persistent sessions stay takeable while the node drains
    a.broker.release_sessions()
    assert sorted(a.peers.released) == ["clean", "kept", "other"]


def test_set_peers_replays_the_filters_held(cluster, tmp_path: Path) -> None:
    a = cluster("A", True)
    s, _, _ = a.connect("c1")
    a.broker.subscribe(s, "x/#", 1)
    a.broker.subscribe(s, "$share/g/y", 1)
    peers = LinkPeers("A", {}, {})
    a.broker.set_peers(peers)
    assert sorted(peers.interest) == ["$share/g/y", "x/#"]


def test_without_peers_nothing_is_claimed(tmp_path: Path) -> None:
    broker = Broker(BrokerSettings())
    assert broker.peers is None
    session, present = broker.open_session("c1", False, 3600)
    assert not present and broker._claiming == {}


def test_an_export_waits_for_a_claim_of_the_same_client_id_in_progress(cluster) -> None:
    """A takeover request that arrives while a connection here is still claiming the client id
    (its claim blocked on the network) gets the session that connection opens, not "no session"."""
    a = cluster("A", True)
    a.broker.claim_wait = 30.0  # far beyond the test's own waits
    gate = gevent.event.Event()
    real_claim = a.peers.claim_session

    def slow_claim(cid: str, clean: bool):
        gate.wait(5)
        return real_claim(cid, clean)

    a.peers.claim_session = slow_claim
    deliveries: list[RecordingDelivery] = []

    def connect() -> None:
        session, _ = a.broker.open_session("c1", False, 3600)
        deliveries.append(RecordingDelivery())
        a.broker.attach(session, deliveries[0], 100)
        a.broker.subscribe(session, "t", 1)

    g1 = gevent.spawn(connect)
    gevent.sleep(0)
    g2 = gevent.spawn(a.broker.export_session, "c1")
    gevent.sleep(0.01)
    assert not g2.ready()  # waiting for the claim
    gate.set()
    blob = g2.get(timeout=5)
    g1.get(timeout=5)
    assert blob is not None and deliveries[0].closed_with == 0x8E
    moved = Broker(BrokerSettings()).import_session("c1", blob)
    assert set(moved.subscriptions) == {"t"}


def test_a_connection_whose_session_was_taken_before_it_attached_is_closed_as_taken_over(cluster) -> None:
    """Another node's CONNECT of the same client id takes the session between ``open_session`` and
    ``attach`` here (a cluster's shared will is written to etcd in between, which yields, and the
    claim has ended): the export finds no connection to close, so ``attach`` must not bind this
    one to the session that left, or both clients live (tests/e2e/test_cluster_etcd.py's race)."""
    a, b = cluster("A", True), cluster("B", False)
    session, present = a.broker.open_session("c1", False, 3600)
    assert not present
    gevent.sleep(0)  # the claim's loop turn ends before the attach
    other, present_b = b.broker.open_session("c1", False, 3600)  # B claims it: A exports
    assert present_b and "c1" not in a.broker.sessions
    late = RecordingDelivery()
    assert a.broker.attach(session, late, 100) is False
    assert late.closed_with == 0x8E and session.delivery is None
    assert a.broker.connected == 0
    d = RecordingDelivery()
    assert b.broker.attach(other, d, 100)  # the later CONNECT holds the session
    assert b.peers.owners["c1"] == "B" and d.closed_with is None


def test_a_damaged_queued_entry_changes_nothing_on_a_memory_node(cluster) -> None:
    """An entry passed on as stored (framing checked only) that does not decode is found before the
    memory node changes anything: the import is refused and the session held here stays."""
    a, b = cluster("A", True), cluster("B", False)
    s, _, _ = a.connect("c1")
    a.broker.subscribe(s, "t", 1)
    a.broker.close_session(s, s.delivery, False)
    a.publish("t", b"p", 1, properties={CONTENT_TYPE: "text/plain"})
    blob = bytearray(a.broker.export_session("c1"))
    at = blob.index(b"\x03\x01" + (10).to_bytes(4, "little") + b"text/plain")
    blob[at + 1] = 9  # an unknown property kind inside the entry
    here, _, _ = b.connect("c1")
    with pytest.raises(SessionStateError):
        b.broker.import_session("c1", bytes(blob))
    assert b.broker.sessions["c1"] is here and here.delivery is not None


def test_a_repeated_takeover_request_gets_the_same_state_until_the_id_is_claimed(cluster) -> None:
    """The reply to a takeover can be lost on the way: the old owner, still the registered owner,
    answers the repeated request with the same state (for ``exported_keep`` seconds), not "no session"."""
    a = cluster("A", True)
    s, _, _ = a.connect("c1")
    a.broker.subscribe(s, "t", 1)
    blob = a.broker.export_session("c1")
    assert a.broker.export_session("c1") == blob
    assert a.broker.export_session("other") is None
    a.broker.exported_keep = 0.0
    assert a.broker.export_session("c1") is None  # kept only for a while
    a.broker.exported_keep = 30.0
    a.connect("c2")
    assert a.broker.export_session("c2") is not None
    again, _, _ = a.connect("c2", clean=True, expiry=0)  # the client is back here: claimed again
    a.broker.close_session(again, again.delivery, False)  # and its new session ends
    assert "c2" not in a.broker.sessions
    assert a.broker.export_session("c2") is None  # the copy went with the new claim


def test_an_export_refuses_while_a_claim_here_takes_too_long(cluster) -> None:
    a = cluster("A", True)
    a.broker.claim_wait = 0.01
    gate = gevent.event.Event()
    a.peers.claim_session = lambda cid, clean: gate.wait(5) and None
    g = gevent.spawn(a.broker.open_session, "c1", False, 3600)
    gevent.sleep(0)
    with pytest.raises(ServerUnavailable):
        a.broker.export_session("c1")
    gate.set()
    g.get(timeout=5)


def test_the_copies_of_exported_states_are_bounded(cluster) -> None:
    a = cluster("A", False)
    a.broker.exported_max = 3
    for i in range(5):
        a.connect(f"c{i}")
        a.broker.export_session(f"c{i}")
    assert list(a.broker._exported) == ["c2", "c3", "c4"]
    a.broker.exported_max_bytes = 1
    a.connect("c5")
    a.broker.export_session("c5")
    assert a.broker._exported == {} and a.broker._exported_bytes == 0
