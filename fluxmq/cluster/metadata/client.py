"""EtcdClient: etcd's v3 JSON gateway through etcd3gw, cooperative with the gevent hub.

etcd3gw speaks HTTP through ``requests``. Two things in it would block or escape the hub:

* Its sockets are the standard library's unless ``gevent.monkey.patch_all()`` ran; the node's
  worker patches, but a library must not depend on it. So the ``requests.Session`` given to every
  ``Etcd3Client`` mounts ``GeventAdapter``: urllib3 connections on ``gevent.socket`` (and, for TLS,
  ``gevent.ssl``), which wait on the hub whether or not the process is patched.
* Its ``Watcher`` reads the watch stream in a ``ThreadPoolExecutor`` and calls back from that
  thread. ``PrefixMirror`` replaces it: one greenlet per watch reading the same streamed
  ``/v3/watch`` response, which resumes from the last revision it saw after any error, and resyncs
  with one range read (delivered as a diff) when the revision was compacted.

Lease keep-alive is a plain unary ``/v3/lease/keepalive`` call from a greenlet (``membership``).
When it succeeds after failing (etcd was unreachable: a partition, etcd restarted), every watch of
the client opens a new stream (``EtcdClient.rewatch``): its old one may sit on a TCP connection
that went silent during the cut and would deliver nothing until TCP's next retransmission or the
30 s read timeout, long after etcd answered again.

Every failure reaches callers as ``fluxmq.errors.ClusterError`` with one line naming the endpoint and
the cause; connection errors are retried on the next endpoint until the request timeout is spent.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.socket
import gevent.ssl
import requests
from etcd3gw import exceptions as etcd_exc
from etcd3gw.client import Etcd3Client
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from fluxmq.errors import ClusterError

__all__ = ["EtcdClient", "GeventAdapter", "PrefixMirror", "b64", "unb64"]

log = logging.getLogger("fluxmq.cluster.etcd")

#: the JSON gateway of etcd 3.4 and later (set, so etcd3gw does not ask /version first)
API_PATH = "/v3/"
#: pauses between retries of a request whose connection failed (seconds)
RETRY_PAUSES = (0.05, 0.1, 0.2, 0.4, 0.8)


def b64(value: str | bytes) -> str:
    if isinstance(value, str):
        value = value.encode()
    return base64.b64encode(value).decode("ascii")


def unb64(value: str | None) -> bytes:
    return base64.b64decode(value) if value else b""


def _range_end_b64(prefix: str) -> str:
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode("ascii")


# -- gevent sockets under urllib3 -------------------------------------------------------------------


def _gevent_conn(conn: HTTPConnection):
    try:
        sock = gevent.socket.create_connection((conn._dns_host, conn.port), conn.timeout, conn.source_address)
    except TimeoutError as exc:
        raise ConnectTimeoutError(conn, f"connection to {conn.host} timed out") from exc
    except OSError as exc:
        raise NewConnectionError(conn, f"failed to establish a new connection: {exc}") from exc
    for option in conn.socket_options or ():
        sock.setsockopt(*option)
    return sock


class _GeventHTTPConnection(HTTPConnection):
    def _new_conn(self):
        return _gevent_conn(self)


class _GeventHTTPSConnection(HTTPSConnection):
    def _new_conn(self):
        return _gevent_conn(self)


class _GeventHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GeventHTTPConnection


class _GeventHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GeventHTTPSConnection


class GeventAdapter(HTTPAdapter):
    """A requests adapter whose connections wait on the gevent hub (gevent sockets and SSL)."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, **kwargs: Any) -> None:
        self._ssl_context = ssl_context
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        if self._ssl_context is not None:
            kwargs["ssl_context"] = self._ssl_context
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _GeventHTTPPool, "https": _GeventHTTPSPool}


def gevent_session(ca_file: str = "", cert_file: str = "", key_file: str = "") -> requests.Session:
    """A requests session on gevent sockets; with ``ca_file`` it verifies the server against it, with
    ``cert_file``/``key_file`` it presents a client certificate."""
    session = requests.Session()
    context = None
    if ca_file or cert_file:
        context = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if ca_file:
            context.load_verify_locations(ca_file)
        else:
            context.load_default_certs()
        if cert_file:
            context.load_cert_chain(cert_file, key_file or None)
    # Watches hold a connection each and greenlets call concurrently: room for both without
    # urllib3 discarding connections ("pool is full").
    adapter = GeventAdapter(context, pool_connections=4, pool_maxsize=64)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if ca_file:
        session.verify = ca_file
    return session


