"""The session side of a consumer-group member whose client is connected to another process.

A group (``fluxmq.queues.group``) decides what each member gets and asks its session to send it
(``can_take_tracked``, ``send_tracked``); for a member connected elsewhere the session is one of
these, and what "send" means is the carrier's: a Raft lease command for a replicated queue's
member on another node (``fluxmq.replication.distribution.RemoteSession``), a delivery sent to the
member's worker for a queue of another worker (``fluxmq.cluster.queues.WorkerMemberSession``).
Its PUBACKs, settlements and departure come back through the same carrier and are applied to the
group as a local member's are; a member whose process stops answering leaves (``alive`` False),
and what it held is delivered again (at least once).
"""

from __future__ import annotations


class RemoteMemberSession:
    """Base of the sessions of members connected to another process (see the module docstring)."""

    __slots__ = ("node", "client_id", "send_quota", "alive")

    persistent = False  # never stored here: the member's own process stores its session
    expiry_interval = 0
    delivery = None

    def __init__(self, node: str, client_id: str, send_quota: int) -> None:
        self.node = node
        self.client_id = client_id
        self.send_quota = send_quota
        self.alive = True

    def can_take_tracked(self) -> bool:
        return self.alive

    def send_tracked(self, message) -> int:
        """Carry ``message`` (a ``TrackedMessage``) to the member's process; 0 when it cannot now
        (never ``REFUSED``: what the member's own session refuses is given back by its carrier)."""
        raise NotImplementedError
