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

from ._ringcopy import SMALL_FRAME as SMALL_FRAME
from ._ringcopy import RecvRingCopy, SendRingCopy

#: bytes of one stream's ring (see the module docstring)
RING_SIZE = 4 << 20
#: the largest ring a receiver maps
MAX_RING = 64 << 20
#: a descriptor frame's marker (a RawBatch frame's is 0x00 or 0x02; a protobuf message never starts
#: with 0x01 either: field number 0 is invalid)
RING_MARK = 1
#: a descriptor frame: frame length (9), the marker, the region's offset and length
DESC = struct.Struct(">IBII")
# (``SMALL_FRAME``, 64 KiB: frames up to it are copied out into a new ``bytes``, as
# ``unix.LARGE_FRAME``, larger ones into reused ones: ``RecvRing.take``)
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def supported() -> bool:
    return hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS")


class SendRing(SendRingCopy):
    """The sending side's ring of one stream: ``fd`` is sent once (then closed, ``close_fd``),
    ``place`` copies a frame in and returns its descriptor frame (or None: send it inline),
    ``acked`` frees regions. ``ring_frames`` and ``inline_frames`` count ``place``'s answers.
    ``place``, ``acked`` and the regions' bookkeeping are C (``_ringcopy.SendRingCopy``): where a
    frame goes (``_room``) as the module docstring says, the frame's bytes copied in, the regions
    of the batches up to an ack's freed."""

    __slots__ = ("fd",)

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


class RecvRing(RecvRingCopy):
    """The receiving side's read-only mapping of a stream's ring (from its descriptor ``fd``, which
    it closes). ``frames`` counts the frames taken from it. ``take(desc, buffers)`` (C,
    ``_ringcopy.RecvRingCopy``): the frame a descriptor frame's body ``desc`` names, copied out of
    the ring into a ``bytes`` of ``buffers`` (a ``FrameBuffers``: reused once nothing holds it) when
    it is over ``SMALL_FRAME``, else into a new one (a small batch taking one of its slots freed
    the large allocation held there, and the next fan-in batch's fresh one was faulted in page by
    page; ``unix.FrameReader`` keeps them for its large frames only too); raises EOFError when the
    descriptor is damaged or its region falls outside the ring."""

    __slots__ = ()

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

    def close(self) -> None:
        self.mm.close()
