"""Webhooks: broker events POSTed to HTTP endpoints, off the hot path (docs/webhooks.rst).

Stands beside ``protocol`` and ``http``: it observes the broker through ``fluxmq.broker.events``;
the broker never imports it.
"""

from .dispatcher import WebhookDispatcher, WebhookEvent
from .endpoint import SIGNATURE_HEADER, CircuitBreaker, Endpoint, signature
from .settings import EndpointSettings, RetryPolicy, WebhookSettings

__all__ = [
    "SIGNATURE_HEADER",
    "CircuitBreaker",
    "Endpoint",
    "EndpointSettings",
    "RetryPolicy",
    "WebhookDispatcher",
    "WebhookEvent",
    "WebhookSettings",
    "signature",
]
