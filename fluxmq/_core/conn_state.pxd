# The typed state of an MQTT connection that the C paths read and write (see conn_state.pyx).

from fluxmq._core.stats_core cimport StatsCore


cdef class ConnState:
    # output (written by the relay and the handlers, sent by the protocol layer's flush)
    cdef public bytearray out  # the output buffer: what the next flush sends
    cdef public bint _dirty  # queued with the flusher
    cdef public Py_ssize_t _npk  # packets written since the last flush (counted there)
    cdef public object _writer  # the greenlet finishing a write the kernel could not take at once
    cdef public Py_ssize_t _high  # pending output above which the client counts as congested
    cdef public Py_ssize_t _high_base  # settings.write_buffer_high
    cdef public bint _want_writable
    cdef public bint closed
    cdef public object flusher
    # what the relay reads of the publisher and of each target
    cdef public object broker
    cdef public object session
    cdef public object settings
    cdef public object client_id
    cdef public int version
    cdef public object _policy
    cdef public object _aliases_out
    cdef public Py_ssize_t _client_max_packet
    # input (the protocol layer's hub callback)
    cdef public object decoder
    cdef public object stream
    cdef public object _reader  # the greenlet running run(), while it runs
    cdef public double _wait_from  # loop time the current recv started waiting; 0 when not in recv
    cdef public StatsCore _stats  # Broker.stats (made in the broker's __init__, never replaced)
    cdef public int _fd  # the socket's descriptor for the protocol layer's libc calls; -1: none
