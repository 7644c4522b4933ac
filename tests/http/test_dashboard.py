"""The dashboard's static files as the admin API serves them (``fluxmq/http/dashboard``).

The browser test (a real chromium driving the page against a node) is ``tests/e2e/test_dashboard.py``.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from fluxmq.broker.broker import Broker
from fluxmq.http.admin import AdminAPI
from fluxmq.http.dashboard import STATIC_DIR, DashboardFiles, load_static_files
from tests.http.test_bridge import wsgi_call

TOKEN = "s3cret-token"


@pytest.fixture
def app() -> AdminAPI:
    return AdminAPI(SimpleNamespace(broker=Broker(), listeners=[]), TOKEN)


def get(app, path: str, headers: dict | None = None, method: str = "GET"):
    resp = wsgi_call(app, method, path, headers=headers)
    return resp.status, resp.headers, b"".join(resp.body)


@pytest.mark.parametrize(
    ("path", "file", "content_type"),
    [
        ("/dashboard/", "index.html", "text/html; charset=utf-8"),
        ("/dashboard/index.html", "index.html", "text/html; charset=utf-8"),
        ("/dashboard/dashboard.js", "dashboard.js", "text/javascript; charset=utf-8"),
        ("/dashboard/dashboard.css", "dashboard.css", "text/css; charset=utf-8"),
    ],
)
def test_files_are_public_with_their_type_and_revalidated(
    app, path: str, file: str, content_type: str
) -> None:
    """No token: the files hold no data (the page asks the API with the token)."""
    status, headers, body = get(app, path)
    assert status == 200
    assert body == (STATIC_DIR / file).read_bytes()
    assert headers["Content-Type"] == content_type
    assert headers["Content-Length"] == str(len(body))
    assert headers["Cache-Control"] == "no-cache" and headers["ETag"].startswith('"')
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert "connect-src 'self'" in headers["Content-Security-Policy"]


def test_unchanged_file_is_304(app) -> None:
    _, headers, _ = get(app, "/dashboard/dashboard.js")
    status, again, body = get(app, "/dashboard/dashboard.js", {"If-None-Match": headers["ETag"]})
    assert status == 304 and body == b"" and again["ETag"] == headers["ETag"]


def test_head_has_no_body(app) -> None:
    status, headers, body = get(app, "/dashboard/", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


def test_bare_paths_redirect_to_the_page(app) -> None:
    status, headers, _ = get(app, "/dashboard")
    assert status == 308 and headers["Location"] == "/dashboard/"
    status, headers, _ = get(app, "/")
    assert status == 302 and headers["Location"] == "/dashboard/"


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/../admin.py",
        "/dashboard/%2E%2E/admin.py",
        "/dashboard/..%2Fadmin.py",
        "/dashboard/static/index.html",
        "/dashboard/index.html/x",
        "/dashboard/__init__.py",
        "/dashboard/%2Fetc%2Fpasswd",
        "/dashboard/nope.js",
        "/dashboard//index.html",
        "/dashboard/.",
    ],
)
def test_only_shipped_files_are_served(app, path: str) -> None:
    """No directory traversal: a request names an entry of the file table or gets 404."""
    status, _, body = get_raw(app, path)
    assert status == 404, (path, body[:100])


def get_raw(app, raw: str):
    """A request whose raw target is ``raw`` exactly (percent-escapes and dots kept)."""
    import io
    from urllib.parse import unquote
    from wsgiref.util import setup_testing_defaults

    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": unquote(raw),
        "RAW_URI": raw,
        "QUERY_STRING": "",
        "wsgi.input": io.BytesIO(),
    }
    setup_testing_defaults(environ)
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen["status"] = int(status.split()[0])
        seen["headers"] = dict(headers)

    body = b"".join(app(environ, start_response))
    return seen["status"], seen["headers"], body


def test_state_changing_methods_are_refused(app) -> None:
    status, _, _ = get(app, "/dashboard/", headers={"Authorization": f"Bearer {TOKEN}"}, method="POST")
    assert status == 405


def test_foreign_host_is_421_for_the_page_too(app) -> None:
    """DNS rebinding cannot load the page under an attacker's name either."""
    status, _, _ = get(app, "/dashboard/", {"Host": "evil.example:8082"})
    assert status == 421


def test_symlinks_and_unknown_types_are_not_served(tmp_path) -> None:
    (tmp_path / "index.html").write_text("<p>hi</p>")
    (tmp_path / "secret.txt").write_text("no")
    (tmp_path / "link.js").symlink_to(tmp_path / "secret.txt")
    (tmp_path / "sub").mkdir()
    assert set(load_static_files(tmp_path)) == {"index.html"}
    files = DashboardFiles(tmp_path)
    assert set(files.files) == {"index.html"}


def test_the_page_loads_nothing_from_elsewhere() -> None:
    """Every asset ships in the package: no http(s):// or protocol-relative URL in any file."""
    files = load_static_files()
    assert {"index.html", "dashboard.js", "dashboard.css"} <= set(files)
    for name, static in files.items():
        text = static.data.decode()
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), name
        assert not re.search(r"""url\(\s*["']?(https?:)?//""", text), name
        assert not re.search(r"""fetch\(\s*["'`](https?:)?//""", text), name
