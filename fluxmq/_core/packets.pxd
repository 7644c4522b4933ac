# C-level declarations of the MQTT packet classes, so other Cython modules can cimport them (and
# the packet type numbers) and read their fields without going through Python.


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


cdef str type_name(unsigned int ptype)


cdef class _Record:
    cdef tuple _key(self)


cdef class Packet(_Record):
    pass


cdef class Will(_Record):
    cdef public str topic
    cdef public bytes payload
    cdef public int qos
    cdef public bint retain
    cdef public dict properties
    cdef tuple _key(self)


cdef class Connect(Packet):
    cdef public str client_id
    cdef public bint clean_start
    cdef public int keepalive
    cdef public int protocol_version
    cdef public str protocol_name
    cdef public str username
    cdef public bytes password
    cdef public Will will
    cdef public dict properties
    cdef tuple _key(self)


cdef class Connack(Packet):
    cdef public bint session_present
    cdef public int reason_code
    cdef public dict properties
    cdef tuple _key(self)


cdef class Publish(Packet):
    cdef public str topic
    cdef public bytes payload
    cdef public int qos
    cdef public bint retain
    cdef public bint dup
    cdef public int packet_id
    cdef public dict properties
    cdef tuple _key(self)


cdef class _PublishAck(Packet):
    cdef public int packet_id
    cdef public int reason_code
    cdef public dict properties
    cdef tuple _key(self)


cdef class Puback(_PublishAck):
    pass


cdef class Pubrec(_PublishAck):
    pass


cdef class Pubrel(_PublishAck):
    pass


cdef class Pubcomp(_PublishAck):
    pass


cdef class Subscription(_Record):
    cdef public str filter
    cdef public int qos
    cdef public bint no_local
    cdef public bint retain_as_published
    cdef public int retain_handling
    cdef tuple _key(self)


cdef class Subscribe(Packet):
    cdef public int packet_id
    cdef public list subscriptions
    cdef public dict properties
    cdef tuple _key(self)


cdef class _SubscribeAck(Packet):
    cdef public int packet_id
    cdef public list reason_codes
    cdef public dict properties
    cdef tuple _key(self)


cdef class Suback(_SubscribeAck):
    pass


cdef class Unsubscribe(Packet):
    cdef public int packet_id
    cdef public list filters
    cdef public dict properties
    cdef tuple _key(self)


cdef class Unsuback(_SubscribeAck):
    cdef tuple _key(self)


cdef class Pingreq(Packet):
    pass


cdef class Pingresp(Packet):
    pass


cdef class _ReasonPacket(Packet):
    cdef public int reason_code
    cdef public dict properties
    cdef tuple _key(self)


cdef class Disconnect(_ReasonPacket):
    pass


cdef class Auth(_ReasonPacket):
    pass


# allocators of the per-message packets, for the decoder (see packets.pyx)
cdef Publish new_publish()
cdef _PublishAck new_publish_ack(unsigned int ptype)
