"""MemoryStorage: no durability; sessions, queues and retained messages live in the broker's objects."""

from __future__ import annotations

from .base import Storage


class MemoryStorage(Storage):
    """The ``storage.type: memory`` backend: every record method is a no-op and ``load`` is empty.

    The broker sees ``durable = False`` and never builds disk-backed sessions or queues, so the
    in-memory paths run exactly as without storage.
    """

    durable = False
