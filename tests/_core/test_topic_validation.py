"""Topic name and filter validation (MQTT 3.1.1 / 5.0 sections 4.7 and 4.8.2)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluxmq._core.trie import parse_shared, validate_filter, validate_topic
from fluxmq.errors import TopicFilterInvalid, TopicNameInvalid


def reference_filter_valid(f: str) -> bool:
    """Level-by-level statement of the filter rules, written independently of the Cython scan."""
    if not f or "\0" in f or "\ud800" in f or len(f.encode("utf-8", "surrogatepass")) > 65535:
        return False
    if f.startswith("$share/"):
        group, sep, inner = f[len("$share/") :].partition("/")
        if not sep or not group or "+" in group or "#" in group or not inner:
            return False
        f = inner
    levels = f.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def reference_topic_valid(t: str) -> bool:
    return (
        bool(t) and not any(c in t for c in "+#\0\ud800") and len(t.encode("utf-8", "surrogatepass")) <= 65535
    )


# -- topic names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("topic", ["a", "/", "a//b", "/a", "a/", "$SYS/broker/load", "ü/ß/水", "a b/c"])
def test_valid_topic_names(topic: str) -> None:
    validate_topic(topic)


def test_empty_topic_name_is_invalid_mqtt_4_7_3_1() -> None:
    """MQTT-4.7.3-1: topic names must be at least one character long."""
    with pytest.raises(TopicNameInvalid, match="4.7.3-1"):
        validate_topic("")


def test_null_character_in_topic_name_is_invalid_mqtt_4_7_3_2() -> None:
    """MQTT-4.7.3-2: topic names must not include U+0000."""
    with pytest.raises(TopicNameInvalid, match="4.7.3-2"):
        validate_topic("a/\0/b")


@pytest.mark.parametrize("topic", ["#", "+", "a/#", "a/+/b", "a+", "sport/tennis#"])
def test_wildcards_in_topic_name_are_invalid_mqtt_4_7_1_1(topic: str) -> None:
    """MQTT-4.7.1-1: wildcard characters must not be used within a topic name."""
    with pytest.raises(TopicNameInvalid, match="4.7.1-1"):
        validate_topic(topic)


def test_topic_name_length_limit_counts_utf8_bytes_mqtt_4_7_3_3() -> None:
    """MQTT-4.7.3-3: at most 65,535 bytes once encoded, counted in UTF-8 bytes, not characters."""
    validate_topic("a" * 65535)
    with pytest.raises(TopicNameInvalid, match="4.7.3-3"):
        validate_topic("a" * 65536)
    validate_topic("é" * 32767 + "a")  # 65,535 bytes in 32,768 characters
    with pytest.raises(TopicNameInvalid, match="4.7.3-3"):
        validate_topic("é" * 32768)  # 65,536 bytes
    with pytest.raises(TopicNameInvalid, match="4.7.3-3"):
        validate_topic("水" * 21846)  # 65,538 bytes in fewer than 22k characters


def test_lone_surrogate_is_invalid() -> None:
    """MQTT-1.5.4-1: strings must be well-formed UTF-8, so no surrogate code points."""
    with pytest.raises(TopicNameInvalid):
        validate_topic("a/\ud800")
    with pytest.raises(TopicFilterInvalid):
        validate_filter("a/\udfff/#")


def test_errors_carry_mqtt5_reason_codes() -> None:
    with pytest.raises(TopicNameInvalid) as name_error:
        validate_topic("a/#")
    assert name_error.value.reason_code == 0x90
    with pytest.raises(TopicFilterInvalid) as filter_error:
        validate_filter("a#")
    assert filter_error.value.reason_code == 0x8F


# -- topic filters ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "f",
    [
        "#",
        "+",
        "a/#",
        "+/+",
        "/+",
        "+/",
        "a//#",
        "sport/+/player1",
        "+/tennis/#",
        "$SYS/#",
        "a",
        "/",
        "$share",
        "$sharex/a",
        "$share/g/#",
        "$share/g/a/+/b",
        "$share/g//",
        "$share/g/$share/h/x",
    ],
)
def test_valid_filters(f: str) -> None:
    validate_filter(f)


def test_empty_filter_is_invalid_mqtt_4_7_3_1() -> None:
    """MQTT-4.7.3-1: topic filters must be at least one character long."""
    with pytest.raises(TopicFilterInvalid, match="4.7.3-1"):
        validate_filter("")


def test_null_character_in_filter_is_invalid_mqtt_4_7_3_2() -> None:
    """MQTT-4.7.3-2: topic filters must not include U+0000."""
    with pytest.raises(TopicFilterInvalid, match="4.7.3-2"):
        validate_filter("a/\0/#")


def test_filter_length_limit_mqtt_4_7_3_3() -> None:
    """MQTT-4.7.3-3: a filter must not encode to more than 65,535 bytes."""
    validate_filter("a/" * 32766 + "#")  # 65,533 bytes
    with pytest.raises(TopicFilterInvalid, match="4.7.3-3"):
        validate_filter("a/" * 32767 + "ab")  # 65,536 bytes


@pytest.mark.parametrize("f", ["a#", "a/#/b", "#/a", "sport/tennis#", "##", "a/b#", "#a", "a/#/"])
def test_multi_level_wildcard_must_be_last_and_whole_level_mqtt_4_7_1_2(f: str) -> None:
    """MQTT-4.7.1-2: '#' stands alone after a separator (or alone) and is the last character."""
    with pytest.raises(TopicFilterInvalid, match="4.7.1-2"):
        validate_filter(f)


@pytest.mark.parametrize("f", ["a+", "+a", "a/+b", "sport+", "++", "a/b+/c", "+a/b"])
def test_single_level_wildcard_must_occupy_whole_level_mqtt_4_7_1_3(f: str) -> None:
    """MQTT-4.7.1-3: '+' must occupy an entire level of the filter."""
    with pytest.raises(TopicFilterInvalid, match="4.7.1-3"):
        validate_filter(f)


def test_shared_filter_needs_share_name_mqtt_4_8_2_1() -> None:
    """MQTT-4.8.2-1: a shared subscription's share name is at least one character long."""
    with pytest.raises(TopicFilterInvalid, match="4.8.2-1"):
        validate_filter("$share//a/b")


