# cython: language_level=3
"""The hot state of an MQTT connection as typed C fields, and the lone message's path in C.

``ConnectionCore`` is the C base of ``MQTTConnection`` (``connection.py``); its own base,
``_core.conn_state.ConnState``, holds the fields that every read, relay and flush touch (the output
buffer and its dirty flag, the packet count, the writer, the output allowance, ``closed``, the
session, version and settings, the decoder, the stream, the flusher, the reader greenlet) in the
object's C struct, so the methods here and the relay (``_core.relay``) read them without Python's
attribute lookup; the connection's Python code sees them as attributes.

- ``_on_input(loop)``: the hub callback of the I/O watcher a connected plain-TCP reader waits on
  (``MQTTConnection.run``): one non-blocking ``recv`` with libc into a process-wide buffer, the
  decode, the relay, PINGREQs, then ``FlushScheduler.release``. Anything else (a PUBLISH the
  relay declines, other packets, errors, end of stream) is handed to the reader greenlet, as the
  Python callback it replaces did (the same arguments, the same order of effects).
- ``flush_nowait(limit=None)``: the FlushScheduler's write of one connection; plain TCP (a known
  descriptor) sends with libc's ``send``, other streams through ``stream.send_nowait``.

The descriptor is only set for plain TCP (``SocketStream``) by ``run`` and cleared before the
socket is closed (``_teardown``, ``_drain``), so a closed socket's number, reused by another
connection, is never written to. Everything not on the common path calls back into the Python
methods of the subclass (``_flush_prefix``, ``_spawn_drain``, ``_release_allowance``, ``_writable``,
``_write``).
"""

cimport cython
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.list cimport PyList_GET_SIZE
from cpython.pycapsule cimport PyCapsule_GetPointer
from cpython.ref cimport PyObject
from libc.errno cimport EAGAIN, EINTR, errno

from fluxmq._core.decoder cimport Decoder
from fluxmq._core.outbuf cimport spare_keep
from fluxmq._core.conn_state cimport ConnState, FlushState
from fluxmq._core.stats_core cimport StatsCore

import logging

from fluxmq._core.codec import Pingreq
from fluxmq._core.relay import FORWARD_C, SERVE_C, PublishRelay
from fluxmq.errors import MQTTError
from fluxmq.protocol.parking import _PINGRESP


cdef extern from "<sys/socket.h>" nogil:
    ssize_t c_recv "recv"(int fd, void* buf, size_t n, int flags)
    ssize_t c_send "send"(int fd, const void* buf, size_t n, int flags)
    int MSG_DONTWAIT
    int MSG_NOSIGNAL


cdef extern from "<errno.h>":
    int EWOULDBLOCK


cdef enum:
    READ_SIZE = 65536
    # An output buffer of at most this many bytes keeps its memory when a send empties it: the next
    # message of the same size is appended without a realloc (down to 1 byte on the clear, up again
    # on the append); a larger one is given back (an idle connection holds at most this).
    KEEP_OUT = 512


cdef extern from "Python.h":
    ctypedef struct PyByteArrayObject:
        Py_ssize_t ob_alloc  # bytes allocated at ob_bytes
        char* ob_bytes
        char* ob_start  # the logical start (a deleted prefix moves it)
        Py_ssize_t ob_exports
    void Py_SET_SIZE(object o, Py_ssize_t size)


cdef extern from "Python.h":
    PyObject* PyList_GET_ITEM_RAW "PyList_GET_ITEM"(object lst, Py_ssize_t i)
    void Py_DECREF_RAW "Py_DECREF"(PyObject* o)


cdef inline void _empty(list lst):
    """``del lst[:]`` keeping the list's item storage (the last item first, each out of the list
    before its reference is dropped)."""
    cdef Py_ssize_t n = PyList_GET_SIZE(lst)
    cdef PyObject* item
    while n > 0:
        n -= 1
        item = PyList_GET_ITEM_RAW(lst, n)
        Py_SET_SIZE(lst, n)
        Py_DECREF_RAW(item)


