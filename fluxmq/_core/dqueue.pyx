# cython: language_level=3
"""The C fields of a persistent session's disk queue, and its two per-message operations in C.

``fluxmq.storage.queue.DiskQueue`` derives from ``QueueCore``: the queue's index (``first``,
``next``, ``count``, ``bytes``, the seqs of queued QoS 0 entries), its read-ahead and the in-memory
tail of an online session (``_mem``: ``(seq, item, size)`` of the newest entries, from
``_mem_from``) are C fields here, read by Python as attributes and by the C relay
(``_core/relay.pyx``) without attribute lookups. Two operations the relay runs once per message
of a subscriber behind its window are written here (everything else is ``DiskQueue``'s Python):

- ``append_plain``: ``DiskQueue.append``'s path for an online queue whose in-memory tail has room,
  for an entry already encoded (a plain QoS 1 message, ``_core.entry.fields_entry``), recorded
  with ``SentTable.appended`` (``Storage.queue_append``);
- ``pop_plain``: the head kept in memory, when it is a plain QoS 1 message.

``MEM_USE.used`` is the process-wide count of the bytes the in-memory tails hold (``storage.queue``
names it ``_MemUse``); ``configure`` sets the bounds ``storage.queue`` defines.

No I/O and no fluxmq imports.
"""

from cpython.ref cimport PyObject

from fluxmq._core.sent cimport SentTable
from fluxmq._core.slots cimport slot_offset

cdef long long _MEM_ENTRIES = 0
cdef long long _MEM_BYTES = 0
cdef long long _MEM_TOTAL = 0


def configure(long long mem_entries, long long mem_bytes, long long mem_total):
    """The bounds of the in-memory tails (``storage.queue``'s MEM_ENTRIES, MEM_BYTES, MEM_TOTAL)."""
    global _MEM_ENTRIES, _MEM_BYTES, _MEM_TOTAL
    _MEM_ENTRIES = mem_entries
    _MEM_BYTES = mem_bytes
    _MEM_TOTAL = mem_total


cdef class MemUse:
    """Encoded bytes of the entries every disk queue of the process keeps in memory."""

    def __init__(self):
        self.used = 0


MEM_USE = MemUse()
cdef MemUse _use = MEM_USE


cdef class QueueCore:
    """The fields of ``DiskQueue`` (see the module docstring); ``DiskQueue.__init__`` sets them."""

    def __cinit__(self):
        self._mem_from = -1
        self.max_count = -1  # no bound known: the relay leaves the queueing to the session
        self.max_bytes = -1
        self._msg_expires = -1

    cdef int _bind_mem(self, mem) except -1:
        """Bind ``mem``'s (``_mem``'s) append and popleft, when not bound to it yet."""
        if mem is not self._bound_mem:
            self._mem_append = mem.append
            self._mem_popleft = mem.popleft
            self._bound_mem = mem
        return 0

    cdef int append_plain(self, tuple item, bytes entry, SentTable table) except -1:
        """``DiskQueue.append(item)`` for a QoS 1 ``item`` whose ``entry`` is encoded, when the queue
        is online with room in its in-memory tail (returns 1; ``append_entry``'s caching: the tail
        starts at this seq when it held nothing), after the session's bounds were checked; else 0,
        nothing done (the caller takes the Python path)."""
        cdef long long seq, size
        mem = self._mem
        if not self._caching or len(mem) >= _MEM_ENTRIES:
            return 0
        seq = self.next
        self.next = seq + 1
        if self._mem_from < 0:
            self._mem_from = seq  # nothing queued at or above seq is missing from _mem
        table.appended(self._cid, seq, entry)
        size = len(entry)
        if not self.count:
            self.first = seq
        self.count += 1
        self.bytes += size
        self._bind_mem(mem)
        self._mem_append((seq, item, size))
        self._mem_bytes += size
        _use.used += size
        if self._mem_bytes > _MEM_BYTES or _use.used > _MEM_TOTAL:
            (<object>self)._trim_mem()
        return 1

    cpdef object pop_plain(self):
        """``pop_head`` for the C relay (``PersistentSession.pump``'s common case, which it does in
        C): the head's (seq, item, size), removed, when the head is kept in memory and is a QoS 1
        message not retained, without subscription ids or an expiry; else None, the queue untouched
        (the caller leaves the rest to ``pump``)."""
        cdef long long seq, size
        cdef PyObject* expires
        mem = self._mem
        if (self._head is None and mem and not self._ahead and self.count
                and 0 <= self._mem_from <= self.first):
            head = mem[0]
            seq, item, size = <tuple>head
            message, qos, retain, ids = <tuple>item
            if qos != 1 or retain or ids is not None:
                return None
            if type(message) is not self._msg_type:
                self._msg_expires = slot_offset(type(message), "expires_at")
                self._msg_type = type(message)
            expires = NULL
            if self._msg_expires >= 0:  # read from its slot (unset: by name, which raises)
                expires = (<PyObject**>((<char*><PyObject*>message) + self._msg_expires))[0]
            if expires == NULL:
                if message.expires_at is not None:
                    return None
            elif <object>expires is not None:
                return None
            self._bind_mem(mem)
            self._mem_popleft()  # pop_head's fast path, for a QoS 1 head (never in qos0)
            self._mem_bytes -= size
            _use.used -= size
            self.first = seq + 1
            self.bytes -= size
            self.count -= 1
            if self.count <= 0:
                (<object>self)._reset()
            return head
        return None
