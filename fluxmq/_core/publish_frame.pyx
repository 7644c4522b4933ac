# cython: language_level=3
"""A PUBLISH written into a subscriber's output straight from the bytes it arrived in.

``append_publish_frame`` appends one whole PUBLISH (not retained, not DUP: a delivery's first
send) to a bytearray from a topic and a payload given as pointers (a peer batch's bytes, a read's
bytes): one resize and two copies, no encoded ``bytes`` in between. ``version`` 4 (3.1.1, also for
3.1) or 5 (then an empty property block). The caller vouches for the topic (a valid UTF-8 topic
name, as the message it came in passed the decoder or the peer's encoder); what this checks is the
MQTT limits the frame itself has (topic length, Remaining Length).

No I/O and no fluxmq imports.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from libc.string cimport memcpy

DEF MAX_VBI = 268435455


cdef inline Py_ssize_t _body_size(Py_ssize_t tlen, Py_ssize_t plen, int qos, int version) noexcept:
    return 2 + tlen + (2 if qos else 0) + (1 if version == 5 else 0) + plen


cdef Py_ssize_t publish_frame_size(Py_ssize_t tlen, Py_ssize_t plen, int qos, int version) noexcept:
    """The bytes ``append_publish_frame`` writes for these lengths (the Remaining Length unchecked)."""
    cdef Py_ssize_t body = _body_size(tlen, plen, qos, version)
    if body < 128:
        return 2 + body
    if body < 16384:
        return 3 + body
    if body < 2097152:
        return 4 + body
    return 5 + body


cdef int append_publish_frame(bytearray out, const unsigned char* topic, Py_ssize_t tlen,
                              const unsigned char* payload, Py_ssize_t plen, int qos, int packet_id,
                              int version) except -1:
    """Append the PUBLISH of ``topic[:tlen]`` and ``payload[:plen]`` at ``qos`` (0, 1 or 2; the
    packet id with QoS 1 and 2) to ``out``; returns the bytes written."""
    cdef Py_ssize_t body = _body_size(tlen, plen, qos, version), old = PyByteArray_GET_SIZE(out)
    cdef Py_ssize_t n, v
    cdef unsigned char* d
    if tlen > 0xFFFF:
        raise ValueError("topic longer than 65,535 bytes")
    if body > MAX_VBI:
        raise ValueError("packet larger than the MQTT limit of 268,435,455 bytes")
    n = publish_frame_size(tlen, plen, qos, version)
    PyByteArray_Resize(out, old + n)
    d = <unsigned char*>PyByteArray_AS_STRING(out) + old
    d[0] = 0x30 | (qos << 1)
    d += 1
    v = body
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
    return n


def frame(bytes topic, bytes payload, int qos=0, int packet_id=0, int version=4) -> bytes:
    """``append_publish_frame`` into a new buffer (for tests)."""
    cdef bytearray out = bytearray()
    append_publish_frame(out, <const unsigned char*><const char*>topic, len(topic),
                         <const unsigned char*><const char*>payload, len(payload), qos, packet_id,
                         version)
    return bytes(out)
