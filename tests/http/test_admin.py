"""The admin WSGI app over a real Broker; every documented response is validated against openapi.yaml.

Sessions are real broker sessions: connected ones use the HTTP bridge's SSE stream as their
Delivery, offline ones are persistent sessions without a connection. The node-level tests (token
from the environment, paho clients, reload of a real config file, SIGHUP) are in
``tests/e2e/test_admin.py``.
"""

from __future__ import annotations

import json
import random
from types import SimpleNamespace
from urllib.parse import quote

import gevent
import pytest
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest as SpecRequest
from openapi_core.testing import MockResponse as SpecResponse
from ruamel.yaml import YAML

from fluxmq.broker.broker import Broker
from fluxmq.broker.message import Message
from fluxmq.errors import ConfigError
from fluxmq.http.admin import (
    SPEC_PATH,
    AdminAPI,
    admin_token,
    check_admin_exposure,
    is_loopback,
    read_token_file,
)
from fluxmq.http.bridge import SSEStream
from tests.http.test_bridge import wsgi_call

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def spec() -> OpenAPI:
    return OpenAPI.from_file_path(str(SPEC_PATH))  # also validates the document itself


def call(
    spec: OpenAPI,
    app,
    method: str,
    path: str,
    query: str = "",
    headers: dict | None = AUTH,
    validate: bool = True,
    body: bytes = b"",
):
    """One request; the response is checked against the spec for its path, method and status."""
    resp = wsgi_call(app, method, path, body, query=query, headers=headers)
    data = b"".join(resp.body)
    if validate:
        args = dict(part.split("=", 1) for part in query.split("&") if part)
        request = SpecRequest(
            "http://127.0.0.1:8082", method, quote(path, safe="/"), args=args, headers=headers
        )
        spec.validate_response(
            request, SpecResponse(data, resp.status, resp.headers, resp.headers["Content-Type"])
        )
    return resp.status, resp.headers, data


def json_call(spec, app, method, path, query="", headers=AUTH, validate=True):
    import json

    status, resp_headers, data = call(spec, app, method, path, query, headers, validate)
    return status, resp_headers, json.loads(data)


@pytest.fixture
def broker() -> Broker:
    return Broker()


@pytest.fixture
def reloads() -> list:
    return []


@pytest.fixture
def app(broker: Broker, reloads: list) -> AdminAPI:
    def reload() -> dict:
        reloads.append(1)
        return {"changed": ["log.level"], "applied": ["log.level"], "restart_required": []}

    return AdminAPI(SimpleNamespace(broker=broker, listeners=[]), TOKEN, reload)


def online(broker: Broker, client_id: str) -> tuple:
    """A connected session whose Delivery is an SSE stream (a real front end)."""
    session, _ = broker.open_session(client_id, True, 0)
    stream = SSEStream(client_id, 100, broker, "127.0.0.1:5555")
    broker.attach(session, stream, 0)
    return session, stream


# -- authentication --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [None, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}],
    ids=["none", "wrong", "no-scheme", "basic"],
)
@pytest.mark.parametrize("path", ["/stats", "/sessions", "/retained", "/subscriptions"])
def test_without_the_token_every_endpoint_is_401(spec, app, path: str, headers) -> None:
    status, resp_headers, body = json_call(spec, app, "GET", path, headers=headers)
    assert status == 401
    assert resp_headers["WWW-Authenticate"].startswith("Bearer")
    assert body == {"error": "a valid bearer token is required"}


def test_unknown_path_is_401_before_404(spec, app) -> None:
    """Without the token nothing about the API is revealed, not even which paths exist."""
    assert json_call(spec, app, "GET", "/nope", headers=None, validate=False)[0] == 401
    assert json_call(spec, app, "GET", "/nope", validate=False)[0] == 404


def test_no_token_configured_means_open_for_reads_only(spec, broker) -> None:
    """Without a token a page in the operator's browser could POST /reload cross-site: refused."""
    app = AdminAPI(SimpleNamespace(broker=broker, listeners=[]), None, lambda: {})
    assert json_call(spec, app, "GET", "/stats", headers=None)[0] == 200
    for method, path in (("POST", "/reload"), ("DELETE", "/retained/x"), ("POST", "/sessions/c/disconnect")):
        status, _, body = json_call(spec, app, method, path, headers=None)
        assert status == 403, (method, path)
        assert "server.admin.token_file" in body["error"] and "FLUXMQ_ADMIN_TOKEN" in body["error"]


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1:9999"])
def test_state_changing_call_with_a_foreign_origin_is_403(spec, app, reloads, origin: str) -> None:
    status, _, body = json_call(spec, app, "POST", "/reload", headers={**AUTH, "Origin": origin})
    assert status == 403 and "cross-origin" in body["error"]
    assert reloads == []


