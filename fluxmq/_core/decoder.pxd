# C-level interface of the MQTT decoder, so the connection's read path can feed it from its own
# buffer and the relay can read its state (version, pending bytes) without going through Python.


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
