# cython: language_level=3
"""Per-connection output buffer and a pool of receive buffers.

``WriteBuffer`` collects encoded packets for one connection. The writer greenlet sends
``peek()`` and then ``consume(n)``s what the socket took; other greenlets may keep writing while
that send is blocked. A view handed out by ``peek()`` therefore stays valid and unchanged for as
long as it lives: bytes are only ever appended after it, and when the buffer must grow or compact
while a view is alive it moves to a new block and leaves the old one to the view.
"""

cimport cython
from cpython.buffer cimport PyBUF_FORMAT, PyBUF_ND, PyBUF_STRIDES, PyBUF_WRITABLE
from cpython.buffer cimport PyBuffer_Release, PyObject_GetBuffer, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.memoryview cimport PyMemoryView_FromObject
from libc.string cimport memcpy, memmove

from fluxmq._core.codec cimport copy_publish, publish_id_offset

# Keep at most this much capacity once a burst has drained (per connection memory bound).
cdef Py_ssize_t IDLE_CAPACITY_LIMIT = 256 * 1024
cdef char EMPTY[1]


cdef class _Chunk:
    """One heap block; exports read-only windows of it and lives while any window does."""

    def __dealloc__(self):
        PyMem_Free(self.data)

    def __getbuffer__(self, Py_buffer* buffer, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("WriteBuffer views are read-only")
        if self.data == NULL:
            buffer.buf = EMPTY
        else:
            buffer.buf = self.data + self.view_start
        buffer.len = self.view_len
        buffer.readonly = 1
        buffer.itemsize = 1
        buffer.format = NULL
        if flags & PyBUF_FORMAT:
            buffer.format = b"B"
        buffer.ndim = 1
        # As PyBuffer_FillInfo does: shape and strides point into the Py_buffer itself.
        buffer.shape = NULL
        if (flags & PyBUF_ND) == PyBUF_ND:
            buffer.shape = &buffer.len
        buffer.strides = NULL
        if (flags & PyBUF_STRIDES) == PyBUF_STRIDES:
            buffer.strides = &buffer.itemsize
        buffer.suboffsets = NULL
        buffer.internal = NULL
        buffer.obj = self
        self.exports += 1

    def __releasebuffer__(self, Py_buffer* buffer):
        self.exports -= 1


@cython.final
cdef class WriteBuffer:
    """Pending output of one connection (see the module docstring for the view guarantee)."""

    def __cinit__(self, Py_ssize_t initial_size=4096):
        self._chunk = _Chunk.__new__(_Chunk)
        self._data = NULL
        self._start = 0
        self._end = 0
        self._cap = 0
        self._initial = initial_size if initial_size > 0 else 4096

    def __len__(self):
        return self._end - self._start

    def __repr__(self):
        return f"<WriteBuffer pending={self._end - self._start} capacity={self._cap}>"

    cdef Py_ssize_t pending(self) noexcept:
        return self._end - self._start

    cdef char* _make_room(self, Py_ssize_t n) except NULL:
        """Return where ``n`` more bytes go (at the end); the caller then advances ``_end``."""
        cdef Py_ssize_t pending, cap
        cdef _Chunk chunk
        cdef char* block
        if self._end + n <= self._cap:
            return self._data + self._end
        pending = self._end - self._start
        chunk = self._chunk
        if chunk.exports == 0 and self._start >= pending and pending + n <= self._cap:
            # Compact: moves at most as many bytes as were consumed since the last move.
            memmove(self._data, self._data + self._start, pending)
        else:
            cap = self._cap * 2
            if cap < pending + n:
                cap = pending + n
            if cap < self._initial:
                cap = self._initial
            block = <char*>PyMem_Malloc(cap)
            if block == NULL:
                raise MemoryError()
            if pending:
                memcpy(block, self._data + self._start, pending)
            if chunk.exports == 0:
                PyMem_Free(chunk.data)
            else:
                # A peek() view still reads the old block: leave it to the view.
                chunk = _Chunk.__new__(_Chunk)
                self._chunk = chunk
            chunk.data = block
            chunk.capacity = cap
            self._data = block
            self._cap = cap
        self._start = 0
        self._end = pending
        return self._data + pending

    cdef int write_raw(self, const char* data, Py_ssize_t n) except -1:
        """Append ``n`` bytes from ``data``."""
        cdef char* dst
        if n <= 0:
            return 0
        dst = self._make_room(n)
        memcpy(dst, data, n)
        self._end += n
        return 0

    cpdef write(self, object data):
        """Append a bytes-like object."""
        cdef Py_buffer view
        if PyBytes_CheckExact(data):
            self.write_raw(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
            return
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self.write_raw(<const char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cpdef write_publish(self, bytes encoded, int packet_id, bint dup):
        """Append an encoded PUBLISH with its packet id and DUP flag replaced (see
        ``codec.append_publish``); for QoS 0 the packet id is ignored and DUP stays 0."""
        cdef const unsigned char* src = <const unsigned char*>PyBytes_AS_STRING(encoded)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(encoded)
        cdef Py_ssize_t offset = publish_id_offset(src, n, packet_id)
        copy_publish(<unsigned char*>self._make_room(n), src, n, offset, packet_id, dup)
        self._end += n

    cpdef memoryview peek(self):
        """A read-only view of the pending bytes; it stays valid while later writes happen."""
        cdef _Chunk chunk = self._chunk
        chunk.view_start = self._start
        chunk.view_len = self._end - self._start
        return PyMemoryView_FromObject(chunk)

    cpdef consume(self, Py_ssize_t n):
        """Drop the first ``n`` pending bytes (those a send took)."""
        if n < 0 or n > self._end - self._start:
            raise ValueError(f"cannot consume {n} of {self._end - self._start} pending bytes")
        self._start += n
        if self._start == self._end:
            self.clear()

    cpdef clear(self):
        """Drop every pending byte."""
        if self._chunk.exports:
            self._start = self._end  # a live view still reads behind _end: append after it
            return
        self._start = 0
        self._end = 0
        if self._cap > IDLE_CAPACITY_LIMIT and self._cap > self._initial:
            PyMem_Free(self._chunk.data)
            self._chunk.data = NULL
            self._chunk.capacity = 0
            self._data = NULL
            self._cap = 0


@cython.final
cdef class BufferPool:
    """A bounded pool of ``count`` idle ``bytearray`` receive buffers of ``size`` bytes.

    ``acquire()`` never blocks: with no idle buffer it makes a new one. ``release(buf)`` keeps it
    for reuse unless ``count`` are already idle (then it is left to the garbage collector).
    """

    def __init__(self, Py_ssize_t size, Py_ssize_t count):
        if size <= 0 or count < 0:
            raise ValueError("BufferPool needs size > 0 and count >= 0")
        self.size = size
        self.count = count
        self._idle = []
        self._idle_ids = set()

    def __len__(self):
        """Number of idle buffers held."""
        return len(self._idle)

    cpdef bytearray acquire(self):
        """Take a buffer of ``size`` bytes (contents unspecified)."""
        cdef bytearray buf
        if self._idle:
            buf = self._idle.pop()
            self._idle_ids.discard(id(buf))
            return buf
        return bytearray(self.size)

    cpdef release(self, bytearray buf):
        """Give a buffer back; releasing one twice or one of another size is a ValueError."""
        if len(buf) != self.size:
            raise ValueError(f"buffer of {len(buf)} bytes does not belong to a pool of {self.size}")
        if id(buf) in self._idle_ids:
            raise ValueError("buffer released twice")
        if len(self._idle) < self.count:
            self._idle.append(buf)
            self._idle_ids.add(id(buf))
