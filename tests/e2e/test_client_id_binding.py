"""Client id ownership across users on a real node with a password file and an ACL file
(``auth.bind_client_id_to_username``).

alice may read ``box/#``; bob may read ``box/#`` except ``box/secret``. alice's persistent session
holds queued (and in-flight) messages on both topics, filtered by her read rules:

* bound (the default once a password file is set): bob connecting with alice's client id is
  refused (3.1.1 return code 5, 5.0 CONNACK 0x87 with a reason string), whether alice is online or
  not, and after a restart (the owner is stored with the session); alice's connection and queue
  are untouched;
* unbound (``false``): bob resumes the session but receives only what his read rules allow; the
  rest is dropped and counted (``fluxmq_messages_dropped_total{reason="not_authorized"}``), also
  after a restart with part of the old queue still stored.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fluxmq._core import codec as c
from fluxmq.auth.password_file import hash_password
from tests.conftest import NodeFactory, RunningNode
from tests.e2e.mqttraw import WAIT, RawClient, unique

pytestmark = pytest.mark.e2e

ACL = """\
topic readwrite anon/#

user alice
topic readwrite box/#

user bob
topic readwrite box/#
topic deny box/secret
"""

SESSION_EXPIRY = {c.SESSION_EXPIRY_INTERVAL: 3600}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("binding")
    pw = d / "passwd"
    pw.write_text("".join(f"{u}:{hash_password(u + '-pw')}\n" for u in ("alice", "bob")))
    acl = d / "acl"
    acl.write_text(ACL)
    return pw, acl


def auth_overrides(files: tuple[Path, Path], **extra: object) -> dict:
    return {
        "auth.password_file": str(files[0]),
        "auth.acl_file": str(files[1]),
        "auth.allow_anonymous": True,
        **extra,
    }


@pytest.fixture(scope="module")
def bound(tmp_path_factory: pytest.TempPathFactory, files) -> Iterator[RunningNode]:
    """auth.bind_client_id_to_username left at its default (auto: on, a password file is set)."""
    factory = NodeFactory(tmp_path_factory.mktemp("bound"))
    try:
        yield factory(auth_overrides(files, **{"storage.type": "memory"}))
    finally:
        factory.close()


@pytest.fixture(scope="module")
def unbound(tmp_path_factory: pytest.TempPathFactory, files) -> Iterator[RunningNode]:
    factory = NodeFactory(tmp_path_factory.mktemp("unbound"))
    try:
        yield factory(
            auth_overrides(files, **{"storage.type": "memory", "auth.bind_client_id_to_username": False})
        )
    finally:
        factory.close()


def connect(
    node: RunningNode,
    cid: str,
    user: str | None,
    version: int = 4,
    clean: bool = False,
    properties: dict | None = None,
) -> tuple[RawClient, object]:
    raw = RawClient.to(node, version)
    if version == 5 and properties is None:
        properties = SESSION_EXPIRY
    password = (user + "-pw").encode() if user else None
    return raw, raw.connect(cid, clean=clean, username=user, password=password, properties=properties)


def publish_all(node: RunningNode, *topics: str) -> None:
    """alice publishes one QoS 1 message per topic (payload = topic), each acknowledged."""
    pub, ack = connect(node, unique("pub"), "alice", clean=True)
    with pub:
        assert ack.reason_code == 0
        for pid, topic in enumerate(topics, 1):
            pub.publish_qos1(topic, topic.encode(), pid)
        pub.disconnect()


def alice_with_queue(node: RunningNode, version: int = 4) -> str:
    """A persistent session of alice subscribed to box/# with box/secret and box/open queued."""
    cid = unique("owned")
    raw, ack = connect(node, cid, "alice", version)  # a new client id: a new session
    with raw:
        assert ack.reason_code == 0 and not ack.session_present
        assert raw.subscribe(1, ("box/#", 1)).reason_codes == [1]
        raw.disconnect()
    publish_all(node, "box/secret", "box/open")
    return cid


def drain(raw: RawClient, sentinel: str) -> list[str]:
    """Topics delivered (each acknowledged) until the sentinel message, which alice publishes."""
    topics: list[str] = []
    while True:
        p = raw.wait_for(lambda p: isinstance(p, c.Publish))
        raw.ack(p)
        if p.topic == sentinel:
            return topics
        topics.append(p.topic)


def dropped_not_authorized(node: RunningNode) -> float:
    with urllib.request.urlopen(f"http://{node.host}:{node.health_port}/metrics", timeout=WAIT) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("fluxmq_messages_dropped_total") and 'reason="not_authorized"' in line:
                return float(line.rpartition(" ")[2])
    return 0.0


# -- bound (default) ------------------------------------------------------------------------------


def test_another_user_resuming_is_refused_with_return_code_5_for_3_1_1(bound) -> None:
    cid = alice_with_queue(bound)
    bob, ack = connect(bound, cid, "bob")
    assert ack.reason_code == 5 and not ack.session_present  # not authorized
    bob.wait_closed()
    anon, ack = connect(bound, cid, None)  # an anonymous client is "another user" too
    assert ack.reason_code == 5
    anon.wait_closed()
    alice, ack = connect(bound, cid, "alice")  # the owner still finds her queue
    with alice:
        assert ack.reason_code == 0 and ack.session_present
        publish_all(bound, "box/end")
        assert drain(alice, "box/end") == ["box/secret", "box/open"]
        alice.disconnect()


