"""The path router composes JSON routes and mounted WSGI apps."""

from __future__ import annotations

import json

from fluxmq.http.router import Router
from tests.http.test_bridge import wsgi_call


def call(app, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    response = wsgi_call(app, method, path)
    return response.status, response.headers, b"".join(response.body)


def text_app(text: str):
    def app(environ: dict, start_response) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [f"{text} {environ['PATH_INFO']}".encode()]

    return app


def test_exact_route_returns_handler_status_and_json() -> None:
    router = Router()
    router.add("/x", lambda environ: (201, {"path": environ["PATH_INFO"]}))
    status, headers, body = call(router, "/x")
    assert status == 201
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"path": "/x"}


def test_route_methods_are_enforced() -> None:
    router = Router()
    router.add("/x", lambda environ: (200, {}), methods=("get", "post"))
    assert call(router, "/x", "POST")[0] == 200
    status, headers, _ = call(router, "/x", "DELETE")
    assert status == 405
    assert headers["Allow"] == "GET, HEAD, POST"


def test_mount_serves_prefix_and_below_longest_prefix_first() -> None:
    router = Router()
    router.mount("/a", text_app("short"))
    router.mount("/a/b/", text_app("long"))
    assert call(router, "/a")[2] == b"short /a"
    assert call(router, "/a/c")[2] == b"short /a/c"
    assert call(router, "/a/b/c")[2] == b"long /a/b/c"
    assert call(router, "/ab")[0] == 404


def test_routers_nest() -> None:
    inner = Router()
    inner.add("/metrics", lambda environ: (200, {"ok": True}))
    outer = Router()
    outer.add("/health", lambda environ: (200, {"status": "healthy"}))
    outer.mount("/metrics", inner)
    assert json.loads(call(outer, "/metrics")[2]) == {"ok": True}
    assert json.loads(call(outer, "/health")[2]) == {"status": "healthy"}
    assert outer.paths() == ["/health", "/metrics"]


def test_exact_route_wins_over_mount() -> None:
    router = Router()
    router.mount("/", text_app("fallback"))
    router.add("/health", lambda environ: (200, {"status": "healthy"}))
    assert json.loads(call(router, "/health")[2]) == {"status": "healthy"}
    assert call(router, "/other")[2] == b"fallback /other"
