"""Admin API (``server.admin.addr``, default ``127.0.0.1:8082``): stats, sessions, subscriptions,
retained messages, config reload. ``fluxmq/http/openapi.yaml`` documents every endpoint.

Authentication: ``Authorization: Bearer <token>`` with the token read from the file
``server.admin.token_file`` (re-read on every reload: SIGHUP or ``POST /reload`` rotate it) or from
the environment variable ``FLUXMQ_ADMIN_TOKEN``; a request without it (or with another) gets 401.
Without a token only reads are open, and only on a loopback address (``check_admin_exposure``
refuses anything else at start); every state-changing call (POST, DELETE) is refused with 403.

A browser can reach a loopback API too (a page's cross-origin form POST, or DNS rebinding a name to
127.0.0.1), so every request is also checked for what a browser cannot forge: the ``Host`` header
must be an IP literal, ``localhost`` or a name in ``server.admin.allowed_hosts`` (else 421), and a
state-changing request with an ``Origin`` other than the API's own is refused (403).

The web dashboard (``/dashboard/``, ``fluxmq.http.dashboard``) is served here too, without a token
(its files hold no data; the page calls this API with the token), and ``GET /monitor`` streams the
messages of a filter to it (``fluxmq.http.monitor``).

Client ids and topics in paths are percent-encoded (``/sessions/a%2Fb`` is client ``a/b``); the
raw request path is split before decoding, so ``%2F`` never splits a path segment. A client id,
queue, node or group name is one segment; only a topic takes the rest of the path (``_match``).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import gevent

from fluxmq import __version__
from fluxmq._core.trie import validate_filter
from fluxmq.broker.session import EXPIRY_NEVER, Session
from fluxmq.config import parse_addr
from fluxmq.errors import ClusterError, ConfigError, StorageError, TopicFilterInvalid
from fluxmq.http.bridge import (
    HTTPError,
    allow_methods,
    decimal,
    is_text,
    message_json,
    one_param,
    path_text,
    query,
    read_json,
)
from fluxmq.http.dashboard import PREFIX as DASHBOARD_PREFIX
from fluxmq.http.dashboard import DashboardFiles
from fluxmq.http.health import cluster_status_body, raft_groups
from fluxmq.http.monitor import TopicMonitor
from fluxmq.http.router import allow_value, answer_head, json_response
from fluxmq.http.walk import SLICE, page, session_totals, sorted_sessions

log = logging.getLogger("fluxmq.http.admin")

TOKEN_ENV = "FLUXMQ_ADMIN_TOKEN"
SPEC_PATH = Path(__file__).with_name("openapi.yaml")
DEFAULT_LIMIT = 1000
MAX_LIMIT = 100000
_AUTH_HEADERS = {"WWW-Authenticate": 'Bearer realm="fluxmq-admin"'}
# Methods that change state: a browser can send these cross-origin without a preflight (a form POST).
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
NO_TOKEN_MESSAGE = (
    f"state-changing calls need an admin token: set server.admin.token_file (a file "
    f"holding the token; generate one with: python -c 'import secrets; "
    f"print(secrets.token_urlsafe(32))') or {TOKEN_ENV}"
)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; every other host (``0.0.0.0`` included) is not."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name: it may resolve anywhere


def check_admin_exposure(addr: str, token: str | None) -> None:
    """Refuse (``ConfigError``) to serve the admin API on a non-loopback address without a token."""
    if not addr or token:
        return
    host, _ = parse_addr(addr)
    if not is_loopback(host):
        raise ConfigError(
            "server.admin.addr",
            f"a loopback address (127.0.0.1, [::1], localhost) unless "
            f"server.admin.token_file or {TOKEN_ENV} is set",
            got=addr,
        )


def read_token_file(path: str) -> str:
    """The admin token in ``path`` (its first line, blanks stripped); ``ConfigError`` when unreadable or empty."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            "server.admin.token_file",
            "a readable file holding the admin token",
            got=path,
            problem=f"cannot read {path!r}: {exc}",
        ) from None
    if not token:
        raise ConfigError(
            "server.admin.token_file",
            "a file whose first line is the admin token",
            got=path,
            problem=f"{path!r} holds no token on its first line",
        )
    return token


