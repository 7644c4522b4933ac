"""The one exception hierarchy of fluxmq.

This module imports nothing from fluxmq, so every layer (the Cython ``_core`` included) may raise
these. Each MQTT error carries the MQTT 5.0 reason code that fits it; the protocol layer maps it to
the 3.1.1 return code or to a plain close where the older protocol has no code.
"""

from __future__ import annotations


class FluxMQError(Exception):
    """Base class of every error raised by fluxmq."""


class MQTTError(FluxMQError):
    """A violation of the MQTT protocol; ``reason_code`` is the 5.0 reason code to report."""

    reason_code: int = 0x80  # Unspecified error

    def __init__(self, message: str = "", reason_code: int | None = None) -> None:
        super().__init__(message)
        if reason_code is not None:
            self.reason_code = reason_code

    @property
    def reason(self) -> str:
        return str(self) or type(self).__name__


class MalformedPacket(MQTTError):
    """The bytes do not form a valid packet (MQTT 5.0 reason 0x81)."""

    reason_code = 0x81


class ProtocolError(MQTTError):
    """A well-formed packet that breaks a protocol rule (0x82)."""

    reason_code = 0x82


class FieldOutOfRange(ProtocolError, ValueError):
    """A value given to the broker's public API (``Broker.publish``, ``open_session``,
    ``subscribe``) outside the range MQTT's wire format gives its field: refused before anything
    is routed or stored; the message names the field and the range."""


class UnsupportedProtocolVersion(MQTTError):
    """CONNECT names a protocol level we do not speak (0x84; 3.1.1 return code 1)."""

    reason_code = 0x84


class InvalidClientId(MQTTError):
    """The client identifier is not valid (0x85; 3.1.1 return code 2)."""

    reason_code = 0x85


class PacketTooLarge(MQTTError):
    """The packet exceeds the maximum packet size (0x95); raised from the fixed header alone."""

    reason_code = 0x95


class TopicNameInvalid(MQTTError):
    """A PUBLISH topic name is not valid (0x90)."""

    reason_code = 0x90


class TopicFilterInvalid(MQTTError):
    """A subscription filter is not valid (0x8F)."""

    reason_code = 0x8F


class NotAuthorized(MQTTError):
    """The client may not do this (0x87; 3.1.1 CONNACK return code 5)."""

    reason_code = 0x87


class QuotaExceeded(MQTTError):
    """A quota or queue bound was reached (0x97)."""

    reason_code = 0x97


class ServerUnavailable(MQTTError):
    """The cluster cannot serve the request now (no quorum, a session's owner does not answer)."""

    reason_code = 0x88


class OwnerRestarting(ServerUnavailable):
    """A session's owner is down and being restarted (a worker killed -9, its arbiter starting it
    again): its store holds the session, which it restores. ``owner`` names it. Raised by an
    ownership registry's ``acquire_session`` instead of treating the id as nobody's (a fresh
    session would be started, and the restored copy then dropped)."""

    def __init__(self, owner: str, message: str = "") -> None:
        super().__init__(message or f"the owner {owner} is restarting")
        self.owner = owner


class ClaimNotStarted(ServerUnavailable):
    """A session's claim failed before it asked any node for the session (the registry refused:
    no quorum, this node's etcd lease lost): nothing moved, so the caller's copy of its last export
    (``Peers.claim_session``'s ``exported``) stays the caller's."""


class QueueRefused(MQTTError):
    """A durable queue (``$queue/...``) refused a publish or a subscription; ``reason_code`` is the
    5.0 code for the PUBACK/SUBACK (0x90 no such queue, 0x97 queue full, 0x8F no such queue to
    subscribe, 0x83 QoS 0 subscription) and the message its reason string."""


class ConfigError(FluxMQError):
    """Invalid configuration: one line naming the key, the file and line, and what is expected.

    ``problem`` (keyword) replaces the ``expected ..., got ...`` tail when the fault is not a bad
    value (an unknown key, a YAML syntax error); ``expected`` is still kept for callers.
    """

    def __init__(
        self,
        key: str,
        expected: str,
        source: str = "",
        line: int | None = None,
        got: object = None,
        *,
        problem: str | None = None,
    ) -> None:
        self.key = key
        self.expected = expected
        self.source = source
        self.line = line
        self.got = got
        self.problem = problem
        where = source or "<defaults>"
        if line is not None:
            where = f"{where}:{line}"
        if problem is None:
            got_text = "" if got is None else f", got {got!r}"
            problem = f"expected {expected}{got_text}"
        super().__init__(f"config error: {key} ({where}): {problem}")


class ConfigErrors(ConfigError):
    """Several configuration problems at once (``--check`` reports them all): one line each."""

    def __init__(self, errors: list[ConfigError]) -> None:
        first = errors[0]
        super().__init__(
            first.key, first.expected, first.source, first.line, first.got, problem=first.problem
        )
        self.errors = list(errors)
        self.args = ("\n".join(str(e) for e in self.errors),)

    def __str__(self) -> str:
        return self.args[0]


class StorageError(FluxMQError):
    """The storage backend cannot serve a request."""


class MessageUnencodable(FluxMQError):
    """A message one client's protocol cannot encode (a property value its encoder refuses, as a
    string no UTF-8 encoder takes): raised by a ``Delivery.send_publish``; the session drops the
    message for that client only (drop reason ``unencodable``) and keeps its connection."""


class MalformedDatagram(FluxMQError):
    """A UDP datagram that is not a well-formed CoAP message (RFC 7252 §3); counted and dropped."""


class ForwardedItemFailed(FluxMQError):
    """The C relay's delivery of one item of a peer's batch raised (the error is ``__cause__``):
    ``start`` and ``end`` are that item's byte offsets in ``Batch.items``, ``delivered`` the items
    delivered before it in the same call. The caller goes on at ``end``: only that item is lost."""

    def __init__(self, start: int, end: int, delivered: int) -> None:
        super().__init__(f"forwarded item at byte {start} failed")
        self.start = start
        self.end = end
        self.delivered = delivered


class ClusterError(FluxMQError):
    """The cluster metadata plane (etcd) cannot serve a request, or forbids this node from starting
    (its node id is already live); the message is one line saying which and why."""