def test_same_origin_and_reads_with_an_origin_pass(spec, app, reloads) -> None:
    assert (
        json_call(
            spec, app, "POST", "/reload", headers={**AUTH, "Origin": "http://127.0.0.1", "Host": "127.0.0.1"}
        )[0]
        == 200
    )
    assert json_call(spec, app, "GET", "/stats", headers={**AUTH, "Origin": "http://evil.example"})[0] == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8082", "127.0.0.1.nip.io", ""])
def test_a_host_that_is_not_an_address_is_421(spec, app, host: str) -> None:
    """DNS rebinding: evil.example resolves to 127.0.0.1 after the page loaded; its Host gives it away."""
    status, _, body = json_call(spec, app, "GET", "/stats", headers={**AUTH, "Host": host})
    assert status == 421 and "server.admin.allowed_hosts" in body["error"]


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.0.0.1:8082",
        "[::1]:8082",
        "localhost:8082",
        "LOCALHOST",
        "10.1.2.3:8082",
        "admin.internal:8082",
    ],
)
def test_addresses_localhost_and_allowed_names_pass(spec, broker, host: str) -> None:
    app = AdminAPI(SimpleNamespace(broker=broker, listeners=[]), TOKEN, allowed_hosts=["admin.internal"])
    assert json_call(spec, app, "GET", "/stats", headers={**AUTH, "Host": host})[0] == 200


def test_set_token_rotates(spec, app) -> None:
    app.set_token("new-token")
    assert json_call(spec, app, "GET", "/stats")[0] == 401
    assert json_call(spec, app, "GET", "/stats", headers={"Authorization": "Bearer new-token"})[0] == 200


def test_a_reload_cannot_drop_the_token_of_an_exposed_api(broker) -> None:
    app = AdminAPI(SimpleNamespace(broker=broker, listeners=[]), TOKEN, addr="0.0.0.0:8082")
    tokenless = SimpleNamespace(
        server=SimpleNamespace(admin=SimpleNamespace(token_file="", allowed_hosts=[]))
    )
    with pytest.raises(ConfigError, match="server.admin.addr"):
        app.reload_hook(tokenless)
    assert app._token == TOKEN.encode()


