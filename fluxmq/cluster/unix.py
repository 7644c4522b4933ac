"""The cluster transport over plain Unix sockets, for the workers of one node (``server.workers``).

The same service as ``ClusterTransport`` (C1's gRPC transport: ``Route`` streams of batches with
sequence ids, unary ``Call``), the same protobuf messages and the same ``PeerLink`` (queueing,
batching, acknowledgements, resends, interest): only what carries the bytes differs. On a Unix
socket each protobuf message travels as one frame, a 4-byte big-endian length then the message, so
a batch costs one framing and one ``send``, without HTTP/2 and without grpcio's completion-queue
threads (``bench/workers_transport.py``: about 2.5x the messages per second of gRPC over the same
socket at 16 messages per batch, and a third of the round trip; the same at 256).

A ``PeerLink`` on a ``UnixChannel`` (``raw_batches``) sends its batches as ``RawBatch`` objects, framed
``u32 length | lead | items`` (``fluxmq.cluster.batch``): a plain batch (no interest change, no
snapshot: nearly every batch) has the lead ``0x02 | u64 seq | u32 count``, its sender and epoch
those the stream's earlier batches named; a batch with interest changes has ``0x00 | u32 head
length | head``, the head the protobuf ``Batch`` without its items. The items follow as the relay
framed them, written with one ``sendmsg`` (no join, no copy into a protobuf message, no
serialization of them) and read back into a ``FramedBatch`` whose items are the received frame
itself: a plain batch makes, serializes and parses no protobuf message on either side. A protobuf
message never starts with 0x00, 0x01 or 0x02 (field number 0 is invalid), so any other frame is a
serialized ``Batch`` (the snapshot batch, and the gRPC path's). A stream's first batch always names
the sender and epoch (the snapshot, or a retried batch given a head, ``RawBatch.named``); the
server ends a stream (never the worker) whose plain frame comes before that, or is truncated.

Between workers a Route stream opened with the method byte ``S`` (its SCM_RIGHTS carry a sealed
``memfd``, ``fluxmq.cluster.ring``) carries a RawBatch's frame through that shared-memory ring
instead: the frame's body is copied into the ring and the socket carries a descriptor frame
``u32 9 | 0x01 | u32 offset | u32 length``; the receiver copies the body out of its mapping into a
reused ``bytes`` (``FrameBuffers``) and reads it as it would the inline frame. A batch the ring
cannot take now goes inline; acknowledgements free the ring's regions. The receiver answers the
offer with the stream's first frame, ``S`` (the ring is mapped) or ``R`` (refused: no descriptor
came with it, or it cannot be mapped; the stream runs inline), and the sender uses the ring only
once it has read ``S``.

``UnixChannel`` has the two methods of ``grpc.Channel`` the generated stub uses (``stream_stream``,
``unary_unary``), so ``PeerLink`` and ``ClusterTransport.call`` run unchanged; a failure surfaces as a
``grpc.RpcError`` with ``code()`` as gRPC's would. A connection starts with one byte naming the
method (``R`` a Route stream, ``S`` a Route stream with a ring, ``C`` one Call).
"""

from __future__ import annotations

import array
import dataclasses
import logging
import os
import struct
import time

import gevent
import grpc
from gevent import socket  # cooperative whether or not the process is monkey-patched
from gevent.server import StreamServer

from fluxmq._core.framebuf import FrameBuffers

from . import ring as _ring
from ._linkframe import CHUNK as CHUNK  # (bytes asked of one ``recv_into``)
from ._linkframe import FrameReaderCore
from ._linkframe import read_batch as read_batch  # (a Route frame's batch: C, per batch)
from ._linkframe import send_whole as _send_whole  # (a frame in one send, else gevent's sendall)
from .batch import RawBatch, ack_frame, ack_seq, decode_ack
from .proto import cluster_pb2 as pb
from .transport import ClusterTransport, _Servicer

log = logging.getLogger("fluxmq.cluster.unix")

