# Big-endian integers at a byte pointer, for the Route stream's frames between workers
# (``_linkframe``: a plain batch's lead, an ack; ``_ringcopy``: a ring's descriptor). ``inline`` here,
# so each module that cimports them compiles them in.

from libc.stdint cimport uint64_t


cdef inline unsigned long _get_u32(const unsigned char* p) noexcept:
    return (<unsigned long>p[0] << 24) | (<unsigned long>p[1] << 16) | (<unsigned long>p[2] << 8) | p[3]


cdef inline void _put_u32(unsigned char* p, unsigned long v) noexcept:
    p[0] = (v >> 24) & 0xFF
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef inline uint64_t _get_u64(const unsigned char* p) noexcept:
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v = (v << 8) | p[i]
    return v


cdef inline void _put_u64(unsigned char* p, uint64_t v) noexcept:
    cdef int i
    for i in range(7, -1, -1):
        p[i] = v & 0xFF
        v >>= 8
