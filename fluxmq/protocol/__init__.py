"""fluxmq.protocol: the MQTT connection state machine (3.1, 3.1.1, 5.0 on one listener)."""
