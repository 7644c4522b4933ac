# cython: language_level=3
"""The per-batch work of a stream's shared-memory ring in C: the copy of a batch's frame into the
ring and its descriptor frame (``SendRingCopy.place``), the regions freed by an ack
(``SendRingCopy.acked``), and the descriptor's check and the frame's copy out of the ring
(``RecvRingCopy.take``). ``fluxmq.cluster.ring`` holds the layout, the checks of the memfd (sealed,
its size) and the classes built on these (``SendRing``, ``RecvRing``); the mapping is reached with
the buffer protocol for the length of one call (an ``mmap`` with a buffer exported cannot close).

Written in Python these were ~160 bytecodes per batch on the two sides (``SendRing.place``,
``RecvRing.take``), each run cold between two batches of a fan-in (``bench/RESULTS.md``).
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcpy

from fluxmq.cluster._bigendian cimport _get_u32, _put_u32

#: a descriptor frame's marker (``ring.RING_MARK``)
DEF MARK = 1
#: a descriptor frame: u32 length (9), the marker, u32 offset, u32 length (``ring.DESC``)
DEF DESC_SIZE = 13
DEF DESC_BODY = 9

#: frames up to this are copied out into a new ``bytes``, larger ones into reused ones
#: (``ring.SMALL_FRAME``, ``RecvRing.take``)
SMALL_FRAME = 65536
cdef Py_ssize_t _SMALL_FRAME = SMALL_FRAME


cdef Py_ssize_t _copy_in(char* ring, Py_ssize_t j, Py_ssize_t end, object part) except -1:
    """Copy ``part`` (bytes or any contiguous buffer) to ``ring[j:]`` up to ``end``; the offset
    after it."""
    cdef Py_buffer b
    cdef Py_ssize_t n
    if PyBytes_CheckExact(part):
        n = PyBytes_GET_SIZE(part)
        if j + n > end:
            raise ValueError("frame larger than its region")
        memcpy(ring + j, PyBytes_AS_STRING(part), n)
        return j + n
    PyObject_GetBuffer(part, &b, PyBUF_SIMPLE)
    try:
        if j + b.len > end:
            raise ValueError("frame larger than its region")
        memcpy(ring + j, b.buf, b.len)
        return j + b.len
    finally:
        PyBuffer_Release(&b)


cdef class SendRingCopy:
    """The sending side's ring (``ring.SendRing``): ``mm`` the shared mapping of ``size`` bytes,
    ``regions`` the (seq, start, end) of the batches in flight, oldest first (a deque), and
    ``ring_frames`` / ``inline_frames`` counting ``place``'s answers."""

    cdef public Py_ssize_t size
    cdef public object mm
    cdef public object regions
    cdef public long long ring_frames
    cdef public long long inline_frames

    cpdef Py_ssize_t _room(self, Py_ssize_t n) except -2:
        """Where a region of ``n`` bytes fits now (contiguous), or -1."""
        cdef Py_ssize_t first, start, end
        regions = self.regions
        if not regions:
            return 0 if n <= self.size else -1
        first = regions[0][1]
        last = regions[len(regions) - 1]  # (wraparound is off: no negative index)
        start = last[1]
        end = last[2]
        if start >= first:  # not wrapped: in use [first, end)
            if n <= first:
                return 0  # (the start first: the fewer pages a stream cycles through, the warmer)
            return end if end + n <= self.size else -1
        return end if end + n <= first else -1  # wrapped: free [end, first)

    def place(self, seq, lead, parts):
        """Copy ``lead`` and ``parts`` (a frame's body) into the ring as batch ``seq``'s region; its
        descriptor frame, or None when the ring has no room for it now."""
        cdef Py_ssize_t n = len(lead), at, j
        cdef Py_buffer ring
        for p in parts:
            n += len(p)
        at = self._room(n)
        if at < 0:
            self.inline_frames += 1
            return None
        PyObject_GetBuffer(self.mm, &ring, PyBUF_WRITABLE)  # (ValueError once it is closed)
        try:
            if at + n > ring.len:
                raise ValueError("region past the ring's end")
            j = _copy_in(<char*>ring.buf, at, at + n, lead)
            for p in parts:
                j = _copy_in(<char*>ring.buf, j, at + n, p)
        finally:
            PyBuffer_Release(&ring)
        if j != at + n:
            raise ValueError("frame shorter than its region")
        self.regions.append((seq, at, at + n))
        self.ring_frames += 1
        desc = PyBytes_FromStringAndSize(NULL, DESC_SIZE)
        cdef unsigned char* d = <unsigned char*>PyBytes_AS_STRING(desc)
        _put_u32(d, DESC_BODY)
        d[4] = MARK
        _put_u32(d + 5, <unsigned long>at)
        _put_u32(d + 9, <unsigned long>n)
        return desc

    def acked(self, seq):
        """The batches up to ``seq`` are acknowledged: their regions are free."""
        regions = self.regions
        while regions and regions[0][0] <= seq:
            regions.popleft()


cdef class RecvRingCopy:
    """The receiving side's read-only mapping (``ring.RecvRing``): ``mm`` of ``size`` bytes;
    ``frames`` counts the frames taken from it."""

    cdef public object mm
    cdef public Py_ssize_t size
    cdef public long long frames

    def take(self, bytes desc not None, buffers):
        """The frame a descriptor frame's body ``desc`` names, copied out of the ring into a
        ``bytes`` of ``buffers`` (a ``FrameBuffers``) when it is over ``SMALL_FRAME``, else into a
        new one; EOFError when the descriptor is damaged or its region falls outside the ring."""
        cdef const unsigned char* d
        cdef Py_ssize_t at, n
        cdef Py_buffer ring, out
        if PyBytes_GET_SIZE(desc) != DESC_BODY:
            raise EOFError("damaged ring descriptor")
        d = <const unsigned char*>PyBytes_AS_STRING(desc)
        at = <Py_ssize_t>_get_u32(d + 1)
        n = <Py_ssize_t>_get_u32(d + 5)
        if n == 0 or at + n > self.size:
            raise EOFError(f"ring region {at}+{n} outside a ring of {self.size}")
        PyObject_GetBuffer(self.mm, &ring, PyBUF_SIMPLE)  # (ValueError once it is closed)
        try:
            if at + n > ring.len:
                raise EOFError(f"ring region {at}+{n} outside a ring of {ring.len}")
            self.frames += 1
            if n <= _SMALL_FRAME:
                return PyBytes_FromStringAndSize(<char*>ring.buf + at, n)
            frame, dest = buffers.take(n)
            try:
                PyObject_GetBuffer(dest, &out, PyBUF_WRITABLE)
                try:
                    if out.len != n:
                        raise ValueError("frame buffer of another length")
                    memcpy(out.buf, <char*>ring.buf + at, n)
                finally:
                    PyBuffer_Release(&out)
            finally:
                dest.release()
            return frame
        finally:
            PyBuffer_Release(&ring)
