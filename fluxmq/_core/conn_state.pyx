# cython: language_level=3
"""The typed state of an MQTT connection: ``ConnState``, the C base of the protocol layer's
``ConnectionCore`` (``fluxmq/protocol/_hub_read.pyx``) and so of ``MQTTConnection``.

The fields every PUBLISH touches (the output buffer and its flags, the publisher's session, version,
settings and policy, each target's allowance and aliases) live in the object's C struct: the relay
(``_core.relay``) and the protocol layer's C path read them as struct fields, without Python's
attribute lookup; Python code sees them as attributes (``conn_state.pxd`` lists them). Fields only,
no behaviour and no I/O.

``FlushState`` is the C base of the protocol layer's ``FlushCore`` (``FlushScheduler``): the dirty list
and the flags a ``mark`` reads, and ``mark`` itself, so the relay queues a written connection with
one C call. The flush (the I/O) stays in the protocol layer.
"""


cdef class ConnState:
    """The typed fields of an MQTT connection (``conn_state.pxd``)."""

    def __cinit__(self, *args, **kwargs):
        self._fd = -1


cdef class FlushState:
    """The typed fields of ``FlushScheduler`` (``conn_state.pxd``) and its ``mark``."""

    cpdef mark(self, conn):
        """Queue ``conn`` for the next flush (the caller guards against marking twice): outside a
        held read, the first mark schedules the flush callback (the subclass's ``_flush``)."""
        self._dirty.append(conn)
        if not self.scheduled and not self.holding:
            self.scheduled = True
            self._callback = self._loop.run_callback(self._flush)
