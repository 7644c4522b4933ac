# cython: language_level=3
"""The fast path of a connected client's PUBLISH: route it and write it into subscribers' output.

``PublishRelay.serve(conn, packets, start)`` handles the decoded packets of one read, from
``start``, while they are PUBLISHes of the common shape (or PUBACKs of tracked deliveries, a
durable queue's, settled through their sender as ``Session.on_puback`` does), and returns the index
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
shared groups, a broker with peers (cluster, several workers) or message observers (webhooks).
Per target, the delivery goes through ``session.deliver`` (the Python path) unless the session is
a plain ``Session`` (or a ``PersistentSession`` over a store with a ``sent_table``) attached to an
MQTT connection that is open, under its output allowance, with an empty session queue, and (5.0)
without outbound topic aliases, subscription identifiers or a maximum packet size the PUBLISH
exceeds; QoS 1 targets also need room in their window. A persistent session's QoS 1 delivery is
stored as ``PersistentSession.deliver`` stores it (its entry at the disk queue's next seq, in flight
under its packet id: ``SentTable.sent_entry``), committed with the turn before anything leaves; its
PUBACK is settled here too (``SentTable.acked``, then ``pump`` when something waits).

This module holds no I/O and imports nothing above ``_core``; it reads and writes the attributes
the broker and protocol layers document for this path (``docs/architecture.rst``, *Publish fast
path*), and is handed the classes it recognises by its caller.
"""

from cpython.bytearray cimport PyByteArray_GET_SIZE
from cpython.unicode cimport PyUnicode_GET_LENGTH, PyUnicode_READ_CHAR

from time import perf_counter

from fluxmq._core.codec cimport Publish, Puback, append_publish, encode_publish
from fluxmq._core.entry cimport fields_entry
from fluxmq._core.sent cimport SentTable


