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
a plain ``Session`` attached to an MQTT connection that is open, under its output allowance, with
an empty session queue, and (5.0) without outbound topic aliases, subscription identifiers or a
maximum packet size the PUBLISH exceeds; QoS 1 targets also need room in their window.

This module holds no I/O and imports nothing above ``_core``; it reads and writes the attributes
the broker and protocol layers document for this path (``docs/architecture.rst``, *Publish fast
path*), and is handed the classes it recognises by its caller.
"""

from cpython.bytearray cimport PyByteArray_GET_SIZE
from cpython.unicode cimport PyUnicode_GET_LENGTH, PyUnicode_READ_CHAR

from time import perf_counter

from fluxmq._core.codec cimport Publish, Puback, append_publish, encode_publish


cdef class PublishRelay:
    """Serves the common PUBLISH in C (see the module docstring)."""

    cdef object conn_class
    cdef object session_class
    cdef object message_class
    cdef object inflight_class
    cdef object puback_class
    cdef object tracked_class
    cdef long sample_mask
    cdef public long long served  # PUBLISHes handled here (tests read it to see which path ran)
    cdef public bint enabled
    # The last broker served and the objects it holds for its whole life (Broker.stats and its
    # per-QoS count lists, Broker.router, Router._routes, Router.trie: made in their __init__ and
    # never replaced), read once per broker instead of once per call.
    cdef object _broker
    cdef list _received
    cdef list _received_bytes
    cdef list _sent
    cdef list _sent_bytes
    cdef object _router
    cdef dict _routes
    cdef object _trie

    def __init__(self, conn_class, session_class, message_class, inflight_class, puback_class,
                 long sample_mask, tracked_class=None):
        self.conn_class = conn_class
        self.session_class = session_class
        self.message_class = message_class
        self.inflight_class = inflight_class
        self.puback_class = puback_class
        self.tracked_class = tracked_class
        self.sample_mask = sample_mask
        self.served = 0
        self.enabled = True
        self._broker = None

    cdef int _adopt(self, broker) except -1:
        """Read the per-broker objects of ``broker`` (see ``_broker``)."""
        stats = broker.stats
        router = broker.router
        self._received = stats.received_qos
        self._received_bytes = stats.received_bytes_qos
        self._sent = stats.sent_qos
        self._sent_bytes = stats.sent_bytes_qos
        self._router = router
        self._routes = router._routes
        self._trie = router.trie
        self._broker = broker
        return 0

    cdef Py_ssize_t _settle_tracked(self, conn, list packets, Py_ssize_t i, Py_ssize_t count) except -1:
        """A run of PUBACKs of tracked deliveries (a durable queue's, ``TrackedMessage``): what the
        connection's ``_on_puback`` and ``Session.on_puback`` do for them (the entry leaves the
        window, then its sender's ``settle`` is called), for a plain ``Session`` with nothing queued
        or held, on a broker without peers. Stops at the first PUBACK of anything else, which the
        Python path serves."""
        cdef Puback ack
        cdef bint v5
        tracked = self.tracked_class
        session = conn.session
        if (tracked is None or session is None or conn.closed or type(session) is not self.session_class
                or conn.broker.peers is not None):
            return i  # (with peers, as for a PUBLISH: the Python path, in the reader greenlet)
        inflight = session.inflight
        v5 = conn.version == 5
        while i < count:
            p = packets[i]
            if type(p) is not Puback:
                break
            ack = <Puback>p
            entry = inflight.get(ack.packet_id)
            if entry is None or not isinstance(entry, tracked) or session.queue or session.held:
                break
            del inflight[ack.packet_id]
            ticket = entry.ticket
            entry.settle(session, ack.reason_code if v5 else 0, entry if ticket is None else ticket)
            i += 1
            if conn.closed or conn.session is not session:
                break
        return i

    cpdef Py_ssize_t serve(self, conn, list packets, Py_ssize_t start) except -1:
        """Handle ``packets[start:]`` while the fast path covers them; the index of the first left."""
        cdef Py_ssize_t i = start, count = len(packets)
        cdef Publish pub
        cdef int qos, version, tq, qown, pid
        cdef int max_qos = -1  # read on the first QoS 1 PUBLISH (a QoS 0 one is within any maximum)
        cdef bint have_store = False, have_queues = False
        cdef long long max_size
        cdef Py_ssize_t ack_at = 0, n, n_acked, size, j, k
        cdef bint sampled
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
            return self._settle_tracked(conn, packets, i, count)
        broker = conn.broker
        if broker.peers is not None or broker._on_published is not None or broker._on_delivered is not None:
            return i
        origin = conn.session
        if origin is None or conn.closed:
            return i
        version = conn.version
        settings = conn.settings
        max_size = settings.max_message_size
        policy = conn._policy
        allowed = None
        if policy is not None:
            allowed = policy.fast
            if allowed is None:
                return i
        # Read when first needed (the storage for QoS 1, the queues for a "$" topic, the client id
        # for a Message or a stake): a lone QoS 0 message reads none of them.
        store = queue_append = client_id = None
        if broker is not self._broker:
            self._adopt(broker)
        received = self._received
        router = self._router
        routes = self._routes
        trie = self._trie
        conn_class = self.conn_class
        session_class = self.session_class
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
                        queues = broker.queues
                        queue_append = queues.append_relayed if queues is not None else None
                        client_id = conn.client_id
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
                if qos and not have_store:
                    have_store = True
                    store = broker._store
                    client_id = conn.client_id
                if store is not None and qos:
                    if store.refusing:
                        break
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
                enc4_0 = enc4_1 = enc5_0 = enc5_1 = None
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
                    if (d is not None and type(d) is conn_class and type(session) is session_class
                            and not session.queue and not d.closed):
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
                                    pid = session._next_pid
                                    while pid in inflight:
                                        pid = pid + 1 if pid < 65535 else 1
                                    session._next_pid = pid + 1 if pid < 65535 else 1
                                    if message is None:
                                        message = self.message_class(topic, payload, qos, False, None, None,
                                                                     client_id)  # read with the store (QoS 1)
                                    append_publish(dout, <bytes>data, pid, False)
                                    inflight[pid] = self.inflight_class(message, tq, False, sub_ids)
                                    d._npk += 1
                                    if not d._dirty:
                                        d._dirty = True
                                        d.flusher.mark(d)
                                    continue
                    if message is None:
                        if client_id is None:
                            client_id = conn.client_id
                        message = self.message_class(topic, payload, qos, False, None, None, client_id)
                    session.deliver(message, tq, False, sub_ids)
                sent_n[0] += n - n_acked
                sent_b[0] += (n - n_acked) * size
                sent_n[1] += n_acked
                sent_b[1] += n_acked * size
                if ops_before is not None and store.op_count != ops_before:
                    store.note_stake(client_id)  # the PUBACK acknowledges what this publish stored
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
            if recv_n[0] or recv_n[1]:
                received_bytes = self._received_bytes
                received[0] += recv_n[0]
                received[1] += recv_n[1]
                received_bytes[0] += recv_b[0]
                received_bytes[1] += recv_b[1]
            if sent_n[0] or sent_n[1]:
                sent = self._sent
                sent_bytes = self._sent_bytes
                if sent_n[0]:
                    sent[0] += sent_n[0]
                    sent_bytes[0] += sent_b[0]
                if sent_n[1]:
                    sent[1] += sent_n[1]
                    sent_bytes[1] += sent_b[1]
        return i
