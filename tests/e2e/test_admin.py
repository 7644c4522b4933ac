"""The admin API of a real node, and configuration reload (admin ``/reload`` and SIGHUP).

The token comes from ``FLUXMQ_ADMIN_TOKEN`` in the node's environment; every documented response
is validated against ``fluxmq/http/openapi.yaml``. Reload tests rewrite the node's config file.
"""

from __future__ import annotations

import io
import json
import os
import signal
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import paho.mqtt.client as mqtt
import pytest
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest as SpecRequest
from openapi_core.testing import MockResponse as SpecResponse
from ruamel.yaml import YAML

from fluxmq.http.admin import SPEC_PATH
from tests.conftest import NodeFactory, RunningNode, free_port
from tests.e2e.mqttraw import PahoClient, paho_connected, unique, wait_until
from tests.e2e.test_http_bridge import http_request

pytestmark = pytest.mark.e2e

TOKEN = "e2e-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WAIT = 10.0


@pytest.fixture(scope="module")
def spec() -> OpenAPI:
    return OpenAPI.from_file_path(str(SPEC_PATH))


@pytest.fixture(scope="module")
def admin_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """One node with an admin token, shared by the tests of this module that do not stop it."""
    factory = NodeFactory(tmp_path_factory.mktemp("admin"))
    try:
        yield factory(env={"FLUXMQ_ADMIN_TOKEN": TOKEN})
    finally:
        factory.close()


def admin(
    spec: OpenAPI,
    node: RunningNode,
    method: str,
    path: str,
    headers: dict | None = AUTH,
    validate: bool = True,
) -> tuple[int, Any]:
    """One admin request; its response is checked against the spec."""
    status, resp_headers, body = http_request(node, method, path, headers=headers, port=node.admin_port)
    if validate:
        target, _, query = path.partition("?")
        args = dict(part.split("=", 1) for part in query.split("&") if part)
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        # the spec names the default address as its server: validate as if the node listened there
        spec.validate_response(
            SpecRequest("http://127.0.0.1:8082", method, target, args=args, headers=headers),
            SpecResponse(data, status, resp_headers, resp_headers["content-type"]),
        )
    return status, body


def rewrite_config(node: RunningNode, **dotted: Any) -> None:
    """Set keys (``log__level="debug"`` for ``log.level``) in the node's config file."""
    yaml = YAML(typ="safe", pure=True)
    tree = yaml.load(node.config_path.read_text())
    for key, value in dotted.items():
        *sections, leaf = key.split("__")
        node_tree = tree
        for name in sections:
            node_tree = node_tree.setdefault(name, {})
        node_tree[leaf] = value
    out = io.StringIO()
    yaml.dump(tree, out)
    node.config_path.write_text(out.getvalue())


# -- authentication --------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [None, {"Authorization": "Bearer nope"}], ids=["missing", "wrong"])
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/stats"), ("GET", "/sessions"), ("POST", "/reload"), ("DELETE", "/retained/x")],
)
def test_admin_answers_401_without_the_token(
    spec, admin_node: RunningNode, headers, method: str, path: str
) -> None:
    status, body = admin(spec, admin_node, method, path, headers=headers)
    assert status == 401
    assert body == {"error": "a valid bearer token is required"}


def test_admin_refuses_what_a_browser_tricked_by_another_site_sends(spec, admin_node: RunningNode) -> None:
    """A cross-site form POST carries the attacker's Origin; DNS rebinding carries the attacker's name
    as Host. Both are refused even with the right token (issue 17 item 11)."""
    status, body = admin(
        spec, admin_node, "POST", "/reload", headers={**AUTH, "Origin": "http://evil.example"}
    )
    assert status == 403 and "cross-origin" in body["error"]
    status, body = admin(spec, admin_node, "GET", "/stats", headers={**AUTH, "Host": "evil.example"})
    assert status == 421
    status, body = admin(spec, admin_node, "POST", "/reload", headers={**AUTH, "Host": "evil.example:8082"})
    assert status == 421
    assert "admin_origin_refused" in admin_node.log_text() and "admin_host_refused" in admin_node.log_text()


def test_admin_without_a_token_answers_reads_and_refuses_changes(spec, node_factory: NodeFactory) -> None:
    n = node_factory()
    assert admin(spec, n, "GET", "/stats", headers=None)[0] == 200
    for method, path in (("POST", "/reload"), ("DELETE", "/retained/x"), ("POST", "/sessions/c/disconnect")):
        status, body = admin(spec, n, method, path, headers=None)
        assert status == 403 and "server.admin.token_file" in body["error"], (method, path, body)


