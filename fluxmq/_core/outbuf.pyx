# cython: language_level=3
"""The process's spare output allocations (see ``outbuf.pxd``): up to ``SPARE_COUNT``
``PyObject_Malloc`` blocks of ``SPARE_MIN`` to ``SPARE_MAX`` bytes each, at most ``SPARE_BYTES`` in
all, left by the sends that emptied large outputs and taken by the next outputs that grow past
``SPARE_FROM`` bytes. Both run with the GIL held and never release it (an output is a
``bytearray``), so the spares need no lock.

No I/O and no fluxmq imports.
"""

from cpython.bytearray cimport PyByteArray_GET_SIZE
from libc.string cimport memcpy


cdef extern from "Python.h":
    void _spare_free "PyObject_Free"(void* p)


cdef char* _spares[SPARE_COUNT]
cdef Py_ssize_t _allocs[SPARE_COUNT]
cdef int _count = 0  # spares held: _spares[:_count]
cdef Py_ssize_t _held = 0  # their bytes
cdef long long _kept = 0  # allocations handed to the spares
cdef long long _adopted = 0  # growths served by a spare
cdef long long _seen = -1  # _kept + _adopted at the last release_unused


cdef inline int _drop(int i):
    """Forget spare ``i`` (not freed): the last one takes its slot."""
    global _count, _held
    _held -= _allocs[i]
    _count -= 1
    _spares[i] = _spares[_count]
    _allocs[i] = _allocs[_count]
    _spares[_count] = NULL
    _allocs[_count] = 0
    return 0


cdef inline int _smallest():
    cdef int i, best = 0
    for i in range(1, _count):
        if _allocs[i] < _allocs[best]:
            best = i
    return best


cdef int spare_adopt(bytearray out, Py_ssize_t size) except -1:
    """Give ``out`` the smallest spare that holds ``size`` bytes when it must grow to them: its
    bytes copied over; its own allocation takes that spare's place when it is of a spare's size
    and no larger than the one taken (too small for ``out``, not for another output), or is
    freed. 0 when it did not (no spare holds it, the allocation holds ``size`` already, or
    exported)."""
    global _held, _adopted
    cdef _OutBytes* b = <_OutBytes*><void*>out
    cdef Py_ssize_t held = PyByteArray_GET_SIZE(out)
    cdef Py_ssize_t alloc, own = b.ob_alloc
    cdef int i, best = -1
    if _count == 0 or b.ob_exports or size + 1 <= own - (b.ob_start - b.ob_bytes):
        return 0
    for i in range(_count):
        if _allocs[i] > size and (best < 0 or _allocs[i] < _allocs[best]):
            best = i
    if best < 0:
        return 0
    cdef char* p = _spares[best]
    alloc = _allocs[best]
    if held:
        memcpy(p, b.ob_start, held)
    if b.ob_bytes != NULL and SPARE_MIN <= own <= alloc:
        _spares[best] = b.ob_bytes  # (no larger than the one taken: the bounds hold)
        _allocs[best] = own
        _held += own - alloc
    else:
        _drop(best)
        if b.ob_bytes != NULL:
            _spare_free(b.ob_bytes)
    b.ob_bytes = p
    b.ob_start = p
    b.ob_alloc = alloc
    _out_set_size(out, size)
    p[size] = 0
    _adopted += 1
    return 1


cdef int spare_keep(bytearray out) except -1:
    """Empty ``out`` (all of it was sent) by taking its allocation as a spare, when it is between
    ``SPARE_MIN`` and ``SPARE_MAX`` bytes and there is room: fewer than ``SPARE_COUNT`` spares and
    ``SPARE_BYTES`` not passed, or else the smallest spare is smaller (it is freed); ``out`` is left
    with no allocation, as ``bytearray()``. 0 when it did not (``out`` is unchanged)."""
    global _count, _held, _kept
    cdef _OutBytes* b = <_OutBytes*><void*>out
    cdef Py_ssize_t alloc = b.ob_alloc
    cdef int slot
    if b.ob_exports or b.ob_bytes == NULL or alloc < SPARE_MIN or alloc > SPARE_MAX:
        return 0
    if _count < SPARE_COUNT and _held + alloc <= SPARE_BYTES:
        slot = _count
        _count += 1
    else:
        slot = _smallest()
        if _allocs[slot] >= alloc or _held - _allocs[slot] + alloc > SPARE_BYTES:
            return 0
        _spare_free(_spares[slot])
        _held -= _allocs[slot]
    _spares[slot] = b.ob_bytes
    _allocs[slot] = alloc
    _held += alloc
    b.ob_bytes = NULL
    b.ob_start = NULL
    b.ob_alloc = 0
    _out_set_size(out, 0)
    _kept += 1
    return 1


def keep(bytearray out not None) -> bool:
    """``spare_keep`` for Python (tests): ``out``'s allocation becomes a spare, ``out`` is emptied."""
    return spare_keep(out) == 1


def spare_size() -> int:
    """The bytes of the spare allocations held now (0: none)."""
    return _held


def spare_allocs() -> list:
    """The bytes of each spare allocation held now, smallest first."""
    return sorted(_allocs[i] for i in range(_count))


def spare_counts() -> tuple:
    """``(kept, adopted)``: allocations handed to the spares and growths they served, since start."""
    return (_kept, _adopted)


def release() -> int:
    """Free the spares (tests; a process that wants its memory back); the bytes freed."""
    global _count, _held
    cdef Py_ssize_t freed = _held
    while _count:
        _count -= 1
        _spare_free(_spares[_count])
        _spares[_count] = NULL
        _allocs[_count] = 0
    _held = 0
    return freed


def release_unused() -> int:
    """Free the spares if no output gave or took one since the previous call (no busy output now:
    the node calls this every few seconds); the bytes freed."""
    global _seen
    cdef long long now = _kept + _adopted
    if now != _seen:
        _seen = now
        return 0
    return release()
