"""Durable queues: ``$queue/{name}`` work queues and replayable streams with consumer groups.

Imported by the broker only when a ``$queue/`` topic is used or queues are configured, so plain
publish/subscribe pays nothing for it. One concept per module:

- ``config``: a queue's settings (the ``queues:`` config list, defaults for auto-created queues);
- ``log``: the queue log interface (append, read from an offset, commit a group's progress,
  truncate) over the storage layer's ``QueueLogStore``; a replicated log can implement it later;
- ``group``: consumer groups, their members and pending lists;
- ``delivery``: building deliveries and reading settlements (message ids, user properties);
- ``retention``: deleting records every group settled, and by age, count and size;
- ``placement``: which worker owns a queue (``server.workers`` > 1), after which node on a cluster;
- ``remote``: the session side of a member connected to another process (node or worker);
- ``manager``: the ``QueueManager`` the broker hands ``$queue/`` publishes and subscriptions to.
"""

from __future__ import annotations

from .manager import QueueManager

__all__ = ["QueueManager"]
