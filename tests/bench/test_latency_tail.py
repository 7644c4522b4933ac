"""bench.latency_tail's patch of the C generator and its reading of ``perf script`` output (the
measurement itself needs perf, gcc, Mosquitto and a node)."""

from __future__ import annotations

import pytest

from bench.latency_tail import DUMP, NO_RSS, PATCH, Trace, classify, patched_source

SCRIPT = """\
  mqttload_trace   604 [001] 100.000000000:         sched:sched_switch: prev_comm=swapper/1 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=mqttload_trace next_pid=604 next_prio=120
  mqttload_trace   604 [001] 100.000010000:         sched:sched_switch: prev_comm=mqttload_trace prev_pid=604 prev_prio=120 prev_state=S ==> next_comm=fluxmq-node next_pid=600 next_prio=120
     fluxmq-node   600 [001] 100.000012000:      raw_syscalls:sys_exit: NR 45 = 84
     fluxmq-node   600 [001] 100.000015000: exceptions:page_fault_user: address=0x55b108b81468 ip=0x7f34c68b59e7 error_code=0x7
     fluxmq-node   600 [001] 100.000020000:     raw_syscalls:sys_enter: NR 44 (b, 55b1089633d0, 54, 4040, 0, 0)
     fluxmq-node   600 [001] 100.000025000:         sched:sched_switch: prev_comm=fluxmq-node prev_pid=600 prev_prio=120 prev_state=R ==> next_comm=etcd next_pid=77 next_prio=120
            etcd    77 [001] 100.000030000:         sched:sched_switch: prev_comm=etcd prev_pid=77 prev_prio=120 prev_state=S ==> next_comm=mqttload_trace next_pid=604 next_prio=120
  mqttload_trace   604 [001] 100.000040000:         sched:sched_switch: prev_comm=mqttload_trace prev_pid=604 prev_prio=120 prev_state=S ==> next_comm=swapper/1 next_pid=0 next_prio=120
"""


def test_who_ran_during_a_flight_and_the_brokers_faults_and_recv_to_send() -> None:
    tr = Trace(SCRIPT)
    t0 = 100_000_000_000
    # a flight from 5 to 35 us: the generator, the broker, a neighbour, the generator again (clipped)
    assert tr.flight(t0 + 5_000, t0 + 35_000) == [
        (t0 + 5_000, t0 + 10_000, "mqttload_trace"),
        (t0 + 10_000, t0 + 25_000, "fluxmq-node"),
        (t0 + 25_000, t0 + 30_000, "etcd"),
        (t0 + 30_000, t0 + 35_000, "mqttload_trace"),
    ]
    assert tr.broker_faults(t0, t0 + 35_000, "fluxmq-node") == 1
    assert tr.broker_faults(t0 + 16_000, t0 + 35_000, "fluxmq-node") == 0
    assert tr.recv_end == {"fluxmq-node": [t0 + 12_000]}
    assert tr.send_start == {"fluxmq-node": [t0 + 20_000]}


def test_the_patch_inserts_at_each_anchor_and_refuses_a_moved_one() -> None:
    src = "".join(f"/* {i} */\n{anchor}" for i, (anchor, _) in enumerate(PATCH))
    out = patched_source(src)
    for anchor, text in PATCH:
        if text is not None:
            assert anchor + text in out
    assert DUMP + PATCH[4][0] in out
    assert NO_RSS + PATCH[5][0] in out
    with pytest.raises(SystemExit, match="anchor"):
        patched_source(src.replace(PATCH[1][0], ""))


def _run(comm: str, tid: int, t_us: int, nxt: str, nxt_tid: int) -> str:
    return (f"  {comm} {tid} [001] 100.{t_us * 1000:09d}:         sched:sched_switch: prev_comm={comm} "
            f"prev_pid={tid} prev_prio=120 prev_state=S ==> next_comm={nxt} next_pid={nxt_tid} next_prio=120\n")  # fmt: skip


def _syscall(comm: str, tid: int, t_us: int, nr: int) -> str:
    return f"  {comm} {tid} [001] 100.{t_us * 1000:09d}:     raw_syscalls:sys_enter: NR {nr} (0, 0)\n"


def test_the_slowest_samples_are_classed_by_the_threads_and_events_of_their_flight() -> None:
    """Four flights of 100 us: the node's arbiter (another thread of the broker's tree) ran in the first,
    a neighbour's node (the same name, another process) in the second, the worker's heartbeat
    (``utimensat``, rare) in the third, nothing else in the fourth; the worker is 600, the arbiter 599."""
    script = ""
    t = 1000
    for what in ("arbiter", "neighbour", "heartbeat", "plain"):
        script += _run("swapper/1", 0, t, "mqttload_trace", 604)
        script += _run("mqttload_trace", 604, t + 5, "fluxmq-node", 600)
        script += _syscall("fluxmq-node", 600, t + 6, 45)  # the read, in every flight: not rare
        if what == "heartbeat":
            script += _syscall("fluxmq-node", 600, t + 7, 280)
        script += _syscall("fluxmq-node", 600, t + 8, 44)
        if what in ("arbiter", "neighbour"):
            script += _run("fluxmq-node", 600, t + 20, "fluxmq-node", 599 if what == "arbiter" else 700)
            script += _run("fluxmq-node", 599 if what == "arbiter" else 700, t + 60, "mqttload_trace", 604)
        else:
            script += _run("fluxmq-node", 600, t + 20, "mqttload_trace", 604)
        script += _run("mqttload_trace", 604, t + 100, "swapper/1", 0)
        t += 1000
    tr = Trace(script)
    assert tr.run_tids[:3] == [604, 600, 599]
    t0 = 100_000_000_000
    assert tr.flight_tids(t0 + 1_004_000, t0 + 1_010_000)[-1] == (
        t0 + 1_005_000,
        t0 + 1_010_000,
        "fluxmq-node",
        600,
    )
    samples = [(t0 + k * 1_000_000 + 1_004_000, t0 + k * 1_000_000 + 1_099_000) for k in range(4)]
    samples += [
        (t0 + 9_000_000 + k, t0 + 9_000_000 + k + 1000) for k in range(300)
    ]  # fast, outside the trace
    rows = classify(samples, [], tr, 600, {599, 600}, 64, 4)
    classes = {i: cls for _, cls, _, i in rows}
    assert classes[0] == "node, other thread"
    assert classes[1] == "neighbour"
    assert classes[2] == "worker heartbeat"
    assert classes[3] == "run's first 0.2 s"
    clean = classify(samples, [], tr, 600, {599, 600}, 64, 4, clean=True)
    assert 1 not in {i for *_, i in clean}
