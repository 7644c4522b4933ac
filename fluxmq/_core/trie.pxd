# Declarations of fluxmq._core.trie so other Cython modules (the broker's router) can cimport the
# classes and reach their fields and cpdef methods at C speed.

cpdef validate_topic(str topic)
cpdef validate_filter(str filter)
cpdef parse_shared(str filter)


cdef class SharedGroup:
    cdef public str name
    cdef public str filter
    cdef public dict members
    cdef public Py_ssize_t cursor


cdef class Match:
    cdef public list subscribers
    cdef public list groups


cdef class _Node:
    # Each dict is None until first used: most nodes are leaves with one kind of entry, and an
    # empty dict costs 64 bytes a node.
    cdef dict children      # literal level -> _Node
    cdef _Node plus         # the '+' child
    cdef _Node hash         # the '#' child (always a leaf)
    cdef dict subs          # key -> value (normal subscriptions ending here)
    cdef dict groups        # share name -> SharedGroup (shared subscriptions ending here)

    cdef bint is_empty(self)


cdef class SubscriptionTrie:
    cdef _Node _root
    cdef Py_ssize_t _entries
    cdef dict _cache
    cdef Py_ssize_t _cache_size
    cdef readonly unsigned long long generation

    cpdef bint add(self, str filter, object key, object value) except -1
    cpdef bint remove(self, str filter, object key) except -1
    cpdef Match match(self, str topic)
    cdef Match _walk(self, str topic)
    cdef void _changed(self)


cdef class _RNode:
    cdef dict children      # level -> _RNode (None while a leaf)
    cdef bint has_value     # a retained value ends here (the value itself may be None)
    cdef object value


cdef class RetainedTrie:
    cdef _RNode _root
    cdef Py_ssize_t _count

    cpdef set(self, str topic, object value)
    cpdef bint delete(self, str topic) except -1
    cpdef get(self, str topic)
    cpdef list match(self, str filter)
    cdef _RNode _find(self, str topic)
