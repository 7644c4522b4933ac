# cython: language_level=3
"""Sans-IO MQTT codec for 3.1 (level 3, ``MQIsdp``), 3.1.1 (level 4) and 5.0 (level 5).

``Decoder.feed(data)`` turns a byte stream into packet objects; ``encode`` turns a packet object
into bytes; ``encode_publish`` and ``append_publish`` are the fan-out fast paths. The codec holds
no socket and knows nothing of sessions: it checks what the bytes alone can prove (the malformed-
packet and static protocol rules) and leaves state-dependent rules to the protocol layer.

Normative statements are quoted by their MQTT 5.0 numbers unless a 3.1.1 number is given.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8
from libc.string cimport memchr, memcmp, memcpy

from fluxmq.errors import (
    MalformedPacket,
    MQTTError,
    PacketTooLarge,
    ProtocolError,
    TopicNameInvalid,
    UnsupportedProtocolVersion,
)

# -- constants -------------------------------------------------------------------------------

MQTT31 = 3
MQTT311 = 4
MQTT5 = 5

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14
AUTH = 15

PAYLOAD_FORMAT_INDICATOR = 0x01
MESSAGE_EXPIRY_INTERVAL = 0x02
CONTENT_TYPE = 0x03
RESPONSE_TOPIC = 0x08
CORRELATION_DATA = 0x09
SUBSCRIPTION_IDENTIFIER = 0x0B
SESSION_EXPIRY_INTERVAL = 0x11
ASSIGNED_CLIENT_IDENTIFIER = 0x12
SERVER_KEEP_ALIVE = 0x13
AUTHENTICATION_METHOD = 0x15
AUTHENTICATION_DATA = 0x16
REQUEST_PROBLEM_INFORMATION = 0x17
WILL_DELAY_INTERVAL = 0x18
REQUEST_RESPONSE_INFORMATION = 0x19
RESPONSE_INFORMATION = 0x1A
SERVER_REFERENCE = 0x1C
REASON_STRING = 0x1F
RECEIVE_MAXIMUM = 0x21
TOPIC_ALIAS_MAXIMUM = 0x22
TOPIC_ALIAS = 0x23
MAXIMUM_QOS = 0x24
RETAIN_AVAILABLE = 0x25
USER_PROPERTY = 0x26
MAXIMUM_PACKET_SIZE = 0x27
WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
SHARED_SUBSCRIPTION_AVAILABLE = 0x2A

#: Largest Remaining Length a four-byte Variable Byte Integer can carry.
MAX_REMAINING_LENGTH = 268435455

cdef enum:
    T_CONNECT = 1
    T_CONNACK = 2
    T_PUBLISH = 3
    T_PUBACK = 4
    T_PUBREC = 5
    T_PUBREL = 6
    T_PUBCOMP = 7
    T_SUBSCRIBE = 8
    T_SUBACK = 9
    T_UNSUBSCRIBE = 10
    T_UNSUBACK = 11
    T_PINGREQ = 12
    T_PINGRESP = 13
    T_DISCONNECT = 14
    T_AUTH = 15
    # Pseudo packet type for the Will Properties inside CONNECT (bit 0 of the allowed masks).
    K_WILL = 0

cdef enum:
    PT_BYTE = 1
    PT_U16 = 2
    PT_U32 = 3
    PT_VBI = 4
    PT_STR = 5
    PT_BIN = 6
    PT_PAIR = 7

cdef enum:
    P_SUBSCRIPTION_IDENTIFIER = 0x0B
    P_TOPIC_ALIAS = 0x23
    P_USER_PROPERTY = 0x26
    MAX_VBI = 268435455

_TYPE_NAMES = ("WILL", "CONNECT", "CONNACK", "PUBLISH", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP",
               "SUBSCRIBE", "SUBACK", "UNSUBSCRIBE", "UNSUBACK", "PINGREQ", "PINGRESP",
               "DISCONNECT", "AUTH")

# Property table of MQTT 5.0 section 2.2.2.2: wire type and, as a bit mask over packet types
# (bit 0 = Will Properties), where the property may appear.
cdef unsigned char _PTYPE[64]
cdef unsigned int _PALLOW[64]
# 1 for byte properties whose only values are 0 and 1, 2 for properties that must not be 0.
cdef unsigned char _PVALUE[64]


cdef void _define(int pid, int ptype, unsigned int allowed, int value_rule):
    _PTYPE[pid] = ptype
    _PALLOW[pid] = allowed
    _PVALUE[pid] = value_rule


cdef void _init_tables():
    cdef int i
    cdef unsigned int WILL = 1 << K_WILL
    cdef unsigned int CON = 1 << T_CONNECT
    cdef unsigned int CAK = 1 << T_CONNACK
    cdef unsigned int PUB = 1 << T_PUBLISH
    cdef unsigned int ACKS = (1 << T_PUBACK) | (1 << T_PUBREC) | (1 << T_PUBREL) | (1 << T_PUBCOMP)
    cdef unsigned int SUB = 1 << T_SUBSCRIBE
    cdef unsigned int SAK = 1 << T_SUBACK
    cdef unsigned int UNS = 1 << T_UNSUBSCRIBE
    cdef unsigned int UAK = 1 << T_UNSUBACK
    cdef unsigned int DIS = 1 << T_DISCONNECT
    cdef unsigned int AUT = 1 << T_AUTH
    for i in range(64):
        _define(i, 0, 0, 0)
    _define(0x01, PT_BYTE, PUB | WILL, 1)      # Payload Format Indicator
    _define(0x02, PT_U32, PUB | WILL, 0)       # Message Expiry Interval
    _define(0x03, PT_STR, PUB | WILL, 0)       # Content Type
    _define(0x08, PT_STR, PUB | WILL, 0)       # Response Topic
    _define(0x09, PT_BIN, PUB | WILL, 0)       # Correlation Data
    _define(0x0B, PT_VBI, PUB | SUB, 2)        # Subscription Identifier
    _define(0x11, PT_U32, CON | CAK | DIS, 0)  # Session Expiry Interval
    _define(0x12, PT_STR, CAK, 0)              # Assigned Client Identifier
    _define(0x13, PT_U16, CAK, 0)              # Server Keep Alive
    _define(0x15, PT_STR, CON | CAK | AUT, 0)  # Authentication Method
    _define(0x16, PT_BIN, CON | CAK | AUT, 0)  # Authentication Data
    _define(0x17, PT_BYTE, CON, 1)             # Request Problem Information
    _define(0x18, PT_U32, WILL, 0)             # Will Delay Interval
    _define(0x19, PT_BYTE, CON, 1)             # Request Response Information
    _define(0x1A, PT_STR, CAK, 0)              # Response Information
    _define(0x1C, PT_STR, CAK | DIS, 0)        # Server Reference
    _define(0x1F, PT_STR, CAK | ACKS | SAK | UAK | DIS | AUT, 0)  # Reason String
    _define(0x21, PT_U16, CON | CAK, 2)        # Receive Maximum
    _define(0x22, PT_U16, CON | CAK, 0)        # Topic Alias Maximum
    _define(0x23, PT_U16, PUB, 2)              # Topic Alias
    _define(0x24, PT_BYTE, CAK, 1)             # Maximum QoS
    _define(0x25, PT_BYTE, CAK, 1)             # Retain Available
    _define(0x26, PT_PAIR, CON | CAK | PUB | WILL | ACKS | SUB | SAK | UNS | UAK | DIS | AUT, 0)
    _define(0x27, PT_U32, CON | CAK, 2)        # Maximum Packet Size
    _define(0x28, PT_BYTE, CAK, 1)             # Wildcard Subscription Available
    _define(0x29, PT_BYTE, CAK, 1)             # Subscription Identifier Available
    _define(0x2A, PT_BYTE, CAK, 1)             # Shared Subscription Available


_init_tables()


# -- packet classes --------------------------------------------------------------------------

cdef inline object _props_key(dict properties):
    # None and {} mean the same: no properties.
    return properties if properties else None


cdef inline dict _props_arg(dict properties):
    return {} if properties is None else properties


cdef str _short_repr(object value):
    if isinstance(value, bytes) and len(<bytes>value) > 48:
        return repr((<bytes>value)[:48]) + "..."
    return repr(value)


cdef class _Record:
    """Field-wise equality and a readable repr for the packet classes."""

    _FIELDS = ()

    cdef tuple _key(self):
        return ()

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._key() == (<_Record>other)._key()

    def __ne__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._key() != (<_Record>other)._key()

    __hash__ = None

    def __repr__(self):
        parts = [f"{name}={_short_repr(getattr(self, name))}" for name in self._FIELDS]
        return f"{type(self).__name__}({', '.join(parts)})"


cdef class Packet(_Record):
    """Base class of every MQTT control packet; ``type`` is the packet type number."""

    type = 0


cdef class Will(_Record):
    """The Will Message of a CONNECT."""

    _FIELDS = ("topic", "payload", "qos", "retain", "properties")

    def __init__(self, str topic, payload=b"", int qos=0, bint retain=False, dict properties=None):
        self.topic = topic
        self.payload = _as_bytes(payload)
        self.qos = qos
        self.retain = retain
        self.properties = _props_arg(properties)

    cdef tuple _key(self):
        return (self.topic, self.payload, self.qos, self.retain, _props_key(self.properties))


cdef class Connect(Packet):
    """CONNECT; ``protocol_version`` is the protocol level (3, 4 or 5)."""

    type = T_CONNECT
    _FIELDS = ("client_id", "clean_start", "keepalive", "protocol_version", "protocol_name",
               "username", "password", "will", "properties")

    def __init__(self, str client_id="", bint clean_start=True, int keepalive=60,
                 int protocol_version=4, str protocol_name=None, str username=None,
                 bytes password=None, Will will=None, dict properties=None):
        self.client_id = client_id
        self.clean_start = clean_start
        self.keepalive = keepalive
        self.protocol_version = protocol_version
        if protocol_name is None:
            protocol_name = "MQIsdp" if protocol_version == 3 else "MQTT"
        self.protocol_name = protocol_name
        self.username = username
        self.password = password
        self.will = will
        self.properties = _props_arg(properties)

    cdef tuple _key(self):
        return (self.client_id, self.clean_start, self.keepalive, self.protocol_version,
                self.protocol_name, self.username, self.password, self.will,
                _props_key(self.properties))


cdef class Connack(Packet):
    """CONNACK; for 3.x ``reason_code`` is the CONNECT return code."""

    type = T_CONNACK
    _FIELDS = ("session_present", "reason_code", "properties")

    def __init__(self, bint session_present=False, int reason_code=0, dict properties=None):
        self.session_present = session_present
        self.reason_code = reason_code
        self.properties = _props_arg(properties)

    cdef tuple _key(self):
        return (self.session_present, self.reason_code, _props_key(self.properties))


cdef class Publish(Packet):
    """PUBLISH; ``topic`` may be ``""`` in 5.0 when a Topic Alias property is present."""

    type = T_PUBLISH
    _FIELDS = ("topic", "payload", "qos", "retain", "dup", "packet_id", "properties")

    def __init__(self, str topic, payload=b"", int qos=0, bint retain=False, bint dup=False,
                 int packet_id=0, dict properties=None):
        self.topic = topic
        self.payload = _as_bytes(payload)
        self.qos = qos
        self.retain = retain
        self.dup = dup
        self.packet_id = packet_id
        self.properties = _props_arg(properties)

    cdef tuple _key(self):
        return (self.topic, self.payload, self.qos, self.retain, self.dup, self.packet_id,
                _props_key(self.properties))


cdef class _PublishAck(Packet):
    """Common shape of PUBACK, PUBREC, PUBREL and PUBCOMP."""

    _FIELDS = ("packet_id", "reason_code", "properties")

    def __init__(self, int packet_id, int reason_code=0, dict properties=None):
        self.packet_id = packet_id
        self.reason_code = reason_code
        self.properties = _props_arg(properties)

    cdef tuple _key(self):
        return (self.packet_id, self.reason_code, _props_key(self.properties))


cdef class Puback(_PublishAck):
    """PUBACK (QoS 1 acknowledgement)."""

    type = T_PUBACK


cdef class Pubrec(_PublishAck):
    """PUBREC (QoS 2, part 1)."""

    type = T_PUBREC


cdef class Pubrel(_PublishAck):
    """PUBREL (QoS 2, part 2)."""

    type = T_PUBREL


cdef class Pubcomp(_PublishAck):
    """PUBCOMP (QoS 2, part 3)."""

    type = T_PUBCOMP


cdef class Subscription(_Record):
    """One topic filter of a SUBSCRIBE with its subscription options."""

    _FIELDS = ("filter", "qos", "no_local", "retain_as_published", "retain_handling")

    def __init__(self, str filter, int qos=0, bint no_local=False, bint retain_as_published=False,
                 int retain_handling=0):
        self.filter = filter
        self.qos = qos
        self.no_local = no_local
        self.retain_as_published = retain_as_published
        self.retain_handling = retain_handling

    cdef tuple _key(self):
        return (self.filter, self.qos, self.no_local, self.retain_as_published, self.retain_handling)


cdef class Subscribe(Packet):
    """SUBSCRIBE; ``subscriptions`` is a list of ``Subscription``."""

    type = T_SUBSCRIBE
    _FIELDS = ("packet_id", "subscriptions", "properties")

    def __init__(self, int packet_id, list subscriptions, dict properties=None):
        self.packet_id = packet_id
        self.subscriptions = subscriptions
        self.properties = _props_arg(properties)

    cdef tuple _key(self):
        return (self.packet_id, self.subscriptions, _props_key(self.properties))


cdef class Suback(Packet):
    """SUBACK; ``reason_codes`` are the 5.0 reason codes or the 3.x return codes."""

    type = T_SUBACK
    _FIELDS = ("packet_id", "reason_codes", "properties")

    def __init__(self, int packet_id, list reason_codes, dict properties=None):
        self.packet_id = packet_id
        self.reason_codes = reason_codes
        self.properties = _props_arg(properties)

    cdef tuple _key(self):
        return (self.packet_id, self.reason_codes, _props_key(self.properties))


cdef class Unsubscribe(Packet):
    """UNSUBSCRIBE; ``filters`` is a list of topic filters."""

    type = T_UNSUBSCRIBE
    _FIELDS = ("packet_id", "filters", "properties")

    def __init__(self, int packet_id, list filters, dict properties=None):
        self.packet_id = packet_id
        self.filters = filters
        self.properties = _props_arg(properties)

    cdef tuple _key(self):
        return (self.packet_id, self.filters, _props_key(self.properties))


cdef class Unsuback(Packet):
    """UNSUBACK; ``reason_codes`` is None for 3.x (no codes on the wire)."""

    type = T_UNSUBACK
    _FIELDS = ("packet_id", "reason_codes", "properties")

    def __init__(self, int packet_id, list reason_codes=None, dict properties=None):
        self.packet_id = packet_id
        self.reason_codes = reason_codes
        self.properties = _props_arg(properties)

    cdef tuple _key(self):
        return (self.packet_id, self.reason_codes if self.reason_codes else None,
                _props_key(self.properties))


cdef class Pingreq(Packet):
    """PINGREQ."""

    type = T_PINGREQ


cdef class Pingresp(Packet):
    """PINGRESP."""

    type = T_PINGRESP


cdef class Disconnect(Packet):
    """DISCONNECT; ``reason_code`` and ``properties`` exist on the wire only in 5.0."""

    type = T_DISCONNECT
    _FIELDS = ("reason_code", "properties")

    def __init__(self, int reason_code=0, dict properties=None):
        self.reason_code = reason_code
        self.properties = _props_arg(properties)

    cdef tuple _key(self):
        return (self.reason_code, _props_key(self.properties))


cdef class Auth(Packet):
    """AUTH (5.0 only)."""

    type = T_AUTH
    _FIELDS = ("reason_code", "properties")

    def __init__(self, int reason_code=0, dict properties=None):
        self.reason_code = reason_code
        self.properties = _props_arg(properties)

    cdef tuple _key(self):
        return (self.reason_code, _props_key(self.properties))


cdef bytes _as_bytes(object value):
    if PyBytes_CheckExact(value):
        return <bytes>value
    return bytes(value)


# -- decoding --------------------------------------------------------------------------------

cdef struct _Reader:
    const unsigned char* data
    Py_ssize_t pos
    Py_ssize_t end


cdef int _truncated() except -1:
    raise MalformedPacket("packet body ends inside a field (remaining length too short)")


cdef int _trailing() except -1:
    raise MalformedPacket("bytes left over at the end of the packet (remaining length too long)")


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


cdef long long _r_vbi(_Reader* r) except -1:
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
            raise MalformedPacket("Variable Byte Integer longer than 4 bytes (MQTT-1.5.5)")


cdef str _utf8(const unsigned char* p, Py_ssize_t n):
    """Decode an MQTT UTF-8 string: well-formed, no surrogates, no U+0000 (MQTT-1.5.4-1/2)."""
    cdef Py_ssize_t i
    cdef unsigned char high = 0
    for i in range(n):
        if p[i] == 0:
            raise MalformedPacket("U+0000 in a UTF-8 string (MQTT-1.5.4-2)")
        high |= p[i]
    if high < 0x80:
        return PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    try:
        # The strict codec rejects ill-formed sequences, overlongs and encoded surrogates.
        return PyUnicode_DecodeUTF8(<const char*>p, n, "strict")
    except UnicodeDecodeError:
        raise MalformedPacket("ill-formed UTF-8 string (MQTT-1.5.4-1)") from None


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
    if high < 0x80:
        return PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    try:
        return PyUnicode_DecodeUTF8(<const char*>p, n, "strict")
    except UnicodeDecodeError:
        raise MalformedPacket("ill-formed UTF-8 string (MQTT-1.5.4-1)") from None


cdef str _r_str(_Reader* r):
    cdef Py_ssize_t n = _r_u16(r)
    cdef str value
    if r.end - r.pos < n:
        _truncated()
    value = _utf8(r.data + r.pos, n)
    r.pos += n
    return value


cdef bytes _r_bin(_Reader* r):
    cdef Py_ssize_t n = _r_u16(r)
    if r.end - r.pos < n:
        _truncated()
    r.pos += n
    return PyBytes_FromStringAndSize(<const char*>(r.data + r.pos - n), n)


cdef dict _r_props(_Reader* r, int kind):
    """Read a property block (length, then properties) allowed in packet type ``kind``."""
    cdef long long length = _r_vbi(r)
    cdef dict props = {}
    cdef Py_ssize_t outer_end = r.end
    cdef long long pid, number
    cdef unsigned long long seen = 0
    cdef int ptype
    cdef object value
    cdef list values
    if length == 0:
        return props
    if length > r.end - r.pos:
        raise MalformedPacket("property length exceeds the packet")
    r.end = r.pos + length
    while r.pos < r.end:
        pid = _r_vbi(r)
        if pid >= 64 or _PTYPE[pid] == 0:
            raise MalformedPacket(f"unknown property identifier 0x{pid:02X}")
        if not (_PALLOW[pid] & (1u << kind)):
            raise MalformedPacket(
                f"property 0x{pid:02X} is not allowed in {_TYPE_NAMES[kind]} (MQTT 5.0 2.2.2.2)")
        if seen & (1ULL << pid):
            if pid != P_USER_PROPERTY and not (pid == P_SUBSCRIPTION_IDENTIFIER and kind == T_PUBLISH):
                raise ProtocolError(f"property 0x{pid:02X} appears more than once")
        seen |= 1ULL << pid
        ptype = _PTYPE[pid]
        if ptype == PT_STR:
            value = _r_str(r)
        elif ptype == PT_BIN:
            value = _r_bin(r)
        elif ptype == PT_PAIR:
            value = (_r_str(r), _r_str(r))
            values = props.get(P_USER_PROPERTY)
            if values is None:
                props[P_USER_PROPERTY] = [value]
            else:
                values.append(value)
            continue
        else:
            if ptype == PT_BYTE:
                number = _r_u8(r)
            elif ptype == PT_U16:
                number = _r_u16(r)
            elif ptype == PT_U32:
                number = _r_u32(r)
            else:
                number = _r_vbi(r)
            if _PVALUE[pid] == 1 and number > 1:
                raise ProtocolError(f"property 0x{pid:02X} must be 0 or 1, got {number}")
            if _PVALUE[pid] == 2 and number == 0:
                if pid == P_TOPIC_ALIAS:
                    # Its own reason code: Topic Alias invalid [MQTT-3.3.2-8].
                    raise ProtocolError("topic alias 0", 0x94)
                raise ProtocolError(f"property 0x{pid:02X} must not be 0")
            value = number
            if pid == P_SUBSCRIPTION_IDENTIFIER:
                values = props.get(pid)
                if values is None:
                    props[pid] = [value]
                else:
                    values.append(value)
                continue
        props[pid] = value
    r.end = outer_end
    return props


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
                f"{_TYPE_NAMES[ptype]} fixed header flags must be 0010 (MQTT-3.6.1-1, MQTT-3.8.1-1, "
                f"MQTT-3.10.1-1)")
        return 0
    if flags:
        raise MalformedPacket(f"reserved flags set in {_TYPE_NAMES[ptype]} fixed header (MQTT-2.1.3-1)")
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
    pkt = Publish.__new__(Publish)
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
    if ptype == T_PUBACK:
        pkt = Puback.__new__(Puback)
    elif ptype == T_PUBREC:
        pkt = Pubrec.__new__(Pubrec)
    elif ptype == T_PUBREL:
        pkt = Pubrel.__new__(Pubrel)
    else:
        pkt = Pubcomp.__new__(Pubcomp)
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
        if self._failed:
            raise MalformedPacket("decoder is unusable after a protocol error")
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


# -- encoding --------------------------------------------------------------------------------

cdef struct _Out:
    unsigned char* data
    Py_ssize_t len
    Py_ssize_t cap


cdef int _reserve(_Out* o, Py_ssize_t n) except -1:
    cdef Py_ssize_t need = o.len + n
    cdef Py_ssize_t cap = o.cap if o.cap else 128
    cdef void* p
    if need <= o.cap:
        return 0
    while cap < need:
        cap *= 2
    p = PyMem_Realloc(o.data, cap)
    if p == NULL:
        raise MemoryError()
    o.data = <unsigned char*>p
    o.cap = cap
    return 0


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


cdef int _w_str(_Out* o, object value) except -1:
    cdef Py_ssize_t n
    cdef const char* p
    if not isinstance(value, str):
        raise TypeError(f"expected str, got {type(value).__name__}")
    p = PyUnicode_AsUTF8AndSize(value, &n)
    if n > 65535:
        raise ValueError("UTF-8 string longer than 65,535 bytes")
    if memchr(p, 0, n) != NULL:
        raise ValueError("U+0000 is not allowed in an MQTT string (MQTT-1.5.4-2)")
    _w_u16(o, n)
    _w_raw(o, p, n)
    return 0


cdef int _w_bin(_Out* o, object value) except -1:
    cdef Py_buffer view
    PyObject_GetBuffer(value, &view, PyBUF_SIMPLE)
    try:
        if view.len > 65535:
            raise ValueError("binary data longer than 65,535 bytes")
        _w_u16(o, view.len)
        _w_raw(o, view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return 0


cdef long long _int_in(object value, long long low, long long high, long long pid) except? -1:
    cdef long long number
    if not isinstance(value, int):
        raise TypeError(f"property 0x{pid:02X} needs an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"property 0x{pid:02X} value {value} outside {low}..{high}")
    number = value
    return number


cdef int _w_props(_Out* o, dict props, int kind) except -1:
    """Write the properties (without the length prefix) after checking them against ``kind``."""
    cdef long long pid
    cdef int ptype
    cdef object key, value, item
    for key, value in props.items():
        if not isinstance(key, int) or not 0 < key < 64 or _PTYPE[<long long>key] == 0:
            raise ValueError(f"unknown property identifier {key!r}")
        pid = key
        if not (_PALLOW[pid] & (1u << kind)):
            raise ValueError(f"property 0x{pid:02X} is not allowed in {_TYPE_NAMES[kind]}")
        ptype = _PTYPE[pid]
        if ptype == PT_PAIR:
            for item in value:
                name, text = item
                _w_u8(o, pid)
                _w_str(o, name)
                _w_str(o, text)
        elif pid == P_SUBSCRIPTION_IDENTIFIER:
            items = [value] if isinstance(value, int) else value
            if kind != T_PUBLISH and len(items) != 1:
                raise ValueError("only PUBLISH may carry several Subscription Identifiers")
            for item in items:
                _w_u8(o, pid)
                _w_vbi(o, _int_in(item, 1, MAX_VBI, pid))
        elif ptype == PT_STR:
            _w_u8(o, pid)
            _w_str(o, value)
        elif ptype == PT_BIN:
            _w_u8(o, pid)
            _w_bin(o, value)
        elif ptype == PT_BYTE:
            _w_u8(o, pid)
            _w_u8(o, _int_in(value, 0, 0xFF, pid))
        elif ptype == PT_U16:
            _w_u8(o, pid)
            _w_u16(o, _int_in(value, 0, 0xFFFF, pid))
        elif ptype == PT_U32:
            _w_u8(o, pid)
            _w_u32(o, _int_in(value, 0, 0xFFFFFFFF, pid))
        else:
            _w_u8(o, pid)
            _w_vbi(o, _int_in(value, 0, MAX_VBI, pid))
    return 0


cdef int _w_prop_block(_Out* o, dict props, int kind) except -1:
    """Write a property length and the properties."""
    cdef _Out block = _Out(NULL, 0, 0)
    if not props:
        return _w_u8(o, 0)
    try:
        _w_props(&block, props, kind)
        _w_vbi(o, block.len)
        _w_raw(o, block.data, block.len)
    finally:
        PyMem_Free(block.data)
    return 0


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
    PyByteArray_Resize(out, old + n)
    copy_publish(<unsigned char*>PyByteArray_AS_STRING(out) + old, src, n, offset, packet_id, dup)
