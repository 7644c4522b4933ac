"""bench.chaos: a run without faults on a real two-worker node reports zero loss; the faults offered
follow the set-up; a loss is set against the documented windows."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from bench import chaos


def test_a_run_without_faults_loses_and_doubles_nothing(capsys) -> None:
    args = ["--setup", "workers", "--rounds", "0", "--run-for", "2", "--min-gap", "0.5", "--quiet", "1"]
    assert chaos.main([*args, "--rate", "20", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    assert "summary: OK (setup workers, seed 7, 0 faults)" in out
    assert '"lost": 0' in out and '"lost": 1' not in out
    assert '"longest_s"' in out and '"refused": {}' in out  # every client's connects, none refused


def test_a_worker_stopped_alone_on_a_two_worker_node_loses_and_doubles_nothing(capsys) -> None:
    """One ``worker-term`` fault (SIGTERM to one worker, the arbiter restarts it), the run going on
    once both workers serve again (``/ready`` names none down): nothing is lost or doubled."""
    args = ["--setup", "workers", "--rounds", "1", "--faults", "worker-term", "--min-gap", "0.5"]
    assert chaos.main([*args, "--max-gap", "1", "--quiet", "1", "--rate", "20", "--seed", "8"]) == 0
    out = capsys.readouterr().out
    assert "fault 1: worker-term on n0" in out and "summary: OK (setup workers, seed 8, 1 faults)" in out


def test_the_faults_are_those_of_the_set_up() -> None:
    assert chaos.parse_args(["--setup", "cluster"]).faults == [
        "node-kill",
        "node-term",
        "stop-cont",
        "partition",
    ]
    assert chaos.parse_args(["--faults", "stop-cont"]).faults == ["stop-cont"]
    with pytest.raises(SystemExit):
        chaos.parse_args(["--setup", "cluster", "--faults", "worker-kill"])
    # a worker stopped alone (SIGTERM) beside the kill -9 of one, on nodes of several workers
    assert chaos.parse_args([]).faults == [
        "worker-kill",
        "worker-term",
        "node-kill",
        "node-term",
        "stop-cont",
    ]
    clustered = chaos.parse_args(["--setup", "cluster", "--workers", "2", "--faults", "worker-term"])
    assert clustered.faults == ["worker-term"] and clustered.workers == 2
    assert "worker-kill" in chaos.parse_args(["--setup", "cluster", "--workers", "2"]).faults
    with pytest.raises(SystemExit):
        chaos.parse_args(["--workers", "1"])


def sub_pub(home: str, lost_at: float) -> tuple[chaos.Subscriber, chaos.Publisher]:
    """A subscriber whose session was lost at ``lost_at`` (granted again 0.5 s later), and a
    publisher at ``home``."""
    stop = threading.Event()
    sub = chaos.Subscriber("s", 1, stop, "chaos/d/#", 1)
    pub = chaos.Publisher("p", 1, stop, "chaos/d/p", 1, 1.0)
    pub.home = home
    sub.ev.session_lost, sub.granted = [lost_at], [lost_at + 0.5]
    return sub, pub


def test_a_loss_is_a_documented_window_only_when_a_fault_or_a_lost_session_explains_it() -> None:
    sub, pub = sub_pub("n1", 10.0)
    kill = chaos.Fault(20.0, "node-kill", "n1", restored=23.0)
    stopped = chaos.Fault(30.0, "stop-cont", "n1", restored=33.0)
    faults = [kill, stopped]
    assert chaos.lost_window(sub, pub, 1, 10.2, faults) == "subscriber-session-lost"  # before its SUBACK
    assert chaos.lost_window(sub, pub, 1, 19.0, faults) == "publisher-node-killed"
    assert chaos.lost_window(sub, pub, 1, 11.0, faults) == chaos.UNEXPLAINED
    pub.sent_at[2] = 10.4  # QoS 2: routed at its PUBLISH, acknowledged (PUBCOMP) after the SUBACK
    assert chaos.lost_window(sub, pub, 2, 10.7, faults) == "subscriber-session-lost"
    assert chaos.lost_window(sub, pub, 1, 29.5, faults) == chaos.UNEXPLAINED  # a pause loses nothing
    pub.sent_at[3] = 19.5  # QoS 2, sent before the kill, completed after the restart
    assert chaos.lost_window(sub, pub, 3, 24.0, faults) == "publisher-node-killed"
    pub.home = "n2"  # another node's kill does not explain it
    assert chaos.lost_window(sub, pub, 1, 19.0, faults) == chaos.UNEXPLAINED


def test_a_session_lost_to_a_worker_kill_is_no_documented_window_any_more() -> None:
    """A reconnect on the other worker while the killed one restarts resumes the session from the
    restarted one (docs/cluster.rst, "Client ids"): a session not present then is a finding."""
    sub, pub = sub_pub("w", 21.0)
    worker_kill = chaos.Fault(20.0, "worker-kill", "n1", restored=23.0)
    assert chaos.lost_window(sub, pub, 1, 21.2, [worker_kill]) == chaos.UNEXPLAINED
    node_kill = chaos.Fault(20.5, "node-kill", "n1", restored=24.0)
    assert chaos.lost_window(sub, pub, 1, 21.2, [worker_kill, node_kill]) == "subscriber-session-lost"


def test_a_worker_stopped_alone_explains_no_loss() -> None:
    """SIGTERM to one worker (its graceful stop, the node going on): a session lost meanwhile, or a
    message its publisher had acknowledged there, is a finding (docs/reliability.rst, "stopped
    alone"); with a node fault around too, the node's window still explains it."""
    sub, pub = sub_pub("n0", 21.0)
    term = chaos.Fault(20.0, "worker-term", "n0", restored=23.0, killed=20.01, where={"p": "victim"})
    assert chaos.lost_window(sub, pub, 1, 21.2, [term]) == chaos.UNEXPLAINED
    sub.ev.session_lost, sub.granted = [], [0.5]
    assert chaos.lost_window(sub, pub, 1, 19.5, [term]) == chaos.UNEXPLAINED
    sub.ev.session_lost, sub.granted = [21.0], [21.5]
    node_term = chaos.Fault(20.5, "node-term", "n0", restored=24.0)
    assert chaos.lost_window(sub, pub, 1, 21.2, [term, node_term]) == "subscriber-session-lost"


def test_a_worker_kill_explains_a_loss_only_when_the_publisher_was_on_that_worker() -> None:
    """The kill of the receiving worker loses nothing (its batches are acknowledged once committed,
    else sent again after its restart: docs/cluster.rst, "What the PUBACK means across nodes")."""
    sub, pub = sub_pub("n0", 0.0)
    sub.ev.session_lost, sub.granted = [], [0.5]
    kill = chaos.Fault(20.0, "worker-kill", "n0", restored=20.5, where={"p": "other"})
    assert chaos.lost_window(sub, pub, 1, 19.5, [kill]) == chaos.UNEXPLAINED
    kill.where["p"] = "victim"
    assert chaos.lost_window(sub, pub, 1, 19.5, [kill]) == "publisher-node-killed"
    kill.where = {}  # not connected at the kill: it may have been
    assert chaos.lost_window(sub, pub, 1, 19.5, [kill]) == "publisher-node-killed"


def test_a_publish_sent_while_the_fault_finds_its_victim_may_have_reached_it() -> None:
    """A fault starts (``at``) before its signal is sent (``killed``): finding the victim's
    processes and connections takes a few milliseconds, and a publisher sending then reaches the
    worker before it dies (a QoS 2 message routed there, its forwarded copies lost with it, is
    completed without being routed again when sent again after the restart)."""
    sub, pub = sub_pub("n0", 0.0)
    sub.ev.session_lost, sub.granted = [], [0.5]
    pub.sent_at[1] = 20.004
    kill = chaos.Fault(20.0, "worker-kill", "n0", restored=20.5, killed=20.01, where={"p": "victim"})
    assert chaos.lost_window(sub, pub, 1, 21.1, [kill]) == "publisher-node-killed"
    pub.sent_at[1] = 20.02  # sent after the signal: the killed worker never had it
    assert chaos.lost_window(sub, pub, 1, 21.1, [kill]) == chaos.UNEXPLAINED


def test_the_clients_connected_to_a_process_are_found_by_their_ports() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        stop = threading.Event()
        near, far = chaos.Client("near", 1, stop), chaos.Client("far", 1, stop)
        near.conn = chaos.Conn(server.getsockname()[1])
        accepted, _ = server.accept()
        try:
            # this process holds both ends: the accepted side's remote port is near's
            assert chaos.connected_to(os.getpid(), [near, far]) == {"near": "victim", "far": "unknown"}
            assert chaos.connected_to(os.getppid(), [near]) == {"near": "other"}
        finally:
            accepted.close()
            near.conn.close()


def test_the_raft_set_up_offers_the_node_faults_and_a_lagging_replica() -> None:
    args = chaos.parse_args(["--setup", "raft"])
    assert args.faults == ["node-kill", "node-term", "stop-cont", "lag-restart"] and args.workers == 1
    assert (args.write_policy, args.distribution) == ("forward", "forward")
    assert "worker-kill" in chaos.parse_args(["--setup", "raft", "--workers", "2"]).faults
    sets = chaos.node_sets("raft", "n0", "http://127.0.0.1:1", "warning", 1, raft={
        "bind": "127.0.0.1:7", "peers": ["127.0.0.1:7", "127.0.0.1:8", "127.0.0.1:9"],
        "write_policy": "reject", "distribution": "replicate", "compaction": 50})  # fmt: skip
    assert "cluster.raft.write_policy=reject" in sets and "cluster.raft.compaction_entries=50" in sets
    queue = next(s for s in sets if s.startswith("queues="))
    assert '"mode": "sync"' in queue and '"replication_factor": 3' in queue


def test_a_raft_producer_follows_the_leader_named_by_a_refusal() -> None:
    """write_policy reject: 0x83 with a ``leader`` property sends the message there; without one
    (between an election and the claim) to the next node; any other refusal is a refusal."""
    from fluxmq._core import codec as c

    producer = chaos.RaftProducer("p", [11, 12, 13], threading.Event(), 1.0, follow=True)
    named = c.Puback(1, 0x83, {c.USER_PROPERTY: [("leader", "127.0.0.1:13")]})
    assert producer.redirect(named) and producer.port == 13
    assert producer.redirect(c.Puback(1, 0x83, {})) and producer.port == 11
    assert not producer.redirect(c.Puback(1, 0x97, {})) and producer.port == 11
    assert producer.moves == {"to-leader": 1, "no-leader-named": 1}
    producer.connect_failed()
    assert producer.port == 12
    assert not chaos.RaftProducer("q", [11, 12], threading.Event(), 1.0, follow=False).redirect(named)


def test_a_delivery_after_a_confirmed_ack_is_a_finding_unless_the_acking_node_was_faulted() -> None:
    """docs/replication.rst, Durability: an ``$ack`` whose PUBACK said success is never followed by
    another delivery of that record; the exception is the acking consumer's node going silent (its
    members dropped, what they held delivered to others while the ack was in flight)."""
    stop = threading.Event()
    acker = chaos.AckConsumer("queue-c3", 1, stop)
    acker.home = "n1"
    other = chaos.Subscriber("queue-c1", 1, stop, "$queue/chaos", 1)
    other.arrivals, other.offsets = [(b"x", 12.0), (b"y", 31.0)], ["5", "6"]
    acker.arrivals, acker.offsets = [(b"x", 9.0), (b"y", 29.0)], ["5", "6"]
    acker.confirmed = [("5", 9.1, 10.0), ("6", 29.1, 30.0)]
    state = {"commit_index": 9, "applied": 9, "queues": {"chaos": {"next": 7, "groups": {"g": 7}}}}
    faults = [chaos.Fault(28.0, "stop-cont", "n1", restored=31.5)]
    out, lines, bad = chaos.check_raft([state] * 3, True, True, [other, acker], None, faults)
    assert bad == 1 and out["delivered_after_confirmed_ack"] == 1, lines
    assert out["delivered_after_confirmed_ack_explained"] == 1
    assert [line.split(":")[0] for line in lines] == [
        "ACKED AGAIN",
        "acked again in a documented window (the acking node faulted)",
    ]
    out, lines, bad = chaos.check_raft([state] * 3, False, False, [other], None, [])
    assert bad == 2 and lines[0].startswith("RAFT REPLICAS DIFFER") and lines[1].startswith("RAFT UNSETTLED")


def test_a_raft_run_without_faults_loses_nothing_and_the_replicas_agree(capsys) -> None:
    args = ["--setup", "raft", "--rounds", "0", "--run-for", "2", "--min-gap", "0.5", "--quiet", "1"]
    assert chaos.main([*args, "--rate", "20", "--seed", "9"]) == 0
    out = capsys.readouterr().out
    assert "summary: OK (setup raft, seed 9, 0 faults)" in out
    assert '"agree": true' in out and '"settled": true' in out and '"lost": 0' in out


def test_a_lag_restart_that_killed_the_publishers_node_is_its_node_kill() -> None:
    """setup raft: ``lag-restart`` kills -9 its node (``killed`` set) or stops it; the kill is the
    node kill's window (docs/cluster.rst, "What the PUBACK means across nodes"), the stop not."""
    sub, pub = sub_pub("n2", 0.0)
    sub.ev.session_lost, sub.granted = [], [0.5]
    lag = chaos.Fault(25.0, "lag-restart", "n2", restored=43.0, killed=25.01)
    assert chaos.lost_window(sub, pub, 1, 24.9, [lag]) == "publisher-node-killed"
    lag.killed = 0.0  # stopped (SIGSTOP), not killed: it loses nothing
    assert chaos.lost_window(sub, pub, 1, 24.9, [lag]) == chaos.UNEXPLAINED
