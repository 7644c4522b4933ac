"""ACLs on a real node with a Mosquitto ACL file: refused SUBSCRIBE (0x80 for 3.1.1, 0x87 for 5.0,
including the interop suite's test/nosubscribe), refused PUBLISH (dropped for 3.1.1, acked 0x87 for
5.0), deliveries and retained messages filtered by the subscriber's read rules, patterns with %c
and %u, default deny, will topics, reload, and a bad file at start."""

from __future__ import annotations

import base64
import http.client
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from fluxmq._core import codec as c
from fluxmq.auth.password_file import hash_password
from tests.conftest import NodeFactory, RunningNode
from tests.e2e.mqttraw import RawClient, unique, wait_until

pytestmark = pytest.mark.e2e

ACL = """\
# anonymous clients (the interop suite's rules, plus $SYS)
topic readwrite test/#
topic deny test/nosubscribe
topic read $SYS/#

user alice
topic read shared/#
topic deny shared/secret
topic write shared/in
topic readwrite reload/#

user bob
topic readwrite shared/#

pattern readwrite clients/%c/#
pattern read inbox/%u/#
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("acl")
    pw = d / "passwd"
    pw.write_text("".join(f"{u}:{hash_password(u + '-pw')}\n" for u in ("alice", "bob", "carol")))
    acl = d / "acl"
    acl.write_text(ACL)
    return pw, acl


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, files) -> Iterator[RunningNode]:
    factory = NodeFactory(tmp_path_factory.mktemp("node"))
    try:
        yield factory(
            {
                "auth.password_file": str(files[0]),
                "auth.acl_file": str(files[1]),
                "auth.allow_anonymous": True,
                "storage.type": "memory",
            }
        )
    finally:
        factory.close()


def client(
    node: RunningNode, user: str | None = None, version: int = 4, client_id: str | None = None, will=None
) -> RawClient:
    raw = RawClient.to(node, version)
    password = (user + "-pw").encode() if user else None
    connack = raw.connect(client_id or unique(user or "anon"), username=user, password=password, will=will)
    assert connack.reason_code == 0, connack
    return raw


def sentinel_check(sub: RawClient, pub: RawClient, sentinel_topic: str) -> list:
    """Publish a sentinel the subscriber may read; return what it received before it."""
    pub.publish(sentinel_topic, b"sentinel", 0)
    before, _ = sub.collect_until(lambda p: isinstance(p, c.Publish) and p.topic == sentinel_topic)
    return [p for p in before if isinstance(p, c.Publish)]


def test_nosubscribe_refused_with_0x80_for_3_1_1_MQTT_3_9_3_2(node) -> None:
    """The interop suite's ACL: test/nosubscribe is refused; the others in the same SUBSCRIBE granted."""
    with client(node) as sub:
        ack = sub.subscribe(1, ("test/nosubscribe", 0), ("test/a", 1), ("test/+", 2))
        assert ack.reason_codes == [0x80, 1, 2]


def test_refused_subscribe_is_0x87_for_5_0(node) -> None:
    with client(node, version=5) as sub:
        ack = sub.subscribe(1, ("test/nosubscribe", 1), ("test/#", 1), ("other/#", 0))
        assert ack.reason_codes == [0x87, 1, 0x87]
        assert "not authorized" in ack.properties[c.REASON_STRING]


def test_wildcard_subscription_still_never_delivers_denied_topics(node) -> None:
    """test/# is granted, but a message on test/nosubscribe (which the ACL denies) is not delivered."""
    with client(node) as sub, client(node) as pub:
        assert sub.subscribe(1, ("test/#", 0)).reason_codes == [0]
        pub.publish("test/nosubscribe", b"hidden", 1, packet_id=1)
        pub.wait_for(lambda p: isinstance(p, c.Puback))
        assert sentinel_check(sub, pub, "test/sentinel") == []


