"""A broker over a real LMDBStorage for the storage tests (``Node``, restartable on its directory), and
the helpers the LMDB tests share: a persistent subscriber attached with a window, and the count of a
table's records.
"""

from __future__ import annotations

from pathlib import Path

from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.broker.message import Message
from fluxmq.broker.session import EXPIRY_NEVER, Will
from fluxmq.storage.lmdb import LMDBStorage
from tests.broker.test_session import RecordingDelivery

MiB = 1 << 20


class Node:
    """A broker and its storage, restartable on the same directory."""

    def __init__(self, path: Path, **settings) -> None:
        self.path = path
        self.settings = settings
        self.storage = LMDBStorage(path, map_size=64 * MiB)
        self.broker = Broker(BrokerSettings(**settings), self.storage)
        self.broker.restore(self.storage.load())
        self.storage.commit()

    def restart(self) -> Node:
        """Stop without committing what is still buffered (as a kill would) and start again."""
        self.storage.abort()
        return Node(self.path, **self.settings)

    def connect(self, cid: str, expiry: int, clean: bool = False, will: Will | None = None):
        session, present = self.broker.open_session(cid, clean, expiry, will)
        d = RecordingDelivery()
        self.broker.attach(session, d, 100)
        self.storage.commit()
        return session, d, present

    def disconnect(self, session, d, publish_will: bool = False) -> None:
        self.broker.close_session(session, d, publish_will)
        self.storage.commit()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, **kw) -> int:
        n = self.broker.publish(Message(topic, payload, qos, retain, **kw))
        self.storage.commit()
        return n


def connect_sub(node: Node, window: int):
    """Attach ``sub`` (persistent) with a window of ``window`` messages in flight."""
    s, _ = node.broker.open_session("sub", False, EXPIRY_NEVER, None)
    d = RecordingDelivery()
    node.broker.attach(s, d, window)
    node.storage.commit()
    return s, d


def online(node: Node, window: int, qos: int):
    """``connect_sub``, subscribed to ``t/#`` at ``qos``."""
    s, d = connect_sub(node, window)
    node.broker.subscribe(s, "t/#", qos)
    node.storage.commit()
    return s, d


def entries(node: Node, db: int) -> int:
    """The records in LMDB table ``db`` (an index of ``storage._dbs``)."""
    with node.storage.env.begin() as txn:
        return txn.stat(node.storage._dbs[db])["entries"]
