# cython: language_level=3
"""The storage layer's hot record encoder: a queue / in-flight entry of a plain message, in one copy.

``fluxmq.storage.records`` owns the format (its docstring) and builds the constant header; this
module only joins it with the lengths and the variable parts, for the common message: no MQTT 5.0
properties, no expiry, no subscription identifiers. The result is byte for byte what
``records.encode_entry``'s Python path writes (tests/_core/test_entry.py checks it), so nothing on
disk changes. Run once per message and delivery shape (the entry is cached in the message's
``wire_cache`` under ``key``), i.e. once per message of a fan-out to persistent sessions.

No I/O and no fluxmq imports.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport uint8_t
from libc.string cimport memcpy

#: bytes of the lengths after the constant header: u16 topic, u16 origin, u32 properties (0), u32 payload
DEF LENS = 12


cdef inline void _le16(uint8_t* p, Py_ssize_t v):
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF


cdef inline void _le32(uint8_t* p, Py_ssize_t v):
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF


#: a u32 length prefix's largest value, as a C constant: the literal 0xFFFFFFFF is a Python int to
#: Cython, and comparing a length with it boxed the length into a Python integer per call
cdef Py_ssize_t U32_MAX = 0xFFFFFFFF
cdef tuple _HEADS = None  # [qos][retain][flags] -> constant header (records.py sets it: configure)
cdef tuple _KEYS = None  # [qos][retain] -> wire_cache key


def configure(tuple heads, tuple keys):
    """Set the constant headers (``heads[qos][retain][flags]``) and the ``wire_cache`` keys
    (``keys[qos][retain]``) of entries; ``fluxmq.storage.records`` calls it once at import."""
    global _HEADS, _KEYS
    _HEADS = heads
    _KEYS = keys


def plain_entry(object message, int qos, bint retain):
    """The entry of ``message`` (``topic``, ``origin``, ``payload``, ``qos``, ``retain``,
    ``properties``, ``expires_at``, ``wire_cache``) delivered at ``qos`` with ``retain``:
    ``head | u16 topic_len | u16 origin_len | u32 0 | u32 payload_len | topic | origin | payload``,
    little-endian, where ``head`` is ``heads[qos][retain][flags]`` (``configure``) and ``flags`` the
    message's QoS | 4 if retained | 16 if it has an origin.

    Returns the entry cached under ``keys[qos][retain]`` in ``message.wire_cache`` when there is one;
    else encodes it and caches it there (creating the cache). Returns None, touching nothing, when
    the message is not plain (properties, an expiry, or a payload that is not ``bytes``): the
    caller's general encoder handles it."""
    if _HEADS is None:
        raise RuntimeError("fluxmq._core.entry.configure was not called")
    if qos < 0 or qos > 2:
        raise ValueError(f"delivery QoS {qos}")
    cdef int r = 1 if retain else 0
    key = (<tuple>_KEYS[qos])[r]
    cdef dict cache = message.wire_cache
    cdef object found
    if cache is not None:
        found = cache.get(key)
        if found is not None:
            return found
    if message.properties or message.expires_at is not None:
        return None
    payload = message.payload
    if not PyBytes_CheckExact(payload):
        return None
    cdef bytes out = fields_entry(message.topic, message.origin, <bytes>payload, message.qos, message.retain,
                                  qos, r)
    if cache is None:
        message.wire_cache = {key: out}
    else:
        cache[key] = out
    return out


cdef bytes fields_entry(str topic_obj, object origin_obj, bytes payload, int msg_qos, bint msg_retain,
                        int qos, bint retain):
    """``plain_entry`` of a message given by its fields (``origin_obj``: str or None), not cached:
    the C relay's, which has them at hand (``qos`` 0..2 is the caller's to check)."""
    cdef Py_ssize_t tlen, olen = 0, plen = PyBytes_GET_SIZE(payload)
    cdef const char* topic = PyUnicode_AsUTF8AndSize(topic_obj, &tlen)
    cdef const char* origin = NULL
    cdef int flags = msg_qos & 3
    cdef int r = 1 if retain else 0
    if msg_retain:
        flags |= 4
    if origin_obj:
        origin = PyUnicode_AsUTF8AndSize(origin_obj, &olen)
        flags |= 16
    cdef bytes head = (<tuple>(<tuple>_HEADS[qos])[r])[flags]
    cdef Py_ssize_t hlen = PyBytes_GET_SIZE(head)
    if tlen > 0xFFFF or olen > 0xFFFF or plen > U32_MAX:
        raise OverflowError("entry field too long for its length prefix")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, hlen + LENS + tlen + olen + plen)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
    memcpy(p, PyBytes_AS_STRING(head), hlen)
    p += hlen
    _le16(p, tlen)
    _le16(p + 2, olen)
    _le32(p + 4, 0)
    _le32(p + 8, plen)
    p += LENS
    memcpy(p, topic, tlen)
    p += tlen
    if olen:
        memcpy(p, origin, olen)
        p += olen
    memcpy(p, PyBytes_AS_STRING(payload), plen)
    return out
