"""``fluxmq._core.publish_frame``: a PUBLISH written from raw topic and payload bytes is byte for byte
the codec's ``encode_publish`` of the same message (3.1.1 and 5.0, QoS 0-2, each Remaining Length
size), and the frame's limits are checked."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluxmq._core import codec as c
from fluxmq._core import publish_frame as pf


@pytest.mark.parametrize(
    "size",
    [0, 1, 100, 120, 121, 122, 123, 124, 125, 200, 16_370, 16_380, 16_383, 16_384, 2_097_152, 2_097_200],
)
@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("version", [4, 5])
def test_frame_is_the_encoders_publish(size: int, qos: int, version: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    pid = 0x1234 if qos else 0
    want = c.encode_publish("a/b", payload, qos, False, False, pid, None, version)
    assert pf.frame(b"a/b", payload, qos, pid, version) == want
    assert c.Decoder(version=version).feed(want)[0].payload == payload


@given(st.text(min_size=1, max_size=300).filter(lambda t: "\x00" not in t), st.binary(max_size=600))
def test_any_topic_and_payload(topic: str, payload: bytes) -> None:
    for version in (4, 5):
        assert pf.frame(topic.encode(), payload, 1, 7, version) == c.encode_publish(
            topic, payload, 1, False, False, 7, None, version
        )


def test_a_topic_over_65535_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="topic longer"):
        pf.frame(b"t" * 65_536, b"", 0, 0, 4)


def test_append_publish_frame_grows_its_output_geometrically() -> None:
    """``append_publish_frame`` (the relay's writes into a subscriber's output) grows through
    ``outbuf.out_resize``: 600 frames appended in a row, few reallocations, the same bytes."""
    out, allocs = pf.frames_into(b"t/1", b"x" * 80, 600)
    assert out == pf.frame(b"t/1", b"x" * 80) * 600
    assert allocs <= 12
