"""Mosquitto ACL files, compiled per client into a topic trie with a per-topic decision cache.

File format (as Mosquitto's ``acl_file``)::

    # topics before any user line apply to anonymous clients
    topic read $SYS/#
    user alice
    topic readwrite sensors/#
    topic deny sensors/secret
    topic write alerts            # read | write | readwrite | deny; none given = readwrite
    pattern readwrite devices/%c/#   # every client; %c = client id, %u = user name

Decision, as Mosquitto 2.0 decides it: the client's own rules (its ``user`` section, or the
anonymous section) first, then the patterns; in each group a matching ``deny`` refuses, else a
matching rule with the access allows; nothing matching refuses (default deny once an ACL is
configured). ``$``-topics are matched only by rules whose first level is not a wildcard. A pattern
whose ``%c``/``%u`` would be substituted by a value containing ``+`` or ``#`` refuses every
pattern-granted access for that client (a name must not widen its own rules).

SUBSCRIBE is checked like Mosquitto 1.x did: the filter, taken literally as a topic, must be
readable (so ``#`` is refused to a client that may read only ``a/#``, and ``a/+`` is allowed under
``a/#``); every delivery is checked again per message topic, so a subscription never yields a
message its topic's rules deny.

``ClientAcl`` is what a connection holds: the client's rules merged into one trie, and a dict per
access of topic -> decision, so the per-message check is one dict lookup after a topic's first use.
"""

from __future__ import annotations

from fluxmq._core.trie import parse_shared, validate_filter
from fluxmq.config.files import read_text
from fluxmq.errors import ConfigError, MQTTError

DENY = 0
READ = 1
WRITE = 2
READWRITE = READ | WRITE

CONFIG_KEY = "auth.acl_file"
_ACCESS = {"read": READ, "write": WRITE, "readwrite": READWRITE, "deny": DENY}
_USER_TIER = 0
_PATTERN_TIER = 1
CACHE_MAX = 4096  # decisions cached per client and access; the cache restarts when full


class AclRule:
    """One ``topic`` or ``pattern`` line."""

    __slots__ = ("filter", "access", "pattern", "line")

    def __init__(self, filter: str, access: int, pattern: bool = False, line: int = 0) -> None:
        self.filter = filter
        self.access = access
        self.pattern = pattern
        self.line = line

    def __repr__(self) -> str:
        kind = "pattern" if self.pattern else "topic"
        name = {v: k for k, v in _ACCESS.items()}[self.access]
        return f"AclRule({kind} {name} {self.filter!r})"


class AclFile:
    """The parsed file: the anonymous section, one section per user, and the patterns."""

    def __init__(self, source: str = "") -> None:
        self.source = source
        self.anonymous: list[AclRule] = []
        self.users: dict[str, list[AclRule]] = {}
        self.patterns: list[AclRule] = []

    @classmethod
    def parse(cls, text: str, source: str = "") -> AclFile:
        """Parse file contents; ``ConfigError`` naming ``source`` and the line of the first bad line."""
        acl = cls(source)
        section = acl.anonymous
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            keyword, _, rest = line.partition(" ")
            rest = rest.strip()
            if keyword == "user":
                if not rest:
                    raise ConfigError(
                        CONFIG_KEY, "user NAME", source, number, problem="user line without a name"
                    )
                section = acl.users.setdefault(rest, [])
                continue
            if keyword not in ("topic", "pattern"):
                raise ConfigError(
                    CONFIG_KEY,
                    "an ACL line",
                    source,
                    number,
                    problem=f"unknown keyword {keyword!r} (user, topic or pattern)",
                )
            first, _, after = rest.partition(" ")
            after = after.strip()
            if first in _ACCESS and after:
                access, filter = _ACCESS[first], after
            elif first in _ACCESS:
                # Mosquitto would read "topic read" as a topic named "read": almost surely a mistake.
                raise ConfigError(
                    CONFIG_KEY, "a topic filter", source, number, problem=f"{keyword} {first} without a topic"
                )
            elif not first:
                raise ConfigError(
                    CONFIG_KEY, "a topic filter", source, number, problem=f"{keyword} without a topic"
                )
            elif after:
                raise ConfigError(
                    CONFIG_KEY,
                    "read, write, readwrite or deny",
                    source,
                    number,
                    problem=f"invalid access type {first!r}",
                )
            else:
                access, filter = READWRITE, first
            try:
                validate_filter(filter)
            except MQTTError as exc:
                raise ConfigError(
                    CONFIG_KEY,
                    "a valid topic filter",
                    source,
                    number,
                    problem=f"invalid topic filter {filter!r}: {exc.reason}",
                ) from None
            rule = AclRule(filter, access, keyword == "pattern", number)
            if keyword == "pattern":
                acl.patterns.append(rule)
            else:
                section.append(rule)
        return acl

    @classmethod
    def load(cls, path: str) -> AclFile:
        return cls.parse(read_text(CONFIG_KEY, "a readable ACL file", path), path)

    def rules_for(self, client_id: str, username: str | None) -> list[tuple[int, int, str]]:
        """``(tier, access, filter)`` of every rule that applies to this client, patterns substituted."""
        own = self.users.get(username, ()) if username is not None else self.anonymous
        rules = [(_USER_TIER, r.access, r.filter) for r in own]
        if self.patterns:
            dangerous = any(ch in client_id for ch in "+#") or (
                username is not None and any(ch in username for ch in "+#")
            )
            for r in self.patterns:
                if "%u" in r.filter and username is None:
                    continue  # Mosquitto skips %u patterns for anonymous clients
                if dangerous:
                    break  # its name could widen a pattern: no pattern grants this client anything
                filter = r.filter.replace("%c", client_id)
                if username is not None:
                    filter = filter.replace("%u", username)
                rules.append((_PATTERN_TIER, r.access, filter))
        return rules

    def for_client(self, client_id: str, username: str | None) -> ClientAcl:
        """The compiled ACL of one client (build it at connect; it is immutable afterwards)."""
        return ClientAcl(self.rules_for(client_id, username))


