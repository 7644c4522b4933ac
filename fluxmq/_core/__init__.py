"""Cython hot paths of fluxmq: the sans-IO MQTT codec, the write buffer, the topic tries and a durable
queue delivery's PUBLISH (queue_wire).

These modules import nothing from fluxmq except ``fluxmq.errors``.
"""
