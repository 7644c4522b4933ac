"""The markers of a session's move (``fluxmq.cluster.markers``) between real brokers and
``ClusterPeers``: the old node's stand-in forwards what came from a node whose marker had not
arrived and ends once every node's is in; the taking node's gate gives the session only what came
after its origin's marker (what came before, the old node forwards).

The links are stand-ins that record what is queued for each peer; the batches are real (built as a
link builds them, applied as a peer's stream applies them)."""

from __future__ import annotations

import gevent

from fluxmq.broker.broker import Broker
from fluxmq.broker.message import Message
from fluxmq.broker.moved import MoveGate
from fluxmq.broker.session_state import decode_session_state
from fluxmq.cluster.batch import MARKER_GROUP, Outgoing, build_batch, decode_item, decode_items, marker_item
from fluxmq.cluster.markers import APPLIED, REQUEST, SWITCH, WITHDRAWN, decode_marker, encode_marker
from fluxmq.cluster.peers import ClusterPeers
from fluxmq.storage.records import encode_message
from tests.broker.test_session import RecordingDelivery
from tests.cluster.test_peers import StandInTransport

TOKEN = "B/1/1"


def items(*entries) -> list[Outgoing]:
    """Batch entries: a Message, an item as queued (``Outgoing``), or a (kind, old, new) marker of
    TOKEN."""
    out = []
    for e in entries:
        if isinstance(e, Outgoing):
            out.append(e)
        elif isinstance(e, Message):
            out.append(Outgoing(encode_message(e), (), True, None))
        else:
            out.append(marker_item(encode_marker(e[0], TOKEN, e[1], e[2])))
    return out


class Streams:
    """Each sender's batches to one ``ClusterPeers``, numbered in order."""

    def __init__(self, peers: ClusterPeers) -> None:
        self.peers = peers
        self.seq: dict[str, int] = {}

    def apply(self, sender: str, *entries) -> None:
        seq = self.seq[sender] = self.seq.get(sender, 0) + 1
        self.peers.apply_batch(build_batch(sender, 1, seq, items(*entries))[0])


def markers_queued(peers: ClusterPeers, node: str) -> list[str]:
    """The kinds of the markers queued for ``node``, in order."""
    kinds = []
    for e in peers.transport.links[node].queued:
        if getattr(e, "groups", ()) == (MARKER_GROUP,):
            message = decode_item(build_batch("x", 1, 1, [e])[0].items, 0, 0.0)[0]
            kinds.append(decode_marker(message.payload)[0])
    return kinds


def payloads(delivery: RecordingDelivery, session) -> list:
    return [e.message.payload for e in session.inflight.values()]


def test_a_marker_item_is_framed_among_the_messages_and_never_decoded_as_one() -> None:
    entries = items(Message("t", b"1", 1), (APPLIED, "A", "B"), Message("t", b"2", 1))
    data = build_batch("P", 1, 1, entries)[0].items
    assert [m.payload for m, _g, _l in decode_items(data)] == [b"1", b"2"]
    i, seen = 0, []
    while i < len(data):
        message, groups, _l, i = decode_item(data, i, 0.0)
        seen.append(decode_marker(message.payload) if groups == (MARKER_GROUP,) else message.payload)
    assert seen == [b"1", (APPLIED, TOKEN, "A", "B"), b"2"]
    at = 14 + len(encode_message(Message("t", b"1", 1)))
    assert data[at + 13] == 1  # it names a group: never a plain item for the C relay


def old_node():
    """Node A: c1 subscribed to t/# at QoS 2, exported to B with the move's markers counted (the
    cluster's nodes: A, B, P). Returns (broker, its ClusterPeers, the blobs sent to B, streams)."""
    a = Broker()
    peers = ClusterPeers("A", a, StandInTransport("B", "P"))
    a.set_peers(peers)
    s, _ = a.open_session("c1", True, 3600)
    a.attach(s, RecordingDelivery(), 100)
    a.subscribe(s, "t/#", 2)
    sent: list[bytes] = []
    assert a.export_session("c1", "B", sent.append, peers.markers.move_out(TOKEN))
    return a, peers, sent, Streams(peers)


