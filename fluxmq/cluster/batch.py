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


class RawBatch:
    """A batch for a transport that carries the items as they are (``UnixChannel``, between the
    workers of a node): ``head`` is the serialized ``Batch`` without ``items``, ``parts`` the framed
    items (``frame_items``), written after it as they are. Joining the items, copying them into a
    protobuf message and serializing it made four copies of every forwarded byte on the sender
    (and parsing and ``Batch.items`` two more on the receiver)."""

    __slots__ = ("seq", "head", "parts", "size")

    def __init__(self, seq: int, head: bytes, parts: list[bytes]) -> None:
        self.seq = seq
        self.head = head
        self.parts = parts
        self.size = sum(map(len, parts))


def build_raw_batch(
    sender: str,
    epoch: int,
    seq: int,
    entries: list[Outgoing | ForwardRun],
    interest=(),
    snapshot: bool = False,
    now: float | None = None,
    head: pb.Batch | None = None,
) -> tuple[RawBatch, int]:
    """``build_batch`` as a ``RawBatch``; returns (batch, expired). ``head``: a ``pb.Batch`` of
    ``sender`` and ``epoch`` that the caller keeps (``PeerLink``: one per link), serialized here with
    this batch's ``seq`` and ``count`` when the batch carries no interest change, instead of a
    message of six fields made per batch (about 3x the cost; the head's bytes are the same)."""
    if head is None or interest or snapshot:
        head, parts, expired = _head_and_items(sender, epoch, seq, entries, interest, snapshot, now)
        return RawBatch(seq, head.SerializeToString(), parts), expired
    parts, count, expired = frame_items(entries, time.monotonic() if now is None else now)
    head.seq = seq
    head.count = count - expired
    return RawBatch(seq, head.SerializeToString(), parts), expired


#: a plain acknowledgement (no busy group) where the transport frames it itself (``UnixChannel``,
#: between the workers of a node): a 0 byte, which never starts a protobuf message (field number 0
#: is invalid), then the sequence id. A ``BatchAck`` made, serialized, parsed and read per batch
#: cost four times as much on the two sides.
RAW_ACK = struct.Struct(">BQ")


def encode_ack(ack: int | pb.BatchAck) -> bytes:
    """The frame of ``ack`` (a plain ack's sequence id, or a ``BatchAck``): ``RAW_ACK`` when it
    names no busy group, else the message."""
    if type(ack) is int:
        return RAW_ACK.pack(0, ack)
    if ack.busy_groups:
        return ack.SerializeToString()
    return RAW_ACK.pack(0, ack.seq)


def ack_seq(ack: int | pb.BatchAck) -> int:
    """The sequence id ``ack`` (a plain ack's, or a ``BatchAck``) acknowledges."""
    return ack if type(ack) is int else ack.seq


def ack_message(ack: int | pb.BatchAck) -> pb.BatchAck:
    """``ack`` (a plain ack's sequence id, or a ``BatchAck``) as a ``BatchAck``."""
    return pb.BatchAck(seq=ack) if type(ack) is int else ack


def decode_ack(frame: bytes) -> int | pb.BatchAck:
    """An ack's frame (``encode_ack``'s): a plain ack's sequence id (an ``int``), else the
    ``BatchAck`` (``PeerLink`` takes both)."""
    if frame[:1] == b"\x00":
        if len(frame) != RAW_ACK.size:
            raise EOFError("damaged ack frame")
        return RAW_ACK.unpack(frame)[1]
    return pb.BatchAck.FromString(frame)


class FramedBatch:
    """A received ``RawBatch``: the fields of its head (as ``pb.Batch`` has them) and ``items``, the
    whole received frame, whose items start at byte ``items_start`` (not copied out of it)."""

    __slots__ = ("sender", "epoch", "seq", "snapshot", "interest", "head", "items", "items_start")

    def __init__(self, head: pb.Batch, items: bytes, items_start: int) -> None:
        self.sender = head.sender
        self.epoch = head.epoch
        self.seq = head.seq
        self.snapshot = head.snapshot
        self.interest = head.interest
        self.head = head
        self.items = items
        self.items_start = items_start

    @property
    def count(self) -> int:
        """The messages the batch says it holds (read from the head when asked: the receiver
        needs it only to report a damaged batch; a protobuf field read costs ~600 instructions)."""
        return self.head.count


def decode_items(data: bytes, now: float | None = None) -> Iterator[tuple[Message, tuple[str, ...], bool]]:
    """(message, shared groups, match_local) per item of ``Batch.items``; each message's expiry is
    counted from ``now``. Raises BatchError on a damaged frame (the items before it were yielded)."""
    if now is None:
        now = time.monotonic()
    i, end = 0, len(data)
    while i < end:
        message, groups, match_local, i = decode_item(data, i, now)
        yield message, groups, match_local


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
