"""Peers: the one routing abstraction for whatever shares this broker beyond this process.

Other nodes of a cluster (``fluxmq.cluster``, etcd + gRPC) and, later, other worker processes of
one node (``server.workers``, a local cluster without etcd) are both *peers*. The broker calls the
methods below and never imports their implementation: the node installs one with
``Broker.set_peers``. With no peers installed (``Broker.peers is None``, a single node) none of this
costs anything per message.

The contract, per concern:

* **Interest.** The broker tells its peers which filters it holds, a filter at a time, not a
  client at a time: ``interest_added`` when the first local subscription with that filter appears
  and ``interest_removed`` when the last one goes (a shared subscription's filter is its whole
  ``$share/{group}/{filter}`` string). A peer keeps one trie per remote node and forwards a message
  only to nodes with matching interest, once per node; the receiving node matches again locally.
* **Forwarding.** ``forward`` is called once per publish from a local origin, after local
  delivery was decided, with the shared groups the local router matched. It queues the message for
  every peer with matching interest (never blocking: a slow or dead peer's queue is bounded, then
  drops are counted), decides cluster-wide which node serves each shared group, and returns the
  groups this node must serve itself. A message that came *from* a peer enters through
  ``Broker.publish_from_peer`` and is never forwarded again.
* **Ownership.** ``claim_session`` runs in the connecting client's greenlet before its session is
  opened: it makes this node the only owner of the client id (compare-and-swap under a lease) and,
  when another node owned it, returns the state that node handed over (``Broker.export_session``
  there, ``Broker.import_session`` here). ``release_session`` gives the id up (its session ended, or
  the node stops gracefully).
"""

from __future__ import annotations

from typing import Protocol

from .message import Message


class Peers(Protocol):
    """What the broker needs from the rest of the cluster (or the other workers of its node)."""

    def interest_added(self, filter: str) -> None:
        """The first local subscription with ``filter`` appeared."""

    def interest_removed(self, filter: str) -> None:
        """The last local subscription with ``filter`` went."""

    def forward(self, message: Message, groups: list) -> list:
        """Queue ``message`` (published here) for every peer with matching interest; return the
        shared groups of ``groups`` (the local router's match) that this node serves itself."""

    def matches(self, topic: str) -> bool:
        """Whether a peer has interest matching ``topic`` (``forward`` would queue a message on it
        for a peer): a publish that matched nothing here is then not one nobody subscribes to."""

    def claim_session(
        self,
        client_id: str,
        clean_start: bool,
        only_from: str | None = None,
        handed_to: str | None = None,
        exported: bytes | None = None,
    ) -> bytes | None:
        """Own ``client_id`` cluster-wide (may block this greenlet). Returns the encoded session state
        the previous owner handed over, or None. Raises ``fluxmq.errors.ServerUnavailable`` when
        ownership cannot be established (no quorum, the previous owner does not answer) or, with
        ``only_from``, when another node than ``only_from`` owns it (an adoption never takes a
        session from a node its client lives on). ``handed_to``: this node exported the session to
        that node a moment ago, which may not have taken ownership yet (its claim is in progress):
        while this node still reads as the owner, the session is taken back from there.
        ``exported``: the state this node handed ``handed_to`` (the copy it keeps): returned, with
        what that node kept of the move, when that node's claim failed after the export and it holds
        no state (the client retries here rather than there). The claim takes the copy over, unless
        it fails before asking any node (``fluxmq.errors.ClaimNotStarted``: the copy stays the
        caller's)."""

    def release_session(self, client_id: str) -> None:
        """Give up ownership of ``client_id`` (its session ended here, or the node stops)."""

    def moving_in(self, client_id: str):
        """Optional: the move whose state ``claim_session`` returned, as the import needs it
        (``Broker._import_state``'s ``move``: the markers of ``fluxmq.cluster.markers``), or None.
        Never blocks."""

    def moved_in(self, client_id: str) -> None:
        """Optional: the state ``claim_session`` returned is imported here and the interest of its
        subscriptions sent to the peers: they mark their streams to both nodes, so the previous
        owner's stand-in knows when to stop forwarding (``Broker.export_session``). Never blocks."""

    def move_discarded(self, client_id: str) -> None:
        """Optional: the state ``claim_session`` returned was discarded, not imported (Clean Start,
        a session that ended with its connection, a damaged state): what the claim kept of the
        move for ``moved_in`` goes. Never blocks."""


class SharedWills(Protocol):
    """A will registry shared by the nodes of a cluster (``Broker.shared_wills``), so that a will is
    published once cluster-wide: while its session is alive here the will is recorded under this
    node; if this node dies another node publishes it; this node publishes it itself only after
    ``will_claim`` took it back. Implementations never raise and may block the calling greenlet."""

    def will_set(self, client_id: str, message: Message | None, delay: float) -> None:
        """The pending will of ``client_id``'s session here is now ``message`` (None: it has none:
        discarded by a normal DISCONNECT, or handed over with the session)."""

    def will_claim(self, client_id: str) -> bool:
        """Before this node publishes the will of ``client_id``: True when it still may (no other
        node published it meanwhile)."""
