"""Capture: a queue whose ``topics`` list matches an ordinary (non-``$queue``) publish gets a copy.

Each configured filter is an ordinary subscription in the broker's router whose target is a
``CaptureTarget``: routing is unchanged and costs nothing extra for topics no queue captures. The
copy is appended while the publish is routed, so it goes into the same commit as the publish's own
storage and the publisher's PUBACK means the copy is stored. A copy that cannot be stored (queue
full, storage full) is counted (``capture_refused``) and logged, never dropped silently.
"""

from __future__ import annotations

import logging

from fluxmq.errors import QueueRefused

log = logging.getLogger("fluxmq.queues")


class CaptureTarget:
    """Router target standing for one queue's capture (duck-types the parts of a Session the
    router and ``Broker.publish`` use). Installed while this process serves the queue
    (``QueueManager._capture``, ``_uncapture``)."""

    trusted = True  # the router's read filter (ACLs of clients) does not apply to it

    def __init__(self, manager, name: str) -> None:
        self.manager = manager
        self.name = name
        self.client_id = f"$queue-capture/{name}"  # never a valid session: clients cannot own it
        self.username = None
        self.delivery = None
        self.inflight = {}
        self.queue_items = ()
        self.send_quota = 0

    def deliver(self, message, qos: int, retain: bool, subscription_ids) -> None:
        manager = self.manager
        q = manager.queues.get(self.name)
        if q is None:
            return  # no longer served here (a route cached before its removal): its owner captures
        if manager.storage_refusing():
            self._refused(q, "storage full")
            return
        try:
            q.append(message)
        except QueueRefused as exc:
            self._refused(q, str(exc))
            return
        manager.kick_soon(q)

    @staticmethod
    def _refused(q, why: str) -> None:
        q.stats["capture_refused"] += 1
        n = q.stats["capture_refused"]
        if n == 1 or n % 1000 == 0:
            log.warning("queue_capture_refused", extra={"queue": q.name, "refused": n, "reason": why})