@pytest.mark.parametrize(
    "f", ["$share/g", "$share/", "$share/g+/a", "$share/g#/a", "$share/+/a", "$share/g/"]
)
def test_shared_filter_share_name_rules_mqtt_4_8_2_2(f: str) -> None:
    """MQTT-4.8.2-2: the share name has no '/', '+' or '#' and is followed by '/' and a topic filter."""
    with pytest.raises(TopicFilterInvalid, match="4.8.2-2"):
        validate_filter(f)


@pytest.mark.parametrize("f", ["$share/g/a#", "$share/g/#/a", "$share/g/a+"])
def test_shared_filter_inner_filter_must_be_valid(f: str) -> None:
    with pytest.raises(TopicFilterInvalid, match="4.7.1"):
        validate_filter(f)


def test_none_is_a_type_error() -> None:
    for func in (validate_topic, validate_filter, parse_shared):
        with pytest.raises(TypeError):
            func(None)


def test_parse_shared() -> None:
    assert parse_shared("$share/g/a/+/b") == ("g", "a/+/b")
    assert parse_shared("$share/consumers/#") == ("consumers", "#")
    assert parse_shared("$share/g//") == ("g", "/")
    assert parse_shared("a/b") is None
    assert parse_shared("$share") is None
    assert parse_shared("$SYS/#") is None
    with pytest.raises(TopicFilterInvalid, match="4.8.2-1"):
        parse_shared("$share//a")
    with pytest.raises(TopicFilterInvalid, match="4.8.2-2"):
        parse_shared("$share/g")


# -- properties -------------------------------------------------------------------------------------

_CHARS = st.sampled_from(list("ab/+#$ é\0") + ["$share/", "\ud800"])
_TEXT = st.lists(_CHARS, max_size=12).map("".join)


@given(_TEXT)
def test_validate_filter_agrees_with_level_rules(f: str) -> None:
    expected = reference_filter_valid(f)
    try:
        validate_filter(f)
    except TopicFilterInvalid:
        assert not expected, f"{f!r} rejected"
    else:
        assert expected, f"{f!r} accepted"


@given(_TEXT)
def test_validate_topic_agrees_with_rules(t: str) -> None:
    expected = reference_topic_valid(t)
    try:
        validate_topic(t)
    except TopicNameInvalid:
        assert not expected, f"{t!r} rejected"
    else:
        assert expected, f"{t!r} accepted"


@given(_TEXT)
def test_every_valid_topic_name_is_a_valid_filter(t: str) -> None:
    """A topic name is a filter that matches only itself, so it must pass filter validation too."""
    try:
        validate_topic(t)
    except TopicNameInvalid:
        return
    if not t.startswith("$share/"):
        validate_filter(t)
