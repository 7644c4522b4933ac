# cython: language_level=3
"""The process's spare output allocation (see ``outbuf.pxd``): one ``PyObject_Malloc`` block of
``SPARE_MIN`` to ``SPARE_MAX`` bytes, left by the send that emptied a large output and taken by
the next output that grows past ``SPARE_FROM`` bytes. Both run with the GIL held and never
release it (an output is a ``bytearray``), so the spare needs no lock.

No I/O and no fluxmq imports.
"""

from cpython.bytearray cimport PyByteArray_GET_SIZE
from libc.string cimport memcpy


cdef extern from "Python.h":
    void _spare_free "PyObject_Free"(void* p)


cdef char* _spare = NULL
cdef Py_ssize_t _spare_alloc = 0
cdef long long _kept = 0  # allocations handed to the spare
cdef long long _adopted = 0  # growths served by the spare


cdef int spare_adopt(bytearray out, Py_ssize_t size) except -1:
    """Give ``out`` the spare when it must grow to ``size`` bytes and the spare holds them: its
    bytes copied over, its own allocation freed. 0 when it did not (no spare, too small, the
    allocation holds ``size`` already, or exported)."""
    global _spare, _spare_alloc, _adopted
    cdef _OutBytes* b = <_OutBytes*><void*>out
    cdef Py_ssize_t held = PyByteArray_GET_SIZE(out)
    if _spare == NULL or size + 1 > _spare_alloc or b.ob_exports \
            or size + 1 <= b.ob_alloc - (b.ob_start - b.ob_bytes):
        return 0
    cdef char* p = _spare
    if held:
        memcpy(p, b.ob_start, held)
    if b.ob_bytes != NULL:
        _spare_free(b.ob_bytes)
    b.ob_bytes = p
    b.ob_start = p
    b.ob_alloc = _spare_alloc
    _spare = NULL
    _spare_alloc = 0
    _out_set_size(out, size)
    p[size] = 0
    _adopted += 1
    return 1


cdef int spare_keep(bytearray out) except -1:
    """Empty ``out`` (all of it was sent) by taking its allocation as the spare, when it is between
    ``SPARE_MIN`` and ``SPARE_MAX`` bytes and larger than the spare held (which is freed); ``out``
    is left with no allocation, as ``bytearray()``. 0 when it did not (``out`` is unchanged)."""
    global _spare, _spare_alloc, _kept
    cdef _OutBytes* b = <_OutBytes*><void*>out
    if b.ob_exports or b.ob_bytes == NULL or b.ob_alloc < SPARE_MIN or b.ob_alloc > SPARE_MAX \
            or b.ob_alloc <= _spare_alloc:
        return 0
    if _spare != NULL:
        _spare_free(_spare)
    _spare = b.ob_bytes
    _spare_alloc = b.ob_alloc
    b.ob_bytes = NULL
    b.ob_start = NULL
    b.ob_alloc = 0
    _out_set_size(out, 0)
    _kept += 1
    return 1


def keep(bytearray out not None) -> bool:
    """``spare_keep`` for Python (tests): ``out``'s allocation becomes the spare, ``out`` is emptied."""
    return spare_keep(out) == 1


def spare_size() -> int:
    """The bytes of the spare allocation held now (0: none)."""
    return _spare_alloc


def spare_counts() -> tuple:
    """``(kept, adopted)``: allocations handed to the spare and growths it served, since start."""
    return (_kept, _adopted)


def release() -> None:
    """Free the spare (tests; a process that wants its memory back)."""
    global _spare, _spare_alloc
    if _spare != NULL:
        _spare_free(_spare)
    _spare = NULL
    _spare_alloc = 0
