"""fluxmq.broker: the protocol-agnostic core (sessions, router, retained, wills, queues, $SYS)."""

from .broker import Broker, BrokerSettings, SubscribeResult
from .delivery import Delivery
from .message import Message
from .session import Session, Subscription, Will

__all__ = [
    "Broker",
    "BrokerSettings",
    "Delivery",
    "Message",
    "Session",
    "SubscribeResult",
    "Subscription",
    "Will",
]
