# C-level interface of the MQTT 5.0 property block (properties.pyx): the decoder and the encoder read
# and write a packet's properties through it.

from fluxmq._core.wire cimport _Out, _Reader


cdef enum:
    # Pseudo packet type for the Will Properties inside CONNECT (bit 0 of the allowed masks).
    K_WILL = 0

cdef enum:
    # wire types of the property values
    PT_BYTE = 1
    PT_U16 = 2
    PT_U32 = 3
    PT_VBI = 4
    PT_STR = 5
    PT_BIN = 6
    PT_PAIR = 7

cdef enum:
    # the identifiers the reader and the writers treat specially
    P_SUBSCRIPTION_IDENTIFIER = 0x0B
    P_TOPIC_ALIAS = 0x23
    P_USER_PROPERTY = 0x26


cdef dict _r_props(_Reader* r, int kind)
cdef int _w_props(_Out* o, dict props, int kind) except -1
cdef int _w_prop_block(_Out* o, dict props, int kind) except -1
