"""Shared-subscription hand-over: an offline member's unfinished QoS 1/2 messages go to other members
of its groups, a chunk per loop turn (``Broker`` mixin)."""

from __future__ import annotations

import logging

import gevent

from .message import Message
from .session import Session, Subscription

log = logging.getLogger("fluxmq.broker")

# Messages a shared-subscription hand-over looks at per loop turn: with LMDB about 20 us each (read,
# decode, route, deliver), so a turn of the hand-over holds the hub for a few milliseconds.
HAND_OVER_CHUNK = 256
# Between chunks the hand-over sleeps on a timer: sleep(0) would only queue a callback, and a
# greenlet re-queueing itself that way kept the loop from running its timers for 100 ms and more.
HAND_OVER_PAUSE = 0.001


class SharedHandOver:
    """One offline member's walk over its unfinished messages, handed to other members of its groups
    a chunk per loop turn (``Session.hand_over_steps``). ``largest_step`` and ``turns`` say how the
    work was split."""

    __slots__ = ("session", "steps", "ending", "stopped", "moved", "turns", "largest_step")

    def __init__(self, session: Session, steps, ending: bool = False) -> None:
        self.session = session
        self.steps = steps
        self.ending = ending  # the session ends once it is done (Broker._end_session)
        self.stopped = False
        self.moved = 0
        self.turns = 0
        self.largest_step = 0  # messages looked at in the largest turn


class SharedHandOvers:
    """The broker's shared-subscription hand-overs (``Broker.hand_overs``)."""

    def _hand_over_shared(self, session: Session, ending: bool, in_steps: bool = True) -> bool:
        """Give the QoS 1/2 messages an offline shared-subscription member got through its group, and
        has not finished, to other members of the group (MQTT 5.0 4.8.2).

        Unacknowledged QoS 1 and queued QoS 1/2 move; a QoS 2 PUBLISH already sent stays with the
        member [MQTT-4.8.2-4, -5], and so does a message it also got through a subscription of its
        own. While the session continues (``ending`` False) only online members with room in their
        queue take them (the rest stays); when it ends any other member does, queueing it if offline.

        Returns True when the hand-over is done; otherwise (``in_steps``, and more than
        ``hand_over_chunk`` messages to look at) it goes on a chunk per loop turn, and an ending
        session ends when it is done.
        """
        self._stop_hand_over(session)
        subs = session.subscriptions
        if not subs or not any(sub.share_group for sub in subs.values()):
            return True
        router = self.router

        def claim(message: Message) -> Subscription | None:
            if message.expires_at is not None and message.expired():
                return None
            route = router.route(message.topic)
            if any(target[0] is session for target in route.targets):
                return None
            for group in route.groups:
                if session.client_id in group.members:
                    member = router.pick_member(group, exclude=session, topic=message.topic)
                    if member is None:
                        continue
                    taker = member.session
                    if ending or (taker.delivery is not None and taker.queue_has_room()):
                        # A continuing session keeps what the taker would drop over its queue bound.
                        return member
            return None

        # An ending session's walk follows its queue's tail: a message queued to it meanwhile (a
        # group with every member offline may pick it) is handed over too.
        hand_over = SharedHandOver(session, session.hand_over_steps(claim, follow_tail=ending), ending)
        if self._hand_over_step(hand_over, self.hand_over_chunk if in_steps else 0):
            self._handed_over(hand_over)
            return True
        self.hand_overs[session] = hand_over
        gevent.spawn(self._hand_over_rest, hand_over)
        return False

    def _hand_over_step(self, hand_over: SharedHandOver, budget: int) -> bool:
        """Look at up to ``budget`` messages (0: all), delivering the claimed ones; True when done."""
        n = 0
        done = True
        for taken in hand_over.steps:
            n += 1
            if taken is not None:
                message, member = taken
                ids = (member.subscription_id,) if member.subscription_id else None
                member.session.deliver(
                    message, message.qos if message.qos < member.qos else member.qos, False, ids
                )
                hand_over.moved += 1
            if n == budget:
                done = False
                break
        hand_over.turns += 1
        if n > hand_over.largest_step:
            hand_over.largest_step = n
        return done

    def _hand_over_rest(self, hand_over: SharedHandOver) -> None:
        session = hand_over.session
        try:
            while True:
                gevent.sleep(
                    HAND_OVER_PAUSE
                )  # the rest of the loop turn (I/O, commits, timers) runs between chunks
                if hand_over.stopped:
                    return
                if self._hand_over_step(hand_over, self.hand_over_chunk):
                    del self.hand_overs[session]
                    self._handed_over(hand_over)
                    if hand_over.ending:
                        self._forget_session(session)
                    return
        finally:
            if self.hand_overs.get(session) is hand_over:
                del self.hand_overs[session]

    def _stop_hand_over(self, session: Session) -> None:
        """Stop a running hand-over (the session reconnects, ends or the node stops); what it has
        not looked at yet stays with the session."""
        hand_over = self.hand_overs.pop(session, None)
        if hand_over is not None:
            hand_over.stopped = True
            hand_over.steps.close()
            self._handed_over(hand_over)

    @staticmethod
    def _handed_over(hand_over: SharedHandOver) -> None:
        if hand_over.moved:
            log.info(
                "shared_handed_over",
                extra={
                    "client_id": hand_over.session.client_id,
                    "messages": hand_over.moved,
                    "turns": hand_over.turns,
                    "complete": not hand_over.stopped,
                },
            )
