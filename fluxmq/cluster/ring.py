"""A shared-memory ring of one Route stream between two workers of a node (``fluxmq.cluster.unix``).

Written through the Unix socket, a fan-in batch (~230 KB) was copied by the kernel into the socket's
buffers (skb and page allocations) and out again on the other side, in several reads, then freed:
the largest part of the system time two workers spent per delivery beyond one worker's
(``bench/RESULTS.md``). With a ring, the sending side copies the batch's frame into a shared memory
file (``os.memfd_create``, mapped by both workers; its descriptor crosses once, at the stream's
start, with SCM_RIGHTS) and the socket carries a descriptor frame of 13 bytes: the frame's offset
and length in the ring. The receiver copies the frame out of its read-only mapping when it reads
that descriptor, before it applies the batch (so it never touches a region again once it has read
the next frame, let alone once it acknowledged the batch).

* **Layout.** A region holds exactly what the inline frame holds after its length prefix, a
  RawBatch's lead then its items (``0x00 | u32 head length | head | items``, or a plain batch's
  ``0x02 | u64 seq | u32 count | items``: ``fluxmq.cluster.batch``), contiguous (``read_batch``
  reads either alike). A frame starts at
  offset 0 whenever the oldest region in use leaves room before it (and while none is in use),
  else after the newest region when the ring's end leaves room: a stream cycles through as few
  pages as its batches in flight need (each page of the ring costs a page fault in each worker the
  first time it is used), and they stay mapped and warm in both workers.
* **Freed by acks.** A stream's acks arrive in its batches' order (``transport._Servicer.Route``),
  and the receiver copied a region out before it applied that batch: an ack of sequence id ``s``
  frees every region of a batch up to ``s``.
* **Never blocks.** A batch the ring cannot take now (no contiguous room: batches in flight, or a
  batch larger than the ring) is written inline, as without a ring; the stream's frames keep their
  order whichever way each went.
* **Bounded.** ``RING_SIZE`` (4 MiB) per stream and direction: ``batches_in_flight`` (4) batches of
  up to 1 MiB, about four fan-in batches of ~2,000 messages; resident only as far as it is used.
* **Checked.** The memfd is sealed against shrinking and growing before it is sent, and the
  receiver maps it only so (a peer that shrank it could not make the receiver fault); a descriptor
  frame whose region falls outside the mapping raises ``EOFError``: that stream ends, as on a
  damaged frame, never the worker.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from collections import deque

#: bytes of one stream's ring (see the module docstring)
RING_SIZE = 4 << 20
#: the largest ring a receiver maps
MAX_RING = 64 << 20
#: a descriptor frame's marker (a RawBatch frame's is 0x00 or 0x02; a protobuf message never starts
#: with 0x01 either: field number 0 is invalid)
RING_MARK = 1
#: a descriptor frame: frame length (9), the marker, the region's offset and length
DESC = struct.Struct(">IBII")
_DESC_BODY = struct.Struct(">II")
#: frames up to this are copied out into a new ``bytes`` (as ``unix.LARGE_FRAME``), larger ones into
#: reused ones (``RecvRing.take``)
SMALL_FRAME = 65536
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def supported() -> bool:
    return hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS")


class SendRing:
    """The sending side's ring of one stream: ``fd`` is sent once (then closed, ``close_fd``),
    ``place`` copies a frame in and returns its descriptor frame (or None: send it inline),
    ``acked`` frees regions. ``ring_frames`` and ``inline_frames`` count ``place``'s answers."""

    __slots__ = ("size", "fd", "mm", "regions", "ring_frames", "inline_frames")

    def __init__(self, size: int = RING_SIZE) -> None:
        self.size = size
        self.fd = os.memfd_create("fluxmq-ring", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
            self.mm = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.regions: deque[tuple[int, int, int]] = deque()  # (seq, start, end), oldest first
        self.ring_frames = 0
        self.inline_frames = 0

    def close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        self.close_fd()
        self.regions.clear()
        self.mm.close()

    def _room(self, n: int) -> int:
        """Where a region of ``n`` bytes fits now (contiguous), or -1."""
        regions = self.regions
        if not regions:
            return 0 if n <= self.size else -1
        first = regions[0][1]
        end = regions[-1][2]
        if regions[-1][1] >= first:  # not wrapped: in use [first, end)
            if n <= first:
                return 0  # (the start first: the fewer pages a stream cycles through, the warmer)
            return end if end + n <= self.size else -1
        return end if end + n <= first else -1  # wrapped: free [end, first)

    def place(self, seq: int, lead: bytes, parts) -> bytes | None:
        """Copy ``lead`` and ``parts`` (a frame's body) into the ring as batch ``seq``'s region; its
        descriptor frame, or None when the ring has no room for it now."""
        n = len(lead)
        for p in parts:
            n += len(p)
        at = self._room(n)
        if at < 0:
            self.inline_frames += 1
            return None
        mm = self.mm
        j = at + len(lead)
        mm[at:j] = lead
        for p in parts:
            i = j
            j = i + len(p)
            mm[i:j] = p
        self.regions.append((seq, at, at + n))
        self.ring_frames += 1
        return DESC.pack(DESC.size - 4, RING_MARK, at, n)

    def acked(self, seq: int) -> None:
        """The batches up to ``seq`` are acknowledged: their regions are free."""
        regions = self.regions
        while regions and regions[0][0] <= seq:
            regions.popleft()


class RecvRing:
    """The receiving side's read-only mapping of a stream's ring (from its descriptor ``fd``, which
    it closes). ``frames`` counts the frames taken from it."""

    __slots__ = ("mm", "size", "frames")

    def __init__(self, fd: int) -> None:
        try:
            size = os.fstat(fd).st_size
            if not 0 < size <= MAX_RING:
                raise EOFError(f"ring of {size} bytes")
            if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALS != _SEALS:
                raise EOFError("ring not sealed against resizing")
            self.mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        except OSError as exc:
            raise EOFError(f"ring: {exc}") from None
        finally:
            os.close(fd)
        self.size = size
        self.frames = 0

    def take(self, desc: bytes, buffers) -> bytes:
        """The frame a descriptor frame's body ``desc`` names, copied out of the ring into a
        ``bytes`` of ``buffers`` (a ``FrameBuffers``: reused once nothing holds it) when it is over
        ``SMALL_FRAME``, else into a new one (a small batch taking one of its slots freed the large
        allocation held there, and the next fan-in batch's fresh one was faulted in page by page;
        ``unix.FrameReader`` keeps them for its large frames only too); raises EOFError when the
        region falls outside the ring."""
        if len(desc) != 1 + _DESC_BODY.size:
            raise EOFError("damaged ring descriptor")
        at, n = _DESC_BODY.unpack_from(desc, 1)
        if n == 0 or at + n > self.size:
            raise EOFError(f"ring region {at}+{n} outside a ring of {self.size}")
        self.frames += 1
        with memoryview(self.mm) as view:  # (slicing the mmap itself would copy into a new bytes)
            if n <= SMALL_FRAME:
                return bytes(view[at : at + n])
            frame, dest = buffers.take(n)
            try:
                dest[:] = view[at : at + n]
            finally:
                dest.release()
        return frame

    def close(self) -> None:
        self.mm.close()
