"""Checks of what a client sends that more than one packet handler makes: a Response Topic
(PUBLISH and a CONNECT's will) and a payload that says it is UTF-8."""

from __future__ import annotations

from fluxmq.errors import ProtocolError


def _check_response_topic(topic: str) -> None:
    """A Response Topic is a topic name: no wildcards [MQTT-3.3.2-14], not empty."""
    if not topic or "+" in topic or "#" in topic:
        raise ProtocolError("Response Topic must be a topic name without wildcards (MQTT-3.3.2-14)")


def _is_utf8(payload: bytes) -> bool:
    """True when ``payload`` is well-formed UTF-8 (what Payload Format Indicator 1 promises)."""
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
