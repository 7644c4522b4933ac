# cython: language_level=3
"""The MQTT decoder: ``Decoder.feed(data)`` turns a byte stream into packet objects.

It checks what the bytes alone can prove (the malformed-packet and static protocol rules) and leaves
state-dependent rules to the protocol layer. One function per packet type, ``_decode_<type>``.

Normative statements are quoted by their MQTT 5.0 numbers unless a 3.1.1 number is given.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcmp, memcpy

from fluxmq._core.packets cimport (
    T_AUTH,
    T_CONNACK,
    T_CONNECT,
    T_DISCONNECT,
    T_PINGREQ,
    T_PINGRESP,
    T_PUBACK,
    T_PUBCOMP,
    T_PUBLISH,
    T_PUBREC,
    T_PUBREL,
    T_SUBACK,
    T_SUBSCRIBE,
    T_UNSUBACK,
    T_UNSUBSCRIBE,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Pingreq,
    Pingresp,
    Publish,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
    _PublishAck,
    new_publish,
    new_publish_ack,
    type_name,
)
from fluxmq._core.properties cimport K_WILL, P_TOPIC_ALIAS, _r_props
from fluxmq._core.wire cimport _Reader, _r_bin, _r_str, _r_u8, _r_u16, _trailing, _truncated, _utf8_scanned

from fluxmq.errors import (
    MalformedPacket,
    MQTTError,
    PacketTooLarge,
    ProtocolError,
    TopicNameInvalid,
    UnsupportedProtocolVersion,
)


cdef str _topic_name(const unsigned char* p, Py_ssize_t n):
    """Decode a topic name, rejecting wildcards (MQTT-3.3.2-2) as well as bad UTF-8."""
    cdef Py_ssize_t i
    cdef unsigned char c, high = 0
    for i in range(n):
        c = p[i]
        if c == 0x2B or c == 0x23:
            raise TopicNameInvalid("wildcard character in a topic name (MQTT-3.3.2-2)")
        if c == 0:
            raise MalformedPacket("U+0000 in a UTF-8 string (MQTT-1.5.4-2)")
        high |= c
    return _utf8_scanned(p, n, high)


cdef int _check_fixed_header(unsigned int first, int version) except -1:
    """Reject reserved packet types and flag bits as soon as the first byte is seen."""
    cdef unsigned int ptype = first >> 4
    cdef unsigned int flags = first & 0x0F
    if ptype == T_PUBLISH:
        if (flags & 0x06) == 0x06:
            raise MalformedPacket("PUBLISH with QoS 3 (MQTT-3.3.1-4)")
        if (flags & 0x08) and not (flags & 0x06):
            raise MalformedPacket("PUBLISH QoS 0 with DUP set (MQTT-3.3.1-2)")
        return 0
    if ptype == 0:
        raise MalformedPacket("reserved packet type 0 (MQTT 2.1.2)")
    if ptype == T_AUTH and version != 5:
        raise MalformedPacket("packet type 15 is reserved before MQTT 5.0")
    if ptype == T_PUBREL or ptype == T_SUBSCRIBE or ptype == T_UNSUBSCRIBE:
        # MQTT 3.1 let a client set DUP on a retried PUBREL/SUBSCRIBE/UNSUBSCRIBE.
        if flags != 0x02 and not (version == 3 and flags == 0x0A):
            raise MalformedPacket(
                f"{type_name(ptype)} fixed header flags must be 0010 (MQTT-3.6.1-1, MQTT-3.8.1-1, "
                f"MQTT-3.10.1-1)")
        return 0
    if flags:
        raise MalformedPacket(f"reserved flags set in {type_name(ptype)} fixed header (MQTT-2.1.3-1)")
    return 0


cdef int _check_packet_id(int packet_id) except -1:
    if packet_id == 0:
        raise ProtocolError("packet identifier 0 (MQTT-2.2.1-3)")
    return 0


cdef Connect _decode_connect(const unsigned char* body, Py_ssize_t size):
    cdef _Reader r = _Reader(body, 0, size)
    cdef str name
    cdef int level, flags, will_qos
    cdef Connect pkt = Connect.__new__(Connect)
    cdef Will will
    name = _r_str(&r)
    level = _r_u8(&r)
    if level != 3 and level != 4 and level != 5:
        raise UnsupportedProtocolVersion(f"unsupported protocol level {level} (MQTT-3.1.2-2)")
    if name != ("MQIsdp" if level == 3 else "MQTT"):
        raise UnsupportedProtocolVersion(
            f"protocol name {name!r} does not match level {level} (MQTT-3.1.2-1)")
    flags = _r_u8(&r)
    if flags & 0x01:
        raise MalformedPacket("CONNECT reserved flag is set (MQTT-3.1.2-3)")
    will_qos = (flags >> 3) & 3
    if not (flags & 0x04) and (will_qos or flags & 0x20):
        raise MalformedPacket("Will QoS/Retain set without the Will Flag (MQTT-3.1.2-11, MQTT-3.1.2-13)")
    if will_qos == 3:
        raise MalformedPacket("Will QoS 3 (MQTT-3.1.2-12)")
    if level < 5 and (flags & 0x40) and not (flags & 0x80):
        raise MalformedPacket("password flag without user name flag (3.1.1 MQTT-3.1.2-22)")
    pkt.protocol_name = name
    pkt.protocol_version = level
    pkt.clean_start = (flags & 0x02) != 0
    pkt.keepalive = _r_u16(&r)
    pkt.properties = _r_props(&r, T_CONNECT) if level == 5 else {}
    pkt.client_id = _r_str(&r)
    if flags & 0x04:
        will = Will.__new__(Will)
        will.properties = _r_props(&r, K_WILL) if level == 5 else {}
        will.topic = _r_str(&r)
        if not will.topic:
            raise TopicNameInvalid("empty Will Topic (MQTT-4.7.3-1)")
        if "+" in will.topic or "#" in will.topic:
            raise TopicNameInvalid("wildcard character in the Will Topic (MQTT-3.1.3-11)")
        will.payload = _r_bin(&r)
        will.qos = will_qos
        will.retain = (flags & 0x20) != 0
        pkt.will = will
    if flags & 0x80:
        pkt.username = _r_str(&r)
    if flags & 0x40:
        pkt.password = _r_bin(&r)
    if r.pos != r.end:
        _trailing()
    return pkt


cdef Connack _decode_connack(const unsigned char* body, Py_ssize_t size, int version):
    cdef _Reader r = _Reader(body, 0, size)
    cdef Connack pkt = Connack.__new__(Connack)
    cdef int flags = _r_u8(&r)
    if version >= 4:
        if flags & 0xFE:
            raise MalformedPacket("CONNACK reserved flag bits set (MQTT-3.2.2-1)")
        pkt.session_present = flags & 1
    pkt.reason_code = _r_u8(&r)
    pkt.properties = _r_props(&r, T_CONNACK) if version == 5 else {}
    if r.pos != r.end:
        _trailing()
    return pkt


cdef Publish _decode_publish(unsigned int first, const unsigned char* body, Py_ssize_t size,
                             int version, Decoder dec=None):
    cdef int qos = (first >> 1) & 3
    cdef Py_ssize_t pos, topic_len
    cdef int packet_id = 0
    cdef _Reader r
    cdef dict props
    cdef str topic
    cdef Publish pkt
    if size < 2:
        _truncated()
    topic_len = (body[0] << 8) | body[1]
    pos = 2 + topic_len
    if pos > size:
        _truncated()
    if (dec is not None and dec._topic_raw is not None and PyBytes_GET_SIZE(dec._topic_raw) == topic_len
            and memcmp(PyBytes_AS_STRING(dec._topic_raw), body + 2, topic_len) == 0):
        topic = dec._topic  # the connection's last topic again: checked and decoded then
    else:
        topic = _topic_name(body + 2, topic_len)
        if dec is not None and topic_len:
            dec._topic = topic
            dec._topic_raw = PyBytes_FromStringAndSize(<const char*>(body + 2), topic_len)
    if qos:
        if pos + 2 > size:
            _truncated()
        packet_id = (body[pos] << 8) | body[pos + 1]
        pos += 2
        if packet_id == 0:
            _check_packet_id(0)
    if version == 5:
        if pos >= size:
            _truncated()
        if body[pos] == 0:
            props = {}
            pos += 1
        else:
            r = _Reader(body, pos, size)
            props = _r_props(&r, T_PUBLISH)
            pos = r.pos
        if topic_len == 0 and P_TOPIC_ALIAS not in props:
            raise ProtocolError("empty topic name without a Topic Alias (MQTT 5.0 3.3.2.1)")
    else:
        props = {}
        if topic_len == 0:
            raise TopicNameInvalid("empty topic name (MQTT-4.7.3-1)")
    pkt = new_publish()
    pkt.topic = topic
    pkt.payload = PyBytes_FromStringAndSize(<const char*>(body + pos), size - pos)
    pkt.qos = qos
    pkt.retain = first & 1
    pkt.dup = (first >> 3) & 1
    pkt.packet_id = packet_id
    pkt.properties = props
    return pkt


cdef _PublishAck _decode_publish_ack(unsigned int ptype, const unsigned char* body, Py_ssize_t size,
                                     int version):
    cdef _PublishAck pkt
    cdef _Reader r
    cdef int packet_id
    if size < 2:
        _truncated()
    if version < 5 and size != 2:
        _trailing()
    packet_id = (body[0] << 8) | body[1]
    _check_packet_id(packet_id)
    pkt = new_publish_ack(ptype)
    pkt.packet_id = packet_id
    if size == 2:
        pkt.properties = {}
        return pkt
    # 5.0: the reason code may stand alone; the property length is present from 4 bytes on.
    pkt.reason_code = body[2]
    if size == 3:
        pkt.properties = {}
        return pkt
    r = _Reader(body, 3, size)
    pkt.properties = _r_props(&r, ptype)
    if r.pos != r.end:
        _trailing()
    return pkt


cdef Subscribe _decode_subscribe(const unsigned char* body, Py_ssize_t size, int version):
    cdef _Reader r = _Reader(body, 0, size)
    cdef Subscribe pkt = Subscribe.__new__(Subscribe)
    cdef Subscription sub
    cdef list subs = []
    cdef int options, qos
    cdef str topic_filter
    pkt.packet_id = _r_u16(&r)
    _check_packet_id(pkt.packet_id)
    pkt.properties = _r_props(&r, T_SUBSCRIBE) if version == 5 else {}
    while r.pos < r.end:
        topic_filter = _r_str(&r)
        options = _r_u8(&r)
        qos = options & 3
        sub = Subscription.__new__(Subscription)
        sub.filter = topic_filter
        sub.qos = qos
        if version == 5:
            if options & 0xC0:
                raise MalformedPacket("subscription options reserved bits set (MQTT-3.8.3-5)")
            if qos == 3:
                raise ProtocolError("subscription Maximum QoS 3 (MQTT 5.0 3.8.3.1)")
            sub.no_local = (options & 0x04) != 0
            sub.retain_as_published = (options & 0x08) != 0
            sub.retain_handling = (options >> 4) & 3
            if sub.retain_handling == 3:
                raise ProtocolError("Retain Handling 3 (MQTT 5.0 3.8.3.1)")
        else:
            if options & 0xFC:
                raise MalformedPacket("requested QoS reserved bits set (3.1.1 MQTT-3-8.3-4)")
            if qos == 3:
                raise MalformedPacket("requested QoS 3 (3.1.1 MQTT-3-8.3-4)")
        subs.append(sub)
    if not subs:
        raise ProtocolError("SUBSCRIBE without any subscription (MQTT-3.8.3-2)")
    pkt.subscriptions = subs
    return pkt


cdef list _r_codes(_Reader* r):
    cdef list codes = [r.data[i] for i in range(r.pos, r.end)]
    r.pos = r.end
    return codes


cdef Suback _decode_suback(const unsigned char* body, Py_ssize_t size, int version):
    cdef _Reader r = _Reader(body, 0, size)
    cdef Suback pkt = Suback.__new__(Suback)
    pkt.packet_id = _r_u16(&r)
    _check_packet_id(pkt.packet_id)
    pkt.properties = _r_props(&r, T_SUBACK) if version == 5 else {}
    pkt.reason_codes = _r_codes(&r)
    return pkt


cdef Unsubscribe _decode_unsubscribe(const unsigned char* body, Py_ssize_t size, int version):
    cdef _Reader r = _Reader(body, 0, size)
    cdef Unsubscribe pkt = Unsubscribe.__new__(Unsubscribe)
    cdef list filters = []
    pkt.packet_id = _r_u16(&r)
    _check_packet_id(pkt.packet_id)
    pkt.properties = _r_props(&r, T_UNSUBSCRIBE) if version == 5 else {}
    while r.pos < r.end:
        filters.append(_r_str(&r))
    if not filters:
        raise ProtocolError("UNSUBSCRIBE without any topic filter (MQTT-3.10.3-2)")
    pkt.filters = filters
    return pkt


cdef Unsuback _decode_unsuback(const unsigned char* body, Py_ssize_t size, int version):
    cdef _Reader r = _Reader(body, 0, size)
    cdef Unsuback pkt = Unsuback.__new__(Unsuback)
    pkt.packet_id = _r_u16(&r)
    _check_packet_id(pkt.packet_id)
    if version == 5:
        pkt.properties = _r_props(&r, T_UNSUBACK)
        pkt.reason_codes = _r_codes(&r)
    else:
        pkt.properties = {}
        if r.pos != r.end:
            _trailing()
    return pkt


cdef object _decode_reason_packet(unsigned int ptype, const unsigned char* body, Py_ssize_t size,
                                  int version):
    """DISCONNECT and AUTH: empty in 3.x; in 5.0 an optional reason code and properties."""
    cdef _Reader r = _Reader(body, 0, size)
    cdef int reason_code = 0
    cdef dict props
    if version < 5 and size:
        _trailing()
    if size >= 1:
        reason_code = _r_u8(&r)
    props = _r_props(&r, ptype) if size >= 2 else {}
    if r.pos != r.end:
        _trailing()
    if ptype == T_DISCONNECT:
        pkt = Disconnect.__new__(Disconnect)
        (<Disconnect>pkt).reason_code = reason_code
        (<Disconnect>pkt).properties = props
    else:
        pkt = Auth.__new__(Auth)
        (<Auth>pkt).reason_code = reason_code
        (<Auth>pkt).properties = props
    return pkt


cdef class Decoder:
    """Incremental MQTT decoder: ``feed(data)`` returns every packet completed by ``data``.

    ``version`` is 0 until a CONNECT is decoded (or set by the caller, e.g. on the client side of
    a bridge); until then packets other than CONNECT are parsed with 3.1.1 rules.
    ``max_packet_size`` (0 = protocol limit) counts the whole packet, fixed header included.
    After an error the decoder refuses further input. The exception carries ``packets``: the
    packets completed in the same ``feed`` before the faulty one.
    """

    def __init__(self, Py_ssize_t max_packet_size=0, int version=0):
        self.max_packet_size = max_packet_size
        self.version = version
        self._pending = bytearray()
        self._failed = False

    def __len__(self):
        """Number of buffered bytes that do not yet form a complete packet."""
        return PyByteArray_GET_SIZE(self._pending)

    cpdef list feed(self, data):
        """Buffer ``data`` (bytes-like) and return the list of packets it completes."""
        cdef Py_buffer view
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            return self.feed_buf(<const unsigned char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef list feed_buf(self, const unsigned char* buf, Py_ssize_t size):
        """``feed`` of the ``size`` bytes at ``buf`` (a caller's buffer, read only during the call:
        a tail that does not end a packet is copied into the pending buffer)."""
        cdef list out = []
        cdef Py_ssize_t used, rest, old
        cdef bytearray pending = self._pending
        if self._failed:
            raise MalformedPacket("decoder is unusable after a protocol error")
        try:
            if PyByteArray_GET_SIZE(pending) == 0:
                # Nothing pending: parse straight from the caller's buffer, keep only the tail.
                used = self._parse(buf, size, out)
                rest = size - used
                if rest:
                    PyByteArray_Resize(pending, rest)
                    memcpy(PyByteArray_AS_STRING(pending), <const char*>buf + used, rest)
            else:
                old = PyByteArray_GET_SIZE(pending)
                PyByteArray_Resize(pending, old + size)
                memcpy(PyByteArray_AS_STRING(pending) + old, buf, size)
                used = self._parse(<const unsigned char*>PyByteArray_AS_STRING(pending),
                                   PyByteArray_GET_SIZE(pending), out)
                if used:
                    del pending[:used]
        except MQTTError as exc:
            self._failed = True
            exc.packets = out
            raise
        return out

    cdef Py_ssize_t _parse(self, const unsigned char* data, Py_ssize_t size, list out) except -1:
        cdef Py_ssize_t pos = 0, i, body_start, total
        cdef unsigned int first, byte
        cdef Py_ssize_t length
        cdef int shift
        while size - pos >= 2:
            first = data[pos]
            _check_fixed_header(first, self.version)
            # Remaining Length: at most 4 bytes (MQTT-1.5.5); reject the 5th continuation at once.
            length = 0
            shift = 0
            i = pos + 1
            while True:
                if i >= size:
                    return pos
                byte = data[i]
                i += 1
                length |= (<Py_ssize_t>(byte & 0x7F)) << shift
                if not (byte & 0x80):
                    break
                shift += 7
                if shift == 28:
                    raise MalformedPacket("Remaining Length longer than 4 bytes (MQTT-1.5.5)")
            body_start = i
            total = body_start - pos + length
            if self.max_packet_size > 0 and total > self.max_packet_size:
                raise PacketTooLarge(
                    f"packet of {total} bytes exceeds the maximum packet size {self.max_packet_size}")
            if size - body_start < length:
                return pos
            out.append(self._decode(first, data + body_start, length))
            pos = body_start + length
        return pos

    cdef object _decode(self, unsigned int first, const unsigned char* body, Py_ssize_t size):
        cdef unsigned int ptype = first >> 4
        cdef int version = self.version
        cdef Connect connect
        if version == 0:
            version = 4
        if ptype == T_PUBLISH:
            return _decode_publish(first, body, size, version, self)
        if T_PUBACK <= ptype <= T_PUBCOMP:
            return _decode_publish_ack(ptype, body, size, version)
        if ptype == T_CONNECT:
            connect = _decode_connect(body, size)
            self.version = connect.protocol_version
            return connect
        if ptype == T_PINGREQ or ptype == T_PINGRESP:
            if size:
                _trailing()
            return Pingreq.__new__(Pingreq) if ptype == T_PINGREQ else Pingresp.__new__(Pingresp)
        if ptype == T_SUBSCRIBE:
            return _decode_subscribe(body, size, version)
        if ptype == T_UNSUBSCRIBE:
            return _decode_unsubscribe(body, size, version)
        if ptype == T_CONNACK:
            return _decode_connack(body, size, version)
        if ptype == T_SUBACK:
            return _decode_suback(body, size, version)
        if ptype == T_UNSUBACK:
            return _decode_unsuback(body, size, version)
        return _decode_reason_packet(ptype, body, size, version)
