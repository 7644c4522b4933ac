"""What the CoAP bridge keeps of each peer between its requests (RFC 7959): the Block1 parts of a
publish sent in blocks (§2.5), and the Block2 representations a peer's later blocks are served from
(§2.4), one ``PeerBodies`` each.

Both are bounded the same way: every peer's bodies together in bytes and in peers (the least
recently used peer goes first; the most recent one is always kept, bounded by the message size),
and a peer silent for ``lifetime`` (``EXCHANGE_LIFETIME``, RFC 7252 §4.8.2) loses its bodies: a
client that went away in the middle of a transfer leaves nothing behind for long.
"""

from __future__ import annotations

from collections import OrderedDict

EXCHANGE_LIFETIME = 247.0  # seconds (RFC 7252 §4.8.2)


class _Held:
    """One peer's bodies, when the peer last used them, and their bytes."""

    __slots__ = ("bodies", "used", "size")

    def __init__(self, bodies: dict, used: float, size: int) -> None:
        self.bodies = bodies
        self.used = used
        self.size = size


class PeerBodies:
    """peer key -> {body key -> body}, least recently used peers first, bounded (see the module).

    ``lifetime`` may be set on the object (tests); ``bound`` is called on every ``put`` and by the
    bridge's timer, so a silent peer's bodies go without a request of its own."""

    def __init__(self, max_bytes: int, max_peers: int, lifetime: float = EXCHANGE_LIFETIME) -> None:
        self.max_bytes = max_bytes
        self.max_peers = max_peers
        self.lifetime = lifetime
        self.bytes = 0
        self._peers: OrderedDict[tuple, _Held] = OrderedDict()

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, peer: object) -> bool:
        return peer in self._peers

    def get(self, peer: tuple, key: object, now: float) -> bytes | None:
        """The body ``key`` of ``peer`` (a use of the peer's bodies), or None: none, or the peer was
        silent for ``lifetime``."""
        held = self._peers.get(peer)
        if held is None or held.used <= now - self.lifetime:
            return None
        body = held.bodies.get(key)
        if body is not None:
            held.used = now
            self._peers.move_to_end(peer)
        return body

    def take(self, peer: tuple, now: float) -> dict:
        """``peer``'s bodies to change (empty: none, or the peer was silent for ``lifetime``), out of
        the store until ``put`` brings them back."""
        held = self._peers.pop(peer, None)
        if held is None:
            return {}
        self.bytes -= held.size
        return held.bodies if held.used > now - self.lifetime else {}

    def put(self, peer: tuple, bodies: dict, now: float) -> None:
        """Keep ``bodies`` (nothing when empty) as ``peer``'s most recent use, then ``bound``."""
        old = self._peers.pop(peer, None)
        if old is not None:
            self.bytes -= old.size
        if bodies:
            size = sum(len(b) for b in bodies.values())
            self._peers[peer] = _Held(bodies, now, size)
            self.bytes += size
        self.bound(now)

    def bound(self, now: float) -> None:
        """Forget the least recently used peers' bodies while all together hold more than
        ``max_bytes`` or ``max_peers`` peers (the most recent peer's stay), and those of every peer
        silent for ``lifetime``."""
        peers = self._peers
        while peers:
            first = next(iter(peers.values()))
            if first.used > now - self.lifetime and (
                len(peers) == 1 or (self.bytes <= self.max_bytes and len(peers) <= self.max_peers)
            ):
                return
            peers.popitem(last=False)
            self.bytes -= first.size
