"""A tiny HTTP auth service in a thread, for the HTTP callout's tests (tests/auth) and the node's
(tests/e2e/test_auth.py): it answers each POSTed JSON document with ``decide(doc)`` and records it."""

from __future__ import annotations

import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class AuthServer:
    """A tiny auth service: ``decide(doc) -> (status, body)``; records every request it got."""

    def __init__(self, tls: ssl.SSLContext | None = None, path: str = "/auth") -> None:
        self.requests: list[dict] = []
        self.delay = 0.0
        self.decide = lambda doc: (
            200,
            {
                "result": "allow"
                if doc.get("password") == "good" or doc.get("topic", "").startswith("ok/")
                else "deny"
            },
        )
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(doc)
                if server.delay:
                    time.sleep(server.delay)
                status, body = server.decide(doc)
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        scheme = "http"
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}{path}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def count(self, action: str) -> int:
        """The requests received for ``action`` (connect, publish, subscribe)."""
        return sum(1 for r in self.requests if r["action"] == action)
