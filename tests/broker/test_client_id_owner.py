"""Broker.open_session and client id ownership (auth.bind_client_id_to_username) with a real
AuthService over real password and ACL files: a refused takeover changes nothing; a session
resumed by another user keeps only what that user may read (in flight now, queued as it drains)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxmq.auth.password_file import hash_password
from fluxmq.auth.service import AuthService, AuthSettings
from fluxmq.broker.broker import Broker
from fluxmq.broker.message import Message
from fluxmq.errors import NotAuthorized
from tests.broker.test_session import RecordingDelivery

ACL = "topic readwrite box/#\nuser alice\ntopic readwrite box/#\nuser bob\ntopic readwrite box/#\ntopic deny box/secret\n"


def broker_with(tmp_path: Path, bind: bool | None) -> Broker:
    pw = tmp_path / "passwd"
    pw.write_text(f"alice:{hash_password('a')}\nbob:{hash_password('b')}\n")
    acl = tmp_path / "acl"
    acl.write_text(ACL)
    broker = Broker()
    broker.set_auth(
        AuthService(
            AuthSettings(password_file=str(pw), acl_file=str(acl), allow_anonymous=True, bind_client_ids=bind)
        )
    )
    return broker


def queued_session(broker: Broker, owner: str | None):
    session, present = broker.open_session("shared-id", False, 3600, None, owner)
    assert not present
    broker.subscribe(session, "box/#", 1)
    for topic in ("box/secret", "box/open", "box/secret", "box/open2"):
        broker.publish(Message(topic, topic.encode(), 1))
    assert len(session.queue) == 4
    return session


def test_refused_takeover_changes_nothing(tmp_path: Path) -> None:
    broker = broker_with(tmp_path, None)
    session = queued_session(broker, "alice")
    live = RecordingDelivery()
    broker.attach(session, live, 0)
    for user in ("bob", None):
        for clean in (True, False):
            with pytest.raises(NotAuthorized) as refused:
                broker.open_session("shared-id", clean, 3600, None, user)
            assert refused.value.reason_code == 0x87
    assert session.delivery is live and live.closed_with is None
    assert broker.sessions["shared-id"] is session and session.username == "alice"
    assert [t for t, *_ in live.sent] == ["box/secret", "box/open", "box/secret", "box/open2"]


@pytest.mark.parametrize("bind,owner", [(False, "alice"), (None, None)])
def test_resume_by_another_user_drops_what_that_user_may_not_read(tmp_path: Path, bind, owner) -> None:
    """Unbound, or a session without an owner (claimable even when bound)."""
    broker = broker_with(tmp_path, bind)
    session = queued_session(broker, owner)
    first = RecordingDelivery()
    broker.attach(session, first, 1)  # window of one: box/secret goes in flight, the rest stays queued
    broker.close_session(session, first, False)
    resumed, present = broker.open_session("shared-id", False, 3600, None, "bob")
    assert present and resumed is session and session.username == "bob"
    assert session.inflight == {}  # the in-flight box/secret was dropped at once
    second = RecordingDelivery()
    broker.attach(session, second, 10)
    assert [t for t, *_ in second.sent] == ["box/open", "box/open2"]
    assert broker.stats.drops["not_authorized"] == 2
    assert session.reread is None  # the old part of the queue is gone: no more checks
