"""The operations an LMDB store buffers between commits (``_Batch``), and a reader that sees the store
as it was when taken, buffered operations included (``_View``)."""

from __future__ import annotations

from fluxmq._core.sent import SentState

from .lmdb_layout import _SHARED_DBS, DB_NAMES


class _Batch:
    """Operations buffered since the last commit: per sub-database ``key -> value`` (None = delete),
    plus prefix deletes applied before them."""

    __slots__ = (
        "ops",
        "prefix_deletes",
        "gc",
        "gc_done",
        "callbacks",
        "stakes",
        "sent_dirty",
        "trims",
        "logs",
    )

    def __init__(self) -> None:
        self.ops: list[dict[bytes, bytes | None]] = [{} for _ in DB_NAMES]
        self.prefix_deletes: list[tuple[int, bytes]] = []
        self.gc: tuple[str, int] | None = None  # (client id, end seq): a chunk of garbage to delete
        self.gc_done = False
        self.callbacks: list = []  # after_commit callbacks waiting for this batch
        self.stakes: set[str] = set()  # note_stake: clients acknowledging ops of others
        # clients whose ``sent`` records changed since the last take_batch: written as ops there,
        # once per record however many of its packet ids changed
        self.sent_dirty: set[SentState] = set()
        # client prefix -> (floor, done ranges) at take_batch: queue records all done are deleted
        self.trims: dict[bytes, tuple[int, list]] = {}
        self.logs: list[SentState] = []  # clients whose segments this batch writes (their ``unwritten``)

    def __len__(self) -> int:
        return sum(len(d) for d in self.ops) + len(self.prefix_deletes)

    def merge_newer(self, newer: _Batch) -> None:
        """Put ``newer``'s operations on top of this (failed) batch, as if recorded after it: its
        prefix deletes drop this batch's writes under them, and the last write of a key wins."""
        for db, prefix in newer.prefix_deletes:
            ops = self.ops[db]
            if ops:
                for key in [k for k in ops if k.startswith(prefix)]:
                    del ops[key]
            self.prefix_deletes.append((db, prefix))
        for mine, theirs in zip(self.ops, newer.ops, strict=True):
            if theirs:
                mine.update(theirs)
        self.callbacks = newer.callbacks
        self.stakes |= newer.stakes
        self.sent_dirty = newer.sent_dirty
        self.trims.update(newer.trims)
        self.logs.extend(newer.logs)
        self.gc = None
        self.gc_done = False

    def size_bytes(self) -> int:
        return sum(len(k) + (len(v) if v is not None else 0) for ops in self.ops for k, v in ops.items())

    def clients(self) -> set[str]:
        """Client ids the batch's operations belong to (keys are client_id or client_id NUL ...)."""
        out = set(self.stakes)
        for db, ops in enumerate(self.ops):
            if db in _SHARED_DBS or not ops:
                continue
            for key in ops:
                out.add(key.split(b"\x00", 1)[0].decode(errors="replace"))
        for _db, prefix in self.prefix_deletes:
            out.add(prefix.split(b"\x00", 1)[0].decode(errors="replace"))
        out.update(state.client_id for state in self.sent_dirty)
        return out


_MISSING = object()


class _View:
    """``db`` as it was when the view was taken: an LMDB read transaction (MVCC: the commits made
    after it do not show) under a copy of the operations buffered then (the pending batch over the
    one being written, as ``_read_many`` reads them). Read it in the hub only; ``close`` it."""

    __slots__ = ("_txn", "_over")

    def __init__(self, txn, over: dict) -> None:
        self._txn = txn
        self._over = over

    def read_many(self, keys: list[bytes]) -> list:
        over, get = self._over, self._txn.get
        out = []
        for key in keys:
            value = over.get(key, _MISSING)
            out.append(get(key) if value is _MISSING else value)
        return out

    def close(self) -> None:
        txn, self._txn = self._txn, None
        if txn is not None:
            txn.abort()
