# cython: language_level=3
"""The MQTT 5.0 PUBLISH of a durable queue's delivery, built in one buffer.

A delivery carries its record's topic, payload and own properties plus the user properties
``message-id`` (``{queue}:{offset}``), ``queue``, ``offset``, ``group-id``, ``delivery-count`` and
any extra ones, last and in that order (``fluxmq.queues.delivery`` decides what they mean). Built
once per delivery, so it is one allocation and copies, with no intermediate ``bytes``: the packet
id is 1 and the DUP flag clear (the connection patches both with ``codec.append_publish``).

``plain_delivery`` is the common record (no properties of its own); ``record_delivery`` takes the
record's prebuilt head (topic, packet id) and property block (its own properties and the three
record-wide user properties, encoded once by the codec) and appends the per-delivery ones.

``plain_records`` and ``offset_keys`` build a run of appended records and their keys, one
allocation each (the byte layouts are ``fluxmq.storage.queue_log``'s, which hands in their parts).
Pure functions of their arguments: no I/O, nothing imported from fluxmq.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.string cimport memcpy

cdef extern from "Python.h":
    bytes PyBytes_FromStringAndSize_NULL "PyBytes_FromStringAndSize"(void *, Py_ssize_t)

cdef enum:
    USER_PROPERTY = 0x26

#: a u32 length prefix's largest value, as a C constant: the literal 0xFFFFFFFF is a Python int to
#: Cython, and comparing a length with it boxed the length into a Python integer per call
cdef Py_ssize_t U32_MAX = 0xFFFFFFFF
cdef const char* K_MESSAGE_ID = b"message-id"
cdef const char* K_QUEUE = b"queue"
cdef const char* K_OFFSET = b"offset"
cdef const char* K_COUNT = b"delivery-count"


cdef inline int _digits(unsigned long long n, char* out) noexcept:
    """Decimal digits of ``n`` into ``out`` (at least 20 bytes); returns how many."""
    cdef char tmp[24]
    cdef int i = 0, j
    while True:
        tmp[i] = <char>(48 + n % 10)
        n //= 10
        i += 1
        if n == 0:
            break
    for j in range(i):
        out[j] = tmp[i - 1 - j]
    return i


cdef inline int _varint_len(Py_ssize_t n) noexcept:
    cdef int k = 1
    while n >= 128:
        n >>= 7
        k += 1
    return k


cdef inline char* _varint(char* p, Py_ssize_t n) noexcept:
    cdef unsigned char byte
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            p[0] = <char>(byte | 0x80)
            p += 1
        else:
            p[0] = <char>byte
            return p + 1


cdef inline char* _u16(char* p, Py_ssize_t n) noexcept:
    p[0] = <char>((n >> 8) & 0xFF)
    p[1] = <char>(n & 0xFF)
    return p + 2


cdef inline char* _put(char* p, const char* src, Py_ssize_t n) noexcept:
    memcpy(p, src, n)
    return p + n


cdef inline char* _user(char* p, const char* name, Py_ssize_t nlen, const char* value, Py_ssize_t vlen) noexcept:
    p[0] = <char>USER_PROPERTY
    p = _u16(p + 1, nlen)
    p = _put(p, name, nlen)
    p = _u16(p, vlen)
    return _put(p, value, vlen)


cdef bytes _finish(const char* head, Py_ssize_t head_len, const char* pre, Py_ssize_t pre_len,
                   bytes group, unsigned long long count, bytes extra, bytes payload,
                   const char* mid_q, Py_ssize_t mid_q_len, unsigned long long offset, bint plain):
    """The packet: 0x32 | remaining length | head | properties length | properties | payload.

    ``head`` is the topic name and packet id, or, when ``plain``, the topic's UTF-8 only. The properties are ``pre`` (the record's own block) or, when ``plain``, the three record-wide
    user properties made here from ``mid_q`` (the queue name) and ``offset``; then ``group`` (an
    encoded group-id), delivery-count ``count`` and ``extra`` (encoded user properties)."""
    cdef char off_s[24]
    cdef char count_s[24]
    cdef int off_n = _digits(offset, off_s) if plain else 0
    cdef int count_n = _digits(count, count_s)
    cdef Py_ssize_t group_len = PyBytes_GET_SIZE(group)
    cdef Py_ssize_t extra_len = PyBytes_GET_SIZE(extra)
    cdef Py_ssize_t payload_len = PyBytes_GET_SIZE(payload)
    cdef Py_ssize_t plen = pre_len + group_len + 5 + 14 + count_n + extra_len
    if plain:
        plen += (5 + 10 + mid_q_len + 1 + off_n) + (5 + 5 + mid_q_len) + (5 + 6 + off_n)
    cdef Py_ssize_t remaining = (head_len + 4 if plain else head_len) + _varint_len(plen) + plen + payload_len
    cdef Py_ssize_t total = 1 + _varint_len(remaining) + remaining
    cdef bytes out = PyBytes_FromStringAndSize_NULL(NULL, total)
    cdef char* p = PyBytes_AS_STRING(out)
    p[0] = <char>0x32
    p = _varint(p + 1, remaining)
    if plain:  # ``head`` is the topic: its length, it, and packet id 1
        p = _u16(p, head_len)
        p = _put(p, head, head_len)
        p = _u16(p, 1)
    else:
        p = _put(p, head, head_len)
    p = _varint(p, plen)
    if plain:
        p[0] = <char>USER_PROPERTY
        p = _u16(p + 1, 10)
        p = _put(p, K_MESSAGE_ID, 10)
        p = _u16(p, mid_q_len + 1 + off_n)
        p = _put(p, mid_q, mid_q_len)
        p[0] = b":"
        p = _put(p + 1, off_s, off_n)
        p = _user(p, K_QUEUE, 5, mid_q, mid_q_len)
        p = _user(p, K_OFFSET, 6, off_s, off_n)
    else:
        p = _put(p, pre, pre_len)
    p = _put(p, PyBytes_AS_STRING(group), group_len)
    p = _user(p, K_COUNT, 14, count_s, count_n)
    p = _put(p, PyBytes_AS_STRING(extra), extra_len)
    _put(p, PyBytes_AS_STRING(payload), payload_len)
    return out


def plain_delivery(str topic not None, str queue not None, unsigned long long offset, bytes group not None,
                   unsigned long long count, bytes extra not None, bytes payload not None) -> bytes:
    """The PUBLISH of a delivery of a record without properties of its own: ``topic``, then the user
    properties message-id ``{queue}:{offset}``, queue, offset, ``group`` (an encoded group-id user
    property), delivery-count ``count``, ``extra`` (encoded user properties), then ``payload``."""
    cdef Py_ssize_t tlen, qlen
    cdef const char* t = PyUnicode_AsUTF8AndSize(topic, &tlen)
    cdef const char* q = PyUnicode_AsUTF8AndSize(queue, &qlen)
    if tlen > 65535 or qlen > 65000:
        raise ValueError("topic or queue name too long")
    return _finish(t, tlen, NULL, 0, group, count, extra, payload, q, qlen, offset, True)


def record_delivery(bytes head not None, bytes props not None, bytes group not None, unsigned long long count,
                    bytes extra not None, bytes payload not None) -> bytes:
    """The PUBLISH of a delivery from its record's prebuilt ``head`` (topic and packet id) and
    ``props`` (its property block), with ``group``, delivery-count ``count`` and ``extra`` appended."""
    return _finish(PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head), PyBytes_AS_STRING(props),
                   PyBytes_GET_SIZE(props), group, count, extra, payload, NULL, 0, 0, False)


def plain_records(bytes head not None, bytes mid not None, list payloads not None):
    """``head + u32le(len(payload)) + mid + payload`` for each payload (a list of ``bytes``): the
    stored records of a run of plain appends (``storage.queue_log`` makes ``head`` and ``mid``:
    the record and message header up to the payload length, then the topic and origin). One
    allocation and copies per record."""
    cdef Py_ssize_t hn = PyBytes_GET_SIZE(head), mn = PyBytes_GET_SIZE(mid), pn
    cdef const char* h = PyBytes_AS_STRING(head)
    cdef const char* m = PyBytes_AS_STRING(mid)
    cdef list out = []
    cdef bytes rec, payload
    cdef char* p
    cdef unsigned long long length
    for obj in payloads:
        if obj is None:
            raise TypeError("a payload is None, not bytes")
        payload = <bytes?>obj
        pn = PyBytes_GET_SIZE(payload)
        if pn > U32_MAX:
            raise ValueError("payload over 4 GiB")
        length = <unsigned long long>pn
        rec = PyBytes_FromStringAndSize_NULL(NULL, hn + 4 + mn + pn)
        p = PyBytes_AS_STRING(rec)
        memcpy(p, h, hn)
        p += hn
        p[0] = <char>(length & 0xFF)
        p[1] = <char>((length >> 8) & 0xFF)
        p[2] = <char>((length >> 16) & 0xFF)
        p[3] = <char>((length >> 24) & 0xFF)
        p += 4
        memcpy(p, m, mn)
        p += mn
        memcpy(p, PyBytes_AS_STRING(payload), pn)
        out.append(rec)
    return out


def offset_keys(bytes prefix not None, unsigned long long first, Py_ssize_t n):
    """``prefix + u64be(offset)`` for ``offset`` in ``first .. first + n - 1`` (a queue log's keys,
    laid out by ``storage.queue_log``)."""
    cdef Py_ssize_t pn = PyBytes_GET_SIZE(prefix), i
    cdef const char* src = PyBytes_AS_STRING(prefix)
    cdef list out = []
    cdef bytes key
    cdef char* p
    cdef unsigned long long off
    cdef int b
    for i in range(n):
        off = first + <unsigned long long>i
        key = PyBytes_FromStringAndSize_NULL(NULL, pn + 8)
        p = PyBytes_AS_STRING(key)
        memcpy(p, src, pn)
        p += pn
        for b in range(8):
            p[7 - b] = <char>((off >> (8 * b)) & 0xFF)
        out.append(key)
    return out
