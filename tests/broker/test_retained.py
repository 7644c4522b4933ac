"""RetainedStore's hooks for replication: local changes are reported, replicated ones are not
(fluxmq/broker/retained.py)."""

from __future__ import annotations

from fluxmq.broker.message import Message
from fluxmq.broker.retained import RetainedStore


def test_local_changes_are_reported_and_replicated_ones_are_not():
    store = RetainedStore(max_messages=2)
    seen = []
    store.on_change = lambda topic, message: seen.append((topic, message.payload if message else None))
    store.store(Message("a", b"1", retain=True))
    store.store(Message("b", b"2", retain=True))
    assert store.store(Message("c", b"3", retain=True)) is False  # refused at the cap: nothing to report
    store.store(Message("a", b"", retain=True))  # clear
    store.store(Message("zzz", b"", retain=True))  # clearing nothing: nothing to report
    store.delete("b")
    assert seen == [("a", b"1"), ("b", b"2"), ("a", None), ("b", None)]
    store.apply_replicated("r", Message("r", b"remote", retain=True))
    store.apply_replicated("a", None)
    assert seen == [("a", b"1"), ("b", b"2"), ("a", None), ("b", None)]
    assert store.get("r").payload == b"remote"


def test_a_replicated_change_is_written_to_the_durable_store():
    class Recorder:
        def __init__(self):
            self.ops = []

        def put_retained(self, topic, message):
            self.ops.append(("put", topic, message.payload))

        def delete_retained(self, topic):
            self.ops.append(("delete", topic))

    storage = Recorder()
    store = RetainedStore(storage=storage)
    store.apply_replicated("t", Message("t", b"v", retain=True))
    store.apply_replicated("t", None)
    assert storage.ops == [("put", "t", b"v"), ("delete", "t")]
