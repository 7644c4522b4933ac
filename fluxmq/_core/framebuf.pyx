# cython: language_level=3
"""Large received frames as ``bytes`` objects written in place, reused once nothing holds them.

A fan-in batch between workers is a frame of ~230 KB (``fluxmq.cluster.unix``). Read into the
socket reader's own buffer and copied out into a fresh ``bytes``, each batch cost a copy and a
fresh allocation over glibc's mmap threshold whose pages the copy faulted in one by one.
``FrameBuffers.take`` gives the reader a ``bytes`` of the frame's length and a writable view of
its bytes to receive into; the ``bytes`` goes to the consumer as any other. The reader keeps up to
``SLOTS`` of them and writes one again (its length set, its cached hash dropped) only while nothing
else holds a reference to it: whatever keeps a batch's bytes (a ``FramedBatch`` still referenced,
a memoryview over them, a test's list) keeps the object, so it is never written again; what is
derived from a batch (a message's topic and payload, a stored record) is a copy already.

No I/O and no fluxmq imports.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF


cdef extern from "Python.h":
    void Py_SET_SIZE(PyObject* o, Py_ssize_t size)
    Py_ssize_t Py_REFCNT(PyObject* o)
    Py_ssize_t Py_SIZE(PyObject* o)
    ctypedef struct PyBytesObject:
        Py_hash_t ob_shash
    object PyMemoryView_FromMemory(char* mem, Py_ssize_t size, int flags)
    int PyBUF_WRITE

#: allocations kept per reader: the batch being read, the one its consumer still holds (a stream
#: binds a batch until it has the next one) and one more
DEF SLOTS = 3


cdef class FrameBuffers:
    """The ``bytes`` allocations of one socket reader's large frames (see the module docstring).
    ``keep_max``: a larger allocation is not kept (freed when its frame is dropped). ``allocated``
    and ``reused`` count ``take``'s new allocations and reuses."""

    cdef PyObject* _data[SLOTS]
    cdef Py_ssize_t _cap[SLOTS]
    cdef readonly Py_ssize_t keep_max
    cdef readonly long long allocated
    cdef readonly long long reused

    def __cinit__(self, Py_ssize_t keep_max=8 << 20):
        cdef int i
        for i in range(SLOTS):
            self._data[i] = NULL
            self._cap[i] = 0
        self.keep_max = keep_max

    def __dealloc__(self):
        cdef int i
        for i in range(SLOTS):
            Py_XDECREF(self._data[i])
            self._data[i] = NULL

    def take(self, Py_ssize_t n):
        """``(frame, view)``: ``frame`` a ``bytes`` of length ``n`` (its content undefined) and
        ``view`` a writable memoryview of its ``n`` bytes to receive the frame into. ``view`` does
        not hold ``frame``: keep ``frame`` while writing and release ``view`` before handing
        ``frame`` on. The smallest kept allocation that nothing else holds and that has ``n`` to
        ``4n`` bytes is taken (no allocation, its pages mapped already: a stream's batches vary
        in size); otherwise a new one, a quarter larger than ``n``, kept in a slot that is empty
        or free (what that slot held is freed)."""
        cdef int i, best = -1
        cdef PyObject* d
        cdef Py_ssize_t cap
        if n < 0:
            raise ValueError("negative frame length")
        for i in range(SLOTS):
            d = self._data[i]
            if (d is not NULL and Py_REFCNT(d) == 1 and n <= self._cap[i] <= 4 * n
                    and (best < 0 or self._cap[i] < self._cap[best])):
                best = i  # (the smallest that holds it)
        if best >= 0:
            self.reused += 1
            return self._shaped(self._data[best], n)
        cap = max(n + (n >> 2), 1)  # (never the empty bytes singleton)
        frame = PyBytes_FromStringAndSize(NULL, cap)
        self.allocated += 1
        if cap <= self.keep_max:
            for i in range(SLOTS):  # an empty slot, else one nothing else holds
                d = self._data[i]
                if d is NULL:
                    best = i
                    break
                if best < 0 and Py_REFCNT(d) == 1:
                    best = i
            if best >= 0:
                Py_XDECREF(self._data[best])  # (free: too small or too large for the frames now)
                Py_INCREF(frame)
                self._data[best] = <PyObject*>frame
                self._cap[best] = cap
        return self._shaped(<PyObject*>frame, n)

    cdef tuple _shaped(self, PyObject* d, Py_ssize_t n):
        Py_SET_SIZE(d, n)
        (<PyBytesObject*>d).ob_shash = -1  # (a hash taken of its earlier content)
        frame = <bytes>d
        cdef char* p = PyBytes_AS_STRING(frame)
        p[n] = 0
        return frame, PyMemoryView_FromMemory(p, n, PyBUF_WRITE)

    def kept(self):
        """The allocations kept, as (length now, allocated bytes, references) per slot in use."""
        cdef int i
        cdef list out = []
        for i in range(SLOTS):
            if self._data[i] is not NULL:
                out.append((Py_SIZE(self._data[i]), self._cap[i], Py_REFCNT(self._data[i])))
        return out
