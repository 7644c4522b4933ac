"""Subscribing and unsubscribing sessions, and the retained messages a new subscription gets
(``Broker`` mixin)."""

from __future__ import annotations

from fluxmq._core.trie import parse_shared, validate_filter
from fluxmq.errors import FieldOutOfRange

from .message import MAX_SUBSCRIPTION_ID
from .prefixes import QUEUE_PREFIX
from .session import PersistentSession, Session, Subscription


class SubscribeResult:
    """Outcome of one subscription: the granted QoS and the retained messages to send after SUBACK."""

    __slots__ = ("granted_qos", "retained", "subscription")

    def __init__(self, granted_qos: int, retained: list, subscription: Subscription | None) -> None:
        self.granted_qos = granted_qos
        self.retained = retained
        self.subscription = subscription


class Subscriptions:
    """``Broker.subscribe``, ``deliver_retained`` and ``unsubscribe``."""

    def subscribe(
        self,
        session: Session,
        filter: str,
        qos: int,
        no_local: bool = False,
        retain_as_published: bool = False,
        retain_handling: int = 0,
        subscription_id: int = 0,
        user_properties: list | None = None,
    ) -> SubscribeResult:
        """Add or replace a subscription [MQTT-3.8.4-3]; raises TopicFilterInvalid for a bad filter.

        A ``$queue/{name}[/{filter}]`` filter joins a durable queue's consumer group instead (its
        5.0 ``user_properties`` name the group and options); raises QueueRefused when refused, and
        FieldOutOfRange for a QoS, retain handling or subscription identifier out of MQTT's range."""
        validate_filter(filter)
        if qos.__class__ is not int or not 0 <= qos <= 2:
            raise FieldOutOfRange(f"qos must be 0, 1 or 2, not {qos!r:.40}")
        if retain_handling.__class__ is not int or not 0 <= retain_handling <= 2:
            raise FieldOutOfRange(f"retain handling must be 0, 1 or 2, not {retain_handling!r:.40}")
        if subscription_id.__class__ is not int or not 0 <= subscription_id <= MAX_SUBSCRIPTION_ID:
            raise FieldOutOfRange(
                f"subscription identifier must be 0..{MAX_SUBSCRIPTION_ID} (0: none), not {subscription_id!r:.40}"
            )
        if filter.startswith(QUEUE_PREFIX):
            version = session.delivery.version if session.delivery is not None else 5
            granted = self._queue_manager().subscribe(session, filter, qos, user_properties, version)
            return SubscribeResult(granted, [], None)
        granted = min(qos, self.settings.max_qos)
        shared = parse_shared(filter)
        sub = Subscription(
            session,
            filter,
            granted,
            no_local,
            retain_as_published,
            retain_handling,
            subscription_id,
            shared[0] if shared else None,
        )
        is_new = self.router.add(sub)
        session.subscriptions[filter] = sub
        events = self.events
        if events is not None:
            events.subscription_created(
                session.client_id,
                session.username,
                filter,
                granted,
                qos,
                no_local,
                retain_as_published,
                retain_handling,
                subscription_id,
                shared[0] if shared else None,
                not is_new,
            )
        if isinstance(session, PersistentSession):
            session.store.put_subscription(
                session.client_id,
                filter,
                granted,
                no_local,
                retain_as_published,
                retain_handling,
                subscription_id,
            )
        retained: list = []
        # Retained messages are never sent for a shared subscription; Retain Handling 1 sends them
        # only for a new subscription, 2 never [MQTT-3.3.1-9, -10, -11].
        if shared is None and (retain_handling == 0 or (retain_handling == 1 and is_new)):
            retained = self.retained.match(filter)
            auth = self.auth
            if retained and auth is not None and auth.checks_reads:
                # A retained message the subscriber may not read is never sent (auth.acl_file).
                retained = [
                    m for m in retained if auth.can_read(session.client_id, session.username, m.topic)
                ]
        if is_new:
            # Last: with peers, a filter new to this node may wait here (bounded) until the reachable
            # peers know it, so publishes made after the SUBACK on any node reach this subscriber.
            self._interest_up(filter)
        return SubscribeResult(granted, retained, sub)

    def deliver_retained(self, session: Session, result: SubscribeResult) -> None:
        """Send the retained messages found by ``subscribe`` (after the SUBACK went out)."""
        sub = result.subscription
        ids = (sub.subscription_id,) if sub and sub.subscription_id else None
        for message in result.retained:
            qos = message.qos if message.qos < result.granted_qos else result.granted_qos
            session.deliver(message, qos, True, ids)  # retain flag set [MQTT-3.3.1-8]
            if self._on_delivered is not None:
                self._on_delivered(message, session.client_id, session.username, qos, True)

    def unsubscribe(self, session: Session, filter: str) -> bool:
        """Remove a subscription; False when the session had none with that filter."""
        if filter.startswith(QUEUE_PREFIX) and self.queues is not None:
            return self.queues.unsubscribe(session, filter)
        if session.subscriptions.pop(filter, None) is None:
            return False
        self.router.remove(filter, session)
        self._interest_down(filter)
        if isinstance(session, PersistentSession):
            session.store.delete_subscription(session.client_id, filter)
        events = self.events
        if events is not None:
            events.subscription_removed(session.client_id, session.username, filter)
        return True