cdef inline int _clear(bytearray out) except -1:
    """Empty ``out`` (what ``PyByteArray_Resize(out, 0)`` does), keeping a small allocation; a large
    one becomes the process's spare output allocation (``_core/outbuf.pxd``), which the next large
    output takes, instead of a fresh ``mmap`` faulted in page by page."""
    cdef PyByteArrayObject* b = <PyByteArrayObject*>out
    if b.ob_alloc <= KEEP_OUT and b.ob_exports == 0 and b.ob_bytes != NULL:
        b.ob_start = b.ob_bytes
        b.ob_bytes[0] = 0
        Py_SET_SIZE(out, 0)
    elif not spare_keep(out):
        PyByteArray_Resize(out, 0)
    return 0

cdef inline Py_ssize_t _send_fd(int fd, out, Py_ssize_t size) noexcept:
    """libc's non-blocking ``send`` of ``out``'s ``size`` bytes on ``fd``: the bytes the kernel took
    (0 when the socket is full), -1 on an error."""
    cdef Py_ssize_t n
    cdef int err
    while True:
        n = c_send(fd, PyByteArray_AS_STRING(out), size, MSG_DONTWAIT | MSG_NOSIGNAL)
        if n >= 0:
            return n
        err = errno
        if err == EINTR:
            continue
        if err == EAGAIN or err == EWOULDBLOCK:
            return 0
        return -1

# One read buffer for the process: reads happen in the hub's thread only, and each is copied into
# a bytes object of its exact size at once (no 64 KiB object made and shrunk per read).
cdef char _rbuf[READ_SIZE]

cdef extern from *:
    """
    #if defined(__SANITIZE_ADDRESS__)
    #include <sanitizer/asan_interface.h>
    #define FLUXMQ_POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
    #define FLUXMQ_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
    #else
    #define FLUXMQ_POISON(p, n) ((void)0)
    #define FLUXMQ_UNPOISON(p, n) ((void)0)
    #endif
    """
    # Under AddressSanitizer (scripts/asan) the part of _rbuf past the last read is poisoned, so a
    # read of its stale bytes (an earlier read's, maybe another client's) is reported, not served;
    # in the normal build both are nothing.
    void FLUXMQ_POISON(const void* p, size_t n) nogil
    void FLUXMQ_UNPOISON(const void* p, size_t n) nogil


_flush_log = logging.getLogger("fluxmq.protocol.flush")


# -- the hub loop's state in C (read per served read: three Python look-ups and a call were ~500
# instructions of a lone message's ~5,300) --
cdef extern from "<dlfcn.h>" nogil:
    void* dlopen(const char* path, int flags)
    void* dlsym(void* handle, const char* name)
    int RTLD_NOW
    int RTLD_NOLOAD

ctypedef double (*ev_now_fn)(void* ev) noexcept nogil
ctypedef unsigned int (*ev_pending_fn)(void* ev) noexcept nogil

cdef object _loop_seen = None  # the loop the values below are of (held: its id cannot be reused)
cdef object _loop_callbacks = None  # its callback queue, when it is never replaced (else None)
cdef void* _ev = NULL  # its libev loop, when libev's functions below are known (else NULL)
cdef ev_now_fn _ev_now = NULL  # libev's ev_now and ev_pending_count, from gevent's corecext
cdef ev_pending_fn _ev_pending = NULL
cdef object _corecext_loop = None  # gevent.libev.corecext.loop (False: not importable)


