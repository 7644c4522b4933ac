# cython: language_level=3
"""A Route stream's frames between workers read and written in C: a batch's frame parsed into a
``FramedBatch`` (``read_batch``: a plain one's lead, or a RawBatch's protobuf head), the
acknowledgement's frame (``encode_ack``, ``ack_frame``, ``decode_ack``, ``ack_seq``), and a frame's
read from the socket when nothing is buffered (``FrameReaderCore.read``, ``unix.FrameReader``'s). The layouts
are ``fluxmq.cluster.batch``'s (``RAW_LEAD``, ``PLAIN_LEAD``, ``RAW_ACK``), which re-exports these;
``fluxmq.cluster.unix`` reads and writes them.

Written in Python these were ~170 bytecodes per batch on the two sides of a link (``read_batch``,
``FramedBatch.__init__``, the ack's encode, frame, decode and ``ack_seq`` twice), and the frame
read ~170 more (two frames), each run cold between two batches of a fan-in (``bench/RESULTS.md``).
"""

from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint64_t

from fluxmq.cluster._bigendian cimport _get_u32, _get_u64, _put_u64

from fluxmq.cluster.proto import cluster_pb2 as pb

#: a RawBatch frame's marks and leads (``batch.RAW_MARK``, ``PLAIN_MARK``, ``RAW_LEAD``, ``PLAIN_LEAD``)
DEF RAW_MARK = 0
DEF PLAIN_MARK = 2
DEF RAW_LEAD_SIZE = 5
DEF PLAIN_START = 13
#: a plain ack's frame body (``batch.RAW_ACK``): a 0 byte, the u64 sequence id
DEF ACK_SIZE = 9
#: bytes asked of one ``recv_into`` (``unix.CHUNK``)
DEF _CHUNK = 65536
CHUNK = _CHUNK


cdef class FramedBatch:
    """A received ``RawBatch``: what ``ClusterPeers`` reads of a ``pb.Batch`` (sender, epoch, seq,
    snapshot, interest, count) and ``items``, the whole received frame, whose items start at byte
    ``items_start`` (not copied out of it). A plain batch's sender and epoch are its stream's."""

    cdef public object sender
    cdef public object epoch
    cdef public object seq
    cdef public object snapshot
    cdef public object interest
    cdef public object count
    cdef public object items
    cdef public object items_start

    def __init__(self, sender, epoch, seq, snapshot, interest, count, items, items_start):
        self.sender = sender
        self.epoch = epoch
        self.seq = seq
        self.snapshot = snapshot
        self.interest = interest
        self.count = count
        self.items = items
        self.items_start = items_start


cdef FramedBatch _framed(sender, epoch, seq, snapshot, interest, count, bytes items, items_start):
    cdef FramedBatch b = FramedBatch.__new__(FramedBatch)  # (no argument tuple, no __init__)
    b.sender = sender
    b.epoch = epoch
    b.seq = seq
    b.snapshot = snapshot
    b.interest = interest
    b.count = count
    b.items = items
    b.items_start = items_start
    return b


def read_batch(frame, sender=None, epoch=0):
    """The batch of one Route frame: a ``FramedBatch`` (a RawBatch's frame; a plain one's sender
    and epoch are ``sender`` and ``epoch``, those the stream's earlier batches named) or a
    ``pb.Batch``. ``EOFError``: a damaged frame, or a plain one before ``sender`` is known."""
    cdef bytes data = frame if type(frame) is bytes else bytes(frame)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t start
    if size and p[0] == PLAIN_MARK:
        if sender is None:
            raise EOFError("plain batch before the stream named its sender")
        if size < PLAIN_START:
            raise EOFError("truncated batch frame")
        return _framed(sender, epoch, _get_u64(p + 1), False, (), _get_u32(p + 9), data, PLAIN_START)
    if not size or p[0] != RAW_MARK:
        return pb.Batch.FromString(data)
    if size < RAW_LEAD_SIZE:
        raise EOFError("truncated batch frame")
    start = RAW_LEAD_SIZE + <Py_ssize_t>_get_u32(p + 1)
    if start > size:
        raise EOFError("batch head runs past its frame")
    head = pb.Batch.FromString(data[RAW_LEAD_SIZE:start])
    return _framed(
        head.sender, head.epoch, head.seq, head.snapshot, head.interest, head.count, data, start
    )


