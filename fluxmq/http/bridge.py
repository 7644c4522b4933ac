"""HTTP bridge: publish over HTTP, read retained messages, subscribe as server-sent events.

Endpoints (``server.http.plain.addr``)::

    POST /publish                 JSON {"topic", "payload", "payload_encoding", "qos", "retain", "properties"}
    POST /topics/{topic...}       the raw body is the payload; ?qos=0|1|2&retain=true|false
    GET  /retained/{topic...}     the retained message of one topic (404 when none)
    GET  /subscribe?filter=F      server-sent events, one ``message`` event per delivery (filter repeatable)

Errors are JSON ``{"error": "..."}`` with 400 (bad JSON, nested too deeply included, topic,
encoding, QoS, property, a string that is not UTF-8 text, a query value that is not UTF-8), 403 (``$SYS`` topics belong to the broker), 404, 405, 413 (body over
``max_body_size`` or payload over ``broker.max_message_size``), 429 (a stream past
``max_streams`` or ``max_streams_per_user``, with ``Retry-After``) and 503 (the broker is shutting
down, its storage is full, or for ``/subscribe`` it holds ``broker.max_sessions`` sessions).

Authentication and ACLs are the MQTT listeners' (``broker.auth``): credentials come as HTTP Basic
(401 with a ``WWW-Authenticate`` challenge when they are missing and required, or wrong); the
request acts as client ``http-bridge`` with that user name (an SSE stream as its own client id), so
the same password file, HTTP service, ACL file and topic caps decide; a refusal is 403 (400 over a
topic cap). A stream's deliveries and retained messages are filtered by the user's read rules.
On a bridge listener bound to a network address with nothing configured to check a user name and
``auth.allow_anonymous`` left at ``auto`` (Mosquitto 2's default; the node serves ``HTTPBridge.exposed()``
there), every request is 401 with the challenge and an error naming ``auth.allow_anonymous``.

Binary fields (``payload``, ``properties.correlation_data``) travel as UTF-8 text or base64, as
``payload_encoding`` says; responses and events use ``utf8`` when every binary field is valid UTF-8.

An SSE stream is a broker client like an MQTT connection: a session with a generated client id
(``http-sse-...``, clean start, no expiry), QoS 0 subscriptions, and an ``SSEStream`` as its
``Delivery``. Deliveries go into a bounded queue per stream (oldest dropped and counted as
``sse_queue_full`` when the reader is slow), so a slow reader never stalls publishers; the stream
is at-most-once. A client that closes its connection ends its stream at once (a greenlet per stream
sees the socket turn readable at EOF: ``watch_peer_close``), which removes its session and frees its
slot; comment lines every ``sse_heartbeat`` make a write fail on a client that vanished without a
close.

Each open stream holds one greenlet of the listener's pool until it ends, so streams are bounded:
``max_streams`` in all and ``max_streams_per_user`` per owner (the user name, or for anonymous
requests the client's IP address). The pool is sized ``max_streams`` plus gunicorn's
``worker_connections``, so publishes and retained reads are still served with every stream slot
taken.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import socket
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

import gevent
from gevent.event import Event
from gevent.socket import wait_read

from fluxmq._core.trie import validate_filter
from fluxmq.broker.broker import Broker
from fluxmq.broker.held import settled_nothing, wait_held
from fluxmq.broker.message import (
    CONTENT_TYPE,
    CORRELATION_DATA,
    MAX_INTERVAL,
    MESSAGE_EXPIRY_INTERVAL,
    PAYLOAD_FORMAT_INDICATOR,
    RESPONSE_TOPIC,
    USER_PROPERTY,
    Message,
)
from fluxmq.broker.prefixes import is_settlement
from fluxmq.errors import QueueRefused, QuotaExceeded, StorageError, TopicFilterInvalid, TopicNameInvalid
from fluxmq.http.router import HEAD_REQUEST, Router, allow_value, json_response

log = logging.getLogger("fluxmq.http.bridge")

SSE_CLIENT_PREFIX = "http-sse-"
HTTP_CLIENT_ID = "http-bridge"  # the client id HTTP publishes and retained reads are checked as
_CHALLENGE = {"WWW-Authenticate": 'Basic realm="fluxmq", charset="UTF-8"'}
ENCODINGS = ("utf8", "base64")
PUBLISH_FIELDS = frozenset({"topic", "payload", "payload_encoding", "qos", "retain", "properties"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})
RETRY_AFTER_SECONDS = 5  # what a 429 for a stream over its bound suggests
# Set in the WSGI environ by ``ExposedBridge``: this listener refuses anonymous requests.
REFUSE_ANONYMOUS = "fluxmq.refuse_anonymous"


class HTTPError(Exception):
    """An error answered as JSON ``{"error": message}`` with ``status`` (and optional headers)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers

    def response(self) -> tuple[int, dict[str, Any], dict[str, str] | None]:
        return self.status, {"error": self.message}, self.headers


