# The typed state of an MQTT connection that the C paths read and write (see conn_state.pyx).

from cpython.ref cimport PyObject

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
    # the relay's last route of this publisher: a Route, valid while the router's generation and
    # epoch are still these (a lone publisher's next message skips the route cache's hash)
    cdef public str _relay_topic
    cdef public object _relay_route
    cdef public long long _relay_gen
    cdef public long long _relay_epoch
    # input (the protocol layer's hub callback)
    cdef public object decoder  # a codec Decoder (fed in C when it is one)
    cdef public object stream
    cdef public object _reader  # the greenlet running run(), while it runs
    cdef public double _wait_from  # loop time the current recv started waiting; 0 when not in recv
    cdef public StatsCore _stats  # Broker.stats (made in the broker's __init__, never replaced)
    cdef public int _fd  # the socket's descriptor for the protocol layer's libc calls; -1: none


cdef enum:
    MAX_SAMPLES = 8  # samples a flush holds (more in one loop turn: observed when noted)


cdef class FlushState:
    # the typed fields of the protocol layer's FlushScheduler that a mark touches
    cdef public list _dirty  # connections to write at the next flush
    cdef public bint scheduled  # a flush callback is pending (read by readers: see flush_now)
    cdef public object _callback  # the loop callback that runs the flush, while one is scheduled
    cdef public object _loop
    cdef public object storage  # a durable storage, or None
    # True while a hub callback serves a read: marks only queue the connection, and the callback's
    # ``release`` writes the batch or schedules the flush.
    cdef public bint holding
    # the sampled publishes (1 in 64) whose deliveries the next flush writes: their ``started``
    # (``stats_core.monotonic_s``), observed into ``_sample_stats`` after the writes
    cdef StatsCore _sample_stats
    cdef double _samples[MAX_SAMPLES]
    cdef readonly int pending_samples

    cdef int schedule(self) except -1
    cdef int note_sample(self, StatsCore stats, double started) except -1
    cdef int observe_samples(self) except -1


cdef extern from "Python.h":
    ctypedef struct _ListObject "PyListObject":
        PyObject** ob_item
        Py_ssize_t allocated
    void _set_size "Py_SET_SIZE"(PyObject* o, Py_ssize_t size)
    Py_ssize_t _size "Py_SIZE"(PyObject* o)
    void* _type "Py_TYPE"(PyObject* o)
    void _incref "Py_INCREF"(object o)


cdef inline int flush_mark(FlushState f, conn) except -1:
    """``f.mark(conn)`` inline, for the C paths (the relay's deliveries, a read's PUBACKs): queue
    ``conn`` for the next flush (the caller guards against marking twice); outside a held read, the
    first mark schedules the flush callback. A C call, where ``mark`` as a ``cpdef`` method looked
    for a Python override on ``FlushScheduler`` (a Python subclass) per call. The dirty list's
    append within its allocation is written here (``list.append``'s own fast case, without the call;
    the flush keeps the emptied list's storage for the next turn: ``FlushCore._spare``)."""
    cdef PyObject* dirty = <PyObject*>f._dirty
    cdef _ListObject* lst = <_ListObject*>dirty
    cdef Py_ssize_t n = -1
    if _type(dirty) == <void*>list:
        n = _size(dirty)
    if 0 <= n < lst.allocated:
        _incref(conn)
        lst.ob_item[n] = <PyObject*>conn
        _set_size(dirty, n + 1)
    else:
        f._dirty.append(conn)
    if not f.holding:
        f.schedule()
    return 0
