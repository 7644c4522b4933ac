# cython: language_level=3
"""MQTT 5.0 properties (section 2.2.2): their identifiers, the table of their wire types and of the
packets each may appear in, and the reader and writer of a property block, which check a block
against that table.
"""

from cpython.mem cimport PyMem_Free

from fluxmq._core.packets cimport (
    T_AUTH,
    T_CONNACK,
    T_CONNECT,
    T_DISCONNECT,
    T_PUBACK,
    T_PUBCOMP,
    T_PUBLISH,
    T_PUBREC,
    T_PUBREL,
    T_SUBACK,
    T_SUBSCRIBE,
    T_UNSUBACK,
    T_UNSUBSCRIBE,
    type_name,
)
from fluxmq._core.wire cimport (
    MAX_VBI,
    _Out,
    _Reader,
    _r_bin,
    _r_str,
    _r_u8,
    _r_u16,
    _r_u32,
    _r_vbi,
    _w_bin,
    _w_raw,
    _w_str,
    _w_u8,
    _w_u16,
    _w_u32,
    _w_vbi,
)

from fluxmq.errors import MalformedPacket, ProtocolError

# -- identifiers -----------------------------------------------------------------------------

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


# -- the table -------------------------------------------------------------------------------

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


# -- reading and writing a property block ------------------------------------------------------

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
                f"property 0x{pid:02X} is not allowed in {type_name(kind)} (MQTT 5.0 2.2.2.2)")
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
            raise ValueError(f"property 0x{pid:02X} is not allowed in {type_name(kind)}")
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
