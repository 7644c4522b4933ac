# cython: language_level=3
"""The broker's traffic counters as C integers: ``StatsCore``, the C base of ``BrokerStats``
(``fluxmq/broker/stats.py``).

The counters every message touches (packets and bytes in and out, application messages and their
payload bytes by QoS) and the sampled publish-to-delivery latency histogram live in the object's C
struct: the relay (``_core.relay``) and the protocol layer's C read and flush add to them as C
integers, without making an ``int`` object per add; Python
code (the handlers, ``$SYS``, ``/metrics``, the admin API) reads and adds to them as before: the
four totals are ``int`` attributes, the per-QoS counts are ``QosCounts``, a fixed sequence of three
that indexes, assigns, iterates and compares like the ``[0, 0, 0]`` lists they replace. Counters
only, no behaviour and no I/O.

The latency histogram is observed in C (for 1 publish in 64: on the relay's paths by the flush
scheduler after its writes, ``FlushState.note_sample``; ``Broker.publish`` registers
``observe_delivery_latency`` as a loop callback): a lone message's path runs no Python code, so the
one sampled message in 64 was the only one to enter the interpreter, whose code and data are cold
after 64 ms at 1,000 msg/s: ~26 us more before its delivery was written, 1.6 % of the messages, the
p99 of a one-CPU latency run (bench/RESULTS.md, "The p99 of a lone message").
"""

from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec


cdef double monotonic_s() noexcept nogil:
    """CLOCK_MONOTONIC in seconds (``time.perf_counter()`` on Linux), without a Python call."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


def monotonic() -> float:
    """The clock of a sampled publish's ``started`` (``observe_delivery_latency``)."""
    return monotonic_s()

#: upper bounds (seconds) of the publish-to-delivery latency histogram; a last bucket is +Inf
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
cdef enum:
    N_BUCKETS = 14  # len(LATENCY_BUCKETS)
cdef double _BOUNDS[N_BUCKETS]
for _k in range(N_BUCKETS):
    _BOUNDS[_k] = LATENCY_BUCKETS[_k]


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
        self.latency_counts = [0] * (N_BUCKETS + 1)
        self.latency_sum = 0.0

    cpdef observe_delivery_latency(self, double started):
        """Record one sampled publish-to-delivery latency; ``started`` is a ``monotonic()`` value
        (the bucket is ``bisect_left(LATENCY_BUCKETS, elapsed)``)."""
        self.observe(started)

    cdef int observe(self, double started) except -1:
        """``observe_delivery_latency`` for C callers (the flush scheduler, ``FlushState``)."""
        cdef double elapsed = monotonic_s() - started
        cdef Py_ssize_t k = 0
        while k < N_BUCKETS and _BOUNDS[k] < elapsed:
            k += 1
        counts = self.latency_counts
        counts[k] += 1
        self.latency_sum += elapsed
        return 0