def test_sighup_rotates_the_admin_token(spec, node_factory: NodeFactory, tmp_path) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text("first-token\n")
    n = node_factory({"server.admin.token_file": str(token_file)})
    first, second = {"Authorization": "Bearer first-token"}, {"Authorization": "Bearer second-token"}
    assert admin(spec, n, "GET", "/stats", headers=first)[0] == 200
    assert admin(spec, n, "GET", "/stats", headers=second)[0] == 401
    token_file.write_text("second-token\n")
    os.kill(n.pid, signal.SIGHUP)
    assert wait_until(lambda: admin(spec, n, "GET", "/stats", headers=second)[0] == 200, WAIT), n.log_tail()
    assert admin(spec, n, "GET", "/stats", headers=first)[0] == 401
    assert admin(spec, n, "POST", "/reload", headers=first)[0] == 401
    # a token file that became unreadable keeps the token in force
    token_file.unlink()
    os.kill(n.pid, signal.SIGHUP)
    assert wait_until(lambda: "reload_failed" in n.log_text(), WAIT), n.log_tail()
    assert admin(spec, n, "GET", "/stats", headers=second)[0] == 200
    assert n.stop() == 0


def test_stats_with_the_token(spec, admin_node: RunningNode) -> None:
    with paho_connected(admin_node, unique("stats")):
        status, body = admin(spec, admin_node, "GET", "/stats")
    assert status == 200
    assert body["connections"]["by_listener"]["tcp"] >= 1
    assert body["sessions"]["connected"] >= 1
    assert body["retained_messages"] > 0  # $SYS


# -- sessions --------------------------------------------------------------------------------------


def test_list_inspect_and_disconnect_a_client(spec, admin_node: RunningNode) -> None:
    cid = unique("admin/dev")  # a slash in the id: percent-encoded in the path
    will_topic = f"wills/{unique('w')}"
    with paho_connected(admin_node, unique("watch")) as watcher:
        watcher.subscribe(will_topic, 1)
        client = PahoClient(admin_node, cid, protocol=mqtt.MQTTv5)
        client.set_will(will_topic, b"gone", qos=1)
        assert not client.connect()[0].is_failure
        try:
            client.subscribe("cmd/#", 1)
            status, listing = admin(spec, admin_node, "GET", "/sessions?connected=true")
            assert status == 200
            mine = [s for s in listing["sessions"] if s["client_id"] == cid]
            assert len(mine) == 1 and mine[0]["protocol_version"] == 5 and mine[0]["listener"] == "tcp"
            assert mine[0]["subscriptions"] == 1
            status, detail = admin(spec, admin_node, "GET", "/sessions/" + quote(cid, safe=""))
            assert status == 200
            assert [s["filter"] for s in detail["subscriptions"]] == ["cmd/#"]
            assert detail["will"] == {"topic": will_topic, "qos": 1, "retain": False, "delay": 0}
            status, subs = admin(spec, admin_node, "GET", "/subscriptions?client_id=" + quote(cid, safe=""))
            assert status == 200 and subs["subscriptions"][0]["filter"] == "cmd/#"

            status, body = admin(spec, admin_node, "POST", f"/sessions/{quote(cid, safe='')}/disconnect")
            assert (status, body) == (200, {"client_id": cid, "disconnected": True})
            assert client.wait_disconnected(WAIT)
            assert client.disconnect_reason.value == 0x98  # Administrative action
            assert watcher.get(WAIT).payload == b"gone"  # a server-side close publishes the will
        finally:
            client.stop()
    assert wait_until(
        lambda: admin(spec, admin_node, "GET", "/sessions/" + quote(cid, safe=""))[0] == 404, WAIT
    )


def test_disconnect_unknown_or_offline(spec, admin_node: RunningNode) -> None:
    assert admin(spec, admin_node, "POST", "/sessions/nobody-here/disconnect")[0] == 404
    cid = unique("offline")
    client = paho_connected(admin_node, cid, clean_session=False)
    client.disconnect()
    # the client's side is done before the broker has read its DISCONNECT: wait for the broker's
    assert wait_until(
        lambda: admin(spec, admin_node, "GET", f"/sessions/{cid}")[1]["connected"] is False, WAIT
    )
    assert admin(spec, admin_node, "POST", f"/sessions/{cid}/disconnect")[0] == 409
    status, detail = admin(spec, admin_node, "GET", f"/sessions/{cid}")
    # a 3.1.1 clean session 0 session expires after broker.max_session_expiry (default 7 days)
    assert status == 200 and detail["connected"] is False and detail["expiry_interval"] == 7 * 24 * 3600


# -- retained --------------------------------------------------------------------------------------


def test_list_and_delete_retained(spec, admin_node: RunningNode) -> None:
    base = unique("ret")
    with paho_connected(admin_node, unique("pub")) as pub:
        pub.publish(f"{base}/a", b"1", qos=1, retain=True)
        pub.publish(f"{base}/b", b"2", qos=1, retain=True)
    status, body = admin(spec, admin_node, "GET", f"/retained?filter={base}/%2B")
    assert status == 200 and [m["topic"] for m in body["messages"]] == [f"{base}/a", f"{base}/b"]
    status, body = admin(spec, admin_node, "DELETE", f"/retained/{base}%2Fa")
    assert (status, body) == (200, {"topic": f"{base}/a", "deleted": True})
    assert http_request(admin_node, "GET", f"/retained/{base}/a")[0] == 404  # the bridge sees it gone
    with paho_connected(admin_node, unique("late")) as late:
        late.subscribe(f"{base}/+", 1)
        assert late.get(WAIT).topic == f"{base}/b"