def forwarded(sent: list[bytes]) -> list[bytes]:
    gevent.sleep(0)  # the stand-in's sender runs
    return [q.message.payload for blob in sent for q in decode_session_state(blob).queued]


def test_the_stand_in_forwards_what_came_before_each_nodes_marker_and_ends_when_all_are_in() -> None:
    a, peers, sent, streams = old_node()
    streams.apply("P", Message("t/1", b"p1", 2))  # P routed it by its old view: only A has it
    a.publish(Message("t/1", b"a1", 2))  # A's own, before it applied B's request
    streams.apply("B", Message("t/1", b"b1", 2), (SWITCH, "A", "B"), Message("t/1", b"b2", 2))
    assert forwarded(sent) == [b"p1", b"a1", b"b1"]  # b2: B delivers it to c1 itself
    streams.apply("B", (REQUEST, "A", "B"))  # A counts itself and marks its stream to B
    assert markers_queued(peers, "B") == [APPLIED] and markers_queued(peers, "P") == []
    a.publish(Message("t/1", b"a2", 2))  # A sends it to B (B's interest applied): not forwarded
    assert "c1" in a._moved and "t/#" in a._interest  # P's marker is not in yet
    streams.apply("P", Message("t/1", b"p2", 2), (APPLIED, "A", "B"), Message("t/1", b"p3", 2))
    assert forwarded(sent) == [b"p1", b"a1", b"b1", b"p2"]
    assert "c1" not in a._moved and "t/#" not in a._interest  # every node's marker: ended at once


def test_a_third_node_marks_its_streams_to_both_nodes_when_it_applies_the_request() -> None:
    p = Broker()
    peers = ClusterPeers("P", p, StandInTransport("A", "B"))
    p.set_peers(peers)
    peers.transport.links["A"].queued.append("before")  # queued before: stays before the marker
    Streams(peers).apply("B", (REQUEST, "A", "B"))
    assert markers_queued(peers, "A") == [APPLIED] and markers_queued(peers, "B") == [APPLIED]
    assert peers.transport.links["A"].queued[0] == "before"
    assert peers.markers.received == 1 and peers.markers.sent == 2


class Sessions:
    """``ClusterSessions`` as ``ClusterPeers`` asks it for a claim: the state handed over by A."""

    def __init__(self, peers: ClusterPeers, blob: bytes) -> None:
        self.peers = peers
        self.blob = blob

    def claim_session(self, client_id, clean_start, only_from=None, handed_to=None, exported=None):
        return self.blob

    def moving_in(self, client_id):
        return self.peers.markers.move_in(TOKEN, "A")

    def moved_in(self, client_id):
        self.peers.markers.move_in(TOKEN, "A").announce()

    def release_session(self, client_id):
        pass


def taking_node():
    """Node B: c1's state from A imported with the move's markers (peers A and P); c1 online."""
    a = Broker()
    s, _ = a.open_session("c1", True, 3600)
    a.subscribe(s, "t/#", 2)
    blob = a.export_session("c1")
    b = Broker()
    peers = ClusterPeers("B", b, StandInTransport("A", "P"))
    b.set_peers(peers)
    peers.sessions = Sessions(peers, blob)
    session, present = b.open_session("c1", False, 3600)
    assert present
    b.attach(session, RecordingDelivery(), 100)
    return b, peers, session, Streams(peers)


def test_the_taking_node_gates_the_session_until_each_peers_marker_is_in() -> None:
    b, peers, session, streams = taking_node()
    # SWITCH to A first (before the subscriptions entered the router), then the request to both
    assert markers_queued(peers, "A") == [SWITCH, REQUEST] and markers_queued(peers, "P") == [REQUEST]
    assert isinstance(b.router.route("t/1").targets[0][0], MoveGate)
    streams.apply("P", Message("t/1", b"p1", 2))  # routed by P's old view: A forwards it
    b.publish(Message("t/1", b"b1", 2))  # B's own: to c1 at once
    streams.apply("P", (APPLIED, "A", "B"), Message("t/1", b"p2", 2))
    streams.apply("A", Message("t/1", b"a1", 2))  # A's before its marker: A's stand-in forwards it
    assert payloads(session.delivery, session) == [b"b1", b"p2"]
    assert "c1" in b._gates
    streams.apply("A", (APPLIED, "A", "B"), Message("t/1", b"a2", 2))
    assert payloads(session.delivery, session) == [b"b1", b"p2", b"a2"]
    assert "c1" not in b._gates and b.router.route("t/1").targets[0][0] is session  # opened


