"""The gevent worker that hosts the broker: starts the BrokerService, serves the HTTP apps, stops both.

Lifecycle inside the worker process (gunicorn forks it from the arbiter):

1. ``GeventWorker.init_process`` monkey-patches, re-initialises the hub and installs signal handlers;
2. ``load_wsgi`` (our hook) serves the HTTP sockets with "starting" apps (``/health`` 200,
   ``/ready`` 503), starts the ``BrokerService`` (loads the store; MQTT listeners accept from here
   on) and builds the WSGI app around it; a service that cannot start exits with gunicorn's
   ``WORKER_BOOT_ERROR`` so the arbiter halts the node instead of restarting the worker forever;
3. ``run`` serves HTTP and waits until a signal clears ``alive``;
4. shutdown: stop accepting HTTP, ``service.stop(budget)`` (stop accepting MQTT, finish in-flight
   writes, close clients and storage), let in-flight HTTP requests finish, exit 0.

A heartbeat greenlet tells the arbiter the hub is alive; if the hub is blocked for
``server.worker_timeout`` the arbiter kills the worker and starts a new one.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from functools import partial

import gevent
import gevent.event
import gunicorn.util
from gevent.pool import Pool
from gevent.server import StreamServer
from gunicorn.arbiter import Arbiter
from gunicorn.workers.base import Worker
from gunicorn.workers.ggevent import GeventWorker

from fluxmq.broker.behind_io import sleep_behind_io
from fluxmq.node.workers import mark_stopping, stopping_path

log = logging.getLogger("fluxmq.node")

# How often the stop looks whether HTTP requests are done (seconds). The run loop does not poll:
# ``alive = False`` (a signal handler) wakes it (bench/RESULTS.md, "The latency tail: what the hub
# runs besides messages").
POLL_INTERVAL = 0.1
# The shortest period of the heartbeat and of the arbiter's look at it (seconds): gunicorn's, for both
# (but see ``heartbeat_interval``: a 1 s timeout).
HEARTBEAT_INTERVAL = 1.0
#: the heartbeat's period as a share of ``server.worker_timeout`` (see ``liveness_interval``)
HEARTBEATS_PER_TIMEOUT = 10
#: the longest heartbeat period as a share of ``server.worker_timeout`` (see ``heartbeat_interval``)
LONGEST_BEAT_SHARE = 0.5

#: TEST-ONLY environment variable: seconds every heartbeat comes after it is due, as on a machine
#: whose CPU is taken when it is due (a start-up slice, other processes): every beat is that much late,
#: and each one moves the beats that much against the arbiter's looks (``BrokerWorker._beat``). Not
#: a ``FLUXMQ_`` variable: those are configuration keys. Never set it in production.
LATE_HEARTBEAT_ENV = "FLUXMQTEST_HEARTBEAT_LATE"


def liveness_interval(timeout: float) -> float:
    """How often the arbiter looks at the worker's heartbeat file, and how often the worker touches it
    (at least twice per timeout: ``heartbeat_interval``): a tenth of the worker timeout, at least every
    second (gunicorn does both every second whatever the timeout).

    Each is a turn of cold Python code (~60-200 us, with copy-on-write faults on pages the arbiter and
    the worker still share since the fork) on the CPU that serves the messages; once a second they
    were a class of the slowest lone messages (bench/RESULTS.md, "The heartbeat and the arbiter's
    look"). A hung hub is still killed once its heartbeat is ``timeout`` old, within a tenth of the
    timeout more; a hub may now stall for 9/10 of the timeout (from ``timeout`` - 1 s, at least half
    of it) before that."""
    return max(HEARTBEAT_INTERVAL, timeout / HEARTBEATS_PER_TIMEOUT)


def heartbeat_interval(timeout: float) -> float:
    """How often the worker touches its heartbeat file: ``liveness_interval``, but at least twice per
    timeout (every 0.5 s with a 1 s timeout), so that a beat may come half the timeout late.

    The arbiter kills the worker at a look that finds the file older than ``timeout``. A beat every
    second with a 1 s timeout left no room: a beat a few milliseconds late (a restore slice, the
    threadpool's hand-back of the loaded store, a CPU shared with other processes) was a kill
    whenever a look fell in those milliseconds, and since each late beat moves the beats against
    the looks (the arbiter keeps its own second), beats that came late by a second in all met a
    look for sure: a start-up on a loaded machine was killed ("WORKER TIMEOUT") after beats only
    tens of milliseconds late. A hung hub is still killed once its heartbeat is ``timeout`` old."""
    return min(liveness_interval(timeout), timeout * LONGEST_BEAT_SHARE)


# Budget for a quick stop (SIGQUIT): clients are closed without waiting for their writes.
QUICK_STOP_TIMEOUT = 1.0


# At most this much of gunicorn's message (it may quote the whole request line) goes in an error body.
ERROR_MESSAGE_CHARS = 200


def write_json_error(sock, status: int, reason: str, message: str) -> None:
    """gunicorn's answer to a request its parser refuses (400, 414, 431, 501) or to an app that
    raised (500), as every other error of the node's HTTP listeners: JSON ``{"error": ...}`` naming
    the problem, where gunicorn writes an HTML page (``gunicorn.util.write_error``, replaced in the
    worker by ``BrokerWorker.load_wsgi``)."""
    text = " ".join((message or reason).split())
    if len(text) > ERROR_MESSAGE_CHARS:
        text = text[:ERROR_MESSAGE_CHARS] + "..."
    body = json.dumps({"error": text}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    gunicorn.util.write_nonblock(sock, head.encode("latin-1") + body)


# URL scheme of each MQTT listener (fluxmq.node.service.MQTT_LISTENERS names).
_MQTT_SCHEMES = {"tcp": "mqtt", "tls": "mqtts", "mtls": "mqtts", "ws": "ws", "wss": "wss"}


def _host_port(address) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listener_urls(service, surfaces, sockets) -> str:
    """Where every listener is, as one space-separated text: ``tcp=mqtt://127.0.0.1:1883 health=http://...``.

    Bound addresses, so a ``:0`` port shows the port the system chose.
    """
    parts = []
    for listener in service.listeners:
        scheme = _MQTT_SCHEMES.get(listener.name, listener.name)
        path = ""
        if scheme in ("ws", "wss"):
            section = "server.websocket." + ("tls" if scheme == "wss" else "plain")
            path = service.config.get(section).path
        parts.append(f"{listener.name}={scheme}://{_host_port(listener.address)}{path}")
    for (name, _), sock in zip(surfaces, sockets, strict=False):
        scheme = "https" if name.endswith(("_tls", "_mtls")) else "http"
        parts.append(f"{name}={scheme}://{_host_port(sock.getsockname())}")
    return " ".join(parts)


class BrokerWorker(GeventWorker):
    """A ``GeventWorker`` whose process also runs the node's ``BrokerService``.

    The gunicorn app (``fluxmq.node.app.NodeApplication``) provides ``node_config``,
    ``service_factory(config)``, ``make_wsgi_apps(service)`` (one app per bound socket) and
    ``reload_node(service)``; ``stop_budget`` is the time the service gets to stop once the worker
    is told to exit.
    """

    service = None
    _quick = False
    _stopping: gevent.event.Event | None = None

    @property
    def alive(self) -> bool:
        """gunicorn's flag: True while the worker serves. Setting it False (the signal handlers, the
        reloader, gunicorn's own handlers) wakes ``run`` at once, so ``run`` waits on an event instead
        of waking the hub ten times a second to look at it."""
        return self._alive

    @alive.setter
    def alive(self, value: bool) -> None:
        self._alive = value
        if not value and self._stopping is not None:
            self._stopping.set()

    _alive = True

    def load_wsgi(self) -> None:
        """Start the broker (gevent is patched, signals are set) and build the WSGI app around it.

        While the broker loads its store the HTTP sockets are served by the app's "starting" apps
        (``/health`` 200, ``/ready`` 503), so probes get an answer instead of waiting in the
        backlog; the heartbeat keeps running because the load yields to the hub. A worker restarted
        while another of the node serves leaves the shared HTTP sockets to it until it is started
        itself: a probe gets the node's answer (200, the ``workers`` check degraded), not a 503 from
        whichever worker accepted it."""
        self._heartbeat = gevent.spawn(self._beat)
        gunicorn.util.write_error = write_json_error  # this process's listeners answer errors in JSON
        app = self.app
        self._client_apps: dict = {}
        self.wsgi = self._dispatch
        context = getattr(app, "worker_context", None)
        index = getattr(self, "worker_index", None)
        workers = context(index) if context is not None and index is not None else None  # (one: None)
        starting = getattr(app, "make_starting_apps", None)
        if workers is not None and workers.others_up():
            starting = None  # a restart: the workers that serve answer on the shared HTTP sockets
        self._starting_servers = self._start_http_servers(starting()) if starting is not None else []
        try:
            service = app.service_factory(app.node_config)
            if workers is not None:
                service.workers = workers
            service.start()
        except Exception as exc:
            # One clear line; exit code 3 makes the arbiter halt instead of respawning.
            log.error("broker_start_failed", extra={"pid": os.getpid(), "error": _one_line(exc)})
            log.debug("broker_start_failed_traceback", exc_info=True)
            self._heartbeat.kill(block=False)
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
        finally:
            for server in self._starting_servers:
                server.stop_accepting()  # the sockets stay open: run() serves them with the real apps
        self.service = service
        # One WSGI app per bound socket (health, HTTP bridge, admin), in bind order.
        self.wsgi_apps = app.make_wsgi_apps(service)
        if workers is not None:
            workers.mark_up()
        log.info("broker_started", extra={"pid": os.getpid()})
        log.info(
            "listeners", extra={"at": listener_urls(service, getattr(app, "surfaces", ()), self.sockets)}
        )

    def _dispatch(self, environ: dict, start_response):
        """gunicorn's WSGI entry: the app of the socket the request's connection was accepted on."""
        return self._client_apps[environ["gunicorn.socket"]](environ, start_response)

    def _serve(self, app, handshake, listener, client, addr) -> None:
        if handshake is not None:  # an HTTPS listener: TLS first, one log line when it fails
            stream = handshake(client, addr)
            if stream is None:
                return
            client = stream.sock
        self._client_apps[client] = app
        try:
            self.handle(listener, client, addr)
        finally:
            self._client_apps.pop(client, None)

    def _beat(self) -> None:
        # cfg.timeout: gunicorn gives the worker half of it as ``self.timeout``
        interval = heartbeat_interval(self.cfg.timeout)
        late = float(os.environ.get(LATE_HEARTBEAT_ENV) or 0)  # 0 but in tests
        while True:
            try:
                self.notify()
            except (OSError, ValueError):  # the heartbeat file is closed: the worker is exiting
                return
            if late:
                log.warning(
                    "heartbeat_late", extra={"seconds": late, "reason": f"{LATE_HEARTBEAT_ENV} (tests only)"}
                )
            sleep_behind_io(interval + late)  # a message that arrives as it ends is served first

    def notify(self) -> None:
        """The heartbeat (gunicorn's ``Worker.notify``); when the arbiter is gone (killed with
        SIGKILL, crashed, OOM-killed: this process was re-parented), the worker stops as on SIGTERM:
        the broker's stop runs (clients closed, the store committed and closed, the cluster
        registration revoked) and the process exits, freeing its ports and data directory.

        gunicorn's ``GeventWorker.notify`` raises SystemExit in the heartbeat's greenlet instead,
        which skipped that stop: the interpreter then waited for the gRPC server's threads, and the
        process went on serving MQTT and renewing its etcd lease with its gRPC server shut (peers
        timed out on it, a restart found its ports in use, a reassign found it live), never exiting."""
        Worker.notify(self)
        if self.alive and self.ppid != os.getppid():
            log.warning("arbiter_gone", extra={"pid": os.getpid(), "arbiter": self.ppid})
            # nobody starts a dead worker again: a claim waiting for one's restart ends (0x88)
            mark_stopping(getattr(self.app, "run_dir", None))
            self.alive = False
        elif self.alive and self._node_stopping():
            log.info("node_stopping_seen", extra={"pid": os.getpid()})
            self.alive = False

    def _node_stopping(self) -> bool:
        """True once the arbiter stops the node (several workers: the run directory's mark). It marks
        before it sends SIGTERM, but a worker forked a moment before loses a SIGTERM that arrives
        before its handlers are installed (gunicorn's, inherited from the arbiter, queue it in the
        arbiter's copy): that worker booted and served until the arbiter killed it at the end of
        its grace. The mark stands for that signal (``init_signals``; the heartbeat for a SIGTERM
        sent to the whole process group, which the arbiter may mark after)."""
        run_dir = getattr(self.app, "run_dir", None)
        return run_dir is not None and os.path.exists(stopping_path(run_dir))

    def init_signals(self) -> None:
        super().init_signals()
        # gunicorn leaves SIGHUP at its default (terminate) in workers: here it reloads the config
        # (the arbiter forwards its own SIGHUP), and a terminal hangup does not kill the broker.
        signal.signal(signal.SIGHUP, self.handle_hup)
        if self._node_stopping():  # its SIGTERM may have come before the handlers (_node_stopping)
            self.alive = False

    def handle_hup(self, sig, frame) -> None:
        """SIGHUP: reload the configuration into the running broker (in a greenlet, not the handler)."""
        gevent.spawn(self._reload)

    def _reload(self) -> None:
        if self.service is None:
            return  # still booting: the config being started is the fresh one
        try:
            self.app.reload_node(self.service)
        except Exception as exc:  # a bad file must not take the broker down
            log.error("reload_failed", extra={"error": _one_line(exc)})

    def handle_exit(self, sig, frame) -> None:
        """SIGTERM: graceful stop."""
        self.alive = False

    def handle_quit(self, sig, frame) -> None:
        """SIGINT is graceful like SIGTERM (Ctrl-C reaches the whole process group); SIGQUIT is quick."""
        if sig == signal.SIGQUIT:
            self._quick = True
        self.alive = False

    def run(self) -> None:
        """Serve the WSGI app until told to stop, then stop the broker within the budget."""
        servers = self._start_http_servers()
        self._stopping = gevent.event.Event()
        if self.alive:
            self._stopping.wait()
        budget = QUICK_STOP_TIMEOUT if self._quick else self.app.stop_budget
        deadline = time.monotonic() + budget
        log.info(
            "broker_stopping", extra={"pid": os.getpid(), "timeout": round(budget, 3), "quick": self._quick}
        )
        workers = getattr(self.service, "workers", None)
        if workers is not None:
            workers.mark_down()  # the others' /ready names this worker down from here on
        for server in servers:
            server.close()  # stop accepting HTTP; in-flight requests continue
        try:
            self.service.stop(max(0.0, deadline - time.monotonic()))
        except Exception:
            log.exception("broker_stop_failed")
        while time.monotonic() < deadline and any(s.pool.free_count() != s.pool.size for s in servers):
            gevent.sleep(POLL_INTERVAL)
        for server in servers:
            server.stop(timeout=0)
        self._heartbeat.kill(block=False)
        log.info("broker_stopped", extra={"pid": os.getpid()})

    def _start_http_servers(self, apps: list | None = None) -> list[StreamServer]:
        # As GeventWorker.run: gunicorn's HTTP parser on a gevent StreamServer per bound socket.
        servers = []
        handshakes = getattr(self.app, "handshakes", None) or [None] * len(self.sockets)
        apps = self.wsgi_apps if apps is None else apps
        for sock, app, handshake in zip(self.sockets, apps, handshakes, strict=True):
            sock.setblocking(1)
            # The bridge's pool has a slot per possible SSE stream on top (HTTPBridge.pool_size).
            pool_size = (
                app.pool_size(self.worker_connections)
                if hasattr(app, "pool_size")
                else self.worker_connections
            )
            server = StreamServer(
                sock, handle=partial(self._serve, app, handshake, sock), spawn=Pool(pool_size)
            )
            server.start()
            servers.append(server)
        return servers


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
