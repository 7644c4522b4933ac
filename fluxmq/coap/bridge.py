"""The CoAP bridge: RFC 7252 requests onto the broker's public API, independent of the transport.

Routes (``/a/b`` is the Uri-Path ``a``, ``b``)::

    POST|PUT /mqtt/publish/{topic...}  or  /{topic...}   publish the payload -> 2.04 Changed
             ?qos=0|1|2&retain=true&client_id=..&username=..&password=..
             $queue/{name}/$ack|$nack|$reject: ?message_id=..&group_id=.. name the delivery;
             4.04 when it settled nothing
    GET      /{topic...}                                 the retained message -> 2.05, or 4.04
    GET      /{topic or filter...} with Observe=0        observe (RFC 7641): one notification per publish
    GET      /.well-known/core                           RFC 6690 link format
    GET      /health                                     2.05 "healthy"

A filter level ``+`` is sent as is and ``#`` percent-encoded (``%23``, which CoAP clients turn into
the Uri-Path ``#``). Each notification carries the MQTT topic in the elective experimental option
65000 (``codec.TOPIC``) and its Content-Format when the message's content type has one.

Reliability:

* **Acknowledged means stored.** A QoS 1/2 publish is answered (2.04, piggybacked on the ACK) only
  after ``Broker.wait_committed`` returns, i.e. after the commit that holds the message; the wait
  runs in a bounded pool (``COMMIT_WAITERS``), and a request arriving with the pool full is refused
  with 5.03 before anything is published. A commit normally lands within one hub turn, far inside
  ACK_TIMEOUT (2 s), so the response stays piggybacked; a retransmission during the wait is
  recognised by its message id and ignored, and once answered gets the cached answer.
* **No peer stalls the others.** One reader greenlet takes every datagram; what may wait (a QoS
  1/2 publish's commit, an Observe's subscription waiting for the other workers or nodes to
  acknowledge a filter new here) runs in the bounded pool, its answer sent from there.
* **Once per message id.** Requests are de-duplicated by (peer, message id) for EXCHANGE_LIFETIME
  (247 s), the answer cached and resent (``MAX_EXCHANGES`` bounds the cache; past it the oldest
  exchanges are forgotten first).
* **Bounded observers.** An observation is a broker session (clean, QoS 0) whose ``Delivery`` is an
  ``Observation`` with a bounded drop-oldest queue (``observe_queue_size``), like the HTTP bridge's
  SSE stream. Observations are bounded in total and per peer. A notification is CON at least every
  24 (RFC 7641 §4.5) and whenever the previous CON is still unanswered; an RST, a GET with Observe=1,
  or a CON that exhausts MAX_RETRANSMIT ends the observation and its session.
* **Amplification bound.** A response to a request from an unverified peer (plain UDP without
  accepted credentials) is at most ``AMPLIFICATION_FACTOR`` times the request's size: a larger
  representation goes out block-wise (Block2) in blocks that fit, as RFC 7252 §11.3 suggests; an
  observation of such a peer sends its first notification as CON and nothing more until it is ACKed.
* **Rates.** Requests per source IP are limited by ``limits.publish_rate`` / ``publish_burst``;
  over it a CON gets 4.29 (RFC 8516) and a NON is dropped.
* **Bounded blocks.** Block1 parts received and Block2 representations sent are kept per peer in
  a ``PeerBodies`` each: bounded per peer, in bytes and peers in all, and forgotten once the peer
  is silent for EXCHANGE_LIFETIME.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import OrderedDict
from typing import Any, Protocol

import gevent
from gevent.event import Event
from gevent.pool import Pool

from fluxmq.auth.limits import TokenBucket
from fluxmq.broker.broker import Broker
from fluxmq.broker.held import settled_nothing, wait_held
from fluxmq.broker.message import CONTENT_TYPE, USER_PROPERTY, Message
from fluxmq.broker.prefixes import is_settlement
from fluxmq.errors import (
    MalformedDatagram,
    QueueRefused,
    QuotaExceeded,
    StorageError,
    TopicFilterInvalid,
    TopicNameInvalid,
)

from . import codec
from .codec import CoapMessage
from .observation import Observation
from .peer_bodies import EXCHANGE_LIFETIME, PeerBodies
from .settings import ACK_RANDOM_FACTOR, CoapSettings

log = logging.getLogger("fluxmq.coap")

MAX_EXCHANGES = 65536  # de-duplication entries kept (oldest forgotten first)
MAX_CACHED_RESPONSE = 512  # larger answers (Block2 reads) are re-computed for a duplicate: GET is safe
CON_EVERY = 24  # RFC 7641 §4.5: a CON notification at least every 24 hours or so; here every 24 messages
AMPLIFICATION_FACTOR = 3  # as QUIC's anti-amplification limit (RFC 9000 §8)
COMMIT_WAITERS = 256  # QoS 1/2 publishes waiting for their commit at once
MAX_RATE_ADDRESSES = 65536
MAX_REASSEMBLIES_PER_PEER = 4
MAX_REASSEMBLY_BYTES = (
    64 << 20
)  # every peer's partial Block1 bodies together (least recently used peers go first)
MAX_REPRESENTATIONS_PER_PEER = 8  # Block2 continuations served from a snapshot of the first block's body
MAX_REPRESENTATION_BYTES = 64 << 20  # all those snapshots together (least recently used peers go first)
OBSERVE_MAX = 1 << 24
CLIENT_ID = "coap-bridge"  # the client id requests are checked as when they give none
OBSERVER_PREFIX = "coap-obs-"
QUERY_KEYS = frozenset({"qos", "retain", "client_id", "username", "password", "message_id", "group_id"})
#: query parameters of a settlement (``$queue/{name}/$ack`` ...) -> the user properties naming its delivery
SETTLE_KEYS = (("message_id", "message-id"), ("group_id", "group-id"))
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})
_PENDING = object()  # an exchange whose answer waits for a commit
_RECOMPUTE = object()  # an exchange whose answer was too large to cache (a GET: safe to answer again)

WELL_KNOWN_CORE = (
    b'</mqtt/publish>;rt="mqtt.publish";title="POST /mqtt/publish/{topic}",'
    b'</health>;rt="health";ct=0,'
    b'</>;rt="mqtt.topic";obs;title="GET|POST /{topic}, GET Observe on a filter"'
)


class Transport(Protocol):
    """Where a bridge sends datagrams (a UDP socket, or DTLS sessions)."""

    name: str

    def sendto(self, data: bytes, peer: Any) -> None:
        """Send one datagram to ``peer``; never raises for a peer that went away."""


class CoapRefusal(Exception):
    """A request answered with an error ``code`` and a short diagnostic payload (§5.5.2)."""

    def __init__(self, response_code: int, diagnostic: str = "") -> None:
        super().__init__(diagnostic)
        self.code = response_code
        self.diagnostic = diagnostic


class Request:
    """One request being answered: the message, who sent it, and what the answer may cost."""

    __slots__ = ("msg", "peer", "transport", "identity", "size", "verified", "key")

    def __init__(
        self,
        msg: CoapMessage,
        peer: Any,
        transport: Transport,
        identity: str | None,
        size: int,
        verified: bool = False,
    ) -> None:
        self.msg = msg
        self.peer = peer
        self.transport = transport
        self.identity = identity  # the DTLS identity (certificate CN or PSK identity), or None
        self.size = size
        self.verified = verified  # DTLS peers proved their address in the handshake
        self.key = (transport.name, peer)


class CoapBridge:
    """Answers CoAP datagrams from any transport; one per node (plain UDP and DTLS share it)."""

    def __init__(self, broker: Broker, settings: CoapSettings | None = None) -> None:
        self.broker = broker
        self.settings = settings or CoapSettings()
        self.exchanges: OrderedDict[tuple, list] = (
            OrderedDict()
        )  # (transport, peer, mid) -> [expires, answer]
        self.observations: dict[tuple, Observation] = {}  # (transport, peer, token) -> observation
        self.observers_per_peer: dict[tuple, int] = {}
        self.notification_mids: OrderedDict[tuple, Observation] = OrderedDict()  # (transport, peer, mid)
        # peer key -> its Block1 transfers in progress (request key -> body so far)
        self.reassembly = PeerBodies(MAX_REASSEMBLY_BYTES, MAX_RATE_ADDRESSES)
        # peer key -> path -> the representation its later Block2 blocks are served from
        self.representations = PeerBodies(MAX_REPRESENTATION_BYTES, MAX_RATE_ADDRESSES)
        self.rates: OrderedDict[str, TokenBucket] = OrderedDict()
        self.commit_waiters = Pool(COMMIT_WAITERS)
        self._mid = int.from_bytes(os.urandom(2), "big")
        self._ready: list[Observation] = []
        self.awaiting_ack: set[Observation] = set()  # observations with a CON notification in flight
        self._wake = Event()
        self._greenlets: list[gevent.Greenlet] = []
        # metrics (read by /metrics at scrape time)
        self.responses: dict[int, int] = {}  # response code -> count
        self.dropped: dict[str, int] = {}  # reason -> datagrams dropped
        self.retransmissions = 0  # duplicate requests answered from the cache, and CONs resent
        self.observations_total = 0

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._greenlets = [gevent.spawn(self._notify_loop), gevent.spawn(self._retransmit_loop)]

    def stop(self) -> None:
        for obs in list(self.observations.values()):
            self.end_observation(obs, "shutdown")
        gevent.killall(self._greenlets, block=False)
        self.commit_waiters.kill(block=False)

    def reload(self, config: Any) -> set[str]:
        """Apply the reloadable keys (a ``BrokerService`` reload hook); returns them."""
        new = CoapSettings.from_config(config)
        new.max_message_size = self.settings.max_message_size  # as the MQTT listeners: fixed at start
        self.settings = new
        self.rates.clear()
        return {
            "server.coap.observe_queue_size",
            "server.coap.max_observations",
            "server.coap.max_observations_per_peer",
            "server.coap.block_size",
            "server.coap.max_reassembly_bytes",
        }

    # -- metrics helpers -------------------------------------------------------------------------

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def next_mid(self) -> int:
        self._mid = (self._mid + 1) & 0xFFFF
        return self._mid

    # -- datagrams in ----------------------------------------------------------------------------

    def datagram(
        self,
        data: bytes,
        peer: Any,
        transport: Transport,
        identity: str | None = None,
        verified: bool = False,
    ) -> None:
        """One datagram from ``peer``; never raises (a bad one is counted and dropped). ``identity``
        is the DTLS user name, if any; ``verified`` says the peer's address is proven (DTLS)."""
        try:
            msg = codec.parse(data)
        except MalformedDatagram:
            self.drop("malformed")
            # §4.2: a CON that cannot be processed is rejected with RST (4 bytes: no amplification)
            if len(data) >= 4 and data[0] >> 6 == codec.VERSION and (data[0] >> 4) & 3 == codec.CON:
                transport.sendto(codec.empty(codec.RST, (data[2] << 8) | data[3]), peer)
            return
        try:
            self._message(msg, Request(msg, peer, transport, identity, len(data), verified))
        except Exception:  # a bug must not stop the listener: log it, drop the datagram
            self.drop("error")
            log.exception("coap_request_failed", extra={"peer": str(peer)})

    def _message(self, msg: CoapMessage, req: Request) -> None:
        mtype = msg.mtype
        if msg.code == codec.EMPTY:
            if mtype == codec.CON:  # CoAP ping (§4.3): answered with RST
                req.transport.sendto(codec.empty(codec.RST, msg.mid), req.peer)
            elif mtype in (codec.ACK, codec.RST):
                self._acknowledged(req.key, msg.mid, mtype == codec.RST)
            return
        if not msg.is_request:
            if mtype == codec.CON:  # a response we did not ask for (§4.2)
                req.transport.sendto(codec.empty(codec.RST, msg.mid), req.peer)
            elif mtype == codec.RST:
                self._acknowledged(req.key, msg.mid, True)
            else:
                self.drop("unexpected_response")
            return
        if mtype not in (codec.CON, codec.NON):
            self.drop("malformed")  # a request in an ACK or RST (§4.2)
            return
        xkey = (*req.key, msg.mid)
        entry = self.exchanges.get(xkey)
        now = time.monotonic()
        if entry is not None and entry[0] > now:
            answer = entry[1]
            if answer is _PENDING:
                self.retransmissions += 1
                return  # answered once its commit lands
            if answer is not _RECOMPUTE:
                self.retransmissions += 1
                if answer:  # b"": the first answer was suppressed (No-Response)
                    req.transport.sendto(answer, req.peer)
                return
        if not self._rate_ok(req.peer):
            self.drop("rate_limited")
            if mtype == codec.CON:
                self._answer(req, codec.TOO_MANY_REQUESTS, b"", [(codec.MAX_AGE, codec.encode_uint(1))])
            return
        self._remember(xkey, now, _PENDING)
        try:
            self._request(req)
        except CoapRefusal as refusal:
            self._answer(req, refusal.code, refusal.diagnostic.encode("utf-8"))
        except MalformedDatagram as exc:
            self._answer(req, codec.BAD_REQUEST, str(exc).encode("utf-8"))
        except Exception:
            self._answer(req, codec.INTERNAL_SERVER_ERROR)  # not left pending for EXCHANGE_LIFETIME
            raise

    def _remember(self, xkey: tuple, now: float, answer: object) -> None:
        exchanges = self.exchanges
        while exchanges:
            oldest = next(iter(exchanges.values()))
            if oldest[0] > now and len(exchanges) < MAX_EXCHANGES:
                break
            exchanges.popitem(last=False)
        exchanges[xkey] = [now + EXCHANGE_LIFETIME, answer]

    def _rate_ok(self, peer: Any) -> bool:
        rate = self.settings.request_rate
        if rate <= 0:
            return True
        address = peer[0] if isinstance(peer, tuple) else str(peer)
        rates = self.rates
        bucket = rates.get(address)
        if bucket is None:
            if len(rates) >= MAX_RATE_ADDRESSES:
                rates.popitem(last=False)
            bucket = rates[address] = TokenBucket(rate, self.settings.request_burst)
        else:
            rates.move_to_end(address)
        return bucket.take()

    # -- answers ---------------------------------------------------------------------------------

    def _answer(
        self,
        req: Request,
        response_code: int,
        payload: bytes = b"",
        options: list[tuple[int, bytes]] | None = None,
    ) -> None:
        """Send the response to ``req`` (piggybacked on the ACK of a CON, a NON for a NON) and
        cache it for retransmissions. Payloads of unverified peers are cut to the amplification budget."""
        msg = req.msg
        self.responses[response_code] = self.responses.get(response_code, 0) + 1
        xkey = (*req.key, msg.mid)
        entry = self.exchanges.get(xkey)
        if msg.mtype == codec.NON and msg.options:
            no_response = msg.option(codec.NO_RESPONSE)
            if no_response is not None and codec.decode_uint(no_response) & (1 << ((response_code >> 5) - 1)):
                # RFC 7967: the client asked not to hear about this class (a CON is always ACKed)
                if entry is not None:
                    entry[1] = b""
                return
        if msg.mtype == codec.CON:
            response = CoapMessage(codec.ACK, response_code, msg.mid, msg.token, options or [], payload)
        else:
            response = CoapMessage(
                codec.NON, response_code, self.next_mid(), msg.token, options or [], payload
            )
        data = codec.serialize(response)
        budget = self._budget(req)
        if budget is not None and len(data) > budget and payload and response_code >= codec.BAD_REQUEST:
            # a diagnostic payload is optional (§5.5.2): drop it rather than amplify
            response.payload = b""
            data = codec.serialize(response)
        if entry is not None:
            # only a GET is safe to answer again; anything else keeps its answer however large
            entry[1] = data if len(data) <= MAX_CACHED_RESPONSE or msg.code != codec.GET else _RECOMPUTE
        req.transport.sendto(data, req.peer)

    def _budget(self, req: Request) -> int | None:
        return None if req.verified else AMPLIFICATION_FACTOR * req.size

    def _answer_body(
        self, req: Request, response_code: int, body: bytes, options: list[tuple[int, bytes]], path_key: str
    ) -> None:
        """A 2.05 with ``body``: whole when it fits, else its first (or asked-for) Block2 block."""
        msg = req.msg
        num, szx = 0, None
        block2 = msg.option(codec.BLOCK2)
        if block2 is not None:
            num, _, szx = codec.decode_block(block2)
            if num > 0:
                cached = self._representation(req.key, path_key)
                if cached is not None:
                    body = cached
        size = self._block_limit(req, options, szx)
        if len(body) <= size and num == 0:
            self._answer(req, response_code, body, options)
            return
        szx = max(0, min(6, size.bit_length() - 5))
        block = codec.block_size(szx)
        start = num * block
        if start >= len(body) and body:
            raise CoapRefusal(codec.BAD_OPTION, "Block2 past the end of the representation")
        if num == 0:
            self._keep_representation(req.key, path_key, body)
        more = start + block < len(body)
        options = [
            *options,
            (codec.BLOCK2, codec.encode_block(num, more, szx)),
            (codec.SIZE2, codec.encode_uint(len(body))),
        ]
        self._answer(req, response_code, body[start : start + block], options)

    def _block_limit(self, req: Request, options: list[tuple[int, bytes]], szx: int | None) -> int:
        """The largest body this answer may carry in one datagram."""
        limit = self.settings.block_size
        if szx is not None:
            limit = min(limit, codec.block_size(szx))
        budget = self._budget(req)
        if budget is not None:
            overhead = 4 + len(req.msg.token) + sum(3 + len(v) for _, v in options) + 8
            limit = min(limit, max(16, budget - overhead))
        return limit

    def _representation(self, peer_key: tuple, path_key: str) -> bytes | None:
        return self.representations.get(peer_key, path_key, time.monotonic())

    def _keep_representation(self, peer_key: tuple, path_key: str, body: bytes) -> None:
        now = time.monotonic()
        reps = self.representations.take(peer_key, now)
        reps.pop(path_key, None)
        reps[path_key] = body
        while len(reps) > MAX_REPRESENTATIONS_PER_PEER:
            del reps[next(iter(reps))]  # the peer's oldest
        self.representations.put(peer_key, reps, now)

    # -- requests --------------------------------------------------------------------------------

    def _request(self, req: Request) -> None:
        msg = req.msg
        critical = msg.unknown_critical()
        if critical is not None:
            raise CoapRefusal(codec.BAD_OPTION, f"unknown critical option {critical}")
        path = msg.uri_path()
        method = msg.code
        if path == [".well-known", "core"]:
            if method != codec.GET:
                raise CoapRefusal(codec.METHOD_NOT_ALLOWED)
            self._answer_body(
                req,
                codec.CONTENT,
                WELL_KNOWN_CORE,
                [(codec.CONTENT_FORMAT, codec.encode_uint(40))],
                "/.well-known/core",
            )
            return
        if path == ["health"]:
            if method != codec.GET:
                raise CoapRefusal(codec.METHOD_NOT_ALLOWED)
            self._answer(req, codec.CONTENT, b"healthy", [(codec.CONTENT_FORMAT, b"")])
            return
        if method in (codec.POST, codec.PUT):
            if path[:2] == ["mqtt", "publish"]:
                path = path[2:]
            self._publish(req, "/".join(path))
        elif method == codec.GET:
            self._get(req, "/".join(path))
        else:
            raise CoapRefusal(codec.METHOD_NOT_ALLOWED, "GET, POST or PUT")

    def _query(self, req: Request) -> dict[str, str]:
        params: dict[str, str] = {}
        for item in req.msg.uri_query():
            name, _, value = item.partition("=")
            if name not in QUERY_KEYS:
                raise CoapRefusal(codec.BAD_REQUEST, f"unknown query parameter {name!r}")
            if name in params:
                raise CoapRefusal(codec.BAD_REQUEST, f"{name} given more than once")
            params[name] = value
        return params

    def _authenticate(self, req: Request, params: dict[str, str]) -> tuple[str, str | None]:
        """``(client_id, username)`` of the request; 4.01 when the broker's authentication refuses it.
        The DTLS identity (certificate CN or PSK identity) is the user name when there is one."""
        client_id = params.get("client_id") or CLIENT_ID
        username = req.identity if req.identity is not None else params.get("username")
        auth = self.broker.auth
        if auth is None or not auth.reads_user_names:
            return client_id, username  # nothing asks who the client is: credentials are ignored
        if req.identity is not None:
            return client_id, username  # the DTLS handshake verified it
        password = params.get("password")
        secret = password.encode("utf-8") if password is not None else None
        if not auth.authenticate(client_id, username, secret, str(req.peer)).ok:
            raise CoapRefusal(codec.UNAUTHORIZED, "authentication failed")
        if username is not None:
            req.verified = True  # a peer that knows a password is not a spoofed address
        return client_id, username

    def _check_topic(self, topic: str) -> None:
        if not topic:
            raise CoapRefusal(codec.BAD_REQUEST, "no topic in the path")
        try:
            self.broker.check_topic(topic)
        except TopicNameInvalid as exc:
            raise CoapRefusal(codec.BAD_REQUEST, f"invalid topic: {exc.reason}") from None

    # -- publish ---------------------------------------------------------------------------------

    def _publish(self, req: Request, topic: str) -> None:
        msg = req.msg
        params = self._query(req)
        client_id, username = self._authenticate(req, params)
        broker = self.broker
        if not broker.accepting:
            raise CoapRefusal(codec.SERVICE_UNAVAILABLE, "shutting down")
        self._check_topic(topic)
        if topic == "$SYS" or topic.startswith("$SYS/"):
            raise CoapRefusal(codec.FORBIDDEN, "topics under $SYS belong to the broker")
        auth = broker.auth
        if auth is not None:
            refused = auth.check_publish(client_id, username, topic)
            if refused:
                raise CoapRefusal(
                    codec.FORBIDDEN if refused == 0x87 else codec.BAD_REQUEST,
                    "not authorized" if refused == 0x87 else "topic over limits.max_topic_*",
                )
        qos_text = params.get("qos", "0")
        if qos_text not in ("0", "1", "2"):
            raise CoapRefusal(codec.BAD_REQUEST, "qos must be 0, 1 or 2")
        qos = int(qos_text)
        if qos > broker.settings.max_qos:
            raise CoapRefusal(codec.BAD_REQUEST, f"qos above the broker's maximum {broker.settings.max_qos}")
        retain_text = params.get("retain", "false").strip().lower()
        if retain_text not in _TRUE and retain_text not in _FALSE:
            raise CoapRefusal(codec.BAD_REQUEST, "retain must be true or false")
        retain = retain_text in _TRUE
        if retain and not broker.settings.retain_available:
            raise CoapRefusal(codec.BAD_REQUEST, "retained messages are not available")
        props = None
        cf = msg.option(codec.CONTENT_FORMAT)
        if cf is not None:
            content_type = codec.CONTENT_FORMATS.get(codec.decode_uint(cf))
            if content_type is None:
                raise CoapRefusal(codec.UNSUPPORTED_CONTENT_FORMAT)
            props = {CONTENT_TYPE: content_type}
        settles = is_settlement(topic)
        named = [(prop, params[key]) for key, prop in SETTLE_KEYS if key in params]
        if named:
            if not settles:
                raise CoapRefusal(
                    codec.BAD_REQUEST,
                    "message_id and group_id name the delivery a $queue/{name}/$ack settles",
                )
            props = {**(props or {}), USER_PROPERTY: named}
        payload = self._reassemble(req, topic)
        if payload is None:
            return  # 2.31 Continue sent: more blocks to come
        if (qos or settles) and self.commit_waiters.full():
            raise CoapRefusal(codec.SERVICE_UNAVAILABLE, "too many publishes waiting for storage")
        message = Message(topic, payload, qos, retain, props)
        try:
            result = broker.publish(message)
        except QueueRefused as exc:  # $queue/...: no such queue (auto_create off) or the queue is full
            raise CoapRefusal(
                codec.NOT_FOUND if exc.reason_code == 0x90 else codec.SERVICE_UNAVAILABLE, exc.reason
            ) from None
        except QuotaExceeded:
            raise CoapRefusal(codec.SERVICE_UNAVAILABLE, "storage full: not accepted") from None
        options = self._block1_echo(msg)
        if qos == 0 and not settles:
            self._answer(req, codec.CHANGED, b"", options)
        else:
            # Acknowledged means stored: answer after the commit holding the message (see the module
            # docs); a settlement, at any QoS, once its outcome is known (another worker's too).
            self.commit_waiters.spawn(self._answer_after_commit, req, options, result, settles)

    def _answer_after_commit(
        self, req: Request, options: list[tuple[int, bytes]], result=None, settles: bool = False
    ) -> None:
        held = wait_held(result)  # a replicated queue: acknowledged once the quorum has it
        if held is not None:
            self._answer(req, codec.SERVICE_UNAVAILABLE, f"not replicated: {held}".encode()[:200])
            return
        if settles and settled_nothing(result):
            # MQTT 5.0 answers 0x10: never a 2.04 the client would take as settled
            self._answer(req, codec.NOT_FOUND, b"no delivery of that message to settle")
            return
        try:
            self.broker.wait_committed()
        except StorageError as exc:
            log.warning("coap_commit_failed", extra={"peer": str(req.peer), "error": str(exc)})
            self._answer(req, codec.SERVICE_UNAVAILABLE, b"storage failed: not acknowledged")
            return
        self._answer(req, codec.CHANGED, b"", options)

    @staticmethod
    def _block1_echo(msg: CoapMessage) -> list[tuple[int, bytes]]:
        block1 = msg.option(codec.BLOCK1)
        return [(codec.BLOCK1, block1)] if block1 is not None else []

    def _reassemble(self, req: Request, topic: str) -> bytes | None:
        """The whole payload (RFC 7959 Block1), None after answering 2.31 for a non-final block.
        Reassembly memory is bounded per peer (``max_reassembly_bytes``) and by the message size; a
        peer's entry goes with its last transfer, and every peer's together are bounded
        (``PeerBodies``)."""
        now = time.monotonic()
        bodies = self.reassembly.take(req.key, now)  # back in at the end: most recently used
        try:
            return self._reassemble_into(bodies, req, topic)
        finally:
            self.reassembly.put(req.key, bodies, now)

    def _reassemble_into(self, peer_bodies: dict[tuple, bytearray], req: Request, topic: str) -> bytes | None:
        msg = req.msg
        limit = self.settings.max_message_size
        size1 = msg.uint_option(codec.SIZE1)
        if size1 is not None and size1 > limit:
            raise _too_large(limit)
        block1 = msg.option(codec.BLOCK1)
        if block1 is None:
            if len(msg.payload) > limit:
                raise _too_large(limit)
            return msg.payload
        num, more, szx = codec.decode_block(block1)
        size = codec.block_size(szx)
        body_key = (topic, tuple(msg.uri_query()), msg.option(codec.CONTENT_FORMAT))
        body = peer_bodies.get(body_key)
        if num == 0:
            body = bytearray()
            peer_bodies.pop(body_key, None)
            if len(peer_bodies) >= MAX_REASSEMBLIES_PER_PEER:
                peer_bodies.pop(next(iter(peer_bodies)))  # the oldest transfer of this peer gives way
            peer_bodies[body_key] = body
        if body is None or len(body) != num * size:
            peer_bodies.pop(body_key, None)
            raise CoapRefusal(codec.REQUEST_ENTITY_INCOMPLETE, "blocks out of order")
        if more and len(msg.payload) != size:
            peer_bodies.pop(body_key, None)
            raise CoapRefusal(codec.BAD_REQUEST, "a non-final block of the wrong size")
        body += msg.payload
        held = sum(len(b) for b in peer_bodies.values())
        if len(body) > limit or held > self.settings.max_reassembly_bytes:
            peer_bodies.pop(body_key, None)
            raise _too_large(min(limit, self.settings.max_reassembly_bytes))
        if more:
            self._answer(req, codec.CONTINUE, b"", [(codec.BLOCK1, block1)])
            return None
        peer_bodies.pop(body_key, None)
        return bytes(body)

    # -- read and observe ------------------------------------------------------------------------

    def _get(self, req: Request, path: str) -> None:
        msg = req.msg
        params = self._query(req)
        unknown = set(params) - {"client_id", "username", "password"}
        if unknown:
            raise CoapRefusal(codec.BAD_REQUEST, f"{sorted(unknown)[0]} is for publishes")
        client_id, username = self._authenticate(req, params)
        if not path:
            raise CoapRefusal(codec.NOT_FOUND)
        observe = msg.uint_option(codec.OBSERVE)
        if observe == 1:
            self._cancel(req)  # RFC 7641 §3.6: then answered as a plain GET
            if "+" in path or "#" in path:  # a filter has no representation of its own
                self._answer(req, codec.CONTENT)
                return
        if observe == 0:
            self._observe(req, path, client_id, username)
            return
        block2 = msg.option(codec.BLOCK2)
        if (
            block2 is not None
            and codec.decode_block(block2)[0] > 0
            and self._representation(req.key, path) is not None
        ):
            # a later block of a body this peer was sent the first block of (a notification included)
            self._answer_body(req, codec.CONTENT, b"", [], path)
            return
        self._check_topic(path)
        auth = self.broker.auth
        if auth is not None and not auth.can_read(client_id, username, path):
            raise CoapRefusal(codec.FORBIDDEN, "not authorized to read")
        message = self.broker.retained.get(path)
        if message is None:
            raise CoapRefusal(codec.NOT_FOUND)
        self._answer_body(req, codec.CONTENT, message.payload, _format_options(message), path)

    def _observe(self, req: Request, path: str, client_id: str, username: str | None) -> None:
        broker = self.broker
        auth = broker.auth
        if not broker.accepting:
            raise CoapRefusal(codec.SERVICE_UNAVAILABLE, "shutting down")
        okey = (*req.key, req.msg.token)
        old = self.observations.get(okey)
        if old is not None:  # re-registration (RFC 7641 §4.1): replace the old one
            self.end_observation(old, "re-registered")
        settings = self.settings
        if (
            len(self.observations) >= settings.max_observations
            or self.observers_per_peer.get(req.key, 0) >= settings.max_observations_per_peer
        ):
            raise CoapRefusal(codec.SERVICE_UNAVAILABLE, "too many observations")
        observer_id = OBSERVER_PREFIX + uuid.uuid4().hex
        if auth is not None:
            refused = auth.check_subscribe(observer_id, username, path)
            if refused:
                auth.forget(observer_id)
                raise CoapRefusal(
                    codec.FORBIDDEN if refused == 0x87 else codec.BAD_REQUEST,
                    "not authorized to observe" if refused == 0x87 else "filter over limits",
                )
        if self.commit_waiters.full():
            if auth is not None:
                auth.forget(observer_id)
            raise CoapRefusal(codec.SERVICE_UNAVAILABLE, "too many requests waiting")
        obs = Observation(
            self, req.key, req.peer, req.transport, req.msg.token, path, observer_id, self._budget(req)
        )
        try:
            session, _ = broker.open_session(observer_id, True, 0, None, username)
        except QuotaExceeded as exc:
            if auth is not None:
                auth.forget(observer_id)
            raise CoapRefusal(codec.SERVICE_UNAVAILABLE, str(exc)) from None
        obs.session = session
        broker.attach(session, obs, 0)
        self.observations[okey] = obs
        self.observers_per_peer[req.key] = self.observers_per_peer.get(req.key, 0) + 1
        self.observations_total += 1
        # The subscription may wait for the peers (other workers or nodes) to acknowledge a filter
        # new here (up to their interest_sync_timeout): in the pool, not in the one reader greenlet
        # every other CoAP peer's requests go through.
        self.commit_waiters.spawn(self._subscribe_observation, req, obs, path)

    def _subscribe_observation(self, req: Request, obs: Observation, path: str) -> None:
        """``_observe``'s subscription and its answer (2.05 with Observe, or the refusal)."""
        broker = self.broker
        try:
            result = broker.subscribe(obs.session, path, 0)
        except TopicFilterInvalid as exc:
            self.end_observation(obs, "invalid filter")
            self._answer(req, codec.BAD_REQUEST, f"invalid topic filter: {exc.reason}".encode())
            return
        except QueueRefused as exc:  # queue deliveries must be acknowledged, which Observe cannot do
            self.end_observation(obs, "durable queue")
            self._answer(
                req, codec.BAD_REQUEST, f"durable queues are consumed over MQTT: {exc.reason}".encode()
            )
            return
        except Exception:
            log.exception("coap_observe_failed", extra={"peer": str(req.peer), "filter": path})
            self.end_observation(obs, "failed")
            self._answer(req, codec.INTERNAL_SERVER_ERROR)
            return
        if obs.ended:  # cancelled (RST, re-registration, shutdown) while it waited: a plain answer
            self._answer(req, codec.CONTENT)
            return
        self._answer(req, codec.CONTENT, b"", [(codec.OBSERVE, codec.encode_uint(obs.seq))])
        if result.retained:
            broker.deliver_retained(obs.session, result)
        log.debug("coap_observe", extra={"peer": str(req.peer), "filter": path, "client_id": obs.client_id})

    def _cancel(self, req: Request) -> None:
        obs = self.observations.get((*req.key, req.msg.token))
        if obs is not None:
            self.end_observation(obs, "cancelled")

    def end_observation(self, obs: Observation, reason: str) -> None:
        """End ``obs`` and remove its session (idempotent)."""
        if obs.ended:
            return
        obs.ended = obs.closed = True
        self.awaiting_ack.discard(obs)
        okey = (*obs.key, obs.token)
        if self.observations.get(okey) is obs:
            del self.observations[okey]
            left = self.observers_per_peer.get(obs.key, 0) - 1
            if left > 0:
                self.observers_per_peer[obs.key] = left
            else:
                self.observers_per_peer.pop(obs.key, None)
        if obs.session is not None:
            self.broker.close_session(obs.session, obs, False)
        auth = self.broker.auth
        if auth is not None:
            auth.forget(obs.client_id)
        log.debug(
            "coap_observe_end", extra={"client_id": obs.client_id, "reason": reason, "dropped": obs.dropped}
        )

    # -- notifications ---------------------------------------------------------------------------

    def schedule(self, obs: Observation) -> None:
        """``obs`` has queued messages: the notifier greenlet sends them (no switch here)."""
        self._ready.append(obs)
        self._wake.set()

    def _notify_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            ready, self._ready = self._ready, []
            for obs in ready:
                obs.scheduled = False
                if obs.end_reason is not None:
                    self.end_observation(obs, obs.end_reason)
                    continue
                try:
                    self._send_notifications(obs)
                except Exception:
                    log.exception("coap_notify_failed", extra={"client_id": obs.client_id})
                    self.end_observation(obs, "error")

    def _send_notifications(self, obs: Observation) -> None:
        queue = obs.queue
        while queue and not obs.closed:
            if not obs.proven and obs.pending_con is not None:
                return  # the rest waits (bounded, drop-oldest) until the peer ACKs the first CON
            message = queue.popleft()
            obs.seq = (obs.seq + 1) % OBSERVE_MAX
            # CON every CON_EVERY notifications, and whenever the previous CON is unanswered
            # (RFC 7641 §4.5.2: the new one takes over its retransmission state). An unverified
            # observer's first notification is CON and nothing follows before its ACK: a spoofed
            # registration gets one small notification (and its retransmissions), not a stream.
            confirmable = obs.since_con + 1 >= CON_EVERY or obs.pending_con is not None or not obs.proven
            mid = self.next_mid()
            options = [
                (codec.OBSERVE, codec.encode_uint(obs.seq)),
                *_format_options(message),
                (codec.TOPIC, message.topic.encode("utf-8")),
            ]
            body = message.payload
            limit = (
                self.settings.block_size
                if obs.budget is None
                else max(16, obs.budget - 16 - len(message.topic))
            )
            if len(body) > limit:
                szx = max(0, min(6, limit.bit_length() - 5))
                self._keep_representation(obs.key, obs.filter, body)
                options += [
                    (codec.BLOCK2, codec.encode_block(0, True, szx)),
                    (codec.SIZE2, codec.encode_uint(len(body))),
                ]
                body = body[: codec.block_size(szx)]
            note = CoapMessage(
                codec.CON if confirmable else codec.NON, codec.CONTENT, mid, obs.token, options, body
            )
            data = codec.serialize(note)
            nkey = (*obs.key, mid)
            mids = self.notification_mids
            mids[nkey] = obs
            while len(mids) > MAX_EXCHANGES:
                mids.popitem(last=False)
            if confirmable:
                obs.since_con = 0
                pending = obs.pending_con
                retries, timeout = (
                    (pending[2], pending[4])
                    if pending is not None
                    else (0, self.settings.ack_timeout * (1 + (ACK_RANDOM_FACTOR - 1) * _jitter()))
                )
                obs.pending_con = [mid, data, retries, time.monotonic() + timeout, timeout]
                self.awaiting_ack.add(obs)
            else:
                obs.since_con += 1
            obs.transport.sendto(data, obs.peer)

    def _acknowledged(self, peer_key: tuple, mid: int, reset: bool) -> None:
        """An empty ACK or RST for one of our notifications."""
        obs = self.notification_mids.pop((*peer_key, mid), None)
        if obs is None or obs.closed:
            return
        if reset:  # RFC 7641 §3.6: the client is no longer interested
            self.end_observation(obs, "reset")
        elif obs.pending_con is not None and obs.pending_con[0] == mid:
            obs.pending_con = None
            self.awaiting_ack.discard(obs)
            if not obs.proven:
                obs.proven = True  # the ACK proves the peer receives at its address
                if obs.queue and not obs.scheduled:
                    obs.scheduled = True
                    self.schedule(obs)

    def _retransmit_loop(self) -> None:
        while True:
            gevent.sleep(min(0.25, self.settings.ack_timeout / 4))
            now = time.monotonic()
            self.reassembly.bound(now)
            self.representations.bound(now)
            for obs in list(self.awaiting_ack):
                pending = obs.pending_con
                if pending is None or obs.closed:
                    self.awaiting_ack.discard(obs)
                    continue
                if pending[3] > now:
                    continue
                if pending[2] >= self.settings.max_retransmit:  # RFC 7641 §4.5: the client is gone
                    self.end_observation(obs, "unacknowledged")
                    continue
                pending[2] += 1
                pending[4] *= 2
                pending[3] = now + pending[4]
                self.retransmissions += 1
                obs.transport.sendto(pending[1], obs.peer)


def _too_large(limit: int) -> CoapRefusal:
    return CoapRefusal(codec.REQUEST_ENTITY_TOO_LARGE, f"over {limit} bytes")


def _format_options(message: Message) -> list[tuple[int, bytes]]:
    props = message.properties
    if props:
        content_type = props.get(CONTENT_TYPE)
        if content_type is not None:
            number = codec.CONTENT_TYPES.get(content_type)
            if number is not None:
                return [(codec.CONTENT_FORMAT, codec.encode_uint(number))]
    return []


def _jitter() -> float:
    return int.from_bytes(os.urandom(1), "big") / 255
