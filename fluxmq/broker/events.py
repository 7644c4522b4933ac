"""Broker events for observers (webhooks, audit): the hook the broker and the front ends call.

The broker holds one ``EventSink`` or None (``Broker.set_events``). With None every hook is one
``is None`` check; the per-message hooks (``message_published``, ``message_delivered``) are not
even that when the sink does not want them: the broker keeps them in slots that stay None unless
``wants_published`` / ``wants_delivered`` is true. A sink must never block or switch greenlets:
it queues and returns (``fluxmq.webhook`` does the network work on its own greenlets).

The broker calls the session, subscription, retained and message hooks; the MQTT protocol layer
calls the connection and authentication hooks, which need what only it knows (peer address,
protocol version, why a connection ended).
"""

from __future__ import annotations


class EventSink:
    """Every hook a no-op: an observer overrides those it needs."""

    wants_published = False  # message_published is called only when True
    wants_delivered = False  # message_delivered is called only when True

    # -- connections (protocol layer) ---------------------------------------------------------------

    def client_connected(
        self,
        client_id: str,
        username: str | None,
        peer: str,
        protocol_version: int,
        clean_start: bool,
        keepalive: int,
        session_present: bool,
        session_expiry: int,
        listener: str,
    ) -> None:
        """A client's CONNECT was accepted (its CONNACK is queued)."""

    def client_disconnected(
        self,
        client_id: str,
        username: str | None,
        peer: str,
        protocol_version: int,
        reason: str,
        will_published: bool,
        connected_seconds: float,
    ) -> None:
        """A connected client's connection ended; ``reason`` says why (docs/webhooks.rst lists them)."""

    def auth_success(
        self, client_id: str, username: str | None, peer: str, protocol_version: int, method: str
    ) -> None:
        """A client authenticated (``method``: password, certificate or the enhanced method name)."""

    def auth_failure(
        self,
        client_id: str,
        username: str | None,
        peer: str,
        protocol_version: int,
        method: str,
        reason: str,
        reason_code: int,
    ) -> None:
        """A client's authentication was refused."""

    def publish_denied(
        self,
        client_id: str,
        username: str | None,
        peer: str,
        topic: str,
        qos: int,
        retain: bool,
        reason_code: int,
    ) -> None:
        """The ACL refused a PUBLISH."""

    def subscribe_denied(
        self, client_id: str, username: str | None, peer: str, filter: str, qos: int, reason_code: int
    ) -> None:
        """The ACL (or a subscription quota) refused one filter of a SUBSCRIBE."""

    # -- broker -------------------------------------------------------------------------------------

    def session_takeover(
        self, client_id: str, username: str | None, previous_username: str | None, resumed: bool
    ) -> None:
        """A new connection took over the session of a connected client id (the old one is closed)."""

    def subscription_created(
        self,
        client_id: str,
        username: str | None,
        filter: str,
        qos: int,
        requested_qos: int,
        no_local: bool,
        retain_as_published: bool,
        retain_handling: int,
        subscription_id: int,
        share_group: str | None,
        replaced: bool,
    ) -> None:
        """A subscription was added (or replaced an existing one with the same filter)."""

    def subscription_removed(self, client_id: str, username: str | None, filter: str) -> None:
        """A client unsubscribed from ``filter``."""

    def message_retained(self, message, cleared: bool) -> None:
        """A retained message was stored (``cleared``: an empty payload removed the topic's message)."""

    def message_published(self, message, username: str | None, deliveries: int) -> None:
        """A message was routed (only when ``wants_published``)."""

    def message_delivered(
        self, message, client_id: str, username: str | None, qos: int, retain: bool
    ) -> None:
        """A message was handed to one subscriber's session (only when ``wants_delivered``)."""
