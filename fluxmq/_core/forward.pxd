# C-level declarations of the forwarded-message framing, so the relay appends to a peer's queue in C.

from cpython.object cimport PyObject


cdef class ForwardRun:
    cdef public bytes data
    cdef public Py_ssize_t count


cdef class LinksVersion:
    cdef public long long value


cdef class ForwardQueue:
    # the tail: framed items not yet sealed into ``runs``, written into a ``bytes`` of ``capacity``
    # bytes (owned here; NULL: none yet) that ``seal`` hands over as the run's data
    cdef PyObject* _data
    cdef char* buf  # its bytes
    cdef Py_ssize_t size
    cdef readonly Py_ssize_t capacity  # (0: no tail bytes held)
    cdef Py_ssize_t _keep  # the recent runs' size: what the next tail is allocated with (_grow)
    # bytes and messages of the run being written sealed so far because its tail was full
    cdef Py_ssize_t _split
    cdef Py_ssize_t _split_count
    # sealed runs' bytes kept whole (their allocations, ``_spare_cap``), reused for a tail once
    # nothing else holds them (the link dropped the batch when it was acknowledged)
    cdef PyObject* _spare[8]
    cdef Py_ssize_t _spare_cap[8]
    cdef readonly Py_ssize_t allocations  # tails' bytes allocated (not a spare written again)
    # spares taken or kept so far, and that count at the last ``release_unused`` (idle: equal)
    cdef long long _spare_uses
    cdef long long _spare_seen
    cdef object __weakref__  # (the module's registry of queues: ``release_unused``)
    cdef public Py_ssize_t tail_count
    cdef public Py_ssize_t queued
    cdef public Py_ssize_t queued_bytes
    cdef public Py_ssize_t max_messages
    cdef public Py_ssize_t max_bytes
    cdef public Py_ssize_t run_messages
    cdef public Py_ssize_t run_bytes
    cdef public object runs
    cdef public object wake

    cdef inline bint full(self):
        return self.queued >= self.max_messages or self.queued_bytes >= self.max_bytes

    cdef int append_plain(self, str topic, str origin, int qos, bytes payload) except -1
    cdef int append_raw(self, const char* t, Py_ssize_t tlen, const char* o, Py_ssize_t olen,
                        int qos, const char* payload, Py_ssize_t plen) except -1
    cdef int _grow(self, Py_ssize_t need) except -1
    cdef int _free_slot(self) noexcept
    cdef Py_ssize_t _release_unused(self)
    cpdef seal(self)
    cdef int _seal(self, bint split) except -1


cdef Py_ssize_t plain_item(const unsigned char* p, Py_ssize_t i, Py_ssize_t end,
                           Py_ssize_t* fields) noexcept