# -- reload ----------------------------------------------------------------------------------------


def test_admin_reload_applies_runtime_keys_and_lists_the_rest(spec, node_factory: NodeFactory) -> None:
    n = node_factory(env={"FLUXMQ_ADMIN_TOKEN": TOKEN})
    assert admin(spec, n, "POST", "/reload")[1]["changed"] == []
    rewrite_config(
        n, log__level="debug", broker__max_queued_messages=5, server__tcp__plain__max_connections=77
    )
    status, body = admin(spec, n, "POST", "/reload")
    assert status == 200
    assert body["changed"] == ["broker.max_queued_messages", "log.level", "server.tcp.plain.max_connections"]
    assert body["applied"] == ["broker.max_queued_messages", "log.level"]
    assert body["restart_required"] == ["server.tcp.plain.max_connections"]
    # the new level is in force: a client's connect is logged at debug now
    cid = unique("debug-visible")
    assert cid not in n.log_text()
    paho_connected(n, cid).disconnect()
    assert wait_until(lambda: cid in n.log_text(), WAIT), n.log_tail()
    # the same file again: nothing left to apply, the restart key still pending
    status, again = admin(spec, n, "POST", "/reload")
    assert again["changed"] == ["server.tcp.plain.max_connections"] and again["applied"] == []


def test_admin_reload_with_a_bad_file_is_400_and_changes_nothing(spec, node_factory: NodeFactory) -> None:
    n = node_factory(env={"FLUXMQ_ADMIN_TOKEN": TOKEN})
    rewrite_config(n, log__level="loud")
    status, body = admin(spec, n, "POST", "/reload")
    assert status == 400
    assert "log.level" in body["error"] and str(n.config_path) in body["error"]
    assert n.http_get("/ready")[0] == 200


def test_sighup_reloads_in_place_keeping_sessions(spec, node_factory: NodeFactory) -> None:
    """gunicorn's SIGHUP would replace the worker (and drop every in-memory session): ours reloads."""
    n = node_factory(env={"FLUXMQ_ADMIN_TOKEN": TOKEN})
    workers = n.worker_pids()
    sleeper = unique("persistent")
    paho_connected(n, sleeper, clean_session=False).disconnect()
    with paho_connected(n, unique("live")) as live:
        rewrite_config(n, log__level="debug")
        os.kill(n.pid, signal.SIGHUP)
        assert wait_until(lambda: "applied=log.level" in n.log_text(), WAIT), n.log_tail()
        assert n.worker_pids() == workers
        assert live.is_connected
        live.subscribe("after/hup", 0)
        live.publish("after/hup", b"ok")
        assert live.get(WAIT).payload == b"ok"
    assert admin(spec, n, "GET", f"/sessions/{sleeper}")[0] == 200
    assert n.stop() == 0


def test_sighup_with_a_bad_file_keeps_running(node_factory: NodeFactory) -> None:
    n = node_factory()
    rewrite_config(n, broker__max_inflight="many")
    os.kill(n.pid, signal.SIGHUP)
    assert wait_until(lambda: "reload_failed" in n.log_text(), WAIT), n.log_tail()
    assert n.http_get("/ready")[0] == 200
    assert n.stop() == 0


# -- exposure and listeners ------------------------------------------------------------------------


def test_non_loopback_admin_without_token_refuses_to_start(node_factory: NodeFactory) -> None:
    n = node_factory({"server.admin.addr": f":{free_port()}"}, wait_ready=False)
    assert n.wait(30) == 2
    lines = n.log_text().splitlines()
    assert len(lines) == 1 and "server.admin.addr" in lines[0] and "FLUXMQ_ADMIN_TOKEN" in lines[0]


def test_admin_and_bridge_on_one_port_refuses_to_start(node_factory: NodeFactory) -> None:
    port = free_port()
    n = node_factory(
        {"server.admin.addr": f"127.0.0.1:{port}", "server.http.plain.addr": f"127.0.0.1:{port}"},
        wait_ready=False,
    )
    assert n.wait(30) == 2
    assert "server.admin.addr" in n.log_text() and "server.http.plain.addr" in n.log_text()


def test_admin_can_be_turned_off(node_factory: NodeFactory) -> None:
    n = node_factory({"server.admin.addr": ""})
    assert n.admin_port is None
    listening = next(line for line in n.log_text().splitlines() if "Listening at:" in line)
    assert listening.count("http://") == 2  # health and the HTTP bridge
    assert n.stop() == 0
