"""Storage: the interface the broker writes its durable state through, and what ``load`` returns.

Record methods (``put_*``, ``delete_*``, ``queue_*``) only buffer an operation in memory and never
do I/O; ``commit`` applies everything buffered since the last commit in one transaction. The
protocol layer's FlushScheduler commits once per event-loop turn before it writes any socket, so an
acknowledgement leaves only after the state it acknowledges is committed (group commit).

Only persistent sessions (Session Expiry Interval > 0, or 3.1.1 clean session 0) are written; a
clean session never reaches the storage. The memory backend keeps no copy: its record methods are
no-ops and state lives in the broker's objects, as before there was storage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StoredQueue:
    """Index of one session's on-disk offline queue, rebuilt by ``load`` from its keys."""

    first: int = 0  # lowest seq present
    next: int = 0  # seq of the next append
    count: int = 0
    bytes: int = 0
    qos0: list[int] = field(default_factory=list)  # seqs of QoS 0 entries (evicted first)
    skip: set[int] = field(default_factory=set)  # seqs above ``first`` whose entries are in flight


@dataclass
class StoredSession:
    """One persistent session as stored: enough to rebuild the broker's Session."""

    client_id: str
    expiry_interval: int
    disconnected_at: float  # wall-clock time; 0.0 when it was online (see StoredState.last_alive)
    username: str | None = None
    subscriptions: list[tuple] = field(default_factory=list)  # (filter, qos, nl, rap, rh, sub_id)
    inflight: dict[int, tuple] = field(default_factory=dict)  # pid -> (fields, qos, retain, ids, released)
    inbound_qos2: set[int] = field(default_factory=set)
    queue: StoredQueue = field(default_factory=StoredQueue)
    will: tuple | None = None  # (message fields, delay)


@dataclass
class StoredState:
    """Everything ``load`` found; message fields are tuples for ``message_factory``."""

    sessions: dict[str, StoredSession] = field(default_factory=dict)
    retained: list[tuple] = field(default_factory=list)
    last_alive: float = 0.0  # wall time the previous run was last known alive (0: unknown / new)
    # cluster peer -> (its link epoch, sequence id) of the last batch from it whose effects are stored
    peer_batches: dict[str, tuple[int, int]] = field(default_factory=dict)


