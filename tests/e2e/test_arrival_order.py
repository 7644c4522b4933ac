"""Input from different connections takes effect in arrival order, parked connections included.

Paho's MQTT 5.0 suite has client B subscribe and client A publish at once; Mosquitto applies B's
SUBSCRIBE first every time. A connection parks right after CONNECT (no greenlet until input
arrives), so B's SUBSCRIBE wakes a parked connection while A's PUBLISH reaches a connection that is
already reading: the woken connection's input must not wait a loop turn longer than A's.
"""

from __future__ import annotations

import time

from fluxmq._core import codec as c

from .mqttraw import raw_connected, unique

ROUNDS = 40
BUDGET = 60.0  # seconds for all rounds (a bound, not a timing claim)


def test_subscribe_sent_just_before_a_publish_from_another_client_gets_the_message(node) -> None:
    topic = unique("order")
    publisher = raw_connected(node, unique("a"))
    publisher.publish(topic + "/warmup", b"", 0)  # A has been woken: its connection is reading
    missed = []
    deadline = time.monotonic() + BUDGET
    try:
        for i in range(ROUNDS):
            if time.monotonic() > deadline:
                break
            with raw_connected(node, unique("b")) as subscriber:  # parked right after its CONNACK
                # back to back, B first: both usually reach the broker within one event-loop poll
                subscriber.send(c.Subscribe(1, [c.Subscription(topic, 0)], None))
                publisher.send(c.Publish(topic, b"m%d" % i, 0, False, False, 0, None))
                subscriber.wait_for(lambda p: isinstance(p, c.Suback))
                publisher.publish(topic, b"sentinel", 0)
                before, _ = subscriber.collect_until(
                    lambda p: isinstance(p, c.Publish) and p.payload == b"sentinel"
                )
                if not any(isinstance(p, c.Publish) and p.payload == b"m%d" % i for p in before):
                    missed.append(i)
    finally:
        publisher.close()
    assert not missed, (
        f"B missed the message published right after its SUBSCRIBE in rounds {missed} of {ROUNDS}"
    )
