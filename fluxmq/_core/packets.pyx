# cython: language_level=3
"""The MQTT control packets as objects: one class per packet type, with field-wise equality and a
readable repr. The decoder makes them from bytes and the encoder makes bytes of them.

Normative statements are quoted by their MQTT 5.0 numbers unless a 3.1.1 number is given.
"""

from cpython.bytes cimport PyBytes_CheckExact

# -- constants -------------------------------------------------------------------------------

MQTT31 = 3
MQTT311 = 4
MQTT5 = 5

CONNECT = T_CONNECT
CONNACK = T_CONNACK
PUBLISH = T_PUBLISH
PUBACK = T_PUBACK
PUBREC = T_PUBREC
PUBREL = T_PUBREL
PUBCOMP = T_PUBCOMP
SUBSCRIBE = T_SUBSCRIBE
SUBACK = T_SUBACK
UNSUBSCRIBE = T_UNSUBSCRIBE
UNSUBACK = T_UNSUBACK
PINGREQ = T_PINGREQ
PINGRESP = T_PINGRESP
DISCONNECT = T_DISCONNECT
AUTH = T_AUTH

# Names by packet type for error messages; 0 names the Will Properties (properties.K_WILL), which
# the property table treats as a packet type of their own.
_TYPE_NAMES = ("WILL", "CONNECT", "CONNACK", "PUBLISH", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP",
               "SUBSCRIBE", "SUBACK", "UNSUBSCRIBE", "UNSUBACK", "PINGREQ", "PINGRESP",
               "DISCONNECT", "AUTH")


cdef str type_name(unsigned int ptype):
    return _TYPE_NAMES[ptype]


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


cdef class _SubscribeAck(Packet):
    """Common shape of SUBACK and UNSUBACK: a packet id and a reason code per filter."""

    _FIELDS = ("packet_id", "reason_codes", "properties")

    def __init__(self, int packet_id, list reason_codes, dict properties=None):
        self.packet_id = packet_id
        self.reason_codes = reason_codes
        self.properties = _props_arg(properties)

    cdef tuple _key(self):
        return (self.packet_id, self.reason_codes, _props_key(self.properties))


cdef class Suback(_SubscribeAck):
    """SUBACK; ``reason_codes`` are the 5.0 reason codes or the 3.x return codes."""

    type = T_SUBACK


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


cdef class Unsuback(_SubscribeAck):
    """UNSUBACK; ``reason_codes`` is None for 3.x (no codes on the wire)."""

    type = T_UNSUBACK

    def __init__(self, int packet_id, list reason_codes=None, dict properties=None):
        _SubscribeAck.__init__(self, packet_id, reason_codes, properties)

    cdef tuple _key(self):
        return (self.packet_id, self.reason_codes if self.reason_codes else None,
                _props_key(self.properties))


cdef class Pingreq(Packet):
    """PINGREQ."""

    type = T_PINGREQ


cdef class Pingresp(Packet):
    """PINGRESP."""

    type = T_PINGRESP


cdef class _ReasonPacket(Packet):
    """Common shape of DISCONNECT and AUTH: a reason code and properties, nothing else."""

    _FIELDS = ("reason_code", "properties")

    def __init__(self, int reason_code=0, dict properties=None):
        self.reason_code = reason_code
        self.properties = _props_arg(properties)

    cdef tuple _key(self):
        return (self.reason_code, _props_key(self.properties))


cdef class Disconnect(_ReasonPacket):
    """DISCONNECT; ``reason_code`` and ``properties`` exist on the wire only in 5.0."""

    type = T_DISCONNECT


cdef class Auth(_ReasonPacket):
    """AUTH (5.0 only)."""

    type = T_AUTH


cdef bytes _as_bytes(object value):
    if PyBytes_CheckExact(value):
        return <bytes>value
    return bytes(value)


# -- the decoder's constructors ----------------------------------------------------------------
# ``X.__new__(X)`` in this module calls X's allocator directly; in a module that only cimports X
# it goes through the type's tp_new slot, some 40 instructions more per packet. The decoder makes
# the per-message packets (PUBLISH and its acknowledgements) here.

cdef Publish new_publish():
    return Publish.__new__(Publish)


cdef _PublishAck new_publish_ack(unsigned int ptype):
    if ptype == T_PUBACK:
        return Puback.__new__(Puback)
    if ptype == T_PUBREC:
        return Pubrec.__new__(Pubrec)
    if ptype == T_PUBREL:
        return Pubrel.__new__(Pubrel)
    return Pubcomp.__new__(Pubcomp)
