"""gRPC between the nodes: the server every node runs, one channel and data link per peer, mTLS.

* ``Route`` (a stream per peer, see ``forwarder.PeerLink``) carries batches of forwarded messages
  and interest changes; ``on_batch(batch) -> BatchAck`` applies each one (``ClusterPeers.receive``:
  the ack of a batch that stored anything returns after the commit that holds it).
* ``Call`` is a unary control RPC dispatched by ``kind`` to the handler registered with
  ``handle(kind, fn)``; ``call(node_id, kind, payload, timeout)`` makes one (session takeover,
  retained payload fetch, ...).

grpcio runs under gevent only after ``grpc.experimental.gevent.init_gevent()`` (``ClusterNode``
calls it before anything of grpc is created); its server handlers then run in greenlets of the
node's hub, so they call the broker directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent import futures

import gevent
import grpc
from gevent.queue import Queue

from fluxmq._core.forward import LinksVersion
from fluxmq.errors import ServerUnavailable, StorageError

from .batch import ack_message
from .forwarder import PeerLink
from .proto import cluster_pb2 as pb
from .proto import cluster_pb2_grpc as pb_grpc

log = logging.getLogger("fluxmq.cluster.transport")

# Handlers running at once (each Route stream holds one for its life, each Call one per call).
SERVER_WORKERS = 256
MAX_GRPC_MESSAGE = 512 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE),
    ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    # (a restarted peer is tried again within half a second; a dead one costs two connects a second)
    ("grpc.max_reconnect_backoff_ms", 500),
]
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE),
    ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # gRPC sets SO_REUSEPORT by default: a port another process holds with it (another node given
    # the same port, a multi-worker node's MQTT listener) would be shared silently, half of the
    # peers' streams answered by a stranger; without it the bind fails and the node stops with one line.
    ("grpc.so_reuseport", 0),
]


class PeerUnavailable(ServerUnavailable):
    """A control call to a peer failed: no such peer, unreachable, timed out, or its handler failed."""


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


#: batches of one stream applied and not yet acknowledged, at most (the sender's
#: ``batches_in_flight`` keeps it lower): the reader waits beyond it
ROUTE_PIPELINE = 64
_END = object()


def _read_batches(request_iterator, on_batch, answers: Queue) -> None:
    """``Route``'s reader: each batch applied in arrival order, its answer (a ``BatchAck``, a
    ``PendingAck``, or what the stream raised) queued for the acks."""
    try:
        for batch in request_iterator:
            answers.put(on_batch(batch))
    except Exception as exc:  # the stream broke (or a batch raised): ends the acks with it
        answers.put(exc)
        return
    answers.put(_END)


class _Servicer(pb_grpc.ClusterTransportServicer):
    def __init__(self, transport: ClusterTransport) -> None:
        self.transport = transport

    def Route(self, request_iterator, context):  # noqa: N802 (gRPC's name)
        """``acks`` as ``BatchAck`` messages (gRPC serializes them)."""
        for ack in self.acks(request_iterator):
            yield ack_message(ack)

    def acks(self, request_iterator):
        """The acks of a peer's stream of batches, in order: a ``BatchAck``, or a plain one's
        sequence id alone (an ``int``: ``on_batch`` may answer so, and the Unix transport frames it
        without a protobuf message, ``batch.encode_ack``). While every batch's ack is ready at once
        (it stored nothing, the common case between workers) the batches are applied here, one
        greenlet for the stream. From the first ack that must wait for a commit (a ``PendingAck``:
        the batch stored something) a reader greenlet reads and applies the rest of the stream
        while this one sends each ack once its commit is done: with ``storage.sync: always`` the
        stream waits for one fsync at a time, not for one per batch in turn."""
        on_batch = self.transport.on_batch
        reader = None
        try:
            for batch in request_iterator:
                answer = on_batch(batch)
                if type(answer) is int or type(answer) is pb.BatchAck:
                    yield answer
                    continue
                answers: Queue = Queue(ROUTE_PIPELINE)
                reader = gevent.spawn(_read_batches, request_iterator, on_batch, answers)
                yield answer.get()
                while True:
                    answer = answers.get()
                    if answer is _END:
                        return
                    if isinstance(answer, BaseException):
                        raise answer
                    yield answer if type(answer) is int or type(answer) is pb.BatchAck else answer.get()
        except StorageError as exc:
            # What the batch stored is not committed: no ack (nor any after it); the stream ends
            # and the sender sends the unacknowledged batches again on its next stream (the store
            # retries its commit meanwhile; those applied already are skipped as applied).
            log.error("peer_batch_not_committed", extra={"error": str(exc)})
        finally:
            if reader is not None:
                try:
                    reader.kill(block=False)
                except RuntimeError:  # an abandoned generator finalized outside any greenlet
                    pass

    def Call(self, request, context):  # noqa: N802
        fn = self.transport.handlers.get(request.kind)
        if fn is None:
            return pb.CallReply(error=f"no handler for {request.kind!r} on {self.transport.node_id}")
        try:
            return pb.CallReply(payload=fn(request.sender, request.payload))
        except ServerUnavailable as exc:  # an answer (stopping, claiming): the caller logs it
            return pb.CallReply(error=f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            log.exception("call_handler_failed", extra={"kind": request.kind, "from": request.sender})
            return pb.CallReply(error=f"{type(exc).__name__}: {exc}")


class ClusterTransport:
    """The node's gRPC server and its links to the peers (``set_peers``)."""

    server_options = SERVER_OPTIONS

    def __init__(
        self,
        node_id: str,
        epoch: int,
        settings,
        on_batch: Callable[[pb.Batch], pb.BatchAck | int],
        local_filters: Callable[[], object],
        on_ack=None,
        on_peer_removed: Callable[[str], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.epoch = epoch
        self.settings = settings
        self.on_batch = on_batch
        self.local_filters = local_filters
        self.on_ack = on_ack
        self.on_peer_removed = on_peer_removed
        self.handlers: dict[str, Callable[[str, bytes], bytes]] = {}
        self.links: dict[str, PeerLink] = {}
        #: bumped whenever ``links`` changes (a link added or removed) or a link's ``forward_queue``
        #: is replaced: the C relay keeps a route's queues while it stays the same
        self.links_version = LinksVersion()
        self.server: grpc.Server | None = None
        self.port = 0
        self._channel_credentials = None
        self._next_epoch = epoch

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        s = self.settings
        self.server = server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=SERVER_WORKERS), options=self.server_options
        )
        pb_grpc.add_ClusterTransportServicer_to_server(_Servicer(self), server)
        if s.tls_enabled:
            key, cert, ca = _read(s.key_file), _read(s.cert_file), _read(s.ca_file)
            server_creds = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca, require_client_auth=True
            )
            add = lambda: server.add_secure_port(s.bind_addr, server_creds)  # noqa: E731
            self._channel_credentials = grpc.ssl_channel_credentials(
                root_certificates=ca, private_key=key, certificate_chain=cert
            )
        else:
            add = lambda: server.add_insecure_port(s.bind_addr)  # noqa: E731
        try:
            self.port = add()
        except RuntimeError:  # grpcio >= 1.60 raises where older ones returned port 0
            self.port = 0
        if not self.port:
            raise OSError(
                f"cluster.transport.bind_addr {s.bind_addr}: cannot listen (the port is in use, or the "
                "host is not an address of this machine)"
            )
        server.start()
        log.info(
            "cluster_transport_listening",
            extra={"addr": s.bind_addr, "port": self.port, "tls": s.tls_enabled, "node_id": self.node_id},
        )

    def stop(self, timeout: float = 1.0) -> None:
        """Send what is queued to reachable peers (within ``timeout``), then close everything."""
        deadline = time.monotonic() + timeout
        for link in list(self.links.values()):
            link.flush(max(0.0, deadline - time.monotonic()))
        for node_id in list(self.links):
            self._remove(node_id)
        if self.server is not None:
            self.server.stop(grace=0.2)
            self.server = None

    # -- peers ---------------------------------------------------------------------------------

    def set_peers(self, peers: dict[str, str]) -> None:
        """The cluster's other nodes, ``node_id -> host:port`` (this node's own id is skipped). Links
        to new peers open, links to peers no longer listed close, a changed address re-opens."""
        wanted = {n: a for n, a in peers.items() if n != self.node_id}
        for node_id in list(self.links):
            if node_id not in wanted or self.links[node_id].addr != wanted[node_id]:
                self._remove(node_id)
        for node_id, addr in wanted.items():
            if node_id not in self.links:
                # Each link numbers its batches from 1 under an epoch of its own: a peer removed and
                # added again (membership) must not see the new link's batches as retries of the old.
                epoch = self._next_epoch = max(self._next_epoch + 1, time.time_ns())
                self.links[node_id] = PeerLink(
                    node_id,
                    addr,
                    self.node_id,
                    epoch,
                    self._link_settings(addr),
                    self._channel(addr),
                    self.local_filters,
                    self.on_ack,
                )
                self.links_version.bump()
                log.info("peer_added", extra={"peer": node_id, "addr": addr})

    def _link_settings(self, addr: str):
        """The settings of a new link to ``addr`` (its batching and queue bounds)."""
        return self.settings

    def _remove(self, node_id: str) -> None:
        link = self.links.pop(node_id, None)
        if link is None:
            return
        self.links_version.bump()
        link.close()
        link.channel.close()
        if self.on_peer_removed is not None:
            self.on_peer_removed(node_id)
        log.info("peer_removed", extra={"peer": node_id})

    def _channel(self, addr: str) -> grpc.Channel:
        if self._channel_credentials is not None:
            return grpc.secure_channel(addr, self._channel_credentials, options=CHANNEL_OPTIONS)
        return grpc.insecure_channel(addr, options=CHANNEL_OPTIONS)

    def drain(self, node_id: str, timeout: float) -> bool:
        """Wait (bounded) until the messages queued for ``node_id`` so far are acknowledged, i.e.
        applied there (a takeover asks for the state after them); True at once when none are."""
        link = self.links.get(node_id)
        return link is None or link.drain(timeout)

    def reachable(self) -> list[str]:
        return [n for n, link in self.links.items() if link.connected]

    def peer_state(self) -> dict[str, dict]:
        """Per peer: reachable, queued, in flight, forwarded batches/messages, failures, drops."""
        return {node_id: link.state() for node_id, link in self.links.items()}

    # -- interest ------------------------------------------------------------------------------

    def interest_changed(self, filter: str, added: bool) -> list[tuple[PeerLink, int]]:
        """Send an interest change to every peer; returns (link, version) of the open streams."""
        pending = []
        for link in self.links.values():
            version = link.interest_changed(filter, added)
            if version is not None:
                pending.append((link, version))
        return pending

    def wait_interest(self, pending: list[tuple[PeerLink, int]], timeout: float) -> bool:
        """Block until every reachable peer of ``pending`` applied its change (bounded by ``timeout``
        in all); False when one did not in time."""
        deadline = gevent.get_hub().loop.now() + timeout
        ok = True
        for link, version in pending:
            left = deadline - gevent.get_hub().loop.now()
            if not link.wait_interest(version, max(0.0, left)) and link.connected:
                ok = False
        return ok

    # -- control calls -------------------------------------------------------------------------

    def handle(self, kind: str, fn: Callable[[str, bytes], bytes]) -> None:
        """Serve ``kind`` calls with ``fn(from_node, payload) -> reply`` (in the call's greenlet)."""
        self.handlers[kind] = fn

    def call(self, node_id: str, kind: str, payload: bytes, timeout: float) -> bytes:
        """One unary control call to a peer; raises PeerUnavailable."""
        link = self.links.get(node_id)
        if link is None:
            raise PeerUnavailable(f"no peer {node_id!r} in the cluster")
        try:
            reply = link.stub.Call(
                pb.CallRequest(sender=self.node_id, kind=kind, payload=payload), timeout=timeout
            )
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            raise PeerUnavailable(f"peer {node_id} ({link.addr}): {getattr(code, 'name', code)}") from None
        if reply.error:
            raise PeerUnavailable(f"peer {node_id}: {reply.error}")
        return reply.payload
