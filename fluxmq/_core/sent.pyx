# cython: language_level=3
"""The LMDB store's per-message bookkeeping of persistent sessions' queue seq spaces, in C.

``fluxmq.storage.lmdb`` owns the records and their keys (``docs/storage.rst``) and writes them at
each commit (``LMDBStorage._write_sent``, in Python, once per commit); this module only keeps, per
client, what those records are made from, and does the operations that run once or twice per
message of a persistent session (``SentTable``: an entry stored, a packet id in flight as a queue
entry, an entry acknowledged or popped) without a Python frame:

``SentState`` (one client): ``slots`` (bucket = packet id // 16 -> ``array("Q")`` of 16 slots, 0 =
free, else ``(seq + 1) << 1 | released``; made by the factory given to ``configure``), the buckets
changed since the last commit (``dirty``) and those with a record on disk (``disk``), the entries
stored since the last commit (``staged`` from ``staged_first``, earlier runs of the same batch in
``closed``), the batches taken but not yet committed (``unwritten``), and the done seqs (every seq
below ``floor`` and in the sorted, apart ``[start, end)`` ``ranges``).

``SentTable(store, prefix_of)``: ``states`` (client id -> SentState) and the record methods the store
binds as its own (``put_sent_entry``, ``put_sent``, ``queue_append``, ``queue_pop``,
``delete_inflight``, ``release_inflight``): each changes the state, adds it to
``dirty`` (the store keeps it its pending batch's ``sent_dirty``), counts its operations (``ops``, which the store's ``op_count`` includes)
and calls ``store._wake()`` when nothing was pending (checked once after the store resets
``woken``, which it does whenever it clears ``has_pending``), as the Python methods did; what is not a queue entry falls back to the store's
``_queue_pop_record`` / ``_delete_inflight_record`` / ``_release_inflight_record``.

No I/O and no fluxmq imports.
"""

from cpython cimport array
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t
from libc.string cimport memcmp, memcpy

from bisect import bisect_right

cdef object _new_slots = None  # records.sent_slots (configure)
cdef array.array _SLOTS_TEMPLATE = None  # what it returns (all free)
cdef object _BIG = 1 << 64
cdef int _FORMAT = -1  # records.FORMAT (configure): the first byte of a sent and a done record
cdef int _SEGMENT = 0  # records.SEGMENT: the first byte of a segment
cdef int _SLOTS = 16  # records.SENT_SLOTS


def configure(new_slots, int fmt=-1, int segment=0, int slots=16):
    """Set the factory of one ``sent`` record's slots (``records.sent_slots``) and the constants of
    the records ``SentTable.take_ops`` writes (``records.FORMAT``, ``SEGMENT``, ``SENT_SLOTS``);
    called once at import by ``fluxmq.storage.records``, which owns their layout."""
    global _new_slots, _SLOTS_TEMPLATE, _FORMAT, _SEGMENT, _SLOTS
    _new_slots = new_slots
    _SLOTS_TEMPLATE = new_slots()  # (a new bucket's slots: a copy of it, made in C)
    _FORMAT = fmt
    _SEGMENT = segment
    _SLOTS = slots


# -- the records of a commit, byte for byte as fluxmq.storage.records lays them out ---------------
# (tests/_core/test_sent.py checks them against records.py's encoders)

cdef inline void _le(uint8_t* p, unsigned long long v, int n):
    cdef int i
    for i in range(n):
        p[i] = (v >> (8 * i)) & 0xFF


cdef bytes _key(bytes prefix, unsigned long long v, int n):
    """``prefix`` + ``v`` big-endian in ``n`` bytes (``records.seq_key``: 8, ``sent_key``: 2)."""
    cdef Py_ssize_t k = PyBytes_GET_SIZE(prefix)
    cdef int i
    cdef bytes out = PyBytes_FromStringAndSize(NULL, k + n)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
    memcpy(p, PyBytes_AS_STRING(prefix), k)
    for i in range(n):
        p[k + n - 1 - i] = (v >> (8 * i)) & 0xFF
    return out


