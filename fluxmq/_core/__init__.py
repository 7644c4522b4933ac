"""Cython hot paths of fluxmq: the sans-IO MQTT codec (codec, which re-exports packets,
properties, decoder and encoder, built on wire), the topic tries (trie), the common
PUBLISH from decode to the subscribers' output (relay), a persistent session's stored entry (entry)
and a durable queue delivery's PUBLISH (queue_wire).

These modules import nothing from fluxmq except ``fluxmq.errors``.
"""