def json_handler(fn: Callable[[dict], tuple]) -> Callable[[dict], tuple]:
    """Wrap a Router JSON handler so an ``HTTPError`` becomes its JSON error response."""

    def handler(environ: dict) -> tuple:
        try:
            return fn(environ)
        except HTTPError as err:
            return err.response()

    handler.__doc__ = fn.__doc__
    return handler


class BridgeSettings:
    """The bridge's knobs (``server.http.plain`` and ``broker.max_message_size``); reloadable."""

    __slots__ = (
        "max_body_size",
        "max_message_size",
        "sse_heartbeat",
        "sse_queue_size",
        "max_streams",
        "max_streams_per_user",
    )

    def __init__(
        self,
        max_body_size: int = 1 << 20,
        max_message_size: int = 1 << 20,
        sse_heartbeat: float = 15.0,
        sse_queue_size: int = 1000,
        max_streams: int = 1000,
        max_streams_per_user: int = 100,
    ) -> None:
        self.max_body_size = max_body_size
        self.max_message_size = max_message_size
        self.sse_heartbeat = sse_heartbeat
        self.sse_queue_size = sse_queue_size
        self.max_streams = max_streams
        self.max_streams_per_user = max_streams_per_user

    @classmethod
    def from_config(cls, config: Any) -> BridgeSettings:
        plain = config.server.http.plain
        return cls(
            plain.max_body_size,
            config.broker.max_message_size,
            plain.sse_heartbeat,
            plain.sse_queue_size,
            plain.max_streams,
            plain.max_streams_per_user,
        )


# -- request helpers (the admin API uses them too) -------------------------------------------------


def path_text(raw: str) -> str:
    """A WSGI path string (UTF-8 bytes carried as latin-1, PEP 3333) as the text the client meant."""
    try:
        return raw.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise HTTPError(400, "the path is not valid UTF-8") from None


