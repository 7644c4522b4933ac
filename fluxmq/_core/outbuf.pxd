# cython: language_level=3
"""Growing a connection's output buffer (a ``bytearray``) for an append, in doublings.

``PyByteArray_Resize`` allocates an empty buffer's first append exactly, each next one exactly
again until the buffer is ~720 bytes (an append of more than 1/8 is a "major upsize"), then 1/8
more per growth: filling one send's worth of ~90-byte PUBLISHes (the flush empties the buffer and
gives a larger one back, ``_hub_read._clear``) took ~28 reallocs for 70 of them, and realloc,
free and the copies were ~15 % of a fan-out's user time. ``out_resize`` doubles what the appends
need instead (6 reallocs for 70) while the buffer is below ``DOUBLE_BELOW``; a larger one (a slow
reader's backlog) grows as CPython grows it, so a buffer holds at most twice its bytes only while
it is small. ``DOUBLE_BELOW`` is 256 KiB because a receiving worker writes a whole batch from the
other worker into one fan-in subscriber's output (~1,650 messages, ~130 KB): with 1/8 growth past
64 KiB that was ~6 more reallocs copying the whole buffer (xcross, bench/RESULTS.md).

The process's spares (``outbuf.pyx``): the send that empties an output of ``SPARE_MIN`` to
``SPARE_MAX`` bytes allocated hands its allocation to the process (``spare_keep``: the output is
left with none) instead of shrinking it to one byte, and the next output that grows past
``SPARE_FROM`` bytes takes the smallest spare that holds what it needs (``spare_adopt``: one copy
of what it holds). A fan-in's subscriber fills ~180 KB per send; its allocation was a fresh
``mmap`` each time (glibc maps chunks of 128 KiB and more, and the shrink to one byte and the next
growth are ``mremap`` calls), so nearly every byte written landed on a newly faulted page (~22
page faults and ~2 ``mremap`` per 1,000 deliveries, bench/RESULTS.md "fmem"). Several busy
subscribers on one worker are all sent before the next read fills them again, so the process
keeps up to ``SPARE_COUNT`` spares, one per busy output (with one spare, only one of them got it:
~10 faults and ~2-3 ``mremap`` per 1,000 deliveries with 2 or 4 wildcard subscribers, "fmem2"),
and at most ``SPARE_BYTES`` bytes in all; an idle connection keeps nothing, and spares that no
output took or gave for a while are freed (``release_unused``, from the node's heap trim).
"""

from cpython.bytearray cimport PyByteArray_GET_SIZE, PyByteArray_Resize


cdef extern from "Python.h":
    ctypedef struct _OutBytes "PyByteArrayObject":
        Py_ssize_t ob_alloc  # bytes allocated at ob_bytes
        char* ob_bytes
        char* ob_start  # the logical start (a deleted prefix moves it)
        Py_ssize_t ob_exports
    void _out_set_size "Py_SET_SIZE"(object o, Py_ssize_t size)
    void* _out_realloc "PyObject_Realloc"(void* p, size_t n)


cdef enum:
    DOUBLE_BELOW = 262144
    SPARE_FROM = 32768  # an output growing past this many bytes takes a spare, if one holds them
    SPARE_MIN = 65536  # an emptied output's allocation kept as a spare: from this many bytes...
    SPARE_MAX = 1048576  # ... to this many
    SPARE_COUNT = 16  # spares held at most (one per busy output: the rest grow as before)
    SPARE_BYTES = 4194304  # bytes held in all spares at most


cdef int spare_adopt(bytearray out, Py_ssize_t size) except -1
cdef int spare_keep(bytearray out) except -1


cdef inline int out_resize(bytearray out, Py_ssize_t size) except -1:
    """``PyByteArray_Resize(out, size)`` for an append (``size`` >= the current size): past the
    allocation, a buffer below ``DOUBLE_BELOW`` bytes gets ``2 * size`` (the size of the next
    requests stays above half the allocation, so CPython's own resizes do not shrink it back)."""
    cdef _OutBytes* b = <_OutBytes*><void*>out
    cdef char* p
    if size + 1 <= b.ob_alloc - (b.ob_start - b.ob_bytes) and not b.ob_exports and b.ob_bytes != NULL \
            and size >= PyByteArray_GET_SIZE(out):
        # the allocation holds it: what PyByteArray_Resize does then, without its calls
        _out_set_size(out, size)
        b.ob_start[size] = 0
        return 0
    if size >= SPARE_FROM and spare_adopt(out, size):
        return 0
    if size + 1 <= b.ob_alloc - (b.ob_start - b.ob_bytes) or size >= DOUBLE_BELOW \
            or b.ob_start != b.ob_bytes or b.ob_exports:
        PyByteArray_Resize(out, size)
        return 0
    p = <char*>_out_realloc(b.ob_bytes, <size_t>(2 * size))
    if p == NULL:
        raise MemoryError()
    b.ob_bytes = p
    b.ob_start = p
    b.ob_alloc = 2 * size
    _out_set_size(out, size)
    p[size] = 0
    return 0
