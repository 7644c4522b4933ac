"""The admin topic monitor (``GET /monitor``, ``fluxmq/http/monitor.py``) over a real Broker."""

from __future__ import annotations

import io
from types import SimpleNamespace
from wsgiref.util import setup_testing_defaults

import pytest

from fluxmq.broker.broker import Broker
from fluxmq.broker.message import Message
from fluxmq.http.admin import AdminAPI
from fluxmq.http.monitor import CLIENT_PREFIX, LISTENER, MAX_STREAMS, QUEUE_SIZE
from tests.http.test_bridge import Response, Stream, wsgi_call

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def broker() -> Broker:
    return Broker()


@pytest.fixture
def app(broker: Broker) -> AdminAPI:
    return AdminAPI(SimpleNamespace(broker=broker, listeners=[]), TOKEN)


class Events(Stream):
    """Reads the events of one monitor response, bounded in chunks read."""

    def __init__(self, response) -> None:
        super().__init__(response, CLIENT_PREFIX)

    take = Stream.events


def monitor(app, query: str, headers: dict | None = AUTH):
    return wsgi_call(app, "GET", "/monitor", query=query, headers=headers)


def test_published_messages_arrive_and_closing_ends_the_session(app, broker) -> None:
    events = Events(monitor(app, "filter=sensors/%2B/temp"))
    session = broker.sessions[events.client_id]
    assert session.delivery.listener == LISTENER and session.expiry_interval == 0
    broker.publish(Message("sensors/k1/temp", b"21.5", 1))
    broker.publish(Message("other", b"x", 0))
    broker.publish(Message("sensors/k2/temp", b"\xff\x00", 0))
    assert events.take(2) == [
        (
            "message",
            {
                "topic": "sensors/k1/temp",
                "payload": "21.5",
                "payload_encoding": "utf8",
                "qos": 1,
                "retain": False,
            },
        ),
        (
            "message",
            {
                "topic": "sensors/k2/temp",
                "payload": "/wA=",
                "payload_encoding": "base64",
                "qos": 0,
                "retain": False,
            },
        ),
    ]
    events.close()
    assert events.client_id not in broker.sessions and broker.connected == 0
    assert app.monitor.streams == set()


def test_retained_first_only_when_asked(app, broker) -> None:
    broker.publish(Message("a/1", b"kept", 0, retain=True))
    with_retained = Events(monitor(app, "filter=a/%23&retained=true"))
    assert with_retained.take(1) == [
        ("message", {"topic": "a/1", "payload": "kept", "payload_encoding": "utf8", "qos": 0, "retain": True})
    ]
    without = Events(monitor(app, "filter=a/%23"))
    broker.publish(Message("a/2", b"live", 0))
    assert without.take(1)[0][1]["topic"] == "a/2"
    with_retained.close()
    without.close()


def test_a_kicked_monitor_gets_a_close_event(app, broker) -> None:
    events = Events(monitor(app, "filter=%23"))
    broker.kick(events.client_id)
    assert events.take(1) == [("close", {"reason": "disconnected by the administrator"})]
    events.close()
    assert events.client_id not in broker.sessions


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("", 400),
        ("filter=a/%23/b", 400),
        ("filter=a&nope=1", 400),
        ("filter=a&retained=maybe", 400),
        ("&".join(["filter=a"] * 9), 400),
    ],
)
def test_bad_requests_are_400_and_leave_no_session(app, broker, query: str, status: int) -> None:
    resp = monitor(app, query)
    assert resp.status == status, b"".join(resp.body)
    assert broker.sessions == {} and app.monitor.streams == set()


def test_the_token_is_required(app, broker) -> None:
    assert monitor(app, "filter=a", headers=None).status == 401
    assert monitor(app, "filter=a", headers={"Authorization": "Bearer wrong"}).status == 401
    assert broker.sessions == {}


def test_streams_are_bounded(app, broker) -> None:
    open_streams = [Events(monitor(app, "filter=a")) for _ in range(MAX_STREAMS)]
    refused = monitor(app, "filter=a")
    assert refused.status == 429 and refused.headers["Retry-After"] == "5"
    open_streams.pop().close()
    again = Events(monitor(app, "filter=a"))
    for events in [*open_streams, again]:
        events.close()
    assert broker.sessions == {}


def test_a_slow_reader_loses_the_oldest_not_memory(app, broker) -> None:
    events = Events(monitor(app, "filter=t"))
    for n in range(QUEUE_SIZE + 50):
        broker.publish(Message("t", str(n).encode(), 0))
    stream = next(iter(app.monitor.streams))
    assert len(stream.queue) == QUEUE_SIZE and stream.dropped == 50
    assert events.take(1)[0][1]["payload"] == "50"
    events.close()


def test_a_client_that_goes_away_ends_its_stream_at_once(app, broker) -> None:
    """The browser's Stop closes the connection: the stream ends without waiting for a heartbeat,
    so its slot and session are free again (a real socket pair stands in for the connection)."""
    from gevent import socket as gsocket

    server_side, client_side = gsocket.socketpair()
    try:
        resp = wsgi_call_with_socket(app, "filter=a", server_side)
        events = Events(resp)
        client_side.close()
        assert events.take(1, max_reads=2) == [("close", {"reason": "the client closed the stream"})]
        events.close()
        assert broker.sessions == {} and app.monitor.streams == set()
    finally:
        server_side.close()


def wsgi_call_with_socket(app, query: str, sock) -> Response:
    """A monitor request whose environ carries the client connection, as gunicorn's does."""
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/monitor",
        "RAW_URI": f"/monitor?{query}",
        "QUERY_STRING": query,
        "wsgi.input": io.BytesIO(),
        "HTTP_AUTHORIZATION": AUTH["Authorization"],
        "gunicorn.socket": sock,
    }
    setup_testing_defaults(environ)
    seen: dict = {}

    def start_response(status: str, headers: list, exc_info=None) -> None:
        seen["status"], seen["headers"] = int(status.split()[0]), dict(headers)

    body = app(environ, start_response)
    return Response(seen["status"], seen["headers"], body)