cdef bytes _segment(list entries, Py_ssize_t i, Py_ssize_t j, Py_ssize_t total):
    """``records.segment``: ``SEGMENT | u32 count | count x u32 length | entries`` of
    ``entries[i:j]`` (bytes, ``total`` bytes together), little-endian."""
    cdef Py_ssize_t n = j - i, k, size, at
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 5 + 4 * n + total)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
    cdef bytes e
    p[0] = _SEGMENT
    _le(p + 1, n, 4)
    at = 5 + 4 * n
    for k in range(n):
        e = <bytes>entries[i + k]
        size = PyBytes_GET_SIZE(e)
        _le(p + 5 + 4 * k, size, 4)
        memcpy(p + at, PyBytes_AS_STRING(e), size)
        at += size
    return out


cdef bytes _sent_record(array.array slots):
    """``records.encode_sent``: ``FORMAT | SENT_SLOTS x u64`` little-endian."""
    cdef Py_ssize_t k, n = len(slots)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 1 + 8 * n)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
    cdef unsigned long long* v = slots.data.as_ulonglongs
    p[0] = _FORMAT
    for k in range(n):
        _le(p + 1 + 8 * k, v[k], 8)
    return out


cdef bytes _done_record(long long floor, list ranges):
    """``records.encode_done``: ``FORMAT | u64 floor | u32 n | n x (u64 start, u64 end)``."""
    cdef Py_ssize_t k, n = len(ranges)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 13 + 16 * n)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
    p[0] = _FORMAT
    _le(p + 1, <unsigned long long>floor, 8)
    _le(p + 9, n, 4)
    for k in range(n):
        rng = <tuple>ranges[k]
        _le(p + 13 + 16 * k, <unsigned long long>rng[0], 8)
        _le(p + 21 + 16 * k, <unsigned long long>rng[1], 8)
    return out


cdef Py_ssize_t _put_segments(dict queue_ops, bytes prefix, long long first, list entries,
                              Py_ssize_t segment_bytes) except -1:
    """``entries`` (seqs ``first``..) as ``queue`` records of about ``segment_bytes`` at most (split
    by count at the mean entry size), a lone entry as itself (``LMDBStorage`` documents why)."""
    cdef Py_ssize_t n = len(entries), i, j, k, per, size = 0, part
    for k in range(n):
        e = entries[k]
        if type(e) is not bytes:
            entries[k] = e = bytes(e)
        size += PyBytes_GET_SIZE(<bytes>e)
    per = segment_bytes * n // (size if size > 0 else 1)
    if per < 1:
        per = 1
    i = 0
    while i < n:
        j = i + per if i + per < n else n
        key = _key(prefix, <unsigned long long>(first + i), 8)
        if j - i == 1:
            queue_ops[key] = entries[i]
        else:
            part = 0
            for k in range(i, j):
                part += PyBytes_GET_SIZE(<bytes>entries[k])
            queue_ops[key] = _segment(entries, i, j, part)
        i = j
    return 0


#: a u32 length prefix's largest value, as a C constant: the literal 0xFFFFFFFF is a Python int to
#: Cython, and comparing a length with it boxed the length into a Python integer per call
cdef Py_ssize_t U32_MAX = 0xFFFFFFFF
cdef array.array _U32 = array.array("I")


def free_slots(array.array slots):
    """How many of a ``sent`` record's slots (``array("Q")``) are free (0)."""
    cdef Py_ssize_t i, n = 0
    cdef unsigned long long *p = slots.data.as_ulonglongs
    if slots.ob_descr.typecode != b"Q"[0]:
        raise TypeError("slots must be an array('Q')")
    for i in range(len(slots)):
        if not p[i]:
            n += 1
    return n


def lengths(list items):
    """``(array("I", map(len, items)), sum of the lengths)``."""
    cdef Py_ssize_t i, n = len(items), size, total = 0
    cdef array.array out = array.clone(_U32, n, False)
    cdef unsigned int *p = out.data.as_uints
    for i in range(n):
        item = items[i]
        size = len(<bytes>item) if type(item) is bytes else len(item)
        if size > U32_MAX:
            raise OverflowError("entry too large")
        p[i] = <unsigned int>size
        total += size
    return out, total


