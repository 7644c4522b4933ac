# cython: language_level=3
"""The plain forwarded message in C: appended to a peer's queue by the relay, read back by the receiver.

A message forwarded to a peer travels in ``Batch.items`` as an item (``fluxmq.cluster.batch`` owns
that framing: ``u32 blob length | i64 expiry ms remaining (-1 none) | u8 flags (1 = match local) |
u8 group count``, then the groups, then the blob) whose blob is ``fluxmq.storage.records``'s message
record (``u8 format 1 | u8 flags (QoS | 4 retain | 8 expiry | 16 origin) | f64 expiry | u16 topic |
u16 origin | u32 properties | u32 payload`` lengths, little-endian, then topic, origin, properties,
payload). This module writes and reads only the *plain* item: no expiry, matched locally, no
shared groups, QoS 0 or 1, not retained, no properties; byte for byte what ``build_batch`` frames
for ``encode_message`` of such a message (tests/_core/test_forward.py checks both directions).

``ForwardQueue`` is the tail of one peer link's queue (``fluxmq.cluster.forwarder.PeerLink``): the
relay appends plain items to ``tail``; the link moves the tail into its deque of entries as a
``ForwardRun`` (``seal``) before it queues anything else and before it takes a batch, so messages
keep their order whichever path queued them. The tail is written into a ``bytes`` object that
``seal`` shortens to the items and hands over as the run's data, not copied (a fan-in batch's
~230 KB were copied once more on the sending worker). ``queued`` / ``queued_bytes`` count the link's whole
queue (entries and tail), so the one bound (``max_messages``, ``max_bytes``) covers both paths.

No I/O and no fluxmq imports.
"""

from cpython.bytes cimport (PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE,
                            _PyBytes_Resize)
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF

cdef extern from "Python.h":
    void Py_SET_SIZE(PyObject* o, Py_ssize_t size)
    Py_ssize_t Py_REFCNT(PyObject* o)
    ctypedef struct PyBytesObject:
        Py_hash_t ob_shash

#: sealed runs' allocations a queue keeps for reuse (``ForwardQueue._spare``): a link allows
#: ``batches_in_flight`` (4 by default) batches in flight, a fan-in batch is two runs (one sealed at
#: ``run_messages`` and the messages after it), and one more fills: with 4, the sending worker's
#: tails were still fresh allocations, their written pages faulted in (~1,800 faults per 5 M fan-in
#: deliveries; with 8, 240-550). A link that stays idle keeps none: ``release_unused`` (the node's
#: heap-trim look, every few seconds) frees a queue's spares once no tail took one and no run was
#: kept since the last look.
DEF SPARES = 8
#: a full tail whose bytes are at least this many is sealed, not grown (``append_raw``); a smaller
#: one grows by copies (small, from the heap)
DEF SPLIT_AT = 65536
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy, memset

import weakref

#: bytes of an item's head and of a message record's head
DEF ITEM_HEAD = 14
DEF MSG_HEAD = 22
DEF FORMAT = 1
DEF MATCH_LOCAL = 1
#: a u32 length prefix's largest value, as a C constant: the literal 0xFFFFFFFF is a Python int to
#: Cython, and arithmetic with it made ~400 instructions of Python integers per appended message
cdef Py_ssize_t U32_MAX = 0xFFFFFFFF


cdef inline void _le16(uint8_t* p, Py_ssize_t v) noexcept:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF


cdef inline void _le32(uint8_t* p, Py_ssize_t v) noexcept:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF


cdef inline Py_ssize_t _rd16(const unsigned char* p) noexcept:
    return p[0] | (p[1] << 8)


cdef inline Py_ssize_t _rd32(const unsigned char* p) noexcept:
    return <Py_ssize_t>(<unsigned int>p[0] | (<unsigned int>p[1] << 8) | (<unsigned int>p[2] << 16)
                        | (<unsigned int>p[3] << 24))