def test_denied_publish_dropped_and_acked_normally_for_3_1_1(node) -> None:
    with client(node, "bob") as bob, client(node, "alice") as alice:
        assert bob.subscribe(1, ("shared/#", 0)).reason_codes == [0]
        alice.publish("shared/x", b"not hers to write", 1, packet_id=7)
        ack = alice.wait_for(lambda p: isinstance(p, c.Puback))
        assert ack.packet_id == 7  # 3.1.1 has no negative ack
        alice.publish("shared/x", b"qos2 too", 2, packet_id=8)
        assert alice.wait_for(lambda p: isinstance(p, c.Pubrec)).packet_id == 8
        alice.send(c.Pubrel(8))
        assert alice.wait_for(lambda p: isinstance(p, c.Pubcomp)).packet_id == 8
        alice.publish("shared/in", b"sentinel", 0)
        before, got = bob.collect_until(lambda p: isinstance(p, c.Publish) and p.topic == "shared/in")
        live = [p for p in before if isinstance(p, c.Publish) and not p.retain]  # retained: other tests'
        assert live == [] and got.payload == b"sentinel"


def test_denied_publish_acked_0x87_for_5_0(node) -> None:
    with client(node, "bob") as bob, client(node, "alice", version=5) as alice:
        assert bob.subscribe(1, ("shared/#", 0)).reason_codes == [0]
        alice.publish("shared/x", b"no", 1, packet_id=1)
        assert alice.wait_for(lambda p: isinstance(p, c.Puback)).reason_code == 0x87
        alice.publish("shared/x", b"no", 2, packet_id=2)
        assert alice.wait_for(lambda p: isinstance(p, c.Pubrec)).reason_code == 0x87
        alice.publish("shared/x", b"no qos0", 0)  # dropped, the connection stays
        alice.publish("shared/in", b"ok", 1, packet_id=3)
        assert alice.wait_for(lambda p: isinstance(p, c.Puback) and p.packet_id == 3).reason_code == 0
        before, _ = bob.collect_until(lambda p: isinstance(p, c.Publish) and p.topic == "shared/in")
        assert [p for p in before if isinstance(p, c.Publish) and not p.retain] == []


def test_deliveries_follow_the_subscribers_read_rules(node) -> None:
    with client(node, "alice") as alice, client(node, "bob") as bob:
        assert alice.subscribe(1, ("shared/#", 0)).reason_codes == [0]
        bob.publish("shared/secret", b"for bob only", 0)
        bob.publish("shared/open", b"for all", 0)
        bob.publish("shared/end", b"sentinel", 0)
        before, _ = alice.collect_until(lambda p: isinstance(p, c.Publish) and p.topic == "shared/end")
        assert [(p.topic, p.payload) for p in before if isinstance(p, c.Publish)] == [
            ("shared/open", b"for all")
        ]


def test_retained_messages_filtered_by_read_rules(node) -> None:
    secret, public = "shared/secret", unique("shared/r")
    with client(node, "bob") as bob:
        bob.publish(secret, b"retained secret", 1, retain=True, packet_id=1)
        bob.publish(public, b"retained public", 1, retain=True, packet_id=2)
        bob.wait_for(lambda p: isinstance(p, c.Puback) and p.packet_id == 2)
    with client(node, "alice") as alice:
        assert alice.subscribe(1, ("shared/#", 1)).reason_codes == [1]
        with client(node, "bob") as bob:
            bob.publish("shared/zz-end", b"sentinel", 0)
            before, _ = alice.collect_until(lambda p: isinstance(p, c.Publish) and p.topic == "shared/zz-end")
        got = [(p.topic, p.retain) for p in before if isinstance(p, c.Publish)]
        assert (public, True) in got
        assert all(topic != secret for topic, _ in got)
        assert alice.subscribe(3, (secret, 0)).reason_codes == [0x80]


def test_patterns_substitute_client_id_and_user(node) -> None:
    cid = unique("dev")
    with client(node, client_id=cid) as dev, client(node, "alice") as alice, client(node, "bob") as bob:
        assert dev.subscribe(1, (f"clients/{cid}/#", 0), ("clients/other/#", 0)).reason_codes == [0, 0x80]
        assert alice.subscribe(1, ("inbox/alice/#", 0), ("inbox/bob/#", 0)).reason_codes == [0, 0x80]
        dev.publish(f"clients/{cid}/t", b"own", 0)
        assert dev.wait_for(lambda p: isinstance(p, c.Publish)).payload == b"own"
        assert bob.subscribe(1, ("inbox/#", 0)).reason_codes == [0x80]