# -- the client -------------------------------------------------------------------------------------


def _kv(raw: dict) -> dict:
    """A gateway KeyValue (base64, int64 as strings) -> key str, value bytes, revisions and lease int."""
    return {
        "key": unb64(raw.get("key")).decode(errors="replace"),
        "value": unb64(raw.get("value")),
        "create_revision": int(raw.get("create_revision", 0)),
        "mod_revision": int(raw.get("mod_revision", 0)),
        "version": int(raw.get("version", 0)),
        "lease": int(raw.get("lease", 0)),
    }


class EtcdClient:
    """Unary etcd v3 calls (range, put, delete, txn, leases) over etcd3gw; every method may block the
    calling greenlet (never the hub) and raises ClusterError."""

    def __init__(
        self,
        endpoints: list[str],
        timeout: float = 5.0,
        ca_file: str = "",
        cert_file: str = "",
        key_file: str = "",
    ) -> None:
        if not endpoints:
            raise ClusterError("etcd: no endpoint to connect to")
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self.session = gevent_session(ca_file, cert_file, key_file)
        self._clients = [self._client(url) for url in self.endpoints]
        self._current = 0
        self._skip_first = False  # the first endpoint does not answer (``first_down``): passed over
        self.calls = 0
        self.retries = 0
        self.mirrors: set[PrefixMirror] = set()  # the running watches on this client

    def _client(self, url: str) -> Etcd3Client:
        scheme, _, rest = url.partition("://")
        host, _, port = rest.rstrip("/").rpartition(":")
        return Etcd3Client(
            host=host.strip("[]"),
            port=int(port),
            protocol=scheme,
            timeout=self.timeout,
            api_path=API_PATH,
            session=self.session,
        )

    def close(self) -> None:
        self.session.close()

    def rewatch(self) -> None:
        """etcd answers again after failing: every watch opens a new stream (``PrefixMirror.rewatch``)."""
        for mirror in list(self.mirrors):
            try:
                mirror.rewatch()
            except Exception:  # the caller is the lease's keep-alive: it must go on
                log.exception("watch_reopen_failed", extra={"watch": mirror.name})

    def sync_endpoints(self) -> list[str]:
        """Add the client URLs of the etcd cluster's other members (its member list) after the
        endpoints given, which stay first: a call that finds them down goes on to the others (the
        endpoints in turn, ``post``). The ones added; ClusterError when the list cannot be read."""
        members = self.post("cluster/member/list", {}).get("members", [])
        added = []
        for member in members:
            for url in member.get("clientURLs") or ():
                url = url.rstrip("/")
                if url not in self.endpoints:
                    self._clients.append(self._client(url))
                    self.endpoints.append(url)
                    added.append(url)
        return added

    # -- transport ---------------------------------------------------------------------------------
    def post(self, path: str, body: dict, timeout: float | None = None) -> dict:
        """POST ``body`` to ``/v3/{path}``; retries connection failures on the endpoints in turn
        until ``timeout`` (default: the client's) is spent, then raises ClusterError. With several
        endpoints one attempt gets half of what is left: an endpoint that accepts and never
        answers (a hung member) leaves time for the next one."""
        budget = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        attempt = 0
        share = 1.0 if len(self._clients) == 1 else 0.5
        self.calls += 1
        while True:
            client = self._clients[self._current]
            left = deadline - time.monotonic()
            client.timeout = max(0.05, min(self.timeout, left * share))
            try:
                return client.post(client.get_url(path), json=body)
            except (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError) as exc:
                error = exc
            except etcd_exc.Etcd3Exception as exc:
                raise ClusterError(f"etcd {client.base_url} refused {path}: {_detail(exc)}") from exc
            except requests.RequestException as exc:  # anything else of the HTTP layer: a failed call
                error = exc
            self._next()
            pause = RETRY_PAUSES[min(attempt, len(RETRY_PAUSES) - 1)]
            if time.monotonic() + pause >= deadline:
                raise ClusterError(
                    f"etcd unreachable at {', '.join(self.endpoints)} for {budget:g}s "
                    f"({path}): {_detail(error)}"
                ) from error
            attempt += 1
            self.retries += 1
            gevent.sleep(pause)

    def first_answers(self, timeout: float) -> bool:
        """The first endpoint (the node's own member, ``sync_endpoints``) answers a status call
        within ``timeout`` and knows a leader (a member rejoining does not yet)."""
        try:
            reply = self.session.post(
                f"{self.endpoints[0].rstrip('/')}{API_PATH}maintenance/status", json={}, timeout=timeout
            )
            return reply.ok and int(reply.json().get("leader") or 0) != 0
        except (requests.RequestException, ValueError, AttributeError):
            return False

    def first_down(self, down: bool) -> None:
        """Whether the first endpoint (the node's own member) is known not to answer: while it is,
        the calls go to the others; once it answers again (``down`` False: its prober saw it answer
        long enough that it is not a member back from a hang still thinking itself the leader)
        they start with it again."""
        self._skip_first = down
        if down and self._current == 0 and len(self._clients) > 1:
            self._current = 1
        elif not down:
            self._current = 0

    # -- kv ----------------------------------------------------------------------------------------
    def range(self, key: str, prefix: bool = False, keys_only: bool = False) -> tuple[int, list[dict]]:
        """(revision, key-values) of ``key`` or of every key under it (``prefix``)."""
        body: dict[str, Any] = {"key": b64(key)}
        if prefix:
            body["range_end"] = _range_end_b64(key)
        if keys_only:
            body["keys_only"] = True
        reply = self.post("kv/range", body)
        return int(reply.get("header", {}).get("revision", 0)), [_kv(kv) for kv in reply.get("kvs", [])]

    def get(self, key: str) -> dict | None:
        return next(iter(self.range(key)[1]), None)

    def put(self, key: str, value: bytes | str, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self.post("kv/put", body).get("header", {}).get("revision", 0))

    def delete(self, key: str, prefix: bool = False) -> int:
        body: dict[str, Any] = {"key": b64(key)}
        if prefix:
            body["range_end"] = _range_end_b64(key)
        return int(self.post("kv/deleterange", body).get("deleted", 0))

    def txn(
        self, compare: list[dict], success: list[dict], failure: list[dict] | None = None
    ) -> tuple[bool, list[dict]]:
        """One transaction: (succeeded, responses of the branch that ran)."""
        reply = self.post("kv/txn", {"compare": compare, "success": success, "failure": failure or []})
        return bool(reply.get("succeeded", False)), reply.get("responses", [])

    # -- leases ------------------------------------------------------------------------------------
    def lease_grant(self, ttl: float) -> int:
        reply = self.post("lease/grant", {"TTL": str(max(1, round(ttl)))})
        return int(reply["ID"])

    def lease_keepalive(self, lease_id: int, timeout: float | None = None) -> int:
        """Renew the lease; its new TTL, or -1 when it had already expired."""
        reply = self.post("lease/keepalive", {"ID": str(lease_id)}, timeout)
        return int(reply.get("result", {}).get("TTL", -1))

    def lease_revoke(self, lease_id: int, timeout: float | None = None) -> None:
        try:
            self.post("kv/lease/revoke", {"ID": str(lease_id)}, timeout)
        except ClusterError as exc:
            if "not found" not in str(exc):
                raise

    # -- cluster -----------------------------------------------------------------------------------
    def members_answering(self, timeout: float) -> tuple[int, int]:
        """(members whose client URL answers a status call within ``timeout``, members): whether the
        etcd cluster has a quorum left to commit a write. The member list is the local member's
        (served without consensus); the members are asked at once. ClusterError when no endpoint
        gives the list."""
        members = self.post("cluster/member/list", {}, timeout).get("members", [])
        session = self.session

        def answers(urls: list[str]) -> bool:
            for url in urls:
                try:
                    reply = session.post(
                        f"{url.rstrip('/')}{API_PATH}maintenance/status", json={}, timeout=timeout
                    )
                except requests.RequestException:
                    continue
                if reply.ok:
                    return True
            return False

        probes = [gevent.spawn(answers, m.get("clientURLs") or []) for m in members]
        gevent.joinall(probes, timeout=timeout + 0.5)
        for probe in probes:
            probe.kill(block=False)
        return sum(1 for probe in probes if probe.successful() and probe.value), len(members)

    def watch_stream(self, body: dict, read_timeout: float) -> requests.Response:
        """Open a streamed ``/v3/watch`` on the current endpoint (PrefixMirror reads it)."""
        client = self._clients[self._current]
        try:
            return self.session.post(
                client.get_url("watch"), json=body, stream=True, timeout=(self.timeout, read_timeout)
            )
        except requests.RequestException:
            self._next()
            raise

    def _next(self) -> None:
        """The next endpoint in turn (not the first while it is known not to answer)."""
        self._current = (self._current + 1) % len(self._clients)
        if self._current == 0 and self._skip_first and len(self._clients) > 1:
            self._current = 1


