"""Smoke tests of the load generator (bench/loadgen.py): it counts deliveries, loss and duplicates
correctly against a real Mosquitto, and its readers agree on any split of a stream.

No timing assertions: only counts, which are exact on loopback with bounded runs.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench import loadgen, wire
from bench.brokers import REPO, Mosquitto
from bench.loadgen import Config, SeqChecker


def _stream() -> tuple[bytes, list[tuple]]:
    """A broker-to-client byte stream and the events it must decode to."""
    p0 = wire.PublishTemplate("t/0", 0, 64, 3)
    p1 = wire.PublishTemplate("some/longer/topic/name", 1, 200, 7)
    pub0 = bytearray(p0.data)
    loadgen._SEQ_TS.pack_into(pub0, p0.off_seq, 41, 123456789)
    pub1 = bytearray(p1.data)
    pub1[p1.off_pid : p1.off_pid + 2] = (513).to_bytes(2, "big")
    loadgen._SEQ_TS.pack_into(pub1, p1.off_seq, 2**32 - 1, 2**63)
    short = b"\x30\x07\x00\x03a/bxy"  # 2-byte payload: not one of ours
    data = (
        b"\x20\x02\x00\x00"  # CONNACK rc 0
        + b"\x90\x03\x00\x01\x01"  # SUBACK granted QoS 1
        + bytes(pub0)
        + bytes(pub1)
        + b"\x40\x02\x12\x34"  # PUBACK 0x1234
        + short
        + b"\xd0\x00"  # PINGRESP
    )
    events = [
        (2, 0),
        (9, 1),
        (3, 0, 0, 3, 41, 123456789),
        (3, 1, 513, 7, 2**32 - 1, 2**63),
        (4, 0x1234),
        (3, 0, 0, -1, 0, 0),
        (13, 0),
    ]
    return data, events


def _feed_split(reader: object, data: bytes, step: int) -> list[tuple]:
    out: list[tuple] = []
    for i in range(0, len(data), step):
        out += reader.feed(data[i : i + step])
    return out


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 10_000])
def test_python_reader_any_split_gives_the_same_events(step: int) -> None:
    data, events = _stream()
    assert _feed_split(wire.PythonReader(), data, step) == events


@pytest.mark.parametrize("step", [1, 5, 10_000])
def test_codec_reader_matches_python_reader(step: int) -> None:
    if not wire.codec_available():
        pytest.skip("fluxmq._core.codec is not built")
    data, events = _stream()
    assert _feed_split(wire.CodecReader(), data, step) == events


def _runs_stream() -> tuple[bytes, list[tuple]]:
    """Runs of same-shaped PUBLISH packets (the reader's fast path), interrupted by other packets."""
    a = wire.PublishTemplate("lg/1/0", 0, 64, 1)
    b = wire.PublishTemplate("lg/1/1", 1, 32, 2)
    data = bytearray()
    events: list[tuple] = []
    for seq in range(50):
        pkt = bytearray(a.data)
        loadgen._SEQ_TS.pack_into(pkt, a.off_seq, seq, 1000 + seq)
        data += pkt
        events.append((3, 0, 0, 1, seq, 1000 + seq))
    for seq in range(3):
        pkt = bytearray(b.data)
        pkt[b.off_pid : b.off_pid + 2] = (300 + seq).to_bytes(2, "big")
        loadgen._SEQ_TS.pack_into(pkt, b.off_seq, seq, 7)
        data += pkt
        events.append((3, 1, 300 + seq, 2, seq, 7))
    data += b"\x40\x02\x00\x05"
    events.append((4, 5))
    c = wire.PublishTemplate("lg/1/0", 1, 62, 1)  # same length as a's packets, QoS 1
    assert c.length == a.length
    for seq in range(50, 90):
        t = c if seq == 70 else a
        pkt = bytearray(t.data)
        loadgen._SEQ_TS.pack_into(pkt, t.off_seq, seq, 1000 + seq)
        if t is c:  # breaks the run: the fast path must hand over to the generic parser
            pkt[c.off_pid : c.off_pid + 2] = (77).to_bytes(2, "big")
            events.append((3, 1, 77, 1, seq, 1000 + seq))
        else:
            events.append((3, 0, 0, 1, seq, 1000 + seq))
        data += pkt
    return bytes(data), events


@pytest.mark.parametrize("step", [1, 9, 64, 100, 1000, 100_000])
def test_python_reader_fast_path_on_runs_of_same_shaped_publishes(step: int) -> None:
    data, events = _runs_stream()
    assert _feed_split(wire.PythonReader(), data, step) == events
    if wire.codec_available():
        assert _feed_split(wire.CodecReader(), data, step) == events


def test_reader_rejects_malformed_remaining_length() -> None:
    with pytest.raises(ValueError):
        wire.PythonReader().feed(b"\x30\xff\xff\xff\xff\x01")


def test_seq_checker_counts_order_gaps_and_duplicates() -> None:
    row = [0, 0]
    lat: list[int] = []
    k = SeqChecker(2, row, lat)
    ev = [(3, 0, 0, 0, s, 100) for s in (0, 1, 2, 5, 6, 6, 3)] + [(3, 1, 9, 1, 0, 100), (3, 0, 0, 2, 0, 0)]
    acks = k.feed(ev, 1100)
    assert (k.total, k.unique, k.gaps, k.dups, k.bad) == (9, 6, 2, 2, 1)
    assert row == [5, 1]
    assert lat == [1000] * 6
    assert bytes(acks) == b"\x40\x02\x00\x09"  # PUBACK for the QoS 1 delivery only


def test_config_refuses_non_loopback_targets() -> None:
    with pytest.raises(ValueError, match="non-loopback"):
        Config(mode="throughput", host="10.0.0.1").finalize()


# ------------------------------------------------------------------------ against Mosquitto


@pytest.fixture(scope="module")
def mosquitto():
    if not Mosquitto.available():
        pytest.skip("mosquitto is not installed (apt-get install mosquitto; scripts/test installs it)")
    with Mosquitto() as broker:
        yield broker


def _run(broker: Mosquitto, **kw: object) -> dict:
    kw.setdefault("procs", 1)
    cfg = Config(port=broker.port, pids=[broker.pid], timeout=60, drain=3, **kw)
    return loadgen.run(cfg)


def _assert_complete(res: dict, msgs: int, deliveries: int) -> None:
    assert "error" not in res, res
    assert res["msgs"] == msgs, res
    assert res["deliveries"] == deliveries, res
    assert res["lost"] == 0 and res["dups"] == 0 and res["gaps"] == 0 and res["bad"] == 0, res
    assert res["_ok"]


def test_qos0_one_to_one_delivers_every_message_once(mosquitto: Mosquitto) -> None:
    res = _run(mosquitto, mode="throughput", count=3000, qos=0)
    _assert_complete(res, 3000, 3000)


def test_qos1_counts_pubacks(mosquitto: Mosquitto) -> None:
    res = _run(mosquitto, mode="throughput", count=2000, qos=1, inflight=10)
    _assert_complete(res, 2000, 2000)
    assert res["pubacks"] == 2000


def test_fanout_counts_each_subscriber(mosquitto: Mosquitto) -> None:
    res = _run(mosquitto, mode="fanout", subs=5, count=300)
    _assert_complete(res, 300, 1500)


def test_fanin_wildcard_counts_every_publisher(mosquitto: Mosquitto) -> None:
    res = _run(mosquitto, mode="fanin", pubs=7, count=701)
    _assert_complete(res, 701, 701)


def test_topic_mapping_gives_the_expected_fan(mosquitto: Mosquitto) -> None:
    # 3 publishers on 2 topics (0,1,0), 4 subscribers on topics (0,1,0,1): each message reaches 2
    res = _run(mosquitto, mode="throughput", pubs=3, subs=4, topics=2, count=900)
    _assert_complete(res, 900, 1800)


def test_two_worker_processes_count_the_same(mosquitto: Mosquitto) -> None:
    res = _run(mosquitto, mode="fanout", subs=6, count=400, procs=2)
    assert res["procs"] == 2
    _assert_complete(res, 400, 2400)


def test_run_stops_at_its_duration_without_loss(mosquitto: Mosquitto) -> None:
    res = _run(mosquitto, mode="throughput", count=50_000_000, duration=0.3, window=50)
    assert "error" not in res, res
    assert 0 < res["msgs"] < 50_000_000
    assert res["deliveries"] == res["msgs"] and res["lost"] == 0


def test_latency_mode_collects_one_sample_per_delivery(mosquitto: Mosquitto) -> None:
    res = _run(mosquitto, mode="latency", rate=500, count=100, count_set=True)
    _assert_complete(res, 100, 100)
    assert 0 <= res["p50_ms"] <= res["p99_ms"] <= res["max_ms"]


def test_latency_trace_writes_each_delivery_in_send_order(mosquitto: Mosquitto, tmp_path) -> None:
    """``--trace``: ``send_ns latency_ns`` per delivery, what bench/hub_trace.py sets beside the
    node's own trace."""
    path = tmp_path / "lat.txt"
    res = _run(mosquitto, mode="latency", rate=500, count=50, count_set=True, trace=str(path))
    _assert_complete(res, 50, 50)
    rows = [tuple(map(int, line.split())) for line in path.read_text().splitlines()]
    assert len(rows) == 50
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    assert all(lat > 0 for _, lat in rows)
    assert max(lat for _, lat in rows) / 1e6 == pytest.approx(res["max_ms"], abs=0.001)


def test_conn_mode_opens_pings_and_measures_rss(mosquitto: Mosquitto) -> None:
    res = _run(mosquitto, mode="conn", conns=60, concurrency=16, hold=0.1, settle=0.1)
    assert res["ok"] == 60 and res["alive"] == 60 and res["failed"] == 0, res
    assert res["rss_before_kb"] > 0 and res["rss_after_kb"] > 0


def test_cli_prints_a_result_line(mosquitto: Mosquitto) -> None:
    cmd = [sys.executable, "-m", "bench.loadgen", "--mode", "throughput", "--port", str(mosquitto.port),
           "--count", "500", "--procs", "1", "--label", "cli"]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=90)
    assert p.returncode == 0, p.stderr
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = loadgen.parse_result_line(line)
    assert (
        res["label"] == "cli" and res["msgs"] == "500" and res["deliveries"] == "500" and res["lost"] == "0"
    )
