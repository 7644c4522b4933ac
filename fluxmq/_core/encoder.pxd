# C-level interface of the MQTT encoder, so the relay calls the PUBLISH encoders without going
# through Python.

from fluxmq._core.packets cimport Packet


cpdef bytes encode(Packet packet, int version=*)
cpdef bytes encode_publish(str topic, object payload, int qos=*, bint retain=*, bint dup=*,
                           int packet_id=*, dict properties=*, int version=*)
cpdef append_publish(bytearray out, bytes encoded, int packet_id, bint dup)
cdef Py_ssize_t publish_id_offset(const unsigned char* src, Py_ssize_t n, int packet_id) except -1
cdef void copy_publish(unsigned char* dst, const unsigned char* src, Py_ssize_t n, Py_ssize_t offset,
                       int packet_id, bint dup) noexcept