cdef int _libev_functions() except -1:
    """``_ev_now``, ``_ev_pending`` from the libev that gevent's C loop (``gevent.libev.corecext``)
    is built with: public libev functions (``ev.h``) that the extension exports; left NULL when it
    is not loaded or does not export them (then the loop's Python methods are called)."""
    global _corecext_loop, _ev_now, _ev_pending
    _corecext_loop = False
    try:
        from gevent.libev import corecext
    except ImportError:
        return 0
    path = getattr(corecext, "__file__", None)
    if not path:
        return 0
    cdef bytes bpath = path.encode()
    cdef void* handle = dlopen(bpath, RTLD_NOW | RTLD_NOLOAD)  # (already loaded: no new load)
    if handle == NULL:
        return 0
    _ev_now = <ev_now_fn>dlsym(handle, b"ev_now")
    _ev_pending = <ev_pending_fn>dlsym(handle, b"ev_pending_count")
    if _ev_now != NULL and _ev_pending != NULL:
        _corecext_loop = corecext.loop
    return 0


cdef int _adopt_loop(loop) except -1:
    """Read once per loop what ``_on_input`` needs of it each time: gevent's C loop
    (``gevent.libev.corecext.loop``) holds its libev loop at ``ptr`` from its creation to its
    ``destroy`` (no watcher of it runs after that) and sets its ``_callbacks`` queue once, in
    ``__init__`` (emptied in place after), so ``ev_now(ptr)`` is its ``now()`` and
    ``ev_pending_count(ptr)`` its ``pendingcnt``, without a Python look-up or call. Another loop
    class (gevent's cffi or libuv loops) is asked through its Python attributes each time."""
    global _loop_seen, _loop_callbacks, _ev
    cdef void* ev = NULL
    if _corecext_loop is None:
        _libev_functions()
    callbacks = None
    if _corecext_loop is not False and type(loop) is _corecext_loop:
        ev = <void*><size_t>loop.ptr
        # (a check that these are the loop's values: the same clock and the same pending count)
        if ev != NULL and _ev_now(ev) == loop.now() and _ev_pending(ev) == loop.pendingcnt:
            callbacks = loop._callbacks
        else:
            ev = NULL
    # (set together, after the Python calls above, so another thread's hub adopting its loop
    # meanwhile cannot leave one loop's values under another's)
    _ev = ev
    _loop_callbacks = callbacks
    _loop_seen = loop
    return 0

# (the relay's ``_forward_c`` is ``except -1``: -1 with the error set. Called through this type,
# without the exception clause, ``_on_input`` checks that -1 itself and raises it in its try
# (``_raised``), so a read the relay takes whole enters no try.)
ctypedef Py_ssize_t (*forward_fn)(object, object, const unsigned char*, Py_ssize_t,
                                   Py_ssize_t*) noexcept
ctypedef Py_ssize_t (*serve_fn)(object, object, list, Py_ssize_t) except -1

cdef int _raised() except -1:
    """-1 for an error already set (a ``_forward_c`` call that returned -1): raised where this is
    called, as if the call had raised there."""
    return -1


cdef list _NO_PACKETS = []  # the packets of a read the relay served whole from its bytes
cdef object _relay = None
cdef object _relay_serve = None
cdef serve_fn _serve_c = NULL  # the relay's serve in C (_core.relay.SERVE_C), for a PublishRelay
cdef forward_fn _forward_c = NULL  # the relay's forward-only PUBLISHes from a read (_core.relay.FORWARD_C)


def set_relay(relay) -> None:
    """The process's publish relay (``_core.relay.PublishRelay``), set by ``connection.py``."""
    global _relay, _relay_serve, _serve_c, _forward_c
    _relay = relay
    _relay_serve = relay.serve
    _serve_c = NULL
    _forward_c = NULL
    if type(relay) is PublishRelay:
        _serve_c = <serve_fn>PyCapsule_GetPointer(SERVE_C, b"fluxmq._core.relay.serve")
        _forward_c = <forward_fn>PyCapsule_GetPointer(FORWARD_C, b"fluxmq._core.relay.forward")


