"""Framing of the messages a node forwards to a peer: one bytes field per ``Batch``.

A message is encoded once per publish with ``fluxmq.storage.records.encode_message`` (topic,
payload, QoS, retain, every forwardable 5.0 property, origin), cached in its ``wire_cache`` so a
message forwarded to several peers is encoded once. Its Message Expiry travels as the time
*remaining* when the batch is sent (``expiry_ms``), so the nodes' wall clocks need not agree.

Items are framed back to back in ``Batch.items`` (layout in cluster.proto): a repeated protobuf
message would make an object per message on both sides, which cost more than the rest of the
receiving path together. The C relay appends the items of plain messages (``fluxmq._core.forward``:
no expiry, no groups, no properties, QoS 0/1, not retained) to a link's queue itself, as
``ForwardRun`` entries of ready items, byte for byte what this module frames for them.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator

from fluxmq._core.forward import ForwardRun
from fluxmq.broker.message import Message
from fluxmq.storage.records import RecordError, decode_message, encode_message

from .proto import cluster_pb2 as pb

NO_EXPIRY = -1
_HEAD = struct.Struct("<IqBB")  # blob length, expiry ms remaining (-1 none), flags, group count
_GLEN = struct.Struct("<H")
MATCH_LOCAL = 1
#: the one shared group an item names when it is a marker of a session's move
#: (``fluxmq.cluster.markers``), not a message: its message's payload is the marker. No group name
#: holds a NUL; the C relay leaves an item with groups to ``ClusterPeers``, whose ``if groups:``
#: branch (a shared group's) finds it: nothing is tested for an item without groups.
MARKER_GROUP = "\x00marker"
#: a marker's message: never delivered, never stored (a ``$`` topic no client may subscribe to)
MARKER_TOPIC = "$fluxmq/move-marker"


class BatchError(ValueError):
    """A batch's items cannot be decoded (truncated or damaged)."""


class Outgoing:
    """One forwarded message waiting in a peer's queue (encoded already)."""

    __slots__ = ("blob", "groups", "match_local", "expires_at")

    def __init__(
        self, blob: bytes, groups: tuple[str, ...], match_local: bool, expires_at: float | None
    ) -> None:
        self.blob = blob
        self.groups = groups
        self.match_local = match_local
        self.expires_at = expires_at


def outgoing(message: Message, groups: tuple[str, ...], match_local: bool) -> Outgoing:
    return Outgoing(encode_message(message), groups, match_local, message.expires_at)


def frame_items(entries: list[Outgoing | ForwardRun], now: float) -> tuple[list[bytes], int, int]:
    """The framed items of ``entries`` as parts to join or send in order (the relay's runs as they
    are), the messages among them and how many of them expired by ``now`` (left out)."""
    parts: list[bytes] = []
    expired = 0
    count = 0
    pack = _HEAD.pack
    for e in entries:
        if type(e) is ForwardRun:
            parts.append(e.data)  # items framed already (the relay's)
            count += e.count
            continue
        count += 1
        if e.expires_at is None:
            ms = NO_EXPIRY
        else:
            ms = int((e.expires_at - now) * 1000)
            if ms <= 0:
                expired += 1
                continue
        groups = e.groups
        parts.append(pack(len(e.blob), ms, MATCH_LOCAL if e.match_local else 0, len(groups)))
        for g in groups:
            data = g.encode()
            parts.append(_GLEN.pack(len(data)))
            parts.append(data)
        parts.append(e.blob)
    return parts, count, expired


def build_batch(
    sender: str,
    epoch: int,
    seq: int,
    entries: list[Outgoing | ForwardRun],
    interest=(),
    snapshot: bool = False,
    now: float | None = None,
) -> tuple[pb.Batch, int]:
    """The Batch of ``entries`` (those expired by now are left out); returns (batch, expired)."""
    head, parts, expired = _head_and_items(sender, epoch, seq, entries, interest, snapshot, now)
    head.items = b"".join(parts)
    return head, expired


def _head_and_items(
    sender: str, epoch: int, seq: int, entries: list, interest, snapshot: bool, now: float | None
) -> tuple[pb.Batch, list[bytes], int]:
    """The ``Batch`` of ``entries`` without its items, the framed items, and how many expired."""
    parts, count, expired = frame_items(entries, time.monotonic() if now is None else now)
    changes = [pb.InterestChange(filter=f, added=added) for f, added in interest]
    head = pb.Batch(
        sender=sender, epoch=epoch, seq=seq, snapshot=snapshot, interest=changes, count=count - expired
    )
    return head, parts, expired


#: A ``RawBatch``'s frame body (what follows the transport's u32 length, ``fluxmq.cluster.unix``)
#: starts with its lead. A batch with interest changes or a snapshot: ``RAW_MARK`` (0x00), a u32 head
#: length, the head (the serialized ``Batch`` without items). A plain batch (neither): ``PLAIN_MARK``
#: (0x02), its u64 sequence id and u32 message count; its sender and epoch are those the stream's
#: earlier headed batch named (a stream's first batch always names them: ``RawBatch.named``). The
#: items follow either lead. A protobuf message never starts with 0x00 or 0x02 (field number 0 is
#: invalid), so any other frame is a serialized ``Batch``.
RAW_MARK = 0
PLAIN_MARK = 2
RAW_LEAD = struct.Struct(">BI")
PLAIN_LEAD = struct.Struct(">BQI")


