"""Cython hot paths of fluxmq: the sans-IO MQTT codec, the write buffer and the topic tries.

These modules import nothing from fluxmq except ``fluxmq.errors``.
"""
