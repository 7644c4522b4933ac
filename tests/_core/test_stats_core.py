"""``_core.stats_core``: the broker's per-message counters as C integers (``StatsCore``, the base of
``BrokerStats``), which Python code reads and adds to as the ints and ``[0, 0, 0]`` lists they were."""

from __future__ import annotations

import pytest

from fluxmq._core.stats_core import QosCounts, StatsCore
from fluxmq.broker.stats import BrokerStats


def test_the_qos_counts_index_assign_iterate_and_compare_like_a_list_of_three() -> None:
    st = BrokerStats()
    assert isinstance(st, StatsCore)
    counts = st.sent_qos
    assert type(counts) is QosCounts and counts == [0, 0, 0] and len(counts) == 3
    counts[1] += 5
    st.sent_qos[2] += 2
    counts[-1] += 1
    assert list(counts) == [0, 5, 3] and counts == (0, 5, 3) and counts != [0, 5, 4]
    assert sum(counts) == 8 == st.publish_sent and counts[1:] == [5, 3]
    assert dict(zip("012", counts, strict=True)) == {"0": 0, "1": 5, "2": 3}
    with pytest.raises(IndexError):
        counts[3]
    with pytest.raises(IndexError):
        counts[-4] = 1
    with pytest.raises(TypeError):
        counts[0] = "1"
    with pytest.raises(AttributeError):
        st.sent_qos = [0, 0, 0]  # the relay holds these objects: never replaced


def test_the_packet_and_byte_totals_are_int_attributes() -> None:
    st = BrokerStats()
    st.bytes_received += 10
    st.messages_received += 1
    st.bytes_sent += 2**40
    st.messages_sent = 3
    assert (st.bytes_received, st.messages_received, st.bytes_sent, st.messages_sent) == (10, 1, 2**40, 3)
    assert all(type(v) is int for v in (st.bytes_received, st.messages_sent))
    st.dropped("queue_full")
    assert st.dropped_total == 1 and st.received_qos == [0, 0, 0]
