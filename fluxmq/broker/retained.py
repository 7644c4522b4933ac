"""RetainedStore: retained messages in a topic trie, with a cap and expiry."""

from __future__ import annotations

import logging

from fluxmq._core.trie import RetainedTrie

from .message import Message

log = logging.getLogger("fluxmq.broker.retained")


class RetainedStore:
    """Retained messages keyed by topic; lookups by filter walk only the matching branches.

    Policy at the cap (``broker.max_retained_messages``, 0 = none): updating or clearing an existing
    topic always works; a new topic is refused and counted, so a retained storm cannot grow memory.

    With a durable ``storage`` every change is written through (``$SYS`` topics excepted: they are
    republished at start).

    ``on_change(topic, message or None)``, when set (the cluster's retained replica), is called after
    every change made on this node (set or clear); changes that came from another node enter through
    ``apply_replicated`` and are not reported again.
    """

    def __init__(self, max_messages: int = 0, storage=None) -> None:
        self._trie = RetainedTrie()
        self.max_messages = max_messages
        self.refused = 0
        self._storage = storage
        self.on_change = None

    def _persisted(self, topic: str) -> bool:
        return self._storage is not None and not topic.startswith("$SYS")

    def store(self, message: Message) -> bool:
        """Set, replace or (empty payload) clear the retained message of its topic [MQTT-3.3.1-5, -10, -11]."""
        topic = message.topic
        if not message.payload:
            if self._trie.delete(topic):
                if self._persisted(topic):
                    self._storage.delete_retained(topic)
                if self.on_change is not None:
                    self.on_change(topic, None)
            return True
        if self.max_messages and len(self._trie) >= self.max_messages and self._trie.get(topic) is None:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning(
                    "retained_store_full",
                    extra={
                        "refused": self.refused,
                        "max_retained_messages": self.max_messages,
                        "topic": topic,
                    },
                )
            return False
        stored = message.copy(retain=True)
        self._trie.set(topic, stored)
        if self._persisted(topic):
            self._storage.put_retained(topic, stored)
        if self.on_change is not None:
            self.on_change(topic, stored)
        return True

    def apply_replicated(self, topic: str, message: Message | None) -> None:
        """Set (or, with None, clear) ``topic`` as another node of the cluster did: stored and
        persisted like a local change, never reported to ``on_change`` (no echo), not capped (every
        node holds the same set)."""
        if message is None:
            if self._trie.delete(topic) and self._persisted(topic):
                self._storage.delete_retained(topic)
            return
        self._trie.set(topic, message)
        if self._persisted(topic):
            self._storage.put_retained(topic, message)

    def restore(self, message: Message) -> None:
        """Put back a retained message loaded from storage (not written again)."""
        self._trie.set(message.topic, message)

    def _expire(self, topic: str) -> None:
        self._trie.delete(topic)
        if self._persisted(topic):
            self._storage.delete_retained(topic)

    def get(self, topic: str) -> Message | None:
        message = self._trie.get(topic)
        if message is not None and message.expired():
            self._expire(topic)
            return None
        return message

    def delete(self, topic: str) -> bool:
        if self._trie.delete(topic):
            if self._persisted(topic):
                self._storage.delete_retained(topic)
            if self.on_change is not None:
                self.on_change(topic, None)
            return True
        return False

    def match(self, filter: str) -> list[Message]:
        """Unexpired retained messages whose topic matches ``filter``; expired ones are removed."""
        found = self._trie.match(filter)
        live = []
        for message in found:
            if message.expires_at is not None and message.expired():
                self._expire(message.topic)
                continue
            live.append(message)
        return live

    def items(self):
        return self._trie.items()

    def __len__(self) -> int:
        return len(self._trie)