def test_what_the_old_node_forwards_reaches_the_gated_session() -> None:
    b, _peers, session, _streams = taking_node()
    from fluxmq.broker.session_state import QueuedState, SessionState, encode_session_state

    blob = encode_session_state(
        SessionState("c1", queued=[QueuedState(Message("t/1", b"f1", 2), 2, False, None)])
    )
    assert b.deliver_moved(blob) == 1
    assert payloads(session.delivery, session) == [b"f1"]


def test_the_gate_opens_after_the_grace_when_a_marker_never_comes() -> None:
    b = Broker()
    b.moved_forward_for = 0.05
    a = Broker()
    s, _ = a.open_session("c1", True, 3600)
    a.subscribe(s, "t/#", 1)
    blob = a.export_session("c1")
    peers = ClusterPeers("B", b, StandInTransport("A"))
    b.set_peers(peers)
    peers.sessions = Sessions(peers, blob)
    session, _ = b.open_session("c1", False, 3600)
    assert "c1" in b._gates
    gevent.sleep(0.15)
    assert "c1" not in b._gates and b.router.route("t/1").targets[0][0] is session


SHARE = "$share/g/t/#"


def group_item(payload: bytes) -> Outgoing:
    """A message of SHARE's group the sender gave this node (a batch item naming the group)."""
    return Outgoing(encode_message(Message("t/1", payload, 2)), (SHARE,), False, None)


def withdrawal_applied(sender: str) -> Outgoing:
    """``sender``'s answer to A's WITHDRAWN marker: it applied A's withdrawal of the group."""
    return marker_item(encode_marker(APPLIED, TOKEN + "w", "A", "A"))


def shared_old_node(live_member: bool = False):
    """Node A: c1, the only member of SHARE here (or, ``live_member``, beside c2 online), exported
    to B with the move's markers counted (nodes A, B, P)."""
    a = Broker()
    peers = ClusterPeers("A", a, StandInTransport("B", "P"))
    a.set_peers(peers)
    s, _ = a.open_session("c1", True, 3600)
    a.attach(s, RecordingDelivery(), 100)
    a.subscribe(s, SHARE, 2)
    other = None
    if live_member:
        other, _ = a.open_session("c2", True, 0)
        a.attach(other, RecordingDelivery(), 100)
        a.subscribe(other, SHARE, 2)
    sent: list[bytes] = []
    assert a.export_session("c1", "B", sent.append, peers.markers.move_out(TOKEN))
    return a, peers, sent, Streams(peers), other


def forwarded_shares(sent: list[bytes]) -> list[tuple[str, bytes]]:
    gevent.sleep(0)
    out = []
    for blob in sent:
        state = decode_session_state(blob)
        for q in state.queued:
            out.append((state.subscriptions[0].filter if state.subscriptions else None, q.message.payload))
    return out


