# cython: language_level=3
"""The typed state of the broker-layer objects every PUBLISH goes through: the C bases of
``Broker`` (``BrokerCore``), ``Router`` (``RouterCore``), ``Route`` (``RouteCore``) and ``Session``
(``SessionCore``), as ``ConnState`` is for the connection.

The fields the relay (``_core.relay``) reads per message (the broker's observers and peers, the
router's route cache and its generation, a route's targets and groups, a session's delivery, queue,
window and next packet id) live in the objects' C structs: the relay reads them as struct fields
instead of through Python's generic attribute lookup (the type's MRO, then the instance dict or a
slot descriptor). Python code sees them as attributes (``broker_core.pxd`` lists them and their
types). Fields only, no behaviour and no I/O; nothing here imports the broker layer.
"""


cdef class BrokerCore:
    """The typed fields of ``Broker`` (``broker_core.pxd``)."""


cdef class RouterCore:
    """The typed fields of ``Router`` (``broker_core.pxd``)."""

    def __cinit__(self, *args, **kwargs):
        self._generation = -1


cdef class RouteCore:
    """The typed fields of ``Route`` (``broker_core.pxd``)."""


cdef class SessionCore:
    """The typed fields of ``Session`` (``broker_core.pxd``)."""
