# cython: language_level=3
"""The broker's traffic counters as C integers: ``StatsCore``, the C base of ``BrokerStats``
(``fluxmq/broker/stats.py``).

The counters every message touches (packets and bytes in and out, application messages and their
payload bytes by QoS) live in the object's C struct: the relay (``_core.relay``) and the protocol
layer's C read and flush add to them as C integers, without making an ``int`` object per add; Python
code (the handlers, ``$SYS``, ``/metrics``, the admin API) reads and adds to them as before: the
four totals are ``int`` attributes, the per-QoS counts are ``QosCounts``, a fixed sequence of three
that indexes, assigns, iterates and compares like the ``[0, 0, 0]`` lists they replace. Counters
only, no behaviour and no I/O.
"""


cdef Py_ssize_t _index(i) except -1:
    cdef Py_ssize_t k = i
    if k < 0:
        k += 3
    if k < 0 or k >= 3:
        raise IndexError("QoS count index out of range")
    return k


cdef class QosCounts:
    """Three counters by QoS (0, 1, 2) that behave as a list of three ints of fixed length."""

    def __len__(self):
        return 3

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.v[0], self.v[1], self.v[2]][i]
        return self.v[_index(i)]

    def __setitem__(self, i, long long value):
        self.v[_index(i)] = value

    def __iter__(self):
        return iter((self.v[0], self.v[1], self.v[2]))

    def __eq__(self, other):
        if isinstance(other, (QosCounts, list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    def __ne__(self, other):
        if isinstance(other, (QosCounts, list, tuple)):
            return list(self) != list(other)
        return NotImplemented

    __hash__ = None

    def __repr__(self):
        return f"QosCounts([{self.v[0]}, {self.v[1]}, {self.v[2]}])"


cdef class StatsCore:
    """The typed counters of ``BrokerStats`` (``stats_core.pxd``), all zero when made."""

    def __cinit__(self, *args, **kwargs):
        self.received_qos = QosCounts()
        self.received_bytes_qos = QosCounts()
        self.sent_qos = QosCounts()
        self.sent_bytes_qos = QosCounts()