def _detail(exc: BaseException) -> str:
    text = getattr(exc, "detail_text", None) or str(exc) or type(exc).__name__
    try:  # the gateway answers errors as JSON {"error": ..., "message": ...}
        text = json.loads(text).get("message") or text
    except (ValueError, AttributeError):
        pass
    return " ".join(str(text).split())[:300]


# -- compare / operation builders for txn ----------------------------------------------------------


def cmp_create(key: str, revision: int, prefix: bool = False) -> dict:
    """The key's create_revision equals ``revision`` (0: the key does not exist). ``prefix``: every
    key under ``key`` (0: there is none)."""
    compare = {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": str(revision)}
    if prefix:
        compare["range_end"] = _range_end_b64(key)
    return compare


def cmp_mod(key: str, revision: int) -> dict:
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def cmp_value(key: str, value: bytes | str) -> dict:
    return {"key": b64(key), "target": "VALUE", "result": "EQUAL", "value": b64(value)}


def op_put(key: str, value: bytes | str, lease: int = 0) -> dict:
    request: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        request["lease"] = str(lease)
    return {"request_put": request}


def op_delete(key: str) -> dict:
    return {"request_delete_range": {"key": b64(key)}}


def op_get(key: str) -> dict:
    return {"request_range": {"key": b64(key)}}


def range_kvs(response: dict) -> list[dict]:
    """The key-values of a txn's range response."""
    return [_kv(kv) for kv in response.get("response_range", {}).get("kvs", [])]


# -- watching a prefix ------------------------------------------------------------------------------


class PrefixMirror:
    """A local copy of every key under ``prefix``, kept current by a watch in one greenlet.

    ``start()`` reads the prefix once (raising ClusterError when etcd does not answer) and reports
    each key as a change; then the greenlet streams ``/v3/watch`` from the next revision. After a
    broken stream it resumes from the last revision seen; when that revision was compacted it reads
    the prefix again and reports the difference. ``on_change(key, kv, old)`` runs in that greenlet
    for each put (``kv`` set) or delete (``kv`` None); ``old`` is the previous value it knew.
    """

    def __init__(
        self,
        client: EtcdClient,
        prefix: str,
        on_change: Callable[[str, dict | None, dict | None], None],
        read_timeout: float = 30.0,
        name: str = "",
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.on_change = on_change
        self.read_timeout = read_timeout
        self.name = name or prefix
        self.items: dict[str, dict] = {}
        self.revision = 0  # every change up to this revision is applied
        self.connected = False
        self.resyncs = 0
        self._greenlet: gevent.Greenlet | None = None
        self._response: requests.Response | None = None
        self._stopped = False

    def start(self) -> None:
        self._resync()
        self._greenlet = gevent.spawn(self._run)
        self.client.mirrors.add(self)

    def rewatch(self) -> None:
        """Close the current stream: the greenlet opens a new one from the last revision it applied
        (nothing is missed; a compacted revision reads the prefix again). For a stream that may
        have gone silent with its connection (a partition): its reads would wait out TCP's
        retransmission backoff or ``read_timeout``."""
        response = self._response
        if response is None or self._stopped:
            return
        # shut the socket down, not response.close(): the greenlet may be reading it (closing the
        # reader under it raises "reentrant call"); its read ends (EOF) and it opens a new stream
        sock = getattr(getattr(response.raw, "connection", None), "sock", None)
        try:
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # closed already: the greenlet is opening a new stream anyway
        log.info("watch_reopened", extra={"watch": self.name, "revision": self.revision})

    def stop(self) -> None:
        self._stopped = True
        self.client.mirrors.discard(self)
        if self._greenlet is not None:  # GreenletExit in the read; _stream's finally closes the response
            self._greenlet.kill(block=True, timeout=5)

    def _emit(self, key: str, kv: dict | None, old: dict | None) -> None:
        try:
            self.on_change(key, kv, old)
        except Exception:
            log.exception("watch_callback_failed", extra={"watch": self.name, "key": key})

    def _resync(self) -> None:
        revision, kvs = self.client.range(self.prefix, prefix=True)
        fresh = {kv["key"]: kv for kv in kvs}
        for key in [k for k in self.items if k not in fresh]:
            self._emit(key, None, self.items.pop(key))
        for key, kv in fresh.items():
            old = self.items.get(key)
            if old is None or old["mod_revision"] != kv["mod_revision"]:
                self.items[key] = kv
                self._emit(key, kv, old)
        self.revision = revision

    def _run(self) -> None:
        pause = 0.1
        while not self._stopped:
            try:
                self._stream()
                pause = 0.1
            except _Compacted:
                self.resyncs += 1
                try:
                    self._resync()
                except ClusterError as exc:
                    log.warning("watch_resync_failed", extra={"watch": self.name, "error": str(exc)})
                    gevent.sleep(pause)
            except (requests.RequestException, OSError, ValueError, ClusterError) as exc:
                self.connected = False
                if self._stopped:
                    return
                log.debug("watch_reconnect", extra={"watch": self.name, "error": repr(exc)})
                gevent.sleep(pause)
                pause = min(pause * 2, 2.0)
            except Exception:  # never let the mirror go stale silently: log, pause, read again
                log.exception("watch_failed", extra={"watch": self.name})
                gevent.sleep(2.0)
                try:
                    self._resync()
                except ClusterError:
                    pass
            finally:
                self.connected = False

    def _stream(self) -> None:
        body = {
            "create_request": {
                "key": b64(self.prefix),
                "range_end": _range_end_b64(self.prefix),
                "start_revision": str(self.revision + 1),
                "prev_kv": True,
            }
        }
        self._response = response = self.client.watch_stream(body, self.read_timeout)
        try:
            if response.status_code != 200:
                raise ClusterError(f"etcd watch answered {response.status_code}")
            buffer = b""
            for chunk in response.iter_content(chunk_size=None):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        self._handle(json.loads(line))
                if buffer.strip():
                    try:  # a chunk is normally one whole JSON message without a newline
                        message = json.loads(buffer)
                    except ValueError:
                        continue
                    buffer = b""
                    self._handle(message)
        finally:
            self._response = None
            response.close()

    def _handle(self, message: dict) -> None:
        if "error" in message:
            raise ClusterError(f"etcd watch error: {message['error']}")
        result = message.get("result", {})
        if int(result.get("compact_revision", 0) or 0) > 0:
            raise _Compacted()
        if result.get("created"):
            self.connected = True
            return
        if result.get("canceled"):
            raise ClusterError(f"etcd watch canceled: {result.get('cancel_reason', '')}")
        for event in result.get("events", []):
            kv = _kv(event["kv"])
            key = kv["key"]
            if event.get("type") == "DELETE":
                old = self.items.pop(key, None)
                self._emit(key, None, old)
            else:
                old = self.items.get(key)
                self.items[key] = kv
                self._emit(key, kv, old)
            self.revision = max(self.revision, kv["mod_revision"])
        header_revision = int(result.get("header", {}).get("revision", 0))
        if not result.get("events") and header_revision > self.revision:
            self.revision = header_revision  # a progress notification: nothing under the prefix changed


class _Compacted(Exception):
    """The watch's start revision was compacted: the mirror reads the prefix again."""
