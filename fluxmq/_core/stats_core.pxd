# The broker's traffic counters as C integers (see stats_core.pyx).


cdef class QosCounts:
    cdef long long v[3]  # by QoS 0, 1, 2


cdef class StatsCore:
    cdef public long long messages_received  # every MQTT packet received
    cdef public long long messages_sent  # every MQTT packet sent
    cdef public long long bytes_received
    cdef public long long bytes_sent
    # application messages published to the broker / delivered to clients, by (delivered) QoS
    cdef readonly QosCounts received_qos
    cdef readonly QosCounts received_bytes_qos
    cdef readonly QosCounts sent_qos
    cdef readonly QosCounts sent_bytes_qos
    # the sampled publish-to-delivery latency histogram (see stats_core.pyx): per bucket of
    # LATENCY_BUCKETS and a last +Inf one, not cumulative; the sum in seconds
    cdef public list latency_counts
    cdef public double latency_sum

    cpdef observe_delivery_latency(self, double started)
    cdef int observe(self, double started) except -1  # the same, a C call with no override check


cdef double monotonic_s() noexcept nogil  # CLOCK_MONOTONIC, seconds
