"""fluxmq: a multi-protocol MQTT broker with a Cython core and gevent I/O."""

__version__ = "0.1.0"