cdef class HubReads:
    """The switch and the counter of reads served in the hub (``ConnectionCore._on_input``)."""

    cdef public bint enabled  # False: a connected reader waits in its greenlet (tests compare the two)
    cdef public long long served  # reads served wholly in the hub, without switching to the reader

    def __init__(self):
        self.enabled = True
        self.served = 0


HUB_READS = HubReads()
cdef HubReads _hub_reads = HUB_READS


cdef class ConnectionCore(ConnState):
    """The C methods of ``MQTTConnection`` on its typed fields (``_core/conn_state.pxd``; see the
    module docstring)."""

    def _on_input(self, loop):
        """Hub callback of the input watcher a connected reader waits on (see ``run``).

        One non-blocking read per call, so a busy client gets no more of a loop turn than any other
        watcher. When every packet it completes is a PUBLISH the relay serves (or a PINGREQ), the
        read is served here, in the hub, and the reader greenlet stays asleep: a lone message costs
        no greenlet switch. Otherwise the reader is switched to with what is left: the read
        (``data, packets, i, bad`` from packet ``i`` on, or the raw bytes, or b"" at end of stream).
        The read deadlines stay on the connection's timer; serving a read restarts the wait.
        """
        cdef ssize_t n
        cdef int err
        cdef Py_ssize_t i = 0, count = 0, raw = 0, used = 0
        cdef bint drained
        cdef int fd = self._fd
        data = None  # plain TCP: the read stays in _rbuf, made a bytes object only for the reader
        if fd >= 0:
            FLUXMQ_UNPOISON(_rbuf, READ_SIZE)
            while True:
                n = c_recv(fd, _rbuf, READ_SIZE, MSG_DONTWAIT)
                if n >= 0:
                    break
                err = errno
                if err == EINTR:
                    continue
                if err == EAGAIN or err == EWOULDBLOCK:
                    return  # a spurious wake-up
                n = 0
                data = b""  # reset: the reader tears down
                break
            FLUXMQ_POISON(_rbuf + n, READ_SIZE - (n if n > 0 else 0))
            drained = n < READ_SIZE
        else:
            try:
                data = self.stream.recv_nowait(READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            n = len(data)
            drained = self.stream.drained
        if n == 0 or self.closed:
            if data is None:
                data = PyBytes_FromStringAndSize(_rbuf, n)
            self.stream.drained = drained
            self._reader.switch(data)
            return
        # The read's counters are added after the send (or before a hand-over): nothing reads them
        # meanwhile, and the lone message's path is shorter by their attribute updates.
        cdef StatsCore stats = self._stats
        count = -1
        bad = None
        # Deliveries and acks of this read only queue their connections: release() below writes
        # them (the turn's last reader) or schedules the flush, instead of a flush callback made
        # by the first mark and cancelled here.
        flusher = self.flusher
        cdef FlushCore held = <FlushCore>flusher if isinstance(flusher, FlushCore) else None
        if held is not None:
            held.holding = True
        else:
            flusher.holding = True
        if loop is not _loop_seen:
            _adopt_loop(loop)
        cdef void* ev = _ev  # (this loop's, kept for this call)
        callbacks = _loop_callbacks if ev != NULL else loop._callbacks
        cdef Py_ssize_t queued = len(callbacks)  # the loop callbacks before this read's work
        raw = 0
        used = 0
        if _forward_c is not NULL:
            # the common PUBLISHes served from the read's bytes (_core.relay: written into
            # local subscribers' output, framed for the peers), no Publish decoded (-1: raised,
            # raised again in the try below)
            if data is None:
                used = _forward_c(_relay, self, <const unsigned char*>_rbuf, n, &raw)
            else:
                used = _forward_c(_relay, self, <const unsigned char*>PyBytes_AS_STRING(data), n, &raw)
        if used >= n:
            # the relay took the whole read (a lone message): no decoder, no packets, and no
            # try entered (a try saves and restores the exception state: ~45 instructions)
            packets = _NO_PACKETS  # (never written to)
            count = 0
        else:
            try:
                if used < 0:
                    _raised()  # the relay's error, handled below as any other of this read's
                try:
                    decoder = self.decoder
                    if type(decoder) is not Decoder:
                        if data is None:
                            data = PyBytes_FromStringAndSize(_rbuf, n)
                        packets = decoder.feed(data if used == 0 else memoryview(data)[used:])
                    elif data is None:
                        packets = (<Decoder>decoder).feed_buf(<const unsigned char*>_rbuf + used, n - used)
                    elif used == 0:
                        packets = (<Decoder>decoder).feed(data)
                    else:
                        packets = (<Decoder>decoder).feed(memoryview(data)[used:])
                except MQTTError as exc:
                    packets = list(getattr(exc, "packets", None) or ())
                    bad = exc  # the reader serves the packets before it, then closes
                count = PyList_GET_SIZE(packets) if type(packets) is list else len(packets)
                while i < count and bad is None:
                    if _serve_c is not NULL:
                        i = _serve_c(_relay, self, packets, i)
                    else:
                        i = _relay_serve(self, packets, i)
                    if i >= count or self.closed or type(packets[i]) is not Pingreq:
                        break
                    self._write(_PINGRESP)
                    i += 1
            except Exception as exc:
                # What the read loop would have met serving this read: raised in the reader, which
                # ends the connection as there (an error must not escape into the hub's loop).
                flusher.release(False)
                stats.bytes_received += n
                stats.messages_received += raw
                if count >= 0:
                    stats.messages_received += count
                self.stream.drained = drained
                self._reader.throw(exc)
                return
        if i < count or self.closed or bad is not None:
            flusher.release(False)
            stats.bytes_received += n
            stats.messages_received += count + raw
            self.stream.drained = drained
            if data is None:
                data = PyBytes_FromStringAndSize(_rbuf, n)  # (_rbuf still holds this read)
            self._reader.switch((data, packets, i, bad))
            return
        # The turn's last reader (its socket drained, no other watcher pending) writes the turn's
        # output now (see run); otherwise the flush callback does, after the others' input. So it
        # does when this read queued a loop callback: the wake of a link to another worker (its
        # first message for a batch), whose batch then leaves before the local subscribers' sends
        # (the other worker writes its share meanwhile; fewer, fuller sends on both: bench/RESULTS.md,
        # "wfan"). A lone message for local subscribers only is still written here. The stream's
        # ``drained`` is only read by the reader, after a hand-over: not written here.
        cdef bint last = drained and len(callbacks) <= queued
        if last:  # (each branch in its own type: a mixed conditional made a Python int)
            if ev != NULL:
                last = _ev_pending(ev) == 0
            else:
                last = not loop.pendingcnt
        if held is not None:
            held.release_c(last)
        else:
            flusher.release(last)
        stats.bytes_received += n
        stats.messages_received += count + raw
        _hub_reads.served += 1
        # a new wait: keep alive counts from here (the loop's time: ``_adopt_loop``)
        self._wait_from = _ev_now(ev) if ev != NULL else loop.now()

    def flush_nowait(self, limit=None):
        """Send what is buffered without blocking (called from the hub by the FlushScheduler).

        ``limit``: send at most the first ``limit`` bytes (``storage.sync: always``: the rest may
        acknowledge state not yet durable) and queue the connection for the next flush.
        (``send_out``: the same in C, for ``FlushCore.flush_c``.)
        """
        self.send_out(limit)

    @cython.final
    cdef int send_out(self, limit) except -1:
        cdef Py_ssize_t size, n
        cdef Py_ssize_t npk = self._npk
        self._dirty = False
        out = self.out
        self._npk = 0
        size = PyByteArray_GET_SIZE(out)
        if size == 0 or self._writer is not None or (limit is not None and limit < size):
            if npk:
                self._stats.messages_sent += npk
            if size and self._writer is None:
                self._flush_prefix(limit)
            return 0
        if self._fd >= 0:
            n = _send_fd(self._fd, out, size)
            if n < 0:
                self._send_failed(npk)
                return 0
        else:
            try:
                n = self.stream.send_nowait(out)
            except OSError:
                self._send_failed(npk)
                return 0
        return self._sent(npk, n, size)

    @cython.final
    cdef int _sent(self, Py_ssize_t npk, Py_ssize_t n, Py_ssize_t size) except -1:
        """After a send of ``n`` of the output's ``size`` bytes, which held ``npk`` packets: the
        counts (after the send: the delivery leaves first), then the output emptied (and the
        allowance given back, a writer waiting for room woken) or its rest left to the drain."""
        cdef StatsCore stats = self._stats
        out = self.out
        if npk:
            stats.messages_sent += npk
        stats.bytes_sent += n
        if n == size:
            _clear(out)
            if self._high > self._high_base:
                self._release_allowance()
        else:
            del out[:n]
            self._spawn_drain()
            return 0
        if self._want_writable:
            self._writable()
        return 0

    @cython.final
    cdef inline int send_plain(self, Py_ssize_t* sent, Py_ssize_t* npk, Py_ssize_t* size) noexcept:
        """``send_out(None)``'s common case in C alone, for ``FlushCore.flush_c`` outside its try
        (a try saves and restores the exception state: ~45 instructions per flush): plain TCP, no
        writer, a small output (``_clear`` keeps it without a call), no allowance above its base to
        give back and no writer waiting for room. 0: not that case, nothing done (``send_out``'s);
        1: all of it sent, counted and emptied; 2: sent in part, or failed (``sent``: the bytes the
        kernel took, -1 on an error; ``npk``, ``size``: the output's packets and bytes), which the
        caller finishes with ``_sent`` or ``_send_failed`` (Python code: in its try)."""
        cdef PyObject* out = <PyObject*>self.out
        cdef PyByteArrayObject* b = <PyByteArrayObject*>out
        cdef Py_ssize_t n, k = self._npk
        cdef Py_ssize_t m = PyByteArray_GET_SIZE(<object>out)
        if (self._fd < 0 or m == 0 or self._writer is not None or self._want_writable
                or self._high > self._high_base or b.ob_alloc > KEEP_OUT or b.ob_exports != 0
                or b.ob_bytes == NULL):
            return 0
        self._dirty = False
        self._npk = 0
        n = _send_fd(self._fd, <object>out, m)
        if n != m:
            sent[0] = n
            npk[0] = k
            size[0] = m
            return 2
        cdef StatsCore stats = self._stats
        if k:
            stats.messages_sent += k
        stats.bytes_sent += n
        b.ob_start = b.ob_bytes  # (_clear's small case)
        b.ob_bytes[0] = 0
        Py_SET_SIZE(<object>out, 0)
        return 1

    cdef _send_failed(self, Py_ssize_t npk):
        if npk:
            self._stats.messages_sent += npk
        PyByteArray_Resize(self.out, 0)
        self.closed = True
        self.stream.shutdown()


cdef class FlushCore(FlushState):
    """The per-message methods of ``FlushScheduler`` (``flush.py``) in C, on the typed fields of
    ``_core.conn_state.FlushState`` (which also holds ``mark``): ``release`` and ``_flush``
    without durable storage (with one, ``_flush`` runs the scheduler's Python ``_flush_stored``:
    the commit, ``sync: always``, failed batches)."""

    # the list the last flush emptied, kept with its item storage: the next flush's dirty list
    # (a new list per flush was an allocation and a free of the list and of its items)
    cdef list _spare
    # ``_own_flush``: the class ``_checked`` (the scheduler's, as last seen: tests change an
    # instance's class) has this ``_flush`` (no Python override, as tests' recording schedulers
    # make), so ``release_c`` calls ``flush_c`` in C, else the override through Python
    cdef object _checked
    cdef bint _own_flush

    def release(self, bint last):
        """End ``holding`` (set by a hub callback before it serves a read): when ``last`` (the
        callback is the loop turn's last ready watcher and its client's socket is drained), write
        the turn's output now, as ``flush_now`` does; else leave it to the flush callback, scheduled
        here if the held marks did not schedule it. A lone message served in the hub so costs no
        loop callback made and cancelled. (``release_c``: the same in C, for ``_on_input``.)"""
        self.release_c(last)

    def _flush(self):
        """Write every dirty connection (after the turn's commit, with a durable storage), then
        observe the relay's sampled publishes (``FlushState.note_sample``): the loop callback and
        ``flush_now``'s call (``flush_c``: the same in C, for ``release_c``)."""
        self.flush_c()

    # (release_c and flush_c are cdef methods, not cpdef: a cpdef method of a class with a Python
    # subclass, FlushScheduler, looked for a Python override per call; _own_flush is that look,
    # once per scheduler)
    @cython.final
    cdef int release_c(self, bint last) except -1:
        self.holding = False
        st = self.storage
        cdef bint wanted = len(self._dirty) > 0 or self.pending_samples > 0 or (st is not None and st.has_pending)
        if last:
            if wanted or self.scheduled:
                callback = self._callback
                if callback is not None:
                    callback.stop()
                if type(self) is not self._checked:
                    self._own_flush = getattr(type(self), "_flush", None) is _OWN_FLUSH
                    self._checked = type(self)
                if self._own_flush and st is None:
                    # (flush_c's own try keeps a connection's trouble from the others and from the
                    # hub's callback: no second try entered per read)
                    self.flush_c()
                else:
                    try:
                        if self._own_flush:
                            self.flush_c()
                        else:
                            self._flush()
                    except Exception:  # another connection's trouble must not end the hub's callback
                        _flush_log.exception("flush_failed", extra={"peer": "-"})
        elif wanted:
            self.schedule()
        return 0

    @cython.final
    cdef int flush_c(self) except -1:
        cdef list dirty
        cdef Py_ssize_t k = 0
        self.scheduled = False
        self._callback = None
        if self.storage is not None:
            try:
                self._flush_stored()
            finally:
                if self.pending_samples:
                    self.observe_samples()
            return 0
        dirty = self._dirty
        spare = self._spare
        if spare is not None:
            self._spare = None
            self._dirty = spare
        else:
            self._dirty = []
        # (a plain send in C enters no try: send_plain)
        cdef Py_ssize_t sent = 0, npk = 0, size = 0
        cdef int done
        conn = None
        while k < PyList_GET_SIZE(dirty):
            conn = dirty[k]
            k += 1
            done = 0
            if isinstance(conn, ConnectionCore):
                done = (<ConnectionCore>conn).send_plain(&sent, &npk, &size)
                if done == 1:
                    continue
            try:
                if done == 0:
                    if isinstance(conn, ConnectionCore):
                        (<ConnectionCore>conn).send_out(None)
                    else:
                        conn.flush_nowait()
                elif sent < 0:
                    (<ConnectionCore>conn)._send_failed(npk)
                else:
                    (<ConnectionCore>conn)._sent(npk, sent, size)
            except Exception:  # one broken connection must not stop the others' output
                _flush_log.exception("flush_failed", extra={"peer": getattr(conn, "peer", "?")})
        conn = None
        _empty(dirty)
        self._spare = dirty
        if self.pending_samples:
            self.observe_samples()  # the relay's sampled publishes, after their writes
        return 0


cdef object _OWN_FLUSH = FlushCore._flush


def loop_read_in_c(loop) -> bool:
    """True when ``_on_input`` reads ``loop``'s time, pending count and callback queue in C
    (``_adopt_loop``; tests check that gevent's default loop is)."""
    if loop is not _loop_seen:
        _adopt_loop(loop)
    return _ev != NULL
