"""AuthService: who may connect, what each client may do, and how much; ClientPolicy per connection.

The broker holds one ``AuthService`` (``broker.auth``) built from plain ``AuthSettings`` (the node
maps the ``auth.*`` and ``limits.*`` config keys onto them). Front ends use it the same way:

- ``authenticate(client_id, username, password, peer)`` at CONNECT (or an HTTP request) ->
  ``AuthResult`` with the MQTT 5.0 reason code and 3.1.1 return code of a refusal;
- ``policy(client_id, username, peer)`` -> the connection's ``ClientPolicy`` (None when nothing
  per-client is configured, so such a broker's PUBLISH path pays one ``is None`` test; the default
  ``limits.max_topic_levels`` alone costs one dict lookup per PUBLISH, see ``ClientPolicy.fast``);
  ``check_publish``/``check_subscribe`` return 0 or the 5.0 reason code of the refusal;
- ``may_take_over(owner, username)``: may a client take over a session another user holds
  (``auth.bind_client_id_to_username``; the broker asks it in ``open_session``);
- ``can_read(client_id, username, topic)`` for deliveries and retained messages (the router
  filters each cached route through it, so a delivery costs nothing extra after a topic's first);
- ``connect_gate`` (a callable ``address -> bool``, or None) for the listeners' accept step.

Refusals and limit hits are logged at most once per client and kind per minute.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

from fluxmq._core.trie import validate_filter
from fluxmq.errors import MQTTError

from .acl import CACHE_MAX, AclFile, ClientAcl
from .http_callout import ALLOW, DENY, HTTPCallout
from .limits import (
    MESSAGE_RATE_TOO_HIGH,
    QUOTA_EXCEEDED,
    ConnectRateLimiter,
    LogGate,
    PublishLimits,
    TokenBucket,
)
from .password_file import PasswordFile

log = logging.getLogger("fluxmq.auth")

NOT_AUTHORIZED = 0x87
BAD_USER_NAME_OR_PASSWORD = 0x86
# 3.1.1 CONNACK return codes
RC_BAD_USER_NAME_OR_PASSWORD = 4
RC_NOT_AUTHORIZED = 5

# A PUBLISH decision is cached per topic only for topics up to this many characters, so a client
# cycling through long topics cannot pin CACHE_MAX of them (up to 64 KiB each) per connection; a
# longer topic is checked each time, at a cost that is small next to its length on the wire.
_CACHED_TOPIC_MAX = 256

# Hashes above this many iterations are checked in the hub's thread pool (PBKDF2 releases the GIL),
# so a file made with a high -I does not stall every other client during a connect storm.
_THREADPOOL_ITERATIONS = 2000


class AuthSettings:
    """The plain settings of an ``AuthService`` (no config objects: the node maps its keys)."""

    __slots__ = (
        "password_file",
        "acl_file",
        "allow_anonymous",
        "http_url",
        "http_timeout",
        "http_acl",
        "http_cache_ttl",
        "http_cache_negative_ttl",
        "http_cache_size",
        "connect_rate",
        "connect_burst",
        "limits",
        "bind_client_ids",
        "http_ca_file",
        "http_cert_file",
        "http_key_file",
    )

    def __init__(
        self,
        password_file: str = "",
        acl_file: str = "",
        allow_anonymous: bool | None = None,
        http_url: str = "",
        http_timeout: float = 2.0,
        http_acl: bool = False,
        http_cache_ttl: float = 60.0,
        http_cache_negative_ttl: float = 5.0,
        http_cache_size: int = 10000,
        connect_rate: float = 0.0,
        connect_burst: int = 0,
        limits: PublishLimits | None = None,
        bind_client_ids: bool | None = None,
        http_ca_file: str = "",
        http_cert_file: str = "",
        http_key_file: str = "",
    ) -> None:
        self.password_file = password_file
        self.acl_file = acl_file
        # None: allow anonymous clients only when no authentication source is configured.
        self.allow_anonymous = allow_anonymous
        # None: a client id belongs to its session's user when user names are verified (password
        # file or HTTP service); see AuthService.may_take_over.
        self.bind_client_ids = bind_client_ids
        self.http_url = http_url
        self.http_timeout = http_timeout
        self.http_acl = http_acl
        self.http_cache_ttl = http_cache_ttl
        self.http_cache_negative_ttl = http_cache_negative_ttl
        self.http_cache_size = http_cache_size
        self.http_ca_file = http_ca_file
        self.http_cert_file = http_cert_file
        self.http_key_file = http_key_file
        self.connect_rate = connect_rate
        self.connect_burst = connect_burst
        self.limits = limits or PublishLimits()

    @property
    def configured(self) -> bool:
        """False when these settings ask for nothing (the broker then runs without an AuthService)."""
        return bool(
            self.password_file
            or self.acl_file
            or self.http_url
            or self.allow_anonymous is False
            or self.connect_rate > 0
            or self.limits.active
        )


class AuthResult:
    """The outcome of an authentication: ``ok``, else the 5.0 reason code, 3.1.1 return code and why."""

    __slots__ = ("ok", "reason_code", "return_code", "reason")

    def __init__(self, ok: bool, reason_code: int = 0, return_code: int = 0, reason: str = "") -> None:
        self.ok = ok
        self.reason_code = reason_code
        self.return_code = return_code
        self.reason = reason

    def __repr__(self) -> str:
        return "AuthResult(ok)" if self.ok else f"AuthResult(0x{self.reason_code:02X}, {self.reason!r})"


ACCEPTED = AuthResult(True)


def _bad_credentials(reason: str = "bad user name or password") -> AuthResult:
    return AuthResult(False, BAD_USER_NAME_OR_PASSWORD, RC_BAD_USER_NAME_OR_PASSWORD, reason)


def _not_authorized(reason: str) -> AuthResult:
    return AuthResult(False, NOT_AUTHORIZED, RC_NOT_AUTHORIZED, reason)


class AuthService:
    """Authentication, ACLs and limits of one broker; ``ConfigError`` at construction for a bad file."""

    def __init__(self, settings: AuthSettings | None = None) -> None:
        self.settings = settings = settings or AuthSettings()
        self.passwords = PasswordFile.load(settings.password_file) if settings.password_file else None
        self.acl = AclFile.load(settings.acl_file) if settings.acl_file else None
        self.http = None
        if settings.http_url:
            self.http = HTTPCallout(
                settings.http_url,
                settings.http_timeout,
                settings.http_cache_ttl,
                settings.http_cache_negative_ttl,
                settings.http_cache_size,
                settings.http_acl,
                settings.http_ca_file,
                settings.http_cert_file,
                settings.http_key_file,
            )
        self.limits = settings.limits
        self.connect_limiter = (
            ConnectRateLimiter(
                settings.connect_rate, settings.connect_burst or max(1, int(settings.connect_rate))
            )
            if settings.connect_rate > 0
            else None
        )
        allow = settings.allow_anonymous
        self.allow_anonymous = (self.passwords is None and self.http is None) if allow is None else allow
        bind = settings.bind_client_ids
        self.binds_client_ids = (
            (self.passwords is not None or self.http is not None) if bind is None else bind
        )
        self.log_gate = LogGate(60.0)
        self.generation = 0  # bumps when the rules change (reload): policies pick up the new ACL
        self._policies: weakref.WeakSet[ClientPolicy] = weakref.WeakSet()  # live ones, refreshed on reload
        self.on_rules_changed: Callable[[], None] | None = None  # the broker drops its cached routes
        self._acls: dict[str, tuple[str | None, ClientAcl]] = {}
        self.counters = {
            "auth_failed": 0,
            "publish_denied": 0,
            "subscribe_denied": 0,
            "rate_limited": 0,
            "connect_rate_limited": 0,
            "quota_exceeded": 0,
        }

    # -- what is configured ------------------------------------------------------------------------

    @property
    def checks_reads(self) -> bool:
        """True when deliveries must be filtered per subscriber (an ACL file is configured)."""
        return self.acl is not None

    @property
    def reads_user_names(self) -> bool:
        """True when a user name can change an answer (a password file, an HTTP service, an ACL
        file, or anonymous clients refused); False with limits alone, which apply to everyone."""
        return (
            self.passwords is not None
            or self.http is not None
            or self.acl is not None
            or not self.allow_anonymous
        )

    @property
    def per_client(self) -> bool:
        """True when connections need a ClientPolicy (ACL, HTTP ACL or per-client limits)."""
        return self.acl is not None or (self.http is not None and self.http.acl) or self.limits.active

    @property
    def connect_gate(self) -> Callable[[str], bool] | None:
        """``address -> bool`` for the accept step (per-IP connection rate), or None when unlimited."""
        return self._gate if self.connect_limiter is not None else None

    def _gate(self, address: str) -> bool:
        if self.connect_limiter.allow(address):
            return True
        self.counters["connect_rate_limited"] += 1
        if self.log_gate.allow(("connect_rate", address)):
            log.warning("connect_rate_limited", extra={"peer": address, "rate": self.settings.connect_rate})
        return False

    # -- authentication ----------------------------------------------------------------------------

    def authenticate(
        self, client_id: str, username: str | None, password: bytes | None, peer: str
    ) -> AuthResult:
        """May this client connect? Logs a refusal with the peer address (never the password)."""
        result = self._authenticate(client_id, username, password, peer)
        if not result.ok:
            self.counters["auth_failed"] += 1
            log.info(
                "authentication_failed",
                extra={"peer": peer, "client_id": client_id, "user": username, "reason": result.reason},
            )
        return result

    def _authenticate(
        self, client_id: str, username: str | None, password: bytes | None, peer: str
    ) -> AuthResult:
        if username is None:
            if self.allow_anonymous:
                return ACCEPTED
            return _not_authorized("anonymous clients are not allowed")
        passwords = self.passwords
        if passwords is not None and (username in passwords or self.http is None):
            if self._verify(passwords, username, password):
                return ACCEPTED
            return _bad_credentials()
        if self.http is not None:
            decision = self.http.authenticate(client_id, username, password, peer)
            if decision == ALLOW:
                return ACCEPTED
            if decision == DENY:
                return _bad_credentials()
            return _not_authorized("authentication service unavailable")
        # No source that could check a password: a user name is an unverified label.
        if self.allow_anonymous:
            return ACCEPTED
        return _not_authorized("no authentication source is configured")

    @staticmethod
    def _verify(passwords: PasswordFile, username: str, password: bytes | None) -> bool:
        if passwords.iterations(username) > _THREADPOOL_ITERATIONS:
            import gevent

            return gevent.get_hub().threadpool.apply(passwords.verify, (username, password))
        return passwords.verify(username, password)

    # -- authorization -----------------------------------------------------------------------------

    def acl_for(self, client_id: str, username: str | None) -> ClientAcl | None:
        """The compiled ACL of a client (built once per client id and user name), or None."""
        acl_file = self.acl
        if acl_file is None:
            return None
        entry = self._acls.get(client_id)
        if entry is not None and entry[0] == username:
            return entry[1]
        compiled = acl_file.for_client(client_id, username)
        self._acls[client_id] = (username, compiled)
        return compiled

    def can_read(self, client_id: str, username: str | None, topic: str) -> bool:
        """May this client receive a message published to ``topic``? (True without an ACL file)"""
        acl = self.acl_for(client_id, username)
        return acl is None or acl.can_read(topic)

    def can_write(self, client_id: str, username: str | None, topic: str) -> bool:
        """May this client publish to ``topic``? (ACL file, then the HTTP callout when it decides ACLs)"""
        acl = self.acl_for(client_id, username)
        if acl is not None and not acl.can_write(topic):
            return False
        if self.http is not None and self.http.acl:
            return self.http.authorize(client_id, username, "publish", topic)
        return True

    def can_subscribe(self, client_id: str, username: str | None, filter: str) -> bool:
        acl = self.acl_for(client_id, username)
        if acl is not None and not acl.can_subscribe(filter):
            return False
        if self.http is not None and self.http.acl:
            return self.http.authorize(client_id, username, "subscribe", filter)
        return True

    def check_publish(self, client_id: str, username: str | None, topic: str) -> int:
        """0, or the 5.0 reason code refusing a publish from a front end without a connection
        (the HTTP bridge): 0x97 over the topic caps, 0x87 denied by the ACL or the HTTP service."""
        problem = self.limits.topic_problem(topic)
        if problem is not None:
            self.note("topic_cap", client_id, topic=topic[:200], reason=problem)
            return QUOTA_EXCEEDED
        if not self.can_write(client_id, username, topic):
            self.note("publish_denied", client_id, user=username, topic=topic)
            return NOT_AUTHORIZED
        return 0

    def check_subscribe(self, client_id: str, username: str | None, filter: str) -> int:
        """As ``check_publish``, for a subscription filter (0 for an invalid one: the broker refuses it)."""
        try:
            validate_filter(filter)
        except MQTTError:
            return 0
        problem = self.limits.topic_problem(filter)
        if problem is not None:
            self.note("topic_cap", client_id, filter=filter[:200], reason=problem)
            return QUOTA_EXCEEDED
        if not self.can_subscribe(client_id, username, filter):
            self.note("subscribe_denied", client_id, user=username, filter=filter)
            return NOT_AUTHORIZED
        return 0

    def may_take_over(self, owner: str | None, username: str | None) -> bool:
        """May a client with ``username`` take over (resume or replace) a session held by ``owner``?

        With client ids bound to user names (``auth.bind_client_id_to_username``) only the same user
        may; a session without an owner (created by an anonymous client) may be claimed by anyone,
        as any anonymous client could resume it. Unbound, anyone may.
        """
        return owner == username or owner is None or not self.binds_client_ids

    def session_can_read(self, session, topic: str) -> bool:
        """The router's read filter: ``session`` is a broker Session (client_id, username)."""
        return self.can_read(session.client_id, session.username, topic)

    def forget(self, client_id: str) -> None:
        """The session of ``client_id`` ended: drop its compiled ACL."""
        self._acls.pop(client_id, None)

    def policy(self, client_id: str, username: str | None, peer: str = "") -> ClientPolicy | None:
        """The per-connection checks, or None when nothing per client is configured."""
        if not self.per_client:
            return None
        return ClientPolicy(self, client_id, username, peer)

    def note(self, kind: str, client_id: str, **fields: object) -> None:
        """Count a refusal and log it at most once per client and kind per minute."""
        counter = "quota_exceeded" if kind == "topic_cap" or kind == "subscription_quota" else kind
        if counter in self.counters:
            self.counters[counter] += 1
        if self.log_gate.allow((kind, client_id)):
            fields["client_id"] = client_id
            log.info(kind, extra=fields)

    # -- reload ------------------------------------------------------------------------------------

    def reload_files(self) -> list[str]:
        """Read the password and ACL files again (SIGHUP, admin reload); a bad file raises ConfigError
        and changes nothing. Returns the config keys whose files were read."""
        s = self.settings
        passwords = PasswordFile.load(s.password_file) if s.password_file else None
        acl = AclFile.load(s.acl_file) if s.acl_file else None
        self.passwords = passwords
        self.acl = acl
        self._acls.clear()
        self.generation += 1
        for policy in list(self._policies):
            policy._refresh()  # clears its per-topic answers, which the protocol layer reads directly
        if self.http is not None:
            self.http.cache.clear()
        if self.on_rules_changed is not None:
            self.on_rules_changed()
        return [k for k, v in (("auth.password_file", s.password_file), ("auth.acl_file", s.acl_file)) if v]


