"""fluxmq/node/service.py: start-up leaves what it built out of the cyclic collector's generations."""

from __future__ import annotations

import gc

from fluxmq.broker.broker import Broker
from fluxmq.config import load_config
from fluxmq.node.service import load_and_restore, protocol_settings
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


def test_broker_park_after_reaches_the_listeners_protocol_settings(tmp_path) -> None:
    """A Go duration in the file, 0 from --set, the 5 s default: what a listener's connections use."""
    path = tmp_path / "fluxmq.yaml"
    path.write_text("broker:\n  park_after: 1m30s\n")
    for cfg, seconds in (
        (load_config(env={}), 5.0),
        (load_config(path, env={}), 90.0),
        (load_config(path, env={}, overrides=["broker.park_after=0"]), 0.0),
    ):
        assert protocol_settings(cfg, cfg.server.tcp.plain).park_after == seconds