class _Node:
    __slots__ = ("children", "here", "below")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.here: list[int] | None = None  # [deny0, allow0, deny1, allow1] of filters ending here
        self.below: list[int] | None = None  # the same for filters ending in "#" below this node


def _merge(summary: list[int] | None, tier: int, access: int) -> list[int]:
    if summary is None:
        summary = [0, 0, 0, 0]
    if access == DENY:
        summary[tier * 2] = 1
    else:
        summary[tier * 2 + 1] |= access
    return summary


class ClientAcl:
    """One client's rules as a trie, with cached decisions per topic for read and write."""

    __slots__ = ("_root", "_read", "_write", "rule_count")

    def __init__(self, rules: list[tuple[int, int, str]]) -> None:
        self._root = _Node()
        self.rule_count = len(rules)
        for tier, access, filter in rules:
            self._add(tier, access, filter)
        self._read: dict[str, bool] = {}
        self._write: dict[str, bool] = {}

    def _add(self, tier: int, access: int, filter: str) -> None:
        node = self._root
        levels = filter.split("/")
        for i, level in enumerate(levels):
            if level == "#" and i == len(levels) - 1:
                node.below = _merge(node.below, tier, access)  # "a/#" matches "a" and all below
                return
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        node.here = _merge(node.here, tier, access)

    def _summary(self, topic: str) -> list[int]:
        """The merged [deny0, allow0, deny1, allow1] of every rule matching ``topic`` (levels literal)."""
        acc = [0, 0, 0, 0]
        levels = topic.split("/")
        dollar = topic.startswith("$")
        last = len(levels)
        stack = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            if node.below is not None and not (dollar and i == 0):
                _or(acc, node.below)
            if i == last:
                if node.here is not None:
                    _or(acc, node.here)
                continue
            level = levels[i]
            child = node.children.get(level)
            if child is not None:
                stack.append((child, i + 1))
            plus = node.children.get("+")
            if plus is not None and plus is not child and not (dollar and i == 0):
                stack.append((plus, i + 1))
        return acc

    def decide(self, topic: str, access: int) -> bool:
        """The uncached decision for ``topic`` and ``access`` (READ or WRITE)."""
        s = self._summary(topic)
        for tier in (0, 1):
            if s[tier * 2]:
                return False
            if s[tier * 2 + 1] & access:
                return True
        return False

    def can_read(self, topic: str) -> bool:
        """May the client receive messages published to ``topic``? (cached)"""
        cache = self._read
        allowed = cache.get(topic)
        if allowed is None:
            allowed = self.decide(topic, READ)
            if len(cache) >= CACHE_MAX:
                cache.clear()
            cache[topic] = allowed
        return allowed

    def can_write(self, topic: str) -> bool:
        """May the client publish to ``topic``? (cached)"""
        cache = self._write
        allowed = cache.get(topic)
        if allowed is None:
            allowed = self.decide(topic, WRITE)
            if len(cache) >= CACHE_MAX:
                cache.clear()
            cache[topic] = allowed
        return allowed

    def can_subscribe(self, filter: str) -> bool:
        """May the client subscribe to ``filter``? Its levels are matched literally against the
        read rules (``$share/{group}/`` is stripped first); deliveries are checked per topic too."""
        shared = parse_shared(filter) if filter.startswith("$share/") else None
        if shared is not None:
            filter = shared[1]
        return self.decide(filter, READ)


def _or(acc: list[int], s: list[int]) -> None:
    acc[0] |= s[0]
    acc[1] |= s[1]
    acc[2] |= s[2]
    acc[3] |= s[3]