def test_another_user_resuming_is_refused_with_0x87_and_a_reason_for_5_0(bound) -> None:
    cid = alice_with_queue(bound, version=5)
    bob, ack = connect(bound, cid, "bob", version=5)
    assert ack.reason_code == 0x87 and not ack.session_present
    assert "another user" in ack.properties[c.REASON_STRING]
    bob.wait_closed()
    alice, ack = connect(bound, cid, "alice", version=5)
    with alice:
        assert ack.reason_code == 0 and ack.session_present
        publish_all(bound, "box/end")
        assert drain(alice, "box/end") == ["box/secret", "box/open"]
        alice.disconnect()


def test_a_live_connection_is_not_taken_over_by_another_user(bound) -> None:
    """The takeover [MQTT-3.1.4-3] only happens for the same user: alice keeps her connection."""
    cid = unique("live")
    alice, ack = connect(bound, cid, "alice", clean=True)
    with alice:
        assert ack.reason_code == 0
        assert alice.subscribe(1, ("box/#", 0)).reason_codes == [0]
        for clean in (True, False):
            bob, ack = connect(bound, cid, "bob", clean=clean)
            assert ack.reason_code == 5
            bob.wait_closed()
        publish_all(bound, "box/still-here")
        assert alice.wait_for(lambda p: isinstance(p, c.Publish)).topic == "box/still-here"
        alice.disconnect()


def test_the_same_user_still_takes_over(bound) -> None:
    cid = unique("same")
    first, ack = connect(bound, cid, "alice", version=5)
    assert ack.reason_code == 0
    second, ack = connect(bound, cid, "alice", version=5)
    with second:
        assert ack.reason_code == 0 and ack.session_present
        assert first.wait_for(lambda p: isinstance(p, c.Disconnect)).reason_code == 0x8E
        second.disconnect()
    first.close()


# -- unbound --------------------------------------------------------------------------------------


def test_unbound_resume_by_another_user_delivers_only_what_that_user_may_read(unbound) -> None:
    """Queued and in-flight messages of alice's session are re-checked against bob's read rules."""
    cid = unique("shared-id")
    alice, ack = connect(unbound, cid, "alice", version=5)
    assert ack.reason_code == 0
    assert alice.subscribe(1, ("box/#", 1)).reason_codes == [1]
    publish_all(unbound, "box/secret")  # delivered to alice, never acknowledged: in flight
    assert alice.wait_for(lambda p: isinstance(p, c.Publish)).topic == "box/secret"
    alice.drop()
    publish_all(unbound, "box/secret", "box/open")  # queued while offline
    before = dropped_not_authorized(unbound)
    bob, ack = connect(unbound, cid, "bob", version=5)
    with bob:
        assert ack.reason_code == 0 and ack.session_present
        publish_all(unbound, "box/end")
        assert drain(bob, "box/end") == ["box/open"]
        publish_all(unbound, "box/secret", "box/end")  # new messages follow bob's rules too
        assert drain(bob, "box/end") == []
        bob.disconnect()
    assert dropped_not_authorized(unbound) - before == 2  # the in-flight and the queued secret


def test_unbound_resume_after_a_restart_still_rechecks_what_the_old_owner_queued(
    node_factory: NodeFactory, files
) -> None:
    """bob resumes alice's stored session with Receive Maximum 1, takes one message, and the node
    restarts: what is left of alice's queue is still checked against bob's read rules."""
    overrides = auth_overrides(files, **{"storage.type": "lmdb", "auth.bind_client_id_to_username": False})
    node = node_factory(overrides)
    cid = unique("restart")
    alice, ack = connect(node, cid, "alice", version=5)
    assert alice.subscribe(1, ("box/#", 1)).reason_codes == [1]
    alice.disconnect()
    publish_all(node, "box/open1", "box/secret", "box/open2", "box/secret")
    one_at_a_time = {**SESSION_EXPIRY, c.RECEIVE_MAXIMUM: 1}
    bob, ack = connect(node, cid, "bob", version=5, properties=one_at_a_time)
    assert ack.reason_code == 0 and ack.session_present
    assert bob.wait_for(lambda p: isinstance(p, c.Publish)).topic == "box/open1"  # not acknowledged
    bob.drop()
    assert node.stop() == 0
    node = node_factory(overrides | {"storage.path": str(node.data_dir)})
    bob, ack = connect(node, cid, "bob", version=5, properties=one_at_a_time)
    with bob:
        assert ack.reason_code == 0 and ack.session_present
        publish_all(node, "box/end")
        assert drain(bob, "box/end") == ["box/open1", "box/open2"]
        bob.disconnect()


def test_the_owner_is_remembered_across_a_restart(node_factory: NodeFactory, files) -> None:
    """The session record stores its user name (storage/records.py, encode_session): after a restart
    the stored session still belongs to alice."""
    overrides = auth_overrides(files, **{"storage.type": "lmdb"})
    node = node_factory(overrides)
    cid = alice_with_queue(node, version=5)
    assert node.stop() == 0
    node = node_factory(overrides | {"storage.path": str(node.data_dir)})
    bob, ack = connect(node, cid, "bob", version=5)
    assert ack.reason_code == 0x87
    bob.wait_closed()
    alice, ack = connect(node, cid, "alice", version=5)
    with alice:
        assert ack.reason_code == 0 and ack.session_present
        publish_all(node, "box/end")
        assert drain(alice, "box/end") == ["box/secret", "box/open"]
        alice.disconnect()
