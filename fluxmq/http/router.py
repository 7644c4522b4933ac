"""A tiny WSGI path router: exact paths to JSON handlers, prefixes to mounted WSGI apps.

The node serves several small HTTP surfaces (health now; metrics, admin and the bridge later),
each on the listener its config names. Every surface is a ``Router``; a listener that hosts more
than one mounts them into another ``Router`` instead of growing one monolithic app.

Every GET route answers HEAD too (RFC 9110 §9.3.2: the same status and headers, no body), through
``answer_head`` around each surface, and every ``Allow`` lists HEAD beside GET (``allow_value``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from typing import Any

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]
JSONHandler = Callable[[dict], tuple]  # (status, body) or (status, body, headers)
#: set in the environ of a HEAD request that ``answer_head`` serves as its GET: a streaming route
#: answers with its headers and opens no stream
HEAD_REQUEST = "fluxmq.head"


def answer_head(app: WSGIApp, environ: dict, start_response: Callable) -> Iterable[bytes]:
    """``app``'s answer to the request; a HEAD request is served as its GET without the body (the
    status, ``Content-Type`` and ``Content-Length`` of the GET). ``app`` calls ``start_response``
    before it returns (every surface here does); a body it returns is closed unread."""
    if environ.get("REQUEST_METHOD", "GET").upper() != "HEAD" or HEAD_REQUEST in environ:
        return app(environ, start_response)
    environ["REQUEST_METHOD"] = "GET"
    environ[HEAD_REQUEST] = True
    body = app(environ, start_response)
    close = getattr(body, "close", None)
    if close is not None:
        close()
    return []


def allow_value(methods: Iterable[str]) -> str:
    """An ``Allow`` header for ``methods``: HEAD follows GET (``answer_head`` serves it)."""
    methods = tuple(methods)
    out: list[str] = []
    for method in methods:
        out.append(method)
        if method == "GET" and "HEAD" not in methods:
            out.append("HEAD")
    return ", ".join(out)


def json_response(
    start_response: Callable, status: int, body: Any, headers: Mapping[str, str] | None = None
) -> list[bytes]:
    """Start a response with ``status`` and return ``body`` serialised as JSON."""
    data = json.dumps(body).encode()
    phrase = HTTPStatus(status).phrase
    response_headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    response_headers.extend((headers or {}).items())
    start_response(f"{status} {phrase}", response_headers)
    return [data]


class Router:
    """Dispatch a WSGI request by path.

    ``add(path, handler)`` serves one exact path with a JSON handler ``handler(environ) -> (status,
    body)`` or ``(status, body, headers)``; ``mount(prefix, app)`` hands every path under ``prefix``
    to another WSGI app unchanged.
    Unknown paths get a 404 JSON body, a method the route does not allow a 405 with ``Allow``; a
    HEAD request is answered as its GET without the body (``answer_head``).
    """

    def __init__(self) -> None:
        self._routes: dict[str, tuple[tuple[str, ...], JSONHandler]] = {}
        self._mounts: list[tuple[str, WSGIApp]] = []

    def add(self, path: str, handler: JSONHandler, methods: Iterable[str] = ("GET",)) -> None:
        """Serve ``path`` (exact match) with ``handler`` for the given HTTP methods."""
        self._routes[path] = (tuple(m.upper() for m in methods), handler)

    def mount(self, prefix: str, app: WSGIApp) -> None:
        """Serve ``prefix`` and every path below it with the WSGI ``app`` (longest prefix wins)."""
        self._mounts.append((prefix.rstrip("/"), app))
        self._mounts.sort(key=lambda item: len(item[0]), reverse=True)

    def paths(self) -> list[str]:
        """The exact paths and mount prefixes this router serves."""
        return sorted([*self._routes, *(prefix for prefix, _ in self._mounts)])

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        return answer_head(self._serve, environ, start_response)

    def _serve(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        route = self._routes.get(path)
        if route is not None:
            methods, handler = route
            method = environ.get("REQUEST_METHOD", "GET").upper()
            if method not in methods:
                return json_response(
                    start_response,
                    405,
                    {"error": "method not allowed", "method": method, "path": path},
                    {"Allow": allow_value(methods)},
                )
            result = handler(environ)
            return json_response(start_response, result[0], result[1], result[2] if len(result) > 2 else None)
        for prefix, app in self._mounts:
            if path == prefix or path.startswith(prefix + "/"):
                return app(environ, start_response)
        return json_response(start_response, 404, {"error": "not found", "path": path})
