# cython: language_level=3
"""The MQTT data representation (MQTT 5.0 section 1.5): what the byte-level readers and writers of
wire.pxd raise, and their rarely taken paths (the inline per-field helpers are in wire.pxd)."""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8
from libc.string cimport memchr

from fluxmq.errors import MalformedPacket

#: Largest Remaining Length a four-byte Variable Byte Integer can carry.
MAX_REMAINING_LENGTH = MAX_VBI


cdef int _truncated() except -1:
    raise MalformedPacket("packet body ends inside a field (remaining length too short)")


cdef int _trailing() except -1:
    raise MalformedPacket("bytes left over at the end of the packet (remaining length too long)")


cdef int _vbi_too_long() except -1:
    raise MalformedPacket("Variable Byte Integer longer than 4 bytes (MQTT-1.5.5)")


cdef str _utf8(const unsigned char* p, Py_ssize_t n):
    """Decode an MQTT UTF-8 string: well-formed, no surrogates, no U+0000 (MQTT-1.5.4-1/2)."""
    cdef Py_ssize_t i
    cdef unsigned char high = 0
    for i in range(n):
        if p[i] == 0:
            raise MalformedPacket("U+0000 in a UTF-8 string (MQTT-1.5.4-2)")
        high |= p[i]
    return _utf8_scanned(p, n, high)


cdef str _utf8_strict(const unsigned char* p, Py_ssize_t n):
    """Decode ``n`` bytes that are not all ASCII (``_utf8_scanned``'s rare path): the strict codec
    rejects ill-formed sequences, overlongs and encoded surrogates (MQTT-1.5.4-1)."""
    try:
        return PyUnicode_DecodeUTF8(<const char*>p, n, "strict")
    except UnicodeDecodeError:
        raise MalformedPacket("ill-formed UTF-8 string (MQTT-1.5.4-1)") from None


cdef int _grow(_Out* o, Py_ssize_t need) except -1:
    """Grow ``o`` (doubling, from 128 bytes) to hold at least ``need`` bytes."""
    cdef Py_ssize_t cap = o.cap if o.cap else 128
    cdef void* p
    while cap < need:
        cap *= 2
    p = PyMem_Realloc(o.data, cap)
    if p == NULL:
        raise MemoryError()
    o.data = <unsigned char*>p
    o.cap = cap
    return 0


cdef int _w_str(_Out* o, object value) except -1:
    cdef Py_ssize_t n
    cdef const char* p
    if not isinstance(value, str):
        raise TypeError(f"expected str, got {type(value).__name__}")
    p = PyUnicode_AsUTF8AndSize(value, &n)
    if n > 65535:
        raise ValueError("UTF-8 string longer than 65,535 bytes")
    if memchr(p, 0, n) != NULL:
        raise ValueError("U+0000 is not allowed in an MQTT string (MQTT-1.5.4-2)")
    _w_u16(o, n)
    _w_raw(o, p, n)
    return 0


cdef int _w_bin(_Out* o, object value) except -1:
    cdef Py_buffer view
    PyObject_GetBuffer(value, &view, PyBUF_SIMPLE)
    try:
        if view.len > 65535:
            raise ValueError("binary data longer than 65,535 bytes")
        _w_u16(o, view.len)
        _w_raw(o, view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return 0
