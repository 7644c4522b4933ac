"""fluxmq.storage: the memory and LMDB backends behind one interface (``Storage``).

This package owns every key layout and record format; nothing else touches LMDB. See
``docs/storage.rst`` for what each ``storage.sync`` mode guarantees.
"""

from __future__ import annotations

from .base import Storage, StoredQueue, StoredSession, StoredState
from .memory import MemoryStorage

__all__ = ["MemoryStorage", "Storage", "StoredQueue", "StoredSession", "StoredState", "open_storage"]


def open_storage(config, path: str | None = None) -> Storage:
    """The backend the ``storage`` config section asks for (opened; raises StorageError with one line);
    ``path`` replaces ``storage.path`` (a worker's shard)."""
    s = config.storage
    if s.type == "memory":
        return MemoryStorage()
    from .lmdb import LMDBStorage  # imported only when used: the memory backend needs no lmdb module

    return LMDBStorage(path or s.path, map_size=s.map_size, sync=s.sync, sync_interval=s.sync_interval)
