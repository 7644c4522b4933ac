"""Prometheus ``/metrics``: a collector that reads the broker's plain counters at scrape time.

Nothing here runs per message. The broker keeps plain integer counters (``BrokerStats``), and its
sessions (walked in slices that yield to the hub, ``fluxmq.http.walk``), retained store and router
are read when Prometheus scrapes; the publish-to-delivery
latency histogram is sampled by the broker (1 publish in 64) into fixed integer buckets, which the
collector turns into a Prometheus histogram. The exporter therefore needs no prometheus-client
``Counter`` on the hot path at all (if one is ever added, pre-bind its label children: ``labels()``
costs microseconds).

Served on the health listener (``server.health_addr``) when ``server.metrics_enabled`` is true.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from fluxmq import __version__
from fluxmq.broker.stats import LATENCY_BUCKETS, LATENCY_SAMPLE_MASK
from fluxmq.http.router import allow_value, answer_head, json_response
from fluxmq.http.walk import session_totals

QOS_LABELS = ("0", "1", "2")


def _by_label(family: type, name: str, doc: str, label: str, values: dict) -> Metric:
    """One family with a sample per item of ``values`` (label value -> value), sorted by label."""
    metric = family(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        metric.add_metric([key], value)
    return metric


def _per_row(label: str, rows: dict, columns: tuple) -> list[Metric]:
    """A family per column ``(family, name, doc, key)``, with a sample per row of ``rows`` (label
    value -> dict of figures, sorted by label): the row's figure at ``key`` (a function: of the row)."""
    families = [(family(name, doc, labels=[label]), key) for family, name, doc, key in columns]
    for row, figures in sorted(rows.items()):
        for metric, key in families:
            metric.add_metric([row], key(figures) if callable(key) else figures[key])
    return [metric for metric, _ in families]


#: the retained replica's counters (``RetainedReplica.figures``): name, help
RETAINED_COUNTERS = (
    ("retained_written", "Retained changes made here written to etcd."),
    (
        "retained_superseded",
        "Retained changes made here not written: etcd held a later change of the topic (applied here).",
    ),
    ("retained_write_failures", "Retained writes to etcd that failed (retried)."),
    ("retained_applied", "Retained changes of other nodes applied here."),
    ("retained_fetched", "Large retained payloads fetched from the node that set them."),
    ("retained_fetch_failures", "Large retained payloads whose fetch failed (logged)."),
)


