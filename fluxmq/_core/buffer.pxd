# C-level declarations of the output buffer and the receive-buffer pool, so other Cython modules
# (the protocol layer, fan-out) call them without Python method dispatch.

cimport cython


cdef class _Chunk:
    cdef char* data
    cdef Py_ssize_t capacity
    cdef Py_ssize_t exports
    cdef Py_ssize_t view_start
    cdef Py_ssize_t view_len


@cython.final
cdef class WriteBuffer:
    cdef _Chunk _chunk
    cdef char* _data
    cdef Py_ssize_t _start
    cdef Py_ssize_t _end
    cdef Py_ssize_t _cap
    cdef Py_ssize_t _initial

    cdef char* _make_room(self, Py_ssize_t n) except NULL
    cdef int write_raw(self, const char* data, Py_ssize_t n) except -1
    cdef Py_ssize_t pending(self) noexcept
    cpdef write(self, object data)
    cpdef write_publish(self, bytes encoded, int packet_id, bint dup)
    cpdef memoryview peek(self)
    cpdef consume(self, Py_ssize_t n)
    cpdef clear(self)


@cython.final
cdef class BufferPool:
    cdef readonly Py_ssize_t size
    cdef readonly Py_ssize_t count
    cdef list _idle
    cdef set _idle_ids

    cpdef bytearray acquire(self)
    cpdef release(self, bytearray buf)