class ClientPolicy:
    """What one connection may do: ACL decisions (cached per topic) and its own rate buckets."""

    __slots__ = (
        "service",
        "client_id",
        "username",
        "peer",
        "acl",
        "generation",
        "http_acl",
        "msg_bucket",
        "byte_bucket",
        "topic_caps",
        "max_subscriptions",
        "_topics",
        "fast",
        "__weakref__",
    )

    def __init__(self, service: AuthService, client_id: str, username: str | None, peer: str = "") -> None:
        self.service = service
        self.client_id = client_id
        self.username = username
        self.peer = peer
        self.acl = service.acl_for(client_id, username)
        self.generation = service.generation
        self.http_acl = service.http if service.http is not None and service.http.acl else None
        limits = service.limits
        self.msg_bucket = (
            TokenBucket(limits.publish_rate, limits.publish_burst) if limits.publish_rate else None
        )
        self.byte_bucket = (
            TokenBucket(limits.publish_bytes_rate, limits.publish_bytes_burst)
            if limits.publish_bytes_rate
            else None
        )
        self.topic_caps = limits if (limits.max_topic_levels or limits.max_topic_length) else None
        self.max_subscriptions = limits.max_subscriptions
        self._topics: dict[str, int] = {}  # topic -> 0 or the refusal of its caps and ACL file rules
        # The same dict when that is all a PUBLISH needs (no rate, no HTTP ACL): the protocol layer
        # then skips the call for a topic already allowed. The service clears it when rules change.
        self.fast = (
            self._topics
            if self.msg_bucket is None and self.byte_bucket is None and self.http_acl is None
            else None
        )
        if self.acl is not None or self.http_acl is not None:
            # A reload can change its answers. Without either (topic caps and rates only) nothing it
            # caches depends on the files, and every connection is spared the registration.
            service._policies.add(self)

    def _refresh(self) -> None:
        self.acl = self.service.acl_for(self.client_id, self.username)
        self.generation = self.service.generation
        self._topics.clear()

    def _topic_code(self, topic: str) -> int:
        """What the caps and the ACL file say about publishing to ``topic`` (cached per topic)."""
        caps = self.topic_caps
        if caps is not None and caps.topic_problem(topic) is not None:
            code = QUOTA_EXCEEDED
        elif self.acl is not None and not self.acl.can_write(topic):
            code = NOT_AUTHORIZED
        else:
            code = 0
        if len(topic) <= _CACHED_TOPIC_MAX:
            topics = self._topics
            if len(topics) >= CACHE_MAX:
                topics.clear()
            topics[topic] = code
        return code

    def check_publish(self, topic: str, size: int) -> int:
        """0 when the client may publish ``size`` payload bytes to ``topic`` now; else the 5.0 reason
        code: 0x97 (topic over the caps), 0x87 (ACL), 0x96 (over its message or byte rate)."""
        if self.generation != self.service.generation:
            self._refresh()
        code = self._topics.get(topic)  # one dict lookup per PUBLISH after a topic's first
        if code is None:
            code = self._topic_code(topic)
        if code:
            if code == QUOTA_EXCEEDED:
                self.service.note(
                    "topic_cap",
                    self.client_id,
                    peer=self.peer,
                    topic=topic[:200],
                    reason=self.topic_caps.topic_problem(topic),
                )
            else:
                self.service.note(
                    "publish_denied", self.client_id, peer=self.peer, user=self.username, topic=topic
                )
            return code
        bucket = self.msg_bucket
        if bucket is not None and not bucket.take():
            self.service.note(
                "rate_limited", self.client_id, peer=self.peer, limit="limits.publish_rate", rate=bucket.rate
            )
            return MESSAGE_RATE_TOO_HIGH
        bucket = self.byte_bucket
        if bucket is not None and not bucket.spend(size):
            self.service.note(
                "rate_limited",
                self.client_id,
                peer=self.peer,
                limit="limits.publish_bytes_rate",
                rate=bucket.rate,
            )
            return MESSAGE_RATE_TOO_HIGH
        http = self.http_acl
        if http is not None and not http.authorize(self.client_id, self.username, "publish", topic):
            self.service.note(
                "publish_denied", self.client_id, peer=self.peer, user=self.username, topic=topic
            )
            return NOT_AUTHORIZED
        return 0

    def check_subscribe(self, filter: str, count_after: int) -> int:
        """0 when the client may hold ``filter`` as its ``count_after``-th subscription; else 0x97
        (over the topic caps or the subscription count) or 0x87 (ACL)."""
        if self.generation != self.service.generation:
            self._refresh()
        try:
            validate_filter(filter)
        except MQTTError:
            return 0  # not a filter at all: the broker refuses it with its own code (0x8F)
        caps = self.topic_caps
        if caps is not None:
            problem = caps.topic_problem(filter)
            if problem is not None:
                self.service.note(
                    "topic_cap", self.client_id, peer=self.peer, filter=filter[:200], reason=problem
                )
                return QUOTA_EXCEEDED
        if self.max_subscriptions and count_after > self.max_subscriptions:
            self.service.note(
                "subscription_quota", self.client_id, peer=self.peer, max_subscriptions=self.max_subscriptions
            )
            return QUOTA_EXCEEDED
        acl = self.acl
        if acl is not None and not acl.can_subscribe(filter):
            self.service.note(
                "subscribe_denied", self.client_id, peer=self.peer, user=self.username, filter=filter
            )
            return NOT_AUTHORIZED
        http = self.http_acl
        if http is not None and not http.authorize(self.client_id, self.username, "subscribe", filter):
            self.service.note(
                "subscribe_denied", self.client_id, peer=self.peer, user=self.username, filter=filter
            )
            return NOT_AUTHORIZED
        return 0

    def can_write_will(self, topic: str) -> bool:
        """May the client's will be published to ``topic``? (checked at CONNECT, like Mosquitto; a
        topic over the caps is refused too, as its PUBLISH would be)"""
        caps = self.topic_caps
        if caps is not None:
            problem = caps.topic_problem(topic)
            if problem is not None:
                self.service.note(
                    "topic_cap", self.client_id, peer=self.peer, will_topic=topic[:200], reason=problem
                )
                return False
        acl = self.acl
        if acl is not None and not acl.can_write(topic):
            return False
        http = self.http_acl
        return http is None or http.authorize(self.client_id, self.username, "publish", topic)