class BrokerCollector(Collector):
    """Every fluxmq metric, computed from the running service when collected.

    ``service`` provides ``broker`` (None until started) and ``listeners`` (objects with ``name``
    and ``connections``); ``bridge`` (optional) provides ``streams`` and ``requests``.
    """

    def __init__(self, service: Any, bridge: Any = None) -> None:
        self.service = service
        self.bridge = bridge

    def describe(self) -> Iterable[Metric]:
        return []  # collected on demand; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "fluxmq_build_info", "fluxmq version (value is always 1).", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info
        broker = getattr(self.service, "broker", None)
        if broker is None:
            return
        yield from self._connections(broker)
        yield from self._traffic(broker.stats)
        yield from self._state(broker)
        yield self._latency(broker.stats)
        if broker.queues is not None:
            yield from self._queues(broker.queues)
        if self.bridge is not None:
            yield from self._http(self.bridge)
        webhooks = getattr(self.service, "webhooks", None)
        if webhooks is not None:
            yield from self._webhooks(webhooks)
        coap = getattr(self.service, "coap", None)
        if coap is not None:
            yield from self._coap(coap)
        bridges = getattr(self.service, "bridges", None)
        if bridges is not None:
            yield from self._bridges(bridges)
        raft = getattr(self.service, "raft", None)
        if raft is not None:
            yield from self._raft(raft.status())
        cluster = getattr(self.service, "cluster", None)
        if cluster is not None:
            yield from self._cluster_peers(cluster.peer_state())
            queue_state = getattr(cluster, "queue_state", None)  # several workers
            if queue_state is not None:
                yield from self._worker_queues(queue_state())
            received = cluster.received()
            yield CounterMetricFamily(
                "fluxmq_cluster_received_batches",
                "Batches from peers applied here.",
                value=received["batches"],
            )
            yield CounterMetricFamily(
                "fluxmq_cluster_received_messages",
                "Messages from peers routed here.",
                value=received["messages"],
            )
            yield CounterMetricFamily(
                "fluxmq_cluster_duplicate_batches",
                "Retried batches from peers skipped (applied already).",
                value=received["duplicates"],
            )
            yield CounterMetricFamily(
                "fluxmq_cluster_bad_batches", "Damaged batches from peers (logged).", value=received["bad"]
            )
            yield CounterMetricFamily(
                "fluxmq_cluster_failed_messages",
                "Messages from peers whose delivery here raised (logged; the rest of their batch is delivered).",
                value=received.get("failed", 0),
            )
            figures = getattr(cluster, "figures", None)
            if figures is not None:
                f = figures()
                yield GaugeMetricFamily(
                    "fluxmq_cluster_is_leader", "1 while this node leads (etcd election).", value=f["leader"]
                )
                yield CounterMetricFamily(
                    "fluxmq_cluster_sessions_handed_out",
                    "Sessions handed to peers during a graceful stop.",
                    value=f["adopted_out"],
                )
                yield CounterMetricFamily(
                    "fluxmq_cluster_stale_sessions_dropped",
                    "Restored sessions dropped at start: another node owned them.",
                    value=f["stale_dropped"],
                )
                yield CounterMetricFamily(
                    "fluxmq_cluster_wills_published_for_dead_nodes",
                    "Wills of dead nodes' clients this node published as leader.",
                    value=f["wills_for_dead"],
                )
                yield GaugeMetricFamily(
                    "fluxmq_cluster_kept_states",
                    "Session states kept here for the client's retry after a claim failed past the hand-over.",
                    value=f.get("kept_states", 0),
                )
                yield CounterMetricFamily(
                    "fluxmq_cluster_kept_states_dropped",
                    "Kept states dropped unused: expired, stale (claimed elsewhere since), over the bounds.",
                    value=f.get("kept_dropped", 0),
                )
                yield CounterMetricFamily(
                    "fluxmq_cluster_will_claims_lost",
                    "Wills this node did not publish: another node had published them.",
                    value=f["will_claims_lost"],
                )
                for name, help_text in RETAINED_COUNTERS:
                    if name in f:
                        yield CounterMetricFamily(f"fluxmq_cluster_{name}", help_text, value=f[name])
                if "retained_clear_records" in f:
                    yield GaugeMetricFamily(
                        "fluxmq_cluster_retained_clear_records",
                        "Records of retained clears in etcd (kept while a node is lost, or for a late clear).",
                        value=f["retained_clear_records"],
                    )

    @staticmethod
    def _worker_queues(peers: dict) -> Iterator[Metric]:
        """Durable queues across workers (fluxmq.cluster.queues), per other worker."""
        yield from _per_row(
            "peer",
            peers,
            (
                (
                    GaugeMetricFamily,
                    "fluxmq_worker_queue_ops_waiting",
                    "Queue operations (appends, settlements, ...) waiting for the owning worker.",
                    "ops_waiting",
                ),
                (
                    CounterMetricFamily,
                    "fluxmq_worker_queue_ops_refused",
                    "Queue operations refused: too many waiting for the owning worker.",
                    "ops_refused",
                ),
                (
                    CounterMetricFamily,
                    "fluxmq_worker_queue_ops_failed",
                    "Queue operations the owning worker did not answer (down, restarting).",
                    "ops_failed",
                ),
                (
                    CounterMetricFamily,
                    "fluxmq_worker_queue_deliveries_failed",
                    "Deliveries to a member's worker that did not answer (redelivered).",
                    "deliveries_failed",
                ),
                (
                    GaugeMetricFamily,
                    "fluxmq_worker_queue_remote_members",
                    "The other worker's clients that are members of this worker's queues.",
                    "remote_members",
                ),
            ),
        )

    @staticmethod
    def _cluster_peers(peers: dict) -> Iterator[Metric]:
        """Per peer of the cluster's data plane (fluxmq.cluster): docs/cluster.rst."""
        yield from _per_row(
            "peer",
            peers,
            (
                (
                    GaugeMetricFamily,
                    "fluxmq_cluster_peer_reachable",
                    "1 while the stream to the peer is answered.",
                    lambda st: 1 if st["reachable"] else 0,
                ),
                (
                    GaugeMetricFamily,
                    "fluxmq_cluster_peer_queued_messages",
                    "Messages waiting for the peer.",
                    "queued",
                ),
                (
                    CounterMetricFamily,
                    "fluxmq_cluster_peer_forwarded_batches",
                    "Batches the peer acknowledged.",
                    "forwarded_batches",
                ),
                (
                    CounterMetricFamily,
                    "fluxmq_cluster_peer_forwarded_messages",
                    "Messages in the batches the peer acknowledged.",
                    "forwarded_messages",
                ),
                (
                    CounterMetricFamily,
                    "fluxmq_cluster_peer_failures",
                    "Streams to the peer that broke or could not open.",
                    "failures",
                ),
                (
                    CounterMetricFamily,
                    "fluxmq_cluster_peer_dropped",
                    "Messages for the peer dropped by its full queue.",
                    "dropped",
                ),
            ),
        )

    @staticmethod
    def _bridges(bridges: Any) -> Iterator[Metric]:
        """Per MQTT bridge / cluster route (``bridge`` label = its name)."""
        up = GaugeMetricFamily(
            "fluxmq_bridge_connected", "1 while the bridge is connected to its peer.", labels=["bridge"]
        )
        queued = GaugeMetricFamily(
            "fluxmq_bridge_queued_messages",
            "Outbound messages held for the peer (queued and in flight).",
            labels=["bridge"],
        )
        fwd = CounterMetricFamily(
            "fluxmq_bridge_forwarded", "Messages forwarded, by direction.", labels=["bridge", "direction"]
        )
        dropped = CounterMetricFamily(
            "fluxmq_bridge_dropped",
            "Messages dropped, by reason (validity, loop).",
            labels=["bridge", "reason"],
        )
        for link in bridges.links:
            snap = link.snapshot()
            name = snap["name"]
            up.add_metric([name], 1 if snap["state"] == "connected" else 0)
            queued.add_metric([name], snap["queued"])
            fwd.add_metric([name, "out"], snap["forwarded_out"])
            fwd.add_metric([name, "in"], snap["forwarded_in"])
            dropped.add_metric([name, "validity"], snap["dropped_validity"])
            dropped.add_metric([name, "loop"], snap["dropped_loop"])
        yield from (up, queued, fwd, dropped)

    def _connections(self, broker: Any) -> Iterator[Metric]:
        st = broker.stats
        yield GaugeMetricFamily(
            "fluxmq_clients_connected",
            "Clients connected now (MQTT connections and HTTP subscribe streams).",
            value=broker.connected,
        )
        yield CounterMetricFamily(
            "fluxmq_connections", "Client connections accepted since start.", value=st.connections_total
        )
        by_listener = GaugeMetricFamily(
            "fluxmq_listener_connections", "Open connections per listener.", labels=["listener"]
        )
        parked = GaugeMetricFamily(
            "fluxmq_listener_connections_parked",
            "Idle connections parked now per listener: no greenlet until input arrives (broker.park_after).",
            labels=["listener"],
        )
        for listener in getattr(self.service, "listeners", ()):
            by_listener.add_metric([str(listener.name)], len(listener.connections))
            parked.add_metric(
                [str(listener.name)], sum(1 for c in listener.connections if getattr(c, "parked", False))
            )
        if self.bridge is not None:
            by_listener.add_metric(["http_sse"], len(self.bridge.streams))
        yield by_listener
        yield parked

    @staticmethod
    def _traffic(st: Any) -> Iterator[Metric]:
        for name, doc, values in (
            (
                "fluxmq_messages_received",
                "Application messages published to the broker, by QoS.",
                st.received_qos,
            ),
            (
                "fluxmq_messages_sent",
                "Application messages delivered to subscribers, by delivered QoS.",
                st.sent_qos,
            ),
            (
                "fluxmq_message_bytes_received",
                "Payload bytes of messages published to the broker, by QoS.",
                st.received_bytes_qos,
            ),
            (
                "fluxmq_message_bytes_sent",
                "Payload bytes of messages delivered to subscribers, by delivered QoS.",
                st.sent_bytes_qos,
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=["qos"])
            for qos, value in zip(QOS_LABELS, values, strict=True):
                family.add_metric([qos], value)
            yield family
        yield CounterMetricFamily(
            "fluxmq_packets_received", "MQTT packets received.", value=st.messages_received
        )
        yield CounterMetricFamily(
            "fluxmq_network_bytes_received", "Bytes read from MQTT connections.", value=st.bytes_received
        )
        yield CounterMetricFamily(
            "fluxmq_network_bytes_sent", "Bytes written to MQTT connections.", value=st.bytes_sent
        )
        yield _by_label(
            CounterMetricFamily, "fluxmq_messages_dropped", "Messages dropped, by reason.", "reason", st.drops
        )
        budget = st.output_budget
        yield GaugeMetricFamily(
            "fluxmq_output_budget_bytes",
            "broker.output_memory_limit: pending output connections may hold beyond their base allowance.",
            value=budget.limit,
        )
        yield GaugeMetricFamily(
            "fluxmq_output_budget_used_bytes",
            "Output budget granted to connections now.",
            value=budget.in_use,
        )
        yield GaugeMetricFamily(
            "fluxmq_output_budget_peak_bytes", "Most output budget granted at once.", value=budget.peak
        )
        yield CounterMetricFamily(
            "fluxmq_output_budget_grants", "Allowance grows granted to reading clients.", value=budget.grants
        )
        yield CounterMetricFamily(
            "fluxmq_output_budget_refusals",
            "Allowance grows refused: the budget or the client's share was full.",
            value=budget.refusals,
        )
        yield GaugeMetricFamily(
            "fluxmq_uptime_seconds", "Seconds since the broker started.", value=st.uptime()
        )

    def _state(self, broker: Any) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "fluxmq_retained_messages", "Retained messages stored.", value=len(broker.retained)
        )
        yield CounterMetricFamily(
            "fluxmq_retained_refused",
            "New retained topics refused at the cap.",
            value=broker.retained.refused,
        )
        yield GaugeMetricFamily(
            "fluxmq_subscriptions", "Subscriptions (shared ones included).", value=broker.subscription_count()
        )
        sessions = broker.sessions
        online = broker.connected
        by_state = GaugeMetricFamily("fluxmq_sessions", "Sessions held, by state.", labels=["state"])
        by_state.add_metric(["connected"], online)
        by_state.add_metric(["offline"], max(0, len(sessions) - online))
        yield by_state
        # Summed in slices that yield to the hub: a scrape never stalls clients for the whole walk.
        queued, queued_bytes, inflight, deepest = session_totals(sessions)
        yield GaugeMetricFamily(
            "fluxmq_session_queue_messages", "Messages waiting in session queues.", value=queued
        )
        yield GaugeMetricFamily(
            "fluxmq_session_queue_bytes", "Bytes waiting in session queues.", value=queued_bytes
        )
        yield GaugeMetricFamily(
            "fluxmq_session_queue_max_messages", "Depth of the longest session queue.", value=deepest
        )
        yield GaugeMetricFamily(
            "fluxmq_inflight_messages", "Outbound QoS 1/2 messages awaiting acknowledgement.", value=inflight
        )

    @staticmethod
    def _latency(st: Any) -> Metric:
        cumulative = 0
        buckets = []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), st.latency_counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        return HistogramMetricFamily(
            "fluxmq_delivery_latency_seconds",
            f"Publish-to-delivery latency (routing, encoding, socket write), sampled 1 in {LATENCY_SAMPLE_MASK + 1} "
            "publishes.",
            buckets=buckets,
            sum_value=st.latency_sum,
        )

    #: per-queue counters exported (QueueManager.describe "counters")
    QUEUE_COUNTERS = (
        "appended",
        "delivered",
        "acked",
        "nacked",
        "rejected",
        "dead_lettered",
        "expired",
        "timed_out",
        "retention_dropped",
        "capture_refused",
        "undeliverable",
    )

    @classmethod
    def _queues(cls, manager: Any) -> Iterator[Metric]:
        described = manager.describe()
        depth = GaugeMetricFamily(
            "fluxmq_queue_depth", "Records stored in a durable queue.", labels=["queue"]
        )
        size = GaugeMetricFamily("fluxmq_queue_bytes", "Bytes stored in a durable queue.", labels=["queue"])
        consumers = GaugeMetricFamily(
            "fluxmq_queue_consumers", "Consumers of a durable queue.", labels=["queue"]
        )
        lag = GaugeMetricFamily(
            "fluxmq_queue_group_lag", "Records a consumer group has not settled.", labels=["queue", "group"]
        )
        aside = GaugeMetricFamily(
            "fluxmq_queue_group_undeliverable",
            "Records no member of a consumer group can take (Maximum Packet Size), kept until one joins.",
            labels=["queue", "group"],
        )
        counters = {
            name: CounterMetricFamily(
                f"fluxmq_queue_{name}", f"Durable queue records {name}.", labels=["queue"]
            )
            for name in cls.QUEUE_COUNTERS
        }
        for q in described:
            depth.add_metric([q["name"]], q["depth"])
            size.add_metric([q["name"]], q["bytes"])
            consumers.add_metric([q["name"]], q["consumers"])
            for group, g in q["groups"].items():
                lag.add_metric([q["name"], group], g["lag"])
                aside.add_metric([q["name"], group], g.get("undeliverable", 0))
            for name, family in counters.items():
                family.add_metric([q["name"]], q["counters"].get(name, 0))
        yield depth
        yield size
        yield consumers
        yield lag
        yield aside
        yield from counters.values()

    @staticmethod
    def _raft(groups: list[dict]) -> Iterator[Metric]:
        """Raft groups of replicated queues (the same figures as GET /cluster/raft)."""
        leader = GaugeMetricFamily(
            "fluxmq_raft_is_leader", "1 when this node leads (and delivers) the group.", labels=["group"]
        )
        term = GaugeMetricFamily("fluxmq_raft_term", "Current Raft term of the group.", labels=["group"])
        commit = GaugeMetricFamily(
            "fluxmq_raft_commit_index", "Raft commit index of the group.", labels=["group"]
        )
        applied = GaugeMetricFamily(
            "fluxmq_raft_applied_index", "Raft index applied to the queue store.", labels=["group"]
        )
        lag = GaugeMetricFamily(
            "fluxmq_raft_replica_lag",
            "Entries a replica is behind the commit index (leader only).",
            labels=["group", "replica"],
        )
        counters = {
            name: CounterMetricFamily(
                f"fluxmq_raft_{name}", f"Raft {name.replace('_', ' ')}.", labels=["group"]
            )
            for name in (
                "entries_submitted",
                "entries_applied",
                "entries_refused",
                "acks_timed_out",
                "snapshots_written",
                "snapshots_installed",
                "settlements_stale",
            )
        }
        log_len = GaugeMetricFamily(
            "fluxmq_raft_log_entries", "Raft log entries kept since the last snapshot.", labels=["group"]
        )
        for g in groups:
            name = g["name"]
            leader.add_metric([name], 1 if g["delivering"] else 0)
            term.add_metric([name], g.get("term", 0))
            commit.add_metric([name], g.get("commit_index", 0))
            applied.add_metric([name], g["applied"])
            log_len.add_metric([name], g.get("log_len", 0))
            for replica, behind in g.get("lag", {}).items():
                lag.add_metric([name, replica], behind)
            for key, family in counters.items():
                family.add_metric([name], g[key])
        yield leader
        yield term
        yield commit
        yield applied
        yield lag
        yield log_len
        yield from counters.values()

    @staticmethod
    def _http(bridge: Any) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "fluxmq_http_requests",
            "HTTP bridge requests, by endpoint and status.",
            labels=["endpoint", "code"],
        )
        for (endpoint, code), value in sorted(bridge.requests.items()):
            requests.add_metric([endpoint, str(code)], value)
        yield requests
        yield GaugeMetricFamily(
            "fluxmq_sse_queue_messages",
            "Messages waiting in HTTP subscribe stream queues.",
            value=bridge.queued(),
        )

    @staticmethod
    def _webhooks(webhooks: Any) -> Iterator[Metric]:
        sent = CounterMetricFamily(
            "fluxmq_webhook_sent", "Webhook events an endpoint accepted (2xx).", labels=["endpoint"]
        )
        failed = CounterMetricFamily(
            "fluxmq_webhook_failed", "Webhook events given up after their last attempt.", labels=["endpoint"]
        )
        retried = CounterMetricFamily(
            "fluxmq_webhook_retried", "Webhook attempts after the first.", labels=["endpoint"]
        )
        dropped = CounterMetricFamily(
            "fluxmq_webhook_dropped",
            "Webhook events dropped unsent: queue_full, breaker_open or shutdown.",
            labels=["endpoint", "reason"],
        )
        state = GaugeMetricFamily(
            "fluxmq_webhook_breaker_state",
            "Circuit breaker of each endpoint: 0 closed, 1 half-open, 2 open.",
            labels=["endpoint"],
        )
        opened = CounterMetricFamily(
            "fluxmq_webhook_breaker_opened", "Times each endpoint's breaker opened.", labels=["endpoint"]
        )
        for endpoint in webhooks.endpoints:
            name = [endpoint.name]
            sent.add_metric(name, endpoint.sent)
            failed.add_metric(name, endpoint.failed)
            retried.add_metric(name, endpoint.retried)
            for reason, value in sorted(endpoint.dropped.items()):
                dropped.add_metric([endpoint.name, reason], value)
            state.add_metric(name, endpoint.breaker.level)
            opened.add_metric(name, endpoint.breaker.opened)
        yield from (sent, failed, retried, dropped, state, opened)
        yield GaugeMetricFamily(
            "fluxmq_webhook_queue_events", "Webhook events waiting to be sent.", value=len(webhooks.queue)
        )

    @staticmethod
    def _coap(coap: Any) -> Iterator[Metric]:
        """The CoAP bridge (``fluxmq.coap.bridge.CoapBridge``): plain counters read at scrape time."""
        responses = CounterMetricFamily(
            "fluxmq_coap_responses", "CoAP responses sent, by code (e.g. 2.04).", labels=["code"]
        )
        for code, value in sorted(coap.responses.items()):
            responses.add_metric([f"{code >> 5}.{code & 31:02d}"], value)
        yield responses
        yield _by_label(
            CounterMetricFamily,
            "fluxmq_coap_dropped_datagrams",
            "CoAP datagrams dropped, by reason.",
            "reason",
            coap.dropped,
        )
        yield CounterMetricFamily(
            "fluxmq_coap_retransmissions",
            "Duplicate CoAP requests answered from the exchange cache, and CON notifications resent.",
            value=coap.retransmissions,
        )
        yield GaugeMetricFamily(
            "fluxmq_coap_observations", "CoAP observations open now.", value=len(coap.observations)
        )
        yield CounterMetricFamily(
            "fluxmq_coap_observations_opened",
            "CoAP observations opened since start.",
            value=coap.observations_total,
        )
        yield GaugeMetricFamily(
            "fluxmq_coap_queue_messages",
            "Notifications waiting in observation queues.",
            value=sum(len(o.queue) for o in coap.observations.values()),
        )