HEADER = struct.Struct(">I")
ROUTE = b"R"
ROUTE_RING = b"S"  # a Route stream whose method byte carries its ring's descriptor (SCM_RIGHTS)
#: the receiver's answer to ``ROUTE_RING`` (the stream's first frame): the ring is taken, or refused
RING_TAKEN = b"S"
RING_REFUSED = b"R"
CALL = b"C"
#: the ring of a Route stream between workers, bytes (0: none; ``fluxmq.cluster.ring``)
RING_SIZE = _ring.RING_SIZE if _ring.supported() else 0
_RING_FRAME = bytes([_ring.RING_MARK])
#: largest frame accepted (as the gRPC transport's message limit)
MAX_FRAME = 512 << 20
#: frames longer than this are received into their own ``bytes`` (``FrameReader._read_large``)
LARGE_FRAME = CHUNK
#: parts past which a RawBatch is joined before it is sent (sendmsg takes at most IOV_MAX buffers)
MAX_PARTS = 512
#: the send buffer asked for a connection's socket (the kernel caps it at net.core.wmem_max): a
#: batch of a fan-in between workers (~2,000 messages, ~230 KB) did not fit the default (208 KiB),
#: so nearly every batch was one ``sendmsg`` that took part of it, one that failed with EAGAIN, a
#: wait for the socket to be writable (a switch to the hub and back) and one for the rest
SEND_BUFFER = 4 << 20


class UnixRpcError(grpc.RpcError):
    """A Unix-socket call failed; ``code()`` as gRPC would report it."""

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _path(addr: str) -> str:
    return addr[5:] if addr.startswith("unix:") else addr


