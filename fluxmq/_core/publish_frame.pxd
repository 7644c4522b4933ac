# A whole PUBLISH appended to an output buffer from raw pointers (see publish_frame.pyx).
# The frame's size and its writing are inline here: the relay writes a run of frames into one
# resized output (``_write_block``) and a call per frame through the module's pointer table cost
# more than the arithmetic.

from libc.string cimport memcpy


cdef inline Py_ssize_t publish_body_size(Py_ssize_t tlen, Py_ssize_t plen, int qos, int version) noexcept:
    """A PUBLISH's Remaining Length (no properties but 5.0's empty block)."""
    return 2 + tlen + (2 if qos else 0) + (1 if version == 5 else 0) + plen


cdef inline Py_ssize_t publish_frame_size(Py_ssize_t tlen, Py_ssize_t plen, int qos, int version) noexcept:
    """The bytes ``append_publish_frame`` writes for these lengths (the Remaining Length unchecked)."""
    cdef Py_ssize_t body = publish_body_size(tlen, plen, qos, version)
    if body < 128:
        return 2 + body
    if body < 16384:
        return 3 + body
    if body < 2097152:
        return 4 + body
    return 5 + body


cdef inline Py_ssize_t write_publish_frame(unsigned char* d, const unsigned char* topic, Py_ssize_t tlen,
                                           const unsigned char* payload, Py_ssize_t plen, int qos,
                                           int packet_id, int version) noexcept:
    """Write the PUBLISH at ``d`` (``publish_frame_size`` bytes, its limits checked by the caller);
    returns the bytes written."""
    cdef Py_ssize_t v = publish_body_size(tlen, plen, qos, version)
    cdef unsigned char* start = d
    d[0] = 0x30 | (qos << 1)
    d += 1
    while v >= 128:
        d[0] = (v & 0x7F) | 0x80
        v >>= 7
        d += 1
    d[0] = <unsigned char>v
    d[1] = (tlen >> 8) & 0xFF
    d[2] = tlen & 0xFF
    memcpy(d + 3, topic, tlen)
    d += 3 + tlen
    if qos:
        d[0] = (packet_id >> 8) & 0xFF
        d[1] = packet_id & 0xFF
        d += 2
    if version == 5:
        d[0] = 0
        d += 1
    if plen:
        memcpy(d, payload, plen)
    return d + plen - start


cdef int append_publish_frame(bytearray out, const unsigned char* topic, Py_ssize_t tlen,
                              const unsigned char* payload, Py_ssize_t plen, int qos, int packet_id,
                              int version) except -1

cdef bytes publish_frame_bytes(const unsigned char* topic, Py_ssize_t tlen,
                               const unsigned char* payload, Py_ssize_t plen, int qos, int packet_id,
                               int version)