def admin_token(config: Any, environ: Mapping[str, str]) -> str | None:
    """The admin token in force: ``server.admin.token_file``'s, else ``FLUXMQ_ADMIN_TOKEN``, else None.

    Setting both is a ``ConfigError``: only the file can be rotated, and two sources would leave it
    unclear which one a rotation changed."""
    path = config.server.admin.token_file
    env_token = environ.get(TOKEN_ENV) or None
    if path:
        if env_token is not None:
            raise ConfigError("server.admin.token_file", f"either it or {TOKEN_ENV}, not both", got=path)
        return read_token_file(path)
    return env_token


def host_allowed(host_header: str, allowed_names: Iterable[str]) -> bool:
    """Is ``Host`` one a DNS rebinding attack cannot produce: an IP literal, localhost, or a configured name?"""
    host = host_header.strip().lower()
    if host.startswith("["):  # [v6]:port
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if not host:
        return False
    if host.rstrip(".") == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return host.rstrip(".") in allowed_names


def _timestamp(value: float) -> float | None:
    return round(value, 3) if value else None


def session_summary(session: Session) -> dict[str, Any]:
    """One session as listed by ``GET /sessions``."""
    delivery = session.delivery
    return {
        "client_id": session.client_id,
        "connected": delivery is not None,
        "protocol_version": getattr(delivery, "version", None) if delivery is not None else None,
        "peer": getattr(delivery, "peer", None) if delivery is not None else None,
        "listener": getattr(delivery, "listener", None) if delivery is not None else None,
        "username": session.username,
        "persistent": session.persistent,
        "expiry_interval": None if session.expiry_interval == EXPIRY_NEVER else session.expiry_interval,
        "connected_since": _timestamp(session.connected_since),
        "disconnected_at": None if delivery is not None else _timestamp(session.disconnected_at),
        "subscriptions": len(session.subscriptions),
        "inflight": len(session.inflight),
        "queue_depth": len(session.queue),
        "queue_bytes": session.queue_bytes,
        "dropped": getattr(
            session, "dropped", 0
        ),  # messages dropped for this client (queue full, offline QoS 0, ...)
    }


def subscription_json(client_id: str, sub: Any) -> dict[str, Any]:
    return {
        "client_id": client_id,
        "filter": sub.filter,
        "qos": sub.qos,
        "no_local": sub.no_local,
        "retain_as_published": sub.retain_as_published,
        "retain_handling": sub.retain_handling,
        "subscription_id": sub.subscription_id or None,
        "share_group": sub.share_group,
    }


def session_detail(session: Session) -> dict[str, Any]:
    """One session as shown by ``GET /sessions/{client_id}``."""
    body = session_summary(session)
    body["subscriptions"] = [subscription_json(session.client_id, s) for s in session.subscriptions.values()]
    body["inflight"] = [
        {"packet_id": pid, "topic": e.message.topic, "qos": e.qos, "released": e.released}
        for pid, e in sorted(session.inflight.items())
    ]
    body["inflight_count"] = len(session.inflight)
    will = session.will
    body["will"] = (
        None
        if will is None
        else {
            "topic": will.message.topic,
            "qos": will.message.qos,
            "retain": will.message.retain,
            "delay": will.delay,
        }
    )
    return body


def _limit(params: dict[str, list[str]]) -> tuple[int, int]:
    def number(name: str, default: int, maximum: int) -> int:
        value = decimal(one_param(params, name, str(default)) or "")
        if value is None or value > maximum:
            raise HTTPError(400, f"{name} must be an integer 0..{maximum}")
        return value

    return number("limit", DEFAULT_LIMIT, MAX_LIMIT), number("offset", 0, 1 << 62)


