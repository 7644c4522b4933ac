# cython: language_level=3
"""Topic validation and the two topic tries: subscriptions (with shared groups) and retained messages.

Rules are MQTT 3.1.1 / 5.0 section 4.7 (topic names and filters) and 4.8.2 (shared subscriptions).
Levels split on ``/``; an empty level is a level (``a//b``, ``/a``). ``+`` matches exactly one level,
``#`` matches its parent level and everything below, and a filter whose first level is a wildcard does
not match a topic starting with ``$`` (MQTT-4.7.2-1).

``SubscriptionTrie.match`` runs once per published message on a cache miss: it walks the literal path
iteratively and keeps the pending ``+`` branches on a C array, so a deep topic cannot exhaust the C
stack and no list is built except the split levels and the result. Results are cached per topic and
the cache is dropped on every change, the way NATS server's ``sublist.go`` does it.
"""

from cpython.dict cimport PyDict_GetItem
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport PyObject

from fluxmq.errors import TopicFilterInvalid, TopicNameInvalid


cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)


cdef enum:
    _MAX_UTF8_BYTES = 65535
    _SMALL_STACK = 32            # pending '+' branches held without a heap allocation
    _DEFAULT_CACHE_SIZE = 8192

cdef str _SHARE_PREFIX = "$share/"
cdef Py_ssize_t _SHARE_PREFIX_LEN = 7


# -- validation -------------------------------------------------------------------------------------

cdef int _check_string(str s, object error) except -1:
    """Rules common to topic names and filters: non-empty, no U+0000, well-formed, <= 65,535 bytes."""
    cdef Py_ssize_t nbytes
    if s is None:
        raise TypeError("a topic name or filter must be a str, not None")
    if len(s) == 0:
        raise error("MQTT-4.7.3-1: a topic name or filter must be at least one character long")
    if "\0" in s:
        raise error("MQTT-4.7.3-2: a topic name or filter must not contain U+0000")
    if PyUnicode_IS_ASCII(s):
        nbytes = len(s)
    elif len(s) > _MAX_UTF8_BYTES:
        raise error("MQTT-4.7.3-3: a topic name or filter must not encode to more than 65,535 bytes")
    else:
        try:
            nbytes = len(s.encode("utf-8"))
        except UnicodeEncodeError:
            raise error("MQTT-1.5.4-1: a topic name or filter must be well-formed UTF-8 "
                        "(no surrogate code points)") from None
    if nbytes > _MAX_UTF8_BYTES:
        raise error("MQTT-4.7.3-3: a topic name or filter must not encode to more than 65,535 bytes")
    return 0


cpdef validate_topic(str topic):
    """Raise ``TopicNameInvalid`` unless ``topic`` is a valid PUBLISH topic name.

    Empty (MQTT-4.7.3-1), U+0000 (MQTT-4.7.3-2), over 65,535 UTF-8 bytes (MQTT-4.7.3-3), or a
    wildcard character (MQTT-4.7.1-1) is invalid.
    """
    _check_string(topic, TopicNameInvalid)
    if "+" in topic or "#" in topic:
        raise TopicNameInvalid("MQTT-4.7.1-1: wildcard characters must not be used in a topic name")


cdef int _check_wildcards(str f) except -1:
    """Check ``#`` and ``+`` placement in a plain (non-shared) filter."""
    cdef Py_ssize_t i, n = len(f)
    cdef Py_UCS4 c
    if "+" not in f and "#" not in f:
        return 0
    for i in range(n):
        c = f[i]
        if c == u"#":
            if i != n - 1 or (i > 0 and f[i - 1] != u"/"):
                raise TopicFilterInvalid(
                    "MQTT-4.7.1-2: '#' must be the last character and occupy a whole level")
        elif c == u"+":
            if (i > 0 and f[i - 1] != u"/") or (i < n - 1 and f[i + 1] != u"/"):
                raise TopicFilterInvalid("MQTT-4.7.1-3: '+' must occupy an entire level")
    return 0


cdef tuple _split_shared(str filter):
    """``(group, inner)`` for ``$share/{group}/{inner}``, else None. Does not validate."""
    cdef Py_ssize_t slash
    if not filter.startswith(_SHARE_PREFIX):
        return None
    slash = filter.find("/", _SHARE_PREFIX_LEN)
    if slash < 0:
        return None
    return (filter[_SHARE_PREFIX_LEN:slash], filter[slash + 1:])


