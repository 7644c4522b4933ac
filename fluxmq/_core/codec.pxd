# C-level declarations of the MQTT codec, so other Cython modules can cimport the packet classes
# and call the PUBLISH encoders without going through Python.


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


cdef class Suback(Packet):
    cdef public int packet_id
    cdef public list reason_codes
    cdef public dict properties
    cdef tuple _key(self)


cdef class Unsubscribe(Packet):
    cdef public int packet_id
    cdef public list filters
    cdef public dict properties
    cdef tuple _key(self)


cdef class Unsuback(Packet):
    cdef public int packet_id
    cdef public list reason_codes
    cdef public dict properties
    cdef tuple _key(self)


cdef class Pingreq(Packet):
    pass


cdef class Pingresp(Packet):
    pass


cdef class Disconnect(Packet):
    cdef public int reason_code
    cdef public dict properties
    cdef tuple _key(self)


cdef class Auth(Packet):
    cdef public int reason_code
    cdef public dict properties
    cdef tuple _key(self)


cdef class Decoder:
    cdef public int version
    cdef public Py_ssize_t max_packet_size
    cdef bytearray _pending
    cdef bint _failed
    # the last PUBLISH topic decoded (its str and its bytes): a publisher's next message to it
    # shares the str, without the topic's check and decode
    cdef str _topic
    cdef bytes _topic_raw
    cpdef list feed(self, data)
    cdef list feed_buf(self, const unsigned char* buf, Py_ssize_t size)
    cdef Py_ssize_t _parse(self, const unsigned char* data, Py_ssize_t size, list out) except -1
    cdef object _decode(self, unsigned int first, const unsigned char* body, Py_ssize_t size)


cpdef bytes encode(Packet packet, int version=*)
cpdef bytes encode_publish(str topic, object payload, int qos=*, bint retain=*, bint dup=*,
                           int packet_id=*, dict properties=*, int version=*)
cpdef append_publish(bytearray out, bytes encoded, int packet_id, bint dup)
cdef Py_ssize_t publish_id_offset(const unsigned char* src, Py_ssize_t n, int packet_id) except -1
cdef void copy_publish(unsigned char* dst, const unsigned char* src, Py_ssize_t n, Py_ssize_t offset,
                       int packet_id, bint dup) noexcept
