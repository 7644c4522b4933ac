# cython: language_level=3
"""The fast path of a connected client's PUBLISH: route it and write it into subscribers' output.

``PublishRelay.serve(conn, packets, start)`` handles the decoded packets of one read, from
``start``, while they are PUBLISHes of the common shape (or PUBACKs of QoS 1 deliveries settled as
``Session.on_puback`` does: a durable queue's tracked ones through their sender, a plain or
persistent session's own with the pump of its queue after the run), and returns the index
of the first packet it leaves to the caller (``len(packets)`` when none): the caller runs its Python handler for that
packet and calls ``serve`` again after it. For each PUBLISH it does in one C call what the MQTT
connection's ``_on_publish``, ``Broker.publish``, ``Session.deliver`` and the connection's
``send_publish`` do, with the same effects, so a packet it declines is handled exactly as before.

Declined (left to the Python path), before any effect: QoS 2, retained, 5.0 properties (aliases,
expiry, user properties...), an empty topic or one starting with ``$`` (``$SYS``, ``$share`` is a
filter only) other than a QoS 1 append to a durable queue (``$queue/...``, handed to the broker's
``queues.append_relayed`` a run at a time, which appends or declines before any effect; a replicated
queue's PUBACKs are held until the Raft commit, through ``conn.hold_acks``), a payload over
``max_message_size``, QoS over ``max_qos``, a client policy without a fast allowance for the topic, a storage that is refusing writes, a route with
shared groups, a broker with message observers (webhooks). With peers (a cluster, several
workers) a message is also queued for each peer with matching interest (``peers.relay_route``), in
C, framed as the cluster frames it (``fluxmq._core.forward``); declined then as well: a topic
matching a shared group on a peer, a full peer queue. A ``$queue/`` append is served with peers
too when ``append_relayed`` takes it (the queue is this process's: ``QueuePlacement.owns``, as
``QueueManager.publish`` asks first); one another worker or node owns is declined there, and the
rest of its run in the same read is left to the Python path without asking again.
``forward_raw`` runs before the decoder on a read: the plain QoS 0 PUBLISHes at its start (and a
3.x client's QoS 1 ones with no local target) are served from the read's bytes, no ``Publish``
made: each ready local subscriber's frame written into its output (``publish_frame``), each
interested peer's framed for its queue (what the decoder and ``serve`` would do for them; the rest
of the read is theirs). A topic's local targets are checked before the peers' tables: a read
stopped there (e.g. its subscriber over its output's high-water mark) pays no look at them.
``deliver_items`` is the receiving side: a peer's plain forwarded messages through the same
fan-out (``_fan_out_at``, written from the batch's bytes; a persistent session's delivery there goes
through ``session.deliver``), or, while every target of a run of one topic takes the plain write,
to all of them at once (``_write_direct``; a publisher's QoS 0 items up to ``BLOCK`` at a time,
each output resized once for them: ``_write_block``).
Per target, the delivery goes through ``session.deliver`` (the Python path) unless the session is
a plain ``Session`` (or a ``PersistentSession`` over a store with a ``sent_table``) attached to an
MQTT connection that is open, under its output allowance, with an empty session queue, and (5.0)
without outbound topic aliases, subscription identifiers or a maximum packet size the PUBLISH
exceeds; QoS 1 targets also need room in their window. A persistent session's QoS 1 delivery is
stored as ``PersistentSession.deliver`` stores it (its entry at the disk queue's next seq, in flight
under its packet id: ``SentTable.sent_entry``), committed with the turn before anything leaves; its
PUBACK is settled here too (``SentTable.acked``; then, once per run of PUBACKs, the pump when
something waits). A plain QoS 1
delivery to a persistent session behind its full window (or its queue) is queued here as
``PersistentSession.deliver`` queues it (``_queue_plain``: ``QueueCore.append_plain`` on the disk
queue's C fields), within the session's bounds; the rest of that path stays in Python. The same for
a plain ``Session`` (a subscriber behind its window, the common state under a QoS 1 load): a QoS 1
delivery behind its full window is queued here (``_queue_memory``, the deque item
``Session._enqueue`` makes), its PUBACKs are settled here and the window a run of them frees is
filled from the queue here (``_pump_memory``: plain QoS 1 heads, encoded once per message in its
``wire_cache``); everything ``Session`` decides (overflow, QoS 0, expiry, ids) stays in Python.

This module holds no I/O and imports nothing above ``_core``; it reads and writes the attributes
the broker and protocol layers document for this path (``docs/architecture.rst``, *Publish fast
path*), and is handed the classes it recognises by its caller.
"""

cimport cython
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from fluxmq._core.outbuf cimport out_resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.pycapsule cimport PyCapsule_New
from cpython.ref cimport PyObject, Py_INCREF, Py_XDECREF
from cpython.unicode cimport (PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8, PyUnicode_GET_LENGTH,
                              PyUnicode_READ_CHAR)

from libc.string cimport memcmp, memcpy


from fluxmq._core.decoder cimport Decoder
from fluxmq._core.encoder cimport append_publish, encode_publish
from fluxmq._core.packets cimport Publish, Puback
from fluxmq._core.conn_state cimport ConnState, FlushState, flush_mark
from fluxmq._core.stats_core cimport QosCounts, StatsCore, monotonic_s
from fluxmq._core.broker_core cimport BrokerCore, RouteCore, RouterCore, SessionCore
from fluxmq._core.trie cimport SubscriptionTrie
from fluxmq._core.entry cimport fields_entry
from fluxmq._core.sent cimport SentTable
from fluxmq._core.dqueue cimport QueueCore
from fluxmq._core.forward cimport ForwardQueue, LinksVersion, plain_item
from fluxmq._core.publish_frame cimport (append_publish_frame, publish_frame_bytes,
                                         publish_frame_size, write_publish_frame)
from fluxmq._core.slots cimport SlotMaker, slot_offset
from libc.string cimport memchr

from collections import deque

from fluxmq.errors import ForwardedItemFailed

cdef object _MISS = object()


cdef extern from "Python.h":
    # a list's and a tuple's items as borrowed pointers (no reference counted per item)
    PyObject* _list_item "PyList_GET_ITEM"(object lst, Py_ssize_t i)
    PyObject* _tuple_item "PyTuple_GET_ITEM"(PyObject* tup, Py_ssize_t i)
    void* _type_of "Py_TYPE"(PyObject* o)


cdef tuple _NO_QUEUE = ()  # a session's queue until its first waiting delivery

#: the slots of the message and in-flight classes the relay is handed, in the order of their
#: ``__init__`` arguments (``_message``, ``_inflight`` fill them so; tests compare with ``__init__``)
MESSAGE_SLOTS = ("topic", "payload", "qos", "retain", "properties", "expires_at", "origin", "wire_cache")
INFLIGHT_SLOTS = ("message", "qos", "retain", "subscription_ids", "released")


cdef inline int _append(bytearray out, bytes data) except -1:
    """``out += data`` without the buffer protocol's calls."""
    cdef Py_ssize_t old = PyByteArray_GET_SIZE(out), n = PyBytes_GET_SIZE(data)
    out_resize(out, old + n)
    memcpy(PyByteArray_AS_STRING(out) + old, PyBytes_AS_STRING(data), n)
    return 0


#: the most messages of one run ``deliver_items`` writes at once (``_write_block``), and the
#: largest payload it writes so (a larger one goes through ``_write_direct``, which checks the
#: frame's limits)
DEF BLOCK = 64
DEF BLOCK_PAYLOAD = 1048576


#: slots of ``deliver_items``' table of the peers' topics (a power of two)
DEF TOPICS = 256


cdef inline Py_ssize_t _topic_slot(const unsigned char* t, Py_ssize_t n) noexcept:
    """The slot of ``t[:n]`` in ``deliver_items``' topic table (FNV-1a)."""
    cdef unsigned int h = 2166136261u
    cdef Py_ssize_t k
    for k in range(n):
        h = (h ^ t[k]) * 16777619u
    return h & (TOPICS - 1)


cdef inline bint _ascii(const unsigned char* t, Py_ssize_t n) noexcept:
    """True when ``t[:n]`` is ASCII (then valid UTF-8)."""
    cdef unsigned char high = 0
    cdef Py_ssize_t k
    for k in range(n):
        high |= t[k]
    return high < 0x80


cdef inline bint _refused(allowed, topic) except -1:
    """``allowed.get(topic) != 0``: a client policy's verdicts per topic (``ClientPolicy.fast``,
    0 = allowed) do not allow it; read with C's look-up when it is a dict (a method call was
    ~700 instructions per read)."""
    if type(allowed) is dict:
        verdict = (<dict>allowed).get(topic)
    else:
        verdict = allowed.get(topic)
    return verdict != 0


cdef inline int _mark(ConnState c, conn) except -1:
    """``c.flusher.mark(conn)``: inline for the protocol layer's scheduler (a ``FlushState``)."""
    cdef PyObject* f = <PyObject*>c.flusher  # (borrowed: the connection holds it)
    if isinstance(<object>f, FlushState):
        flush_mark(<FlushState>f, conn)
    else:
        (<object>f).mark(conn)
    return 0


cdef inline int _observe_later(ConnState c, broker, StatsCore stats, double started) except -1:
    """``Broker._observe_latency(started)`` without Python code and without a loop callback (a
    sampled publish: the only one in 64 that ran any Python, with the interpreter's code and data
    cold, ~26 us before its delivery was written; then ~5 us for a loop callback's set-up): noted
    in the flush scheduler, which observes it into ``stats`` after its writes."""
    f = c.flusher
    if isinstance(f, FlushState) and (<FlushState>f)._loop is not None:
        (<FlushState>f).note_sample(stats, started)
    else:
        broker._observe_latency(started)
    return 0


cdef inline SentTable _sent_table(store):
    """A store's ``sent_table`` when it is one (an LMDB store), else None: the Python path."""
    found = getattr(store, "sent_table", None)
    if type(found) is SentTable:
        return <SentTable>found
    return None


