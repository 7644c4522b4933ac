"""Durable queues across a restart of the node (issue 10): a persistent session stays a member of
its consumer groups, with its options, without subscribing again; the delivery count goes on and
``retry.max_retries`` counts the deliveries made before the restart. Real node processes stopped by
kill -9 and SIGTERM, paho-mqtt 5.0 clients."""

from __future__ import annotations

import queue as stdqueue
import signal
import time

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.subscribeoptions import SubscribeOptions

from tests.e2e.mqtt5raw import Paho5, paho5, props, unique
from tests.e2e.test_http_bridge import http_request

pytestmark = pytest.mark.e2e

WAIT = 10.0
TOKEN = "queues-restart-token"
CONFIG = """
queues:
  - name: jobs
  - name: events
    type: stream
    auto_commit_interval: 1h
  - name: poison
    visibility_timeout: 1h
    retry: {max_retries: 3, initial_backoff: 10ms, max_backoff: 10ms}
"""


def start(node_factory, data_dir=None):
    overrides = {"storage.path": str(data_dir)} if data_dir is not None else None
    return node_factory(overrides, config_text=CONFIG, env={"FLUXMQ_ADMIN_TOKEN": TOKEN})


def persistent(node, cid: str) -> Paho5:
    c5 = Paho5(node, cid, clean_start=False)
    rc, _, _ = c5.connect(props(PacketTypes.CONNECT, SessionExpiryInterval=3600))
    assert not rc.is_failure, rc
    return c5


def join(c5: Paho5, filter: str, **user: str) -> None:
    p = props(PacketTypes.SUBSCRIBE)
    p.UserProperty = [(k.replace("_", "-"), v) for k, v in user.items()]
    assert [int(rc.value) for rc in c5.subscribe(filter, options=SubscribeOptions(qos=1), properties=p)] == [
        1
    ]


def publish(node, topic: str, *payloads: bytes) -> None:
    with paho5(node, unique("rp")) as pub:
        for payload in payloads:
            pub.publish(topic, payload, 1)


def group_state(node, queue: str, group: str) -> dict:
    status, _, body = http_request(
        node, "GET", f"/queues/{queue}", headers={"Authorization": f"Bearer {TOKEN}"}, port=node.admin_port
    )
    assert status == 200, body
    return body["groups"].get(group, {})


def wait_group(node, queue: str, group: str, **want: int) -> dict:
    """Until the group's admin view shows ``want`` (its PUBACKs or acks were processed); bounded."""
    deadline = time.monotonic() + WAIT
    while True:
        state = group_state(node, queue, group)
        if all(state.get(k) == v for k, v in want.items()) or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def user_props(msg) -> dict[str, str]:
    return dict(msg.properties.UserProperty)


def nothing_more(c5: Paho5, wait: float = 1.0):
    try:
        return c5.messages.get(timeout=wait)
    except stdqueue.Empty:
        return None


def stop(node, how: str) -> None:
    if how == "kill -9":
        node.kill()
    else:
        assert node.stop(signal.SIGTERM) == 0


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_a_persistent_member_stays_in_its_groups_across_a_restart(node_factory, how: str) -> None:
    node = start(node_factory)
    cid = unique("member")
    c5 = persistent(node, cid)
    join(c5, "$queue/jobs/eu/#", consumer_group="workers", auto_ack="true")
    join(c5, "$queue/events", consumer_group="readers", stream_offset="first", auto_ack="true")
    publish(node, "$queue/events", b"e0", b"e1")
    assert sorted(m.payload for m in (c5.get(), c5.get())) == [b"e0", b"e1"]
    # The auto-ack PUBACKs moved the stream's cursor past e1; a PUBACK that leaves after that
    # means it is committed (a PUBACK leaves after the commit of everything recorded before it).
    assert wait_group(node, "events", "readers", lag=0)["lag"] == 0
    publish(node, "sync/after-the-acks", b"")
    stop(node, how)  # the member is still connected
    c5.stop()

    node = start(node_factory, node.data_dir)
    # Appended while the member is away: one its filter takes, one it does not.
    publish(node, "$queue/jobs/us/1", b"not mine")
    publish(node, "$queue/jobs/eu/1", b"mine")
    publish(node, "$queue/events", b"e2")
    again = persistent(node, cid)  # no SUBSCRIBE
    try:
        assert again.connack[1] is True
        got = {m.payload: user_props(m) for m in (again.get(), again.get())}
        assert set(got) == {b"mine", b"e2"}  # the filter holds, and the stream resumes after e1
        assert got[b"mine"]["group-id"] == "workers" and got[b"e2"]["group-id"] == "readers"
        assert nothing_more(again) is None
        # auto-ack came back too: the PUBACK settled "mine"; "not mine" waits for another member.
        assert wait_group(node, "jobs", "workers", lag=1, pending=0) == {
            "lag": 1,
            "pending": 0,
            "members": 1,
            "undeliverable": 0,
        }
    finally:
        again.disconnect()


def test_an_unsubscribed_or_ended_session_is_no_member_after_a_restart(node_factory) -> None:
    node = start(node_factory)
    left, ended = unique("left"), unique("ended")
    c5 = persistent(node, left)
    join(c5, "$queue/jobs", consumer_group="g1")
    c5.client.unsubscribe("$queue/jobs")
    e5 = persistent(node, ended)
    join(e5, "$queue/jobs", consumer_group="g2")
    e5.disconnect()
    gone = Paho5(node, ended, clean_start=True)  # Clean Start ends the stored session
    gone.connect(props(PacketTypes.CONNECT, SessionExpiryInterval=0))
    gone.disconnect()
    assert wait_group(node, "jobs", "g1", members=0)["members"] == 0
    c5.disconnect()
    node.kill()

    node = start(node_factory, node.data_dir)
    publish(node, "$queue/jobs", b"x")
    for cid in (left, ended):
        c = persistent(node, cid)
        try:
            assert nothing_more(c) is None, cid
        finally:
            c.disconnect()
    assert group_state(node, "jobs", "g1")["members"] == 0 and group_state(node, "jobs", "g2")["members"] == 0


def test_the_delivery_count_and_max_retries_go_on_across_restarts(node_factory) -> None:
    node = start(node_factory)
    publish(node, "$queue/poison/k", b"bad")
    data_dir = node.data_dir
    for expected in (1, 2):  # delivered, never settled, then the node is killed
        c5 = paho5(node, unique("pc"))
        join(c5, "$queue/poison/#", consumer_group="w")
        msg = c5.get()
        assert (msg.payload, user_props(msg)["delivery-count"]) == (b"bad", str(expected))
        node.kill()
        c5.stop()
        node = start(node_factory, data_dir)
    c5 = paho5(node, unique("pc"))
    dlq = paho5(node, unique("dlq"))
    try:
        join(c5, "$queue/poison/#", consumer_group="w")
        join(dlq, "$queue/poison.dlq/#", consumer_group="d")
        msg = c5.get()
        assert user_props(msg)["delivery-count"] == "3"
        p = props(PacketTypes.PUBLISH)
        p.UserProperty = [("message-id", user_props(msg)["message-id"]), ("group-id", "w")]
        c5.publish("$queue/poison/$nack", b"", 1, properties=p)
        dead = dlq.get()  # the third delivery was the last: max_retries counts across restarts
        assert dead.payload == b"bad"
        assert (
            user_props(dead)["x-delivery-count"] == "3"
            and user_props(dead)["x-death-reason"] == "max-retries"
        )
        assert nothing_more(c5, 0.5) is None
    finally:
        c5.disconnect()
        dlq.disconnect()
