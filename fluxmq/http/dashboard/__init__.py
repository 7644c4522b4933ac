"""The web dashboard: static files in ``static/``, served by the admin listener at ``/dashboard/``.

The files are public: they hold no data. The page reads everything from the admin API with the
token the operator types in (kept in the tab's ``sessionStorage``), so serving them opens nothing.

Only the files shipped in ``static/`` are served, read once when the app is built: a request names
an entry of that fixed table or gets 404, so no path (``..``, ``%2F``, a symlink) reaches any other
file. Nothing is fetched from elsewhere; the page's Content-Security-Policy forbids it as well.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from fluxmq.http.router import allow_value

log = logging.getLogger("fluxmq.http.dashboard")

STATIC_DIR = Path(__file__).with_name("static")
PREFIX = "dashboard"
INDEX = "index.html"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
# 'self' only: the page may load its own files and call its own origin (the admin API), nothing else.
SECURITY_HEADERS = [
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
]


@dataclass(frozen=True)
class StaticFile:
    data: bytes
    content_type: str
    etag: str


def load_static_files(directory: Path = STATIC_DIR) -> dict[str, StaticFile]:
    """The servable files of ``directory`` (regular files with a known type, not recursive) by name."""
    files: dict[str, StaticFile] = {}
    for path in sorted(directory.iterdir()):
        content_type = CONTENT_TYPES.get(path.suffix.lower())
        if content_type is None or path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        files[path.name] = StaticFile(data, content_type, '"' + hashlib.sha256(data).hexdigest()[:20] + '"')
    return files


class DashboardFiles:
    """Answers ``GET`` for ``/dashboard/{file}`` from the table ``load_static_files`` built (a HEAD
    reaches it as its GET through the admin API's ``answer_head``).

    Every answer is revalidated (``Cache-Control: no-cache`` with an ``ETag``; 304 when unchanged):
    the file names carry no version, so an upgraded node must never be shadowed by a cached script.
    """

    def __init__(self, directory: Path = STATIC_DIR) -> None:
        self.files = load_static_files(directory)

    def __call__(self, environ: dict, start_response: Callable, segments: list[str]) -> Iterable[bytes]:
        """Serve ``segments`` (the decoded path segments, ``["dashboard", ...]``)."""
        method = environ.get("REQUEST_METHOD", "GET").upper()
        if segments == [PREFIX]:  # /dashboard: the page's relative links need the trailing slash
            return _respond(start_response, 308, [("Location", f"/{PREFIX}/")], b"")
        if method != "GET":
            return _respond(start_response, 405, [("Allow", allow_value(("GET",)))], b"")
        name = segments[1] if len(segments) == 2 else None
        static = self.files.get(name or INDEX) if name is not None else None
        if static is None:
            return _respond(
                start_response, 404, [("Content-Type", "text/plain; charset=utf-8")], b"not found\n"
            )
        headers = [("ETag", static.etag), ("Cache-Control", "no-cache"), *SECURITY_HEADERS]
        if static.etag in (environ.get("HTTP_IF_NONE_MATCH") or ""):
            return _respond(start_response, 304, headers, b"")
        headers.append(("Content-Type", static.content_type))
        return _respond(start_response, 200, headers, static.data, len(static.data))


def _respond(
    start_response: Callable,
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
    length: int | None = None,
) -> list[bytes]:
    start_response(
        f"{status} {HTTPStatus(status).phrase}",
        [*headers, ("Content-Length", str(len(body) if length is None else length))],
    )
    return [body]
