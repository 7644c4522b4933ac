"""The CoAP bridge's settings (``server.coap.*`` and the limits it shares with MQTT) and the RFC 7252
transmission parameters they default to."""

from __future__ import annotations

from typing import Any

# RFC 7252 §4.8 transmission parameters
ACK_TIMEOUT = 2.0
ACK_RANDOM_FACTOR = 1.5
MAX_RETRANSMIT = 4


class CoapSettings:
    """The bridge's knobs (``server.coap.*``, ``broker.max_message_size``, ``limits.publish_*``)."""

    __slots__ = (
        "max_message_size",
        "observe_queue_size",
        "max_observations",
        "max_observations_per_peer",
        "block_size",
        "max_reassembly_bytes",
        "request_rate",
        "request_burst",
        "ack_timeout",
        "max_retransmit",
    )

    def __init__(
        self,
        max_message_size: int = 1 << 20,
        observe_queue_size: int = 100,
        max_observations: int = 10000,
        max_observations_per_peer: int = 16,
        block_size: int = 1024,
        max_reassembly_bytes: int = 1 << 20,
        request_rate: float = 0.0,
        request_burst: int = 0,
        ack_timeout: float = ACK_TIMEOUT,
        max_retransmit: int = MAX_RETRANSMIT,
    ) -> None:
        self.max_message_size = max_message_size
        self.observe_queue_size = observe_queue_size
        self.max_observations = max_observations
        self.max_observations_per_peer = max_observations_per_peer
        self.block_size = 1 << (max(16, min(1024, block_size)).bit_length() - 1)  # a Block2 size (RFC 7959)
        self.max_reassembly_bytes = max_reassembly_bytes
        self.request_rate = request_rate
        self.request_burst = request_burst or max(1, int(request_rate))
        self.ack_timeout = ack_timeout
        self.max_retransmit = max_retransmit

    @classmethod
    def from_config(cls, config: Any) -> CoapSettings:
        c = config.server.coap
        return cls(
            config.broker.max_message_size,
            c.observe_queue_size,
            c.max_observations,
            c.max_observations_per_peer,
            c.block_size,
            c.max_reassembly_bytes,
            config.limits.publish_rate,
            config.limits.publish_burst,
        )