cdef bint _covered(long long floor, list ranges, long long start, long long end) except -1:
    """Every seq of ``[start, end)`` is below ``floor`` or in one of the sorted, apart done
    ``ranges`` (``[start, end)`` tuples)."""
    cdef Py_ssize_t lo = 0, hi = len(ranges), mid
    if start < floor:
        start = floor
    if start >= end:
        return True
    while lo < hi:  # bisect_right(ranges, (start, BIG)): the first range starting above start
        mid = (lo + hi) >> 1
        if <long long>(<tuple>ranges[mid])[0] > start:
            hi = mid
        else:
            lo = mid + 1
    return lo > 0 and <long long>(<tuple>ranges[lo - 1])[1] >= end


def trim(cur, dict trims):
    """``LMDBStorage._trim`` over the ``queue`` cursor ``cur`` (a write transaction's): for each
    client prefix of ``trims`` (-> its done ``(floor, ranges)``), delete its ``queue`` records whose
    seqs are all done: a client's records are in seq order and apart, so the walk goes from its
    first one up to the first with a live seq (with done ranges above the floor, on up to the end
    of the last range). A record's span is read from its first bytes (a segment: its count; else
    one entry), its seq from its key (``records.seq_key``)."""
    cdef Py_ssize_t n, vlen
    cdef long long floor, limit, start, span
    cdef const unsigned char* v
    cdef const unsigned char* k
    cdef int i
    set_range = cur.set_range
    item = cur.item
    delete = cur.delete
    step = cur.next
    for prefix, bounds in trims.items():
        floor = (<tuple>bounds)[0]
        ranges = <list>(<tuple>bounds)[1]
        limit = <long long>(<tuple>ranges[len(ranges) - 1])[1] if ranges else floor
        if not set_range(prefix):
            continue
        n = PyBytes_GET_SIZE(<bytes>prefix)
        while True:
            key, value = <tuple>item()
            if (PyBytes_GET_SIZE(<bytes>key) != n + 8
                    or memcmp(PyBytes_AS_STRING(<bytes>key), PyBytes_AS_STRING(<bytes>prefix), n) != 0):
                break  # another client's (or not a seq key)
            k = <const unsigned char*>PyBytes_AS_STRING(<bytes>key) + n
            start = 0
            for i in range(8):
                start = (start << 8) | k[i]
            if start >= limit:
                break
            vlen = PyBytes_GET_SIZE(<bytes>value)
            v = <const unsigned char*>PyBytes_AS_STRING(<bytes>value)
            span = 1
            if vlen >= 5 and v[0] == _SEGMENT:
                span = v[1] | (v[2] << 8) | (v[3] << 16) | (<long long>v[4] << 24)
            if _covered(floor, ranges, start, start + span):
                if not delete():
                    break
            elif start + span > limit or not step():
                break


