"""fluxmq/node/service.py: start-up leaves what it built out of the cyclic collector's generations."""

from __future__ import annotations

import gc

from fluxmq.broker.broker import Broker
from fluxmq.node.service import load_and_restore
from fluxmq.storage.memory import MemoryStorage


def test_start_up_objects_are_frozen_out_of_the_collector_even_with_a_small_store() -> None:
    # A full collection walks every object the collector tracks: in a node that is every module,
    # class and function, ~20 ms each time, which messages that live a while (a queue's in-flight
    # window) trigger every ~10,000 messages. Frozen, they are not walked.
    gc.unfreeze()
    storage = MemoryStorage()
    try:
        load_and_restore(storage, Broker(storage=storage))
        assert gc.get_freeze_count() > 0
        assert gc.isenabled()
    finally:
        gc.unfreeze()
        storage.close()
