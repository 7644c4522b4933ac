"""CONNECT refused at the will check leaves no compiled ACL behind (issue 17 item 9).

An in-process broker with an ACL file and a plain TCP listener (tests/transport/harness.py); each
refused CONNECT uses a new client id, as a client cycling random ids would.
"""

from __future__ import annotations

from pathlib import Path

from fluxmq._core import codec as c
from fluxmq.auth.service import AuthService, AuthSettings
from tests.transport.harness import InProcessListener, MQTTPeer, SocketTransport, tcp_connect

REFUSALS = 50


def test_connects_refused_for_their_will_topic_leave_no_compiled_acl(tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite open/#\n")
    with InProcessListener() as server:
        auth = AuthService(AuthSettings(acl_file=str(acl), allow_anonymous=True))
        server.broker.set_auth(auth)
        for i in range(REFUSALS):
            peer = MQTTPeer(SocketTransport(tcp_connect(server.port)))
            peer.send(
                c.Connect(
                    client_id=f"will-{i}", keepalive=60, protocol_version=4, will=c.Will("closed/x", b"bye")
                )
            )
            connack = peer.expect(c.Connack)
            assert connack.reason_code == 5  # 3.1.1 "not authorized" [MQTT-3.2.2-6 table]
            assert peer.wait_closed()
        assert len(auth._acls) == 0, f"{len(auth._acls)} compiled ACLs kept after {REFUSALS} refusals"
        # an accepted client keeps its compiled ACL while its session lives
        peer = MQTTPeer(SocketTransport(tcp_connect(server.port)))
        peer.send(
            c.Connect(client_id="kept", keepalive=60, protocol_version=4, will=c.Will("open/x", b"bye"))
        )
        assert peer.expect(c.Connack).reason_code == 0
        assert set(auth._acls) == {"kept"}


def test_a_listener_that_refuses_anonymous_answers_not_authorized() -> None:
    """``ProtocolSettings.refuse_anonymous`` (a network listener with nothing to check user names, issue
    17 item 11): CONNECT without a user name gets 3.1.1 return code 5 / 5.0 reason code 0x87 with a
    reason string naming auth.allow_anonymous; a user name nothing can verify is refused the same way."""
    with InProcessListener(refuse_anonymous=True) as server:
        for version, username, code in (
            (4, None, 5),
            (5, None, 0x87),
            (4, "mallory", 5),
            (5, "mallory", 0x87),
        ):
            peer = MQTTPeer(SocketTransport(tcp_connect(server.port)), version=version)
            peer.send(
                c.Connect(
                    client_id=f"anon-{version}-{username}",
                    keepalive=60,
                    protocol_version=version,
                    username=username,
                    password=b"x" if username else None,
                )
            )
            connack = peer.expect(c.Connack)
            assert connack.reason_code == code
            if version == 5:
                assert "auth.allow_anonymous" in connack.properties[c.REASON_STRING]
            assert peer.wait_closed()
        assert server.broker.session_count() == 0
