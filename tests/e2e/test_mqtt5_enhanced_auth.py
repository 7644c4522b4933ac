"""Enhanced authentication (MQTT 5.0 4.12) with the SCRAM-SHA-256 authenticator: the AUTH exchange
before CONNACK, failures, method rules, and re-authentication on a live connection."""

from __future__ import annotations

import pytest

from fluxmq._core import codec as c
from fluxmq.broker.auth_enhanced import ScramClient, ScramCredential
from tests.e2e.mqtt5raw import Raw5, disconnect_of, module_node, raw5, unique

pytestmark = pytest.mark.e2e

METHOD = "SCRAM-SHA-256"
USER, PASSWORD = "alice", "correct horse"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    creds = tmp_path_factory.mktemp("scram") / "scram.txt"
    creds.write_text(
        "# test users\n"
        + ScramCredential.from_password(PASSWORD).line(USER)
        + "\n"
        + ScramCredential.from_password("pw2").line("bob")
        + "\n"
    )
    with module_node(
        tmp_path_factory, {"auth.enhanced.method": METHOD, "auth.enhanced.credentials_file": str(creds)}
    ) as n:
        yield n


def auth_props(data: bytes | None = None, method: str = METHOD) -> dict:
    p = {c.AUTHENTICATION_METHOD: method}
    if data is not None:
        p[c.AUTHENTICATION_DATA] = data
    return p


def scram_connect(
    node,
    user: str = USER,
    password: str = PASSWORD,
    client_id: str | None = None,
    username: str | None = None,
) -> tuple[Raw5, object, ScramClient]:
    """Run the SCRAM exchange of a CONNECT; returns (client, the final packet, the SCRAM client)."""
    client = Raw5(node)
    scram = ScramClient(user, password)
    first = client.connect(client_id or unique("ea"), properties=auth_props(scram.first()), username=username)
    if not isinstance(first, c.Auth):
        return client, first, scram
    assert (
        first.reason_code == 0x18 and first.properties[c.AUTHENTICATION_METHOD] == METHOD
    )  # [MQTT-4.12.0-2]
    client.send(c.Auth(0x18, auth_props(scram.final(first.properties[c.AUTHENTICATION_DATA]))))
    return client, client.recv(), scram


def test_scram_exchange_then_connack_MQTT_4_12_0_5(node) -> None:
    """CONNECT with the method and client-first, AUTH 0x18 challenge, AUTH 0x18 answer, then CONNACK 0x00
    repeating the method [MQTT-4.12.0-5] with the server's final message, which proves it knows the
    credential; the connection then works as any other."""
    client, connack, scram = scram_connect(node)
    try:
        assert isinstance(connack, c.Connack) and connack.reason_code == 0
        assert connack.properties[c.AUTHENTICATION_METHOD] == METHOD
        assert scram.verify(connack.properties[c.AUTHENTICATION_DATA])
        topic = unique("ea/t")
        client.subscribe(1, (topic, 1))
        client.publish(topic, b"hi", 1, packet_id=2)
        assert client.wait_for(lambda p: isinstance(p, c.Publish)).payload == b"hi"
    finally:
        client.disconnect()


@pytest.mark.parametrize("user, password", [(USER, "wrong"), ("mallory", PASSWORD)])
def test_bad_credentials_get_connack_0x86_and_close_MQTT_4_12_0_4(node, user: str, password: str) -> None:
    client, connack, _ = scram_connect(node, user, password)
    assert isinstance(connack, c.Connack) and connack.reason_code == 0x86
    assert not connack.session_present
    assert client.wait_closed() == []


def test_connect_username_must_match_the_scram_user(node) -> None:
    client = Raw5(node)
    reply = client.connect(
        unique("ea-user"), properties=auth_props(ScramClient(USER, PASSWORD).first()), username="bob"
    )
    assert isinstance(reply, c.Connack) and reply.reason_code == 0x86
    assert client.wait_closed() == []


def test_unsupported_method_gets_0x8C_MQTT_4_12_0_1(node) -> None:
    client = Raw5(node)
    connack = client.connect(unique("ea-8c"), properties=auth_props(b"x", "GS2-KRB5"))
    assert connack.reason_code == 0x8C
    assert client.wait_closed() == []


