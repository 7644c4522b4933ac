"""Reserved prefixes of client ids and topics the broker treats apart."""

# Client ids of the local sessions of the node's bridges (fluxmq.bridge): refused to MQTT clients
# (the protocol layer checks), and never expired by broker.max_session_expiry, not even at restore.
BRIDGE_SESSION_PREFIX = "$bridge/"
#: topics and filters of durable queues (fluxmq.queues)
QUEUE_PREFIX = "$queue/"
