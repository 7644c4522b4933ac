# The typed state of the broker-layer objects a PUBLISH goes through (see broker_core.pyx).

from fluxmq._core.trie cimport SubscriptionTrie


cdef class BrokerCore:
    cdef public object stats  # BrokerStats (made in __init__, never replaced)
    cdef public object router  # Router (made in __init__, never replaced)
    cdef public object _store  # the durable storage, or None
    cdef public object peers  # the rest of the cluster (Peers), or None
    cdef public object queues  # the durable queues (QueueManager), None until first used
    cdef public object _on_published  # per-message event observers, None when nobody wants them
    cdef public object _on_delivered


cdef class RouterCore:
    cdef public SubscriptionTrie trie
    cdef public dict _routes  # topic -> Route, valid while _generation == trie.generation
    cdef public long long _generation  # -1: the cache is invalid
    cdef public long long _epoch  # +1 each time the cache is invalidated without a trie change


cdef class RouteCore:
    cdef public list targets  # (session, qos, qos_for_own_messages, retain_as_published, ids)
    cdef public list groups  # shared groups matching the topic


cdef class SessionCore:
    cdef public object delivery  # the attached connection (Delivery), or None
    cdef public object queue  # waiting deliveries: () until the first, a deque, or a DiskQueue
    cdef public dict inflight  # packet id -> Inflight
    cdef public Py_ssize_t send_quota  # the client's receive maximum (the window)
    cdef public int _next_pid
