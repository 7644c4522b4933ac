"""HeldAck: an acknowledgement that waits for something beyond the loop turn's local commit.

A layer above the broker (a replicated durable queue) returns one from ``Broker.publish`` instead of a
delivery count when the publisher's PUBACK/PUBREC may only leave once the message is stored on other
nodes. The protocol layer registers what to do with the outcome; the upper layer resolves it once:
``None`` (acknowledge) or a ``QueueRefused`` (a 5.0 negative ack with its reason string and user
properties; a 3.1.1 publisher, which has no negative ack, is disconnected). One whose reason code is
below 0x80 is an acknowledgement with that code (0x10: a settlement another worker's queue took
without effect, answered as a local one is). Never acknowledged on a failure or a timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger("fluxmq.broker")


class HeldAck:
    """One pending outcome; callbacks run in the hub (they must not block)."""

    __slots__ = ("_callbacks", "outcome", "done")

    def __init__(self) -> None:
        self._callbacks: list[Callable[[Exception | None], None]] = []
        self.outcome: Exception | None = None
        self.done = False

    def add(self, callback: Callable[[Exception | None], None]) -> None:
        if self.done:
            callback(self.outcome)
        else:
            self._callbacks.append(callback)

    def resolve(self, error: Exception | None = None) -> None:
        if self.done:
            return
        self.done = True
        self.outcome = error
        callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            try:
                cb(error)
            except Exception:  # one connection's failure must not keep the others' acks
                log.exception("held_ack_callback_failed")


def wait_held(result, timeout: float = 30.0) -> Exception | None:
    """For front ends without a connection (HTTP bridge, CoAP): block this greenlet (never the hub)
    until ``result`` of ``Broker.publish`` is settled when it is a HeldAck; its error, else None."""
    if result.__class__ is not HeldAck:
        return None
    from gevent.event import AsyncResult

    done = AsyncResult()
    result.add(done.set)
    try:
        error = done.get(timeout=timeout)
    except Exception:  # gevent.Timeout
        return TimeoutError(f"not replicated within {timeout}s")
    if error is not None and getattr(error, "reason_code", 0x80) < 0x80:
        return None  # acknowledged with a success code (0x10: a settlement that found nothing)
    return error


def settled_nothing(result) -> bool:
    """For the result of ``Broker.publish`` of a settlement (``prefixes.is_settlement``), once
    ``wait_held`` returned None: True when it settled nothing (0; a HeldAck another worker answered
    with 0x10), which the front ends without a PUBACK code answer apart from success."""
    if result.__class__ is HeldAck:
        return getattr(result.outcome, "reason_code", 0) == 0x10
    return not result
