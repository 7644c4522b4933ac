"""Delivery: the small interface through which the broker reaches a connected client.

The protocol layer implements it per connection (MQTT); other front ends (HTTP server-sent events,
CoAP observe) implement it too. The broker never imports a listener or a wire codec.
"""

from __future__ import annotations

from typing import Protocol

from .message import Message


class Delivery(Protocol):
    """What a session needs from the connection it is attached to."""

    #: protocol level of the client (3, 4, 5); other front ends use 0
    version: int
    #: True once the connection is closing: it takes nothing more, but the session stays attached
    #: until the connection's teardown detaches it
    closed: bool

    def send_publish(
        self,
        message: Message,
        qos: int,
        retain: bool,
        packet_id: int,
        dup: bool,
        subscription_ids: tuple[int, ...] | None,
    ) -> bool:
        """Queue a PUBLISH for the client; False if it can never take it (over the client's maximum
        packet size), ``MessageUnencodable`` if its protocol cannot encode it (a property value the
        codec refuses): either way the message is dropped for this client, which stays connected.
        Callers ask ``is_congested`` first. Never blocks, never switches greenlets."""

    def send_pubrel(self, packet_id: int) -> None:
        """Queue a PUBREL (QoS 2 outbound, second phase), used when resending after reconnect."""

    def is_congested(self) -> bool:
        """True while the client cannot take a message now: its pending output is above its
        high-water mark, or the connection is closing. The session keeps (queues) the message."""

    def close(self, reason_code: int, reason: str = "") -> None:
        """Close the connection from the broker side (takeover 0x8E, admin kick, shutdown 0x8B)."""
