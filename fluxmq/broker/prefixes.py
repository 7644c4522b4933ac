"""Reserved prefixes of client ids and topics the broker treats apart."""

# Client ids of the local sessions of the node's bridges (fluxmq.bridge): refused to MQTT clients
# (the protocol layer checks), and never expired by broker.max_session_expiry, not even at restore.
BRIDGE_SESSION_PREFIX = "$bridge/"
#: topics and filters of durable queues (fluxmq.queues)
QUEUE_PREFIX = "$queue/"
#: the last level of a durable queue's settlement topics (``$queue/{name}/$ack`` ...)
SETTLEMENT_LEVELS = ("$ack", "$nack", "$reject")


def is_settlement(topic: str) -> bool:
    """A PUBLISH that settles a delivery of a durable queue: ``$queue/{name}/$ack|$nack|$reject``
    (``Broker.publish`` returns 0, or a HeldAck answered 0x10, when it settled nothing)."""
    if not topic.startswith(QUEUE_PREFIX):
        return False
    return topic[len(QUEUE_PREFIX) :].partition("/")[2] in SETTLEMENT_LEVELS