cdef class LinksVersion:
    """A number bumped whenever a transport's links change: a link added or removed, or a link's
    ``forward_queue`` replaced (``bump``). The relay keeps the queues it found for a peers' route
    while the number is the one it read then (``PublishRelay._queues``), so a change is seen at
    the next read."""

    def __init__(self):
        self.value = 0

    def bump(self):
        self.value += 1

    def __repr__(self):
        return f"LinksVersion({self.value})"


cdef class ForwardRun:
    """Plain items the relay appended, moved into a link's queue as one entry (``count`` messages)."""

    def __init__(self, bytes data, Py_ssize_t count):
        self.data = data
        self.count = count

    def __repr__(self):
        return f"ForwardRun(count={self.count}, bytes={len(self.data)})"


cdef class ForwardQueue:
    """The tail of a peer link's queue that the relay appends to (see the module docstring).

    ``runs``: the link's deque of entries, where ``seal`` puts the tail (also by itself once the
    tail holds ``run_messages`` messages or ``run_bytes`` bytes, so a batch stays bounded);
    ``wake()``: called when a message is queued into an empty queue (the link's sender starts)."""

    def __init__(self, runs, Py_ssize_t max_messages, Py_ssize_t max_bytes, Py_ssize_t run_messages,
                 Py_ssize_t run_bytes, wake=None):
        self._data = NULL
        self.buf = NULL
        self.size = self.capacity = self._keep = self._split = self._split_count = 0
        self.allocations = 0
        self._spare_uses = self._spare_seen = 0
        cdef int i
        for i in range(SPARES):
            self._spare[i] = NULL
            self._spare_cap[i] = 0
        _queues.add(self)
        self.tail_count = 0
        self.queued = 0
        self.queued_bytes = 0
        self.runs = runs
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.run_messages = max(1, run_messages)
        self.run_bytes = run_bytes
        self.wake = wake

    def __dealloc__(self):
        Py_XDECREF(self._data)
        self._data = NULL
        cdef int i
        for i in range(SPARES):
            Py_XDECREF(self._spare[i])
            self._spare[i] = NULL

    @property
    def tail(self):
        """The framed items not sealed yet (a copy)."""
        return PyBytes_FromStringAndSize(self.buf, self.size) if self.size else b""

    def has_room(self):
        """False when the link's queue is at its bound (what the relay checks before any effect)."""
        return not self.full()

    def append(self, str topic, str origin, int qos, bytes payload):
        """``append_plain`` from Python (tests)."""
        self.append_plain(topic, origin, qos, payload)

    cdef int append_plain(self, str topic, str origin, int qos, bytes payload) except -1:
        """Queue the plain item of a message (``origin``: the publisher's client id, "" or None for
        none). The caller checked ``full()`` first."""
        cdef Py_ssize_t tlen, olen = 0
        cdef const char* t = PyUnicode_AsUTF8AndSize(topic, &tlen)
        cdef const char* o = NULL
        if origin:
            o = PyUnicode_AsUTF8AndSize(origin, &olen)
        return self.append_raw(t, tlen, o, olen, qos, PyBytes_AS_STRING(payload),
                               PyBytes_GET_SIZE(payload))

    def append_bytes(self, bytes topic not None, str origin, int qos, bytes payload not None):
        """``append_raw`` from Python (tests): the topic as its UTF-8 bytes."""
        cdef Py_ssize_t olen = 0
        cdef const char* o = NULL
        if origin:
            o = PyUnicode_AsUTF8AndSize(origin, &olen)
        self.append_raw(PyBytes_AS_STRING(topic), PyBytes_GET_SIZE(topic), o, olen, qos,
                        PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))

    cdef int append_raw(self, const char* t, Py_ssize_t tlen, const char* o, Py_ssize_t olen,
                        int qos, const char* payload, Py_ssize_t plen) except -1:
        """``append_plain`` from the UTF-8 bytes of the topic and of the origin (``o`` NULL: none)
        and the payload's bytes where they are (the relay's forward-only PUBLISH, framed from the
        read buffer: no ``Publish``)."""
        cdef int flags = qos & 3
        if o is NULL:
            olen = 0
        else:
            flags |= 16
        if tlen > 0xFFFF or olen > 0xFFFF or plen > U32_MAX - MSG_HEAD - tlen - olen:
            raise OverflowError("forwarded message field too long for its length prefix")
        cdef Py_ssize_t blob = MSG_HEAD + tlen + olen + plen
        cdef Py_ssize_t at = self.size, need = at + ITEM_HEAD + blob
        cdef bint first
        cdef Py_ssize_t held
        if need > self.capacity:
            if self.capacity < SPLIT_AT:
                self._grow(need)
            else:
                # A large tail that is full is sealed as it is and the item starts the next one
                # (from a spare when one is free): copied into an allocation twice as large, the
                # new one was a fresh mapping whose pages the copy faulted in (nearly all the
                # sending worker's page faults in fan-in, when a round's run outgrew the recent
                # ones'). The messages keep their order: the run goes to the queue's end.
                held = self.capacity
                self._seal(True)
                at = 0
                need = ITEM_HEAD + blob
                self._grow(max(need, held))  # (a tail as large as the one sealed: a spare fits)
        self.size = need
        cdef uint8_t* p = <uint8_t*>self.buf + at
        _le32(p, blob)
        memset(p + 4, 0xFF, 8)  # i64 -1: no expiry
        p[12] = MATCH_LOCAL
        p[13] = 0  # no shared groups
        p += ITEM_HEAD
        p[0] = FORMAT
        p[1] = flags
        memset(p + 2, 0, 8)  # f64 0.0: no expiry
        _le16(p + 10, tlen)
        _le16(p + 12, olen)
        _le32(p + 14, 0)  # no properties
        _le32(p + 18, plen)
        p += MSG_HEAD
        memcpy(p, t, tlen)
        p += tlen
        if olen:
            memcpy(p, o, olen)
            p += olen
        memcpy(p, payload, plen)
        self.tail_count += 1
        first = self.queued == 0
        self.queued += 1
        self.queued_bytes += ITEM_HEAD + blob
        # (a run's bounds count what was sealed of it because its tail was full)
        if (self.tail_count + self._split_count >= self.run_messages
                or self.size + self._split >= self.run_bytes):
            self.seal()
        if first and self.wake is not None:
            self.wake()
        return 0

    cdef int _grow(self, Py_ssize_t need) except -1:
        """A tail's ``bytes`` of at least ``need`` bytes, holding what the tail holds: the first one
        of a tail a quarter larger than the recent runs (``_keep``; so a stream's runs are written
        without growing: a growth copies the items), then twice as large each time (the items copied
        over; the old one kept if that fails)."""
        cdef Py_ssize_t cap, c
        cdef PyObject* spare
        cdef int i
        if self._data is NULL:
            cap = max(need, self._keep + (self._keep >> 2), 4096)
            for i in range(SPARES):
                spare = self._spare[i]
                if spare is NULL or Py_REFCNT(spare) != 1:
                    continue  # (a run still queued, in a batch in flight, or held elsewhere)
                self._spare[i] = NULL
                c = self._spare_cap[i]
                if need <= c <= 2 * cap and (c >= cap or (c >= SPLIT_AT and 2 * c >= cap)):
                    # its pages mapped and likely in cache: no allocation, no page faults (one of
                    # at least half the size asked, from SPLIT_AT on, too: once full it is sealed
                    # and the next tail taken, rather than freed while the runs' size moves)
                    Py_SET_SIZE(spare, self._spare_cap[i])
                    (<PyBytesObject*>spare).ob_shash = -1
                    self._data = spare  # (its reference moves here)
                    self._spare_uses += 1
                    self.buf = PyBytes_AS_STRING(<object>spare)
                    self.capacity = c
                    return 0
                Py_XDECREF(spare)  # too small, or much larger than the runs now: freed
        else:
            cap = max(need, 2 * self.capacity)
        grown = PyBytes_FromStringAndSize(NULL, cap)
        self.allocations += 1
        if self.size:
            memcpy(PyBytes_AS_STRING(grown), self.buf, self.size)
        Py_XDECREF(self._data)
        Py_INCREF(grown)  # (owned through _data)
        self._data = <PyObject*>grown
        self.buf = PyBytes_AS_STRING(grown)
        self.capacity = cap
        return 0

    cdef int _free_slot(self) noexcept:
        """A slot of ``_spare`` for a sealed run's ``bytes``: an empty one, else one holding a spare
        nothing else holds (replaced, freed); -1: none. (Taking the first slot whose spare was
        free freed, at nearly every seal, the spare the next tail was about to be written into
        while an empty slot was there: that tail was a fresh allocation.)"""
        cdef int i, j = -1
        for i in range(SPARES):
            if self._spare[i] is NULL:
                return i
            if j < 0 and Py_REFCNT(self._spare[i]) == 1:
                j = i
        return j

    cdef Py_ssize_t _release_unused(self):
        """``release_unused`` for this queue: its spares freed (what only this queue held: the
        bytes returned) when none was taken or kept since the last call."""
        cdef Py_ssize_t freed = 0
        cdef int i
        if self._spare_uses != self._spare_seen:
            self._spare_seen = self._spare_uses
            return 0
        for i in range(SPARES):
            if self._spare[i] is not NULL:
                if Py_REFCNT(self._spare[i]) == 1:
                    freed += self._spare_cap[i]
                Py_XDECREF(self._spare[i])  # (a run still queued keeps its bytes until it is sent)
                self._spare[i] = NULL
                self._spare_cap[i] = 0
        return freed

    def spare_bytes(self):
        """The bytes of the spares this queue holds (allocations, held by nothing else or not)."""
        cdef Py_ssize_t n = 0
        cdef int i
        for i in range(SPARES):
            if self._spare[i] is not NULL:
                n += self._spare_cap[i]
        return n

    def take(self, Py_ssize_t max_messages, Py_ssize_t max_bytes):
        """A batch's entries, taken from the front of ``runs`` once the tail is sealed: entries
        while fewer than ``max_messages`` messages and (past the first entry, so a larger one
        travels alone) fewer than ``max_bytes`` bytes are taken (a relay's run counts its
        ``count`` messages and its data's bytes, any other entry one message and its ``blob``'s
        bytes); ``queued`` and ``queued_bytes`` are lowered by them. Returns (entries, messages).
        ``PeerLink``'s loop in Python cost ~144 bytecodes per batch (``bench/RESULTS.md``)."""
        self._seal(False)
        cdef list entries = []
        cdef Py_ssize_t n = 0, size = 0
        runs = self.runs
        cdef Py_ssize_t left = len(runs)
        if left == 0:
            return entries, 0
        popleft = runs.popleft
        while left > 0 and n < max_messages and (size < max_bytes or len(entries) == 0):
            entry = popleft()
            left -= 1
            entries.append(entry)
            if type(entry) is ForwardRun:
                n += (<ForwardRun>entry).count
                size += PyBytes_GET_SIZE((<ForwardRun>entry).data)
            else:
                n += 1
                size += len(entry.blob)
        self.queued -= n
        self.queued_bytes -= size
        return entries, n

    cpdef seal(self):
        """Move the tail into ``runs`` as one ``ForwardRun`` (nothing when it is empty): its
        ``bytes`` shortened to the items, not copied; the next append starts another."""
        self._seal(False)

    cdef int _seal(self, bint split) except -1:
        """``seal``; ``split``: the tail is sealed because it is full (``append_raw``), its run
        part of a longer one, whose whole length (``_split``) sets ``_keep`` once it ends."""
        if self.tail_count == 0:
            self._split = self._split_count = 0  # (an append that failed after a full tail's seal)
            return 0
        cdef PyObject* data = self._data
        cdef Py_ssize_t n = self.size, count = self.tail_count, whole
        self._data = NULL
        self.buf = NULL
        if split:
            self._split += n
            self._split_count += count
        else:
            # the largest recent run: a larger one at once, a smaller one lowers it by an eighth per
            # seal (a batch taken early holds a short run; the next one is as long as before)
            whole = n + self._split
            self._split = self._split_count = 0
            self._keep = whole if whole >= self._keep else self._keep - (self._keep >> 3)
        self.size = self.capacity = self.tail_count = 0
        cdef Py_ssize_t cap = PyBytes_GET_SIZE(<object>data)
        cdef int slot = self._free_slot()
        if n >= cap - (cap >> 2) or (cap >= SPLIT_AT and (n >= cap >> 1 or slot >= 0)):
            # at most a quarter unused, or from SPLIT_AT on at most half, or any run while a spare's
            # slot is free (at most SPARES such runs, then: a fan-in batch's last run, the few
            # messages after a run sealed at ``run_messages``, was shortened and its tail each
            # time a fresh allocation): its length set, the allocation kept whole (a realloc that
            # shrinks it returns the rest, so the allocator's threshold for mapping large blocks
            # stays under the next tail's size: each tail was a fresh mapping, its pages faulted
            # in, and the shrink an mremap; and a run shortened is no spare for a later tail)
            Py_SET_SIZE(data, n)
            PyBytes_AS_STRING(<object>data)[n] = 0
            if slot >= 0:
                Py_XDECREF(self._spare[slot])
                Py_INCREF(<object>data)
                self._spare[slot] = data
                self._spare_cap[slot] = cap
                self._spare_uses += 1
        else:
            try:
                _PyBytes_Resize(&data, n)  # (the only reference: shortened in place by realloc)
            except MemoryError:
                # (freed by the failed resize: its messages are not queued any more)
                self.queued -= count
                self.queued_bytes -= n
                raise
        run = ForwardRun(<bytes>data, count)
        Py_XDECREF(data)  # (the run holds it now)
        self.runs.append(run)
        return 0