class Storage:
    """Base class and interface of the storage backends."""

    #: False for the memory backend: the broker then keeps using its in-memory structures only
    durable = False
    #: True while operations are buffered and not yet committed
    has_pending = False
    #: True while the store is full (map size or disk): new stored messages are refused (0x97)
    refusing = False
    #: called (from the hub) when the first operation of a new batch is buffered
    on_pending: Callable[[], None] | None = None
    #: True once ``close`` began: background users (queue timers) stop instead of reading it
    closed = False
    #: operations recorded so far (a counter: a caller compares it before and after an action)
    op_count = 0
    #: the error of the latest failed commit while its batch waits for a retry, else None
    last_error: Exception | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def load(self) -> StoredState:
        """Everything to restore at start (empty for the memory backend)."""
        return StoredState()

    def commit(self) -> None:
        """Apply every buffered operation in one transaction; raises StorageFull/StorageError."""

    def sync(self) -> None:
        """Force committed data to stable storage (fsync); may run in a thread."""

    def after_commit(self, callback: Callable[[Exception | None], None]) -> None:
        """Call ``callback(None)`` once every operation recorded so far is committed (and, with
        ``storage.sync: always``, fsynced), or ``callback(error)`` when the commit holding them
        failed. At once when nothing is pending (always for the memory backend). Runs in the hub:
        the callback must not block."""
        callback(None)

    def retry_due(self) -> bool:
        """False while a failed commit's back-off runs (its batch is kept and retried after it)."""
        return True

    def retry_in(self) -> float:
        """Seconds until a failed commit may be retried (0 when none failed)."""
        return 0.0

    def note_stake(self, client_id: str) -> None:
        """Output to ``client_id`` this turn acknowledges the pending batch (e.g. a PUBACK for a
        message it queued for others): a failed commit abandons that output."""

    def stake_clients(self) -> set[str]:
        """Client ids whose output acknowledges part of the pending batch (see ``note_stake``)."""
        return set()

    def ping(self) -> tuple[bool, str]:
        """Readiness of the backend: (up, details)."""
        return True, ""

    def close(self) -> None:
        """Commit, sync and release the backend."""

    def touch_alive(self) -> None:
        """Record that the node is alive now (restores judge sessions online at a crash by it)."""

    # -- durable queues ----------------------------------------------------------------------------

    def queue_log(self):
        """The ``QueueLogStore`` of the durable queues (storage/queue_log.py); in memory here."""
        log = self.__dict__.get("_memory_queue_log")
        if log is None:
            from .queue_log import MemoryQueueLog

            log = self.__dict__["_memory_queue_log"] = MemoryQueueLog()
        return log

    def has_queue_data(self) -> bool:
        """True when the store holds durable-queue records (the queue manager then starts at once)."""
        return False

    # -- sessions ----------------------------------------------------------------------------------

    def put_session(
        self, client_id: str, expiry_interval: int, disconnected_at: float, username: str | None
    ) -> None:
        """Create or update a persistent session's record (``disconnected_at`` 0 while online)."""

    def delete_session(self, client_id: str, queue_next: int = 0) -> None:
        """Forget a session and everything it owns (subscriptions, inflight, queue below
        ``queue_next``, will)."""

    def clear_session_state(self, client_id: str, queue_next: int = 0) -> None:
        """Forget a session's inflight, inbound QoS 2 ids and queue entries below ``queue_next``
        (keeps record and subscriptions)."""

    def queue_floor(self, client_id: str) -> int:
        """The first seq a new queue of ``client_id`` may use."""
        return 0

    def put_subscription(
        self,
        client_id: str,
        filter: str,
        qos: int,
        no_local: bool,
        retain_as_published: bool,
        retain_handling: int,
        subscription_id: int,
    ) -> None:
        """Create or replace a subscription with all its options."""

    def delete_subscription(self, client_id: str, filter: str) -> None:
        """Remove one subscription."""

    # -- QoS 1/2 state -----------------------------------------------------------------------------

    def put_inflight(
        self, client_id: str, packet_id: int, message: Any, qos: int, retain: bool, subscription_ids
    ) -> None:
        """An outbound QoS 1/2 PUBLISH awaiting its acknowledgement."""

    def put_sent(self, client_id: str, packet_id: int, seq: int) -> None:
        """An outbound QoS 1/2 PUBLISH awaiting its acknowledgement whose message is the queue entry
        at ``seq`` (written by ``queue_append``): it stays there, and ``delete_inflight`` deletes it."""

    def put_sent_entry(self, client_id: str, packet_id: int, seq: int, entry: bytes) -> None:
        """``queue_append`` then ``put_sent``: a message sent at once, stored and named in one call."""
        self.queue_append(client_id, seq, entry)
        self.put_sent(client_id, packet_id, seq)

    def release_inflight(self, client_id: str, packet_id: int) -> None:
        """Outbound QoS 2: PUBREC received, PUBREL sent; resend PUBREL after a restart."""

    def delete_inflight(self, client_id: str, packet_id: int) -> None:
        """The outbound exchange ended (PUBACK, PUBCOMP, or refused); a ``put_sent`` entry's queue
        entry goes too."""

    def put_inbound_qos2(self, client_id: str, packet_id: int) -> None:
        """Inbound QoS 2 received and routed, PUBREC sent, PUBREL not yet received."""

    def delete_inbound_qos2(self, client_id: str, packet_id: int) -> None:
        """PUBREL received for an inbound QoS 2 id."""

    # -- offline queue -----------------------------------------------------------------------------

    def queue_append(self, client_id: str, seq: int, entry: bytes) -> None:
        """Store an encoded queue entry (``records.encode_entry``) at ``seq``."""

    def queue_pop(self, client_id: str, seq: int) -> None:
        """Delete the queue entry at ``seq`` (an entry appended in the pending batch leaves no
        trace: neither its put nor the delete reaches the disk)."""

    def queue_read(self, client_id: str, seqs) -> list:
        """Encoded entries at ``seqs`` (None where missing), pending operations included."""
        return [None for _ in seqs]

    # -- retained and wills ------------------------------------------------------------------------

    def put_retained(self, topic: str, message: Any) -> None:
        """Set or replace the retained message of ``topic``."""

    def delete_retained(self, topic: str) -> None:
        """Clear the retained message of ``topic``."""

    def put_will(self, client_id: str, message: Any, delay: int) -> None:
        """The will of a persistent session (published after ``delay`` once it is disconnected)."""

    def delete_will(self, client_id: str) -> None:
        """The will was published, cancelled or discarded."""

    # -- cluster -----------------------------------------------------------------------------------

    def put_peer_batch(self, sender: str, epoch: int, seq: int) -> None:
        """Batch ``seq`` of ``sender``'s link epoch ``epoch`` was applied here: committed with what
        it stored, so a restarted node skips that batch when the sender retries it."""