cpdef validate_filter(str filter):
    """Raise ``TopicFilterInvalid`` unless ``filter`` is a valid subscription topic filter.

    Empty (MQTT-4.7.3-1), U+0000 (MQTT-4.7.3-2), over 65,535 UTF-8 bytes (MQTT-4.7.3-3), ``#`` not
    alone as the last level (MQTT-4.7.1-2), ``+`` not a whole level (MQTT-4.7.1-3). A
    ``$share/{group}/{filter}`` needs a non-empty group (MQTT-4.8.2-1) without ``+ # /`` followed by
    ``/`` and a valid filter (MQTT-4.8.2-2).
    """
    cdef str group, inner
    cdef Py_ssize_t slash
    _check_string(filter, TopicFilterInvalid)
    if filter.startswith(_SHARE_PREFIX):
        slash = filter.find("/", _SHARE_PREFIX_LEN)
        if slash < 0:
            raise TopicFilterInvalid(
                "MQTT-4.8.2-2: a shared subscription's share name must be followed by '/' and a filter")
        group = filter[_SHARE_PREFIX_LEN:slash]
        inner = filter[slash + 1:]
        if len(group) == 0:
            raise TopicFilterInvalid(
                "MQTT-4.8.2-1: a shared subscription needs a share name at least one character long")
        if "+" in group or "#" in group:
            raise TopicFilterInvalid("MQTT-4.8.2-2: a share name must not contain '+', '#' or '/'")
        if len(inner) == 0:
            raise TopicFilterInvalid(
                "MQTT-4.8.2-2: the '/' after a share name must be followed by a topic filter")
        _check_wildcards(inner)
    else:
        _check_wildcards(filter)


cpdef parse_shared(str filter):
    """Return ``(group, inner_filter)`` for a ``$share/{group}/{filter}`` filter, None for a plain one.

    A filter starting with ``$share/`` is validated whole and raises ``TopicFilterInvalid`` when
    malformed (MQTT-4.8.2-1, MQTT-4.8.2-2); a plain filter is returned as None without validation.
    """
    if filter is None:
        raise TypeError("filter must be a str, not None")
    if not filter.startswith(_SHARE_PREFIX):
        return None
    validate_filter(filter)
    return _split_shared(filter)


# -- subscriptions ----------------------------------------------------------------------------------

cdef class SharedGroup:
    """The members of one ``$share/{name}/{filter}`` group.

    ``members`` (key -> value) belongs to the trie: change it only through ``SubscriptionTrie.add`` and
    ``remove``. ``cursor`` is free for the caller's round robin; it survives membership changes.
    """

    def __init__(self, str name, str filter):
        self.name = name
        self.filter = filter
        self.members = {}
        self.cursor = 0

    def __repr__(self) -> str:
        return f"SharedGroup(name={self.name!r}, filter={self.filter!r}, members={self.members!r})"


cdef class Match:
    """The result of ``SubscriptionTrie.match``: shared by the cache, so callers must not mutate it.

    ``subscribers`` holds one value per matching (filter, key) normal subscription: a key subscribed
    with two overlapping filters appears twice. ``groups`` holds each matching ``SharedGroup``.
    """

    def __init__(self, list subscribers=None, list groups=None):
        self.subscribers = [] if subscribers is None else subscribers
        self.groups = [] if groups is None else groups

    def __repr__(self) -> str:
        return f"Match(subscribers={self.subscribers!r}, groups={self.groups!r})"


cdef class _Node:
    """One level of the subscription trie."""

    cdef bint is_empty(self):
        return (self.children is None and self.plus is None and self.hash is None
                and self.subs is None and self.groups is None)


cdef inline int _collect(_Node node, list subscribers, list groups) except -1:
    cdef object item
    if node.subs is not None:
        for item in node.subs.values():
            subscribers.append(item)
    if node.groups is not None:
        for item in node.groups.values():
            groups.append(item)
    return 0


cdef Py_ssize_t _count_nodes(_Node root):
    cdef Py_ssize_t count = 0
    cdef list stack = [root]
    cdef _Node node
    while stack:
        node = <_Node>stack.pop()
        count += 1
        if node.children is not None:
            stack.extend(node.children.values())
        if node.plus is not None:
            stack.append(node.plus)
        if node.hash is not None:
            stack.append(node.hash)
    return count