cdef Py_ssize_t plain_item(const unsigned char* p, Py_ssize_t i, Py_ssize_t end,
                           Py_ssize_t* fields) noexcept:
    """The end offset of the plain item at ``p[i:]``, filling ``fields`` with (QoS, topic offset,
    topic length, origin offset, origin length or -1 for none, payload offset, payload length);
    -1 when it is not a plain item (or is damaged): the Python path decodes it (or reports it)."""
    if end - i < ITEM_HEAD + MSG_HEAD:
        return -1
    cdef Py_ssize_t blob = _rd32(p + i)
    cdef uint64_t expiry
    memcpy(&expiry, p + i + 4, 8)
    if expiry != 0xFFFFFFFFFFFFFFFFULL:
        return -1  # an expiry: the remaining time is recomputed in Python
    if p[i + 12] != MATCH_LOCAL or p[i + 13] != 0:
        return -1
    cdef Py_ssize_t b = i + ITEM_HEAD
    if blob < MSG_HEAD or blob > end - b or p[b] != FORMAT:
        return -1
    cdef int flags = p[b + 1]
    if (flags & 3) > 1 or flags & (4 | 8):
        return -1
    cdef Py_ssize_t tlen = _rd16(p + b + 10), olen = _rd16(p + b + 12)
    cdef Py_ssize_t plen = _rd32(p + b + 14), paylen = _rd32(p + b + 18)
    if plen != 0 or tlen == 0 or MSG_HEAD + tlen + olen + paylen != blob:
        return -1
    fields[0] = flags & 3
    fields[1] = b + MSG_HEAD
    fields[2] = tlen
    fields[3] = b + MSG_HEAD + tlen
    fields[4] = olen if flags & 16 else -1
    fields[5] = b + MSG_HEAD + tlen + olen
    fields[6] = paylen
    return b + blob


#: every ForwardQueue alive (weakly): ``release_unused`` looks at each
_queues = weakref.WeakSet()


def release_unused() -> int:
    """Free the spare allocations of every queue that neither took nor kept one since the previous
    call (its link idle meanwhile: the node calls this every few seconds); the bytes freed."""
    cdef Py_ssize_t freed = 0
    for q in list(_queues):
        freed += (<ForwardQueue>q)._release_unused()
    return freed
