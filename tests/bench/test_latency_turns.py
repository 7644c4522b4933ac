"""bench.latency_turns' reading of the worker's timeline from ``perf script`` output (the measurement
itself needs perf, gcc and a node)."""

from __future__ import annotations

from bench.latency_turns import breakdown, heartbeat_samples, tails, timeline, write_after_a_turn

T0 = 100_000_000_000


def _line(comm: str, tid: int, t_us: float, event: str, rest: str) -> str:
    return f"  {comm} {tid} [001] 100.{int(t_us * 1000):09d}: {event}: {rest}\n"


def _switch(t_us: float, prev: tuple[str, int], nxt: tuple[str, int]) -> str:
    return _line(prev[0], prev[1], t_us, "sched:sched_switch",
                 f"prev_comm={prev[0]} prev_pid={prev[1]} prev_prio=120 prev_state=S ==> "
                 f"next_comm={nxt[0]} next_pid={nxt[1]} next_prio=120")  # fmt: skip


W, G = ("fluxmq-node", 600), ("mqttload_trace", 604)


def _call(t_us: float, nr: int) -> str:
    return _line(*W, t_us, "raw_syscalls:sys_enter", f"NR {nr} (0, 0)")


def _ret(t_us: float, nr: int) -> str:
    return _line(*W, t_us, "raw_syscalls:sys_exit", f"NR {nr} = 0")


# The generator sends at 0; the worker runs from 10: recvfrom 10-14, user 14-54 (a heartbeat's wake),
# a softirq of the generator's (not the worker's), getpid 54-55, sendto 56-60, switched out at 61
# (the generator reads), back at 70 for the heartbeat's utimensat, epoll_wait at 80.
SCRIPT = (
    _switch(10, G, W)
    + _call(10, 45) + _ret(14, 45)
    + _line(*G, 20, "irq:softirq_entry", "vec=3 [action=NET_RX]")
    + _line(*W, 30, "timer:hrtimer_expire_entry", "hrtimer=0x1 function=tick_nohz_handler now=1")
    + _call(54, 39) + _ret(55, 39)
    + _call(56, 44) + _ret(60, 44)
    + _switch(61, W, G)
    + _switch(70, G, W)
    + _call(72, 280) + _ret(74, 280)
    + _call(80, 232)
)  # fmt: skip


def test_the_workers_on_cpu_time_per_state_and_its_events() -> None:
    ev = timeline(SCRIPT, 600)
    assert [k for _, k, _ in ev][:3] == ["on", "enter", "exit"]
    assert ("hrtimer", "tick_nohz_handler") in [(k, w) for _, k, w in ev]
    assert not [w for _, k, w in ev if k == "softirq"]  # the generator's
    acc, extras, calls = breakdown(ev, [e[0] for e in ev], T0, T0 + 65_000)
    assert acc == {"recvfrom": 4_000, "user": 41_000 + 1_000, "getpid": 1_000, "sendto": 4_000}
    assert extras == ["hrtimer tick_nohz_handler"]
    assert calls == ["recvfrom", "getpid", "sendto"]
    assert write_after_a_turn(calls)
    assert not write_after_a_turn(["recvfrom", "sendto", "getpid"])


def test_the_heartbeat_turns_sample_and_the_tail_after_the_write() -> None:
    ev = timeline(SCRIPT, 600)
    samples = [(T0 - 1_000_000, T0 - 900_000), (T0, T0 + 65_000)]
    assert heartbeat_samples(samples, ev) == [(1, T0 + 72_000)]
    # from the sendto's exit (60) to epoll_wait (80): on the CPU 60-61 and 70-80
    out, between = tails(ev)
    assert out == [11.0]
    assert between == {"utimensat": 1}
