from cpython cimport array

# The C interface of fluxmq._core.sent (the relay calls SentTable's record methods directly).

cdef class SentState:
    cdef public str client_id
    cdef public bytes prefix
    cdef public dict slots
    cdef public set dirty
    cdef public set disk
    cdef public list staged
    cdef public long long staged_first
    cdef public list closed
    cdef public list unwritten
    cdef public long long floor
    cdef public list ranges
    cdef public long long end
    cdef public bint done_dirty
    # the set ``SentTable._changed`` last added this state to (the pending batch's ``sent_dirty``;
    # None: not in one), so a state changed again in the same batch costs no set insertion
    cdef public object in_dirty
    # the two buckets of ``slots`` used last (-1: none): a send and an acknowledgement take turns
    # at two buckets, so most packet ids are found without a dict lookup (``uncache`` when a
    # bucket leaves ``slots``)
    cdef int c0_bucket, c1_bucket
    cdef array.array c0_slots, c1_slots
    cdef bint c_next
    cdef bint c0_dirty, c1_dirty  # the cached bucket is in ``dirty`` (``clean`` resets)

    cdef array.array _bucket(self, int bucket, bint make)

    cpdef unsigned long long get(self, int packet_id)
    cpdef set(self, int packet_id, unsigned long long value)
    cpdef stage(self, long long seq, object entry)
    cpdef done(self, long long seq)
    cpdef bint is_done(self, long long seq)
    cpdef uncache(self)
    cpdef clean(self)


cdef class SentTable:
    cdef public dict states
    # the pending batch's ``sent_dirty`` (the store sets it whenever it starts a batch)
    cdef public set dirty
    # False until the first change since the store last cleared ``has_pending`` (it resets it)
    cdef public bint woken
    cdef object store
    # operations recorded by the table (the store's ``op_count`` adds them to its own)
    cdef public long long ops
    # the state ``state`` returned last and its client id (the same str object: the session's)
    cdef str last_id
    cdef SentState last_state
    cdef object prefix_of

    cpdef SentState state(self, str client_id)
    cpdef SentState drop(self, str client_id)
    cdef SentState _found(self, str client_id)
    cdef int _changed(self, SentState st, int ops) except -1
    cdef int sent_entry(self, str client_id, int packet_id, long long seq, object entry) except -1
    cdef int acked(self, str client_id, int packet_id) except -1
    cdef int sent(self, str client_id, int packet_id, long long seq) except -1
    cdef int appended(self, str client_id, long long seq, object entry) except -1
