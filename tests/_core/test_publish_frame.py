"""``publish_frame.append_publish_frame``: the bytes of ``codec.encode_publish``, from raw pointers."""

from __future__ import annotations

import pytest

from fluxmq._core import codec as c
from fluxmq._core.publish_frame import frame


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("qos,packet_id", [(0, 0), (1, 1), (1, 0xABCD)])
@pytest.mark.parametrize("plen", [0, 1, 120, 121, 122, 123, 124, 125, 16370, 16380, 16384, 2_097_200])
def test_frame_is_what_encode_publish_writes(version: int, qos: int, packet_id: int, plen: int) -> None:
    """Every Remaining Length size (its boundaries at 127, 16,383 and 2,097,151 bytes on both
    sides, for 3.x and for 5.0 with its property byte), QoS 0 and 1."""
    topic = "a/b/c"
    payload = bytes(range(256)) * (plen // 256) + bytes(plen % 256)
    want = c.encode_publish(topic, payload, qos, False, False, packet_id, None, version)
    assert frame(topic.encode(), payload, qos, packet_id, version) == want


def test_a_long_utf8_topic() -> None:
    topic = "ü/" * 300
    want = c.encode_publish(topic, b"x", 0, False, False, 0, None, 5)
    assert frame(topic.encode(), b"x", 0, 0, 5) == want
