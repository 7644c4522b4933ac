# cython: language_level=3
"""The typed state of an MQTT connection: ``ConnState``, the C base of the protocol layer's
``ConnectionCore`` (``fluxmq/protocol/_hub_read.pyx``) and so of ``MQTTConnection``.

The fields every PUBLISH touches (the output buffer and its flags, the publisher's session, version,
settings and policy, each target's allowance and aliases) live in the object's C struct: the relay
(``_core.relay``) and the protocol layer's C path read them as struct fields, without Python's
attribute lookup; Python code sees them as attributes (``conn_state.pxd`` lists them). Fields only,
no behaviour and no I/O.
"""


cdef class ConnState:
    """The typed fields of an MQTT connection (``conn_state.pxd``)."""

    def __cinit__(self, *args, **kwargs):
        self._fd = -1
