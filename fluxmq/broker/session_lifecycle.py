"""Broker sessions from connect to end: open (and local takeover), attach, close, the will-delay and
expiry timers, and the wills they publish (``Broker`` mixin)."""

from __future__ import annotations

import logging
import time

import gevent

from fluxmq.errors import FieldOutOfRange, NotAuthorized, QuotaExceeded

from .delivery import Delivery
from .message import MESSAGE_EXPIRY_INTERVAL, Message, check_interval, check_message
from .session import EXPIRY_NEVER, PersistentSession, Session, SessionLimits, Will

log = logging.getLogger("fluxmq.broker")


class SessionLifecycle:
    """Opening, attaching, closing and ending sessions, their timers and their wills."""

    # -- sessions --------------------------------------------------------------------------------

    def open_session(
        self,
        client_id: str,
        clean_start: bool,
        expiry_interval: int,
        will: Will | None = None,
        username: str | None = None,
        limits: SessionLimits | None = None,
        capped: bool = True,
    ) -> tuple[Session, bool]:
        """Find or create the session of ``client_id`` for a new connection; returns (session, present).

        An existing connection with the same client id is closed first (takeover, 5.0 reason 0x8E)
        [MQTT-3.1.4-3]. Call ``attach`` once the CONNACK is written. ``expiry_interval`` is capped by
        ``broker.max_session_expiry``: the session's ``expiry_interval`` holds the value in use.
        Raises QuotaExceeded for a new client id while the node holds ``broker.max_sessions``
        sessions; a client id that has a session may always reconnect or take over. Raises NotAuthorized,
        changing nothing, when the client id belongs to another user (``auth.bind_client_id_to_username``).
        ``limits`` replaces the node-wide queue bounds for this session (a bridge's outbound store
        is bounded by its own ``max_queued_messages``); ``capped=False`` exempts it from
        ``broker.max_session_expiry`` (a bridge's store lives as long as the bridge is configured).

        With peers installed (a cluster) this node first becomes the only owner of ``client_id``
        (``Peers.claim_session``, which may block this greenlet): a session another node held is
        handed over and resumed here (discarded under ``clean_start``, the other connection closed
        either way). Raises ServerUnavailable (0x88) when ownership cannot be established, and
        FieldOutOfRange, changing nothing, for an expiry, will delay or will message MQTT cannot
        carry.
        """
        check_interval("session expiry interval", expiry_interval)
        if will is not None:
            check_interval("will delay interval", will.delay)
            check_message(will.message, will=True)
        peers = self.peers
        if peers is not None:
            self._claim_session(peers, client_id, clean_start)
        session = self.sessions.get(client_id)
        # A session whose end waits for its shared hand-over has ended for its client already.
        hand_over = self.hand_overs.get(session) if session is not None else None
        ending = hand_over is not None and hand_over.ending
        limit = self.settings.max_sessions
        if session is None and limit and len(self.sessions) >= limit:
            log.warning(
                "session_refused",
                extra={
                    "client_id": client_id,
                    "sessions": len(self.sessions),
                    "reason": "broker.max_sessions",
                },
            )
            raise QuotaExceeded(f"session limit reached (broker.max_sessions {limit})")
        if capped:
            expiry_interval = self.capped_expiry(expiry_interval)
        if session is not None:
            auth = self.auth
            # An ending session (its hand-over still running) has no owner left to protect.
            if not ending and auth is not None and not auth.may_take_over(session.username, username):
                raise NotAuthorized("client identifier in use by another user")
            self._stop_hand_over(session)  # back online: what was not handed over yet stays with it
            # A session with expiry 0 (3.x clean session) ends with its network connection, so a
            # takeover does not resume it [MQTT-3.1.2-6].
            ended = clean_start or session.expiry_interval == 0 or ending
            old = self._unplug(session)
            if old is not None:
                old_will = session.will
                session.will = None
                old.close(0x8E, "session taken over")
                events = self.events
                if events is not None:
                    events.session_takeover(client_id, username, session.username, not ended)
                # The old connection's will goes only when its session ends here (MQTT 5.0 3.1.2.5).
                # A resumed session counts as reconnected before the will delay passed, whatever the
                # delay, so it cancels the will [MQTT-3.1.3-9], as Mosquitto does: a half-open
                # reconnect gives no spurious "offline" message.
                if old_will is not None and ended:
                    self._publish_will(old_will, client_id)
            else:
                # A reconnect within the will delay cancels the pending will.
                session.will = None
            self._cancel_timer(session)
            if ended:
                self._end_session(session)
                session = None
        present = session is not None
        if session is None:
            if self._store is not None and expiry_interval > 0:
                session = PersistentSession(
                    client_id, limits or self.persistent_limits, self.stats, self._store
                )
            else:
                session = Session(client_id, limits or self.limits, self.stats)
            self.sessions[client_id] = session
        elif limits is not None:
            session.limits = limits
        session.expiry_interval = expiry_interval
        session.persistent = expiry_interval > 0
        session.will = will
        auth = self.auth
        if auth is not None and present and session.username != username:
            # Resumed by another user: its cached routes, in-flight and queued messages were filtered
            # by the previous user's read rules.
            if session.subscriptions:
                self.router.invalidate()
            session.username = username
            if auth.checks_reads:
                session.recheck_reads(auth.session_can_read)
        session.username = username
        shared_wills = self.shared_wills
        if shared_wills is not None:
            shared_wills.will_set(
                client_id, will.message if will is not None else None, will.delay if will is not None else 0
            )
        if isinstance(session, PersistentSession):
            store = session.store
            store.put_session(client_id, expiry_interval, 0.0, username)
            # Stored at connect, so a crash publishes it at restart like any unclean close.
            if will is not None:
                store.put_will(client_id, will.message, will.delay)
            else:
                store.delete_will(client_id)
        return session, present

    def capped_expiry(self, expiry_interval: int) -> int:
        """``expiry_interval`` (seconds; EXPIRY_NEVER for a 3.1.1 persistent session) under the
        ``broker.max_session_expiry`` cap; 0 (the session ends with its connection) stays 0."""
        cap = self.settings.max_session_expiry
        return cap if cap and expiry_interval > cap else expiry_interval

    def attach(self, session: Session, delivery: Delivery, send_quota: int) -> bool:
        """Bind the connection to its session; resends in-flight messages and drains the queue.

        False, with ``delivery`` closed as taken over (5.0 DISCONNECT 0x8E), when the session is no
        longer this node's: between ``open_session`` and here (a cluster's shared will written to
        etcd yields) another node's CONNECT of the same client id took it (``export_session``
        found it with no connection to close). Attached anyway, the two connections would both
        live, this one on a session that left the node."""
        if self.sessions.get(session.client_id) is not session:
            log.info(
                "session_taken_before_attach",
                extra={"client_id": session.client_id, "effect": "connection closed as taken over"},
            )
            delivery.close(0x8E, "session taken over")
            return False
        self.connected += 1
        self.stats.connections_total += 1
        session.connected_since = time.time()
        session.attach(delivery, send_quota or self.settings.max_inflight)
        if self.queues is not None and self.queues.resumable:
            self.queues.session_attached(session)
        return True

    def _unplug(self, session: Session) -> Delivery | None:
        """Take ``session`` off its connection, if it has one (counted, and its durable-queue
        deliveries handed to other members); returns that connection."""
        old = session.delivery
        if old is not None:
            session.detach()
            self.connected -= 1
            if self.queues is not None:
                self.queues.session_gone(session)
        return old

    def close_session(self, session: Session, delivery: Delivery, publish_will: bool) -> None:
        """The connection of ``session`` ended (``publish_will`` False after a normal DISCONNECT)."""
        if session.delivery is not delivery:
            return  # taken over: the new connection owns the session now
        self._unplug(session)  # its queue deliveries go to other members
        session.disconnected_at = time.time()
        will = session.will if publish_will else None
        if will is None and session.will is not None and self.shared_wills is not None:
            self.shared_wills.will_set(session.client_id, None, 0)  # a normal DISCONNECT discards it
        session.will = None
        if session.expiry_interval == 0:
            if will is not None:
                self._publish_will(will, session.client_id)
            self._end_session(session, wait_hand_over=True)
            return
        self._hand_over_shared(session, ending=False)
        if will is not None:
            if will.delay == 0:
                self._publish_will(will, session.client_id)
            else:
                session.will = will
        if isinstance(session, PersistentSession):
            session.store.put_session(
                session.client_id, session.expiry_interval, session.disconnected_at, session.username
            )
            if session.will is None:
                session.store.delete_will(session.client_id)
        self._arm_timer(session)

    def _arm_timer(self, session: Session) -> None:
        """One timer per offline session: the pending will's delay or the session's expiry, whichever is first."""
        delays = []
        if session.will is not None:
            delays.append(session.will.delay)
        if session.expiry_interval != EXPIRY_NEVER:
            delays.append(session.expiry_interval)
        if delays:
            session.timer = gevent.spawn_later(min(delays), self._on_timer, session)

    def _on_timer(self, session: Session) -> None:
        session.timer = None
        if session.delivery is not None or self.sessions.get(session.client_id) is not session:
            return
        elapsed = time.time() - session.disconnected_at
        if session.will is not None and elapsed + 0.05 >= session.will.delay:
            will, session.will = session.will, None
            if isinstance(session, PersistentSession):
                session.store.delete_will(session.client_id)
            self._publish_will(will, session.client_id)
        if session.expiry_interval != EXPIRY_NEVER and elapsed + 0.05 >= session.expiry_interval:
            if session.will is not None:  # the session ends before the will delay: publish it now
                will, session.will = session.will, None
                self._publish_will(will, session.client_id)
            self._end_session(session, wait_hand_over=True)
            return
        self._arm_timer_remaining(session, elapsed)

    def _arm_timer_remaining(self, session: Session, elapsed: float) -> None:
        delays = []
        if session.will is not None:
            delays.append(session.will.delay - elapsed)
        if session.expiry_interval != EXPIRY_NEVER:
            delays.append(session.expiry_interval - elapsed)
        if delays:
            session.timer = gevent.spawn_later(max(0.0, min(delays)), self._on_timer, session)

    @staticmethod
    def _cancel_timer(session: Session) -> None:
        if session.timer is not None:
            session.timer.kill(block=False)
            session.timer = None

    def _end_session(self, session: Session, wait_hand_over: bool = False) -> None:
        """Drop a session: its subscriptions leave the router and its state is forgotten.

        Its unfinished shared-subscription messages go to other members first. With
        ``wait_hand_over`` (nobody needs the client id now: expiry, Session Expiry 0) a long
        hand-over runs a chunk per loop turn and the session ends when it is done; meanwhile it is
        recorded as ended, so a crash does not bring it back and a reconnect does not resume it.
        """
        self._cancel_timer(session)
        if not self._hand_over_shared(session, ending=True, in_steps=wait_hand_over):
            if isinstance(session, PersistentSession):
                # Recorded as ending (expiry 0, will already published or discarded by the caller):
                # after a crash the restore deletes it instead of resuming it.
                store = session.store
                store.put_session(
                    session.client_id, 0, session.disconnected_at or time.time(), session.username
                )
                store.delete_will(session.client_id)
            return  # _hand_over_rest ends it
        self._forget_session(session)

    def _forget_session(self, session: Session, release: bool = True) -> None:
        """The end of ``_end_session``: out of the router, the store and the session table; with
        peers installed the client id's ownership is released too (not when the session moved to
        another node, ``release`` False, nor while a connection here is claiming it)."""
        if self.queues is not None:
            self.queues.session_ended(session.client_id)  # its queue memberships end too (stored ones)
        for filter in list(session.subscriptions):
            self.router.remove(filter, session)
            self._interest_down(filter)
        session.subscriptions.clear()
        session.clear_state()
        if isinstance(session, PersistentSession):
            session.store.delete_session(session.client_id, session.queue.next)
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
            self._moved_in.pop(session.client_id, None)  # a new session of this id takes nothing moved
            self._gates.pop(session.client_id, None)
            if self.auth is not None:
                self.auth.forget(session.client_id)
            peers = self.peers
            if peers is not None and release:
                if session.client_id not in self._claiming:
                    self._release(peers, session.client_id)
                else:  # decided when the claim closes (_claimed): a new session may follow
                    self._ended_while_claiming.add(session.client_id)

    # -- wills -----------------------------------------------------------------------------------

    def publish_restored_wills(self) -> int:
        """Publish the wills the restore held back (``hold_restored_wills``); returns how many went
        (with shared wills installed, only those still this node's to publish)."""
        due, self.restored_wills = self.restored_wills, []
        self.hold_restored_wills = False
        return sum(1 for cid, will in due if self._publish_will(will, cid))

    def _publish_will(self, will: Will, client_id: str | None = None) -> bool:
        """Publish ``will`` of ``client_id``'s session. With shared wills installed (a cluster) it
        is claimed first: False, nothing published, when another node published it already (this
        node was taken for dead) or it changed hands. ``client_id`` None: publish unconditionally
        (a will handed over with a session that ends on arrival; the sender dropped its record)."""
        shared_wills = self.shared_wills
        if client_id is not None and shared_wills is not None and not shared_wills.will_claim(client_id):
            log.info(
                "will_not_published", extra={"client_id": client_id, "reason": "not this node's any more"}
            )
            return False
        self.publish_will_message(will.message)
        return True

    def publish_will_message(self, message: Message) -> None:
        """Publish a will's message now (its Message Expiry Interval starts now)."""
        will_topic = message.topic
        props = message.properties
        if props and MESSAGE_EXPIRY_INTERVAL in props:
            # The protocol layer keeps a will's Message Expiry Interval in its properties: the
            # lifetime starts now, when it is published.
            props = dict(props)
            interval = props.pop(MESSAGE_EXPIRY_INTERVAL)
            message = message.copy(properties=props or None, expires_at=time.monotonic() + interval)
        try:
            self.publish(message)
        except QuotaExceeded:
            log.warning("will_refused", extra={"topic": will_topic, "reason": "storage full"})
        except FieldOutOfRange as exc:  # (a will stored by an older version: checked at connect now)
            log.warning("will_refused", extra={"topic": will_topic, "reason": str(exc)})