cdef class PublishRelay:
    """Serves the common PUBLISH in C (see the module docstring)."""

    cdef object conn_class
    cdef object session_class
    cdef object message_class
    cdef object inflight_class
    cdef SlotMaker _message_maker  # None: made by calling message_class
    cdef SlotMaker _inflight_maker  # None: made by calling inflight_class
    cdef object puback_class
    cdef object tracked_class
    cdef object persistent_class
    cdef long sample_mask
    cdef public long long served  # PUBLISHes handled here (tests read it to see which path ran)
    cdef public long long forwarded  # messages from peers delivered here (deliver_items)
    cdef public long long settled  # PUBACKs settled here (_settle_acks; tests read it to see the path)
    # The run of ``$queue/`` PUBLISHes ``append_relayed`` last declined: the read's packet list
    # (held, so that no other read's list is made at its address; let go by the next call with
    # another list), the run's end in it and its topic; a later call within that run (the Python
    # path served the packet before) declines at once, so a read of appends to a queue another
    # worker owns is not gathered again for every packet
    cdef list _declined_list
    cdef Py_ssize_t _declined_end
    cdef str _declined_topic
    cdef public long long raw_forwarded  # PUBLISHes forward_raw consumed on a broker with peers
    cdef public long long raw_served  # PUBLISHes forward_raw consumed (delivered, forwarded) without decoding
    cdef public Py_ssize_t raw_packets  # the PUBLISHes the last forward_raw call consumed
    # deliveries _fan_out wrote from the message's topic and payload bytes (no encoded PUBLISH)
    cdef public long long written_direct
    # of the peers' messages, those deliver_items wrote to all their route's targets at once
    # (_write_direct: no per-target look at the sessions)
    cdef public long long written_routes
    # of those, the writes of several messages of one run at once (_write_block: one resize of
    # each target's output for up to BLOCK messages)
    cdef public long long written_blocks
    # of the runs of one topic deliver_items met, those whose topic str and route came from its
    # table of the call's topics (met earlier in the same call)
    cdef public long long topics_reused
    # The UTF-8 bytes of the last topic forward_raw found shared groups for, and the trie
    # generation then: a read starting with it again goes to the decoder at once, with no topic
    # str or route look-up
    cdef bytes _local_topic
    cdef object _local_generation
    cdef public bint enabled
    # The last broker served and the objects it holds for its whole life (Broker.stats and its
    # per-QoS count lists, Broker.router, Router._routes, Router.trie: made in their __init__ and
    # never replaced), read once per broker instead of once per call.
    cdef object _broker
    cdef QosCounts _received
    cdef QosCounts _received_bytes
    cdef QosCounts _sent
    cdef QosCounts _sent_bytes
    cdef RouterCore _router
    cdef dict _routes
    cdef SubscriptionTrie _trie
    cdef object _store  # Broker._store (None: no durable storage)
    cdef SentTable _table  # its ``sent_table`` (an LMDB store's; None: persistent sessions in Python)
    cdef StatsCore _stats  # Broker.stats (a sampled publish's histogram)
    cdef object _links_peers  # the peers object whose ``relay_links`` is ``_links`` (_peer_links)
    # deliver_items' table of the peers' topics: slot -> the topic's UTF-8 bytes, its str and its
    # route (None: empty), filled at the trie generation and router epoch _tc_gen, _tc_epoch
    cdef list _tc_key
    cdef list _tc_topic
    cdef list _tc_route
    cdef long long _tc_gen
    cdef long long _tc_epoch
    cdef object _links
    # The ForwardQueues of the last peers' route the forward path met (_queues): its node ids, the
    # queues, and the links' version then (None: the peers have no version, nothing is kept)
    cdef object _routes_peers  # the peers object whose ``relay_routes`` is ``_fwd_routes``
    cdef object _fwd_routes
    cdef LinksVersion _links_version
    cdef tuple _fq_nodes
    cdef list _fq_list
    cdef long long _fq_version
    # reads whose peers' queues came from that (a test reads it to see the look-up skipped)
    cdef public long long queues_reused
    # a connection's settings class and the offset of its ``max_message_size`` slot (-1: read by
    # attribute); read per read, an attribute look-up was ~140 instructions of a lone message
    cdef object _settings_type
    cdef Py_ssize_t _max_size_at
    # byte offsets of the slots the queued path of a plain session reads (slot_offset; -1: read by
    # name), valid for objects of exactly the class they were taken from
    cdef Py_ssize_t _m_topic, _m_payload, _m_expires, _m_cache  # message_class
    cdef Py_ssize_t _i_message, _i_qos  # inflight_class
    cdef Py_ssize_t _s_held, _s_validity, _s_qos0, _s_bytes, _s_limits, _s_reread  # session_class
    cdef Py_ssize_t _p_held, _p_validity, _p_bytes, _p_reread, _p_store, _p_cid  # persistent_class (-1: none)
    cdef object _limits_type  # the class of the last session limits read, and its bounds' slots
    cdef Py_ssize_t _l_count, _l_bytes

    def __init__(self, conn_class, session_class, message_class, inflight_class, puback_class,
                 long sample_mask, tracked_class=None, persistent_class=None):
        if not issubclass(conn_class, ConnState):
            raise TypeError("the relay's connection class must have the typed state of _core.conn_state")
        if not issubclass(session_class, SessionCore) or (
                persistent_class is not None and not issubclass(persistent_class, SessionCore)):
            raise TypeError("the relay's session classes must have the typed state of _core.broker_core")
        self.conn_class = conn_class
        self.session_class = session_class
        self.message_class = message_class
        self.inflight_class = inflight_class
        self._message_maker = _maker(message_class, MESSAGE_SLOTS)
        self._inflight_maker = _maker(inflight_class, INFLIGHT_SLOTS)
        self._m_topic, self._m_payload, self._m_expires, self._m_cache = _offsets(
            message_class, ("topic", "payload", "expires_at", "wire_cache"))
        self._i_message, self._i_qos = _offsets(inflight_class, ("message", "qos"))
        self._s_held, self._s_validity, self._s_qos0, self._s_bytes, self._s_limits, self._s_reread = _offsets(
            session_class, ("held", "validity", "queue_qos0", "queue_bytes", "_limits", "reread"))
        self._p_held = self._p_validity = self._p_bytes = self._p_reread = self._p_store = self._p_cid = -1
        if persistent_class is not None:
            (self._p_held, self._p_validity, self._p_bytes, self._p_reread, self._p_store,
             self._p_cid) = _offsets(
                persistent_class, ("held", "validity", "queue_bytes", "reread", "store", "client_id"))
        self._limits_type = None
        self._l_count = self._l_bytes = -1
        self.puback_class = puback_class
        self.tracked_class = tracked_class
        self.persistent_class = persistent_class
        self.sample_mask = sample_mask
        self.served = 0
        self.forwarded = 0
        self.settled = 0
        self._declined_list = None
        self._declined_end = 0
        self._declined_topic = None
        self.raw_forwarded = 0
        self.raw_served = 0
        self.raw_packets = 0
        self.written_direct = 0
        self.written_routes = 0
        self.written_blocks = 0
        self._local_topic = None
        self._local_generation = None
        self.enabled = True
        self._broker = None

    cdef inline long long _max_message_size(self, settings) except? -1:
        """``settings.max_message_size``, read from its slot when ``settings``' class keeps it in
        one (``ProtocolSettings``: ``__slots__``; the slot is read each time, so a changed value is
        seen) and it holds an ``int``; else by attribute."""
        cdef PyObject* v
        cls = type(settings)
        if cls is not self._settings_type:
            self._max_size_at = slot_offset(cls, "max_message_size")
            self._settings_type = cls
        if self._max_size_at >= 0:
            v = (<PyObject**>((<char*><PyObject*>settings) + self._max_size_at))[0]
            if v != NULL and type(<object>v) is int:
                return <object>v
        return settings.max_message_size

    cdef int _adopt(self, broker) except -1:
        """Read the per-broker objects of ``broker`` (see ``_broker``)."""
        cdef StatsCore stats = broker.stats
        router = broker.router
        self._received = stats.received_qos
        self._received_bytes = stats.received_bytes_qos
        self._sent = stats.sent_qos
        self._sent_bytes = stats.sent_bytes_qos
        self._router = router
        self._tc_key = None  # (another router: deliver_items' topic table starts again)
        self._routes = router._routes
        self._trie = router.trie
        store = self._store = broker._store
        self._table = _sent_table(store) if store is not None else None
        self._stats = stats
        self._broker = broker
        return 0

    cdef int _count_sent(self, long long* n, long long* b) except -1:
        """Add a call's deliveries per QoS (``n``) and their bytes (``b``) to the adopted broker's
        BrokerStats, once per call."""
        cdef QosCounts sent = self._sent
        cdef QosCounts sent_bytes = self._sent_bytes
        sent.v[0] += n[0]
        sent_bytes.v[0] += b[0]
        sent.v[1] += n[1]
        sent_bytes.v[1] += b[1]
        return 0

    cdef Py_ssize_t _settle_acks(self, conn, list packets, Py_ssize_t i, Py_ssize_t count) except -1:
        """A run of PUBACKs the fast path settles: of tracked deliveries (a durable queue's,
        ``TrackedMessage``) what the connection's ``_on_puback`` and ``Session.on_puback`` do for
        them (the entry leaves the window, then its sender's ``settle`` is called), for a plain or
        persistent session with nothing queued or held; of a plain session's own QoS 1 deliveries
        what ``Session.on_puback`` does (the entry leaves the window, then the pump sends what waits:
        ``_pump_memory``); and, for a persistent session, of its own QoS 1 deliveries what
        ``PersistentSession.on_puback`` does (the entry leaves the window, the store marks its queue
        entry done, and ``pump`` sends what waits). The pump runs once per run of PUBACKs, for the
        window they free at once (before a tracked one's settle, as ``on_puback`` pumps first).
        Stops at the first PUBACK of anything else, which the Python path serves.

        The same with peers (a cluster node, a worker of several): neither ``on_puback`` looks at
        them. A delivery of a queue another worker or node owns (``ForwardedDelivery``) is settled
        through its ``settle``, ``RemoteQueues._settled``, which queues the op to the owner without
        waiting (as from the reader); a session moving to another node is exported from another
        greenlet, never within this call, and closes the connection first (checked per PUBACK)."""
        cdef Puback ack
        cdef bint v5, durable
        cdef int pid
        tracked = self.tracked_class
        session = conn.session
        if session is None or conn.closed:
            return i
        cdef SentTable table = None
        cdef bint plain = type(session) is self.session_class
        durable = self.persistent_class is not None and type(session) is self.persistent_class
        if durable:
            found = getattr(session.store, "sent_table", None)
            if type(found) is SentTable:
                table = <SentTable>found
            else:
                durable = False  # (a store without one: the Python path)
        if not durable and not plain:
            return i
        cdef dict inflight = session.inflight
        inflight_class = self.inflight_class
        v5 = conn.version == 5
        cdef QueueCore queue = None
        cdef bint pump = False
        client_id = None
        if durable:  # (the same for the whole run: it stops when the connection's session changes)
            client_id = session.client_id
            found = session.queue
            if not isinstance(found, QueueCore):
                return i
            queue = <QueueCore>found
        while i < count:
            p = packets[i]
            if type(p) is not Puback:
                break
            ack = <Puback>p
            pid = ack.packet_id
            entry = inflight.get(pid)
            if entry is None:
                break
            if type(entry) is inflight_class:
                if (_get(entry, self._i_qos, "qos") != 1
                        or (tracked is not None and isinstance(_get(entry, self._i_message, "message"), tracked))):
                    break
                del inflight[pid]
                if durable:
                    table.acked(client_id, pid)  # store.delete_inflight, before pump() may reuse the id
                pump = True  # once the run's PUBACKs are settled (the window they free, at once)
            elif tracked is not None and isinstance(entry, tracked):
                if pump:
                    pump = False
                    if durable:
                        if queue.count or session.held:
                            self._pump(session, inflight, table)
                    elif session.queue or session.held:
                        self._pump_memory(session, inflight)
                if (session.queue.count if durable else session.queue) or session.held:
                    break
                del inflight[pid]
                ticket = entry.ticket
                entry.settle(session, ack.reason_code if v5 else 0, entry if ticket is None else ticket)
            else:
                break
            i += 1
            self.settled += 1
            if conn.closed or conn.session is not session:
                break
        if pump:
            if durable:
                if queue.count or session.held:
                    self._pump(session, inflight, table)
            elif session.queue or session.held:
                self._pump_memory(session, inflight)
        return i

    cdef int _pump_memory(self, session, dict inflight) except -1:
        """``Session.pump`` of a plain session after a run of PUBACKs freed its window: its common
        case in C (an attached open connection under its output allowance, nothing held, no re-check
        of read permissions; heads of QoS 1, not retained, without subscription ids or expiry, of the
        relay's message class; 5.0: no outbound topic aliases), each sent as ``Session._send_new``
        and ``send_publish`` send it (the encoding cached on the message as there; the session's and
        connection's counters written once per call); whatever else is left (or congestion, or a
        message the connection must refuse or cannot encode) goes to ``session.pump()``."""
        cdef int pid, version, key
        cdef long long quota, npk
        cdef Py_ssize_t limit, freed
        cdef bint rest
        cdef bytes data
        cdef ConnState dc
        cdef SessionCore sc
        dc = self._pump_conn(session, self.session_class, self._s_held, self._s_reread)
        if dc is None or type((<SessionCore>session).queue) is not deque:
            session.pump()
            return 0
        sc = <SessionCore>session
        queue = sc.queue
        version = dc.version
        if version == 5:
            if dc._aliases_out is not None:
                session.pump()
                return 0
            key = 10  # message.WIRE_V5_QOS1: the wire_cache key of a 5.0 QoS 1 PUBLISH of no extra properties
            limit = dc._client_max_packet
        else:
            key = 2  # qos * 2 + retain, a 3.x connection's key (outbound.send_publish)
            version = 4
            limit = 0
        quota = sc.send_quota
        message_class = self.message_class
        popleft = queue.popleft
        pid = sc._next_pid
        npk = freed = 0  # (freed: what Session._drop_item subtracts from queue_bytes)
        rest = False  # what is left goes to session.pump()
        while queue:
            if PyByteArray_GET_SIZE(dc.out) > dc._high:
                rest = True  # is_congested: the allowance may grow, or the client waits for room
                break
            item = queue[0]
            if type(item) is not tuple or len(<tuple>item) != 4:
                rest = True
                break
            message, qos, retain, sub_ids = <tuple>item
            if (qos != 1 or retain or sub_ids is not None or type(message) is not message_class
                    or _get(message, self._m_expires, "expires_at") is not None):
                rest = True  # Session.pump's other cases (QoS 0, expiry, ids, ...)
                break
            if len(inflight) >= quota:
                break  # the window is full and the head is QoS 1: Session.pump would stop here too
            try:
                data = self._qos1_frame(message, key, version)  # MQTTConnection.send_publish
            except (ValueError, TypeError, OverflowError):
                rest = True  # the Python path drops it as unencodable, counted and logged
                break
            if limit and PyBytes_GET_SIZE(data) > limit:
                rest = True  # over the client's Maximum Packet Size: the Python path drops it
                break
            popleft()
            freed += len(_get(message, self._m_payload, "payload")) + len(_get(message, self._m_topic, "topic"))
            while pid in inflight:
                pid = pid + 1 if pid < 65535 else 1
            append_publish(dc.out, data, pid, False)
            npk += 1
            inflight[pid] = self._inflight(message, 1, None)
            pid = pid + 1 if pid < 65535 else 1
        if npk:
            self._sent_run(sc, dc, pid, npk)
            # Session._drop_item's count, once per run
            _set(session, self._s_bytes, "queue_bytes", _get(session, self._s_bytes, "queue_bytes") - freed)
        if rest:
            session.pump()
        return 0

    cdef int _pump(self, session, dict inflight, SentTable table) except -1:
        """``PersistentSession.pump`` after a run of PUBACKs freed the window: its common case in C (an
        attached 3.x connection under its output allowance, nothing held, no re-check of read
        permissions; heads that ``DiskQueue.pop_plain`` gives: QoS 1 kept in memory, not retained,
        no subscription ids or expiry), each sent as ``Session._send_new`` and recorded as
        ``store.put_sent`` (the session's and connection's counters written once per call);
        whatever else is left (or congestion) goes to ``session.pump()``."""
        cdef int pid
        cdef long long quota, npk
        cdef Py_ssize_t high
        cdef bint rest
        cdef QueueCore queue
        cdef ConnState dc
        cdef SessionCore sc
        dc = self._pump_conn(session, self.persistent_class, self._p_held, self._p_reread)
        if dc is None or dc.version == 5 or not isinstance((<SessionCore>session).queue, QueueCore):
            session.pump()
            return 0
        sc = <SessionCore>session
        queue = <QueueCore>sc.queue
        quota = sc.send_quota
        cid = _get(session, self._p_cid, "client_id")
        dout = dc.out
        high = dc._high
        pid = sc._next_pid
        npk = 0
        rest = False  # what is left goes to session.pump()
        while queue.count:
            if PyByteArray_GET_SIZE(dout) > high:
                rest = True  # is_congested: the allowance may grow, or the client waits for room
                break
            if len(inflight) >= quota:
                rest = queue.qos0  # a QoS 0 head may go with the window full
                break
            head = queue.pop_plain()
            if head is None:
                rest = True  # a head pump handles otherwise (read from the store, QoS 0, ...)
                break
            seq, item, _ = <tuple>head
            message = (<tuple>item)[0]
            while pid in inflight:
                pid = pid + 1 if pid < 65535 else 1
            append_publish(dout, self._qos1_frame(message, 2, 4), pid, False)  # MQTTConnection.send_publish (3.x)
            npk += 1
            inflight[pid] = self._inflight(message, 1, None)
            table.sent(cid, pid, seq)  # store.put_sent
            pid = pid + 1 if pid < 65535 else 1
        if npk:
            self._sent_run(sc, dc, pid, npk)
            _set(session, self._p_bytes, "queue_bytes", queue.bytes)
        if rest:
            session.pump()
        return 0

    cdef ConnState _pump_conn(self, session, cls, Py_ssize_t held_at, Py_ssize_t reread_at):
        """The connection a pump of ``session`` writes into in C: its attached open connection of the
        relay's class, when ``session`` is exactly a ``cls`` (whose slots ``held_at`` and
        ``reread_at`` are), holds nothing and has no read permissions to re-check; else None (the
        caller leaves the pump to ``session.pump()``)."""
        if type(session) is not cls:
            return None
        d = (<SessionCore>session).delivery
        if (_get(session, held_at, "held") or d is None or type(d) is not self.conn_class
                or (<ConnState>d).closed or _get(session, reread_at, "reread") is not None):
            return None
        return <ConnState>d

    cdef bytes _qos1_frame(self, message, int key, int version):
        """``message``'s QoS 1 PUBLISH (not retained, packet id 1) for a ``version`` connection, as
        ``MQTTConnection.send_publish`` caches it on the message: ``wire_cache[key]`` (2 for 3.x;
        10, ``message.WIRE_V5_QOS1``, for 5.0 without per-delivery properties), encoded at the first
        ask. The codec's errors are raised (the caller decides)."""
        cdef Py_ssize_t at_topic = -1, at_payload = -1, at_cache = -1
        if type(message) is self.message_class:
            at_topic, at_payload, at_cache = self._m_topic, self._m_payload, self._m_cache
        cache = _get(message, at_cache, "wire_cache")
        if type(cache) is dict:
            data = (<dict>cache).get(key)
        else:
            data = cache.get(key) if cache is not None else None
        if data is not None:
            return data
        topic = _get(message, at_topic, "topic")
        payload = _get(message, at_payload, "payload")
        if version == 5:
            props = message.properties
            data = encode_publish(topic, payload, 1, False, False, 1, props if props else None, 5)
        else:
            data = encode_publish(topic, payload, 1, False, False, 1, None, 4)
        if cache is None:
            _set(message, at_cache, "wire_cache", {key: data})
        else:
            cache[key] = data
        return data

    cdef int _sent_run(self, SessionCore sc, ConnState dc, int pid, long long npk) except -1:
        """What ``Session._send_new`` and the connection's send record per message, once for a
        pump's run of ``npk`` PUBLISHes written into ``dc``'s output (``pid``: the next id to try)."""
        sc._next_pid = pid
        dc._npk += npk
        if not dc._dirty:
            dc._dirty = True
            _mark(dc, dc)
        return 0

    cdef Py_ssize_t _fan_out(self, targets, str topic, bytes payload, int qos, origin, origin_id,
                             bint persist, Py_ssize_t* acked) except -1:
        """``_fan_out_at`` of a decoded message (``topic`` str, ``payload`` bytes)."""
        cdef Py_ssize_t tlen
        cdef const char* t = PyUnicode_AsUTF8AndSize(topic, &tlen)
        return self._fan_out_at(targets, topic, payload, <const unsigned char*>t, tlen,
                                <const unsigned char*>PyBytes_AS_STRING(payload),
                                PyBytes_GET_SIZE(payload), qos, origin, origin_id, persist, acked)

    cdef Py_ssize_t _fan_out_at(self, targets, str topic, bytes payload, const unsigned char* t,
                                Py_ssize_t tlen, const unsigned char* pp, Py_ssize_t plen, int qos,
                                origin, origin_id, bint persist, Py_ssize_t* acked) except -1:
        """``Broker.publish``'s loop over the route's targets (``Session.deliver`` +
        ``MQTTConnection.send_publish`` written in C where nothing special applies): returns the
        deliveries, ``acked`` the QoS 1 ones among them. ``t[:tlen]`` is ``topic``'s UTF-8 and
        ``pp[:plen]`` the payload, from which a ready target's PUBLISH is written into its output
        (no encoded PUBLISH for a lone target, one per shape for a fan-out);
        ``payload`` is their bytes object, or
        None: made from ``pp`` only when a target needs one (a message object for an in-flight
        record or the Python path, a stored entry), so a peer's QoS 0 message to ready targets makes
        none. ``origin`` is the publishing session (No Local), None for a message from a peer;
        ``origin_id`` the message's origin. With ``persist`` (and the adopted broker's store has a
        ``sent_table``) a persistent session's QoS 1 delivery is stored here too (``serve``: the
        publisher's PUBACK follows the commit); without, a persistent session gets
        ``session.deliver``."""
        cdef int tq, qown, pid, version
        cdef Py_ssize_t n = 0, n_acked = 0, limit
        cdef bint durable, ready
        cdef long long seq
        cdef ConnState dc
        cdef SessionCore sc
        cdef dict inflight
        cdef SentTable table = self._table if persist else None
        cdef QueueCore dq = None  # a persistent target's disk queue
        store = self._store
        conn_class = self.conn_class
        session_class = self.session_class
        persistent_class = self.persistent_class if table is not None else None
        message = None
        entry1 = None
        # a lone target's PUBLISH is written from the bytes; a fan-out copies one frame per shape
        # (3.1.1 / 5.0, QoS 0 / 1), made for the first target of that shape: cheaper than a frame
        # written per target
        lone = len(targets) == 1
        enc4_0 = enc4_1 = enc5_0 = enc5_1 = None
        for target in targets:
            session, tq, qown, rap, sub_ids = <tuple>target
            if session is origin:
                if qown < 0:
                    continue  # No Local [MQTT-3.8.3-3]
                tq = qown
            if qos < tq:
                tq = qos
            n += 1
            if tq:
                n_acked += 1
            # -- Session.deliver + MQTTConnection.send_publish, when nothing special applies --
            # (a session of the relay's classes is a SessionCore: its fields are read as C fields)
            sc = <SessionCore>session if isinstance(session, SessionCore) else None
            d = sc.delivery if sc is not None else session.delivery
            durable = False
            if d is None or type(d) is not conn_class or (<ConnState>d).closed:
                ready = False
            elif type(session) is session_class:
                ready = not sc.queue
            elif type(session) is persistent_class and _get(session, self._p_store, "store") is store:
                # a persistent session: its disk queue must be empty too (then a QoS 1
                # delivery is stored as an in-flight queue entry, as put_in_flight does)
                queue = sc.queue
                if isinstance(queue, QueueCore):
                    durable = True
                    dq = <QueueCore>queue
                    ready = not dq.count
                else:
                    ready = False
            else:
                ready = False
            if ready:
                dc = <ConnState>d
                dout = dc.out
                if PyByteArray_GET_SIZE(dout) <= dc._high:
                    version = 0  # 0: not written here
                    if dc.version == 5:
                        if dc._aliases_out is None and sub_ids is None:
                            limit = dc._client_max_packet
                            # over it: dropped for this client (the Python path counts it)
                            if not limit or publish_frame_size(tlen, plen, tq, 5) <= limit:
                                version = 5
                    else:
                        version = 4  # (3.1 frames a PUBLISH as 3.1.1 does)
                    if version:
                        if tq == 0:
                            if lone:
                                append_publish_frame(dout, t, tlen, pp, plen, 0, 0, version)
                            elif version == 5:
                                if enc5_0 is None:
                                    enc5_0 = publish_frame_bytes(t, tlen, pp, plen, 0, 0, 5)
                                _append(dout, <bytes>enc5_0)
                            else:
                                if enc4_0 is None:
                                    enc4_0 = publish_frame_bytes(t, tlen, pp, plen, 0, 0, 4)
                                _append(dout, <bytes>enc4_0)
                            self.written_direct += 1
                            dc._npk += 1
                            if not dc._dirty:
                                dc._dirty = True
                                _mark(dc, d)
                            continue
                        inflight = sc.inflight
                        if len(inflight) < sc.send_quota:
                            if payload is None:
                                payload = PyBytes_FromStringAndSize(<const char*>pp, plen)
                            if message is None:
                                message = self._message(topic, payload, qos, origin_id)
                            if durable:
                                if sub_ids is not None:
                                    session.deliver(message, tq, False, sub_ids)  # (encodes the ids)
                                    continue
                                if entry1 is None:  # the stored entry (records.plain_entry's bytes)
                                    entry1 = fields_entry(topic, origin_id, payload, qos, False, 1,
                                                          False)
                            pid = sc._next_pid
                            while pid in inflight:
                                pid = pid + 1 if pid < 65535 else 1
                            sc._next_pid = pid + 1 if pid < 65535 else 1
                            if lone:
                                append_publish_frame(dout, t, tlen, pp, plen, 1, pid, version)
                            elif version == 5:
                                if enc5_1 is None:
                                    enc5_1 = publish_frame_bytes(t, tlen, pp, plen, 1, 1, 5)
                                append_publish(dout, <bytes>enc5_1, pid, False)
                            else:
                                if enc4_1 is None:
                                    enc4_1 = publish_frame_bytes(t, tlen, pp, plen, 1, 1, 4)
                                append_publish(dout, <bytes>enc4_1, pid, False)
                            self.written_direct += 1
                            inflight[pid] = self._inflight(message, tq, sub_ids)
                            if durable:
                                # -- DiskQueue.put_in_flight (the queue is empty) --
                                seq = dq.next
                                dq.next = seq + 1
                                dq.first = seq + 1
                                table.sent_entry(_get(session, self._p_cid, "client_id"), pid, seq, entry1)
                            dc._npk += 1
                            if not dc._dirty:
                                dc._dirty = True
                                _mark(dc, d)
                            continue
            if payload is None:
                payload = PyBytes_FromStringAndSize(<const char*>pp, plen)
            if message is None:
                message = self._message(topic, payload, qos, origin_id)
            if durable and tq == 1 and sub_ids is None:
                # -- PersistentSession.deliver's queueing behind a full window, when plain --
                if entry1 is None:
                    entry1 = fields_entry(topic, origin_id, payload, qos, False, 1, False)
                if self._queue_plain(session, dq, d, message, entry1,
                                     plen + len(topic) + 40, table):
                    continue
            elif tq == 1 and sc is not None and type(session) is session_class:
                # -- Session.deliver's queueing behind a full window --
                if self._queue_memory(session, sc, d, message, sub_ids, plen + len(topic)):
                    continue
            session.deliver(message, tq, False, sub_ids)
        acked[0] = n_acked
        return n

    cdef object _message(self, str topic, bytes payload, int qos, origin_id):
        """``message_class(topic, payload, qos, False, None, None, origin_id)``, its slots filled in
        C when the class is the plain one (``SlotMaker``: no ``__init__`` frame)."""
        cdef SlotMaker mk = self._message_maker
        if mk is None:
            return self.message_class(topic, payload, qos, False, None, None, origin_id)
        m = mk.new()
        mk.put(m, 0, topic)
        mk.put(m, 1, payload)
        mk.put(m, 2, qos)
        mk.put(m, 3, False)
        mk.put(m, 4, None)
        mk.put(m, 5, None)
        mk.put(m, 6, origin_id)
        mk.put(m, 7, None)
        return m

    cdef object _inflight(self, message, int qos, sub_ids):
        """``inflight_class(message, qos, False, sub_ids)``, as ``_message`` makes a message."""
        cdef SlotMaker mk = self._inflight_maker
        if mk is None:
            return self.inflight_class(message, qos, False, sub_ids)
        r = mk.new()
        mk.put(r, 0, message)
        mk.put(r, 1, qos)
        mk.put(r, 2, False)
        mk.put(r, 3, sub_ids)
        mk.put(r, 4, False)
        return r

    cdef list _direct_conns(self, list targets, int qos):
        """The connections of ``targets`` when a peer's QoS ``qos`` message goes to every one of them
        as ``_fan_out_at`` writes it from its bytes, whatever the message: each target is a plain
        ``Session`` with an empty queue, attached to an open connection of the relay's class,
        delivered at QoS 0, and (5.0) without outbound topic aliases or subscription identifiers.
        None otherwise (``_fan_out_at`` decides per target). What else it checks depends on the
        output and the message: ``_write_direct``."""
        cdef list conns = []
        cdef int tq
        cdef SessionCore sc
        cdef ConnState dc
        session_class = self.session_class
        conn_class = self.conn_class
        for target in targets:
            tq = (<tuple>target)[1]
            session = (<tuple>target)[0]
            if (qos and tq) or type(session) is not session_class:
                return None
            sc = <SessionCore>session
            d = sc.delivery
            if d is None or type(d) is not conn_class or sc.queue:
                return None
            dc = <ConnState>d
            if dc.closed or (dc.version == 5 and (dc._aliases_out is not None
                                                  or (<tuple>target)[4] is not None)):
                return None
            conns.append(dc)
        return conns

    cdef bint _write_direct(self, list conns, const unsigned char* t, Py_ssize_t tlen,
                            const unsigned char* pp, Py_ssize_t plen) except -1:
        """Write a QoS 0 PUBLISH of ``t[:tlen]`` and ``pp[:plen]`` into each of ``conns``
        (``_direct_conns``) when every one is within its high-water mark and (5.0) its maximum
        packet size, as ``_fan_out_at`` would for each; False, nothing written, otherwise."""
        cdef Py_ssize_t k, n = PyList_GET_SIZE(conns), size5 = -1
        cdef ConnState dc
        cdef bytes enc4 = None, enc5 = None  # a fan-out's frames (as _fan_out_at makes them)
        for k in range(n):
            dc = <ConnState>PyList_GET_ITEM(conns, k)
            if PyByteArray_GET_SIZE(dc.out) > dc._high:
                return False
            if dc.version == 5 and dc._client_max_packet:
                if size5 < 0:
                    size5 = publish_frame_size(tlen, plen, 0, 5)
                if size5 > dc._client_max_packet:
                    return False
        for k in range(n):
            dc = <ConnState>PyList_GET_ITEM(conns, k)
            if n == 1:
                append_publish_frame(dc.out, t, tlen, pp, plen, 0, 0, 5 if dc.version == 5 else 4)
            elif dc.version == 5:
                if enc5 is None:
                    enc5 = publish_frame_bytes(t, tlen, pp, plen, 0, 0, 5)
                _append(dc.out, enc5)
            else:
                if enc4 is None:
                    enc4 = publish_frame_bytes(t, tlen, pp, plen, 0, 0, 4)
                _append(dc.out, enc4)
            dc._npk += 1
            if not dc._dirty:
                dc._dirty = True
                _mark(dc, dc)
        self.written_direct += n
        self.written_routes += 1
        return True

    cdef Py_ssize_t _write_block(self, list conns, const unsigned char* t, Py_ssize_t tlen,
                                 const unsigned char* p, const Py_ssize_t* pay, const Py_ssize_t* plen,
                                 Py_ssize_t m) except -1:
        """``_write_direct`` of ``m`` QoS 0 messages of one topic ``t[:tlen]`` (payloads
        ``p[pay[j]:pay[j] + plen[j]]``, each at most ``BLOCK_PAYLOAD``) in order, with one resize
        of each output: message ``j`` is written while every output is within its high-water mark
        with messages ``0..j-1`` in it and within its (5.0) maximum packet size, as ``_write_direct``
        checks each message. Returns the messages written (the first ``k``; 0: nothing written)."""
        cdef Py_ssize_t c, j, n = PyList_GET_SIZE(conns), k = m, size, old, fs
        cdef int version
        cdef ConnState dc
        cdef unsigned char* d
        # per version (4, 5): the frames' bytes (-1: not counted yet), and the output and offset
        # where they were first written (the other outputs of that version copy them from there;
        # read again at each copy, so an output met twice, resized between, is never read freed)
        cdef Py_ssize_t sizes[2]
        cdef Py_ssize_t src_at[2]
        cdef PyObject* src[2]
        sizes[0] = sizes[1] = -1
        src[0] = src[1] = NULL
        for c in range(n):
            dc = <ConnState>PyList_GET_ITEM(conns, c)
            version = 5 if dc.version == 5 else 4
            size = PyByteArray_GET_SIZE(dc.out)
            for j in range(k):
                if size > dc._high:
                    k = j
                    break
                fs = publish_frame_size(tlen, plen[j], 0, version)
                if version == 5 and dc._client_max_packet and fs > dc._client_max_packet:
                    k = j
                    break
                size += fs
        if k == 0:
            return 0
        for c in range(n):
            dc = <ConnState>PyList_GET_ITEM(conns, c)
            version = 5 if dc.version == 5 else 4
            if sizes[version - 4] < 0:
                size = 0
                for j in range(k):
                    size += publish_frame_size(tlen, plen[j], 0, version)
                sizes[version - 4] = size
            size = sizes[version - 4]
            old = PyByteArray_GET_SIZE(dc.out)
            out_resize(dc.out, old + size)
            d = <unsigned char*>PyByteArray_AS_STRING(dc.out) + old
            if src[version - 4] != NULL:
                # (a fan-out: the frames another output of this version got, in one copy)
                memcpy(d, <unsigned char*>PyByteArray_AS_STRING(<object>src[version - 4])
                       + src_at[version - 4], size)
            else:
                src[version - 4] = <PyObject*>dc.out
                src_at[version - 4] = old
                for j in range(k):
                    d += write_publish_frame(d, t, tlen, p + pay[j], plen[j], 0, 0, version)
            dc._npk += k
            if not dc._dirty:
                dc._dirty = True
                _mark(dc, dc)
        self.written_direct += n * k
        self.written_routes += k
        self.written_blocks += 1
        return k

    cdef int _queue_plain(self, session, QueueCore queue, d, message, bytes entry, Py_ssize_t size,
                          SentTable table) except -1:
        """What ``PersistentSession.deliver`` does with a plain QoS 1 delivery (``entry`` encoded,
        ``size`` as ``_enqueue`` counts it) that cannot be sent now, in C, for an attached open 3.x
        or 5.0 connection: ``_enqueue`` (within the session's bounds, no validity, storage not
        refusing: ``serve`` checked it) -> ``DiskQueue.append`` (``QueueCore.append_plain``: an
        online queue with room in its in-memory tail), then the pump that follows when the window
        has room (``_pump``). Returns 1 when done; 0, nothing done, for the Python path: an empty
        queue with room in the window or output over its mark (``Session.deliver`` asks
        ``is_congested``), a full queue (drop or eviction), anything ``append_plain`` declines."""
        cdef bint over
        cdef ConnState dc
        cdef SessionCore sc
        cdef dict inflight
        cdef Py_ssize_t quota
        if (d is None or type(d) is not self.conn_class or (<ConnState>d).closed
                or type(session) is not self.persistent_class):  # (the slot offsets are its)
            return 0
        dc = <ConnState>d
        sc = <SessionCore>session
        inflight = sc.inflight
        quota = sc.send_quota
        over = PyByteArray_GET_SIZE(dc.out) > dc._high
        if not queue.count and (over or len(inflight) < quota):
            return 0
        if queue.max_count < 0 or queue.count >= queue.max_count or queue.bytes + size > queue.max_bytes:
            return 0
        if _get(session, self._p_validity, "validity"):
            return 0
        if not queue.append_plain((message, 1, False, None), entry, table):
            return 0
        _set(session, self._p_bytes, "queue_bytes", queue.bytes)
        if queue.count > 1 and (len(inflight) < quota or queue.qos0 or _get(session, self._p_held, "held")):
            if not over or not d.is_congested():
                self._pump(session, inflight, table)
        return 1

    cdef int _queue_memory(self, session, SessionCore sc, d, message, sub_ids,
                           Py_ssize_t size) except -1:
        """What ``Session.deliver`` does with a QoS 1 delivery to a plain session (``size`` as
        ``_enqueue`` counts it) behind its full window, in C, for an attached open connection of the
        relay's class: ``_enqueue`` within the session's bounds (no validity) and no pump, which could
        send nothing (the window full, nothing held, no QoS 0 queued). Returns 1 when done; 0,
        nothing done, for the Python path: room in the window, an empty queue with the output over
        its mark (``Session.deliver`` asks ``is_congested``), a full queue (the overflow policy)."""
        cdef ConnState dc
        cdef Py_ssize_t n
        if d is None or type(d) is not self.conn_class or (<ConnState>d).closed:
            return 0
        dc = <ConnState>d
        if (len(sc.inflight) < sc.send_quota or _get(session, self._s_held, "held")
                or _get(session, self._s_validity, "validity")):
            return 0
        queue = sc.queue
        n = len(queue)
        if n:
            if _get(session, self._s_qos0, "queue_qos0"):
                return 0  # a QoS 0 head may go with the window full: Session.deliver pumps
        elif PyByteArray_GET_SIZE(dc.out) > dc._high:
            return 0
        limits = _get(session, self._s_limits, "_limits")
        if type(limits) is not self._limits_type:
            self._l_count = slot_offset(type(limits), "max_queued_messages")
            self._l_bytes = slot_offset(type(limits), "max_queued_bytes")
            self._limits_type = type(limits)
        queued = _get(session, self._s_bytes, "queue_bytes") + size
        if (n >= _get(limits, self._l_count, "max_queued_messages")
                or queued > _get(limits, self._l_bytes, "max_queued_bytes")):
            return 0
        if type(queue) is not deque:
            if n:
                return 0
            queue = sc.queue = deque()
        queue.append((message, 1, False, sub_ids))
        _set(session, self._s_bytes, "queue_bytes", queued)
        return 1

    cpdef Py_ssize_t serve(self, conn, list packets, Py_ssize_t start) except -1:
        """Handle ``packets[start:]`` while the fast path covers them; the index of the first left."""
        cdef Py_ssize_t i = start, count = len(packets)
        cdef Publish pub
        cdef int qos, version, pid
        cdef int max_qos = -1  # read on the first QoS 1 PUBLISH (a QoS 0 one is within any maximum)
        cdef bint have_queues = False
        cdef long long max_size
        cdef Py_ssize_t ack_at = 0, n, n_acked, size, j, k
        cdef bint sampled, staked
        # The broker's counters of this call, added to BrokerStats once at the end (nothing reads
        # them meanwhile: the call never switches greenlets).
        cdef long long recv_n[2]
        cdef long long recv_b[2]
        cdef long long sent_n[2]
        cdef long long sent_b[2]
        cdef long long recv_base[2]
        cdef str topic, last_topic = None
        cdef bint full
        cdef list fqs = None, last_fqs = None  # (typed: a list's truth is its length, not a call)
        cdef ConnState cs
        cdef BrokerCore bc
        cdef RouterCore router
        cdef RouteCore route, last_route
        cdef SubscriptionTrie trie
        cdef long long gen
        if not self.enabled or i >= count:
            return i
        if self._declined_list is not None and self._declined_list is not packets:
            self._declined_list = None  # (another read: the declined run is over, its list let go)
        if type(packets[i]) is Puback:
            return self._settle_acks(conn, packets, i, count)
        if not isinstance(conn, ConnState):
            return i
        cs = <ConnState>conn
        broker = cs.broker
        if not isinstance(broker, BrokerCore):
            return i
        bc = <BrokerCore>broker
        if bc._on_published is not None or bc._on_delivered is not None:
            return i
        # With peers (a cluster, or the other workers of this node): ``relay_routes`` maps a topic to
        # the ids of the peers with matching interest (None: ``Peers.forward`` must decide, e.g. a
        # peer holds a matching shared group), filled by ``relay_route(topic)``; the plain message
        # is appended to each such peer link's ``forward_queue`` (a ForwardQueue) in C.
        peers = bc.peers
        fwd_routes = None
        if peers is not None:
            fwd_routes = self._peer_routes(peers)
            if fwd_routes is None:
                return i
        origin = cs.session
        if origin is None or cs.closed:
            return i
        version = cs.version
        settings = cs.settings
        max_size = self._max_message_size(settings)
        policy = cs._policy
        allowed = None
        if policy is not None:
            allowed = policy.fast
            if allowed is None:
                return i
        # The queues are read when first needed (for a "$" topic): a lone message does not.
        queue_append = None
        client_id = cs.client_id
        if broker is not self._broker:
            self._adopt(broker)
        store = self._store
        cdef SentTable table = self._table
        cdef QosCounts received = self._received
        router = self._router
        cdef dict routes = self._routes  # (typed: its get is C's look-up, not a method call)
        trie = self._trie
        staked = False
        cdef long long table_ops_before = 0
        last_route = None
        recv_n[0] = recv_n[1] = recv_b[0] = recv_b[1] = 0
        sent_n[0] = sent_n[1] = sent_b[0] = sent_b[1] = 0
        recv_base[0] = received.v[0]
        recv_base[1] = received.v[1]
        try:
            while i < count:
                p = packets[i]
                if type(p) is not Publish:
                    break
                pub = <Publish>p
                qos = pub.qos
                if qos > 1 or pub.retain or pub.properties:
                    break
                if qos:
                    if max_qos < 0:
                        max_qos = settings.max_qos
                    if qos > max_qos:
                        break
                topic = pub.topic
                if PyUnicode_GET_LENGTH(topic) == 0:
                    break
                payload = pub.payload
                size = len(payload)
                if size > max_size:
                    break
                if PyUnicode_READ_CHAR(topic, 0) == 36:  # "$": only a durable queue's append is served here
                    if not have_queues:
                        # A durable queue's common append (``QueueManager.append_relayed``: a run of
                        # payloads to one topic, of which it appends the first n, or declines before
                        # any effect with 0); None until the node made its queues (the Python path
                        # makes them).
                        have_queues = True
                        queues = bc.queues
                        queue_append = queues.append_relayed if queues is not None else None
                    if queue_append is None or qos != 1 or not topic.startswith("$queue/"):
                        break
                    if allowed is not None and _refused(allowed, topic):
                        break
                    if packets is self._declined_list and i < self._declined_end and topic == self._declined_topic:
                        break  # within a run declined already (see _declined_list)
                    # The run of such PUBLISHes to this topic in this read: appended in one call.
                    payloads = [payload]
                    j = i + 1
                    while j < count:
                        p = packets[j]
                        if type(p) is not Publish:
                            break
                        pub = <Publish>p
                        if (pub.qos != 1 or pub.retain or pub.properties or pub.topic != topic
                                or len(pub.payload) > max_size):
                            break
                        payloads.append(pub.payload)
                        j += 1
                    taken = queue_append(topic, payloads, client_id)  # appends the first n (0: declined)
                    if type(taken) is tuple:
                        # a replicated log's (n, held): the PUBACKs wait for the Raft commit,
                        # written (or refused) by the connection once ``held`` is resolved
                        n = taken[0]
                        pids = []
                        for k in range(n):
                            pub = <Publish>packets[i + k]
                            recv_b[1] += len(pub.payload)
                            pids.append(pub.packet_id)
                        conn.hold_acks(taken[1], pids, topic)
                    else:
                        n = taken
                        if n <= 0:
                            # declined before any effect: the Python path serves (or refuses) it,
                            # and the rest of its run in this read (declined at once: _declined_list)
                            self._declined_list = packets
                            self._declined_end = j
                            self._declined_topic = topic
                            break
                        # -- Broker.publish's counts; the PUBACKs (nothing was written to this client meanwhile) --
                        out = cs.out
                        for k in range(n):
                            pub = <Publish>packets[i + k]
                            recv_b[1] += len(pub.payload)
                            pid = pub.packet_id
                            out += bytes((0x40, 2, pid >> 8, pid & 0xFF))
                        cs._npk += n
                        if not cs._dirty:
                            cs._dirty = True
                            _mark(cs, conn)
                    recv_n[1] += n
                    self.served += n
                    i += n
                    if cs.closed or n < len(payloads):
                        break
                    continue
                if last_topic is not None and topic == last_topic:
                    route = last_route  # a run of one topic (subscriptions cannot change within this call)
                    fqs = last_fqs
                else:
                    if allowed is not None and _refused(allowed, topic):
                        break
                    route = None
                    gen = <long long>trie.generation
                    if gen == router._generation:
                        # this publisher's last route, while the router's cache would still give it
                        if (cs._relay_gen == gen and cs._relay_epoch == router._epoch
                                and cs._relay_route is not None
                                and (topic is cs._relay_topic or topic == cs._relay_topic)):
                            route = <RouteCore>cs._relay_route
                        else:
                            route = routes.get(topic)
                    if route is None:
                        route = router.route(topic)
                    cs._relay_topic = topic
                    cs._relay_route = route
                    cs._relay_gen = router._generation
                    cs._relay_epoch = router._epoch
                    if route.groups:
                        break
                    fqs = None
                    if peers is not None:
                        got = self._peer_queues(peers, fwd_routes, topic)
                        if got is _MISS:
                            break  # Peers.forward decides (shared groups on a peer)
                        fqs = <list>got
                    last_topic = topic
                    last_route = route
                    last_fqs = fqs
                if fqs:
                    # every peer link it goes to must take it (else the Python path counts the drop)
                    full = False
                    for fq in <list>fqs:
                        if (<ForwardQueue>fq).full():
                            full = True
                            break
                    if full:
                        break
                ops_before = None
                if store is not None and qos:
                    if store.refusing:
                        break
                    if table is not None:  # (op_count = direct_ops + table.ops: no property frame)
                        ops_before = store.direct_ops
                        table_ops_before = table.ops
                    else:
                        ops_before = store.op_count
                # -- Broker.publish --
                recv_n[qos] += 1
                recv_b[qos] += size
                sampled = not ((recv_base[qos] + recv_n[qos]) & self.sample_mask)
                started = monotonic_s() if sampled else 0.0
                if qos:
                    out = cs.out
                    ack_at = PyByteArray_GET_SIZE(out)
                targets = route.targets
                if targets:
                    n = self._fan_out(targets, topic, payload, qos, origin, client_id, True, &n_acked)
                else:
                    n = n_acked = 0  # no local subscriber (a message only forwarded): no fan-out call
                if fqs:
                    # -- Peers.forward: queued once per peer with matching interest --
                    for fq in <list>fqs:
                        (<ForwardQueue>fq).append_plain(topic, client_id, qos, payload)
                sent_n[0] += n - n_acked
                sent_b[0] += (n - n_acked) * size
                sent_n[1] += n_acked
                sent_b[1] += n_acked * size
                if ops_before is not None and (
                    (store.direct_ops != ops_before or table.ops != table_ops_before) if table is not None
                    else store.op_count != ops_before
                ):
                    staked = True  # the PUBACK acknowledges what this publish stored (noted at the end)
                if sampled:
                    _observe_later(cs, broker, self._stats, started)
                self.served += 1
                i += 1
                if qos:
                    # -- the PUBACK, ahead of what routing wrote to this client's own output --
                    pid = pub.packet_id
                    if n == 0 and version == 5 and not fqs:
                        # no matching subscribers, here or on a peer it was forwarded to
                        ack = conn._ack5_bytes(self.puback_class, pid, 0x10)
                    else:
                        ack = bytes((0x40, 2, pid >> 8, pid & 0xFF))
                    if ack_at >= PyByteArray_GET_SIZE(out) or cs.closed:
                        out += ack
                    else:
                        out[ack_at:ack_at] = ack
                    cs._npk += 1
                    if not cs._dirty:
                        cs._dirty = True
                        _mark(cs, conn)
                if cs.closed:
                    break
        finally:
            if staked:
                store.note_stake(client_id)  # once per call: nothing commits within it
            if recv_n[0] or recv_n[1]:
                received.v[0] += recv_n[0]
                received.v[1] += recv_n[1]
                self._received_bytes.v[0] += recv_b[0]
                self._received_bytes.v[1] += recv_b[1]
            if sent_n[0] or sent_n[1]:
                self._count_sent(sent_n, sent_b)
        return i

    cdef object _peer_links(self, peers):
        """``peers.relay_links`` (node id -> link), read once per peers object: it is its transport's
        dict of links, changed in place (read per read it was a Python property call, ~700
        instructions per forwarded read)."""
        if peers is not self._links_peers:
            self._links = peers.relay_links
            version = getattr(peers, "relay_links_version", None)
            self._links_version = version if type(version) is LinksVersion else None
            self._fq_nodes = None
            self._fq_list = None
            self._links_peers = peers
        return self._links

    cdef inline object _peer_routes(self, peers):
        """``peers.relay_routes`` (topic -> the peers' ids; None: a peers object the relay does not
        know), read once per peers object: it is emptied in place on every interest change, never
        replaced (read per read it was a ``getattr`` with a default, ~180 instructions a read)."""
        if peers is not self._routes_peers:
            self._fwd_routes = getattr(peers, "relay_routes", None)
            self._routes_peers = peers
        return self._fwd_routes

    cdef inline object _peer_queues(self, peers, fwd_routes, str topic):
        """The ``ForwardQueue`` of each linked peer with interest in ``topic`` (None: no peer has
        any); ``_MISS``: the Python path decides (``Peers.forward``: a peer holds a matching shared
        group, or a link queues otherwise). ``fwd_routes`` is ``_peer_routes(peers)``: a hit is C's
        dict look-up, a miss asks ``peers.relay_route`` (which fills it). The links are read only
        here: a topic with no peer's interest does not need them (they cannot change within a
        call). Both hot paths (``serve``, ``_forward_buf``) ask here once per topic."""
        if type(fwd_routes) is dict:
            nodes = (<dict>fwd_routes).get(topic, _MISS)
        else:
            nodes = fwd_routes.get(topic, _MISS)
        if nodes is _MISS:
            nodes = peers.relay_route(topic)
        if nodes is None:
            return _MISS
        if not nodes:
            return None
        fqs = self._queues(<tuple>nodes, self._peer_links(peers))
        return _MISS if fqs is None else fqs

    cdef inline object _queues(self, tuple nodes, links):
        """``_link_queues(nodes, links)``, kept for the next read whose route goes to the same
        peers while the links' version (``_peer_links``, the peers object's) has not moved: a
        fan-in read carries a few PUBLISHes, and the list made per read (~650 instructions) was a
        large share of each. Called after ``_peer_links`` for the same peers."""
        cdef LinksVersion version = self._links_version
        if version is None:
            return _link_queues(nodes, links)
        if (self._fq_nodes is not None and self._fq_version == version.value
                and _same_nodes(nodes, self._fq_nodes)):
            self.queues_reused += 1
            return self._fq_list
        fqs = _link_queues(nodes, links)
        if fqs is None:
            self._fq_nodes = None
            return None
        self._fq_nodes = nodes
        self._fq_list = <list>fqs
        self._fq_version = version.value
        return fqs

    cpdef Py_ssize_t forward_raw(self, conn, bytes data) except -1:
        """``_forward_buf`` on the bytes of ``data`` (the reader greenlet's reads, tests)."""
        return self._forward_buf(conn, <const unsigned char*>PyBytes_AS_STRING(data),
                                 PyBytes_GET_SIZE(data))

    @cython.final
    cdef inline int _raw_ready(self, list targets, origin, Py_ssize_t len5) except -1:
        """1 when every delivery of a QoS 0 message to ``targets`` (a route's, published by the
        session ``origin``; ``len5``: its 5.0 frame's size, for a client's maximum packet size) is one ``_fan_out``
        writes straight into the subscriber's output, as ``_raw_deliver`` then does; 0 (nothing
        done) when one is not: the decoder and ``serve`` take the message."""
        # (the targets, their tuples, sessions, queues and connections read as borrowed pointers:
        # nothing here runs Python code, but the durable session's store and queue type checks)
        cdef PyObject* target
        cdef PyObject* session
        cdef PyObject* found
        cdef Py_ssize_t limit, k
        cdef void* conn_class = <void*>self.conn_class
        cdef void* session_class = <void*>self.session_class
        for k in range(PyList_GET_SIZE(targets)):
            target = _list_item(targets, k)
            session = _tuple_item(target, 0)
            if session == <PyObject*>origin and <int><object>_tuple_item(target, 2) < 0:
                continue  # No Local [MQTT-3.8.3-3]: not delivered
            # (both classes are SessionCore subclasses: checked in __init__)
            if _type_of(session) == session_class:
                found = <PyObject*>(<SessionCore>session).queue
                if found != <PyObject*>_NO_QUEUE and <object>found:  # (() until the first waiting delivery: no call)
                    return 0
            elif (self._table is not None and self.persistent_class is not None
                  and _type_of(session) == <void*>self.persistent_class
                  and (<object>session).store is self._store):
                queue = (<SessionCore>session).queue
                if not isinstance(queue, QueueCore) or (<QueueCore>queue).count:
                    return 0
            else:
                return 0
            found = <PyObject*>(<SessionCore>session).delivery
            if _type_of(found) != conn_class:  # (None is not)
                return 0
            if (<ConnState>found).closed or PyByteArray_GET_SIZE((<ConnState>found).out) > (<ConnState>found)._high:
                return 0
            if (<ConnState>found).version == 5:
                if (<ConnState>found)._aliases_out is not None or _tuple_item(target, 4) != <PyObject*>None:
                    return 0
                limit = (<ConnState>found)._client_max_packet
                if limit and len5 > limit:
                    return 0  # dropped for this client: the Python path counts it
        return 1

    @cython.final
    cdef inline Py_ssize_t _raw_deliver(self, list targets, origin, const unsigned char* t, Py_ssize_t tlen,
                                        const unsigned char* payload, Py_ssize_t plen) except -1:
        """``_fan_out`` of a QoS 0 message to ``targets`` that ``_raw_ready`` accepted: each
        subscriber's frame written into its output from the read's bytes; returns the deliveries.
        (The route's targets, its tuples and sessions read as borrowed pointers: nothing here runs
        Python code that could change the route while the loop reads it, but a flusher that is not
        a ``FlushState``, whose ``mark`` is called after the loop's reads of that target.)"""
        cdef ConnState dc
        cdef Py_ssize_t n = 0, k
        cdef PyObject* target
        cdef PyObject* session
        for k in range(PyList_GET_SIZE(targets)):
            target = _list_item(targets, k)
            session = _tuple_item(target, 0)
            if session == <PyObject*>origin and <int><object>_tuple_item(target, 2) < 0:
                continue
            dc = <ConnState>(<SessionCore>session).delivery
            append_publish_frame(dc.out, t, tlen, payload, plen, 0, 0, 5 if dc.version == 5 else 4)
            dc._npk += 1
            if not dc._dirty:
                dc._dirty = True
                _mark(dc, dc)
            n += 1
        return n

    cdef Py_ssize_t _forward_buf(self, conn, const unsigned char* p, Py_ssize_t size) except -1:
        """The common QoS 0 (and forward-only QoS 1) PUBLISHes at the start of a read, straight from
        its bytes: what ``Decoder.feed`` and ``serve`` do for them, without a ``Publish``, its topic
        ``str`` (one per run of one topic, or the decoder's last one) or its payload ``bytes``. A
        local subscriber's frame is written into its output from the read buffer
        (``publish_frame.append_publish_frame``: the same bytes as ``encode_publish``), a peer's
        framed for its queue (``ForwardQueue.append_raw``). Returns the bytes consumed (0: none),
        the PUBLISHes among them in ``raw_packets``; the caller decodes and serves the rest.

        Covered: a connected, open connection whose decoder holds no partial packet (or one this
        read completes), on a broker without message observers; packets whose first byte is 0x30
        (QoS 0, no DUP, not retained) or, from a 3.x client within ``max_qos`` 1 with the storage
        not refusing writes, 0x32 or 0x3A (QoS 1, not retained; its PUBACK written as ``serve``
        writes it) when nothing local subscribes, complete in ``data``, within the decoder's maximum
        packet size and ``max_message_size``, with a non-empty topic name the decoder accepts
        (ASCII without wildcards or NUL here, or the decoder's last topic) that does not start with
        "$", 5.0 without properties, allowed by the client's policy, whose route has no shared group,
        whose local targets all take the message straight into their output (``_raw_ready``: what
        ``_fan_out`` writes itself) and whose peers' queues (if any) have room. Anything else stops
        the run before any effect of that packet, and the decoder and ``serve`` take it from there
        (and reject it when it is malformed, with the decoder's reason code)."""
        cdef Py_ssize_t pos = 0, length, body, total, tlen, hdr, plen, n
        cdef const unsigned char* data = p  # the read (p moves to a copy of a pending packet's bytes)
        cdef Py_ssize_t data_size = size
        cdef Py_ssize_t npk = 0, k, last_tlen = 0, olen
        cdef const char* origin
        cdef const unsigned char* t
        cdef const unsigned char* last_t = NULL
        cdef unsigned int byte
        cdef unsigned char high
        cdef int shift, version
        cdef long long max_size, max_packet
        cdef long long recv_n[2]
        cdef long long recv_b[2]
        cdef long long recv_base[2]
        cdef long long sent_n[2]
        cdef long long sent_b[2]
        cdef int qos, pid
        cdef int qos1_ok = -1  # QoS 1 taken here: -1 until the first QoS 1 PUBLISH (then read)
        cdef QosCounts received, received_bytes
        cdef Py_ssize_t at
        cdef char* w
        cdef bytearray out = None
        cdef bint sampled, full, ready
        cdef list fqs = None
        cdef ForwardQueue fq1 = None  # fqs's one queue (the common case: one peer wants the topic)
        cdef list targets = None
        cdef ConnState cs
        cdef BrokerCore bc
        cdef Decoder decoder
        cdef RouterCore router
        cdef RouteCore route
        cdef SubscriptionTrie trie
        cdef long long gen
        cdef str topic
        cdef bytes raw_topic
        cdef Py_ssize_t have, need = 0, j, phase = 1
        cdef const unsigned char* q
        cdef bytearray pending
        cdef bytes joined = None
        self.raw_packets = 0
        if not self.enabled or size < 1 or not isinstance(conn, ConnState):
            return 0
        cs = <ConnState>conn
        if not isinstance(cs.broker, BrokerCore):
            return 0
        bc = <BrokerCore>cs.broker
        if bc._on_published is not None or bc._on_delivered is not None:
            return 0
        session = cs.session
        if session is None or cs.closed:
            return 0
        if type(cs.decoder) is not Decoder:
            return 0
        decoder = <Decoder>cs.decoder
        version = decoder.version
        if decoder._failed or version == 0:
            return 0
        pending = decoder._pending
        have = PyByteArray_GET_SIZE(pending)
        if have:
            # The decoder holds the start of a packet (a read ended inside it): when ``data``
            # completes it, that packet is taken from a copy of its bytes (if it is covered; else
            # the decoder takes the whole read), then the rest of the read from ``data``.
            q = <const unsigned char*>PyByteArray_AS_STRING(pending)
            if q[0] != 0x30 and q[0] != 0x32 and q[0] != 0x3A:
                return 0
            length = 0
            shift = 0
            j = 1
            while True:
                if j >= have + size or shift == 28:
                    return 0
                byte = q[j] if j < have else p[j - have]
                j += 1
                length |= (<Py_ssize_t>(byte & 0x7F)) << shift
                if not (byte & 0x80):
                    break
                shift += 7
            need = j + length - have  # the bytes of ``data`` that complete it
            if need <= 0 or need > size:
                return 0
            joined = PyBytes_FromStringAndSize(NULL, have + need)
            memcpy(PyBytes_AS_STRING(joined), q, have)
            memcpy(PyBytes_AS_STRING(joined) + have, p, need)
            phase = 0
        elif p[0] != 0x30 and p[0] != 0x32 and p[0] != 0x3A:
            return 0
        # (the peers' tables are read in the loop, once a topic's local targets took its message)
        peers = bc.peers
        fwd_routes = None
        max_packet = decoder.max_packet_size
        settings = cs.settings
        max_size = self._max_message_size(settings)
        allowed = None
        if cs._policy is not None:
            allowed = cs._policy.fast
            if allowed is None:
                return 0
        origin = NULL  # the publisher's client id as the items' origin (none when empty)
        olen = 0
        if peers is not None and cs.client_id:
            origin = PyUnicode_AsUTF8AndSize(cs.client_id, &olen)
        if bc is not self._broker:
            self._adopt(bc)
        received = self._received
        router = self._router
        trie = self._trie
        recv_n[0] = recv_n[1] = recv_b[0] = recv_b[1] = 0
        sent_n[0] = sent_n[1] = sent_b[0] = sent_b[1] = 0
        recv_base[0] = received.v[0]
        recv_base[1] = received.v[1]
        if phase == 0:
            p = <const unsigned char*>PyBytes_AS_STRING(joined)
            size = PyBytes_GET_SIZE(joined)
        try:
            while True:
                while size - pos >= 2:
                    byte = p[pos]
                    if byte == 0x30:
                        qos = 0
                    elif byte == 0x32 or byte == 0x3A:
                        if qos1_ok < 0:
                            # a 3.x client (a 5.0 PUBACK with no local subscriber carries a reason
                            # code: serve's), within its max_qos, the storage not refusing writes
                            store = self._store
                            qos1_ok = version != 5 and settings.max_qos >= 1 and (
                                store is None or not store.refusing)
                        if not qos1_ok:
                            break
                        qos = 1
                    else:
                        break
                    # -- Decoder._parse: the Remaining Length (a 5th byte or a partial packet: the decoder's) --
                    length = 0
                    shift = 0
                    k = pos + 1
                    while k < size and shift < 28:
                        byte = p[k]
                        k += 1
                        length |= (<Py_ssize_t>(byte & 0x7F)) << shift
                        if not (byte & 0x80):
                            break
                        shift += 7
                    else:
                        break
                    body = k
                    total = body - pos + length
                    if max_packet > 0 and total > max_packet:
                        break
                    if size - body < length or length < 2:
                        break
                    # -- _decode_publish: topic, (QoS 1) packet id, (5.0) an empty property length, payload --
                    tlen = (p[body] << 8) | p[body + 1]
                    hdr = 2 + tlen
                    if tlen == 0 or hdr > length:
                        break
                    pid = 0
                    if qos:
                        if hdr + 2 > length:
                            break
                        pid = (p[body + hdr] << 8) | p[body + hdr + 1]
                        if pid == 0:
                            break  # the decoder's protocol error
                        hdr += 2
                    if version == 5:
                        if hdr >= length or p[body + hdr] != 0:
                            break  # properties (or truncated): the decoder and serve decide
                        hdr += 1
                    plen = length - hdr
                    if plen > max_size:
                        break
                    t = p + body + 2
                    ready = False  # (this packet's local targets take it raw: checked with its route)
                    if last_t == NULL or tlen != last_tlen or memcmp(t, last_t, tlen) != 0:
                        if t[0] == 36:
                            break  # "$": serve's (a durable queue) or the Python path's
                        if (self._local_topic is not None and PyBytes_GET_SIZE(self._local_topic) == tlen
                                and memcmp(t, PyBytes_AS_STRING(self._local_topic), tlen) == 0
                                and trie.generation == self._local_generation):
                            break  # the topic with shared groups again: serve's
                        if (decoder._topic_raw is not None and PyBytes_GET_SIZE(decoder._topic_raw) == tlen
                                and memcmp(t, PyBytes_AS_STRING(decoder._topic_raw), tlen) == 0):
                            topic = decoder._topic  # the decoder's last topic: checked and decoded then
                        else:
                            # a new topic: valid, ASCII (other UTF-8 is checked by the decoder)
                            if memchr(t, 0x2B, tlen) != NULL or memchr(t, 0x23, tlen) != NULL \
                                    or memchr(t, 0, tlen) != NULL:
                                break
                            high = 0
                            for k in range(tlen):
                                high |= t[k]
                            if high >= 0x80:
                                break
                            topic = PyUnicode_DecodeUTF8(<const char*>t, tlen, NULL)
                            # (the decoder's cache of its last topic, as _decode_publish sets it)
                            decoder._topic = topic
                            decoder._topic_raw = PyBytes_FromStringAndSize(<const char*>t, tlen)
                        if allowed is not None and _refused(allowed, topic):
                            break
                        # -- serve's route look-up (this publisher's last route, or the router's cache) --
                        gen = <long long>trie.generation
                        if (gen == router._generation and cs._relay_gen == gen
                                and cs._relay_epoch == router._epoch and cs._relay_route is not None
                                and (topic is cs._relay_topic or topic == cs._relay_topic)):
                            # this publisher's last route, still valid: kept as it is (no field
                            # written, no reference counted)
                            route = <RouteCore>cs._relay_route
                        else:
                            route = None
                            if gen == router._generation:
                                route = self._routes.get(topic)  # (typed: C's look-up)
                            if route is None:
                                route = router.route(topic)
                            cs._relay_topic = topic
                            cs._relay_route = route
                            cs._relay_gen = router._generation
                            cs._relay_epoch = router._epoch
                        if route.groups:
                            # shared groups: serve (it needs the Publish)
                            self._local_topic = PyBytes_FromStringAndSize(<const char*>t, tlen)
                            self._local_generation = trie.generation
                            break
                        targets = route.targets
                        if targets:
                            # local targets that cannot take it raw: serve's, decided before the
                            # peers' tables (a publisher's read that stops here pays no more)
                            if qos:
                                break  # QoS 1 with a local subscriber: serve's (its PUBACK goes first)
                            if not self._raw_ready(targets, session, publish_frame_size(tlen, plen, 0, 5)):
                                break
                            ready = True
                        if fqs is not None:
                            fqs = None
                            fq1 = None
                        if peers is not None:
                            if fwd_routes is None:
                                fwd_routes = self._peer_routes(peers)
                                if fwd_routes is None:
                                    break  # (a peers object the relay does not know: its forward decides)
                            got = self._peer_queues(peers, fwd_routes, topic)
                            if got is _MISS:
                                break  # Peers.forward decides (shared groups on a peer)
                            fqs = <list>got
                            if fqs is not None:
                                if PyList_GET_SIZE(fqs) == 1:
                                    # (typed once per topic: per message no list iteration and
                                    # no reference counting of the list and its queue)
                                    fq1 = <ForwardQueue>fqs[0]
                        last_t = t
                        last_tlen = tlen
                    if targets and not ready:
                        if qos:
                            break  # QoS 1 with a local subscriber: serve's (its PUBACK goes first)
                        # (a later message of the run: its targets' outputs may have filled meanwhile)
                        if not self._raw_ready(targets, session, publish_frame_size(tlen, plen, 0, 5)):
                            break
                    if fq1 is not None:
                        if fq1.full():
                            break
                    elif fqs:
                        full = False
                        for fq in fqs:
                            if (<ForwardQueue>fq).full():
                                full = True
                                break
                        if full:
                            break
                    # -- Broker.publish: counted, sampled, written to each subscriber, queued per peer --
                    recv_n[qos] += 1
                    recv_b[qos] += plen
                    sampled = not ((recv_base[qos] + recv_n[qos]) & self.sample_mask)
                    started = monotonic_s() if sampled else 0.0
                    if targets:
                        n = self._raw_deliver(targets, session, t, tlen, p + body + hdr, plen)
                        sent_n[0] += n
                        sent_b[0] += n * plen
                    if fq1 is not None:
                        fq1.append_raw(<const char*>t, tlen, origin, olen, qos, <const char*>p + body + hdr,
                                       plen)
                    elif fqs:
                        for fq in fqs:
                            (<ForwardQueue>fq).append_raw(<const char*>t, tlen, origin, olen, qos,
                                                          <const char*>p + body + hdr, plen)
                    if sampled:
                        _observe_later(cs, bc, self._stats, started)
                    if qos:
                        # -- serve's PUBACK (nothing was routed to this client's own output) --
                        if out is None:
                            out = cs.out
                        at = PyByteArray_GET_SIZE(out)
                        PyByteArray_Resize(out, at + 4)
                        w = PyByteArray_AS_STRING(out) + at
                        w[0] = 0x40
                        w[1] = 2
                        w[2] = <char>(pid >> 8)
                        w[3] = <char>(pid & 0xFF)
                        cs._npk += 1
                    npk += 1
                    pos = body + length
                if phase == 1:
                    break
                if pos < size:
                    return 0  # the pending packet is not covered: the decoder takes the whole read
                PyByteArray_Resize(pending, 0)  # (taken: the decoder starts at the next packet)
                phase = 1
                p = data
                size = data_size
                pos = need
        finally:
            if recv_n[0] or recv_n[1]:
                received_bytes = self._received_bytes
                received.v[0] += recv_n[0]
                received.v[1] += recv_n[1]
                received_bytes.v[0] += recv_b[0]
                received_bytes.v[1] += recv_b[1]
                self.served += recv_n[0] + recv_n[1]
                self.raw_served += recv_n[0] + recv_n[1]
                if peers is not None:
                    self.raw_forwarded += recv_n[0] + recv_n[1]
            if sent_n[0]:
                self._count_sent(sent_n, sent_b)
            self.raw_packets = npk
            if recv_n[1] and not cs._dirty:
                cs._dirty = True
                _mark(cs, conn)  # the PUBACKs
        return pos

    cpdef tuple deliver_items(self, broker, bytes data, Py_ssize_t start):
        """What ``Broker.publish_from_peer`` does for each plain item (``fluxmq._core.forward``) of
        a peer's ``Batch.items`` from byte ``start``, through the same fan-out as ``serve``; stops at
        the first item that is not plain (the Python path decodes and delivers it) and returns
        (its offset, items delivered here). Declines everything, before any effect, while the
        broker has delivery observers or when the fast path is off. An item whose delivery raises
        raises ``ForwardedItemFailed`` (its offsets, the items delivered before it), so the caller
        skips only that item.

        A batch holds the runs of many publishers (a fan-in's topics, each met again in the next
        batches): each topic's ``str`` and route are kept in a small table keyed by the topic's
        bytes (``TOPICS`` slots, emptied when the trie's generation or the router's epoch moves),
        so a topic met again costs a hash and a ``memcmp``, not a decode and a dict look-up; an item's
        origin is checked when it changes but decoded only for a target that needs it (a message
        object or a stored entry, in ``_fan_out_at``). While the run's targets all take the plain
        write, its QoS 0 items with the same topic and origin bytes (one publisher's, as a batch
        holds them) are written up to ``BLOCK`` at a time (``_write_block``); the items a block
        leaves (an output over its mark, a message over a maximum) are taken again one by one, per
        target, as after a ``_write_direct`` that declined."""
        cdef Py_ssize_t i = start, end = PyBytes_GET_SIZE(data), nxt = start, n, n_acked, done = 0
        cdef Py_ssize_t f[7]
        cdef Py_ssize_t g[7]
        # a block of the run's QoS 0 items for _write_block: payload offsets, lengths, item ends
        cdef Py_ssize_t b_pay[BLOCK]
        cdef Py_ssize_t b_len[BLOCK]
        cdef Py_ssize_t b_end[BLOCK]
        cdef Py_ssize_t m, k, j, e
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef int qos
        cdef long long sent_n[2]
        cdef long long sent_b[2]
        cdef str topic = None, origin_id = None
        cdef bint origin_known = True  # origin_id is the decoded origin of the last item's
        cdef Py_ssize_t last_t = -1, last_tlen = 0, last_o = -1, last_olen = -1
        cdef RouteCore route
        cdef list targets = None  # the route's, for a run of one topic
        # the run's targets' connections when every one takes a plain write (_direct_conns) a
        # message of QoS conns_qos (-1: not looked at in this run); run_off: not for the rest of
        # the run (an output went over its mark: it stays so within this call)
        cdef list conns = None
        cdef int conns_qos = -1
        cdef bint run_off = False
        cdef list tc_key
        cdef bytes key
        cdef Py_ssize_t slot
        cdef RouterCore router
        cdef SubscriptionTrie trie
        cdef dict routes
        if not self.enabled or i >= end or broker._on_delivered is not None:
            return (i, 0)
        if broker is not self._broker:
            self._adopt(broker)
        store = self._store
        router = self._router
        routes = self._routes  # (typed: its get is C's look-up, not a method call)
        trie = self._trie
        sent_n[0] = sent_n[1] = sent_b[0] = sent_b[1] = 0
        try:
            while i < end:
                nxt = plain_item(p, i, end, f)
                if nxt < 0:
                    break
                qos = <int>f[0]
                if qos and store is not None and store.refusing:
                    break  # publish_from_peer decides (drops what it would store)
                # a run of one publisher's messages: the same topic and origin bytes as the last item
                if last_t < 0 or f[2] != last_tlen or memcmp(p + f[1], p + last_t, f[2]) != 0:
                    slot = _topic_slot(p + f[1], f[2])
                    tc_key = self._tc_key
                    if (tc_key is None or <long long>trie.generation != self._tc_gen
                            or router._epoch != self._tc_epoch):
                        tc_key = self._tc_key = [None] * TOPICS
                        self._tc_topic = [None] * TOPICS
                        self._tc_route = [None] * TOPICS
                        self._tc_gen = <long long>trie.generation
                        self._tc_epoch = router._epoch
                    key = <bytes>PyList_GET_ITEM(tc_key, slot)
                    if (key is not None and PyBytes_GET_SIZE(key) == f[2]
                            and memcmp(PyBytes_AS_STRING(key), p + f[1], f[2]) == 0):
                        topic = <str>PyList_GET_ITEM(self._tc_topic, slot)
                        route = <RouteCore>PyList_GET_ITEM(self._tc_route, slot)
                        self.topics_reused += 1
                    else:
                        try:
                            topic = PyUnicode_DecodeUTF8(<const char*>p + f[1], f[2], NULL)
                        except UnicodeDecodeError:
                            break  # damaged: the Python path reports it
                        if memchr(p + f[1], 0, f[2]) != NULL:
                            # (the frame is written from these bytes: what encode_publish refuses)
                            raise ValueError("U+0000 in a forwarded topic (MQTT-1.5.4-2)")
                        route = None
                        if trie.generation == router._generation:
                            route = routes.get(topic)
                        if route is None:
                            route = router.route(topic)
                        if <long long>trie.generation == self._tc_gen and router._epoch == self._tc_epoch:
                            tc_key[slot] = PyBytes_FromStringAndSize(<const char*>p + f[1], f[2])
                            self._tc_topic[slot] = topic
                            self._tc_route[slot] = route
                    targets = route.targets
                    conns_qos = -1
                    run_off = False
                    last_t = f[1]
                    last_tlen = f[2]
                if f[4] != last_olen or (f[4] > 0 and memcmp(p + f[3], p + last_o, f[4]) != 0):
                    # checked now (a damaged origin stops here), decoded when a target needs it
                    origin_known = f[4] < 0
                    origin_id = None
                    if f[4] > 0 and not _ascii(p + f[3], f[4]):
                        try:
                            origin_id = PyUnicode_DecodeUTF8(<const char*>p + f[3], f[4], NULL)
                        except UnicodeDecodeError:
                            break
                        origin_known = True
                    last_o = f[3]
                    last_olen = f[4]
                if conns_qos != qos and not run_off:
                    conns = self._direct_conns(targets, qos)  # (reads the targets' state now)
                    conns_qos = qos
                if conns is not None and qos == 0 and f[6] <= BLOCK_PAYLOAD:
                    # this item and the next ones of the run (QoS 0, the same topic and origin
                    # bytes), written at once
                    b_pay[0] = f[5]
                    b_len[0] = f[6]
                    b_end[0] = nxt
                    m = 1
                    while m < BLOCK:
                        e = plain_item(p, b_end[m - 1], end, g)
                        # (an item's origin follows its topic: one memcmp compares both)
                        if (e < 0 or g[0] != 0 or g[6] > BLOCK_PAYLOAD or g[2] != f[2] or g[4] != f[4]
                                or memcmp(p + g[1], p + f[1], f[2] + (f[4] if f[4] > 0 else 0)) != 0):
                            break
                        b_pay[m] = g[5]
                        b_len[m] = g[6]
                        b_end[m] = e
                        m += 1
                    k = self._write_block(conns, p + f[1], f[2], p, b_pay, b_len, m)
                    if k:
                        n = PyList_GET_SIZE(conns)
                        for j in range(k):
                            sent_b[0] += n * b_len[j]
                        sent_n[0] += n * k
                        done += k
                        i = b_end[k - 1]
                        if k < m:  # an output over its mark, a message over a maximum: as below
                            conns = None
                            run_off = True
                        continue
                    conns = None
                    run_off = True
                if conns is not None and self._write_direct(conns, p + f[1], f[2], p + f[5], f[6]):
                    n = PyList_GET_SIZE(conns)
                    n_acked = 0
                else:
                    # per target, written from the batch's bytes where it can be (no payload bytes
                    # unless a target needs them)
                    if conns is not None:
                        conns = None
                        run_off = True
                    if not origin_known:
                        origin_id = PyUnicode_DecodeUTF8(<const char*>p + f[3], f[4], NULL)
                        origin_known = True
                    n = self._fan_out_at(targets, topic, None, p + f[1], f[2], p + f[5], f[6], qos,
                                         None, origin_id, False, &n_acked)
                sent_n[0] += n - n_acked
                sent_b[0] += (n - n_acked) * f[6]
                sent_n[1] += n_acked
                sent_b[1] += n_acked * f[6]
                done += 1
                i = nxt
        except Exception as exc:
            # the item at i failed (its deliveries before the fault stand): the caller skips it
            self.forwarded += done
            raise ForwardedItemFailed(i, nxt, done) from exc
        finally:
            if sent_n[0] or sent_n[1]:
                self._count_sent(sent_n, sent_b)
        self.forwarded += done
        return (i, done)


