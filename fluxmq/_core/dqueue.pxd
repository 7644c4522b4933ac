from fluxmq._core.sent cimport SentTable

# The C interface of fluxmq._core.dqueue (the relay queues behind a full window and pops in C).

cdef class MemUse:
    cdef public long long used


cdef class QueueCore:
    cdef public object _store
    cdef public str _cid
    cdef public object _factory
    cdef public long long first
    cdef public long long next
    cdef public long long count
    cdef public long long bytes
    cdef public object qos0
    cdef public object _ahead
    cdef public object _head
    cdef public object _skip
    cdef public object _mem
    cdef public long long _mem_from
    cdef public long long _mem_bytes
    cdef public bint _caching
    # the session's bounds (storage.max_queued_*), kept here by PersistentSession for the relay
    cdef public long long max_count
    cdef public long long max_bytes
    # ``_mem``'s append and popleft, bound once per deque (a method look-up per message otherwise)
    cdef object _bound_mem
    cdef object _mem_append
    cdef object _mem_popleft
    # the class of the last head ``pop_plain`` read and the offset of its ``expires_at`` slot
    cdef object _msg_type
    cdef Py_ssize_t _msg_expires

    cdef int _bind_mem(self, mem) except -1

    cdef int append_plain(self, tuple item, bytes entry, SentTable table) except -1
    cpdef object pop_plain(self)