class AdminAPI:
    """The admin WSGI app.

    ``service`` provides ``broker`` and ``listeners``; ``bridge`` (optional) the HTTP bridge;
    ``reload()`` re-reads the configuration and returns what it applied (raises ``ConfigError``).
    """

    def __init__(
        self,
        service: Any,
        token: str | None,
        reload: Callable[[], dict] | None = None,
        bridge: Any = None,
        allowed_hosts: Iterable[str] = (),
        addr: str = "",
    ) -> None:
        self.service = service
        self.addr = (
            addr  # the address served (a reload cannot move it: it may not drop the token off loopback)
        )
        self.bridge = bridge
        self._token = token.encode() if token else None
        self._reload = reload
        self.allowed_hosts = frozenset(h.lower().rstrip(".") for h in allowed_hosts)
        self._routes: list[tuple[str, str, Callable[[dict, list[str]], tuple]]] = [
            ("GET", "stats", self.stats),
            ("GET", "sessions", self.list_sessions),
            ("GET", "sessions/*", self.get_session),
            ("POST", "sessions/*/disconnect", self.disconnect),
            ("GET", "subscriptions", self.list_subscriptions),
            ("GET", "retained", self.list_retained),
            ("GET", "retained/**", self.get_retained),
            ("DELETE", "retained/**", self.delete_retained),
            ("POST", "reload", self.reload),
            ("GET", "bridges", self.list_bridges),
            ("GET", "queues", self.list_queues),
            ("GET", "queues/*/messages", self.peek_queue),
            ("POST", "queues/*/purge", self.purge_queue),
            ("POST", "queues/*/replay", self.replay_queue),
            ("POST", "queues/*/owner", self.reassign_queue),
            ("POST", "nodes/*/queues/reassign", self.reassign_node_queues),
            ("GET", "queues/*", self.get_queue),
            ("GET", "cluster/status", self.cluster_status),
            ("POST", "cluster/raft/groups/*/members", self.add_raft_member),
            ("DELETE", "cluster/raft/groups/*/members/*", self.remove_raft_member),
        ]
        self.dashboard = DashboardFiles()
        self.monitor = TopicMonitor()

    @property
    def broker(self) -> Any:
        broker = self.service.broker
        if broker is None:
            raise HTTPError(503, "the broker is not running")
        return broker

    # -- dispatch --------------------------------------------------------------------------------

    def set_token(self, token: str | None) -> None:
        """Put a new token in force (a reload rotated it); the old one is refused from the next request."""
        self._token = token.encode() if token else None

    def reload_hook(self, config: Any) -> set[str]:
        """A ``BrokerService`` reload hook: read the token (file) again and take the allowed hosts.

        Raises ``ConfigError`` (an unreadable or empty token file); the old token then stays in force."""
        token = admin_token(config, os.environ)
        check_admin_exposure(self.addr, token)
        self.set_token(token)
        self.allowed_hosts = frozenset(h.lower().rstrip(".") for h in config.server.admin.allowed_hosts)
        log.info("admin_token_reloaded", extra={"token": "set" if token else "none"})
        return {"server.admin.token_file", "server.admin.allowed_hosts"}

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        return answer_head(self._serve, environ, start_response)  # HEAD: a GET without its body

    def _serve(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        try:
            self._check_browser(environ)
            segments = self._segments(environ)
            if segments[0] == DASHBOARD_PREFIX:  # public static files: the page asks for the token
                return self.dashboard(environ, start_response, segments)
            if segments == [""]:
                allow_methods(environ, ("GET",))
                return json_response(
                    start_response,
                    302,
                    {"dashboard": f"/{DASHBOARD_PREFIX}/"},
                    {"Location": f"/{DASHBOARD_PREFIX}/"},
                )
            self._authenticate(environ)
            if segments == ["openapi.yaml"]:
                return self._spec(environ, start_response)
            if segments == ["monitor"]:
                return self.monitor(self.broker, environ, start_response)
            result = self._dispatch(environ, segments)
        except HTTPError as err:
            result = err.response()
        return json_response(start_response, *result)

    def _check_browser(self, environ: dict) -> None:
        """Refuse what only a browser tricked by another site sends: a foreign ``Host`` (DNS
        rebinding) or, on a state-changing request, a foreign ``Origin`` (cross-site POST)."""
        host = environ.get("HTTP_HOST")
        if host is not None and not host_allowed(host, self.allowed_hosts):
            log.warning(
                "admin_host_refused", extra={"host": host[:200], "peer": environ.get("REMOTE_ADDR", "")}
            )
            raise HTTPError(
                421,
                f"Host {host[:200]!r} is not an address of this API (an IP address, localhost "
                "or a name in server.admin.allowed_hosts)",
            )
        method = environ.get("REQUEST_METHOD", "GET").upper()
        if method not in STATE_CHANGING:
            return
        origin = environ.get("HTTP_ORIGIN")
        if origin is not None:
            _, _, origin_host = origin.partition("://")
            if origin_host.lower() != (host or "").lower():
                log.warning(
                    "admin_origin_refused",
                    extra={"origin": origin[:200], "peer": environ.get("REMOTE_ADDR", "")},
                )
                raise HTTPError(403, f"cross-origin request from {origin[:200]!r} refused")
        if self._token is None:
            raise HTTPError(403, NO_TOKEN_MESSAGE)

    def _authenticate(self, environ: dict) -> None:
        if self._token is None:
            return
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode(), self._token):
            raise HTTPError(401, "a valid bearer token is required", _AUTH_HEADERS)

    @staticmethod
    def _segments(environ: dict) -> list[str]:
        """The path's segments, each percent-decoded on its own (empty ones kept: topics may have them)."""
        raw = environ.get("RAW_URI")
        if raw:
            raw = raw.partition("?")[0]
            if "://" in raw:  # absolute-form request target
                raw = "/" + raw.split("://", 1)[1].partition("/")[2]
            try:
                return [unquote(p, errors="strict") for p in raw[1:].split("/")]
            except UnicodeDecodeError:
                raise HTTPError(400, "the path is not valid UTF-8") from None
        return path_text(environ.get("PATH_INFO") or "/")[1:].split("/")

    def _dispatch(self, environ: dict, segments: list[str]) -> tuple:
        method = environ.get("REQUEST_METHOD", "GET").upper()
        allowed = []
        for route_method, pattern, handler in self._routes:
            args = _match(pattern, segments)
            if args is None:
                continue
            if route_method == method:
                return handler(environ, args)
            allowed.append(route_method)
        if allowed:
            raise HTTPError(405, f"method {method} not allowed", {"Allow": allow_value(allowed)})
        raise HTTPError(404, "not found")

    def _spec(self, environ: dict, start_response: Callable) -> list[bytes]:
        allow_methods(environ, ("GET",))
        data = SPEC_PATH.read_bytes()
        start_response("200 OK", [("Content-Type", "application/yaml"), ("Content-Length", str(len(data)))])
        return [data]

    # -- endpoints -------------------------------------------------------------------------------

    #: several workers (server.workers): () -> the other workers' ``local_stats`` bodies, installed by
    #: the node; ``/stats`` then answers for the node (numbers summed, see ``sum_stats``)
    other_stats = None

    def stats(self, environ: dict, args: list[str]) -> tuple:
        status, body = self.local_stats()
        others = self.other_stats
        if others is not None:
            bodies = others()
            for other in bodies:
                body = sum_stats(body, other)
            body["workers_answering"] = 1 + len(bodies)
        return status, body

    def local_stats(self) -> tuple:
        broker = self.broker
        st = broker.stats
        by_listener = {
            str(listener.name): len(listener.connections)
            for listener in getattr(self.service, "listeners", ())
        }
        if self.bridge is not None:
            by_listener["http_sse"] = len(self.bridge.streams)
        queued, queued_bytes, inflight, _ = session_totals(
            broker.sessions
        )  # in slices: the hub keeps running
        sessions = len(broker.sessions)
        return 200, {
            "version": __version__,
            "uptime_seconds": st.uptime(),
            "connections": {
                "current": broker.connected,
                "total": st.connections_total,
                "by_listener": by_listener,
            },
            "sessions": {
                "total": sessions,
                "connected": broker.connected,
                "offline": max(0, sessions - broker.connected),
            },
            "subscriptions": broker.subscription_count(),
            "retained_messages": len(broker.retained),
            "messages": {
                "received": st.publish_received,
                "sent": st.publish_sent,
                "dropped": st.dropped_total,
                "received_by_qos": dict(zip("012", st.received_qos, strict=True)),
                "sent_by_qos": dict(zip("012", st.sent_qos, strict=True)),
                "dropped_by_reason": dict(sorted(st.drops.items())),
            },
            "bytes": {"received": st.bytes_received, "sent": st.bytes_sent},
            "queues": {"messages": queued, "bytes": queued_bytes, "inflight": inflight},
            "memory": {"rss_bytes": resident_memory()},
            "storage": storage_json(broker.storage),
        }

    def list_bridges(self, environ: dict, args: list[str]) -> tuple:
        """Bridges and cluster routes: overall status and per link state and counters (the same
        data as ``$SYS/broker/cluster/*``); no credentials."""
        _ = self.broker  # 503 before the broker runs
        bridges = getattr(self.service, "bridges", None)
        if bridges is None:
            return 200, {"status": "ok", "bridges": []}
        return 200, bridges.status.summary()

    def cluster_status(self, environ: dict, args: list[str]) -> tuple:
        """The health listener's ``/cluster/status``, here too so the dashboard reads it from its origin."""
        cluster = getattr(self.service, "cluster_health", None)
        if cluster is not None:
            code, body = 200, cluster.status(self.broker.session_count())
        else:
            code, body = cluster_status_body(self.broker.session_count())
        groups = raft_groups(self.service)
        if groups is not None:
            body["raft_groups"] = groups  # each Raft group: leader, term, commit index, lag (issue 12)
        return code, body

    def add_raft_member(self, environ: dict, args: list[str]) -> tuple:
        """Add a member to a Raft group: ``{"addr": "host:port"}`` (its Raft address), or on a group
        whose members are recorded in etcd ``{"node": "<node_id>"}`` (the address its etcd
        registration announces); answered once the change is committed. Only on the group's
        leader (409 naming it elsewhere)."""
        doc = read_json(environ, 4096, b"null")
        if (
            not isinstance(doc, dict)
            or ("addr" in doc) == ("node" in doc)
            or not set(doc) <= ({"addr", "node_id"} if "addr" in doc else {"node"})
            or not all(is_text(v) and v for v in doc.values())
        ):
            raise HTTPError(
                400,
                'the body must be {"addr": "host:port"} (the new member\'s Raft address), with an optional '
                '"node_id" (its key in the member set recorded in etcd), or {"node": "<node_id>"} (a node '
                "registered in etcd, its Raft address read there)",
            )
        if "node" in doc:
            return self._change_raft_member(args[0], "add", "", doc["node"])
        return self._change_raft_member(args[0], "add", doc["addr"], doc.get("node_id", ""))

    def remove_raft_member(self, environ: dict, args: list[str]) -> tuple:
        """``DELETE /cluster/raft/groups/{group}/members/{addr}``: remove a member (a dead node's
        address) from a Raft group, answered once the change is committed."""
        return self._change_raft_member(args[0], "remove", args[1])

    def _change_raft_member(self, group: str, action: str, addr: str, node_id: str = "") -> tuple:
        raft = getattr(self.service, "raft", None)
        # several workers: worker 0 runs the node's Raft member, the others ask it
        change = getattr(raft, "change_member", None) or getattr(self.service, "raft_member_change", None)
        if change is None:
            raise HTTPError(404, "Raft is not enabled on this node (cluster.raft.enabled)")
        from fluxmq.replication.group import MemberChangeRefused

        try:
            members = change(group, action, addr, node_id)
        except MemberChangeRefused as exc:
            body: dict[str, Any] = {"error": str(exc)}
            if exc.leader is not None:
                body["leader"] = exc.leader
            return exc.status, body
        log.info(
            "admin_raft_member_changed",
            extra={"group": group, "action": action, "addr": addr, "members": ",".join(members)},
        )
        return 200, {"group": group, "members": members}

    def list_sessions(self, environ: dict, args: list[str]) -> tuple:
        """Sessions by client id, one page: ``after`` (a cursor: the last client id of the previous
        page, returned as ``next``) or ``offset``. Never sorts every session in one hub turn
        (``fluxmq.http.walk``)."""
        params = query(environ)
        _only(params, {"connected", "limit", "offset", "after"})
        limit, offset = _limit(params)
        connected = one_param(params, "connected")
        after = one_param(params, "after")
        want = None if connected is None else _flag(connected, "connected")
        others = self.other_sessions
        if others is None:
            total, ordered = self.local_sessions(want, after)
            rows = [session_summary(x) for x in page(ordered, offset, limit + 1)]
        else:
            # Several workers: each gives its first offset + limit + 1 rows; the node's page is cut
            # from their merge (client ids are unique across workers).
            n = offset + limit + 1
            total, ordered = self.local_sessions(want, after)
            rows = [session_summary(x) for x in page(ordered, 0, n)]
            for other_total, other_rows in others(want, after, n):
                total += other_total
                rows.extend(other_rows)
            rows.sort(key=lambda row: row["client_id"])
            rows = rows[offset : offset + limit + 1]
        body: dict[str, Any] = {"total": total, "sessions": rows[:limit]}
        if limit and len(rows) > limit:
            body["next"] = rows[limit - 1]["client_id"]
        return 200, body

    #: several workers: ``(connected, after, n) -> [(total, first n summaries), ...]`` of the other
    #: workers' sessions; installed by the node
    other_sessions = None

    def local_sessions(self, connected: bool | None, after: str | None) -> tuple:
        """(total, this worker's sessions ordered by client id) for ``GET /sessions``."""
        keep = None
        if connected is not None:

            def keep(session: Session) -> bool:
                return (session.delivery is not None) == connected

        return sorted_sessions(self.broker.sessions, keep, after)

    def _session(self, client_id: str) -> Session:
        session = self.broker.sessions.get(client_id)
        if session is None:
            raise HTTPError(404, f"no session {client_id!r}")
        return session

    #: several workers: ``(topic) -> None`` deletes a retained message on the other workers too
    retained_deleted = None
    #: several workers: ``(client_id, action) -> (status, body) | None``, the answer of the worker that
    #: owns ``client_id`` when it is not this one (``action`` "get" or "disconnect"); installed by the node
    session_elsewhere = None

    def _elsewhere(self, client_id: str, action: str) -> tuple | None:
        if self.session_elsewhere is None or client_id in self.broker.sessions:
            return None
        return self.session_elsewhere(client_id, action)

    def get_session(self, environ: dict, args: list[str]) -> tuple:
        elsewhere = self._elsewhere(args[0], "get")
        if elsewhere is not None:
            return elsewhere
        return 200, session_detail(self._session(args[0]))

    def disconnect(self, environ: dict, args: list[str]) -> tuple:
        client_id = args[0]
        elsewhere = self._elsewhere(client_id, "disconnect")
        if elsewhere is not None:
            return elsewhere
        session = self._session(client_id)
        if session.delivery is None:
            raise HTTPError(409, f"session {client_id!r} is not connected")
        self.broker.kick(client_id)
        log.info("admin_disconnect", extra={"client_id": client_id})
        return 200, {"client_id": client_id, "disconnected": True}

    def list_subscriptions(self, environ: dict, args: list[str]) -> tuple:
        params = query(environ)
        _only(params, {"client_id", "limit", "offset"})
        limit, offset = _limit(params)
        client_id = one_param(params, "client_id")
        if client_id is not None:
            session = self._session(client_id)
            subs = [subscription_json(session.client_id, sub) for sub in session.subscriptions.values()]
            return 200, {"total": len(subs), "subscriptions": subs[offset : offset + limit]}
        count = [0]

        def keep(session: Session) -> bool:
            n = len(session.subscriptions)
            count[0] += n
            return n > 0

        _, ordered = sorted_sessions(self.broker.sessions, keep)
        out: list[dict[str, Any]] = []
        skip = offset
        for index, session in enumerate(ordered):
            if len(out) >= limit:
                break
            if index and index % SLICE == 0:
                gevent.sleep(0)  # skipping far into the list: let the hub run
            subs = session.subscriptions
            if skip >= len(subs):
                skip -= len(subs)
                continue
            for sub in list(subs.values())[skip : skip + limit - len(out)]:
                out.append(subscription_json(session.client_id, sub))
            skip = 0
        return 200, {"total": count[0], "subscriptions": out}

    def list_retained(self, environ: dict, args: list[str]) -> tuple:
        params = query(environ)
        _only(params, {"filter", "limit", "offset"})
        limit, offset = _limit(params)
        filter = one_param(params, "filter", "#") or ""
        try:
            validate_filter(filter)  # the retained trie walks any text; refuse what MQTT would
            messages = self.broker.retained.match(filter)
        except TopicFilterInvalid as exc:
            raise HTTPError(400, f"invalid topic filter: {exc.reason}") from None
        messages.sort(key=lambda m: m.topic)
        page = [_retained_json(m) for m in messages[offset : offset + limit]]
        return 200, {"total": len(messages), "messages": page}

    def get_retained(self, environ: dict, args: list[str]) -> tuple:
        message = self.broker.retained.get(args[0])
        if message is None:
            raise HTTPError(404, f"no retained message on {args[0]!r}")
        return 200, _retained_json(message)

    def delete_retained(self, environ: dict, args: list[str]) -> tuple:
        topic = args[0]
        if not self.broker.retained.delete(topic):
            raise HTTPError(404, f"no retained message on {topic!r}")
        if self.retained_deleted is not None:
            self.retained_deleted(topic)  # several workers: every worker keeps every retained message
        try:
            self.broker.wait_committed()  # answer once the deletion is committed
        except StorageError:
            raise HTTPError(503, "storage error: the deletion was not committed") from None
        log.info("admin_retained_deleted", extra={"topic": topic})
        return 200, {"topic": topic, "deleted": True}

    # -- durable queues ----------------------------------------------------------------------------

    # Several workers: ``queue_elsewhere(name, action, query_string)`` answers a request about a
    # queue another worker owns ((status, body), from that worker; None when it is this worker's),
    # and ``other_queues()`` gives the other workers' ``describe()`` lists (``fluxmq.cluster.workers``).
    queue_elsewhere = None
    other_queues = None
    # A cluster with etcd: ``queue_owners()`` gives the owning node of every queue recorded in etcd
    # (``fluxmq.cluster.queue_nodes``); the listing names each queue's owner and lists them all.
    queue_owners = None

    def _queue_elsewhere(self, environ: dict, name: str, action: str):
        if self.queue_elsewhere is None:
            return None
        return self.queue_elsewhere(name, action, environ.get("QUERY_STRING", ""))

    def _queues(self, name: str | None = None) -> Any:
        manager = self.broker.queues
        if manager is None or (name is not None and name not in manager.queues):
            if name is None:
                return None
            owner = self.queue_owners().get(name) if self.queue_owners is not None else None
            if owner is not None:
                raise HTTPError(404, f"queue {name!r} is held by node {owner} (ask its admin API)")
            raise HTTPError(404, f"no queue {name!r}")
        return manager

    def list_queues(self, environ: dict, args: list[str]) -> tuple:
        _only(query(environ), set())
        manager = self._queues()
        queues = manager.describe() if manager is not None else []
        if self.other_queues is not None:  # each queue is on one worker: the lists are disjoint
            queues = sorted(
                queues + [q for other in self.other_queues() for q in other], key=lambda q: q["name"]
            )
        if self.queue_owners is None:
            return 200, {"queues": queues}
        owners = self.queue_owners()
        for q in queues:
            q["owner"] = owners.get(q["name"].removesuffix(".dlq"), owners.get(q["name"]))
        return 200, {"queues": queues, "owners": owners}

    def get_queue(self, environ: dict, args: list[str]) -> tuple:
        elsewhere = self._queue_elsewhere(environ, args[0], "get")
        if elsewhere is not None:
            return elsewhere
        return 200, self._queues(args[0]).describe(args[0])[0]

    def peek_queue(self, environ: dict, args: list[str]) -> tuple:
        elsewhere = self._queue_elsewhere(environ, args[0], "peek")
        if elsewhere is not None:
            return elsewhere
        params = query(environ)
        _only(params, {"limit", "offset"})
        limit, _ = _limit(params)
        raw = one_param(params, "offset", "")
        start = decimal(raw) if raw else None
        if raw and start is None:
            raise HTTPError(400, "offset must be an integer >= 0")
        records = self._queues(args[0]).peek(args[0], start, limit)
        out = []
        for rec in records:
            body = message_json(rec.message, False)
            body.pop("retain", None)
            body["offset"] = rec.offset
            body["timestamp"] = rec.timestamp
            out.append(body)
        return 200, {"queue": args[0], "messages": out}

    def purge_queue(self, environ: dict, args: list[str]) -> tuple:
        elsewhere = self._queue_elsewhere(environ, args[0], "purge")
        if elsewhere is not None:
            return elsewhere
        n = self._queues(args[0]).purge(args[0])
        try:
            self.broker.wait_committed()
        except StorageError:
            raise HTTPError(503, "storage error: the purge was not committed") from None
        return 200, {"queue": args[0], "purged": n}

    def replay_queue(self, environ: dict, args: list[str]) -> tuple:
        elsewhere = self._queue_elsewhere(environ, args[0], "replay")
        if elsewhere is not None:
            return elsewhere
        params = query(environ)
        _only(params, {"limit"})
        limit, _ = _limit(params)
        n = self._queues(args[0]).replay_dlq(args[0], limit)
        try:
            self.broker.wait_committed()
        except StorageError:
            raise HTTPError(503, "storage error: the replay was not committed") from None
        return 200, {"queue": args[0], "replayed": n}

    # A cluster with etcd: ``queue_reassign(name, gone, to)`` gives queue ``name``, or every queue of
    # node ``gone``, a new owning node (``fluxmq.cluster.metadata.queue_owners``); raises ClusterError
    # whose ``status`` (when it has one) is the answer's.
    queue_reassign = None

    def reassign_queue(self, environ: dict, args: list[str]) -> tuple:
        """``POST /queues/{name}/owner`` ``{"node": "n2"}`` (default: this node): the queue's owning
        node, gone for good, is replaced by a live one (compare-and-swap in etcd); 409 while the
        recorded owner is live or when the target is not."""
        return self._reassign(environ, name=args[0])

    def reassign_node_queues(self, environ: dict, args: list[str]) -> tuple:
        """``POST /nodes/{node}/queues/reassign`` ``{"node": "n2"}``: every queue of a node gone for
        good goes to a live node (default: this one); 409 while that node is live."""
        return self._reassign(environ, gone=args[0])

    def _reassign(self, environ: dict, name: str = "", gone: str = "") -> tuple:
        if self.queue_reassign is None:
            raise HTTPError(404, "durable queues have no owning node here (cluster.enabled with etcd)")
        doc = read_json(environ, 4096, b"{}")
        if not isinstance(doc, dict) or not set(doc) <= {"node"} or not is_text(doc.get("node", "-")):
            raise HTTPError(400, 'the body must be {} or {"node": "<node_id>"} (the new owning node)')
        to = doc.get("node", "")
        try:
            result = self.queue_reassign(name, gone, to)
        except ClusterError as exc:
            return getattr(exc, "status", 503), {"error": str(exc)}
        log.warning(
            "admin_queue_owner_changed",
            extra={
                "queue": name or "*",
                "was": result.get("old_owner", gone),
                "owner": result["new_owner"],
                "queues": len(result["moved"]) if "moved" in result else 1,
            },
        )
        return 200, result

    def reload(self, environ: dict, args: list[str]) -> tuple:
        if self._reload is None:
            raise HTTPError(503, "reload is not available in this process")
        started = time.monotonic()
        try:
            result = self._reload()
        except ConfigError as exc:
            raise HTTPError(400, str(exc)) from None
        log.info(
            "admin_reload",
            extra={
                "applied": ",".join(result.get("applied", [])),
                "seconds": round(time.monotonic() - started, 3),
            },
        )
        return 200, {"status": "reloaded", **result}