def test_default_deny_for_an_authenticated_user_without_rules(node) -> None:
    with client(node, "carol") as carol:
        assert carol.subscribe(1, ("test/#", 0), ("#", 0), ("inbox/carol/x", 0)).reason_codes == [
            0x80,
            0x80,
            0,
        ]
        with client(node) as anon:
            assert anon.subscribe(1, ("test/#", 0)).reason_codes == [0]
            carol.publish("test/from-carol", b"x", 0)
            assert sentinel_check(anon, anon, "test/sentinel2") == []


def test_will_on_a_denied_topic_refuses_the_connect(node) -> None:
    with RawClient.to(node, 4) as raw:
        ack = raw.connect(
            unique("w"), username="alice", password=b"alice-pw", will=c.Will("shared/x", b"bye")
        )
        assert ack.reason_code == 5
    with RawClient.to(node, 5) as raw:
        ack = raw.connect(
            unique("w"), username="alice", password=b"alice-pw", will=c.Will("shared/x", b"bye")
        )
        assert ack.reason_code == 0x87
    with RawClient.to(node, 4) as raw:
        assert (
            raw.connect(
                unique("w"), username="alice", password=b"alice-pw", will=c.Will("shared/in", b"bye")
            ).reason_code
            == 0
        )


def test_sys_topics_readable_as_the_file_says(node) -> None:
    with client(node) as anon, client(node, "bob") as bob:
        assert anon.subscribe(1, ("$SYS/#", 0)).reason_codes == [0]
        assert bob.subscribe(1, ("$SYS/#", 0)).reason_codes == [0x80]


def test_reload_applies_new_rules_to_live_subscriptions(node, files) -> None:
    acl = files[1]
    topic = unique("reload/t")
    with client(node, "alice") as alice, client(node, "alice") as pub:
        assert alice.subscribe(1, ("reload/#", 0)).reason_codes == [0]
        pub.publish(topic, b"before", 0)
        assert alice.wait_for(lambda p: isinstance(p, c.Publish)).payload == b"before"
        acl.write_text(
            ACL.replace("topic readwrite reload/#", f"topic readwrite reload/#\ntopic deny {topic}")
        )
        try:
            node.process.send_signal(signal.SIGHUP)
            assert wait_until(lambda: node.log_text().count("auth_files_reloaded") >= 1)
            pub.publish(topic, b"after", 0)
            pub.publish("reload/end", b"sentinel", 0)
            before, _ = alice.collect_until(lambda p: isinstance(p, c.Publish) and p.topic == "reload/end")
            assert [p for p in before if isinstance(p, c.Publish)] == []
        finally:
            acl.write_text(ACL)
            node.process.send_signal(signal.SIGHUP)


def test_bad_acl_file_stops_the_node_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "acl"
    bad.write_text("user alice\ntopic read a/#\ntopic sometimes b\n")
    factory = NodeFactory(tmp_path / "n")
    try:
        node = factory({"auth.acl_file": str(bad), "storage.type": "memory"}, wait_ready=False)
        assert node.wait(30) not in (None, 0)
        lines = [line for line in node.log_text().splitlines() if "auth.acl_file" in line]
        assert len(lines) == 1, node.log_tail()
        assert f"{bad}:3" in lines[0] and "sometimes" in lines[0]
    finally:
        factory.close()


# -- the HTTP bridge applies the same checks ----------------------------------------------------------