cdef tuple _offsets(cls, tuple names):
    """``slot_offset(cls, name)`` of each of ``names``."""
    return tuple([slot_offset(cls, name) for name in names])


cdef inline object _get(obj, Py_ssize_t at, str name):
    """``obj.name``, read from its slot at byte offset ``at`` when there is one (``at`` taken by
    ``slot_offset`` from ``obj``'s exact class) and it is set; by name otherwise (an unset slot
    raises ``AttributeError`` as the attribute would). A generic attribute look-up of a slot
    costs ~250 instructions (the type's MRO, the member descriptor), this a load."""
    cdef PyObject* v
    if at >= 0:
        v = (<PyObject**>((<char*><PyObject*>obj) + at))[0]
        if v != NULL:
            return <object>v
    return getattr(obj, name)


cdef inline int _set(obj, Py_ssize_t at, str name, value) except -1:
    """``obj.name = value``, written into its slot when there is one (see ``_get``)."""
    cdef PyObject** slot
    if at < 0:
        setattr(obj, name, value)
        return 0
    slot = <PyObject**>((<char*><PyObject*>obj) + at)
    Py_INCREF(value)
    Py_XDECREF(slot[0])
    slot[0] = <PyObject*>value
    return 0


cdef SlotMaker _maker(cls, tuple names):
    """A ``SlotMaker`` for ``cls`` when its slots are ``names``; None otherwise (called as is)."""
    try:
        return SlotMaker(cls, names)
    except TypeError:
        return None


