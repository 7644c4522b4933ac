# A whole PUBLISH appended to an output buffer from raw pointers (see publish_frame.pyx).

cdef Py_ssize_t publish_frame_size(Py_ssize_t tlen, Py_ssize_t plen, int qos, int version) noexcept

cdef int append_publish_frame(bytearray out, const unsigned char* topic, Py_ssize_t tlen,
                              const unsigned char* payload, Py_ssize_t plen, int qos, int packet_id,
                              int version) except -1

cdef Py_ssize_t write_publish_frame(unsigned char* d, const unsigned char* topic, Py_ssize_t tlen,
                                    const unsigned char* payload, Py_ssize_t plen, int qos,
                                    int packet_id, int version) noexcept

cdef bytes publish_frame_bytes(const unsigned char* topic, Py_ssize_t tlen,
                               const unsigned char* payload, Py_ssize_t plen, int qos, int packet_id,
                               int version)
