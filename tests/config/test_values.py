"""Value parsers and value types of fluxmq.config.values."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluxmq.config.values import (
    Addr,
    Bool,
    Duration,
    Enum,
    Float,
    Int,
    Size,
    Str,
    parse_addr,
    parse_bool,
    parse_duration,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("10s", 10.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1h30m15s", 5415.0),
        ("1.5s", 1.5),
        ("500us", 0.0005),
        ("0s", 0.0),
        ("0", 0.0),
        ("10", 10.0),
        ("2.5", 2.5),
        (" 3s ", 3.0),
        ("1m0.5s", 60.5),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("10 parsecs", "parsecs"),
        ("ten seconds", "unknown duration unit"),
        ("1h30", "missing unit"),
        ("-1s", "negative"),
        ("-5", "negative"),
        ("", "empty"),
        ("1e999", "finite"),
        ("s", "unit"),
        ("1d", "unknown duration unit 'd'"),
        ("1 h", "unit"),
    ],
)
def test_parse_duration_refuses(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_duration(text)


@given(st.integers(0, 1000), st.integers(0, 59), st.integers(0, 59), st.integers(0, 999))
def test_duration_parts_add_up(h: int, m: int, s: int, ms: int) -> None:
    assert parse_duration(f"{h}h{m}m{s}s{ms}ms") == pytest.approx(h * 3600 + m * 60 + s + ms / 1000)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64KiB", 65536),
        ("1MiB", 1048576),
        ("1GiB", 1 << 30),
        ("10MB", 10_000_000),
        ("1KB", 1000),
        ("512B", 512),
        ("1024", 1024),
        ("0", 0),
        ("1.5KiB", 1536),
        ("16mib", 16 << 20),
        ("2 MiB", 2 << 20),
        ("1TiB", 1 << 40),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("-1", "negative"),
        ("-1MiB", "negative"),
        ("10 parsecs", "unknown size unit"),
        ("lots", "not a size"),
        ("1.1B", "whole number"),
        ("", "not a size"),
        ("MiB", "not a size"),
        ("1Mi", "unknown size unit"),
    ],
)
def test_parse_size_refuses(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_size(text)


@given(
    st.integers(0, 1 << 20),
    st.sampled_from(
        [
            ("KiB", 1 << 10),
            ("MiB", 1 << 20),
            ("GiB", 1 << 30),
            ("KB", 10**3),
            ("MB", 10**6),
            ("GB", 10**9),
            ("", 1),
        ]
    ),
)
def test_size_units_scale(n: int, unit: tuple[str, int]) -> None:
    assert parse_size(f"{n}{unit[0]}") == n * unit[1]


@pytest.mark.parametrize(
    ("text", "addr"),
    [
        (":1883", ("0.0.0.0", 1883)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:1883", ("::1", 1883)),
        ("[::]:8081", ("::", 8081)),
        ("localhost:1883", ("localhost", 1883)),
        ("broker-1.example.com:65535", ("broker-1.example.com", 65535)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
    ],
)
def test_parse_addr(text: str, addr: tuple[str, int]) -> None:
    assert parse_addr(text) == addr


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (":65536", "out of range"),
        (":99999", "out of range"),
        ("1883", "missing :port"),
        ("", "empty"),
        ("host:", "bad port"),
        ("host:abc", "bad port"),
        (":-1", "bad port"),
        ("::1:1883", r"\[host\]:port"),
        ("[::1]", r"\[host\]:port"),
        ("[nonsense]:1", "bad IPv6"),
        ("256.0.0.1:1", "bad host"),
        ("bad_host:1", "bad host"),
        ("-a.b:1", "bad host"),
        ("a b:1", "bad host"),
    ],
)
def test_parse_addr_refuses(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_addr(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("Yes", True),
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
        ("NO", False),
    ],
)
def test_parse_bool_text(text: str, value: bool) -> None:
    assert parse_bool(text) is value


@pytest.mark.parametrize("text", ["", "y", "2", "on", "truthy", "nope"])
def test_parse_bool_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_bool(text)


def test_bool_from_yaml_is_strict() -> None:
    """In a file YAML booleans count, and YAML 1.1's yes/no/on/off (go-yaml decodes them into a bool);
    1, a quoted "true" and other words do not."""
    b = Bool()
    assert b.from_yaml(True) is True
    assert b.from_yaml("yes") is True and b.from_yaml("Off") is False
    for value in ("maybe", "true", "1", 1, 0, None):
        with pytest.raises(ValueError):
            b.from_yaml(value)
    assert b.from_text("yes") is True


def test_int_bounds_and_strictness() -> None:
    t = Int(1, 65535)
    assert t.expected == "an integer 1..65535"
    assert t.from_yaml(1) == 1 and t.from_yaml(65535) == 65535
    for bad in (0, 65536, True, 10.0, "10", None):
        with pytest.raises(ValueError):
            t.from_yaml(bad)
    assert t.from_text(" 50 ") == 50
    for bad in ("lots", "1.0", "", "0"):
        with pytest.raises(ValueError):
            t.from_text(bad)
    assert Int(0).expected == "an integer >= 0"


def test_float_accepts_ints_and_refuses_non_finite() -> None:
    t = Float(0.0, exclusive_minimum=True)
    assert t.from_yaml(5) == 5.0 and isinstance(t.from_yaml(5), float)
    assert t.from_text("0.5") == 0.5
    for bad in (0, 0.0, -1.0, float("inf"), float("nan"), True, "5"):
        with pytest.raises(ValueError):
            t.from_yaml(bad)
    for bad in ("inf", "nan", "x", "0"):
        with pytest.raises(ValueError):
            t.from_text(bad)


def test_duration_type() -> None:
    t = Duration()
    assert t.from_yaml("1h30m") == 5400.0
    assert t.from_yaml(10) == 10.0 and isinstance(t.from_yaml(10), float)
    assert t.from_yaml(0.25) == 0.25
    for bad in (-1, True, None, [1], float("inf")):
        with pytest.raises(ValueError):
            t.from_yaml(bad)
    assert t.from_text("250ms") == 0.25


def test_size_type() -> None:
    t = Size(1)
    assert t.from_yaml("16MiB") == 16 << 20
    assert t.from_yaml(1048576) == 1048576
    for bad in (0, -5, "0", 1.5, True, None, "lots"):
        with pytest.raises(ValueError):
            t.from_yaml(bad)
    with pytest.raises(ValueError, match="negative"):
        t.from_yaml(-5)
    assert Size().from_yaml(0) == 0


def test_addr_type_keeps_text_and_empty_only_when_allowed() -> None:
    assert Addr(allow_empty=True).from_yaml("") == ""
    assert Addr().from_yaml("[::1]:1883") == "[::1]:1883"
    with pytest.raises(ValueError):
        Addr().from_yaml("")
    with pytest.raises(ValueError, match="out of range"):
        Addr().from_yaml(":70000")
    with pytest.raises(ValueError):
        Addr().from_yaml(1883)


def test_enum_and_str() -> None:
    e = Enum("drop_new", "drop_oldest", "disconnect")
    assert e.from_yaml("drop_oldest") == "drop_oldest"
    assert e.expected == "one of drop_new, drop_oldest, disconnect"
    for bad in ("DROP_NEW", "drop", 1, None):
        with pytest.raises(ValueError):
            e.from_yaml(bad)
    assert Str().from_yaml("") == ""
    with pytest.raises(ValueError):
        Str(allow_empty=False).from_yaml("")
    with pytest.raises(ValueError):
        Str().from_yaml(5)
    assert Str().from_text("5") == "5"