cdef class SubscriptionTrie:
    """Subscriptions keyed by (filter, key), matched against topic names.

    ``add``/``remove`` take any valid filter including ``$share/{group}/{filter}``, whose entries live
    in a ``SharedGroup`` under the inner filter. A key may have a normal and a shared subscription on
    the same filter: they are separate entries. ``generation`` bumps on every change.
    ``cache_size`` bounds the per-topic match cache (0 disables it); when full it is cleared.
    """

    def __cinit__(self, Py_ssize_t cache_size=_DEFAULT_CACHE_SIZE):
        self._root = _Node.__new__(_Node)
        self._entries = 0
        self._cache = {}
        self._cache_size = cache_size
        self.generation = 0

    def __len__(self) -> int:
        """Number of (filter, key) entries, shared group members included."""
        return self._entries

    def node_count(self) -> int:
        """Number of trie nodes, the root included (walks the trie: for tests and admin)."""
        return _count_nodes(self._root)

    def cache_len(self) -> int:
        """Number of topics whose match result is cached."""
        return len(self._cache)

    cdef void _changed(self):
        self.generation += 1
        if self._cache:
            self._cache = {}

    cpdef bint add(self, str filter, object key, object value) except -1:
        """Subscribe ``key`` with ``filter``; True if new, False if it replaced key's value there.

        Raises ``TopicFilterInvalid`` for an invalid filter.
        """
        cdef tuple shared
        cdef str group = None, inner = filter, level
        cdef _Node node = self._root, child
        cdef SharedGroup g
        cdef bint new
        validate_filter(filter)
        hash(key)  # an unhashable key must fail before any node is created
        shared = _split_shared(filter)
        if shared is not None:
            group = <str>shared[0]
            inner = <str>shared[1]
        for level in inner.split("/"):
            if level == "+":
                if node.plus is None:
                    node.plus = _Node.__new__(_Node)
                node = node.plus
            elif level == "#":
                if node.hash is None:
                    node.hash = _Node.__new__(_Node)
                node = node.hash
            else:
                if node.children is None:
                    node.children = {}
                child = node.children.get(level)
                if child is None:
                    child = _Node.__new__(_Node)
                    node.children[level] = child
                node = child
        if group is None:
            if node.subs is None:
                node.subs = {}
            new = key not in node.subs
            node.subs[key] = value
        else:
            if node.groups is None:
                node.groups = {}
            g = node.groups.get(group)
            if g is None:
                g = SharedGroup(group, inner)
                node.groups[group] = g
            new = key not in g.members
            g.members[key] = value
        if new:
            self._entries += 1
        self._changed()
        return new

    cpdef bint remove(self, str filter, object key) except -1:
        """Unsubscribe ``key`` from ``filter``; True if it was subscribed. Empty nodes are pruned.

        An invalid filter was never added, so it returns False rather than raising.
        """
        cdef tuple shared
        cdef str group = None, inner = filter, level
        cdef list levels, path
        cdef _Node node = self._root, child, parent
        cdef SharedGroup g
        cdef Py_ssize_t i
        if filter is None:
            raise TypeError("filter must be a str, not None")
        shared = _split_shared(filter)
        if shared is not None:
            group = <str>shared[0]
            inner = <str>shared[1]
        levels = inner.split("/")
        path = [node]
        for level in levels:
            if level == "+":
                child = node.plus
            elif level == "#":
                child = node.hash
            elif node.children is None:
                child = None
            else:
                child = node.children.get(level)
            if child is None:
                return False
            path.append(child)
            node = child
        if group is None:
            if node.subs is None or key not in node.subs:
                return False
            del node.subs[key]
            if not node.subs:
                node.subs = None
        else:
            if node.groups is None:
                return False
            g = node.groups.get(group)
            if g is None or key not in g.members:
                return False
            del g.members[key]
            if not g.members:
                del node.groups[group]
                if not node.groups:
                    node.groups = None
        # Prune the now-empty tail of the path so memory does not grow with subscription churn.
        i = len(levels)
        while i > 0:
            node = <_Node>path[i]
            if not node.is_empty():
                break
            parent = <_Node>path[i - 1]
            level = <str>levels[i - 1]
            if level == "+":
                parent.plus = None
            elif level == "#":
                parent.hash = None
            else:
                del parent.children[level]
                if not parent.children:
                    parent.children = None
            i -= 1
        self._entries -= 1
        self._changed()
        return True

    cpdef Match match(self, str topic):
        """Subscriptions matching ``topic`` (a valid topic name; not validated here), cached per topic."""
        cdef PyObject* cached
        cdef Match result
        if topic is None:
            raise TypeError("topic must be a str, not None")
        if self._cache_size <= 0:
            return self._walk(topic)
        cached = PyDict_GetItem(self._cache, topic)
        if cached != NULL:
            return <Match>cached
        result = self._walk(topic)
        if len(self._cache) >= self._cache_size:
            self._cache = {}
        self._cache[topic] = result
        return result

    cdef Match _walk(self, str topic):
        cdef list subscribers = []
        cdef list groups = []
        cdef Match result = Match.__new__(Match)
        cdef list levels = topic.split("/")
        cdef Py_ssize_t n = len(levels)
        cdef Py_ssize_t i = 0, top = 0
        cdef _Node node = self._root
        cdef PyObject* found
        # Pending '+' branches: (node, next level index). Indexes grow strictly from bottom to top, so
        # at most n entries are pending. Borrowed references are safe: nothing here runs Python code
        # that could change the trie.
        cdef PyObject* small_nodes[_SMALL_STACK]
        cdef Py_ssize_t small_index[_SMALL_STACK]
        cdef PyObject** stack_nodes = small_nodes
        cdef Py_ssize_t* stack_index = small_index
        result.subscribers = subscribers
        result.groups = groups
        if n > _SMALL_STACK:
            stack_nodes = <PyObject**>PyMem_Malloc(n * sizeof(PyObject*))
            stack_index = <Py_ssize_t*>PyMem_Malloc(n * sizeof(Py_ssize_t))
            if stack_nodes == NULL or stack_index == NULL:
                PyMem_Free(stack_nodes)
                PyMem_Free(stack_index)
                raise MemoryError()
        try:
            if len(topic) > 0 and topic[0] == u"$":
                # MQTT-4.7.2-1: the root's '+' and '#' do not match a '$' topic.
                if node.children is None:
                    return result
                found = PyDict_GetItem(node.children, levels[0])
                if found == NULL:
                    return result
                node = <_Node>found
                i = 1
            while True:
                while True:
                    if node.hash is not None:
                        _collect(node.hash, subscribers, groups)
                    if i == n:
                        _collect(node, subscribers, groups)
                        break
                    if node.plus is not None:
                        stack_nodes[top] = <PyObject*>node.plus
                        stack_index[top] = i + 1
                        top += 1
                    if node.children is None:
                        break
                    found = PyDict_GetItem(node.children, levels[i])
                    if found == NULL:
                        break
                    node = <_Node>found
                    i += 1
                if top == 0:
                    break
                top -= 1
                node = <_Node>stack_nodes[top]
                i = stack_index[top]
            return result
        finally:
            if stack_nodes != small_nodes:
                PyMem_Free(stack_nodes)
                PyMem_Free(stack_index)