def read_body(environ: dict, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (413 past it, checked before reading when it can)."""
    length_text = environ.get("CONTENT_LENGTH") or ""
    stream = environ["wsgi.input"]
    if length_text:
        try:
            length = int(length_text)
        except ValueError:
            raise HTTPError(400, "bad Content-Length") from None
        if length > limit:
            raise HTTPError(413, f"request body over {limit} bytes")
        return stream.read(length) if length > 0 else b""
    data = stream.read(limit + 1)  # chunked, or no body
    if len(data) > limit:
        raise HTTPError(413, f"request body over {limit} bytes")
    return data


def read_json(environ: dict, limit: int, empty: bytes = b"") -> Any:
    """The request body parsed as JSON (at most ``limit`` bytes; ``empty`` stands for no body); 400
    naming the problem when it is not UTF-8 JSON or nests deeper than the parser recurses (``[`` *
    100,000 would be a 500)."""
    body = read_body(environ, limit) or empty
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HTTPError(400, f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise HTTPError(400, "body is not valid JSON: nested too deeply") from None


def query(environ: dict) -> dict[str, list[str]]:
    """The query string's parameters (every value of a repeated name, blank values kept); 400 when
    a value is not UTF-8 (``%FF`` would otherwise become U+FFFD: another filter, client id or cursor)."""
    text = path_text(environ.get("QUERY_STRING") or "")
    try:
        return parse_qs(text, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise HTTPError(400, "the query string is not valid UTF-8") from None


def decimal(text: str) -> int | None:
    """``text`` as a non-negative integer when it is ASCII digits only, else None (``str.isdigit``
    also takes ``²`` and other digits ``int`` refuses)."""
    return int(text) if text.isascii() and text.isdigit() else None


def allow_methods(environ: dict, methods: tuple[str, ...]) -> None:
    """405 with ``Allow`` unless the request's method is one of ``methods``."""
    method = environ.get("REQUEST_METHOD", "GET").upper()
    if method not in methods:
        raise HTTPError(405, f"method {method} not allowed", {"Allow": allow_value(methods)})


def acl_refusal(code: int, action: str, kind: str, name: str) -> HTTPError:
    """The answer to an ACL check's refusal ``code``: 403 when not authorized (0x87), else 400 (the
    topic caps)."""
    if code == 0x87:
        return HTTPError(403, f"not authorized to {action} {name!r}")
    return HTTPError(400, f"{kind} {name!r} is over limits.max_topic_*")


def check_filters(filters: list[str]) -> None:
    """400 for a filter a subscription would refuse (what a HEAD on a stream checks: it opens none)."""
    for f in filters:
        try:
            validate_filter(f)
        except TopicFilterInvalid as exc:
            raise HTTPError(400, f"invalid topic filter: {exc.reason}") from None


def one_param(params: dict[str, list[str]], name: str, default: str | None = None) -> str | None:
    values = params.get(name)
    if not values:
        return default
    if len(values) > 1:
        raise HTTPError(400, f"{name} given more than once")
    return values[0]


def parse_qos(value: object, max_qos: int = 2) -> int:
    """A QoS (an int from JSON, or query-string text); 400 unless 0..``max_qos``."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 2:
        raise HTTPError(400, f"qos must be 0, 1 or 2, got {value!r}")
    if value > max_qos:
        raise HTTPError(400, f"qos {value} is above the broker's maximum QoS {max_qos}")
    return value


def parse_flag(text: str, name: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise HTTPError(400, f"{name} must be true or false, got {text!r}")


def is_text(value: object) -> bool:
    """A JSON string MQTT can carry as a UTF-8 string: JSON's ``"\\ud800"`` escapes give lone
    surrogates, which no UTF-8 encoder takes (a 500 here, and every MQTT 5.0 subscriber of the
    message disconnected by its failed PUBLISH)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def decode_binary(value: object, encoding: str, name: str) -> bytes:
    if not isinstance(value, str):
        raise HTTPError(400, f"{name} must be a string")
    if encoding == "utf8":
        return value.encode("utf-8", "surrogatepass")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(400, f"{name} is not valid base64") from None


def check_topic(broker: Broker, topic: object) -> str:
    """A topic name a client may publish to: 400 when invalid, 403 under ``$SYS``."""
    if not isinstance(topic, str):
        raise HTTPError(400, "topic must be a string")
    try:
        broker.check_topic(topic)
    except TopicNameInvalid as exc:
        raise HTTPError(400, f"invalid topic name: {exc.reason}") from None
    if topic == "$SYS" or topic.startswith("$SYS/"):
        raise HTTPError(403, "topics under $SYS belong to the broker")
    return topic


def parse_properties(broker: Broker, props: object, encoding: str) -> dict[int, Any] | None:
    """MQTT 5.0 message properties from their JSON names (see the module docs)."""
    if props is None:
        return None
    if not isinstance(props, dict):
        raise HTTPError(400, "properties must be an object")
    out: dict[int, Any] = {}
    for name, value in props.items():
        if name == "payload_format_indicator":
            if value not in (0, 1) or isinstance(value, bool):
                raise HTTPError(400, "properties.payload_format_indicator must be 0 or 1")
            out[PAYLOAD_FORMAT_INDICATOR] = value
        elif name == "message_expiry_interval":
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INTERVAL:
                raise HTTPError(
                    400, f"properties.message_expiry_interval must be an integer 0..{MAX_INTERVAL}"
                )
            out[MESSAGE_EXPIRY_INTERVAL] = value
        elif name == "content_type":
            if not is_text(value):
                raise HTTPError(400, "properties.content_type must be a string of UTF-8 text")
            out[CONTENT_TYPE] = value
        elif name == "response_topic":
            try:
                broker.check_topic(value if isinstance(value, str) else "")
            except TopicNameInvalid:
                raise HTTPError(400, "properties.response_topic must be a valid topic name") from None
            out[RESPONSE_TOPIC] = value
        elif name == "correlation_data":
            out[CORRELATION_DATA] = decode_binary(value, encoding, "properties.correlation_data")
        elif name == "user_properties":
            out[USER_PROPERTY] = _user_properties(value)
        else:
            raise HTTPError(400, f"unknown property {name!r}")
    return out or None


def _user_properties(value: object) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value):
        pairs = [tuple(p) for p in value]
    else:
        raise HTTPError(400, "properties.user_properties must be an object or a list of [name, value] pairs")
    if not all(is_text(k) and is_text(v) for k, v in pairs):
        raise HTTPError(400, "properties.user_properties names and values must be strings of UTF-8 text")
    return pairs  # type: ignore[return-value]


def message_json(message: Message, retain: bool | None = None) -> dict[str, Any]:
    """A message as the bridge renders it (responses, SSE events, the admin API)."""
    props = message.properties or {}
    correlation = props.get(CORRELATION_DATA)
    encoding = "utf8"
    try:
        payload = message.payload.decode("utf-8")
        if correlation is not None:
            correlation.decode("utf-8")
    except UnicodeDecodeError:
        encoding = "base64"
        payload = base64.b64encode(message.payload).decode("ascii")
    body: dict[str, Any] = {
        "topic": message.topic,
        "payload": payload,
        "payload_encoding": encoding,
        "qos": message.qos,
        "retain": message.retain if retain is None else retain,
    }
    rendered: dict[str, Any] = {}
    for pid, value in props.items():
        if pid == PAYLOAD_FORMAT_INDICATOR:
            rendered["payload_format_indicator"] = value
        elif pid == CONTENT_TYPE:
            rendered["content_type"] = value
        elif pid == RESPONSE_TOPIC:
            rendered["response_topic"] = value
        elif pid == CORRELATION_DATA:
            rendered["correlation_data"] = (
                value.decode("utf-8") if encoding == "utf8" else base64.b64encode(value).decode("ascii")
            )
        elif pid == USER_PROPERTY:
            rendered["user_properties"] = [[k, v] for k, v in value]
    expiry = message.remaining_expiry()
    if expiry is not None:
        rendered["message_expiry_interval"] = expiry
    if rendered:
        body["properties"] = rendered
    return body


# -- SSE -----------------------------------------------------------------------------------------


class SSEStream:
    """One ``/subscribe`` stream: the ``Delivery`` of its session, with a bounded queue (drop oldest)."""

    version = 0  # not an MQTT connection

    listener = "http_sse"

    def __init__(
        self, client_id: str, queue_size: int, broker: Broker, peer: str = "", owner: str = ""
    ) -> None:
        self.client_id = client_id
        self.peer = peer
        self.owner = owner  # what max_streams_per_user counts by: "user:NAME" or "addr:IP"
        self.queue: deque = deque()
        self.queue_size = queue_size
        self.broker = broker
        self.dropped = 0
        self.closed = False
        self.close_reason = ""
        self._wake = Event()

    # Delivery interface (called by the broker; never blocks, never switches greenlets)

    def send_publish(
        self,
        message: Message,
        qos: int,
        retain: bool,
        packet_id: int,
        dup: bool,
        subscription_ids: tuple[int, ...] | None,
    ) -> bool:
        if self.closed:
            return False
        queue = self.queue
        if len(queue) >= self.queue_size:
            queue.popleft()
            self.dropped += 1
            self.broker.stats.dropped("sse_queue_full")
        queue.append((message, retain))
        self._wake.set()
        return True

    def send_pubrel(self, packet_id: int) -> None:
        """Never called: SSE subscriptions are QoS 0, so nothing is ever in flight."""

    def is_congested(self) -> bool:
        # The stream's own bounded queue absorbs bursts; a closed stream takes nothing more, which
        # the session counts as an offline drop, not as a message too large.
        return self.closed

    def close(self, reason_code: int, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = reason or f"closed by the broker (reason code {reason_code:#x})"
            self._wake.set()

    # the response body

    def events(self, heartbeat: float) -> Iterator[bytes]:
        """SSE bytes: queued messages as ``message`` events, comment heartbeats while idle, and a
        final ``close`` event when the broker ends the stream."""
        queue = self.queue
        yield f": fluxmq stream {self.client_id}\nretry: 2000\n\n".encode()
        while True:
            if queue:
                chunks = []
                while queue:
                    message, retain = queue.popleft()
                    data = json.dumps(message_json(message, retain), separators=(",", ":"))
                    chunks.append(f"event: message\ndata: {data}\n\n")
                yield "".join(chunks).encode()
                continue
            if self.closed:
                yield f"event: close\ndata: {json.dumps({'reason': self.close_reason})}\n\n".encode()
                return
            self._wake.clear()
            if not self._wake.wait(heartbeat if heartbeat > 0 else None):
                yield b": heartbeat\n\n"


def watch_peer_close(sock: Any, stream: SSEStream) -> None:
    """End ``stream`` when the client closes its connection (it sends nothing else while it reads):
    the socket turns readable at EOF, so a gone reader frees its stream, session and slot at once
    rather than when a heartbeat write fails (never, with no heartbeat and no message)."""
    while not stream.closed:
        try:
            wait_read(sock.fileno())
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue  # woken without data
        except OSError:
            data = b""
        if data:
            return  # the client pipelined another request: leave the socket to the server
        stream.close(0, "the client closed the stream")
        return


class StreamBody:
    """The WSGI response iterable of one stream; ``close()`` (always called by the server) ends it:
    ``end(stream, session)`` (the stream's owner frees its slot and closes the session). ``sock``:
    the client's connection (gunicorn's), watched by ``watch_peer_close``."""

    def __init__(
        self,
        end: Callable[[SSEStream, Any], None],
        stream: SSEStream,
        session: Any,
        heartbeat: float,
        sock: Any = None,
    ) -> None:
        self._end = end
        self._stream = stream
        self._session = session
        self._events = stream.events(heartbeat)
        self._watcher = gevent.spawn(watch_peer_close, sock, stream) if sock is not None else None

    def __iter__(self) -> Iterator[bytes]:
        return self._events

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.kill(block=False)
        self._events.close()
        self._end(self._stream, self._session)


# -- the app -------------------------------------------------------------------------------------


class HTTPBridge:
    """The bridge WSGI app over one broker (``app`` is the WSGI callable)."""

    def __init__(self, broker: Broker, settings: BridgeSettings | None = None) -> None:
        self.broker = broker
        self.settings = settings or BridgeSettings()
        self.streams: set[SSEStream] = set()
        self.stream_owners: dict[str, int] = {}  # owner -> open streams (max_streams_per_user)
        self.requests: dict[tuple[str, int], int] = {}  # (endpoint, status) -> count
        router = Router()
        router.add("/publish", self._counted("publish", json_handler(self._publish_json)), methods=("POST",))
        router.mount("/topics", self._mounted("topics", ("POST",), self._publish_raw))
        router.mount("/retained", self._mounted("retained", ("GET",), self._get_retained))
        router.mount("/subscribe", self._subscribe_app)
        self.app = router

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        return self.app(environ, start_response)

    def exposed(self) -> ExposedBridge:
        """This bridge as served on a listener that refuses anonymous requests."""
        return ExposedBridge(self)

    def reload(self, config: Any) -> set[str]:
        """Apply the reloadable keys of a new config (a ``BrokerService`` reload hook); returns them.

        ``broker.max_message_size`` is kept: the MQTT listeners apply it only at start, and both
        front ends must refuse the same messages. ``max_streams`` is kept too: the listener's
        greenlet pool was sized from it at start (``pool_size``).
        """
        new = BridgeSettings.from_config(config)
        new.max_message_size = self.settings.max_message_size
        new.max_streams = self.settings.max_streams
        self.settings = new
        return {
            "server.http.plain.max_body_size",
            "server.http.plain.sse_heartbeat",
            "server.http.plain.sse_queue_size",
            "server.http.plain.max_streams_per_user",
        }

    def pool_size(self, request_slots: int) -> int:
        """Greenlets a bridge listener needs: one per possible stream, plus ``request_slots``
        (gunicorn's ``worker_connections``) for everything else, so streams at their bound never
        keep a publish waiting for a greenlet."""
        return self.settings.max_streams + request_slots

    def _count(self, endpoint: str, status: int) -> None:
        key = (endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def _counted(self, endpoint: str, handler: Callable[[dict], tuple]) -> Callable[[dict], tuple]:
        def counted(environ: dict) -> tuple:
            result = handler(environ)
            self._count(endpoint, result[0])
            return result

        return counted

    def _mounted(
        self, endpoint: str, methods: tuple[str, ...], handler: Callable[[dict, str], tuple]
    ) -> Callable[[dict, Callable], list[bytes]]:
        """A WSGI app for ``/{endpoint}/{topic...}`` calling ``handler(environ, topic)``."""
        prefix = f"/{endpoint}/"

        def app(environ: dict, start_response: Callable) -> list[bytes]:
            try:
                allow_methods(environ, methods)
                path = path_text(environ.get("PATH_INFO") or "")
                topic = path[len(prefix) :] if path.startswith(prefix) else ""
                if not topic:
                    raise HTTPError(400, f"no topic after {prefix}")
                result = handler(environ, topic)
            except HTTPError as err:
                result = err.response()
            self._count(endpoint, result[0])
            return json_response(start_response, *result)

        return app

    def _check_accepting(self) -> None:
        if not self.broker.accepting:
            raise HTTPError(503, "the broker is shutting down")

    def _authenticate(self, environ: dict) -> str | None:
        """The request's user name (None: anonymous); 401 when the broker's authentication refuses it."""
        if REFUSE_ANONYMOUS in environ:
            # Nothing is configured that could verify a user name (see ExposedBridge).
            if environ.get("HTTP_AUTHORIZATION"):
                raise HTTPError(
                    401,
                    "user names cannot be verified on a network listener without "
                    "auth.password_file or auth.http.url (or set auth.allow_anonymous: true)",
                    _CHALLENGE,
                )
            raise HTTPError(
                401,
                "anonymous clients are refused on a network listener: set "
                "auth.allow_anonymous: true, or auth.password_file or auth.http.url",
                _CHALLENGE,
            )
        auth = self.broker.auth
        if auth is None or not auth.reads_user_names:
            return None  # nothing asks who the client is (limits alone): credentials are ignored
        username = password = None
        header = environ.get("HTTP_AUTHORIZATION") or ""
        if header:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "basic":
                raise HTTPError(401, "only Basic authentication is supported", _CHALLENGE)
            try:
                text = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                raise HTTPError(401, "malformed Basic credentials", _CHALLENGE) from None
            username, sep, secret = text.partition(":")
            if not sep:
                raise HTTPError(401, "malformed Basic credentials", _CHALLENGE)
            password = secret.encode("utf-8")
        peer = f"{environ.get('REMOTE_ADDR', '')}:{environ.get('REMOTE_PORT', '')}"
        if not auth.authenticate(HTTP_CLIENT_ID, username, password, peer).ok:
            raise HTTPError(401, "authentication failed", _CHALLENGE)
        return username

    def _check_publish(self, username: str | None, topic: str) -> None:
        auth = self.broker.auth
        if auth is not None:
            code = auth.check_publish(HTTP_CLIENT_ID, username, topic)
            if code:
                raise acl_refusal(code, "publish to", "topic", topic)

    def _route(self, topic: str, payload: bytes, qos: int, retain: bool, props: dict | None) -> tuple:
        if len(payload) > self.settings.max_message_size:
            raise HTTPError(
                413, f"payload over broker.max_message_size ({self.settings.max_message_size} bytes)"
            )
        if retain and not self.broker.settings.retain_available:
            raise HTTPError(400, "retained messages are not available")
        if props:
            message = Message.from_publish_properties(topic, payload, qos, retain, props)
        else:
            message = Message(topic, payload, qos, retain)
        try:
            deliveries = self.broker.publish(message)
        except QueueRefused as exc:
            # $queue/...: no such queue (auto_create off, 0x90) or the queue is full (0x97).
            raise HTTPError(404 if exc.reason_code == 0x90 else 503, exc.reason) from None
        except QuotaExceeded:
            # The store is full: the message would have to be stored and cannot be (MQTT 5.0 0x97).
            raise HTTPError(503, "storage full: the message was not accepted") from None
        held = wait_held(deliveries)  # a replicated queue: 200 only once the quorum has it
        if held is not None:
            raise HTTPError(503, f"not replicated: {held}")
        if topic[0] == "$" and is_settlement(topic) and settled_nothing(deliveries):
            # MQTT 5.0 answers 0x10: never a success the client would take as settled
            raise HTTPError(
                409,
                "no delivery of that message to settle: settled already, delivered to another "
                "consumer since, or an unknown message-id or group-id",
            )
        if deliveries.__class__ is not int:
            deliveries = 1
        try:
            self.broker.wait_committed()  # 200 only once what it stored is committed, like a PUBACK
        except StorageError:
            raise HTTPError(503, "storage error: the message was not committed") from None
        return 200, {
            "status": "published",
            "topic": topic,
            "qos": qos,
            "retain": retain,
            "deliveries": deliveries,
        }

    def _publish_json(self, environ: dict) -> tuple:
        """POST /publish: a JSON message."""
        self._check_accepting()
        username = self._authenticate(environ)
        doc = read_json(environ, self.settings.max_body_size)
        if not isinstance(doc, dict):
            raise HTTPError(400, "body must be a JSON object")
        unknown = sorted(set(doc) - PUBLISH_FIELDS)
        if unknown:
            raise HTTPError(400, f"unknown field {unknown[0]!r}")
        if "topic" not in doc:
            raise HTTPError(400, "topic is required")
        topic = check_topic(self.broker, doc["topic"])
        encoding = doc.get("payload_encoding", "utf8")
        if encoding not in ENCODINGS:
            raise HTTPError(400, f"payload_encoding must be utf8 or base64, got {encoding!r}")
        payload = decode_binary(doc.get("payload", ""), encoding, "payload")
        qos = parse_qos(doc.get("qos", 0), self.broker.settings.max_qos)
        retain = doc.get("retain", False)
        if not isinstance(retain, bool):
            raise HTTPError(400, "retain must be true or false")
        props = parse_properties(self.broker, doc.get("properties"), encoding)
        self._check_publish(username, topic)
        return self._route(topic, payload, qos, retain, props)

    def _publish_raw(self, environ: dict, topic: str) -> tuple:
        """POST /topics/{topic}: the raw body is the payload."""
        self._check_accepting()
        username = self._authenticate(environ)
        topic = check_topic(self.broker, topic)
        self._check_publish(username, topic)
        params = query(environ)
        unknown = sorted(set(params) - {"qos", "retain"})
        if unknown:
            raise HTTPError(400, f"unknown parameter {unknown[0]!r}")
        qos_text = one_param(params, "qos", "0") or ""
        number = decimal(qos_text)
        qos = parse_qos(qos_text if number is None else number, self.broker.settings.max_qos)
        retain = parse_flag(one_param(params, "retain", "false") or "", "retain")
        payload = read_body(environ, self.settings.max_body_size)
        return self._route(topic, payload, qos, retain, None)

    def _get_retained(self, environ: dict, topic: str) -> tuple:
        """GET /retained/{topic}: the retained message of that exact topic."""
        username = self._authenticate(environ)
        try:
            self.broker.check_topic(topic)
        except TopicNameInvalid as exc:
            raise HTTPError(400, f"invalid topic name: {exc.reason}") from None
        auth = self.broker.auth
        if auth is not None and not auth.can_read(HTTP_CLIENT_ID, username, topic):
            raise HTTPError(403, f"not authorized to read {topic!r}")
        message = self.broker.retained.get(topic)
        if message is None:
            raise HTTPError(404, f"no retained message on {topic!r}")
        return 200, message_json(message, True)

    # -- /subscribe ------------------------------------------------------------------------------

    def _subscribe_app(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        """GET /subscribe?filter=F[&filter=G]: a server-sent events stream."""
        try:
            if environ.get("PATH_INFO") != "/subscribe":
                raise HTTPError(404, "not found")
            allow_methods(environ, ("GET",))
            self._check_accepting()
            params = query(environ)
            unknown = sorted(set(params) - {"filter"})
            if unknown:
                raise HTTPError(400, f"unknown parameter {unknown[0]!r}")
            filters = params.get("filter") or []
            if not filters:
                raise HTTPError(400, "at least one filter parameter is required")
            peer = f"{environ.get('REMOTE_ADDR', '')}:{environ.get('REMOTE_PORT', '')}"
            username = self._authenticate(environ)
            owner = f"user:{username}" if username is not None else f"addr:{environ.get('REMOTE_ADDR', '')}"
            if HEAD_REQUEST in environ:  # the GET's checks and headers, no stream
                body = self._check_head(filters, username, owner)
            else:
                body = self._open_stream(filters, peer, username, owner, environ.get("gunicorn.socket"))
        except HTTPError as err:
            self._count("subscribe", err.status)
            return json_response(start_response, *err.response())
        self._count("subscribe", 200)
        start_response(
            "200 OK",
            [
                ("Content-Type", "text/event-stream; charset=utf-8"),
                ("Cache-Control", "no-cache"),
                ("X-Accel-Buffering", "no"),
            ],
        )
        return body

    def _open_stream(
        self,
        filters: list[str],
        peer: str = "",
        username: str | None = None,
        owner: str = "",
        sock: Any = None,
    ) -> StreamBody:
        broker = self.broker
        settings = self.settings
        client_id = SSE_CLIENT_PREFIX + uuid.uuid4().hex
        auth = broker.auth
        try:
            self._check_stream(client_id, filters, username, owner)
        except HTTPError:
            if auth is not None:
                auth.forget(client_id)  # the checks compiled this one-off client id's ACL
            raise
        stream = SSEStream(client_id, settings.sse_queue_size, broker, peer, owner)
        try:
            session, _ = broker.open_session(client_id, True, 0, None, username)
        except QuotaExceeded as exc:  # broker.max_sessions
            if auth is not None:
                auth.forget(client_id)
            raise HTTPError(503, str(exc)) from None
        broker.attach(session, stream, 0)
        self.streams.add(stream)
        self.stream_owners[owner] = self.stream_owners.get(owner, 0) + 1
        try:
            results = [broker.subscribe(session, f, 0) for f in filters]
        except TopicFilterInvalid as exc:
            self._end_stream(stream, session)
            raise HTTPError(400, f"invalid topic filter: {exc.reason}") from None
        except QueueRefused as exc:
            # $queue/...: deliveries must be acknowledged, which a stream cannot do.
            self._end_stream(stream, session)
            raise HTTPError(400, f"durable queues are consumed over MQTT: {exc.reason}") from None
        for result in results:
            if result.retained:
                broker.deliver_retained(session, result)
        log.debug("sse_open", extra={"client_id": client_id, "peer": peer, "filters": ",".join(filters)})
        return StreamBody(self._end_stream, stream, session, settings.sse_heartbeat, sock)

    def _check_stream(self, client_id: str, filters: list[str], username: str | None, owner: str) -> None:
        """What a stream must pass before it opens: the user's ACL for each filter, then the bounds."""
        auth = self.broker.auth
        if auth is not None:
            for f in filters:
                code = auth.check_subscribe(client_id, username, f)
                if code:
                    raise acl_refusal(code, "subscribe to", "filter", f)
        # Checked after the ACL (which may wait on the HTTP service) and taken without a greenlet
        # switch in between, so concurrent requests cannot overshoot the bounds.
        self._check_stream_bounds(owner)

    def _check_head(self, filters: list[str], username: str | None, owner: str) -> list[bytes]:
        """HEAD /subscribe: the checks of the GET (filters, ACL, bounds) without opening a stream."""
        check_filters(filters)
        client_id = SSE_CLIENT_PREFIX + uuid.uuid4().hex
        try:
            self._check_stream(client_id, filters, username, owner)
        finally:
            if self.broker.auth is not None:
                self.broker.auth.forget(client_id)
        return []

    def _check_stream_bounds(self, owner: str) -> None:
        settings = self.settings
        retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        if len(self.streams) >= settings.max_streams:
            raise HTTPError(
                429,
                f"too many streams: server.http.plain.max_streams ({settings.max_streams}) are open",
                retry,
            )
        if self.stream_owners.get(owner, 0) >= settings.max_streams_per_user:
            raise HTTPError(
                429,
                f"too many streams for {owner.partition(':')[2]!r}: "
                f"server.http.plain.max_streams_per_user ({settings.max_streams_per_user})"
                " are open",
                retry,
            )

    def _end_stream(self, stream: SSEStream, session: Any) -> None:
        if stream not in self.streams:
            return
        self.streams.discard(stream)
        left = self.stream_owners.get(stream.owner, 0) - 1
        if left > 0:
            self.stream_owners[stream.owner] = left
        else:
            self.stream_owners.pop(stream.owner, None)
        stream.closed = True
        self.broker.close_session(session, stream, False)
        log.debug("sse_closed", extra={"client_id": stream.client_id, "dropped": stream.dropped})

    def queued(self) -> int:
        """Messages waiting in every SSE stream's queue."""
        return sum(len(s.queue) for s in self.streams)


class ExposedBridge:
    """An ``HTTPBridge`` served on a network listener that refuses anonymous requests (Mosquitto 2's
    default when ``auth.allow_anonymous`` is ``auto`` and nothing checks user names): the same bridge
    (one stream registry), with the refusal marked in each request's environ."""

    __slots__ = ("bridge",)

    def __init__(self, bridge: HTTPBridge) -> None:
        self.bridge = bridge

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        environ[REFUSE_ANONYMOUS] = True
        return self.bridge(environ, start_response)

    def pool_size(self, request_slots: int) -> int:
        return self.bridge.pool_size(request_slots)
