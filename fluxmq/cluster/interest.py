"""What each peer has subscribed to: one subscription trie per peer, filters (not clients).

A peer announces a filter when its first local subscription with it appears and withdraws it when
the last one goes (``Broker`` counts them); a ``$share/{group}/{filter}`` is announced whole. On
(re)connection a peer sends its whole set (``replace``). ``match`` tells which peers want a topic
(once per peer, however many of its filters match) and which of them hold members of which shared
groups.
"""

from __future__ import annotations

from fluxmq._core.trie import SubscriptionTrie

# Routes of recently published topics, per peer trie (the trie drops its cache on any change).
TRIE_CACHE = 4096
# Topics whose plain route (``plain``) is kept; past it the cache starts again empty.
PLAIN_CACHE = 4096


class RemoteInterest:
    """The interest of every peer: ``node_id -> (trie, set of filters)``."""

    def __init__(self) -> None:
        self._tries: dict[str, SubscriptionTrie] = {}
        self._filters: dict[str, set[str]] = {}
        # topic -> the peers a plain message to it goes to, or None when shared groups of peers
        # match it (``plain``); emptied in place on every change, so readers may hold the dict
        self.plain_routes: dict[str, tuple[str, ...] | None] = {}

    def add(self, node_id: str, filter: str) -> None:
        filters = self._filters.get(node_id)
        if filters is None:
            filters = self._filters[node_id] = set()
            self._tries[node_id] = SubscriptionTrie(cache_size=TRIE_CACHE)
        if filter not in filters:
            filters.add(filter)
            self._tries[node_id].add(filter, node_id, node_id)
            self.plain_routes.clear()

    def remove(self, node_id: str, filter: str) -> None:
        filters = self._filters.get(node_id)
        if filters is not None and filter in filters:
            filters.discard(filter)
            self._tries[node_id].remove(filter, node_id)
            self.plain_routes.clear()

    def replace(self, node_id: str, filters) -> None:
        """The peer's whole interest set (sent when its stream to us opens)."""
        self.drop(node_id)
        for f in filters:
            self.add(node_id, f)
        if node_id not in self._filters:
            self._filters[node_id] = set()
            self._tries[node_id] = SubscriptionTrie(cache_size=TRIE_CACHE)

    def drop(self, node_id: str) -> None:
        """Forget a peer (removed from the cluster)."""
        self._filters.pop(node_id, None)
        self._tries.pop(node_id, None)
        self.plain_routes.clear()

    def filters(self, node_id: str) -> set[str]:
        return set(self._filters.get(node_id, ()))

    def match(self, topic: str) -> tuple[list[str], dict[str, list[str]]]:
        """(peers with a matching normal filter, ``$share/{group}/{filter}`` -> peers with it)."""
        nodes: list[str] = []
        groups: dict[str, list[str]] = {}
        for node_id, trie in self._tries.items():
            m = trie.match(topic)
            if m.subscribers:
                nodes.append(node_id)
            for g in m.groups:
                groups.setdefault(f"$share/{g.name}/{g.filter}", []).append(node_id)
        return nodes, groups

    def plain(self, topic: str) -> tuple[str, ...] | None:
        """The peers with a matching normal filter, or None when a peer holds a matching shared
        group (``match`` then decides); cached in ``plain_routes`` until the next change."""
        cache = self.plain_routes
        if len(cache) >= PLAIN_CACHE:
            cache.clear()
        nodes, groups = self.match(topic)
        found = None if groups else tuple(nodes)
        cache[topic] = found
        return found

    def __contains__(self, node_id: str) -> bool:
        return node_id in self._tries
