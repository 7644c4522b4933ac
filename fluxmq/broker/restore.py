"""Rebuilding the broker from what the storage loaded at start (``Broker`` mixin)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from fluxmq._core.trie import parse_shared
from fluxmq.storage.base import StoredState

from .message import Message
from .prefixes import BRIDGE_SESSION_PREFIX
from .session import EXPIRY_NEVER, Inflight, PersistentSession, Subscription, Will

log = logging.getLogger("fluxmq.broker")


class StoreRestore:
    """``Broker.restore``."""

    def restore(
        self, state: StoredState, pause: Callable[[], None] | None = None, slice_size: int = 2000
    ) -> None:
        """Rebuild what the storage loaded at start, before any client connects.

        ``pause`` is called after every ``slice_size`` sessions or retained messages (the node
        yields to the hub there, so a large store does not stall it).

        Sessions expire by wall-clock time across the downtime (a session online at the crash counts
        as disconnected when the node was last known alive); wills whose delay elapsed meanwhile,
        or whose session expired, are published once everything else is restored; the others are
        re-armed. Retained messages are served at once.
        """
        store = self._store
        if store is None:
            return
        self.restored_peer_batches = dict(state.peer_batches)
        now = time.time()
        n = 0
        for fields in state.retained:
            n += 1
            if pause is not None and n % slice_size == 0:
                pause()
            message = Message(*fields)
            if message.expired():
                store.delete_retained(message.topic)
                continue
            self.retained.restore(message)
        due: list[tuple[str, Will]] = []
        for rec in state.sessions.values():
            n += 1
            if pause is not None and n % slice_size == 0:
                pause()
            cid = rec.client_id
            gone_at = rec.disconnected_at or state.last_alive or now
            elapsed = max(0.0, now - gone_at)
            will = None
            if rec.will is not None:
                fields, delay = rec.will
                will = Will(Message(*fields), delay)
            # broker.max_session_expiry applies to sessions stored before it was set or lowered too
            # (a bridge's outbound store excepted: it lives as long as the bridge is configured).
            expiry = (
                rec.expiry_interval
                if cid.startswith(BRIDGE_SESSION_PREFIX)
                else self.capped_expiry(rec.expiry_interval)
            )
            if expiry == 0 or (expiry != EXPIRY_NEVER and elapsed >= expiry):
                if will is not None:
                    due.append((cid, will))  # the session ended during the downtime: its will goes now
                store.delete_session(cid, rec.queue.next)
                continue
            session = PersistentSession(cid, self.persistent_limits, self.stats, store, rec.queue)
            session.expiry_interval = expiry
            session.username = rec.username
            session.disconnected_at = gone_at
            if not rec.disconnected_at or expiry != rec.expiry_interval:  # online at the stop, or capped now
                store.put_session(cid, expiry, gone_at, rec.username)
            for filter, qos, no_local, rap, rh, sub_id in rec.subscriptions:
                shared = parse_shared(filter)
                sub = Subscription(
                    session, filter, qos, no_local, rap, rh, sub_id, shared[0] if shared else None
                )
                if self.router.add(sub):
                    self._interest_up(filter)
                session.subscriptions[filter] = sub
            for pid, (fields, qos, retain, ids, released) in rec.inflight.items():
                entry = Inflight(Message(*fields), qos, retain, ids)
                entry.released = released
                session.inflight[pid] = entry
            if session.inflight:
                session._next_pid = max(session.inflight) % 65535 + 1
            set.update(session.inbound_qos2, rec.inbound_qos2)
            if session.queue and self.auth is not None and self.auth.checks_reads:
                # Which entries another user queued before a resume is not stored: all are re-checked
                # against the owner's read rules as they leave the queue.
                session.recheck_reads(self.auth.session_can_read, queued_only=True)
            if will is not None:
                if elapsed >= will.delay:
                    due.append((cid, will))
                    store.delete_will(cid)
                else:
                    session.will = will
            self.sessions[cid] = session
            self._arm_timer_remaining(session, elapsed)
        if self.hold_restored_wills:
            self.restored_wills.extend(due)
        else:
            for cid, will in due:
                self._publish_will(will, cid)
        limit = self.settings.max_sessions
        if limit and len(self.sessions) > limit:
            # Stored sessions are kept (their messages were acknowledged); only new ids wait for room.
            log.warning("sessions_over_limit", extra={"sessions": len(self.sessions), "max_sessions": limit})
        log.info(
            "restored",
            extra={
                "sessions": len(self.sessions),
                "retained": len(self.retained),
                "wills_published": len(due),
            },
        )
