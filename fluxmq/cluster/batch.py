"""Framing of the messages a node forwards to a peer: one ``Item`` per message in a ``Batch``.

A message is encoded once per publish with ``fluxmq.storage.records.encode_message`` (topic,
payload, QoS, retain, every forwardable 5.0 property, origin), cached in its ``wire_cache`` so a
message forwarded to several peers is encoded once. Its Message Expiry travels as the time
*remaining* when the batch is sent (``expiry_ms``), so the nodes' wall clocks need not agree.
"""

from __future__ import annotations

import time

from fluxmq.broker.message import Message
from fluxmq.storage.records import decode_message, encode_message

from .proto import cluster_pb2 as pb

NO_EXPIRY = -1


class Outgoing:
    """One forwarded message waiting in a peer's queue (encoded already)."""

    __slots__ = ("blob", "groups", "match_local", "expires_at")

    def __init__(self, blob: bytes, groups: tuple[str, ...], match_local: bool, expires_at: float | None) -> None:
        self.blob = blob
        self.groups = groups
        self.match_local = match_local
        self.expires_at = expires_at


def outgoing(message: Message, groups: tuple[str, ...], match_local: bool) -> Outgoing:
    return Outgoing(encode_message(message), groups, match_local, message.expires_at)


def build_batch(sender: str, epoch: int, seq: int, entries: list[Outgoing], interest=(),
                snapshot: bool = False, now: float | None = None) -> tuple[pb.Batch, int]:
    """The Batch of ``entries`` (those expired by now are left out); returns (batch, expired)."""
    if now is None:
        now = time.monotonic()
    items = []
    expired = 0
    Item = pb.Item
    for e in entries:
        if e.expires_at is None:
            ms = NO_EXPIRY
        else:
            ms = int((e.expires_at - now) * 1000)
            if ms <= 0:
                expired += 1
                continue
        items.append(Item(message=e.blob, shared_groups=e.groups, match_local=e.match_local, expiry_ms=ms))
    changes = [pb.InterestChange(filter=f, added=added) for f, added in interest]
    return pb.Batch(sender=sender, epoch=epoch, seq=seq, snapshot=snapshot, interest=changes, items=items), expired


def decode_item(item: pb.Item, now: float | None = None) -> Message:
    """The Message of a received item (its expiry counted from now)."""
    topic, payload, qos, retain, props, _expires, origin = decode_message(item.message)
    expires_at = None
    if item.expiry_ms >= 0:
        expires_at = (time.monotonic() if now is None else now) + item.expiry_ms / 1000.0
    return Message(topic, payload, qos, retain, props, expires_at, origin)
