"""ProtocolSettings: the knobs of the MQTT protocol layer, taken from the config once per listener."""

from __future__ import annotations


class ProtocolSettings:
    """Limits and timeouts every MQTT connection of a listener applies."""

    __slots__ = (
        "max_packet_size",
        "max_message_size",
        "connect_timeout",
        "read_timeout",
        "write_timeout",
        "close_timeout",
        "max_keepalive",
        "allow_zero_keepalive",
        "write_buffer_high",
        "max_qos",
        "retain_available",
        "max_inflight",
        "max_topic_alias",
        "park_after",
        "topic_alias_policy",
        "response_information",
        "authenticators",
        "refuse_anonymous",
    )

    def __init__(
        self,
        max_packet_size: int = 2 << 20,
        max_message_size: int = 1 << 20,
        connect_timeout: float = 10.0,
        read_timeout: float = 0.0,
        write_timeout: float = 60.0,
        close_timeout: float = 2.0,
        max_keepalive: int = 65535,
        allow_zero_keepalive: bool = True,
        write_buffer_high: int = 1 << 20,
        max_qos: int = 2,
        retain_available: bool = True,
        max_inflight: int = 100,
        max_topic_alias: int = 0,
        park_after: float = 5.0,
        topic_alias_policy: str = "none",
        response_information: str = "",
        authenticators: dict | None = None,
        refuse_anonymous: bool = False,
    ) -> None:
        self.max_packet_size = max_packet_size
        self.max_message_size = max_message_size
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.close_timeout = close_timeout
        self.max_keepalive = max_keepalive
        self.allow_zero_keepalive = allow_zero_keepalive
        self.write_buffer_high = write_buffer_high
        self.max_qos = max_qos
        self.retain_available = retain_available
        self.max_inflight = max_inflight
        self.max_topic_alias = max_topic_alias
        # A connected client idle this long parks: its greenlet ends until input arrives (0 = never).
        self.park_after = park_after
        # 5.0 outbound topic aliases: "none", "first_n" (the first topics keep their alias) or "lru".
        self.topic_alias_policy = topic_alias_policy
        # 5.0 Response Information for clients that request it ("%c" = client id; "" = never sent).
        self.response_information = response_information
        # 5.0 enhanced authentication: Authentication Method -> fluxmq.broker.auth_enhanced.Authenticator
        self.authenticators = authenticators or {}
        # A listener on a network address with no decision about anonymous clients and nothing to
        # check a user name with (Mosquitto 2's default): every CONNECT that neither an enhanced
        # authentication method nor a client certificate authenticates is refused (checked at
        # CONNECT only, never per message).
        self.refuse_anonymous = refuse_anonymous