cdef class SentState:
    """One client's queue seq space in the store (see the module docstring)."""

    def __init__(self, str client_id, bytes prefix):
        self.client_id = client_id
        self.prefix = prefix
        self.slots = {}
        self.dirty = set()
        self.disk = set()
        self.staged = []
        self.staged_first = 0
        self.closed = []
        self.unwritten = []
        self.floor = -1  # every seq below is done (-1: set by the first seq staged)
        self.ranges = []
        self.end = 0  # above the highest seq staged
        self.done_dirty = True  # the ``done`` record is to be written by the next take_batch
        self.in_dirty = None
        self.c0_bucket = self.c1_bucket = -1

    cdef array.array _bucket(self, int bucket, bint make):
        # slots[bucket] through the two-bucket cache (None when absent and not ``make``)
        cdef array.array slots
        if bucket == self.c0_bucket:
            return self.c0_slots
        if bucket == self.c1_bucket:
            return self.c1_slots
        slots = self.slots.get(bucket)
        if slots is None:
            if not make:
                return None
            slots = array.copy(_SLOTS_TEMPLATE)  # records.sent_slots()
            self.slots[bucket] = slots
        if self.c_next:
            self.c1_bucket = bucket
            self.c1_slots = slots
            self.c1_dirty = False
        else:
            self.c0_bucket = bucket
            self.c0_slots = slots
            self.c0_dirty = False
        self.c_next = not self.c_next
        return slots

    cpdef uncache(self):
        """Forget the cached buckets (a bucket left ``slots``)."""
        self.c0_bucket = self.c1_bucket = -1
        self.c0_slots = self.c1_slots = None
        self.c0_dirty = self.c1_dirty = False

    cpdef clean(self):
        """``dirty.clear()`` (the commit wrote the changed buckets)."""
        self.dirty.clear()
        self.c0_dirty = self.c1_dirty = False

    cpdef unsigned long long get(self, int packet_id):
        """The slot of ``packet_id`` (0 when it is not in flight as a queue entry)."""
        cdef array.array slots = self._bucket(packet_id >> 4, False)
        if slots is None:
            return 0
        return slots.data.as_ulonglongs[packet_id & 15]

    cpdef set(self, int packet_id, unsigned long long value):
        cdef int bucket = packet_id >> 4
        cdef array.array slots = self._bucket(bucket, True)
        slots.data.as_ulonglongs[packet_id & 15] = value
        if bucket == self.c0_bucket:
            if not self.c0_dirty:
                self.dirty.add(bucket)
                self.c0_dirty = True
        elif not self.c1_dirty:
            self.dirty.add(bucket)
            self.c1_dirty = True

    cpdef stage(self, long long seq, object entry):
        """An entry stored at ``seq``."""
        cdef list staged = self.staged
        cdef Py_ssize_t n = len(staged)
        if n:
            if seq == self.staged_first + n:
                staged.append(entry)
                self.end = seq + 1
                return
            self.closed.append((self.staged_first, staged))
            staged = self.staged = []
        if self.floor < 0 or (self.floor >= self.end and not self.ranges and seq > self.floor):
            self.floor = seq  # nothing live: the seqs below were never stored or are all done
            self.done_dirty = True
        self.staged_first = seq
        staged.append(entry)
        if seq + 1 > self.end:
            self.end = seq + 1

    cpdef done(self, long long seq):
        """Mark ``seq`` done (its entry acknowledged or popped)."""
        cdef long long f = self.floor
        cdef list ranges = self.ranges
        cdef Py_ssize_t i, n
        cdef bint joins_left, joins_right
        self.done_dirty = True
        if seq == f:
            f += 1
            if ranges and ranges[0][0] == f:
                f = ranges.pop(0)[1]
            self.floor = f
            return
        if seq < f:
            return
        i = bisect_right(ranges, (seq, _BIG))
        n = len(ranges)
        if i and ranges[i - 1][1] > seq:
            return  # already done
        joins_left = i > 0 and ranges[i - 1][1] == seq
        joins_right = i < n and ranges[i][0] == seq + 1
        if joins_left and joins_right:
            ranges[i - 1] = (ranges[i - 1][0], ranges[i][1])
            del ranges[i]
        elif joins_left:
            ranges[i - 1] = (ranges[i - 1][0], seq + 1)
        elif joins_right:
            ranges[i] = (seq, ranges[i][1])
        else:
            ranges.insert(i, (seq, seq + 1))

    cpdef bint is_done(self, long long seq):
        cdef Py_ssize_t i
        if seq < self.floor:
            return True
        ranges = self.ranges
        if not ranges:
            return False
        i = bisect_right(ranges, (seq, _BIG))
        return i > 0 and ranges[i - 1][1] > seq

    def unwritten_entry(self, long long seq):
        """The entry of ``seq`` if it is staged or in a batch not yet committed, else None."""
        cdef long long first
        staged = self.staged
        if staged and 0 <= seq - self.staged_first < len(staged):
            return staged[seq - self.staged_first]
        for first, entries in self.closed:
            if 0 <= seq - first < len(entries):
                return entries[seq - first]
        for _batch, first, entries in self.unwritten:
            if 0 <= seq - first < len(entries):
                return entries[seq - first]
        return None

    def forget(self):
        self.uncache()
        self.slots.clear()
        self.dirty.clear()
        self.disk.clear()
        self.staged = []
        self.closed = []
        self.ranges = []
        self.done_dirty = False

    def __repr__(self):
        return f"SentState({self.client_id!r}, floor={self.floor}, ranges={len(self.ranges)}, end={self.end})"


