"""Markers of a session's move in the ordered streams between nodes: each message reaches the moved
session once (docs/cluster.rst, "What is published during the move").

A session S moves from node A (the old owner, whose stand-in forwards to B what still reaches A for
S: ``fluxmq.broker.moved``) to node B. Every node routes a message by its own view of the others'
interest, and that view changes when it applies a batch of B's. A marker, an item of a batch
(``batch.MARKER_GROUP``, never delivered: the C relay leaves it to ``ClusterPeers``), says in a stream
"every message before me was routed without B's interest, every one after with it":

* ``SWITCH`` (B -> A, when S's subscriptions enter B's router): B's own publishes reach S on B
  from then on; A's stand-in forwards B's messages before it only.
* ``REQUEST`` (B -> every peer, after the import and B's interest changes, so behind them in each
  stream): the peer has applied B's interest when it reads it, and sends ``APPLIED`` to A and to B,
  ordered between what it routed before and after. A, reading it, counts itself (its own publishes
  go to B from then on) and sends ``APPLIED`` to B.
* ``APPLIED`` (P -> A, P -> B): at A, the stand-in drops P's messages after it (P sends them to B
  itself) and ends once every node's marker is in; at B, the gate gives S P's messages after it
  only (before it, P routed them to A alone or to both: A's stand-in forwards them).

A moved session's shared subscriptions (a peer gives each group message to one node: A or B, never
both) stand in on A until every node routes by B's interest (the markers above), then A withdraws
its interest in their groups and sends ``WITHDRAWN`` (A -> every peer, behind the withdrawal in
each stream); a peer reading it has applied the withdrawal and sends ``APPLIED`` back to A, after
every group message it gave A before: A's shares then end (``Broker._stand_in_done``).

The origin of a message is the peer whose batch is being applied (``ClusterPeers.applying``, set
per batch), or this node: no field per message. A marker that cannot be queued (a full queue) or
a peer that never answers leaves the stand-in and the gate their grace (``Broker.moved_forward_for``).
"""

from __future__ import annotations

import logging

from .batch import marker_item

log = logging.getLogger("fluxmq.cluster.markers")

SWITCH = "S"
REQUEST = "R"
APPLIED = "A"
WITHDRAWN = "W"


def encode_marker(kind: str, token: str, old: str, new: str) -> bytes:
    """A marker item's blob: ``kind``, the move's token, the old node and the taking node."""
    return "\x00".join((kind, token, old, new)).encode()


def decode_marker(blob: bytes) -> tuple[str, str, str, str]:
    """(kind, token, old node, taking node); ValueError when damaged."""
    kind, token, old, new = bytes(blob).decode().split("\x00")
    return kind, token, old, new


class MoveOut:
    """What the old node's stand-in needs of the cluster (``Broker.export_session``'s ``move``)."""

    __slots__ = ("token", "nodes", "own")

    def __init__(self, token: str, nodes, own: str) -> None:
        self.token = token
        self.nodes = frozenset(nodes)  # every node, this one included: whose markers end it
        self.own = own


class MoveIn:
    """What the taking node's import needs of the cluster (``Broker._import_state``'s ``move``)."""

    __slots__ = ("token", "peers", "own", "old", "_markers")

    def __init__(self, markers: MoveMarkers, token: str, old: str) -> None:
        self._markers = markers
        self.token = token
        self.own = markers.own
        self.peers = frozenset(markers.links())  # whose markers open the gate
        self.old = old

    def switch(self) -> None:
        """S's subscriptions enter the router here now: tell the old node, in order."""
        self._markers.send(self.old, SWITCH, self.token, self.old, self.own)

    def announce(self) -> None:
        """Imported, its interest sent: every peer marks its streams to both nodes."""
        for node in list(self._markers.links()):
            self._markers.send(node, REQUEST, self.token, self.old, self.own)


class MoveMarkers:
    """A node's markers: sent into its links, and those its peers' batches carry applied
    (``ClusterPeers``: ``peers.transport.links``, ``peers.broker``, ``peers.node_id``)."""

    def __init__(self, peers) -> None:
        self.peers = peers
        self.sent = 0
        self.received = 0
        self.unsent = 0  # markers a full queue refused (the move falls back to the grace)

    @property
    def own(self) -> str:
        return self.peers.node_id

    def links(self) -> dict:
        return self.peers.transport.links

    def nodes(self) -> frozenset:
        """Every node of the cluster as this one knows it, itself included."""
        return frozenset(self.links()) | {self.own}

    def move_out(self, token: str) -> MoveOut:
        return MoveOut(token, self.nodes(), self.own)

    def move_in(self, token: str, old: str) -> MoveIn:
        return MoveIn(self, token, old)

    def send(self, node: str, kind: str, token: str, old: str, new: str) -> bool:
        """Queue a marker for ``node`` behind everything queued for it so far."""
        link = self.links().get(node)
        if link is None:
            return False
        if not link.enqueue(marker_item(encode_marker(kind, token, old, new))):
            self.unsent += 1
            log.warning("move_marker_not_queued", extra={"peer": node, "kind": kind, "token": token})
            return False
        self.sent += 1
        return True

    def withdrawn(self, token: str) -> frozenset:
        """This node withdrew its interest in a moved session's shared subscriptions (queued in
        every link before this): ask every peer to mark its stream back once it applied that
        (``WITHDRAWN``, the move ``token``); returns the peers asked."""
        asked = set()
        for node in list(self.links()):
            if self.send(node, WITHDRAWN, token, self.own, self.own):
                asked.add(node)
        return frozenset(asked)

    def received_from(self, sender: str, blob: bytes) -> None:
        """A marker in ``sender``'s batch, applied in its place among the batch's messages."""
        try:
            kind, token, old, new = decode_marker(blob)
        except (ValueError, UnicodeDecodeError):
            log.warning("bad_move_marker", extra={"peer": sender})
            return
        self.received += 1
        own = self.own
        broker = self.peers.broker
        if kind == REQUEST:
            if own == old:
                # this node's own publishes go to the taking node from now on (its interest was
                # applied before this request in the same stream)
                broker.move_marked(token, own)
                self.send(new, APPLIED, token, old, new)
            else:
                self.send(old, APPLIED, token, old, new)
                self.send(new, APPLIED, token, old, new)
        elif kind in (SWITCH, APPLIED):
            broker.move_marked(token, sender)
        elif kind == WITHDRAWN:
            # this node applied the sender's withdrawal (earlier in this stream): it gives the
            # sender no group's message from now on
            self.send(old, APPLIED, token, old, new)