class RawBatch:
    """A batch for a transport that carries the items as they are (``UnixChannel``, between the
    workers of a node): ``lead`` the frame body's start (above), ``parts`` the framed items
    (``frame_items``), written after it as they are. Joining the items, copying them into a
    protobuf message and serializing it made four copies of every forwarded byte on the sender
    (and parsing and ``Batch.items`` two more on the receiver); a plain batch's lead spares the
    protobuf head on both sides too (a message made or set, serialized, parsed and five fields
    read per batch: ~10,700 instructions of the link's ~124,000 per batch, ``bench/RESULTS.md``)."""

    __slots__ = ("seq", "count", "lead", "parts", "size")

    def __init__(self, seq: int, count: int, lead: bytes, parts: list[bytes]) -> None:
        self.seq = seq
        self.count = count
        self.lead = lead
        self.parts = parts
        self.size = sum(map(len, parts))

    @property
    def plain(self) -> bool:
        return self.lead[0] == PLAIN_MARK

    def named(self, sender: str, epoch: int) -> RawBatch:
        """This batch with a head that names ``sender`` and ``epoch`` (itself when it has one): a
        plain batch sent again first on a new stream (``PeerLink._open_stream``) must name them."""
        if not self.plain:
            return self
        head = pb.Batch(sender=sender, epoch=epoch, seq=self.seq, count=self.count).SerializeToString()
        return RawBatch(self.seq, self.count, RAW_LEAD.pack(RAW_MARK, len(head)) + head, self.parts)


def build_raw_batch(
    sender: str,
    epoch: int,
    seq: int,
    entries: list[Outgoing | ForwardRun],
    interest=(),
    snapshot: bool = False,
    now: float | None = None,
    plain: bool = False,
) -> tuple[RawBatch, int]:
    """``build_batch`` as a ``RawBatch``; returns (batch, expired). ``plain``: a batch without
    interest changes or snapshot gets the plain lead (its sender and epoch the stream's), no
    protobuf head."""
    if not plain or interest or snapshot:
        head, parts, expired = _head_and_items(sender, epoch, seq, entries, interest, snapshot, now)
        data = head.SerializeToString()
        return RawBatch(seq, head.count, RAW_LEAD.pack(RAW_MARK, len(data)) + data, parts), expired
    parts, count, expired = frame_items(entries, time.monotonic() if now is None else now)
    count -= expired
    return RawBatch(seq, count, PLAIN_LEAD.pack(PLAIN_MARK, seq, count), parts), expired


#: a plain acknowledgement (no busy group) where the transport frames it itself (``UnixChannel``,
#: between the workers of a node): a 0 byte, which never starts a protobuf message (field number 0
#: is invalid), then the sequence id. A ``BatchAck`` made, serialized, parsed and read per batch
#: cost four times as much on the two sides.
RAW_ACK = struct.Struct(">BQ")

# A received RawBatch (``FramedBatch``: what ``ClusterPeers`` reads of a ``pb.Batch``, and the
# received frame as its items), and the ack's frame written, read and its sequence id, are C: per
# batch on both sides of a link between workers (``_linkframe``, which ``unix.read_batch`` is too).
from ._linkframe import FramedBatch as FramedBatch  # noqa: E402
from ._linkframe import ack_frame as ack_frame  # noqa: E402
from ._linkframe import ack_seq as ack_seq  # noqa: E402
from ._linkframe import decode_ack as decode_ack  # noqa: E402
from ._linkframe import encode_ack as encode_ack  # noqa: E402


def ack_message(ack: int | pb.BatchAck) -> pb.BatchAck:
    """``ack`` (a plain ack's sequence id, or a ``BatchAck``) as a ``BatchAck``."""
    return pb.BatchAck(seq=ack) if type(ack) is int else ack


def decode_items(data: bytes, now: float | None = None) -> Iterator[tuple[Message, tuple[str, ...], bool]]:
    """(message, shared groups, match_local) per item of ``Batch.items``; each message's expiry is
    counted from ``now``. Raises BatchError on a damaged frame (the items before it were yielded)."""
    if now is None:
        now = time.monotonic()
    i, end = 0, len(data)
    while i < end:
        message, groups, match_local, i = decode_item(data, i, now)
        if groups and groups[0] == MARKER_GROUP:
            continue  # a marker, not a message
        yield message, groups, match_local


def marker_item(payload: bytes) -> Outgoing:
    """The queue entry of a marker (``MARKER_GROUP``) whose content is ``payload``."""
    return Outgoing(encode_message(Message(MARKER_TOPIC, payload, 0)), (MARKER_GROUP,), False, None)


def decode_item(data: bytes, i: int, now: float) -> tuple[Message, tuple[str, ...], bool, int]:
    """(message, shared groups, match_local, offset of the next item) of the item at byte ``i``;
    raises BatchError when it is damaged."""
    try:
        n, ms, flags, ngroups = _HEAD.unpack_from(data, i)
        i += 14
        groups: tuple[str, ...] = ()
        if ngroups:
            names = []
            for _ in range(ngroups):
                k = _GLEN.unpack_from(data, i)[0]
                names.append(data[i + 2 : i + 2 + k].decode())
                i += 2 + k
            groups = tuple(names)
        if i + n > len(data):
            raise BatchError("item runs past the end of the batch")
        topic, payload, qos, retain, props, _expires, origin = decode_message(data[i : i + n])
        i += n
    except (struct.error, UnicodeDecodeError, ValueError, RecordError) as exc:
        if isinstance(exc, BatchError):
            raise
        raise BatchError(f"damaged item at byte {i}: {exc}") from None
    return (
        Message(topic, payload, qos, retain, props, None if ms < 0 else now + ms / 1000.0, origin),
        groups,
        bool(flags & MATCH_LOCAL),
        i,
    )