def test_a_moved_only_member_of_a_group_stands_in_until_every_peer_applied_the_withdrawal() -> None:
    """A peer gives a group's message to one node: after every node's marker of the move it may
    still give it to A until it applied A's withdrawal, so A's stand-in keeps the session's share
    (forwarding every group message it gets) until each peer's answer to WITHDRAWN is in."""
    a, peers, sent, streams, _ = shared_old_node()
    assert SHARE in a._interest  # the stand-in holds A's interest in the group
    streams.apply("P", group_item(b"p1"))  # P gave it to A: the stand-in forwards it
    a.publish(Message("t/1", b"a1", 2))  # A's own (B's interest unknown here yet)
    streams.apply("B", (SWITCH, "A", "B"), (REQUEST, "A", "B"))
    streams.apply("P", group_item(b"p2"), (APPLIED, "A", "B"))
    # every node's marker is in: A's interest in the group goes, its share stays in the router
    assert SHARE not in a._interest and "c1" in a._moved
    assert markers_queued(peers, "P") == [WITHDRAWN] and markers_queued(peers, "B") == [APPLIED, WITHDRAWN]
    streams.apply("P", group_item(b"p3"))  # P had not applied the withdrawal: still forwarded
    streams.apply("P", withdrawal_applied("P"))
    assert "c1" in a._moved  # B's answer is not in yet
    streams.apply("B", withdrawal_applied("B"))
    assert "c1" not in a._moved and not a.router.route("t/1").groups
    assert forwarded_shares(sent) == [(SHARE, b"p1"), (SHARE, b"a1"), (SHARE, b"p2"), (SHARE, b"p3")]


def test_a_peer_answers_a_withdrawn_marker_to_the_old_node_only() -> None:
    p = Broker()
    peers = ClusterPeers("P", p, StandInTransport("A", "B"))
    p.set_peers(peers)
    Streams(peers).apply("A", (WITHDRAWN, "A", "A"))
    assert markers_queued(peers, "A") == [APPLIED] and markers_queued(peers, "B") == []


def test_a_live_member_on_the_old_node_takes_the_groups_messages_before_the_stand_in() -> None:
    a, _peers, sent, streams, other = shared_old_node(live_member=True)
    streams.apply("P", group_item(b"p1"), group_item(b"p2"))
    assert payloads(other.delivery, other) == [b"p1", b"p2"] and forwarded_shares(sent) == []


def test_a_groups_share_forwarded_to_the_taking_node_reaches_the_session_by_its_shared_subscription() -> None:
    """B: c1 holds SHARE and t/1 on its own; a message forwarded as the group's share goes to c1 once
    by the shared subscription (its own would have had it through A's stand-in separately)."""
    from fluxmq.broker.session_state import QueuedState, SessionState, SubscriptionState, encode_session_state

    a = Broker()
    s, _ = a.open_session("c1", True, 3600)
    a.subscribe(s, SHARE, 1)
    a.subscribe(s, "t/#", 2, subscription_id=7)
    blob = a.export_session("c1")
    b = Broker()
    peers = ClusterPeers("B", b, StandInTransport("A", "P"))
    b.set_peers(peers)
    peers.sessions = Sessions(peers, blob)
    session, _ = b.open_session("c1", False, 3600)
    b.attach(session, RecordingDelivery(), 100)
    share = encode_session_state(
        SessionState(
            "c1",
            subscriptions=[SubscriptionState(SHARE, 1, share_group="g")],
            queued=[QueuedState(Message("t/1", b"f1", 2), 2, False, None)],
        )
    )
    assert b.deliver_moved(share) == 1
    [entry] = session.inflight.values()
    assert entry.message.payload == b"f1" and entry.qos == 1 and not entry.subscription_ids


def test_a_stand_in_asked_again_by_the_claims_retry_counts_the_markers_of_the_retried_move() -> None:
    """B's claim failed after A's export (no marker of that move is ever sent); the client's retry
    asks A again with a new token and B announces that move. A's stand-in counts its markers: after
    P's it forwards nothing more of P's (P sends it to B itself: at QoS 2 a second copy) and it
    ends once every node's is in, not at the end of its grace."""
    a, peers, sent, streams = old_node()
    again = "B/2/2"
    assert a.export_session("c1", "B", sent.append, peers.markers.move_out(again))

    def marker(kind: str) -> Outgoing:
        return marker_item(encode_marker(kind, again, "A", "B"))

    streams.apply("B", marker(SWITCH), marker(REQUEST))  # B's own publishes go to B; A counts itself
    streams.apply("P", Message("t/1", b"p1", 2), marker(APPLIED), Message("t/1", b"p2", 2))
    assert forwarded(sent) == [b"p1"]
    assert "c1" not in a._moved and "t/#" not in a._interest
