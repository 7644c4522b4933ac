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
one C call; and the relay's sampled publishes (``note_sample``), which the flush observes into the
latency histogram after its writes (``observe_samples``). The flush (the I/O) stays in the protocol
layer.
"""


cdef class ConnState:
    """The typed fields of an MQTT connection (``conn_state.pxd``)."""

    def __cinit__(self, *args, **kwargs):
        self._fd = -1


cdef class FlushState:
    """The typed fields of ``FlushScheduler`` (``conn_state.pxd``) and its ``mark``."""

    def mark(self, conn):
        """Queue ``conn`` for the next flush (the caller guards against marking twice): outside a
        held read, the first mark schedules the flush callback (the subclass's ``_flush``). The C
        paths call ``flush_mark`` (``conn_state.pxd``) itself."""
        flush_mark(self, conn)

    cdef int schedule(self) except -1:
        """The flush as a loop callback (the subclass's ``_flush``), once until it runs."""
        if not self.scheduled:
            self.scheduled = True
            self._callback = self._loop.run_callback(self._flush)
        return 0

    cdef int note_sample(self, StatsCore stats, double started) except -1:
        """A sampled publish (``started``: ``monotonic_s()`` when it was read) whose deliveries
        are queued: the flush observes it into ``stats``' latency histogram after its writes
        (``observe_samples``), so the sample covers the socket write with no loop callback of its
        own and no Python code. Outside a held read, schedules the flush if nothing did (a
        publish with no local subscriber marks no connection)."""
        cdef int n = self.pending_samples
        if n >= MAX_SAMPLES or (n and stats is not self._sample_stats):
            stats.observe(started)  # (a burst, or another broker's: now, before the write)
            return 0
        self._sample_stats = stats
        self._samples[n] = started
        self.pending_samples = n + 1
        if not self.holding:
            self.schedule()
        return 0

    cdef int observe_samples(self) except -1:
        """Observe the noted samples (the flush, after its writes); each once."""
        cdef int i
        cdef int n = self.pending_samples
        cdef StatsCore stats = self._sample_stats
        self.pending_samples = 0
        for i in range(n):
            stats.observe(self._samples[i])
        return 0
