# The MQTT data representation (MQTT 5.0 section 1.5) at the byte level, shared by the property,
# decoder and encoder modules: a bounded reader and a growing writer of integers, Variable Byte
# Integers, UTF-8 strings and binary data. The per-field helpers are ``inline`` here so that each
# module that cimports them compiles them in (no call across modules per byte or field); what they
# raise and the rarely taken paths live in wire.pyx.

from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Realloc
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memcpy


cdef enum:
    # Largest value of a four-byte Variable Byte Integer (and so of a Remaining Length).
    MAX_VBI = 268435455


# -- reading -------------------------------------------------------------------------------------

cdef struct _Reader:
    const unsigned char* data
    Py_ssize_t pos
    Py_ssize_t end


cdef int _truncated() except -1
cdef int _trailing() except -1
cdef int _vbi_too_long() except -1
cdef str _utf8(const unsigned char* p, Py_ssize_t n)
cdef str _utf8_strict(const unsigned char* p, Py_ssize_t n)


cdef inline str _utf8_scanned(const unsigned char* p, Py_ssize_t n, unsigned char high):
    # The str of ``n`` bytes at ``p`` that the caller scanned already (no U+0000; ``high``: the OR of
    # the bytes): ASCII decoded at once, the rest by the strict codec (``_utf8_strict``, rarely).
    if high < 0x80:
        return PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    return _utf8_strict(p, n)


cdef inline int _r_u8(_Reader* r) except -1:
    if r.pos >= r.end:
        _truncated()
    r.pos += 1
    return r.data[r.pos - 1]


cdef inline int _r_u16(_Reader* r) except -1:
    if r.end - r.pos < 2:
        _truncated()
    r.pos += 2
    return (r.data[r.pos - 2] << 8) | r.data[r.pos - 1]


cdef inline long long _r_u32(_Reader* r) except -1:
    cdef const unsigned char* p
    if r.end - r.pos < 4:
        _truncated()
    p = r.data + r.pos
    r.pos += 4
    return ((<long long>p[0]) << 24) | (p[1] << 16) | (p[2] << 8) | p[3]


cdef inline long long _r_vbi(_Reader* r) except -1:
    cdef long long value = 0
    cdef int shift = 0
    cdef unsigned int byte
    while True:
        if r.pos >= r.end:
            _truncated()
        byte = r.data[r.pos]
        r.pos += 1
        value |= (<long long>(byte & 0x7F)) << shift
        if not (byte & 0x80):
            return value
        shift += 7
        if shift == 28:
            _vbi_too_long()


cdef inline str _r_str(_Reader* r):
    cdef Py_ssize_t n = _r_u16(r)
    cdef str value
    if r.end - r.pos < n:
        _truncated()
    value = _utf8(r.data + r.pos, n)
    r.pos += n
    return value


cdef inline bytes _r_bin(_Reader* r):
    cdef Py_ssize_t n = _r_u16(r)
    if r.end - r.pos < n:
        _truncated()
    r.pos += n
    return PyBytes_FromStringAndSize(<const char*>(r.data + r.pos - n), n)


# -- writing -------------------------------------------------------------------------------------

cdef struct _Out:
    unsigned char* data
    Py_ssize_t len
    Py_ssize_t cap


cdef int _grow(_Out* o, Py_ssize_t need) except -1
cdef int _w_str(_Out* o, object value) except -1
cdef int _w_bin(_Out* o, object value) except -1


cdef inline int _reserve(_Out* o, Py_ssize_t n) except -1:
    if o.len + n <= o.cap:
        return 0
    return _grow(o, o.len + n)


cdef inline Py_ssize_t _vbi_size(Py_ssize_t value) noexcept:
    if value < 128:
        return 1
    if value < 16384:
        return 2
    if value < 2097152:
        return 3
    return 4


cdef inline unsigned char* _put_vbi(unsigned char* d, Py_ssize_t value) noexcept:
    while value >= 128:
        d[0] = (value & 0x7F) | 0x80
        value >>= 7
        d += 1
    d[0] = value
    return d + 1


cdef inline int _w_u8(_Out* o, unsigned int value) except -1:
    _reserve(o, 1)
    o.data[o.len] = value
    o.len += 1
    return 0


cdef inline int _w_u16(_Out* o, unsigned int value) except -1:
    _reserve(o, 2)
    o.data[o.len] = value >> 8
    o.data[o.len + 1] = value & 0xFF
    o.len += 2
    return 0


cdef inline int _w_u32(_Out* o, unsigned long value) except -1:
    _reserve(o, 4)
    o.data[o.len] = (value >> 24) & 0xFF
    o.data[o.len + 1] = (value >> 16) & 0xFF
    o.data[o.len + 2] = (value >> 8) & 0xFF
    o.data[o.len + 3] = value & 0xFF
    o.len += 4
    return 0


cdef inline int _w_vbi(_Out* o, Py_ssize_t value) except -1:
    _reserve(o, 4)
    o.len = _put_vbi(o.data + o.len, value) - o.data
    return 0


cdef inline int _w_raw(_Out* o, const void* p, Py_ssize_t n) except -1:
    if n:
        _reserve(o, n)
        memcpy(o.data + o.len, p, n)
        o.len += n
    return 0
