"""The CoAP bridge of a real node, driven by aiocoap (the real client) and raw UDP sockets.

RFC 7252 (CoAP), RFC 7641 (Observe), RFC 7959 (block-wise) and RFC 6690 (/.well-known/core);
MQTT subscribers are paho. Every wait is bounded; nothing is timed.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import aiocoap
import paho.mqtt.client as mqtt
import pytest

from fluxmq.auth.password_file import hash_password
from fluxmq.coap import codec
from fluxmq.coap.codec import CoapMessage
from tests.conftest import NodeFactory, RunningNode, free_port
from tests.e2e.coapclient import CoapTestClient
from tests.e2e.mqttraw import paho_connected, unique, wait_until

pytestmark = pytest.mark.e2e

WAIT = 10.0


def coap_port(node: RunningNode) -> int:
    return int(node.config["server"]["coap"]["plain"]["addr"].rpartition(":")[2])


def coap_uri(node: RunningNode, path: str) -> str:
    return f"coap://127.0.0.1:{coap_port(node)}/{path}"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    factory = NodeFactory(tmp_path_factory.mktemp("node"))
    try:
        yield factory({"server.coap.plain.addr": f"127.0.0.1:{free_port()}"})
    finally:
        factory.close()


@pytest.fixture(scope="module")
def client() -> Iterator[CoapTestClient]:
    with CoapTestClient() as c:
        yield c


class RawCoap:
    """A UDP socket speaking CoAP through the codec under test."""

    def __init__(self, node: RunningNode) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(WAIT)
        self.addr = ("127.0.0.1", coap_port(node))

    def send(self, msg: CoapMessage | bytes) -> None:
        self.sock.sendto(msg if isinstance(msg, bytes) else codec.serialize(msg), self.addr)

    def recv(self) -> tuple[CoapMessage, bytes]:
        data = self.sock.recv(65535)
        return codec.parse(data), data

    def close(self) -> None:
        self.sock.close()


def request(
    mtype: int,
    method: int,
    mid: int,
    path: str,
    query: tuple[str, ...] = (),
    payload: bytes = b"",
    token: bytes = b"tk",
    extra: tuple[tuple[int, bytes], ...] = (),
) -> CoapMessage:
    options = [(codec.URI_PATH, p.encode()) for p in path.split("/")]
    options += [(codec.URI_QUERY, q.encode()) for q in query]
    return CoapMessage(mtype, method, mid, token, options + list(extra), payload)


# -- publish ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_post_publish_reaches_an_mqtt_subscriber_at_each_qos(
    node: RunningNode, client: CoapTestClient, qos: int
) -> None:
    topic = f"coap/{unique('pub')}/temp"
    with paho_connected(node, unique("sub")) as sub:
        sub.subscribe(topic, 2)
        resp = client.request("POST", coap_uri(node, f"mqtt/publish/{topic}?qos={qos}"), b"21.5")
        assert resp.code == aiocoap.CHANGED
        msg = sub.get(WAIT)
        assert (msg.topic, msg.payload, msg.qos) == (topic, b"21.5", qos)


def test_put_on_a_topic_path_retains_and_get_reads_it(node: RunningNode, client: CoapTestClient) -> None:
    topic = f"coap/{unique('ret')}/state"
    resp = client.request(
        "PUT", coap_uri(node, f"{topic}?qos=1&retain=true"), b'{"on":true}', content_format=50
    )
    assert resp.code == aiocoap.CHANGED
    got = client.request("GET", coap_uri(node, topic))
    assert got.code == aiocoap.CONTENT and got.payload == b'{"on":true}'
    assert got.opt.content_format == 50  # the 5.0 Content Type back as the Content-Format
    with paho_connected(node, unique("late"), protocol=mqtt.MQTTv5) as sub:
        sub.subscribe(topic, 1)
        msg = sub.get(WAIT)
        assert (msg.payload, msg.retain) == (b'{"on":true}', True)
        assert msg.properties.ContentType == "application/json"
    assert client.request("GET", coap_uri(node, f"coap/{unique('none')}")).code == aiocoap.NOT_FOUND


def test_bad_topic_and_bad_query_are_4_00(node: RunningNode, client: CoapTestClient) -> None:
    assert client.request("POST", coap_uri(node, "a/+/b"), b"x").code == aiocoap.BAD_REQUEST
    assert client.request("POST", coap_uri(node, "a/b?qos=3"), b"x").code == aiocoap.BAD_REQUEST
    assert client.request("POST", coap_uri(node, "a/b?colour=red"), b"x").code == aiocoap.BAD_REQUEST
    assert client.request("POST", coap_uri(node, "$SYS/x"), b"x").code == aiocoap.FORBIDDEN
    assert client.request("DELETE", coap_uri(node, "a/b")).code == aiocoap.METHOD_NOT_ALLOWED


def test_well_known_core_and_health(node: RunningNode, client: CoapTestClient) -> None:
    """RFC 6690 §4: GET /.well-known/core answers application/link-format (40)."""
    core = client.request("GET", coap_uri(node, ".well-known/core"))
    assert core.code == aiocoap.CONTENT and core.opt.content_format == 40
    links = (
        aiocoap.util.linkformat.parse(core.payload.decode()) if hasattr(aiocoap.util, "linkformat") else None
    )
    text = core.payload.decode()
    assert "</mqtt/publish>" in text and "obs" in text
    if links is not None:
        assert any(link.href == "/mqtt/publish" for link in links.links)
    health = client.request("GET", coap_uri(node, "health"))
    assert (health.code, health.payload) == (aiocoap.CONTENT, b"healthy")


# -- observe ---------------------------------------------------------------------------------------


def test_observe_gets_100_publishes_in_order_and_stops_after_cancel(
    node: RunningNode, client: CoapTestClient
) -> None:
    """RFC 7641 §3.2/§4.4: notifications in order with increasing Observe numbers; the client's
    cancel ends the observation on the server (its session is removed)."""
    topic = f"coap/{unique('obs')}/level"
    observer = client.observe(coap_uri(node, topic))
    assert observer.first.code == aiocoap.CONTENT and observer.first.opt.observe is not None
    opened = node.metric("fluxmq_coap_observations") or 0.0
    assert opened >= 1
    with paho_connected(node, unique("pub")) as pub:
        for i in range(100):
            pub.publish(topic, str(i).encode(), 0)
        seen, numbers = [], []
        while len(seen) < 100:
            note = observer.get(WAIT)
            assert note is not None
            seen.append(note.payload)
            numbers.append(note.opt.observe)
        assert seen == [str(i).encode() for i in range(100)]
        assert numbers == sorted(numbers) and len(set(numbers)) == 100
        observer.cancel()
        # aiocoap cancels lazily: the next notification is answered with RST (RFC 7641 §3.6)
        assert wait_until(
            lambda: (
                (pub.publish(topic, b"after", 0) or True)
                and (node.metric("fluxmq_coap_observations") or 0.0) < opened
            ),
            WAIT,
        )


def test_observe_a_filter_with_plus_and_hash(node: RunningNode, client: CoapTestClient) -> None:
    base = f"coap/{unique('flt')}"
    plus = client.observe(coap_uri(node, f"{base}/+/t"))
    hash_ = client.observe(coap_uri(node, f"{base}/%23"))
    with paho_connected(node, unique("pub")) as pub:
        pub.publish(f"{base}/room1/t", b"a", 0)
        pub.publish(f"{base}/room1/x/y", b"b", 0)
    note = plus.get(WAIT)
    assert note.payload == b"a" and note.opt.get_option(codec.TOPIC)[0].value == f"{base}/room1/t".encode()
    assert [hash_.get(WAIT).payload, hash_.get(WAIT).payload] == [b"a", b"b"]
    plus.cancel()
    hash_.cancel()


# -- block-wise --------------------------------------------------------------------------------------


def test_block1_publish_of_64_kib_and_block2_read(node: RunningNode, client: CoapTestClient) -> None:
    """RFC 7959: aiocoap sends the 64 KiB body in Block1 blocks and reads it back in Block2 blocks."""
    topic = f"coap/{unique('big')}"
    body = os.urandom(64 * 1024)
    with paho_connected(node, unique("sub")) as sub:
        sub.subscribe(topic, 1)
        resp = client.request("POST", coap_uri(node, f"{topic}?qos=1&retain=true"), body, timeout=60)
        assert resp.code == aiocoap.CHANGED
        assert sub.get(WAIT).payload == body
    got = client.request("GET", coap_uri(node, topic), timeout=60)
    assert got.code == aiocoap.CONTENT and got.payload == body


def test_block1_over_the_message_size_is_4_13(node_factory: NodeFactory) -> None:
    node = node_factory(
        {
            "server.coap.plain.addr": f"127.0.0.1:{free_port()}",
            "broker.max_message_size": 4096,
            "storage.type": "memory",
        }
    )
    with CoapTestClient() as c:
        resp = c.request("POST", coap_uri(node, "big/x"), b"x" * 10000, timeout=30)
        assert resp.code == aiocoap.REQUEST_ENTITY_TOO_LARGE


# -- raw datagrams ---------------------------------------------------------------------------------


def test_con_retransmission_with_the_same_message_id_publishes_once(node: RunningNode) -> None:
    """RFC 7252 §4.5: a duplicate CON (same message id from the same endpoint) is processed once;
    the answer is sent again."""
    topic = f"coap/{unique('dup')}"
    raw = RawCoap(node)
    try:
        with paho_connected(node, unique("sub")) as sub:
            sub.subscribe(topic, 1)
            msg = request(codec.CON, codec.POST, 0x4242, topic, ("qos=1",), b"once")
            raw.send(msg)
            first, first_bytes = raw.recv()
            raw.send(msg)
            again, again_bytes = raw.recv()
            assert first.mtype == codec.ACK and first.code == codec.CHANGED and first.mid == 0x4242
            assert again_bytes == first_bytes
            assert sub.get(WAIT).payload == b"once"
            raw.send(request(codec.CON, codec.POST, 0x4243, topic, (), b"marker"))
            raw.recv()
            assert sub.get(WAIT).payload == b"marker"  # nothing in between: the duplicate did not publish
    finally:
        raw.close()


def test_unknown_critical_option_is_4_02_and_elective_is_ignored(node: RunningNode) -> None:
    """RFC 7252 §5.4.1."""
    raw = RawCoap(node)
    try:
        raw.send(request(codec.CON, codec.GET, 1, "health", extra=((2049, b"x"),)))
        assert raw.recv()[0].code == codec.BAD_OPTION
        raw.send(request(codec.CON, codec.GET, 2, "health", extra=((2048, b"x"),)))
        assert raw.recv()[0].code == codec.CONTENT
    finally:
        raw.close()


def test_unverified_response_is_bounded_by_the_request_size(
    node: RunningNode, client: CoapTestClient
) -> None:
    """Amplification (RFC 7252 §11.3): a small anonymous GET of a large retained message gets a
    first Block2 block no larger than 3x the request."""
    topic = f"coap/{unique('amp')}"
    assert client.request("PUT", coap_uri(node, f"{topic}?retain=true"), b"z" * 1000).code == aiocoap.CHANGED
    raw = RawCoap(node)
    try:
        req = codec.serialize(request(codec.CON, codec.GET, 7, topic))
        raw.send(req)
        resp, data = raw.recv()
        assert resp.code == codec.CONTENT
        assert len(data) <= 3 * len(req)
        num, more, _ = codec.decode_block(resp.option(codec.BLOCK2))
        assert num == 0 and more
    finally:
        raw.close()


def test_malformed_datagrams_are_counted_and_a_bad_con_gets_rst(node: RunningNode) -> None:
    before = node.metric("fluxmq_coap_dropped_datagrams_total", 'reason="malformed"') or 0.0
    raw = RawCoap(node)
    try:
        raw.send(b"\x4f\x01\x12\x34")  # CON with token length 15 (§3: a message format error)
        rst, _ = raw.recv()
        assert (rst.mtype, rst.code, rst.mid) == (codec.RST, codec.EMPTY, 0x1234)
    finally:
        raw.close()
    assert (node.metric("fluxmq_coap_dropped_datagrams_total", 'reason="malformed"') or 0.0) == before + 1


def test_socket_fuzz_of_10000_random_datagrams_keeps_the_node_serving(
    node: RunningNode, client: CoapTestClient
) -> None:
    rng = random.Random(1307)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    addr = ("127.0.0.1", coap_port(node))
    valid = codec.serialize(request(codec.NON, codec.POST, 1, "fuzz/t", (), b"p"))
    try:
        for i in range(10000):
            if i % 2:
                data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64)))
            else:  # mutate a valid request: most get past the header into the option parser
                data = bytearray(valid)
                for _ in range(rng.randrange(1, 4)):
                    data[rng.randrange(len(data))] = rng.getrandbits(8)
                data = bytes(data)
            sock.sendto(data, addr)
            if i % 500 == 0:
                sock.setblocking(False)
                try:
                    while sock.recv(65535):
                        pass
                except BlockingIOError:
                    pass
                sock.setblocking(True)
    finally:
        sock.close()
    assert client.request("GET", coap_uri(node, "health")).payload == b"healthy"
    assert node.returncode is None
    assert (
        node.metric("fluxmq_coap_dropped_datagrams_total", 'reason="error"') or 0.0
    ) == 0  # no handler exception


# -- auth ------------------------------------------------------------------------------------------

ACL = """\
topic readwrite open/#
user alice
topic readwrite alice/#
topic read shared/#
"""


@pytest.fixture(scope="module")
def auth_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    d: Path = tmp_path_factory.mktemp("coapauth")
    (d / "passwd").write_text(f"alice:{hash_password('alice-pw')}\n")
    (d / "acl").write_text(ACL)
    factory = NodeFactory(d)
    try:
        yield factory(
            {
                "server.coap.plain.addr": f"127.0.0.1:{free_port()}",
                "auth.password_file": str(d / "passwd"),
                "auth.acl_file": str(d / "acl"),
                "auth.allow_anonymous": False,
                "storage.type": "memory",
            }
        )
    finally:
        factory.close()


def test_auth_refusals_are_4_01_and_acl_refusals_4_03(auth_node: RunningNode, client: CoapTestClient) -> None:
    node = auth_node
    good = "username=alice&password=alice-pw"
    assert client.request("POST", coap_uri(node, "alice/x"), b"1").code == aiocoap.UNAUTHORIZED
    assert (
        client.request("POST", coap_uri(node, "alice/x?username=alice&password=no"), b"1").code
        == aiocoap.UNAUTHORIZED
    )
    assert client.request("POST", coap_uri(node, f"alice/x?{good}"), b"1").code == aiocoap.CHANGED
    assert client.request("POST", coap_uri(node, f"shared/x?{good}"), b"1").code == aiocoap.FORBIDDEN
    assert client.request("GET", coap_uri(node, f"other/x?{good}")).code == aiocoap.FORBIDDEN
    resp = client.request("GET", coap_uri(node, f"alice/none?{good}"))
    assert resp.code == aiocoap.NOT_FOUND


def test_auth_observe_refused_without_read_rights(auth_node: RunningNode, client: CoapTestClient) -> None:
    observer = client.observe(coap_uri(auth_node, "other/%23?username=alice&password=alice-pw"))
    assert observer.first.code == aiocoap.FORBIDDEN


def test_a_large_notification_arrives_whole_block_wise(node: RunningNode, client: CoapTestClient) -> None:
    """RFC 7959 §2.6 / RFC 7641: a notification over the block size (and the amplification budget)
    carries its first Block2 block; aiocoap fetches the rest and hands over the whole body."""
    topic = f"coap/{unique('bignote')}"
    observer = client.observe(coap_uri(node, topic))
    body = os.urandom(3000)
    with paho_connected(node, unique("pub")) as pub:
        pub.publish(topic, body, 0)
        note = observer.get(WAIT)
    assert note.payload == body
    observer.cancel()


def test_a_2_04_for_qos1_survives_sigkill(node_factory: NodeFactory) -> None:
    """Acknowledged means stored: every retained QoS 1 publish answered 2.04 is there after SIGKILL."""
    node = node_factory({"server.coap.plain.addr": f"127.0.0.1:{free_port()}"})
    raw = RawCoap(node)
    try:
        for i in range(50):
            raw.send(request(codec.CON, codec.PUT, i, f"kept/{i}", ("qos=1", "retain=true"), b"v%d" % i))
            answer, _ = raw.recv()
            assert (answer.mid, answer.code) == (i, codec.CHANGED)
    finally:
        raw.close()
    node.kill()  # SIGKILL: nothing gets to flush or close
    again = node_factory(
        {"storage.path": str(node.data_dir), "server.coap.plain.addr": f"127.0.0.1:{free_port()}"}
    )
    with CoapTestClient() as c:
        for i in (0, 25, 49):
            got = c.request("GET", coap_uri(again, f"kept/{i}"))
            assert (got.code, got.payload) == (aiocoap.CONTENT, b"v%d" % i)