def test_admin_token_from_file_or_environment(tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    with_file = SimpleNamespace(server=SimpleNamespace(admin=SimpleNamespace(token_file=str(token_file))))
    without = SimpleNamespace(server=SimpleNamespace(admin=SimpleNamespace(token_file="")))
    assert admin_token(with_file, {}) == "from-file"
    assert admin_token(without, {"FLUXMQ_ADMIN_TOKEN": "from-env"}) == "from-env"
    assert admin_token(without, {}) is None
    with pytest.raises(ConfigError, match="not both"):
        admin_token(with_file, {"FLUXMQ_ADMIN_TOKEN": "from-env"})
    token_file.write_text("\n")
    with pytest.raises(ConfigError, match="server.admin.token_file.*no token"):
        admin_token(with_file, {})
    with pytest.raises(ConfigError, match="server.admin.token_file.*cannot read"):
        read_token_file(str(tmp_path / "missing"))


# -- stats -----------------------------------------------------------------------------------------


def test_stats(spec, app, broker) -> None:
    session, _ = online(broker, "c1")
    broker.subscribe(session, "a/#", 1)
    broker.publish(Message("a/1", b"hello", 1, retain=True))
    status, _, body = json_call(spec, app, "GET", "/stats")
    assert status == 200
    assert body["connections"] == {"current": 1, "total": 1, "by_listener": {}}
    assert body["sessions"] == {"total": 1, "connected": 1, "offline": 0}
    assert body["subscriptions"] == 1 and body["retained_messages"] == 1
    assert body["messages"]["received_by_qos"] == {"0": 0, "1": 1, "2": 0}
    assert body["messages"]["sent_by_qos"] == {"0": 0, "1": 1, "2": 0}
    assert body["queues"]["inflight"] == 1
    assert body["memory"]["rss_bytes"] > 0
    assert body["storage"] == {
        "type": "memory",
        "sync": None,
        "used_bytes": None,
        "map_size": None,
        "refusing": False,
    }


def test_stats_name_the_lmdb_store_its_size_and_sync_mode(spec, tmp_path) -> None:
    """The dashboard's overview shows storage size and sync mode: /stats carries them."""
    from fluxmq.storage.lmdb import LMDBStorage

    storage = LMDBStorage(tmp_path / "data", map_size=64 << 20, sync="none")
    try:
        storage.load()
        app = AdminAPI(SimpleNamespace(broker=Broker(storage=storage), listeners=[]), TOKEN)
        status, _, body = json_call(spec, app, "GET", "/stats")
    finally:
        storage.close()
    assert status == 200
    assert body["storage"]["type"] == "lmdb" and body["storage"]["sync"] == "none"
    assert body["storage"]["map_size"] == 64 << 20 and 0 < body["storage"]["used_bytes"] < 64 << 20


def test_cluster_status_is_the_health_listeners(spec, app, broker) -> None:
    online(broker, "c1")
    status, _, body = json_call(spec, app, "GET", "/cluster/status")
    assert status == 200
    assert body == {"node_id": "single-node", "is_leader": False, "cluster_mode": False, "sessions": 1}
    assert json_call(spec, app, "GET", "/cluster/status", headers=None)[0] == 401


# -- sessions --------------------------------------------------------------------------------------


def test_list_and_filter_sessions(spec, app, broker) -> None:
    online(broker, "b-online")
    broker.open_session("a-offline", False, 0xFFFFFFFF)
    status, _, body = json_call(spec, app, "GET", "/sessions")
    assert status == 200 and body["total"] == 2
    assert [s["client_id"] for s in body["sessions"]] == ["a-offline", "b-online"]
    offline, live = body["sessions"]
    assert offline["connected"] is False and offline["expiry_interval"] is None and offline["persistent"]
    assert live["connected"] is True and live["protocol_version"] == 0 and live["listener"] == "http_sse"
    assert live["peer"] == "127.0.0.1:5555"
    _, _, only = json_call(spec, app, "GET", "/sessions", query="connected=false")
    assert [s["client_id"] for s in only["sessions"]] == ["a-offline"]
    _, _, page = json_call(spec, app, "GET", "/sessions", query="limit=1&offset=1")
    assert page["total"] == 2 and [s["client_id"] for s in page["sessions"]] == ["b-online"]


@pytest.mark.parametrize("query", ["limit=x", "limit=-1", "offset=1.5", "connected=maybe", "color=red"])
def test_list_sessions_bad_parameters(spec, app, query: str) -> None:
    status, _, body = json_call(spec, app, "GET", "/sessions", query=query, validate=False)
    assert status == 400 and body["error"]


def test_inspect_session(spec, app, broker) -> None:
    session, _ = online(broker, "dev/7")
    broker.subscribe(session, "cmd/7/#", 2, subscription_id=9)
    broker.subscribe(session, "$share/g/jobs", 1)
    broker.publish(Message("cmd/7/reboot", b"now", 2))
    status, _, body = json_call(spec, app, "GET", "/sessions/" + quote("dev/7", safe=""))
    assert status == 200
    assert body["client_id"] == "dev/7"
    assert {s["filter"] for s in body["subscriptions"]} == {"cmd/7/#", "$share/g/jobs"}
    shared = next(s for s in body["subscriptions"] if s["share_group"])
    assert shared["share_group"] == "g" and shared["qos"] == 1
    assert body["inflight"] == [{"packet_id": 1, "topic": "cmd/7/reboot", "qos": 2, "released": False}]
    assert body["inflight_count"] == 1 and body["queue_depth"] == 0 and body["will"] is None


def test_inspect_missing_session_is_404(spec, app) -> None:
    status, _, body = json_call(spec, app, "GET", "/sessions/ghost")
    assert status == 404 and "ghost" in body["error"]


def test_disconnect(spec, app, broker) -> None:
    _, stream = online(broker, "kick-me")
    broker.open_session("sleeper", False, 600)
    status, _, body = json_call(spec, app, "POST", "/sessions/kick-me/disconnect")
    assert (status, body) == (200, {"client_id": "kick-me", "disconnected": True})
    assert stream.closed and "administrator" in stream.close_reason
    assert json_call(spec, app, "POST", "/sessions/sleeper/disconnect")[0] == 409
    assert json_call(spec, app, "POST", "/sessions/nobody/disconnect")[0] == 404


def test_wrong_method_is_405_with_allow(spec, app) -> None:
    status, headers, _ = json_call(spec, app, "DELETE", "/sessions/x", validate=False)
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, headers, _ = json_call(spec, app, "GET", "/reload", validate=False)
    assert status == 405 and headers["Allow"] == "POST"


@pytest.mark.parametrize(
    "method, path, allow",
    [
        ("OPTIONS", "/sessions/a/disconnect", "POST"),
        ("GET", "/sessions/a/disconnect", "POST"),
        ("OPTIONS", "/queues/q/purge", "POST"),
        ("GET", "/queues/q/replay", "POST"),
        ("OPTIONS", "/queues/q/owner", "POST"),
        ("OPTIONS", "/cluster/raft/groups/g/members", "POST"),
        ("GET", "/cluster/raft/groups/g/members/h:1", "DELETE"),
        ("TRACE", "/openapi.yaml", "GET, HEAD"),
        ("POST", "/openapi.yaml", "GET, HEAD"),
        ("PUT", "/", "GET, HEAD"),
    ],
)
def test_allow_names_the_methods_of_the_path_itself(spec, app, method: str, path: str, allow: str) -> None:
    """A client id, queue, node or group name is one path segment (``%2F`` for a ``/``): before,
    ``/sessions/a/disconnect`` was also session ``a/disconnect`` (``Allow: GET, POST``), and
    ``/openapi.yaml`` answered any method with the document."""
    status, headers, body = json_call(spec, app, method, path, validate=False)
    assert status == 405 and headers["Allow"] == allow
    assert body == {"error": f"method {method} not allowed"}


def test_a_slash_in_a_client_id_is_percent_encoded(spec, app, broker) -> None:
    broker.open_session("a/b", False, 600)
    assert json_call(spec, app, "GET", "/sessions/" + quote("a/b", safe=""))[2]["client_id"] == "a/b"
    assert json_call(spec, app, "GET", "/sessions/a/b", validate=False)[0] == 404


@pytest.mark.parametrize(
    "method, path, query",
    [
        ("GET", "/sessions", "limit=%C2%B2"),
        ("GET", "/subscriptions", "offset=%C2%B2"),
        ("GET", "/retained", "limit=%C2%B2"),
        ("GET", "/queues/q/messages", "offset=%C2%B2"),
        ("POST", "/queues/q/replay", "limit=%C2%B2"),
    ],
)
def test_a_count_in_other_digits_is_400(spec, app, method: str, path: str, query: str) -> None:
    """``str.isdigit`` takes ``²`` (and other digits ``int`` refuses): that was a 500."""
    status, _, body = json_call(spec, app, method, path, query=query)
    assert status == 400
    assert body["error"].endswith("must be an integer 0..100000") or "offset must be" in body["error"]


@pytest.mark.parametrize(
    "path, query", [("/sessions", "after=%FF"), ("/retained", "filter=%FF"), ("/monitor", "filter=a%FF")]
)
def test_a_query_string_not_utf8_is_400(spec, app, broker, path: str, query: str) -> None:
    """``%FF`` was decoded to U+FFFD: a cursor, filter or monitored filter the client did not send."""
    status, _, body = json_call(spec, app, "GET", path, query=query)
    assert (status, body) == (400, {"error": "the query string is not valid UTF-8"})
    assert not broker.sessions  # no monitor stream was opened


@pytest.mark.parametrize("path", ["/cluster/raft/groups/g/members", "/queues/q/owner"])
@pytest.mark.parametrize("body", [b"[" * 4000, b"{" + b'"a":{' * 800, b'{"node": "\xff"}', b"{"])
def test_a_json_body_that_does_not_parse_is_400(spec, app, path: str, body: bytes) -> None:
    """Within the 4 KiB bound, nesting 4,000 deep overflowed the parser's recursion: a 500 before
    (the bridge's /publish had the fix)."""
    app.queue_reassign = lambda name, gone, to: pytest.fail("reached with a bad body")
    status, _, answer = call(spec, app, "POST", path, body=body, validate=False)
    assert status == 400
    assert json.loads(answer)["error"].startswith("body is not valid JSON")


@pytest.mark.parametrize(
    "path, body",
    [
        ("/cluster/raft/groups/g/members", b'{"addr": "\\ud800:1"}'),
        ("/cluster/raft/groups/g/members", b'{"node": "n\\udfff"}'),
        ("/queues/q/owner", b'{"node": "n\\ud800"}'),
    ],
)
def test_a_node_or_address_with_a_lone_surrogate_is_400(spec, app, path: str, body: bytes) -> None:
    """JSON's ``\\ud800`` escape is no UTF-8 text: it was passed on as a node id or Raft address."""
    app.queue_reassign = lambda name, gone, to: pytest.fail("reached with a bad body")
    status, _, answer = call(spec, app, "POST", path, body=body, validate=False)
    assert status == 400 and json.loads(answer)["error"].startswith("the body must be")


# -- subscriptions ---------------------------------------------------------------------------------


def test_list_subscriptions(spec, app, broker) -> None:
    s1, _ = online(broker, "one")
    s2, _ = online(broker, "two")
    broker.subscribe(s1, "a", 0)
    broker.subscribe(s2, "b/+", 1, no_local=True, retain_as_published=True, retain_handling=2)
    status, _, body = json_call(spec, app, "GET", "/subscriptions")
    assert status == 200 and body["total"] == 2
    assert [(s["client_id"], s["filter"]) for s in body["subscriptions"]] == [("one", "a"), ("two", "b/+")]
    assert body["subscriptions"][1] == {
        "client_id": "two",
        "filter": "b/+",
        "qos": 1,
        "no_local": True,
        "retain_as_published": True,
        "retain_handling": 2,
        "subscription_id": None,
        "share_group": None,
    }
    _, _, mine = json_call(spec, app, "GET", "/subscriptions", query="client_id=one")
    assert mine["total"] == 1
    assert json_call(spec, app, "GET", "/subscriptions", query="client_id=nobody")[0] == 404


# -- retained --------------------------------------------------------------------------------------


def test_list_get_delete_retained(spec, app, broker) -> None:
    for topic, payload in (("t/b", b"2"), ("t/a", b"\xff"), ("u", b"3")):
        broker.publish(Message(topic, payload, 1, retain=True))
    status, _, body = json_call(spec, app, "GET", "/retained", query="filter=t/%2B")
    assert status == 200 and body["total"] == 2
    assert body["messages"][0] == {
        "topic": "t/a",
        "payload": "/w==",
        "payload_encoding": "base64",
        "qos": 1,
        "retain": True,
        "size": 1,
    }
    assert json_call(spec, app, "GET", "/retained")[2]["total"] == 3
    status, _, one = json_call(spec, app, "GET", "/retained/u")
    assert status == 200 and one["payload"] == "3"
    status, _, deleted = json_call(spec, app, "DELETE", "/retained/u")
    assert (status, deleted) == (200, {"topic": "u", "deleted": True})
    assert broker.retained.get("u") is None
    assert json_call(spec, app, "DELETE", "/retained/u")[0] == 404
    assert json_call(spec, app, "GET", "/retained/u")[0] == 404


def test_retained_topic_with_slashes_and_percent_encoding(spec, app, broker) -> None:
    broker.publish(Message("a/b c/\u00e9", b"x", 0, retain=True))
    status, _, body = json_call(spec, app, "GET", "/retained/" + quote("a/b c/\u00e9", safe=""))
    assert status == 200 and body["topic"] == "a/b c/\u00e9"
    status, _, body = json_call(spec, app, "DELETE", "/retained/a/b c/\u00e9", validate=False)
    assert status == 200 and body["topic"] == "a/b c/\u00e9"


def test_retained_bad_filter_is_400(spec, app) -> None:
    status, _, body = json_call(spec, app, "GET", "/retained", query="filter=a/%23/b")
    assert status == 400 and "filter" in body["error"]


# -- reload and the spec ---------------------------------------------------------------------------


def test_reload(spec, app, reloads) -> None:
    status, _, body = json_call(spec, app, "POST", "/reload")
    assert status == 200 and reloads == [1]
    assert body == {
        "status": "reloaded",
        "changed": ["log.level"],
        "applied": ["log.level"],
        "restart_required": [],
    }


def test_reload_config_error_is_400(spec, broker) -> None:
    def reload() -> dict:
        raise ConfigError("log.level", "one of debug, info", "/etc/fluxmq.yaml", 3, "loud")

    app = AdminAPI(SimpleNamespace(broker=broker, listeners=[]), TOKEN, reload)
    status, _, body = json_call(spec, app, "POST", "/reload")
    assert status == 400 and "log.level (/etc/fluxmq.yaml:3)" in body["error"]


def test_spec_is_served(spec, app) -> None:
    status, headers, data = call(spec, app, "GET", "/openapi.yaml", validate=False)
    assert status == 200 and headers["Content-Type"] == "application/yaml"
    assert data == SPEC_PATH.read_bytes()


def test_a_queue_s_owning_node_is_reassigned_through_the_cluster_with_its_refusals(spec, app) -> None:
    """``POST /queues/{name}/owner`` and ``POST /nodes/{node}/queues/reassign`` hand the request to
    the cluster (``queue_reassign``); its refusal's status is the answer's (409 the owner is live)."""
    from fluxmq.cluster.metadata.queue_owners import OwnerChangeRefused

    status, _, body = json_call(spec, app, "POST", "/queues/orders/owner")
    assert status == 404 and "cluster.enabled" in body["error"]  # no cluster with etcd here
    asked: list[tuple] = []

    def reassign(name: str, gone: str, to: str) -> dict:
        asked.append((name, gone, to))
        if to == "live":
            raise OwnerChangeRefused(409, "queue 'orders': its owning node 'live' is live")
        if name:
            return {"queue": name, "old_owner": "n1", "new_owner": to or "here"}
        return {"node": gone, "new_owner": to or "here", "moved": ["orders"], "failed": []}

    app.queue_reassign = reassign
    status, _, body = json_call(spec, app, "POST", "/queues/orders/owner")
    assert (status, body) == (200, {"queue": "orders", "old_owner": "n1", "new_owner": "here"})
    status, _, raw = call(spec, app, "POST", "/queues/orders/owner", body=b'{"node": "live"}')
    assert status == 409 and b"'live' is live" in raw
    status, _, raw = call(spec, app, "POST", "/nodes/n1/queues/reassign", body=b'{"node": "n2"}')
    assert status == 200 and json.loads(raw)["moved"] == ["orders"]
    for bad in (b"[1]", b'{"node": 3}', b'{"to": "n2"}', b"{"):
        status, _, raw = call(spec, app, "POST", "/queues/orders/owner", body=bad)
        assert status == 400, bad
    assert asked == [("orders", "", ""), ("orders", "", "live"), ("", "n1", "n2")]


def test_every_route_is_documented(spec, app) -> None:
    paths = YAML(typ="safe", pure=True).load(SPEC_PATH.read_text())["paths"]
    documented = {
        (path, method.upper())
        for path, item in paths.items()
        for method in item
        if method in ("get", "post", "delete", "put", "patch")
    }
    routes = {
        (
            "/"
            + pattern.replace("sessions/*", "sessions/{client_id}")
            .replace("retained/**", "retained/{topic}")
            .replace("queues/*", "queues/{name}")
            .replace("nodes/*", "nodes/{node}")
            .replace("groups/*/members", "groups/{group}/members")
            .replace("members/*", "members/{addr}"),
            method,
        )
        for method, pattern, _ in app._routes
    }
    served_before_dispatch = {("/openapi.yaml", "GET"), ("/monitor", "GET"), ("/dashboard/{file}", "GET")}
    assert routes | served_before_dispatch == documented


def test_not_running_broker_is_503(spec) -> None:
    app = AdminAPI(SimpleNamespace(broker=None, listeners=[]), TOKEN)
    status, _, body = json_call(spec, app, "GET", "/stats", validate=False)
    assert status == 503


# -- exposure --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_non_loopback_admin_needs_a_token() -> None:
    check_admin_exposure("127.0.0.1:8082", None)
    check_admin_exposure("[::1]:8082", None)
    check_admin_exposure("", None)  # disabled
    check_admin_exposure(":8082", "token")
    for addr in (":8082", "0.0.0.0:8082", "192.168.1.5:8082"):
        with pytest.raises(ConfigError, match="server.admin.addr.*FLUXMQ_ADMIN_TOKEN"):
            check_admin_exposure(addr, None)


# -- many sessions (issue 17 item 6) ---------------------------------------------------------------

MANY = 10_000


@pytest.fixture
def many(broker: Broker) -> list[str]:
    """MANY offline sessions with client ids in no order, one subscription each (two for some)."""
    rng = random.Random(6)
    ids = [f"dev-{rng.getrandbits(40):010x}" for _ in range(MANY)]
    for i, cid in enumerate(ids):
        session, _ = broker.open_session(cid, False, 3600)
        broker.subscribe(session, f"d/{i}", 1)
        if i % 7 == 0:
            broker.subscribe(session, f"e/{i}", 0)
    return sorted(ids)


def hub_turns_during(fn) -> tuple[int, object]:
    """How many turns a probe greenlet got while ``fn()`` ran in this greenlet, and its result."""
    turns = [0]

    def probe() -> None:
        while True:
            turns[0] += 1
            gevent.sleep(0)

    greenlet = gevent.spawn(probe)
    gevent.sleep(0)
    before = turns[0]
    result = fn()
    after = turns[0]
    greenlet.kill()
    return after - before, result


@pytest.mark.parametrize("path", ["/sessions", "/subscriptions", "/stats"])
def test_walking_every_session_lets_other_greenlets_run(spec, app, many, path: str) -> None:
    """Sorting or summing 100,000 sessions held the hub 15-220 ms (bench/RESULTS.md): every client
    waited. The walk now yields between slices."""
    turns, (status, _, _) = hub_turns_during(
        lambda: json_call(spec, app, "GET", path, query="limit=10" if path != "/stats" else "")
    )
    assert status == 200
    assert turns >= 3, f"{path} over {MANY} sessions let other greenlets run {turns} times"


def test_session_pages_by_cursor_cover_every_session_in_order(spec, app, many) -> None:
    seen: list[str] = []
    query = "limit=999"
    for _ in range(MANY):  # bounded: one page per loop
        _, _, body = json_call(spec, app, "GET", "/sessions", query=query)
        assert body["total"] == MANY
        seen += [s["client_id"] for s in body["sessions"]]
        if "next" not in body:
            break
        query = f"limit=999&after={quote(body['next'], safe='')}"
    assert seen == many
    _, _, body = json_call(spec, app, "GET", "/sessions", query="limit=5&offset=5000")
    assert [s["client_id"] for s in body["sessions"]] == many[5000:5005] and body["next"] == many[5004]


def test_subscription_pages_span_sessions(spec, app, broker, many) -> None:
    everything = [(cid, f) for cid in many for f in broker.sessions[cid].subscriptions]
    for offset, limit in ((0, 3), (1, 2), (7, 50), (len(everything) - 2, 10)):
        _, _, body = json_call(spec, app, "GET", "/subscriptions", query=f"limit={limit}&offset={offset}")
        assert body["total"] == len(everything)
        assert [(s["client_id"], s["filter"]) for s in body["subscriptions"]] == everything[
            offset : offset + limit
        ]


def test_delete_retained_answers_after_the_delete_is_committed(spec, tmp_path) -> None:
    """DELETE /retained/{topic} answers once the deletion is committed. Before: before the commit."""
    from fluxmq.protocol.flush import FlushScheduler
    from fluxmq.storage.lmdb import LMDBStorage

    store = LMDBStorage(tmp_path / "data", sync="always")
    FlushScheduler(store)
    broker = Broker(storage=store)
    app = AdminAPI(SimpleNamespace(broker=broker, listeners=[]), TOKEN, lambda: {})
    try:
        broker.publish(Message("gone", b"v", 1, True))
        store.commit()
        status, _, body = json_call(spec, app, "DELETE", "/retained/gone")
        assert status == 200 and body["deleted"] is True
        assert not store.has_pending
        with store.env.begin() as txn:
            assert txn.get(b"gone", db=store._dbs[6]) is None
    finally:
        store.close()


def test_bridges_lists_links_with_state_and_counters(spec: OpenAPI, broker: Broker) -> None:
    """GET /bridges: the $SYS/broker/cluster data (issue 14), as the spec describes it; no password."""
    from fluxmq.bridge import Bridges
    from fluxmq.bridge.config import BridgeConfig, TopicRoute

    bridges = Bridges(
        [
            BridgeConfig(
                "cloud", "127.0.0.1", 1, password=b"pw-never-shown", topics=(TopicRoute("a/#", "out", 1),)
            )
        ],
        broker,
    )
    bridges.links[0]._open_session()
    app = AdminAPI(SimpleNamespace(broker=broker, listeners=[], bridges=bridges), TOKEN)
    status, _, body = json_call(spec, app, "GET", "/bridges")
    assert status == 200 and body["status"] == "down"
    [entry] = body["bridges"]
    assert (entry["name"], entry["state"], entry["queued"]) == ("cloud", "down", 0)
    assert "pw-never-shown" not in repr(body)
    status, _, body = json_call(
        spec, AdminAPI(SimpleNamespace(broker=broker, listeners=[]), TOKEN), "GET", "/bridges"
    )
    assert (status, body) == (200, {"status": "ok", "bridges": []})


# -- durable queues (issue 10) ---------------------------------------------------------------------


def _queue_broker(broker: Broker):
    from fluxmq.broker.message import USER_PROPERTY
    from fluxmq.queues import QueueManager

    broker.queues = QueueManager(broker.storage)
    for i in range(3):
        broker.publish(Message(f"$queue/orders/eu/{i}", f"o{i}".encode(), 1))
    dead = {
        USER_PROPERTY: [
            ("x-death-reason", "rejected"),
            ("x-delivery-count", "1"),
            ("x-original-topic", "$queue/orders/eu/9"),
            ("k", "v"),
        ]
    }
    broker.publish(Message("$queue/orders.dlq", b"o9", 1, properties=dead))
    return broker.queues


def test_queues_list_peek_purge_and_replay(spec, app, broker) -> None:
    manager = _queue_broker(broker)
    status, _, body = json_call(spec, app, "GET", "/queues")
    assert status == 200
    by_name = {q["name"]: q for q in body["queues"]}
    assert by_name["orders"]["depth"] == 3 and by_name["orders"]["counters"]["appended"] == 3
    assert by_name["orders.dlq"]["depth"] == 1

    status, _, one = json_call(spec, app, "GET", "/queues/orders")
    assert status == 200 and one["next_offset"] == 3
    status, _, peek = json_call(spec, app, "GET", "/queues/orders/messages", "offset=1&limit=1")
    assert status == 200 and [(m["offset"], m["payload"], m["topic"]) for m in peek["messages"]] == [
        (1, "o1", "$queue/orders/eu/1")
    ]

    status, _, replay = json_call(spec, app, "POST", "/queues/orders.dlq/replay")
    assert status == 200 and replay["replayed"] == 1
    assert manager.queues["orders.dlq"].log.count == 0
    moved = manager.peek("orders", 3, 10)
    assert [(r.message.topic, r.message.payload) for r in moved] == [("$queue/orders/eu/9", b"o9")]
    assert dict(moved[0].message.properties[0x26]) == {"k": "v"}  # the x- headers are gone

    status, _, purged = json_call(spec, app, "POST", "/queues/orders/purge")
    assert status == 200 and purged["purged"] == 4
    assert manager.queues["orders"].log.count == 0
    status, _, _ = json_call(spec, app, "GET", "/queues/nope")
    assert status == 404


def test_queues_list_is_empty_without_queues(spec, app) -> None:
    status, _, body = json_call(spec, app, "GET", "/queues")
    assert status == 200 and body == {"queues": []}


def test_session_view_says_how_many_messages_the_client_lost(spec, app, broker) -> None:
    """Who lost what: an offline clean session's QoS 0 messages are dropped and counted for it."""
    session, _ = broker.open_session("lossy", False, 3600)
    broker.subscribe(session, "loss/#", 0)
    for _ in range(3):
        broker.publish(Message("loss/x", b".", 0))
    status, _, body = json_call(spec, app, "GET", "/sessions/lossy")
    assert status == 200 and body["dropped"] == 3
    status, _, body = json_call(spec, app, "GET", "/sessions")
    assert status == 200 and next(s for s in body["sessions"] if s["client_id"] == "lossy")["dropped"] == 3
