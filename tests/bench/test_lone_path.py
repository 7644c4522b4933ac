"""bench.lone_path's reading of ``perf script`` output (the measurement itself needs perf and a broker)."""

from __future__ import annotations

from bench.lone_path import critical_path, critical_split

SCRIPT = """\
     fluxmq-node 14223 [001] 100.000100:  raw_syscalls:sys_exit: NR 232 = 1
     fluxmq-node 14223 [001] 100.000110: raw_syscalls:sys_enter: NR 45 (a, 55963806fe90, 10000, 0, 0, 0)
     fluxmq-node 14223 [001] 100.000115:  raw_syscalls:sys_exit: NR 45 = 83
     fluxmq-node 14223 [001] 100.000130: raw_syscalls:sys_enter: NR 44 (b, 7fc69a17efa0, 53, 0, 0, 0)
     fluxmq-node 14223 [001] 100.000135:  raw_syscalls:sys_exit: NR 44 = 83
     fluxmq-node 14223 [001] 100.000137: raw_syscalls:sys_enter: NR 39 (7fc69c74e6f8, 0)
     fluxmq-node 14223 [001] 100.000141: raw_syscalls:sys_enter: NR 232 (5, 0)
     fluxmq-node 14223 [001] 100.001000:  raw_syscalls:sys_exit: NR 232 = 1
     fluxmq-node 14223 [001] 100.001005: raw_syscalls:sys_enter: NR 39 (7fc69c74e6f8, 0)
     fluxmq-node 14223 [001] 100.001010: raw_syscalls:sys_enter: NR 232 (5, 0)
     mosquitto 14300 [001] 100.002000:  raw_syscalls:sys_exit: NR 232 = 1
     mosquitto 14300 [001] 100.002012: raw_syscalls:sys_enter: NR 1 (7, 0)
     mosquitto 14300 [001] 100.002016:  raw_syscalls:sys_exit: NR 1 = 83
     mosquitto 14300 [001] 100.002019: raw_syscalls:sys_enter: NR 281 (5, 0)
"""


def test_each_send_is_timed_from_the_wake_up_before_it_and_to_the_wait_after_it() -> None:
    to_send, after = critical_path(SCRIPT)
    # a wake-up without a send (a timer) counts nothing; the next wake-up is measured afresh
    assert [round(v) for v in to_send] == [12, 30]
    assert [round(v) for v in after] == [3, 6]


def test_the_path_is_split_at_the_reads_between_the_wake_up_and_the_send() -> None:
    # fluxmq: wake 100.000100, recvfrom 100.000110-100.000115, sendto 100.000130; the timer
    # wake-up without a send counts nothing; Mosquitto's wake-up had no read before its write
    to_read, reading, to_send = critical_split(SCRIPT)
    assert [round(v) for v in to_read] == [10]
    assert [round(v) for v in reading] == [5]
    assert [round(v) for v in to_send] == [15]