def bridge(
    node: RunningNode,
    method: str,
    path: str,
    user: str | None = None,
    password: str | None = None,
    body: bytes | None = None,
) -> tuple[int, dict, bytes]:
    headers = {}
    if user is not None:
        token = base64.b64encode(f"{user}:{password or user + '-pw'}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    conn = http.client.HTTPConnection(node.host, node.http_port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_bridge_publish_uses_the_password_file_and_acl(node) -> None:
    assert bridge(node, "POST", "/topics/test/http", body=b"anon")[0] == 200  # anonymous: test/#
    assert bridge(node, "POST", "/topics/shared/x", body=b"anon")[0] == 403
    assert bridge(node, "POST", "/topics/shared/x", "bob", body=b"bob")[0] == 200
    assert bridge(node, "POST", "/topics/shared/x", "alice", body=b"alice")[0] == 403
    assert bridge(node, "POST", "/topics/shared/in", "alice", body=b"alice")[0] == 200
    status, headers, body = bridge(node, "POST", "/topics/shared/x", "bob", "wrong", body=b"x")
    assert status == 401 and headers["www-authenticate"].startswith("Basic")
    doc = json.dumps({"topic": "shared/x", "payload": "json"}).encode()
    assert bridge(node, "POST", "/publish", "alice", body=doc)[0] == 403
    assert bridge(node, "POST", "/publish", "bob", body=doc)[0] == 200


def test_bridge_denied_publish_never_reaches_subscribers(node) -> None:
    with client(node, "bob") as bob:
        assert bob.subscribe(1, ("shared/#", 0)).reason_codes == [0]
        assert bridge(node, "POST", "/topics/shared/denied", "alice", body=b"no")[0] == 403
        assert bridge(node, "POST", "/topics/shared/in", "alice", body=b"sentinel")[0] == 200
        before, got = bob.collect_until(lambda p: isinstance(p, c.Publish) and p.topic == "shared/in")
        live = [p for p in before if isinstance(p, c.Publish) and not p.retain]  # retained: other tests'
        assert live == [] and got.payload == b"sentinel"


def test_bridge_retained_read_follows_read_rules(node) -> None:
    assert bridge(node, "POST", "/topics/shared/secret?retain=true", "bob", body=b"classified")[0] == 200
    assert bridge(node, "GET", "/retained/shared/secret", "bob")[0] == 200
    assert bridge(node, "GET", "/retained/shared/secret", "alice")[0] == 403
    assert bridge(node, "GET", "/retained/shared/secret")[0] == 403


def test_bridge_stream_filtered_by_read_rules(node) -> None:
    conn = http.client.HTTPConnection(node.host, node.http_port, timeout=10)
    token = base64.b64encode(b"alice:alice-pw").decode()
    try:
        conn.request("GET", "/subscribe?filter=%23", headers={"Authorization": f"Basic {token}"})
        assert conn.getresponse().status == 403  # "#" is not readable for her
        conn.close()
        conn = http.client.HTTPConnection(node.host, node.http_port, timeout=10)
        conn.request("GET", "/subscribe?filter=shared/%23", headers={"Authorization": f"Basic {token}"})
        resp = conn.getresponse()
        assert resp.status == 200
        with client(node, "bob") as bob:
            bob.publish("shared/secret", b"hidden", 0)
            bob.publish("shared/open", b"visible", 0)
            topics = []
            while "shared/open" not in topics:
                line = resp.readline().decode()
                assert line, "stream ended"
                if line.startswith("data: "):
                    topics.append(json.loads(line[6:])["topic"])
        assert "shared/secret" not in topics
    finally:
        conn.close()


def test_session_of_another_user_is_not_resumed(node) -> None:
    """A password file binds client ids to user names by default: alice cannot resume bob's session
    (tests/e2e/test_client_id_binding.py has the unbound case, where her read rules apply to it)."""
    cid = unique("resumed")
    with RawClient.to(node, 4) as raw:
        assert raw.connect(cid, clean=False, username="bob", password=b"bob-pw").reason_code == 0
        assert raw.subscribe(1, ("shared/#", 0)).reason_codes == [0]
        raw.disconnect()
    with RawClient.to(node, 4) as raw:
        ack = raw.connect(cid, clean=False, username="alice", password=b"alice-pw")
        assert ack.reason_code == 5 and not ack.session_present
    with RawClient.to(node, 4) as raw:  # end the session
        assert raw.connect(cid, clean=True, username="bob", password=b"bob-pw").reason_code == 0
        raw.disconnect()