def test_auth_with_another_method_during_connect_is_a_protocol_error(node) -> None:
    client = Raw5(node)
    challenge = client.connect(unique("ea-m"), properties=auth_props(ScramClient(USER, PASSWORD).first()))
    assert isinstance(challenge, c.Auth)
    client.send(c.Auth(0x18, auth_props(b"x", "SCRAM-SHA-1")))
    packets = client.wait_closed()
    assert [(type(p), p.reason_code) for p in packets] == [(c.Connack, 0x82)]


def test_only_auth_before_connack_MQTT_3_1_2_33(node) -> None:
    """A client that named a method may send only AUTH or DISCONNECT until CONNACK: a PUBLISH there
    ends the connection without a CONNACK [MQTT-3.1.2-33, MQTT-3.2.0-1]."""
    client = Raw5(node)
    client.connect(unique("ea-early"), properties=auth_props(ScramClient(USER, PASSWORD).first()))
    client.send(c.Publish("ea/early", b"x", 0, False, False, 0))
    assert client.wait_closed() == []


def test_clients_without_a_method_still_connect(node) -> None:
    client = raw5(node, unique("ea-plain"))
    old = Raw5(node, version=4)
    try:
        assert c.AUTHENTICATION_METHOD not in client.connack.properties
        assert old.connect(unique("ea-311")).reason_code == 0
    finally:
        client.disconnect()
        old.disconnect()


def reauthenticate(client: Raw5, password: str = PASSWORD, user: str = USER):
    """AUTH 0x19 with a new client-first, answer the challenge; returns the broker's final packet."""
    scram = ScramClient(user, password)
    client.send(c.Auth(0x19, auth_props(scram.first())))
    challenge = client.wait_for(lambda p: isinstance(p, (c.Auth, c.Disconnect)))
    if isinstance(challenge, c.Disconnect):
        return challenge, scram
    assert challenge.reason_code == 0x18
    client.send(c.Auth(0x18, auth_props(scram.final(challenge.properties[c.AUTHENTICATION_DATA]))))
    return client.wait_for(lambda p: isinstance(p, (c.Auth, c.Disconnect))), scram


def test_reauthentication_succeeds_with_auth_0x00_MQTT_4_12_1(node) -> None:
    """AUTH 0x19 starts re-authentication; it ends with AUTH 0x00 carrying the method and the server's
    final message; messages keep flowing during and after it (MQTT 5.0 4.12.1)."""
    client, connack, _ = scram_connect(node)
    topic = unique("ea/re")
    try:
        client.subscribe(1, (topic, 0))
        final, scram = reauthenticate(client)
        assert isinstance(final, c.Auth) and final.reason_code == 0x00
        assert final.properties[c.AUTHENTICATION_METHOD] == METHOD
        assert scram.verify(final.properties[c.AUTHENTICATION_DATA])
        client.publish(topic, b"after", 0)
        assert client.wait_for(lambda p: isinstance(p, c.Publish)).payload == b"after"
        final2, _ = reauthenticate(client)  # again, on the same connection
        assert final2.reason_code == 0x00
    finally:
        client.disconnect()


def test_failed_reauthentication_disconnects_with_0x87_MQTT_4_12_1_2(node) -> None:
    client, _, _ = scram_connect(node)
    final, _ = reauthenticate(client, password="stale")
    assert isinstance(final, c.Disconnect) and final.reason_code == 0x87
    client.wait_closed()


def test_reauthentication_as_another_user_is_refused(node) -> None:
    client, _, _ = scram_connect(node)
    final, _ = reauthenticate(client, password="pw2", user="bob")
    assert isinstance(final, c.Disconnect) and final.reason_code == 0x87
    client.wait_closed()


def test_reauthentication_with_another_method_is_a_protocol_error_MQTT_4_12_1_1(node) -> None:
    client, _, _ = scram_connect(node)
    client.send(c.Auth(0x19, auth_props(b"n,,n=alice,r=x", "SCRAM-SHA-1")))
    assert disconnect_of(client.wait_closed()).reason_code == 0x82


def test_reauthentication_without_a_method_at_connect_is_a_protocol_error(node) -> None:
    client = raw5(node, unique("ea-nometh"))
    client.send(c.Auth(0x19, auth_props(ScramClient(USER, PASSWORD).first())))
    assert disconnect_of(client.wait_closed()).reason_code == 0x82
