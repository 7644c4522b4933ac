"""A real HTTP receiver for webhook tests: a small WSGI app that records every request and answers
with the status a test sets (a list of statuses is used one per request, the last one repeats).

``GeventReceiver`` runs it on gevent.pywsgi in the test's own hub (for in-process dispatchers);
``ThreadReceiver`` runs it on wsgiref in a thread (for a real node in another process). Both listen
on a free 127.0.0.1 port.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import gevent.pywsgi
import gevent.ssl


class Recorder:
    """The WSGI app: ``requests`` holds (monotonic time, headers, body) per request."""

    def __init__(self) -> None:
        self.requests: list[tuple[float, dict[str, str], bytes]] = []
        self.statuses: list[int] = [200]
        self.lock = threading.Lock()

    def __call__(self, environ: dict, start_response) -> list[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length)
        headers = {k[5:].replace("_", "-").title(): v for k, v in environ.items() if k.startswith("HTTP_")}
        headers["Content-Type"] = environ.get("CONTENT_TYPE", "")
        with self.lock:
            self.requests.append((time.monotonic(), headers, body))
            status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        start_response(f"{status} X", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(body) for _t, _h, body in self.requests]


class GeventReceiver(Recorder):
    def __init__(self, certfile: str = "", keyfile: str = "") -> None:
        """``certfile``/``keyfile`` make it an HTTPS receiver (the URL still says http://)."""
        super().__init__()
        tls = {}
        if certfile:
            context = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # the stdlib one would block the hub
            context.load_cert_chain(certfile, keyfile)
            tls["ssl_context"] = context
        self.server = gevent.pywsgi.WSGIServer(("127.0.0.1", 0), self, log=None, error_log=None, **tls)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"

    def close(self) -> None:
        self.server.stop(timeout=1)


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class ThreadReceiver(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.server = make_server("127.0.0.1", 0, self, server_class=_ThreadingServer, handler_class=_Quiet)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
