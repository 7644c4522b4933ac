"""A persistent session that moves between the workers of a node, or between nodes, while messages
are published continuously, loses none of its QoS 1 messages and gets each QoS 2 message exactly
once (docs/cluster.rst, "Session takeover": the move's window and its markers; docs/reliability.rst).

The window: the old owner exports the session (its subscriptions leave its router and its interest
is withdrawn from the peers) before the new owner has imported it and its interest has reached the
peers. A message published meanwhile on either worker, or forwarded to the old owner before it knew,
found no subscriber anywhere. The test reconnects one persistent QoS 1 subscriber over and over (the
kernel spreads the connections over the two workers, so its session moves about every other time)
while a publisher sends numbered messages one after the other; every number must arrive
(duplicates are allowed at QoS 1, gaps are not; at QoS 2 every number arrives exactly once: the
subscriber is one paho client reconnected, whose state of the QoS 2 messages not yet released goes
on, so a second copy is a second PUBLISH exchange of the broker's).

The shared variants subscribe ``$share/g/{topic}`` instead, the group's only member: a peer gives
each group message to one node, so the old owner's stand-in holds the session's share until every
peer applied its withdrawal of the group (docs/cluster.rst, "A shared subscription of the moving
session"); on main 32 of 6,354 QoS 1 numbers were lost over 20 moves between workers and 6,625 of
17,365 over 30 between nodes.
"""

from __future__ import annotations

import collections
import queue
import re
import threading
import time
import uuid

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.conftest import NodeFactory
from tests.e2e.mqtt5raw import Paho5, paho5, unique
from tests.e2e.test_cluster_etcd import Cluster
from tests.e2e.test_workers import start

pytestmark = pytest.mark.e2e

ROUNDS = 30  # reconnects of the subscriber (about half of them move its session)
HOLD = 0.15  # seconds each connection of the subscriber stays
MAX_MESSAGES = 20000  # the publisher's bound
DRAIN = 15.0  # seconds the last connection waits for the missing numbers


def _session_props() -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 300
    return props


class Counter:
    """A publisher thread sending ``0, 1, 2, ...`` at ``qos``, each acknowledged before the next."""

    def __init__(self, node, topic: str, qos: int = 1) -> None:
        self.client = paho5(node, unique("pub"))
        self.topic = topic
        self.qos = qos
        self.sent = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set() and self.sent < MAX_MESSAGES:
                self.client.publish(self.topic, str(self.sent).encode(), self.qos)
                self.sent += 1
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self) -> int:
        self.stop.set()
        self.thread.join(30)
        self.client.disconnect()
        assert self.error is None, self.error
        return self.sent


