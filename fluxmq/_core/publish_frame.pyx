# cython: language_level=3
"""A PUBLISH written into a subscriber's output straight from the bytes it arrived in.

``append_publish_frame`` appends one whole PUBLISH (not retained, not DUP: a delivery's first
send) to a bytearray from a topic and a payload given as pointers (a peer batch's bytes, a read's
bytes): one resize and two copies, no encoded ``bytes`` in between. ``version`` 4 (3.1.1, also for
3.1) or 5 (then an empty property block). The caller vouches for the topic (a valid UTF-8 topic
name, as the message it came in passed the decoder or the peer's encoder); what this checks is the
MQTT limits the frame itself has (topic length, Remaining Length). ``publish_frame_bytes`` makes
the same frame as a bytes object, for a fan-out that copies one frame to many outputs.

No I/O and no fluxmq imports.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize

from fluxmq._core.outbuf cimport out_resize

DEF MAX_VBI = 268435455


cdef inline int _check(Py_ssize_t tlen, Py_ssize_t plen, int qos, int version) except -1:
    if tlen > 0xFFFF:
        raise ValueError("topic longer than 65,535 bytes")
    if publish_body_size(tlen, plen, qos, version) > MAX_VBI:
        raise ValueError("packet larger than the MQTT limit of 268,435,455 bytes")
    return 0


cdef int append_publish_frame(bytearray out, const unsigned char* topic, Py_ssize_t tlen,
                              const unsigned char* payload, Py_ssize_t plen, int qos, int packet_id,
                              int version) except -1:
    """Append the PUBLISH of ``topic[:tlen]`` and ``payload[:plen]`` at ``qos`` (0, 1 or 2; the
    packet id with QoS 1 and 2) to ``out``; returns the bytes written."""
    cdef Py_ssize_t old = PyByteArray_GET_SIZE(out), n
    _check(tlen, plen, qos, version)
    n = publish_frame_size(tlen, plen, qos, version)
    out_resize(out, old + n)
    return write_publish_frame(<unsigned char*>PyByteArray_AS_STRING(out) + old, topic, tlen, payload,
                               plen, qos, packet_id, version)


cdef bytes publish_frame_bytes(const unsigned char* topic, Py_ssize_t tlen,
                               const unsigned char* payload, Py_ssize_t plen, int qos, int packet_id,
                               int version):
    """The PUBLISH ``append_publish_frame`` appends, as a bytes object (a fan-out copies it)."""
    cdef bytes frame
    _check(tlen, plen, qos, version)
    frame = PyBytes_FromStringAndSize(NULL, publish_frame_size(tlen, plen, qos, version))
    write_publish_frame(<unsigned char*>PyBytes_AS_STRING(frame), topic, tlen, payload, plen, qos,
                        packet_id, version)
    return frame


def frames_into(bytes topic, bytes payload, Py_ssize_t count):
    """``count`` QoS 0 3.1.1 frames appended to a new bytearray one by one (tests): the bytearray
    and how many different allocation sizes it went through."""
    cdef bytearray out = bytearray()
    cdef Py_ssize_t k, alloc = -1, changes = 0
    for k in range(count):
        append_publish_frame(out, <const unsigned char*><const char*>topic, len(topic),
                             <const unsigned char*><const char*>payload, len(payload), 0, 0, 4)
        if out.__alloc__() != alloc:
            alloc = out.__alloc__()
            changes += 1
    return out, changes


def frame(bytes topic, bytes payload, int qos=0, int packet_id=0, int version=4) -> bytes:
    """``append_publish_frame`` into a new buffer (for tests; checks ``publish_frame_bytes`` too)."""
    cdef bytearray out = bytearray(b"-")
    cdef const unsigned char* t = <const unsigned char*><const char*>topic
    cdef const unsigned char* p = <const unsigned char*><const char*>payload
    n = append_publish_frame(out, t, len(topic), p, len(payload), qos, packet_id, version)
    assert n == len(out) - 1
    assert publish_frame_bytes(t, len(topic), p, len(payload), qos, packet_id, version) == out[1:]
    return bytes(out[1:])
