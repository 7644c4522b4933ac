cdef bytes fields_entry(str topic_obj, object origin_obj, bytes payload, int msg_qos, bint msg_retain,
                        int qos, bint retain)