def _collect(client: Paho5, got: list[int], topic: str, seconds: float) -> None:
    """Add the numbers ``client`` received within ``seconds`` (0: those it holds now) to ``got``."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        try:
            msg = client.messages.get(timeout=left) if left > 0 else client.messages.get_nowait()
        except queue.Empty:
            return
        if msg.topic == topic:
            got.append(int(msg.payload))


UNAVAILABLE_RETRIES = 5  # CONNACKs 0x88 in a row a resume may meet (a claim timed out: a loaded host)


def _resume(sub: Paho5, node, props: Properties, back=None) -> tuple:
    """Reconnect ``sub`` to ``node``, again after a CONNACK 0x88 (Server unavailable: the claim of
    the session could not be made in time, as on a loaded host), as a client does (docs/cluster.rst:
    the client retries; the state the old owner handed over is kept for that retry, so the session
    must still be present). ``back``: the retries go to that node instead (the old owner: a client
    with a list of servers). Returns (reason code, session present, refusals) of the last CONNACK."""
    refusals = 0
    for _ in range(UNAVAILABLE_RETRIES):
        rc, present, _ = sub.reconnect(node, props)
        if rc.value != 0x88:
            break
        refusals += 1
        print(f"resume refused with {rc}: retrying{' on the old node' if back is not None else ''}")
        node = back if back is not None else node
        time.sleep(0.5)
    return rc, present, refusals


def run_moves(
    subscriber_node, publisher_node, moves_in, qos: int = 1, shared: bool = False, back: bool = False
) -> tuple[int, int, list[int], list[int], int]:
    """A persistent subscriber at ``qos`` reconnecting ``ROUNDS`` times (to
    ``subscriber_node(round)``) while a publisher on ``publisher_node`` counts at ``qos``; returns
    (sent, moves, missing numbers, numbers received more than once, resumes on the old node), the
    moves counted in the log texts ``moves_in()`` returns. ``shared``: the subscription is
    ``$share/g/{topic}``, the subscriber the group's only member. ``back``: every other round
    refused with 0x88 retries on the node the session came from (``subscriber_node(round - 1)``)."""
    cid = unique("mover")
    topic = unique("move/count")
    props = _session_props()
    sub = paho5(subscriber_node(-1), cid, props, clean_start=True)
    assert sub.subscribe(f"$share/g/{topic}" if shared else topic, qos)[0].value == qos
    got: list[int] = []
    refused = backs = 0
    publisher = Counter(publisher_node, topic, qos)
    try:
        for round_ in range(ROUNDS):
            _collect(sub, got, topic, HOLD)
            sub.disconnect()
            _collect(sub, got, topic, 0)  # what arrived before the DISCONNECT went
            old = subscriber_node(round_ - 1) if back and refused % 2 == 0 else None
            rc, present, refusals = _resume(sub, subscriber_node(round_), props, old)
            assert not rc.is_failure and present, f"round {round_}: {rc}, present={present}"
            refused += refusals
            backs += bool(refusals and old is not None)
    finally:
        sent = publisher.finish()
    deadline = time.monotonic() + DRAIN
    while len(set(got)) < sent and time.monotonic() < deadline:
        _collect(sub, got, topic, 0.5)
    _collect(sub, got, topic, 0.5)  # a late second copy
    sub.disconnect()
    texts = moves_in()
    moves = sum(len(re.findall(rf"session_imported.*{re.escape(cid)}", text)) for text in texts)
    twice = sorted(n for n, k in collections.Counter(got).items() if k > 1)
    missing = sorted(set(range(sent)) - set(got))
    print(
        f"moves: qos {qos}, shared {shared}, sent {sent}, moves {moves}, lost {len(missing)}, "
        f"twice {len(twice)}, refused {refused}, resumed on the old node {backs}"
    )
    if missing:
        _explain(texts, cid, got, missing)
    return sent, moves, missing, twice, backs


#: the log events of a move (the subscribing nodes'), printed when numbers are lost
MOVE_EVENTS = re.compile(
    r"session_(imported|exported|export_repeated)|moved_|takeover_|gate|connect_refused|peer_(removed|connected|added)"
)


def _explain(texts: list[str], cid: str, got: list[int], missing: list[int]) -> None:
    """Print what explains a loss: the runs of missing numbers, the last number received before each
    (the order in which the subscriber got them) and the move's log lines of each subscribing node,
    ``n`` of the node's log (``moves_in`` order)."""
    runs, start = [], missing[0]
    for a, b in zip(missing, missing[1:] + [None], strict=True):
        if b != a + 1:
            runs.append((start, a))
            start = b
    print(f"lost runs (first, last): {runs[:20]}; received: {len(got)}, last 10 {got[-10:]}")
    for n, text in enumerate(texts):
        lines = [line for line in text.splitlines() if cid in line or MOVE_EVENTS.search(line)]
        print(f"-- node {n}: {len(lines)} move lines, the last 150:")
        print("\n".join(line[:300] for line in lines[-150:]))


@pytest.mark.parametrize("shared", [False, True], ids=["own", "shared"])
@pytest.mark.parametrize("qos", [1, 2])
def test_a_session_moving_between_workers_loses_no_message_and_doubles_no_qos2_one(
    tmp_path, qos: int, shared: bool
) -> None:
    """Two workers of one node: the kernel places each connection, so about every other reconnect
    moves the session; the publisher is on either worker (the old owner or the new one). Shared:
    the session is a ``$share`` group's only member (its old worker's stand-in holds its share)."""
    factory = NodeFactory(tmp_path)
    try:
        node = start(factory)
        sent, moves, missing, twice, _ = run_moves(
            lambda _round: node, node, lambda: [node.log_text()], qos, shared
        )
        assert moves >= 2, f"the session moved {moves} times in {ROUNDS} reconnects"
        assert not missing, f"{len(missing)} of {sent} lost over {moves} moves: {missing[:20]}"
        if qos == 2:
            assert not twice, f"{len(twice)} of {sent} received twice over {moves} moves: {twice[:20]}"
    finally:
        factory.close()


