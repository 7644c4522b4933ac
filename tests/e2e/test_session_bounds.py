"""broker.max_sessions and broker.max_session_expiry on a real node with raw 3.1.1 and 5.0 clients.

Past max_sessions a new client id is refused (3.1.1 CONNACK 3 server unavailable, 5.0 CONNACK 0x97
quota exceeded with a reason string) while ids that have a session still reconnect or take over.
max_session_expiry caps every session's expiry: a 5.0 client is told the capped value in CONNACK's
Session Expiry Interval (MQTT 5.0 3.2.2.3.2) and a 3.1.1 persistent session expires after it.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest

from fluxmq._core import codec as c
from tests.conftest import NodeFactory
from tests.e2e.mqtt5raw import Raw5, raw5
from tests.e2e.mqttraw import RawClient, raw_connected, unique, wait_until
from tests.e2e.test_http_bridge import http_request

pytestmark = pytest.mark.e2e

TOKEN = "session-bounds-token"


def test_new_client_id_past_max_sessions_is_refused_existing_ids_reconnect(node_factory: NodeFactory) -> None:
    node = node_factory({"broker.max_sessions": 2})
    kept = unique("kept")
    online = unique("online")
    first = raw_connected(node, kept, clean=False)
    first.disconnect()  # an offline persistent session: it still counts
    holder = raw5(node, online, properties={c.SESSION_EXPIRY_INTERVAL: 60})
    try:
        with RawClient.to(node) as v311:
            assert v311.connect(unique("new311"), clean=True) == c.Connack(False, 3)  # server unavailable
            v311.wait_closed()
        refused = Raw5(node)
        connack = refused.connect(unique("new5"))
        assert connack.reason_code == 0x97  # quota exceeded
        assert "max_sessions" in connack.properties[c.REASON_STRING]
        refused.wait_closed()
        refused.close()
        # The ids that have a session are not new: a resume and a takeover are accepted.
        again = RawClient.to(node)
        assert again.connect(kept, clean=False) == c.Connack(True, 0)
        again.disconnect()
        taker = raw5(node, online, clean_start=False, properties={c.SESSION_EXPIRY_INTERVAL: 60})
        assert taker.connack.session_present
        holder.wait_closed()
        taker.disconnect(properties={c.SESSION_EXPIRY_INTERVAL: 0})  # the session ends: room for one
        fresh = raw_connected(node, unique("fresh"))
        fresh.disconnect()
    finally:
        holder.close()


def admin_session(node, cid: str) -> tuple[int, dict]:
    status, _, body = http_request(
        node,
        "GET",
        f"/sessions/{quote(cid, safe='')}",
        headers={"Authorization": f"Bearer {TOKEN}"},
        port=node.admin_port,
    )
    return status, body


def test_connack_tells_a_5_0_client_its_capped_session_expiry(node_factory: NodeFactory) -> None:
    node = node_factory({"broker.max_session_expiry": "1h"}, env={"FLUXMQ_ADMIN_TOKEN": TOKEN})
    more, less = unique("more"), unique("less")
    asking_more = raw5(node, more, properties={c.SESSION_EXPIRY_INTERVAL: 86400})
    asking_less = raw5(node, less, properties={c.SESSION_EXPIRY_INTERVAL: 60})
    try:
        assert asking_more.connack.properties[c.SESSION_EXPIRY_INTERVAL] == 3600
        # The client's own value is used: the property is absent (MQTT 5.0 3.2.2.3.2).
        assert c.SESSION_EXPIRY_INTERVAL not in (asking_less.connack.properties or {})
    finally:
        asking_more.disconnect()
        # A DISCONNECT that raises the expiry (MQTT 5.0 3.14.2.2.2) is capped too.
        asking_less.disconnect(properties={c.SESSION_EXPIRY_INTERVAL: 0xFFFFFFFF})
    assert admin_session(node, more)[1]["expiry_interval"] == 3600
    assert admin_session(node, less)[1]["expiry_interval"] == 3600


def test_3_1_1_persistent_session_expires_after_max_session_expiry(node_factory: NodeFactory) -> None:
    node = node_factory({"broker.max_session_expiry": 1}, env={"FLUXMQ_ADMIN_TOKEN": TOKEN})
    cid = unique("v311-persistent")
    client = raw_connected(node, cid, clean=False)
    client.subscribe(1, (unique("bounds/t"), 1))
    client.disconnect()

    def session_status() -> int:
        return admin_session(node, cid)[0]

    assert session_status() == 200
    assert wait_until(lambda: session_status() == 404, timeout=10)
    again = RawClient.to(node)
    assert again.connect(cid, clean=False) == c.Connack(False, 0)  # session present 0: it expired
    again.disconnect()
