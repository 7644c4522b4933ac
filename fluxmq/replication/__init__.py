"""Raft replication of durable queues (issue 12): pysyncobj groups whose commands are the queue-log
writes, applied to the local queue log store on every replica. Imported only when
``cluster.raft.enabled`` is true.

- ``log``: ``ReplicatedQueueLog``, the queue-log interface over a Raft group;
- ``group``: ``RaftGroup``, one pysyncobj node driven from a greenlet, the per-turn entry, the
  held acknowledgements and the state machine;
- ``service``: ``RaftService``, the groups planned from the configuration and the log factory the
  queue manager asks for each queue's log;
- ``transport``: ``RaftTransport``, pysyncobj's TCP transport over connections of ours, plain TCP
  or TLS / mutual TLS (``cluster.raft.tls``), and ``raft_tls``, its contexts from the configuration;
- ``distribution``: ``ReplicatedGroup``, consumers on every replica (``distribution_mode``
  forward: the leader decides, a delivery to another node's member is a lease command);
- ``lease``: ``LeaseTable``, the delivery leases of ``distribution_mode: replicate``.
"""

from __future__ import annotations

from .service import RaftService

__all__ = ["RaftService"]