def _recv_exact(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return bytes(buf)


def read_frame(sock) -> bytes:
    (n,) = HEADER.unpack(_recv_exact(sock, 4))
    if n > MAX_FRAME:
        raise EOFError(f"frame of {n} bytes")
    return _recv_exact(sock, n)


class FrameReader(FrameReaderCore):
    """Frames from a socket, read with ``recv_into`` in chunks of up to 64 KiB into one buffer that
    is kept: a burst of acknowledgements, or a batch with its header, costs one ``recv`` rather than
    two per frame, and a frame is copied once (out of the buffer). A growing ``bytearray`` with
    reads appended and frames deleted from its front cost ~20 KB of ``realloc`` copying per
    forwarded message at batches of ~35 KB (callgrind).

    A frame over ``LARGE_FRAME`` (a batch of a fan-in, ~230 KB) is received straight into the
    ``bytes`` that is returned, once what the chunk brought of it is copied there, in as few reads
    as the socket allows: copied out of the buffer it was a fresh allocation over glibc's mmap
    threshold, faulted in page by page, and a read per 64 KiB. Its allocation is written again
    for a later frame only once nothing else holds the ``bytes`` (``FrameBuffers``).

    ``read`` is C (``_linkframe.FrameReaderCore``, which holds ``buf``, ``start``, ``end`` and the
    socket's wait and read): with nothing buffered (the common case between workers: a batch's
    descriptor frame or its ack arrives alone, and the previous frame was read whole) it waits for
    the socket, reads into the buffer's start and returns the frame if that read brought it whole;
    anything else goes on in ``_read``, the general loop."""

    __slots__ = ("sock", "frames", "large_recvs")

    def __init__(self, sock) -> None:
        self.sock = sock
        self.buf = bytearray(CHUNK * 2)
        self.frames = FrameBuffers()  # a large frame's bytes, received into in place
        self.large_recvs = 0  # reads into a large frame's bytes
        self.start = 0  # the unread bytes are buf[start:end]
        self.end = 0
        # gevent's wait for the socket to become readable (its own watcher), when it has one
        self._wait = getattr(sock, "_wait", None)
        self._readable = getattr(sock, "_read_event", None)
        # and then the read itself on the non-blocking socket under it (``_raw``): gevent's
        # ``recv_into`` is a Python frame more per read, whose work (a wait on EAGAIN) this does
        self._recv_into = _raw(sock).recv_into if self._readable is not None else None

    def _read(self) -> bytes:
        """``read`` from whatever is buffered (reading more as the frame needs)."""
        while True:
            start, end = self.start, self.end
            have = end - start
            if have >= 4:
                (n,) = HEADER.unpack_from(self.buf, start)
                if n > MAX_FRAME:
                    raise EOFError(f"frame of {n} bytes")
                if have >= 4 + n:
                    self.start = start + 4 + n
                    with memoryview(self.buf) as view:
                        return bytes(view[start + 4 : start + 4 + n])
                if n > LARGE_FRAME:
                    return self._read_large(start + 4, n)
                want = 4 + n
            else:
                want = 4
            buf = self.buf
            need = max(CHUNK, want - have)  # what the next read may bring
            if end + need > len(buf):
                # move what is unread to the front, and grow the buffer if a frame needs it
                size = max(len(buf), have + need)
                if len(buf) > 16 * CHUNK and have + need < len(buf) // 4:
                    size = max(2 * CHUNK, have + need)  # a large frame went: give its room back
                if size != len(buf):
                    grown = bytearray(size)
                    grown[:have] = buf[start:end]
                    self.buf = buf = grown
                else:
                    buf[:have] = buf[start:end]
                self.start, self.end = start, end = 0, have
            with memoryview(buf) as view:
                if self._recv_into is None:
                    got = self.sock.recv_into(view[end : end + need])
                else:
                    if not have:
                        # Nothing buffered: the next frame (a batch's ack, the next batch) has most
                        # likely not arrived, so wait for the socket to be readable first, rather
                        # than meet EAGAIN (an OSError made, raised and caught per frame).
                        self._wait(self._readable)
                    while True:
                        try:
                            got = self._recv_into(view[end : end + need])
                            break
                        except BlockingIOError:
                            self._wait(self._readable)
            if not got:
                raise EOFError("connection closed")
            self.end = end + got

    def _read_large(self, at: int, n: int) -> bytes:
        """The frame of ``n`` bytes whose first ones are buffered from ``buf[at]`` on: the rest is
        received straight into the ``bytes`` that is returned (``FrameBuffers``: reused once
        nothing holds it), no more than the frame."""
        frame, dest = self.frames.take(n)
        try:
            got = self.end - at
            with memoryview(self.buf) as view:
                dest[:got] = view[at : self.end]
            self.start = self.end = 0
            recv_into = self.sock.recv_into
            while got < n:
                r = recv_into(dest[got:])
                if not r:
                    raise EOFError("connection closed")
                got += r
                self.large_recvs += 1
        finally:
            dest.release()  # (it does not hold frame: never let it outlive this call)
        return frame


def _raw(sock):
    """The socket under a gevent socket (non-blocking: EAGAIN raises ``BlockingIOError``), else
    ``sock``: a send or read tried on it first saves gevent's Python wrapper, a frame per call."""
    return getattr(sock, "_sock", sock)


def write_frame(sock, data: bytes) -> None:
    _send_whole(sock, HEADER.pack(len(data)) + data)


def write_raw_batch(sock, batch: RawBatch) -> None:
    """One frame of ``batch`` (see the module docstring), its parts gathered by one ``sendmsg``."""
    lead = batch.lead
    total = HEADER.size + len(lead) + batch.size
    parts = [HEADER.pack(total - HEADER.size), lead]
    if len(batch.parts) > MAX_PARTS:
        parts.append(b"".join(batch.parts))
    else:
        parts += batch.parts
    raw = _raw(sock)
    while True:
        try:
            sent = raw.sendmsg(parts)
        except BlockingIOError:
            sent = sock.sendmsg(parts)  # (gevent's: waits for room in the socket's buffer)
        total -= sent
        if total <= 0:
            return
        # the buffer took part of it (a batch larger than the socket's buffer): the rest, as it is
        i = 0
        while sent >= len(parts[i]):
            sent -= len(parts[i])
            i += 1
        parts = parts[i:]
        if sent:
            parts[0] = memoryview(parts[0])[sent:]


def recv_method(sock) -> tuple[bytes, list[int]]:
    """A connection's method byte and the descriptors sent with it (SCM_RIGHTS)."""
    data, ancdata, _flags, _addr = sock.recvmsg(1, socket.CMSG_SPACE(4 * 4))
    if not data:
        raise EOFError("connection closed")
    fds = array.array("i")
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
    return data, list(fds)


def _connect(path: str, method: bytes, fd: int = -1) -> socket.socket:
    """A connection to ``path`` that asked for ``method`` (``fd`` sent with it, when given)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        sock.connect(path)
        if fd >= 0:
            sock.sendmsg([method], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        else:
            sock.sendall(method)
    except OSError as exc:
        sock.close()
        raise UnixRpcError(grpc.StatusCode.UNAVAILABLE, f"{path}: {exc.strerror or exc}") from None
    return sock


class _RouteCall:
    """One Route stream: writes the request iterator's batches, iterates the acknowledgements. With
    ``ring_size``, the stream offers a shared-memory ring (``fluxmq.cluster.ring``) of its own, made
    with it (a re-opened stream makes a new one), and uses it once the receiver answered that it
    took it (``ring``; until then, and for good when it refused, the batches go inline)."""

    def __init__(self, path: str, requests, serialize, deserialize, ring_size: int = 0) -> None:
        self._deserialize = deserialize
        self._cancelled = False
        self._error: UnixRpcError | None = None
        self._sock = None
        self.ring: _ring.SendRing | None = None  # the ring the receiver took
        self._offer: _ring.SendRing | None = None  # the ring offered, until the receiver answers
        if ring_size:
            try:
                self._offer = _ring.SendRing(ring_size)
            except OSError as exc:  # (no memory, no descriptor left): this stream goes inline
                log.warning("route_ring_unavailable", extra={"path": path, "error": str(exc)})
        try:
            if self._offer is not None:
                try:
                    self._sock = _connect(path, ROUTE_RING, self._offer.fd)
                finally:
                    self._offer.close_fd()  # (the receiver holds its own once it is sent)
            else:
                self._sock = _connect(path, ROUTE)
        except UnixRpcError as exc:
            if self._offer is not None:
                self._offer.close()
                self._offer = None
            self._error = exc
            self._writer = None
            return
        self._reader = FrameReader(self._sock)
        self._serialize = serialize
        self._writer = gevent.spawn(self._write, requests)

    def _write(self, requests) -> None:
        try:
            for request in requests:
                self._send(request)
        except OSError:
            pass  # the reader sees the broken connection

    def write(self, request) -> None:
        """Write ``request`` (a batch) on the stream now, in the calling greenlet: ``PeerLink`` on a
        Unix channel writes its batches itself, in order from its one sender greenlet, instead of
        handing each to the writer greenlet through the request iterator's queue (two greenlet
        switches and a queue round per batch). A broken connection is left to the reader."""
        if self._sock is None or self._cancelled:
            return
        try:
            self._send(request)
        except OSError:
            pass

    def _send(self, request) -> None:
        """One request on the stream: a ``RawBatch`` through the ring when it has room (its
        descriptor frame on the socket), else as its frame; anything else serialized."""
        sock = self._sock
        if type(request) is RawBatch:
            ring = self.ring
            if ring is not None:
                desc = ring.place(request.seq, request.lead, request.parts)
                if desc is not None:
                    _send_whole(sock, desc)
                    return
            write_raw_batch(sock, request)
        else:
            write_frame(sock, self._serialize(request))

    def __iter__(self):
        return self

    def __next__(self):
        if self._error is not None:
            raise self._error
        try:
            if self._offer is not None:
                self._answered(self._reader.read())
            ack = self._deserialize(self._reader.read())
        except (EOFError, OSError) as exc:
            code = grpc.StatusCode.CANCELLED if self._cancelled else grpc.StatusCode.UNAVAILABLE
            self._error = UnixRpcError(code, str(exc))
            raise self._error from None
        ring = self.ring
        if ring is not None:
            ring.acked(ack_seq(ack))  # (the stream's acks come in its batches' order)
        return ack

    def _answered(self, frame: bytes) -> None:
        """The receiver's answer to the ring offered: from now on the batches go through the ring
        (``RING_TAKEN``), or inline for good (``RING_REFUSED``, the ring let go)."""
        offer, self._offer = self._offer, None
        if frame == RING_TAKEN:
            self.ring = offer
            return
        offer.close()
        if frame != RING_REFUSED:
            raise EOFError("damaged answer to the ring offered")

    def cancel(self) -> None:
        self._cancelled = True
        if self._writer is not None:
            self._writer.kill(block=False)
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        for ring in (self.ring, self._offer):
            if ring is not None:
                ring.close()
        self.ring = self._offer = None


class UnixChannel:
    """The part of ``grpc.Channel`` the generated stub uses, over a Unix socket path."""

    #: ``PeerLink`` sends its batches as ``RawBatch`` (written by ``write_raw_batch``)
    raw_batches = True

    def __init__(self, addr: str) -> None:
        self.path = _path(addr)
        #: each Route stream's ring, bytes (0: none, every batch inline)
        self.ring_size = RING_SIZE

    def stream_stream(self, method, request_serializer, response_deserializer, **_kw):
        path = self.path

        def route(requests):
            # (a plain ack arrives as its seq alone: decode_ack)
            return _RouteCall(path, requests, request_serializer, decode_ack, self.ring_size)

        return route

    def unary_unary(self, method, request_serializer, response_deserializer, **_kw):
        path = self.path

        def call(request, timeout=None):
            try:
                with gevent.Timeout(timeout):
                    sock = _connect(path, CALL)
                    try:
                        write_frame(sock, request_serializer(request))
                        return response_deserializer(read_frame(sock))
                    finally:
                        sock.close()
            except gevent.Timeout:
                raise UnixRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, path) from None
            except (EOFError, OSError) as exc:
                raise UnixRpcError(grpc.StatusCode.UNAVAILABLE, f"{path}: {exc}") from None

        return call

    def close(self) -> None:
        pass


class UnixTransport(ClusterTransport):
    """``ClusterTransport`` whose server and channels are Unix sockets (``bind_addr`` and the peers'
    addresses are ``unix:/path``; no TLS: the run directory is private to the node)."""

    def start(self) -> None:
        self.server = _unix_server(self, self.settings.bind_addr)
        self.port = 1
        log.info(
            "cluster_transport_listening", extra={"addr": self.settings.bind_addr, "node_id": self.node_id}
        )

    def stop(self, timeout: float = 1.0) -> None:
        deadline = time.monotonic() + timeout  # one flush deadline for all peers (as ClusterTransport)
        for link in list(self.links.values()):
            link.flush(max(0.0, deadline - time.monotonic()))
        for node_id in list(self.links):
            self._remove(node_id)
        if self.server is not None:
            self.server.stop(timeout=0.2)
            self.server = None

    def _channel(self, addr: str) -> UnixChannel:
        return UnixChannel(addr)


def _take_ring(fds: list[int], path: str) -> _ring.RecvRing | None:
    """The ring a Route stream offered (its one descriptor, taken out of ``fds``), mapped; None when
    it is refused: no descriptor came with the offer (this worker had none left to receive it
    into), or it cannot be mapped. A refused offer is answered, and the stream runs inline: closing
    it instead made the sender re-open it with the same offer, and the link never came up."""
    if len(fds) != 1:
        log.warning("route_ring_refused", extra={"path": path, "error": f"{len(fds)} descriptors"})
        return None
    try:
        return _ring.RecvRing(fds.pop())
    except EOFError as exc:
        log.warning("route_ring_refused", extra={"path": path, "error": str(exc)})
        return None


def _unix_server(transport: ClusterTransport, addr: str) -> StreamServer:
    """A started server of ``transport``'s service on the Unix socket ``addr``."""
    path = _path(addr)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    servicer = _Servicer(transport)

    def serve(sock, _address) -> None:
        ring = None
        try:
            method, fds = recv_method(sock)
            if method == ROUTE_RING:
                ring = _take_ring(fds, path)
                write_frame(sock, RING_REFUSED if ring is None else RING_TAKEN)
            for fd in fds:  # (none expected)
                os.close(fd)
            if method in (ROUTE, ROUTE_RING):
                reader = FrameReader(sock)
                buffers = reader.frames

                def batches():
                    sender = None  # named by the stream's first batch (a plain one names none)
                    epoch = 0
                    while True:
                        try:
                            frame = reader.read()
                            if frame[:1] == _RING_FRAME:
                                if ring is None:
                                    return  # (a stream without a ring: damaged)
                                frame = ring.take(frame, buffers)
                            batch = read_batch(frame, sender, epoch)
                        except (EOFError, OSError):
                            return
                        sender = batch.sender
                        epoch = batch.epoch
                        yield batch

                for ack in servicer.acks(batches()):
                    _send_whole(sock, ack_frame(ack))
            elif method == CALL:
                request = pb.CallRequest.FromString(read_frame(sock))
                write_frame(sock, servicer.Call(request, None).SerializeToString())
        except (EOFError, OSError):
            pass
        except Exception:
            log.exception("unix_transport_error")
        finally:
            sock.close()
            if ring is not None:
                ring.close()

    server = StreamServer(listener, serve)
    server.start()
    return server


