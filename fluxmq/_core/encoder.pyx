# cython: language_level=3
"""The MQTT encoder: ``encode`` turns a packet object into bytes; ``encode_publish`` and
``append_publish`` are the fan-out fast paths (one PUBLISH encoded once, then copied per subscriber
with its packet id and DUP flag patched).

3.x encodings leave out what 3.x cannot carry (properties, ack reason codes). Invalid field values
raise ``ValueError`` or ``TypeError``.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from fluxmq._core.outbuf cimport out_resize
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.mem cimport PyMem_Free
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.string cimport memchr, memcpy

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
    T_PUBREL,
    T_SUBACK,
    T_SUBSCRIBE,
    T_UNSUBACK,
    T_UNSUBSCRIBE,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
    _PublishAck,
)
from fluxmq._core.properties cimport K_WILL, _w_prop_block, _w_props
from fluxmq._core.wire cimport (
    MAX_VBI,
    _Out,
    _put_vbi,
    _reserve,
    _vbi_size,
    _w_bin,
    _w_str,
    _w_u8,
    _w_u16,
)


cdef int _check_version(int version) except -1:
    if version != 3 and version != 4 and version != 5:
        raise ValueError(f"unknown protocol version {version}")
    return 0


cdef int _check_u16(int value, str what) except -1:
    if value < 0 or value > 0xFFFF:
        raise ValueError(f"{what} {value} outside 0..65535")
    return 0


cdef int _w_connect(_Out* o, Connect pkt) except -1:
    cdef int level = pkt.protocol_version
    cdef unsigned int flags = 0
    cdef Will will = pkt.will
    _check_version(level)
    _check_u16(pkt.keepalive, "keepalive")
    if pkt.password is not None and pkt.username is None and level < 5:
        raise ValueError("a password needs a user name before MQTT 5.0 (3.1.1 MQTT-3.1.2-22)")
    if pkt.protocol_name is None:
        _w_str(o, "MQIsdp" if level == 3 else "MQTT")
    else:
        _w_str(o, pkt.protocol_name)
    _w_u8(o, level)
    if pkt.clean_start:
        flags |= 0x02
    if will is not None:
        if will.qos < 0 or will.qos > 2:
            raise ValueError(f"Will QoS {will.qos}")
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if pkt.password is not None:
        flags |= 0x40
    if pkt.username is not None:
        flags |= 0x80
    _w_u8(o, flags)
    _w_u16(o, pkt.keepalive)
    if level == 5:
        _w_prop_block(o, pkt.properties, T_CONNECT)
    _w_str(o, pkt.client_id)
    if will is not None:
        if level == 5:
            _w_prop_block(o, will.properties, K_WILL)
        _w_str(o, will.topic)
        _w_bin(o, will.payload)
    if pkt.username is not None:
        _w_str(o, pkt.username)
    if pkt.password is not None:
        _w_bin(o, pkt.password)
    return 0


cdef int _w_codes(_Out* o, list codes) except -1:
    cdef object code
    if codes is None:
        return 0
    for code in codes:
        if not 0 <= code <= 0xFF:
            raise ValueError(f"reason code {code} outside 0..255")
        _w_u8(o, code)
    return 0


cdef int _w_body(_Out* o, Packet packet, int version) except -1:
    """Write the variable header and payload of every packet type except PUBLISH."""
    cdef int ptype = packet.type
    cdef _PublishAck ack
    cdef Subscription sub
    cdef unsigned int options
    cdef int reason_code
    cdef dict props
    if ptype == T_CONNECT:
        return _w_connect(o, <Connect>packet)
    if T_PUBACK <= ptype <= T_PUBCOMP:
        ack = <_PublishAck>packet
        _check_u16(ack.packet_id, "packet id")
        _w_u16(o, ack.packet_id)
        if version == 5 and (ack.reason_code or ack.properties):
            _w_u8(o, ack.reason_code)
            if ack.properties:
                _w_prop_block(o, ack.properties, ptype)
        return 0
    if ptype == T_CONNACK:
        _w_u8(o, 1 if (version >= 4 and (<Connack>packet).session_present) else 0)
        _w_u8(o, (<Connack>packet).reason_code)
        if version == 5:
            _w_prop_block(o, (<Connack>packet).properties, T_CONNACK)
        return 0
    if ptype == T_SUBSCRIBE:
        _check_u16((<Subscribe>packet).packet_id, "packet id")
        _w_u16(o, (<Subscribe>packet).packet_id)
        if version == 5:
            _w_prop_block(o, (<Subscribe>packet).properties, T_SUBSCRIBE)
        if not (<Subscribe>packet).subscriptions:
            raise ValueError("SUBSCRIBE needs at least one subscription (MQTT-3.8.3-2)")
        for sub in (<Subscribe>packet).subscriptions:
            if sub.qos < 0 or sub.qos > 2 or sub.retain_handling < 0 or sub.retain_handling > 2:
                raise ValueError(f"invalid subscription options in {sub!r}")
            options = sub.qos
            if version == 5:
                options |= ((0x04 if sub.no_local else 0) | (0x08 if sub.retain_as_published else 0)
                            | (sub.retain_handling << 4))
            _w_str(o, sub.filter)
            _w_u8(o, options)
        return 0
    if ptype == T_SUBACK:
        _check_u16((<Suback>packet).packet_id, "packet id")
        _w_u16(o, (<Suback>packet).packet_id)
        if version == 5:
            _w_prop_block(o, (<Suback>packet).properties, T_SUBACK)
        return _w_codes(o, (<Suback>packet).reason_codes)
    if ptype == T_UNSUBSCRIBE:
        _check_u16((<Unsubscribe>packet).packet_id, "packet id")
        _w_u16(o, (<Unsubscribe>packet).packet_id)
        if version == 5:
            _w_prop_block(o, (<Unsubscribe>packet).properties, T_UNSUBSCRIBE)
        if not (<Unsubscribe>packet).filters:
            raise ValueError("UNSUBSCRIBE needs at least one topic filter (MQTT-3.10.3-2)")
        for topic_filter in (<Unsubscribe>packet).filters:
            _w_str(o, topic_filter)
        return 0
    if ptype == T_UNSUBACK:
        _check_u16((<Unsuback>packet).packet_id, "packet id")
        _w_u16(o, (<Unsuback>packet).packet_id)
        if version == 5:
            _w_prop_block(o, (<Unsuback>packet).properties, T_UNSUBACK)
            _w_codes(o, (<Unsuback>packet).reason_codes)
        return 0
    if ptype == T_PINGREQ or ptype == T_PINGRESP:
        return 0
    if ptype == T_DISCONNECT or ptype == T_AUTH:
        if ptype == T_AUTH and version != 5:
            raise ValueError("AUTH exists only in MQTT 5.0")
        if version == 5:
            if ptype == T_DISCONNECT:
                reason_code = (<Disconnect>packet).reason_code
                props = (<Disconnect>packet).properties
            else:
                reason_code = (<Auth>packet).reason_code
                props = (<Auth>packet).properties
            if reason_code or props:
                _w_u8(o, reason_code)
                if props:
                    _w_prop_block(o, props, ptype)
        return 0
    raise TypeError(f"cannot encode {type(packet).__name__}")


cpdef bytes encode(Packet packet, int version=4):
    """Encode ``packet`` for protocol level ``version`` (CONNECT uses its own protocol_version).

    3.x encodings leave out what 3.x cannot carry (properties, ack reason codes).
    Invalid field values raise ``ValueError`` or ``TypeError``.
    """
    cdef _Out o = _Out(NULL, 0, 0)
    cdef Publish pub
    cdef _PublishAck ack
    cdef object cls = type(packet)
    cdef int ptype
    cdef Py_ssize_t length, header
    cdef unsigned char* start
    cdef unsigned char short_ack[4]
    if cls is Publish:
        pub = <Publish>packet
        return encode_publish(pub.topic, pub.payload, pub.qos, pub.retain, pub.dup, pub.packet_id,
                              pub.properties, version)
    if cls is Puback or cls is Pubrec or cls is Pubrel or cls is Pubcomp:
        # Hot path: one acknowledgement per QoS 1/2 message, nearly always the 2-byte body.
        ack = <_PublishAck>packet
        if (version != 5 or (ack.reason_code == 0 and not ack.properties)) and (
                version == 3 or version == 4 or version == 5) and 0 <= ack.packet_id <= 0xFFFF:
            short_ack[0] = (0x40 if cls is Puback else 0x50 if cls is Pubrec else
                            0x62 if cls is Pubrel else 0x70)
            short_ack[1] = 2
            short_ack[2] = ack.packet_id >> 8
            short_ack[3] = ack.packet_id & 0xFF
            return PyBytes_FromStringAndSize(<const char*>short_ack, 4)
    ptype = packet.type
    _check_version(version)
    try:
        # Leave room for the longest fixed header, then write it just before the body.
        _reserve(&o, 5)
        o.len = 5
        _w_body(&o, packet, version)
        length = o.len - 5
        if length > MAX_VBI:
            raise ValueError("packet larger than the MQTT limit of 268,435,455 bytes")
        header = 1 + _vbi_size(length)
        start = o.data + 5 - header
        start[0] = (ptype << 4) | (0x02 if ptype in (T_PUBREL, T_SUBSCRIBE, T_UNSUBSCRIBE) else 0)
        _put_vbi(start + 1, length)
        return PyBytes_FromStringAndSize(<const char*>start, o.len - 5 + header)
    finally:
        PyMem_Free(o.data)


cpdef bytes encode_publish(str topic, object payload, int qos=0, bint retain=False, bint dup=False,
                           int packet_id=0, dict properties=None, int version=4):
    """Encode a PUBLISH in one allocation (``packet_id`` 0 is fine for an ``append_publish`` template)."""
    cdef Py_ssize_t topic_len, payload_len, body, props_len = 0
    cdef const char* topic_ptr
    cdef const char* payload_ptr
    cdef Py_buffer view
    cdef bint have_view = False
    cdef _Out props_out = _Out(NULL, 0, 0)
    cdef bytes result
    cdef unsigned char* d
    if qos < 0 or qos > 2:
        raise ValueError(f"QoS {qos}")
    if dup and not qos:
        raise ValueError("DUP must be 0 for QoS 0 (MQTT-3.3.1-2)")
    if qos and (packet_id < 0 or packet_id > 0xFFFF):
        raise ValueError(f"packet id {packet_id} outside 0..65535")
    if version != 4 and version != 5 and version != 3:
        _check_version(version)
    if topic is None:
        raise TypeError("topic must be a str")
    topic_ptr = PyUnicode_AsUTF8AndSize(topic, &topic_len)
    if topic_len > 0xFFFF:
        raise ValueError("topic longer than 65,535 bytes")
    if memchr(topic_ptr, 0, topic_len) != NULL:
        raise ValueError("U+0000 in a topic (MQTT-1.5.4-2)")
    if PyBytes_CheckExact(payload):
        payload_ptr = PyBytes_AS_STRING(payload)
        payload_len = PyBytes_GET_SIZE(payload)
    else:
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        have_view = True
        payload_ptr = <const char*>view.buf
        payload_len = view.len
    try:
        body = 2 + topic_len + payload_len
        if qos:
            body += 2
        if version == 5:
            if properties:
                _w_props(&props_out, properties, T_PUBLISH)
                props_len = props_out.len
            body += _vbi_size(props_len) + props_len
        if body > MAX_VBI:
            raise ValueError("packet larger than the MQTT limit of 268,435,455 bytes")
        result = PyBytes_FromStringAndSize(NULL, 1 + _vbi_size(body) + body)
        d = <unsigned char*>PyBytes_AS_STRING(result)
        d[0] = 0x30 | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
        d = _put_vbi(d + 1, body)
        d[0] = topic_len >> 8
        d[1] = topic_len & 0xFF
        memcpy(d + 2, topic_ptr, topic_len)
        d += 2 + topic_len
        if qos:
            d[0] = packet_id >> 8
            d[1] = packet_id & 0xFF
            d += 2
        if version == 5:
            d = _put_vbi(d, props_len)
            if props_len:
                memcpy(d, props_out.data, props_len)
                d += props_len
        if payload_len:
            memcpy(d, payload_ptr, payload_len)
        return result
    finally:
        if have_view:
            PyBuffer_Release(&view)
        PyMem_Free(props_out.data)


cdef Py_ssize_t publish_id_offset(const unsigned char* src, Py_ssize_t n, int packet_id) except -1:
    """Check that ``src[:n]`` is an encoded PUBLISH; the offset of its packet id (0 for QoS 0)."""
    cdef Py_ssize_t offset = 1
    if n < 4 or (src[0] >> 4) != T_PUBLISH:
        raise ValueError("not an encoded PUBLISH")
    while src[offset] & 0x80:
        offset += 1
        if offset > 4 or offset >= n:
            raise ValueError("not an encoded PUBLISH")
    offset += 1
    if not src[0] & 0x06:
        return 0
    # offset is now at the topic length; the packet id follows the topic.
    if packet_id <= 0 or packet_id > 0xFFFF:
        raise ValueError(f"packet id {packet_id} outside 1..65535")
    if offset + 2 > n:
        raise ValueError("not an encoded PUBLISH")
    offset += 2 + ((src[offset] << 8) | src[offset + 1])
    if offset + 2 > n:
        raise ValueError("not an encoded PUBLISH")
    return offset


cdef void copy_publish(unsigned char* dst, const unsigned char* src, Py_ssize_t n, Py_ssize_t offset,
                       int packet_id, bint dup) noexcept:
    """Copy an encoded PUBLISH with the packet id at ``offset`` and the DUP flag replaced; for
    QoS 0 (``offset`` 0) DUP stays 0 (MQTT-3.3.1-2)."""
    cdef unsigned int first = src[0]
    memcpy(dst, src, n)
    if offset:
        dst[0] = (first & 0xF7) | (0x08 if dup else 0)
        dst[offset] = packet_id >> 8
        dst[offset + 1] = packet_id & 0xFF
    else:
        dst[0] = first & 0xF7


cpdef append_publish(bytearray out, bytes encoded, int packet_id, bint dup):
    """Append the PUBLISH ``encoded`` to ``out`` with its packet id and DUP flag replaced.

    For QoS 0 the packet is copied unchanged except that DUP stays 0 (MQTT-3.3.1-2).
    """
    cdef const unsigned char* src = <const unsigned char*>PyBytes_AS_STRING(encoded)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(encoded)
    cdef Py_ssize_t offset = publish_id_offset(src, n, packet_id)
    cdef Py_ssize_t old = PyByteArray_GET_SIZE(out)
    out_resize(out, old + n)
    copy_publish(<unsigned char*>PyByteArray_AS_STRING(out) + old, src, n, offset, packet_id, dup)
