"""Router: subscriptions in a topic trie, and per-topic routes cached until subscriptions change."""

from __future__ import annotations

import random

from fluxmq._core.broker_core import RouteCore, RouterCore
from fluxmq._core.trie import SubscriptionTrie

from .session import Session, Subscription

ROUND_ROBIN = "round_robin"
RANDOM = "random"
LEAST_INFLIGHT = "least_inflight"

_ROUTE_CACHE_MAX = 8192


class Route(RouteCore):
    """Where a topic's messages go: one Target per session, plus shared groups (one member each).
    Both are typed fields of ``RouteCore`` (``fluxmq/_core/broker_core.pyx``), read by the relay."""

    __slots__ = ()

    def __init__(self, targets: list, groups: list) -> None:
        self.targets = targets
        self.groups = groups


def _aggregate(subscriptions: list) -> list:
    """One target per session from all its matching subscriptions [MQTT-3.3.4-2, -3].

    A target is ``(session, qos, qos_for_own_messages, retain_as_published, subscription_ids)``:
    ``qos`` is the highest over every matching subscription, ``qos_for_own_messages`` the highest over
    those without No Local (-1 when all have it), and the subscription identifiers of all of them.
    """
    if len(subscriptions) == 1:
        s = subscriptions[0]
        ids = (s.subscription_id,) if s.subscription_id else None
        return [(s.session, s.qos, -1 if s.no_local else s.qos, s.retain_as_published, ids)]
    by_session: dict[Session, list] = {}
    for s in subscriptions:
        agg = by_session.get(s.session)
        if agg is None:
            agg = by_session[s.session] = [s.qos, -1, False, []]
        elif s.qos > agg[0]:
            agg[0] = s.qos
        if not s.no_local and s.qos > agg[1]:
            agg[1] = s.qos
        if s.retain_as_published:
            agg[2] = True
        if s.subscription_id:
            agg[3].append(s.subscription_id)
    return [
        (session, a[0], a[1], a[2], tuple(sorted(set(a[3]))) or None) for session, a in by_session.items()
    ]


class Router(RouterCore):
    """Matches topics to subscriptions; the broker's per-message routing step. ``trie``, ``_routes``
    and ``_generation`` are typed fields of ``RouterCore`` (``fluxmq/_core/broker_core.pyx``), read
    by the relay."""

    def __init__(self, shared_strategy: str = ROUND_ROBIN) -> None:
        # The router caches whole routes per topic; a second cache in the trie would only add an
        # insert to every miss.
        self.trie = SubscriptionTrie(cache_size=0)
        self.shared_strategy = shared_strategy
        self._routes: dict[str, Route] = {}
        self._generation = -1
        self._rng = random.Random()
        # ``(session, topic) -> bool`` when an ACL restricts reads (fluxmq.auth): applied when a route
        # is computed, so cached routes carry only the sessions allowed to read their topic.
        self.read_filter = None

    def add(self, sub: Subscription) -> bool:
        """Add or replace a session's subscription; True when it is new."""
        return self.trie.add(sub.filter, sub.session.client_id, sub)

    def remove(self, filter: str, session: Session) -> bool:
        return self.trie.remove(filter, session.client_id)

    def add_keyed(self, key: str, sub: Subscription) -> bool:
        """``add`` under ``key`` rather than the session's client id (a moved session's stand-in,
        ``fluxmq.broker.moved``, beside a session of the same id); True when it is new."""
        return self.trie.add(sub.filter, key, sub)

    def remove_keyed(self, key: str, filter: str) -> bool:
        return self.trie.remove(filter, key)

    def route(self, topic: str) -> Route:
        """The cached route of ``topic``; recomputed after any subscription change."""
        trie = self.trie
        if trie.generation != self._generation:
            self._routes.clear()
            self._generation = trie.generation
        route = self._routes.get(topic)
        if route is None:
            match = trie.match(topic)
            subs = match.subscribers
            if subs and self.read_filter is not None:
                allowed = self.read_filter
                # A broker-internal target (a durable queue's capture) is not a client: no ACL.
                subs = [s for s in subs if getattr(s.session, "trusted", False) or allowed(s.session, topic)]
            route = Route(_aggregate(subs) if subs else [], match.groups)
            if len(self._routes) >= _ROUTE_CACHE_MAX:
                self._routes.clear()
            self._routes[topic] = route
        return route

    def invalidate(self) -> None:
        """Drop every cached route (the read rules changed); a route the relay kept is stale too."""
        self._generation = -1
        self._epoch += 1

    def pick_member(
        self, group, exclude: Session | None = None, topic: str | None = None
    ) -> Subscription | None:
        """Choose the member of a shared group that gets one message.

        Members that are online and not congested are preferred (offline or full members are
        skipped); when none is, any member takes it into its session queue, an offline one before
        one whose connection is closing (its teardown has not detached it yet). ``exclude``: a member
        that must not get it (the one whose messages are being handed to the others). ``topic``:
        with a read filter, only members allowed to read it are candidates.
        """
        members = list(group.members.values())
        if exclude is not None:
            members = [m for m in members if m.session is not exclude]
        if topic is not None and self.read_filter is not None:
            allowed = self.read_filter
            members = [m for m in members if allowed(m.session, topic)]
        if not members:
            return None
        online = [m for m in members if m.session.delivery is not None and not m.session.delivery.closed]
        ready = [
            m
            for m in online
            if not m.session.delivery.is_congested() and len(m.session.inflight) < m.session.send_quota
        ]
        pool = ready or online or [m for m in members if m.session.delivery is None] or members
        strategy = self.shared_strategy
        if strategy == RANDOM:
            return self._rng.choice(pool)
        if strategy == LEAST_INFLIGHT:
            return min(pool, key=lambda m: len(m.session.inflight) + len(m.session.queue))
        group.cursor = (group.cursor + 1) % (1 << 30)
        return pool[group.cursor % len(pool)]

    def __len__(self) -> int:
        return len(self.trie)