# -- retained messages ------------------------------------------------------------------------------

cdef class _RNode:
    """One level of the retained-message trie."""


cdef inline bint _is_dollar(str level):
    return len(level) > 0 and level[0] == u"$"


cdef int _collect_subtree(_RNode start, list out, bint skip_dollar) except -1:
    """Append every value at or below ``start``; ``skip_dollar`` drops its '$' children (MQTT-4.7.2-1)."""
    cdef list stack = []
    cdef _RNode node, child
    cdef str level
    if start.has_value:
        out.append(start.value)
    if start.children is None:
        return 0
    for level, child in start.children.items():
        if skip_dollar and _is_dollar(level):
            continue
        stack.append(child)
    while stack:
        node = <_RNode>stack.pop()
        if node.has_value:
            out.append(node.value)
        if node.children is not None:
            stack.extend(node.children.values())
    return 0


cdef class RetainedTrie:
    """Retained messages keyed by topic name, matched against subscription filters."""

    def __cinit__(self):
        self._root = _RNode.__new__(_RNode)
        self._count = 0

    def __len__(self) -> int:
        """Number of retained topics."""
        return self._count

    def node_count(self) -> int:
        """Number of trie nodes, the root included (walks the trie: for tests and admin)."""
        cdef Py_ssize_t count = 0
        cdef list stack = [self._root]
        cdef _RNode node
        while stack:
            node = <_RNode>stack.pop()
            count += 1
            if node.children is not None:
                stack.extend(node.children.values())
        return count

    cpdef set(self, str topic, object value):
        """Retain ``value`` under ``topic``, replacing any value there; ``TopicNameInvalid`` if invalid."""
        cdef _RNode node = self._root, child
        cdef str level
        validate_topic(topic)
        for level in topic.split("/"):
            if node.children is None:
                node.children = {}
            child = node.children.get(level)
            if child is None:
                child = _RNode.__new__(_RNode)
                node.children[level] = child
            node = child
        if not node.has_value:
            node.has_value = True
            self._count += 1
        node.value = value

    cdef _RNode _find(self, str topic):
        cdef _RNode node = self._root
        cdef PyObject* found
        cdef str level
        if topic is None:
            raise TypeError("topic must be a str, not None")
        for level in topic.split("/"):
            if node.children is None:
                return None
            found = PyDict_GetItem(node.children, level)
            if found == NULL:
                return None
            node = <_RNode>found
        return node

    cpdef get(self, str topic):
        """The value retained under ``topic``, or None."""
        cdef _RNode node = self._find(topic)
        if node is None or not node.has_value:
            return None
        return node.value

    def __contains__(self, str topic) -> bool:
        cdef _RNode node = self._find(topic)
        return node is not None and node.has_value

    cpdef bint delete(self, str topic) except -1:
        """Drop the value retained under ``topic``; True if there was one. Empty nodes are pruned."""
        cdef _RNode node = self._root, child
        cdef list levels, path
        cdef PyObject* found
        cdef str level
        cdef Py_ssize_t i
        if topic is None:
            raise TypeError("topic must be a str, not None")
        levels = topic.split("/")
        path = [node]
        for level in levels:
            if node.children is None:
                return False
            found = PyDict_GetItem(node.children, level)
            if found == NULL:
                return False
            node = <_RNode>found
            path.append(node)
        if not node.has_value:
            return False
        node.has_value = False
        node.value = None
        self._count -= 1
        i = len(levels)
        while i > 0:
            child = <_RNode>path[i]
            if child.has_value or child.children is not None:
                break
            node = <_RNode>path[i - 1]
            del node.children[levels[i - 1]]
            if not node.children:
                node.children = None
            i -= 1
        return True

    cpdef list match(self, str filter):
        """Values retained under topics that ``filter`` matches (a valid plain filter; not validated).

        Walks only the branches the filter selects: ``+`` visits every child of one level, ``#``
        collects the whole subtree. A filter starting with a wildcard skips ``$`` topics
        (MQTT-4.7.2-1). A ``$share/`` filter is matched literally: the broker sends no retained
        messages for shared subscriptions.
        """
        cdef list out = []
        cdef list levels, stack
        cdef Py_ssize_t n, i
        cdef _RNode node
        cdef PyObject* found
        cdef str level, key
        cdef object child
        if filter is None:
            raise TypeError("filter must be a str, not None")
        levels = filter.split("/")
        n = len(levels)
        stack = [self._root, 0]
        while stack:
            i = stack.pop()
            node = <_RNode>stack.pop()
            while True:
                if i == n:
                    if node.has_value:
                        out.append(node.value)
                    break
                level = <str>levels[i]
                if level == "#":
                    _collect_subtree(node, out, i == 0)
                    break
                if node.children is None:
                    break
                if level == "+":
                    for key, child in node.children.items():
                        if i == 0 and _is_dollar(key):
                            continue
                        stack.append(child)
                        stack.append(i + 1)
                    break
                found = PyDict_GetItem(node.children, level)
                if found == NULL:
                    break
                node = <_RNode>found
                i += 1
        return out

    def items(self):
        """Iterate ``(topic, value)`` over every retained message (admin and persistence).

        Each node's children are snapshotted when visited, so changes during iteration are safe; a
        topic added or removed meanwhile may or may not be seen.
        """
        cdef list stack = [("", self._root, True)]
        cdef str prefix, level, topic
        cdef _RNode node, child
        cdef bint at_root
        while stack:
            prefix, node, at_root = stack.pop()
            if node.children is None:
                continue
            for level, child in list(node.children.items()):
                topic = level if at_root else prefix + "/" + level
                if child.has_value:
                    yield topic, child.value
                if child.children is not None:
                    stack.append((topic, child, False))
