"""fluxmq/_core/queue_wire.pyx: a durable queue delivery's PUBLISH built in one buffer must be the
codec's encoding of the same topic, payload and properties (the user properties last, in order)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluxmq._core.codec import USER_PROPERTY, Decoder, Publish, encode_publish
from fluxmq._core.queue_wire import plain_delivery, record_delivery

names = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=40
)


def user(pairs) -> bytes:
    out = b""
    for k, v in pairs:
        kb, vb = k.encode(), v.encode()
        out += b"\x26" + len(kb).to_bytes(2, "big") + kb + len(vb).to_bytes(2, "big") + vb
    return out


def common(queue: str, offset: int) -> list[tuple[str, str]]:
    return [("message-id", f"{queue}:{offset}"), ("queue", queue), ("offset", str(offset))]


@given(
    topic=names,
    queue=names,
    group=names,
    offset=st.integers(0, 2**64 - 1),
    count=st.integers(0, 2**64 - 1),
    extra=st.lists(st.tuples(names, names), max_size=3),
    payload=st.binary(max_size=300),
)
def test_plain_delivery_is_the_codecs_publish(topic, queue, group, offset, count, extra, payload) -> None:
    pairs = [*common(queue, offset), ("group-id", group), ("delivery-count", str(count)), *extra]
    data = plain_delivery(topic, queue, offset, user([("group-id", group)]), count, user(extra), payload)
    assert data == encode_publish(topic, payload, 1, False, False, 1, {USER_PROPERTY: pairs}, 5)


@pytest.mark.parametrize("size", [0, 100, 200, 20_000, 3_000_000])  # 1 to 4 remaining-length bytes
@pytest.mark.parametrize("count", [0, 1, 9, 10, 17, 123_456])
def test_plain_delivery_decodes_as_the_publish_it_names(size: int, count: int) -> None:
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    data = plain_delivery("$queue/q/k/é", "q", 12345, user([("group-id", "g")]), count, b"", payload)
    (p,) = Decoder(version=5).feed(data)
    assert isinstance(p, Publish) and p.topic == "$queue/q/k/é" and p.payload == payload and p.qos == 1
    assert p.packet_id == 1 and not p.dup and not p.retain
    assert p.properties[USER_PROPERTY] == [
        *common("q", 12345),
        ("group-id", "g"),
        ("delivery-count", str(count)),
    ]


@pytest.mark.parametrize("props", [{0x03: "text/plain"}, {0x09: b"corr", USER_PROPERTY: [("a", "b")]}])
@pytest.mark.parametrize("size", [0, 200, 20_000])
def test_record_delivery_appends_to_the_records_prebuilt_parts(props, size: int) -> None:
    payload = b"y" * size
    head = len(b"t/1").to_bytes(2, "big") + b"t/1" + b"\x00\x01"
    record_props = encode_publish(
        "t/1",
        b"",
        1,
        False,
        False,
        1,
        {**props, USER_PROPERTY: [*props.get(USER_PROPERTY, ()), *common("q", 7)]},
        5,
    )
    block = record_props[len(head) + 3 :]  # 0x32, remaining length (1 byte), head, properties length (1 byte)
    data = record_delivery(head, block, user([("group-id", "g")]), 3, user([("x-k", "v")]), payload)
    want = {
        **props,
        USER_PROPERTY: [
            *props.get(USER_PROPERTY, ()),
            *common("q", 7),
            ("group-id", "g"),
            ("delivery-count", "3"),
            ("x-k", "v"),
        ],
    }
    assert data == encode_publish("t/1", payload, 1, False, False, 1, want, 5)


def test_a_topic_over_65535_bytes_is_refused() -> None:
    with pytest.raises(ValueError):
        plain_delivery("t" * 65_536, "q", 1, b"", 1, b"", b"")


@pytest.mark.parametrize("at", range(7))
def test_none_for_any_argument_is_a_type_error_not_a_crash(at: int) -> None:
    args = ["t", "q", 1, b"", 1, b"", b""]
    args[at] = None
    with pytest.raises(TypeError):
        plain_delivery(*args)
    rargs = [b"\x00\x01t\x00\x01", b"", b"", 1, b"", b""]
    rargs[min(at, 5)] = None
    with pytest.raises(TypeError):
        record_delivery(*rargs)


@given(st.binary(max_size=40), st.binary(max_size=40), st.lists(st.binary(max_size=300), max_size=20))
def test_plain_records_are_head_length_mid_payload(head, mid, payloads) -> None:
    from fluxmq._core.queue_wire import plain_records

    want = [head + len(p).to_bytes(4, "little") + mid + p for p in payloads]
    assert plain_records(head, mid, payloads) == want


@given(st.binary(max_size=40), st.integers(0, 2**64 - 1000), st.integers(0, 50))
def test_offset_keys_are_prefix_and_big_endian_offsets(prefix, first, n) -> None:
    from fluxmq._core.queue_wire import offset_keys

    assert offset_keys(prefix, first, n) == [prefix + (first + i).to_bytes(8, "big") for i in range(n)]


def test_plain_records_refuse_what_is_not_bytes() -> None:
    from fluxmq._core.queue_wire import plain_records

    with pytest.raises(TypeError):
        plain_records(b"h", b"m", ["text"])


def test_the_record_builders_refuse_none_where_they_read_bytes() -> None:
    """None where bytes are read raises TypeError (a crash in C before: ASan run, session 18)."""
    from fluxmq._core.queue_wire import offset_keys, plain_records

    with pytest.raises(TypeError):
        plain_records(None, b"m", [b"p"])
    with pytest.raises(TypeError):
        plain_records(b"h", None, [b"p"])
    with pytest.raises(TypeError):
        plain_records(b"h", b"m", [b"p", None])
    with pytest.raises(TypeError):
        offset_keys(None, 0, 1)
    assert plain_records(b"h", b"m", [b"pp"]) == [b"h\x02\x00\x00\x00mpp"]
    assert offset_keys(b"q", 1, 2) == [b"q" + (1).to_bytes(8, "big"), b"q" + (2).to_bytes(8, "big")]
