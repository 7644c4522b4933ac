# cython: language_level=3
"""A PUBLISH packet written straight into an output ``bytearray`` from its topic's and payload's
bytes (e.g. a read buffer's), without the ``bytes`` of ``codec.encode_publish``.

``append_publish_frame`` writes what ``encode_publish(topic, payload, qos, False, False,
packet_id, None, version)`` returns, byte for byte: not retained, no DUP, and for 5.0 an empty
property block. The caller has checked the topic (a valid topic name of at most 65,535 bytes).
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from libc.string cimport memcpy


cdef int append_publish_frame(bytearray out, const unsigned char* topic, Py_ssize_t tlen,
                              const unsigned char* payload, Py_ssize_t plen, int qos, int packet_id,
                              int version) except -1:
    """Append the PUBLISH of ``topic`` (``tlen`` bytes) and ``payload`` (``plen`` bytes) at QoS
    ``qos`` (0 or 1; ``packet_id`` with QoS 1) for protocol ``version`` (4 or 5: 3.1 and 3.1.1
    share the frame) to ``out``; returns the bytes written."""
    cdef Py_ssize_t body = 2 + tlen + plen, head, at, n
    cdef unsigned char* d
    if qos:
        body += 2
    if version == 5:
        body += 1  # the empty property block's length
    if body > 268435455:
        raise ValueError("packet larger than the MQTT limit of 268,435,455 bytes")
    head = 2 if body < 128 else 3 if body < 16384 else 4 if body < 2097152 else 5
    n = head + body
    at = PyByteArray_GET_SIZE(out)
    PyByteArray_Resize(out, at + n)
    d = <unsigned char*>PyByteArray_AS_STRING(out) + at
    d[0] = 0x30 | (qos << 1)
    d += 1
    while True:  # the Remaining Length
        if body < 128:
            d[0] = <unsigned char>body
            d += 1
            break
        d[0] = <unsigned char>((body & 0x7F) | 0x80)
        d += 1
        body >>= 7
    d[0] = <unsigned char>(tlen >> 8)
    d[1] = <unsigned char>(tlen & 0xFF)
    memcpy(d + 2, topic, tlen)
    d += 2 + tlen
    if qos:
        d[0] = <unsigned char>(packet_id >> 8)
        d[1] = <unsigned char>(packet_id & 0xFF)
        d += 2
    if version == 5:
        d[0] = 0
        d += 1
    if plen:
        memcpy(d, payload, plen)
    return n


def frame(bytes topic, bytes payload, int qos=0, int packet_id=0, int version=4) -> bytes:
    """``append_publish_frame`` into a new buffer, as ``bytes`` (tests compare it with the codec)."""
    cdef bytearray out = bytearray()
    append_publish_frame(out, <const unsigned char*><char*>topic, len(topic),
                         <const unsigned char*><char*>payload, len(payload), qos, packet_id, version)
    return bytes(out)