cdef inline bint _same_nodes(tuple a, tuple b) except -1:
    """``a == b`` for two tuples of node ids, element by element with identity first (a topic's
    route is its own tuple, of the same id objects: ``==`` on the tuples went through
    ``PyObject_RichCompare``, ~100 instructions a read)."""
    cdef Py_ssize_t i, n = len(a)
    if a is b:
        return True
    if n != len(b):
        return False
    for i in range(n):
        x = a[i]
        y = b[i]
        if x is not y and not (x == y):
            return False
    return True


cdef inline object _link_queues(tuple nodes, object links):
    """The ``ForwardQueue`` of each linked peer of ``nodes`` (a peer without a link is skipped);
    None when a link queues otherwise (the Python path forwards that message)."""
    cdef list fqs = []
    cdef bint plain = type(links) is dict
    for node in nodes:
        link = (<dict>links).get(node) if plain else links.get(node)  # (C's look-up for a dict)
        if link is not None:
            fq = link.forward_queue
            if type(fq) is not ForwardQueue:
                return None
            fqs.append(fq)
    return fqs


cdef Py_ssize_t _forward_c(object relay, object conn, const unsigned char* p, Py_ssize_t size,
                           Py_ssize_t* npk) except -1:
    """``PublishRelay._forward_buf`` for the protocol layer's hub callback, on its read buffer
    (``FORWARD_C``); ``npk``: the PUBLISHes consumed."""
    cdef PublishRelay r = <PublishRelay>relay
    cdef Py_ssize_t used = r._forward_buf(conn, p, size)
    npk[0] = r.raw_packets
    return used


#: ``_forward_c`` as a capsule (``fluxmq.protocol._hub_read`` calls it without Python's call)
FORWARD_C = PyCapsule_New(<void*>_forward_c, b"fluxmq._core.relay.forward", NULL)


cdef Py_ssize_t _serve_c(object relay, object conn, list packets, Py_ssize_t start) except -1:
    return (<PublishRelay>relay).serve(conn, packets, start)


# ``serve`` as a C function pointer (``Py_ssize_t (*)(object relay, object conn, list packets,
# Py_ssize_t start) except -1``, ``relay`` a PublishRelay): the protocol layer's hub callback calls
# it without a Python call's argument handling.
SERVE_C = PyCapsule_New(<void*>_serve_c, b"fluxmq._core.relay.serve", NULL)
