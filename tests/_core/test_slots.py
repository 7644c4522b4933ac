"""``fluxmq._core.slots.SlotMaker``: an instance made in C with its slots filled is the one the class's
``__init__`` makes, for the message and in-flight classes the relay makes that way (in the order
``fluxmq._core.relay`` fills them); a class it cannot make so is refused."""

from __future__ import annotations

import gc
import sys

import pytest

from fluxmq._core.relay import INFLIGHT_SLOTS, MESSAGE_SLOTS
from fluxmq._core.slots import SlotMaker
from fluxmq.broker.message import Message
from fluxmq.broker.session import Inflight


def slots_of(obj, names) -> dict:
    return {name: getattr(obj, name) for name in names}


def test_a_message_made_by_slots_is_the_one_init_makes() -> None:
    topic, payload, origin = "a/b", b"payload", "client"
    made = SlotMaker(Message, MESSAGE_SLOTS).make(topic, payload, 1, False, None, None, origin, None)
    assert type(made) is Message
    assert slots_of(made, MESSAGE_SLOTS) == slots_of(
        Message(topic, payload, 1, False, None, None, origin), MESSAGE_SLOTS
    )


def test_an_inflight_made_by_slots_is_the_one_init_makes() -> None:
    message = Message("t", b"p", 1)
    made = SlotMaker(Inflight, INFLIGHT_SLOTS).make(message, 1, False, (3,), False)
    assert type(made) is Inflight
    assert slots_of(made, INFLIGHT_SLOTS) == slots_of(Inflight(message, 1, False, (3,)), INFLIGHT_SLOTS)


def test_references_are_owned_and_released() -> None:
    payload = b"x" * 1000
    before = sys.getrefcount(payload)
    maker = SlotMaker(Message, MESSAGE_SLOTS)
    made = [maker.make("t", payload, 0, False, None, None, None, None) for _ in range(10)]
    assert sys.getrefcount(payload) == before + 10
    assert gc.is_tracked(made[0])
    del made
    gc.collect()
    assert sys.getrefcount(payload) == before


class WithDict:
    pass


class Slotted:
    __slots__ = ("a", "b")


class Made(Slotted):
    __slots__ = ("c",)

    def __new__(cls):
        return super().__new__(cls)


@pytest.mark.parametrize(
    ("cls", "names"),
    [
        (WithDict, ()),
        (Slotted, ("a",)),  # not every slot
        (Slotted, ("a", "b", "x")),
        (Slotted, ("a", "a")),
        (Made, ("a", "b", "c")),  # its own __new__
    ],
)
def test_a_class_it_cannot_make_is_refused(cls, names) -> None:
    with pytest.raises(TypeError):
        SlotMaker(cls, names)


def test_slots_of_a_base_class_count() -> None:
    class Sub(Slotted):
        __slots__ = ("c",)

    made = SlotMaker(Sub, ("c", "a", "b")).make(3, 1, 2)
    assert (made.a, made.b, made.c) == (1, 2, 3)