def make_registry(service: Any, bridge: Any = None) -> CollectorRegistry:
    """A registry with the fluxmq collector plus process, platform and GC metrics of this process."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(service, bridge))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def make_metrics_app(registry: CollectorRegistry) -> Callable[[dict, Callable], list[bytes]]:
    """The WSGI app of ``GET /metrics`` (text format 0.0.4, or OpenMetrics when the scraper asks)."""

    def app(environ: dict, start_response: Callable) -> list[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            return json_response(
                start_response, 404, {"error": "not found", "path": environ.get("PATH_INFO")}
            )
        method = environ.get("REQUEST_METHOD", "GET").upper()
        if method != "GET":
            return json_response(
                start_response,
                405,
                {"error": "method not allowed", "method": method, "path": "/metrics"},
                {"Allow": allow_value(("GET",))},
            )
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        data = encoder(registry)
        start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(data)))])
        return [data]

    return lambda environ, start_response: answer_head(app, environ, start_response)  # HEAD too


# -- several workers (server.workers): the node's totals -------------------------------------------

#: families whose value is the same on every worker (the local one is kept, not summed)
SAME_ON_EVERY_WORKER = frozenset({"fluxmq_build_info", "fluxmq_retained_messages", "python_info"})
#: families whose node value is the largest worker value
LARGEST = frozenset(
    {
        "fluxmq_uptime_seconds",
        "fluxmq_session_queue_max_messages",
        "fluxmq_output_budget_peak_bytes",
        "process_max_fds",
    }
)
#: families whose node value is the smallest worker value
SMALLEST = frozenset({"process_start_time_seconds"})


def families_to_json(registry: Any) -> list:
    """Every family of ``registry`` as plain lists (name, type, doc, samples): what a worker sends
    another one that serves a scrape."""
    return [
        [m.name, m.type, m.documentation, [[s.name, s.labels, s.value] for s in m.samples]]
        for m in registry.collect()
    ]


class NodeTotalsRegistry:
    """The registry a worker's ``/metrics`` serves when the node has several workers: its own families
    merged with those the other workers answer (``others() -> list of families_to_json``). Counters,
    histograms and most gauges are summed per sample; see ``SAME_ON_EVERY_WORKER``, ``LARGEST`` and
    ``SMALLEST`` for the rest. ``fluxmq_workers_answering`` says how many workers the figures cover."""

    def __init__(self, registry: Any, others: Callable[[], list]) -> None:
        self.registry = registry
        self.others = others

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        values: dict[str, dict[tuple, float]] = {}
        for m in self.registry.collect():
            families[m.name] = m
            values[m.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in m.samples}
        answering = 1
        for worker in self.others():
            answering += 1
            for name, typ, doc, samples in worker:
                if name not in families:
                    families[name] = Metric(name, doc, typ)
                    values[name] = {}
                if name in SAME_ON_EVERY_WORKER:
                    continue
                mine = values[name]
                for sname, labels, value in samples:
                    key = (sname, tuple(sorted(labels.items())))
                    old = mine.get(key)
                    if old is None:
                        mine[key] = value
                    elif name in LARGEST:
                        mine[key] = max(old, value)
                    elif name in SMALLEST:
                        mine[key] = min(old, value)
                    else:
                        mine[key] = old + value
        for name, family in families.items():
            merged = Metric(family.name, family.documentation, family.type)
            for (sname, labels), value in values[name].items():
                merged.add_sample(sname, dict(labels), value)
            yield merged
        yield GaugeMetricFamily(
            "fluxmq_workers_answering",
            "Worker processes whose figures this scrape sums (server.workers).",
            value=answering,
        )