class NodeWorkersTransport(ClusterTransport):
    """A clustered node's worker (``server.workers`` > 1 with ``cluster.enabled``): the gRPC server
    and channels of ``ClusterTransport`` for the other nodes' members, and a Unix socket (``unix_addr``)
    for the members of its own node, whose peer addresses are ``unix:/path``. ``PeerLink`` and
    ``ClusterPeers`` cannot tell which carries a link. ``local_peers`` (the node's other workers,
    member id -> ``unix:`` address) are always peers; ``set_peers`` (etcd membership) adds the rest.
    A link to a worker of this node batches by ``local_batch_max_size``
    (``server.workers_batch_max_size``), one to another node's member by the settings' bound
    (``cluster.transport.route_batch_max_size``)."""

    # (without SO_REUSEPORT, as every node's: a worker whose port, bind_addr's + index, another
    # process holds fails to start with one line instead of sharing it)

    def __init__(
        self,
        *args,
        unix_addr: str,
        local_peers: dict[str, str],
        local_batch_max_size: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.unix_addr = unix_addr
        self.local_peers = dict(local_peers)
        self.unix_server: StreamServer | None = None
        self._local_settings = (
            self.settings
            if local_batch_max_size is None
            else dataclasses.replace(self.settings, batch_max_size=local_batch_max_size)
        )

    def start(self) -> None:
        self.unix_server = _unix_server(self, self.unix_addr)
        try:
            super().start()
        except OSError as exc:
            self.unix_server.stop(timeout=0)
            self.unix_server = None
            raise OSError(
                f"{exc} (this worker's port: the port of cluster.transport.bind_addr plus its index; "
                "keep the ports after it free for the node's other workers)"
            ) from None

    def stop(self, timeout: float = 1.0) -> None:
        super().stop(timeout)
        if self.unix_server is not None:
            self.unix_server.stop(timeout=0.2)
            self.unix_server = None

    def set_peers(self, peers: dict[str, str]) -> None:
        super().set_peers({**peers, **self.local_peers})

    def local(self) -> list[str]:
        """The node's other workers that answer (member ids)."""
        return [n for n in self.local_peers if n in self.links and self.links[n].connected]

    def _channel(self, addr: str):
        return UnixChannel(addr) if addr.startswith("unix:") else super()._channel(addr)

    def _link_settings(self, addr: str):
        return self._local_settings if addr.startswith("unix:") else self.settings