def resident_memory() -> int | None:
    """This process's resident set size in bytes (Linux ``/proc``); None where unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def storage_json(storage: Any) -> dict[str, Any]:
    """The storage backend as ``/stats`` shows it: type, sync mode, bytes used and the size limit."""
    if not storage.durable:
        return {"type": "memory", "sync": None, "used_bytes": None, "map_size": None, "refusing": False}
    try:
        used = storage.used_bytes()
    except Exception:  # a closed or failed environment: /stats must still answer
        used = None
    return {
        "type": "lmdb",
        "sync": getattr(storage, "sync_mode", None),
        "used_bytes": used,
        "map_size": getattr(storage, "map_size", None),
        "refusing": bool(storage.refusing),
    }


def _retained_json(message: Any) -> dict[str, Any]:
    body = message_json(message, True)
    body["size"] = len(message.payload)
    return body


def _match(pattern: str, segments: list[str]) -> list[str] | None:
    """Match ``segments`` against a pattern like ``sessions/*/disconnect`` or ``retained/**``: ``*``
    takes one non-empty segment (a client id, queue, node or group name: a ``/`` in one is ``%2F``),
    a last ``**`` (a topic) the rest of the path, its segments joined with ``/``; the captured
    values, or None. So ``GET /sessions/a/disconnect`` is not session ``a/disconnect``, and a 405's
    ``Allow`` lists only what the path's own route serves."""
    parts = pattern.split("/")
    topic = None
    if parts[-1] == "**":
        parts.pop()
        topic = "/".join(segments[len(parts) :])
        if not topic:
            return None
        segments = segments[: len(parts)]
    if len(parts) != len(segments):
        return None
    args = []
    for part, segment in zip(parts, segments, strict=True):
        if part == "*" and segment:
            args.append(segment)
        elif part != segment:
            return None
    return args if topic is None else [*args, topic]


def _only(params: dict[str, list[str]], allowed: set[str]) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise HTTPError(400, f"unknown parameter {unknown[0]!r}")


def _flag(text: str, name: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise HTTPError(400, f"{name} must be true or false")


#: ``/stats`` figures that are the same on every worker (not summed): the worker's own is kept
STATS_NOT_SUMMED = frozenset({"version", "uptime_seconds", "retained_messages", "storage"})


def sum_stats(mine: dict, other: dict) -> dict:
    """Two workers' ``/stats`` bodies as one: numbers summed leaf by leaf (nested dicts too), the
    ``STATS_NOT_SUMMED`` keys and anything not a number kept from ``mine``."""
    out = dict(mine)
    for key, value in other.items():
        if key in STATS_NOT_SUMMED:
            continue
        have = out.get(key)
        if isinstance(value, dict) and isinstance(have, dict):
            out[key] = sum_stats(have, value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if have is None:
                out[key] = value
            elif isinstance(have, (int, float)) and not isinstance(have, bool):
                out[key] = have + value
        elif have is None:
            out[key] = value
    return out