@pytest.mark.parametrize("shared", [False, True], ids=["own", "shared"])
@pytest.mark.parametrize("qos", [1, 2])
def test_a_session_moving_between_nodes_loses_no_message_and_doubles_no_qos2_one(
    etcd_server, tmp_path, qos: int, shared: bool
) -> None:
    """Three nodes on etcd: the subscriber alternates between e1 and e2 (every reconnect moves its
    session), the publisher is on e3 (a third party: its messages reach the moving session through
    the interest e3 holds of e1 and e2). Shared: the session is a ``$share`` group's only member,
    e3 picks one node among the group's holders for each message."""
    _moves_between_nodes(etcd_server, tmp_path, qos, shared)


@pytest.mark.parametrize("shared", [False, True], ids=["own", "shared"])
@pytest.mark.parametrize("qos", [1, 2])
def test_a_session_whose_claims_are_refused_after_the_handover_loses_no_message(
    etcd_server, tmp_path, monkeypatch, qos: int, shared: bool
) -> None:
    """As above, with every third takeover reply e1 and e2 get dropped on the way back (TEST-ONLY
    ``FLUXMQTEST_LOSE_TAKEOVER_REPLY_EVERY``: a call that timed out on a loaded host): the old node
    exported the session, the claim fails (CONNACK 0x88) and the client retries on the same node,
    which asks the old node again. What the old node's stand-in forwarded in between reaches the
    session, and its stand-in counts the retried move's markers (none of the failed one's come):
    on main a CI run lost 3,805 of 20,000 over 30 moves after two such refusals; here, on main,
    5,361 of 20,000 (own) and 5,231 of 20,000 (shared) in runs of a few hundred to 2,400.

    Every other refused client retries on the old node instead, which takes the session back from
    the node whose claim failed (it holds no state): the session resumes from the old node's copy
    of its export with what its stand-in forwarded in between (before: a new session, present=0)."""
    from fluxmq.cluster.node import LOSE_TAKEOVER_REPLY_ENV

    monkeypatch.setenv(LOSE_TAKEOVER_REPLY_ENV, "3")
    backs, _ = _moves_between_nodes(etcd_server, tmp_path, qos, shared, back=True)
    assert backs >= 1, "no refused client retried on the old node"


@pytest.mark.parametrize("qos", [1, 2])
def test_a_session_whose_take_back_answers_are_lost_loses_no_message(
    etcd_server, tmp_path, monkeypatch, qos: int
) -> None:
    """As above, and every other answer to a take-back that carries what the stand-in forwarded
    to the node whose claim failed is lost too (TEST-ONLY ``FLUXMQTEST_LOSE_TAKE_BACK_ANSWER_EVERY``):
    the old node's next claim asks that node again and gets them, once."""
    from fluxmq.cluster.node import LOSE_TAKE_BACK_ANSWER_ENV, LOSE_TAKEOVER_REPLY_ENV

    monkeypatch.setenv(LOSE_TAKEOVER_REPLY_ENV, "3")
    monkeypatch.setenv(LOSE_TAKE_BACK_ANSWER_ENV, "2")
    backs, texts = _moves_between_nodes(etcd_server, tmp_path, qos, False, back=True)
    lost = sum(text.count("take_back_answer_dropped") for text in texts)
    print(f"take-back answers lost: {lost}")
    assert backs >= 1, "no refused client retried on the old node"


def _moves_between_nodes(
    etcd_server, tmp_path, qos: int, shared: bool, back: bool = False
) -> tuple[int, list[str]]:
    factory = NodeFactory(tmp_path / "nodes")
    (tmp_path / "nodes").mkdir()
    cl = Cluster(factory, tmp_path, etcd_server.endpoint, f"/t-{uuid.uuid4().hex[:8]}/", ["e1", "e2", "e3"])
    try:
        cl.start_all(2)
        e1, e2, e3 = cl.nodes["e1"], cl.nodes["e2"], cl.nodes["e3"]
        sent, moves, missing, twice, backs = run_moves(
            lambda round_: e1 if round_ % 2 else e2,
            e3,
            lambda: [e1.log_text(), e2.log_text()],
            qos,
            shared,
            back,
        )
        # (a resume on the old node takes the session back there: the next round may find it in
        # place, or the one after, after another refusal)
        assert moves >= ROUNDS - 2 * backs, f"the session moved {moves} times in {ROUNDS} reconnects"
        assert not missing, f"{len(missing)} of {sent} lost over {moves} moves: {missing[:20]}"
        if qos == 2:
            assert not twice, f"{len(twice)} of {sent} received twice over {moves} moves: {twice[:20]}"
        return backs, [e1.log_text(), e2.log_text()]
    finally:
        factory.close()