cdef class SentTable:
    """The store's SentStates and its per-message record methods (see the module docstring)."""

    def __init__(self, store, prefix_of):
        self.states = {}
        self.dirty = set()
        self.woken = False
        self.store = store
        self.ops = 0
        self.prefix_of = prefix_of

    cdef SentState _found(self, str client_id):
        # states.get(client_id), the last one found first (by identity of the id)
        if client_id is self.last_id:
            return self.last_state
        st = self.states.get(client_id)
        if st is None:
            return None
        self.last_id = client_id
        self.last_state = <SentState>st
        return <SentState>st

    cpdef SentState state(self, str client_id):
        """The client's state, made when it has none."""
        cdef SentState st = self._found(client_id)
        if st is None:
            st = SentState(client_id, self.prefix_of(client_id))
            self.states[client_id] = st
        return st

    cpdef SentState drop(self, str client_id):
        """Remove the client's state from ``states`` (every removal goes through here: the last
        one found is remembered); returns it, or None."""
        self.last_id = None
        self.last_state = None
        return self.states.pop(client_id, None)

    cdef int _changed(self, SentState st, int ops) except -1:
        # store._batch.sent_dirty.add(st); store.op_count += ops (counted here: the store adds
        # ``ops``); wake the store when nothing was pending; on C fields (no attribute lookups)
        cdef set dirty = self.dirty
        if st.in_dirty is not dirty:
            dirty.add(st)
            st.in_dirty = dirty
        self.ops += ops
        if not self.woken:
            self.woken = True
            store = self.store
            if not store.has_pending:
                store._wake()
        return 0

    def take_ops(self, set changed, dict queue_ops, dict sent_ops, dict done_ops, dict trims,
                 list logs, batch, Py_ssize_t segment_bytes):
        """``LMDBStorage._write_sent``: the changed states' records as operations of ``batch``
        (at take_batch): per client the ``queue`` records of the entries stored since the last batch
        (segments of about ``segment_bytes``; those done before their first commit left out, their
        runs kept in ``unwritten`` with ``batch`` until it is written, the client added to
        ``logs``), its ``done`` record and its trim bounds (``trims``) when its done marks changed,
        and its changed ``sent`` records (deleted when all free). A state whose session ended (not
        in ``states``) is skipped; one with nothing live left is dropped. Returns True when some
        client's done marks now cover every seq it stored (all of its records can go)."""
        cdef SentState state
        cdef bint emptied = False
        cdef long long floor, first
        cdef bint added
        cdef array.array slots
        cdef Py_ssize_t k, free
        cdef dict states = self.states
        for obj in changed:
            state = <SentState>obj
            if states.get(state.client_id) is not state:
                continue  # its session ended (or was cleared) after it changed: nothing to write
            prefix = state.prefix
            if state.staged:
                runs = state.closed
                runs.append((state.staged_first, state.staged))
                state.staged = []
                state.closed = []
                floor = state.floor
                added = False
                for run in runs:
                    first = (<tuple>run)[0]
                    entries = <list>(<tuple>run)[1]
                    if first < floor:  # acknowledged before its first commit: never written
                        if first + len(entries) <= floor:
                            continue
                        entries = entries[floor - first:]
                        first = floor
                    if len(entries) == 1:
                        e = entries[0]
                        queue_ops[_key(prefix, <unsigned long long>first, 8)] = e if type(e) is bytes else bytes(e)
                    else:
                        _put_segments(queue_ops, prefix, first, entries, segment_bytes)
                    if not added:
                        logs.append(state)
                        added = True
                    state.unwritten.append((batch, first, entries))
            if state.done_dirty:
                state.done_dirty = False
                ranges = list(state.ranges)
                done_ops[prefix] = _done_record(state.floor, ranges)
                trims[prefix] = (state.floor, ranges)
                if not ranges and state.floor >= state.end:
                    emptied = True
            buckets = state.slots
            disk = state.disk
            for bucket in state.dirty:
                key = _key(prefix, <unsigned long long>bucket, 2)
                found = buckets.get(bucket)
                if found is not None:
                    slots = <array.array>found
                    free = 0
                    for k in range(len(slots)):
                        if not slots.data.as_ulonglongs[k]:
                            free += 1
                    if free != _SLOTS:
                        sent_ops[key] = _sent_record(slots)
                        disk.add(bucket)
                        continue
                    del buckets[bucket]
                    state.uncache()
                if bucket in disk:
                    sent_ops[key] = None
                    disk.discard(bucket)
            state.clean()
            if (not buckets and not disk and not state.unwritten and not state.ranges
                    and state.floor >= state.end):
                self.drop(state.client_id)  # nothing live: the next entry starts a new state
        return emptied

    def put_sent_entry(self, str client_id, int packet_id, long long seq, entry):
        """``queue_append`` and ``put_sent`` in one call: a message sent at once."""
        self.sent_entry(client_id, packet_id, seq, entry)

    cdef int sent_entry(self, str client_id, int packet_id, long long seq, object entry) except -1:
        cdef SentState st = self.state(client_id)
        st.stage(seq, entry)
        st.set(packet_id, <unsigned long long>(seq + 1) << 1)
        self._changed(st, 2)
        return 0

    def put_sent(self, str client_id, int packet_id, long long seq):
        self.sent(client_id, packet_id, seq)

    cdef int sent(self, str client_id, int packet_id, long long seq) except -1:
        cdef SentState st = self.state(client_id)
        st.set(packet_id, <unsigned long long>(seq + 1) << 1)
        self._changed(st, 1)
        return 0

    def queue_append(self, str client_id, long long seq, entry):
        self.appended(client_id, seq, entry)

    cdef int appended(self, str client_id, long long seq, object entry) except -1:
        """``queue_append``: an entry stored at ``seq`` (queued)."""
        cdef SentState st = self.state(client_id)
        st.stage(seq, entry)
        self._changed(st, 1)
        return 0

    def queue_pop(self, str client_id, long long seq):
        # Not a delete: the seq is marked done, and its record goes when all of its seqs are done.
        st = self._found(client_id)
        if st is None:  # no entry stored since start (cannot happen for a live seq)
            self.store._queue_pop_record(client_id, seq)
            return
        (<SentState>st).done(seq)
        self._changed(<SentState>st, 1)

    def delete_inflight(self, str client_id, int packet_id):
        self.acked(client_id, packet_id)

    cdef int acked(self, str client_id, int packet_id) except -1:
        """``delete_inflight``: the packet id's entry is done (acknowledged)."""
        cdef SentState st
        cdef unsigned long long v = 0
        cdef long long seq
        found = self._found(client_id)
        if found is not None:
            st = <SentState>found
            v = st.get(packet_id)
            if v:
                st.set(packet_id, 0)
                seq = <long long>(v >> 1) - 1
                if seq == st.floor and not st.ranges:  # acknowledged in order: done.floor + 1
                    st.floor = seq + 1
                    st.done_dirty = True
                else:
                    st.done(seq)
                self._changed(st, 1)
                return 0
        self.store._delete_inflight_record(client_id, packet_id)  # a schema 2 record
        return 0

    def release_inflight(self, str client_id, int packet_id):
        cdef SentState st
        cdef unsigned long long v = 0
        found = self._found(client_id)
        if found is not None:
            st = <SentState>found
            v = st.get(packet_id)
            if v:
                st.set(packet_id, v | 1)
                self._changed(st, 1)
                return
        self.store._release_inflight_record(client_id, packet_id)  # a schema 2 record