cdef class PublishRelay:
    """Serves the common PUBLISH in C (see the module docstring)."""

    cdef object conn_class
    cdef object session_class
    cdef object message_class
    cdef object inflight_class
    cdef object puback_class
    cdef object tracked_class
    cdef object persistent_class
    cdef long sample_mask
    cdef public long long served  # PUBLISHes handled here (tests read it to see which path ran)
    cdef public bint enabled

    def __init__(self, conn_class, session_class, message_class, inflight_class, puback_class,
                 long sample_mask, tracked_class=None, persistent_class=None):
        self.conn_class = conn_class
        self.session_class = session_class
        self.message_class = message_class
        self.inflight_class = inflight_class
        self.puback_class = puback_class
        self.tracked_class = tracked_class
        self.persistent_class = persistent_class
        self.sample_mask = sample_mask
        self.served = 0
        self.enabled = True

    cdef Py_ssize_t _settle_acks(self, conn, list packets, Py_ssize_t i, Py_ssize_t count) except -1:
        """A run of PUBACKs the fast path settles: of tracked deliveries (a durable queue's,
        ``TrackedMessage``) what the connection's ``_on_puback`` and ``Session.on_puback`` do for
        them (the entry leaves the window, then its sender's ``settle`` is called), for a plain or
        persistent session with nothing queued or held; and, for a persistent session, of its own
        QoS 1 deliveries what ``PersistentSession.on_puback`` does (the entry leaves the window, the
        store marks its queue entry done, and ``pump`` sends what waits), on a broker without peers.
        Stops at the first PUBACK of anything else, which the Python path serves."""
        cdef Puback ack
        cdef bint v5, durable
        cdef int pid
        tracked = self.tracked_class
        session = conn.session
        if session is None or conn.closed or conn.broker.peers is not None:
            return i  # (with peers, as for a PUBLISH: the Python path, in the reader greenlet)
        cdef SentTable table = None
        durable = self.persistent_class is not None and type(session) is self.persistent_class
        if durable:
            found = getattr(session.store, "sent_table", None)
            if type(found) is SentTable:
                table = <SentTable>found
            else:
                durable = False  # (a store without one: the Python path)
        if not durable and (tracked is None or type(session) is not self.session_class):
            return i
        cdef dict inflight = session.inflight
        inflight_class = self.inflight_class
        v5 = conn.version == 5
        client_id = queue = None
        if durable:  # (the same for the whole run: it stops when the connection's session changes)
            client_id = session.client_id
            queue = session.queue
        while i < count:
            p = packets[i]
            if type(p) is not Puback:
                break
            ack = <Puback>p
            pid = ack.packet_id
            entry = inflight.get(pid)
            if entry is None:
                break
            if durable and type(entry) is inflight_class:
                if entry.qos != 1 or (tracked is not None and isinstance(entry.message, tracked)):
                    break
                del inflight[pid]
                table.acked(client_id, pid)  # store.delete_inflight, before pump() may reuse the id
                if queue.count or session.held:
                    self._pump(session, inflight, table)
            elif tracked is not None and isinstance(entry, tracked):
                if (session.queue.count if durable else session.queue) or session.held:
                    break
                del inflight[pid]
                ticket = entry.ticket
                entry.settle(session, ack.reason_code if v5 else 0, entry if ticket is None else ticket)
            else:
                break
            i += 1
            if conn.closed or conn.session is not session:
                break
        return i

    cdef int _pump(self, session, dict inflight, SentTable table) except -1:
        """``PersistentSession.pump`` after a PUBACK freed the window: its common case in C (an
        attached 3.x connection under its output allowance, nothing held, no re-check of read
        permissions; heads that ``DiskQueue.pop_plain`` gives: QoS 1 kept in memory, not retained,
        no subscription ids or expiry), each sent as ``Session._send_new`` and recorded as
        ``store.put_sent``; whatever else is left (or congestion) goes to ``session.pump()``."""
        cdef int pid
        cdef long long quota
        d = session.delivery
        queue = session.queue
        if (session.held or d is None or type(d) is not self.conn_class or d.closed or d.version == 5
                or session.reread is not None):
            session.pump()
            return 0
        quota = session.send_quota
        cid = session.client_id
        while queue.count:
            dout = d.out
            if PyByteArray_GET_SIZE(dout) > d._high:
                session.pump()  # is_congested: the allowance may grow, or the client waits for room
                return 0
            if len(inflight) >= quota:
                if queue.qos0:
                    session.pump()  # a QoS 0 head may go with the window full
                return 0
            head = queue.pop_plain()
            if head is None:
                session.pump()  # a head pump handles otherwise (read from the store, QoS 0, ...)
                return 0
            seq, item, _ = <tuple>head
            message = (<tuple>item)[0]
            session.queue_bytes = queue.bytes
            pid = session._next_pid
            while pid in inflight:
                pid = pid + 1 if pid < 65535 else 1
            session._next_pid = pid + 1 if pid < 65535 else 1
            # -- MQTTConnection.send_publish (3.x), its encoding cached on the message as there --
            cache = message.wire_cache
            data = None
            if cache is None:
                data = encode_publish(message.topic, message.payload, 1, False, False, 1, None, 4)
                message.wire_cache = {2: data}
            else:
                data = cache.get(2)
                if data is None:
                    data = cache[2] = encode_publish(message.topic, message.payload, 1, False, False, 1, None, 4)
            append_publish(dout, <bytes>data, pid, False)
            d._npk += 1
            if not d._dirty:
                d._dirty = True
                d.flusher.mark(d)
            inflight[pid] = self.inflight_class(message, 1, False, None)
            table.sent(cid, pid, seq)  # store.put_sent
        return 0

    cpdef Py_ssize_t serve(self, conn, list packets, Py_ssize_t start) except -1:
        """Handle ``packets[start:]`` while the fast path covers them; the index of the first left."""
        cdef Py_ssize_t i = start, count = len(packets)
        cdef Publish pub
        cdef int qos, version, tq, qown, max_qos, pid
        cdef long long max_size
        cdef Py_ssize_t ack_at = 0, n, n_acked, size, j, k
        cdef bint sampled, durable, ready, staked
        cdef long long seq
        # The broker's counters of this call, added to BrokerStats once at the end (nothing reads
        # them meanwhile: the call never switches greenlets).
        cdef long long recv_n[2]
        cdef long long recv_b[2]
        cdef long long sent_n[2]
        cdef long long sent_b[2]
        cdef long long recv_base[2]
        cdef str topic, last_topic = None
        if not self.enabled or i >= count:
            return i
        if type(packets[i]) is Puback:
            return self._settle_acks(conn, packets, i, count)
        broker = conn.broker
        if broker.peers is not None or broker._on_published is not None or broker._on_delivered is not None:
            return i
        origin = conn.session
        if origin is None or conn.closed:
            return i
        version = conn.version
        settings = conn.settings
        max_qos = settings.max_qos
        max_size = settings.max_message_size
        policy = conn._policy
        allowed = None
        if policy is not None:
            allowed = policy.fast
            if allowed is None:
                return i
        store = broker._store
        # A durable queue's common append (``QueueManager.append_relayed``: a run of payloads to one
        # topic, of which it appends the first n, or declines before any effect with 0); None until
        # the node made its queues (the Python path makes them).
        queues = broker.queues
        queue_append = queues.append_relayed if queues is not None else None
        stats = broker.stats
        received = stats.received_qos
        router = broker.router
        routes = router._routes
        trie = router.trie
        client_id = conn.client_id
        conn_class = self.conn_class
        session_class = self.session_class
        persistent_class = self.persistent_class
        if persistent_class is None:
            persistent_class = session_class  # (never matched: the session_class test comes first)
        # the store's per-message record methods in C (an LMDB store's ``sent_table``; None: none)
        cdef SentTable table = None
        if store is not None:
            found = getattr(store, "sent_table", None)
            if type(found) is SentTable:
                table = <SentTable>found
        if table is None:
            persistent_class = session_class
        staked = False
        cdef long long table_ops_before = 0
        last_route = None
        recv_n[0] = recv_n[1] = recv_b[0] = recv_b[1] = 0
        sent_n[0] = sent_n[1] = sent_b[0] = sent_b[1] = 0
        recv_base[0] = received[0]
        recv_base[1] = received[1]
        try:
            while i < count:
                p = packets[i]
                if type(p) is not Publish:
                    break
                pub = <Publish>p
                qos = pub.qos
                if qos > 1 or qos > max_qos or pub.retain or pub.properties:
                    break
                topic = pub.topic
                if PyUnicode_GET_LENGTH(topic) == 0:
                    break
                payload = pub.payload
                size = len(payload)
                if size > max_size:
                    break
                if PyUnicode_READ_CHAR(topic, 0) == 36:  # "$": only a durable queue's append is served here
                    if queue_append is None or qos != 1 or not topic.startswith("$queue/"):
                        break
                    if allowed is not None and allowed.get(topic) != 0:
                        break
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
                            break  # declined before any effect: the Python path serves (or refuses) it
                        # -- Broker.publish's counts; the PUBACKs (nothing was written to this client meanwhile) --
                        out = conn.out
                        for k in range(n):
                            pub = <Publish>packets[i + k]
                            recv_b[1] += len(pub.payload)
                            pid = pub.packet_id
                            out += bytes((0x40, 2, pid >> 8, pid & 0xFF))
                        conn._npk += n
                        if not conn._dirty:
                            conn._dirty = True
                            conn.flusher.mark(conn)
                    recv_n[1] += n
                    self.served += n
                    i += n
                    if conn.closed or n < len(payloads):
                        break
                    continue
                if last_topic is not None and topic == last_topic:
                    route = last_route  # a run of one topic (subscriptions cannot change within this call)
                else:
                    if allowed is not None and allowed.get(topic) != 0:
                        break
                    route = None
                    if trie.generation == router._generation:
                        route = routes.get(topic)
                    if route is None:
                        route = router.route(topic)
                    if route.groups:
                        break
                    last_topic = topic
                    last_route = route
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
                started = perf_counter() if sampled else 0.0
                if qos:
                    out = conn.out
                    ack_at = PyByteArray_GET_SIZE(out)
                message = None
                enc4_0 = enc4_1 = enc5_0 = enc5_1 = entry1 = None
                n = n_acked = 0
                for target in route.targets:
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
                    d = session.delivery
                    durable = False
                    if d is None or type(d) is not conn_class or d.closed:
                        ready = False
                    elif type(session) is session_class:
                        ready = not session.queue
                    elif type(session) is persistent_class and session.store is store:
                        # a persistent session: its disk queue must be empty too (then a QoS 1
                        # delivery is stored as an in-flight queue entry, as put_in_flight does)
                        durable = True
                        queue = session.queue
                        ready = not queue.count
                    else:
                        ready = False
                    if ready:
                        dout = d.out
                        if PyByteArray_GET_SIZE(dout) <= d._high:
                            data = None
                            if d.version == 5:
                                if d._aliases_out is None and sub_ids is None:
                                    if tq:
                                        if enc5_1 is None:
                                            enc5_1 = encode_publish(topic, payload, 1, False, False, 1, None, 5)
                                        data = enc5_1
                                    else:
                                        if enc5_0 is None:
                                            enc5_0 = encode_publish(topic, payload, 0, False, False, 0, None, 5)
                                        data = enc5_0
                                    limit = d._client_max_packet
                                    if limit and len(data) > limit:
                                        data = None  # dropped for this client: the Python path counts it
                            elif tq:
                                if enc4_1 is None:
                                    enc4_1 = encode_publish(topic, payload, 1, False, False, 1, None, 4)
                                data = enc4_1
                            else:
                                if enc4_0 is None:
                                    enc4_0 = encode_publish(topic, payload, 0, False, False, 0, None, 4)
                                data = enc4_0
                            if data is not None:
                                if tq == 0:
                                    dout += data
                                    d._npk += 1
                                    if not d._dirty:
                                        d._dirty = True
                                        d.flusher.mark(d)
                                    continue
                                inflight = session.inflight
                                if len(inflight) < session.send_quota:
                                    if message is None:
                                        message = self.message_class(topic, payload, qos, False, None, None,
                                                                     client_id)
                                    if durable:
                                        if sub_ids is not None:
                                            session.deliver(message, tq, False, sub_ids)  # (encodes the ids)
                                            continue
                                        if entry1 is None:  # the stored entry (records.plain_entry's bytes)
                                            entry1 = fields_entry(topic, client_id, payload, qos, False, 1, False)
                                    pid = session._next_pid
                                    while pid in inflight:
                                        pid = pid + 1 if pid < 65535 else 1
                                    session._next_pid = pid + 1 if pid < 65535 else 1
                                    append_publish(dout, <bytes>data, pid, False)
                                    inflight[pid] = self.inflight_class(message, tq, False, sub_ids)
                                    if durable:
                                        # -- DiskQueue.put_in_flight (the queue is empty) --
                                        seq = queue.next
                                        queue.next = seq + 1
                                        queue.first = seq + 1
                                        table.sent_entry(session.client_id, pid, seq, entry1)
                                    d._npk += 1
                                    if not d._dirty:
                                        d._dirty = True
                                        d.flusher.mark(d)
                                    continue
                    if message is None:
                        message = self.message_class(topic, payload, qos, False, None, None, client_id)
                    session.deliver(message, tq, False, sub_ids)
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
                    broker._observe_latency(started)
                self.served += 1
                i += 1
                if qos:
                    # -- the PUBACK, ahead of what routing wrote to this client's own output --
                    pid = pub.packet_id
                    if n == 0 and version == 5:
                        ack = conn._ack5_bytes(self.puback_class, pid, 0x10)  # no matching subscribers
                    else:
                        ack = bytes((0x40, 2, pid >> 8, pid & 0xFF))
                    if ack_at >= PyByteArray_GET_SIZE(out) or conn.closed:
                        out += ack
                    else:
                        out[ack_at:ack_at] = ack
                    conn._npk += 1
                    if not conn._dirty:
                        conn._dirty = True
                        conn.flusher.mark(conn)
                if conn.closed:
                    break
        finally:
            if staked:
                store.note_stake(client_id)  # once per call: nothing commits within it
            if recv_n[0] or recv_n[1]:
                received_bytes = stats.received_bytes_qos
                received[0] += recv_n[0]
                received[1] += recv_n[1]
                received_bytes[0] += recv_b[0]
                received_bytes[1] += recv_b[1]
            if sent_n[0] or sent_n[1]:
                sent = stats.sent_qos
                sent_bytes = stats.sent_bytes_qos
                if sent_n[0]:
                    sent[0] += sent_n[0]
                    sent_bytes[0] += sent_b[0]
                if sent_n[1]:
                    sent[1] += sent_n[1]
                    sent_bytes[1] += sent_b[1]
        return i