cdef bytes _plain_ack(seq, Py_ssize_t prefix):
    """A plain ack's frame body of ``seq``, after ``prefix`` bytes of a u32 length (0 or 4)."""
    cdef uint64_t s = seq  # (OverflowError when it is negative or over 64 bits)
    out = PyBytes_FromStringAndSize(NULL, prefix + ACK_SIZE)
    cdef unsigned char* o = <unsigned char*>PyBytes_AS_STRING(out)
    if prefix:
        o[0] = o[1] = o[2] = 0
        o[3] = ACK_SIZE
    o[prefix] = 0
    _put_u64(o + prefix + 1, s)
    return out


def encode_ack(ack):
    """The frame of ``ack`` (a plain ack's sequence id, or a ``BatchAck``): ``RAW_ACK`` when it
    names no busy group, else the message."""
    if type(ack) is int:
        return _plain_ack(ack, 0)
    if ack.busy_groups:
        return ack.SerializeToString()
    return _plain_ack(ack.seq, 0)


def ack_frame(ack):
    """``encode_ack``'s frame with its u32 length prefix (``unix.write_frame``'s), as it is sent."""
    if type(ack) is int:
        return _plain_ack(ack, 4)
    if not ack.busy_groups:
        return _plain_ack(ack.seq, 4)
    data = ack.SerializeToString()
    n = len(data)
    return n.to_bytes(4, "big") + data


def ack_seq(ack):
    """The sequence id ``ack`` (a plain ack's, or a ``BatchAck``) acknowledges."""
    return ack if type(ack) is int else ack.seq


def decode_ack(frame):
    """An ack's frame (``encode_ack``'s): a plain ack's sequence id (an ``int``), else the
    ``BatchAck`` (``PeerLink`` takes both)."""
    cdef bytes data = frame if type(frame) is bytes else bytes(frame)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    if size and p[0] == 0:
        if size != ACK_SIZE:
            raise EOFError("damaged ack frame")
        return _get_u64(p + 1)
    return pb.BatchAck.FromString(data)


cdef class FrameReaderCore:
    """The C base of ``unix.FrameReader``: its buffer ``buf`` (a bytearray), the unread bytes
    ``buf[start:end]``, gevent's wait for the socket (``_wait(_readable)``) and the raw socket's
    ``recv_into`` (None where the socket is no gevent socket). ``read`` is the frame read with
    nothing buffered (the common case between workers: a batch's descriptor frame or its ack
    arrives alone, and the previous frame was read whole); anything else is the subclass's
    ``_read``, the general loop."""

    cdef public bytearray buf
    cdef public Py_ssize_t start
    cdef public Py_ssize_t end
    cdef public object _wait
    cdef public object _readable
    cdef public object _recv_into

    def read(self):
        """The next frame (its body, a ``bytes``); EOFError when the connection closed."""
        cdef Py_ssize_t got, n
        cdef bytearray buf
        cdef const unsigned char* p
        if self.start == self.end and self._recv_into is not None:
            # wait for the socket, read into the buffer's start and return the frame if that read
            # brought it whole (the wait first: EAGAIN, an OSError made, raised and caught per
            # frame, only when the wake was spurious)
            buf = self.buf
            self._wait(self._readable)
            while True:
                try:
                    got = self._recv_into(buf, _CHUNK)  # (the buffer holds at least 2 CHUNKs)
                    break
                except BlockingIOError:
                    self._wait(self._readable)
            if not got:
                raise EOFError("connection closed")
            self.start = 0
            self.end = got
            if got >= 4 and got <= len(buf):
                p = <const unsigned char*>PyByteArray_AS_STRING(buf)
                n = <Py_ssize_t>_get_u32(p)
                if got >= 4 + n:  # (so n < CHUNK: within MAX_FRAME)
                    self.start = 4 + n
                    return PyBytes_FromStringAndSize(<const char*>p + 4, n)
        return self._read()


def send_whole(sock, frame):
    """``frame`` (its length prefix included) on ``sock`` (``unix.write_frame``'s, an ack's frame,
    a ring's descriptor frame): one ``send`` on the non-blocking socket under a gevent socket
    (``sock._sock``), which takes a small frame whole; gevent's ``sendall`` (its waits for room)
    only for the rest."""
    raw = getattr(sock, "_sock", sock)
    try:
        sent = raw.send(frame)
    except BlockingIOError:
        sent = 0  # (no room: sendall waits for it)
    if sent < len(frame):
        sock.sendall(memoryview(frame)[sent:])
