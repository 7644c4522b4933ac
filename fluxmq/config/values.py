"""Value parsers and the value types the config schema declares.

The parsers (``parse_duration``, ``parse_size``, ``parse_addr``, ``parse_bool``) take text and raise
``ValueError`` with a short reason. The value types (``Int``, ``Float``, ``Bool``, ``Str``,
``Duration``, ``Size``, ``Addr``, ``Enum``, ``StrList``) turn a raw value into the typed value a key holds:

- ``from_yaml(value)`` takes what the YAML loader produced (strict: ``"yes"`` is not a boolean,
  ``10.0`` is not an integer);
- ``from_text(text)`` takes an environment variable or a ``--set`` string (lenient where text has to
  be: ``"50"`` is an integer, ``yes``/``no``/``1``/``0`` are booleans).

Both raise ``ValueError``; its message, when not empty, is a detail the loader adds to the type's
``expected`` text in the one-line ``ConfigError``.
"""

from __future__ import annotations

import ipaddress
import math
import re

__all__ = [
    "Addr",
    "Bool",
    "Duration",
    "Enum",
    "Float",
    "Int",
    "ItemError",
    "ListOf",
    "Mapping",
    "Size",
    "Str",
    "StrList",
    "StrMap",
    "Url",
    "ValueType",
    "parse_addr",
    "parse_bool",
    "parse_duration",
    "parse_size",
]

# Go-style duration units, so "1h30m" and "250ms" read as they do in the Go FluxMQ config.
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_NUMBER = re.compile(r"[+-]?(\d+(?:\.\d*)?|\.\d+)(e[+-]?\d+)?", re.IGNORECASE)
_UNSIGNED = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(e[+-]?\d+)?", re.IGNORECASE)

_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", re.IGNORECASE)

_HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")

_TRUE_TEXT = frozenset({"true", "1", "yes"})
_FALSE_TEXT = frozenset({"false", "0", "no"})


def parse_duration(text: str) -> float:
    """``"250ms"``, ``"10s"``, ``"5m"``, ``"1h30m"`` or a plain number of seconds -> float seconds.

    Units: ``ns``, ``us``, ``ms``, ``s``, ``m``, ``h``; parts join without spaces (``1h30m``).
    Negative and non-finite values are refused.
    """
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    if s[0] in "+-":
        if s[0] == "-":
            raise ValueError("negative duration")
        s = s[1:]
    if _UNSIGNED.fullmatch(s):
        seconds = float(s)
    else:
        pos = 0
        seconds = 0.0
        while pos < len(s):
            m = _DURATION_PART.match(s, pos)
            if m is None:
                rest = s[pos:]
                unit = re.match(r"[\d.]*\s*(\S*)", rest)
                if unit is None or not unit.group(1):
                    raise ValueError(f"missing unit after {rest!r}")
                raise ValueError(f"unknown duration unit {unit.group(1)!r}")
            seconds += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos = m.end()
    if not math.isfinite(seconds):
        raise ValueError("not a finite duration")
    return seconds


def parse_size(text: str) -> int:
    """``"64KiB"``, ``"1MiB"``, ``"1GiB"``, ``"10MB"``, ``"512B"`` or plain digits -> int bytes.

    Binary units (KiB, MiB, GiB, TiB) are powers of 1024, decimal ones (KB, MB, GB, TB) of 1000;
    units are case-insensitive. A fraction must come out a whole number of bytes (``1.5KiB``).
    """
    s = text.strip()
    if s.startswith("-"):
        raise ValueError("negative size")
    m = _SIZE.fullmatch(s)
    if m is None:
        raise ValueError("not a size")
    number, unit = m.group(1), m.group(2).lower()
    if unit and unit not in _SIZE_UNITS:
        raise ValueError(f"unknown size unit {m.group(2)!r}")
    scale = _SIZE_UNITS[unit] if unit else 1
    if "." in number:
        value = float(number) * scale
        if value != int(value):
            raise ValueError("not a whole number of bytes")
        return int(value)
    return int(number) * scale


def parse_addr(text: str) -> tuple[str, int]:
    """Listener address ``host:port`` -> ``(host, port)``.

    ``":1883"`` -> ``("0.0.0.0", 1883)``; ``"127.0.0.1:0"`` -> ``("127.0.0.1", 0)``;
    ``"[::1]:1883"`` -> ``("::1", 1883)``; host names are accepted as they are. IPv6 hosts need
    brackets. Raises ``ValueError`` (the port must be 0..65535).
    """
    s = text.strip()
    if not s:
        raise ValueError("empty address")
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or s[end + 1:end + 2] != ":":
            raise ValueError("IPv6 address must be written [host]:port")
        host, port_text = s[1:end], s[end + 2:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad IPv6 address {host!r}") from None
    else:
        host, sep, port_text = s.rpartition(":")
        if not sep:
            raise ValueError("missing :port")
        if ":" in host:
            raise ValueError("IPv6 address must be written [host]:port")
        if not host:
            host = "0.0.0.0"
        elif not _is_host(host):
            raise ValueError(f"bad host {host!r}")
    if not port_text.isdigit() or not port_text.isascii():
        raise ValueError(f"bad port {port_text!r}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} out of range 0..65535")
    return host, port


def _is_host(host: str) -> bool:
    """An IPv4 address or a DNS host name (RFC 1123 labels)."""
    if host[-1:].isdigit() and host.replace(".", "").isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    if len(host) > 253:
        return False
    return all(_HOSTNAME_LABEL.fullmatch(label) for label in host.rstrip(".").split("."))


def parse_bool(text: str) -> bool:
    """Environment / command-line boolean: true/false, 1/0, yes/no (case-insensitive)."""
    s = text.strip().lower()
    if s in _TRUE_TEXT:
        return True
    if s in _FALSE_TEXT:
        return False
    raise ValueError("")


def _range_text(kind: str, minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f"{kind} {minimum}..{maximum}"
    if minimum is not None:
        return f"{kind} >= {minimum}"
    if maximum is not None:
        return f"{kind} <= {maximum}"
    return kind


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class ValueType:
    """Base of the value types: ``summary`` is for docs, ``expected`` for error messages."""

    summary: str = "value"
    expected: str = "a value"

    def from_yaml(self, value: object) -> object:
        """A value as the YAML loader produced it -> the typed value; ``ValueError`` if it does not fit."""
        raise NotImplementedError

    def from_text(self, text: str) -> object:
        """An environment / ``--set`` string -> the typed value; ``ValueError`` if it does not fit."""
        return self.from_yaml(text)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.summary!r})"


class Int(ValueType):
    """An integer, optionally bounded (inclusive)."""

    def __init__(self, minimum: int | None = None, maximum: int | None = None) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.summary = _range_text("integer", minimum, maximum)
        self.expected = "an " + self.summary

    def from_yaml(self, value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError("")
        return self._check(int(value))

    def from_text(self, text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise ValueError("") from None
        return self._check(value)

    def _check(self, value: int) -> int:
        if (self.minimum is not None and value < self.minimum) or (
                self.maximum is not None and value > self.maximum):
            raise ValueError("")
        return value


class Float(ValueType):
    """A finite number (integers accepted); ``minimum`` inclusive unless ``exclusive_minimum``."""

    def __init__(self, minimum: float | None = None, maximum: float | None = None,
                 exclusive_minimum: bool = False) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.exclusive_minimum = exclusive_minimum
        if exclusive_minimum and minimum is not None and maximum is None:
            self.summary = f"number > {minimum:g}"
        else:
            self.summary = _range_text("number", minimum, maximum)
        self.expected = "a " + self.summary

    def from_yaml(self, value: object) -> float:
        if not _is_number(value):
            raise ValueError("")
        return self._check(float(value))  # type: ignore[arg-type]

    def from_text(self, text: str) -> float:
        if not _NUMBER.fullmatch(text.strip()):
            raise ValueError("")
        return self._check(float(text))

    def _check(self, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("")
        if self.minimum is not None and (
                value < self.minimum or (self.exclusive_minimum and value == self.minimum)):
            raise ValueError("")
        if self.maximum is not None and value > self.maximum:
            raise ValueError("")
        return value


class Bool(ValueType):
    """A boolean: YAML ``true``/``false`` in a file; true/false/1/0/yes/no from env or ``--set``."""

    summary = "boolean"
    expected = "true or false"

    def from_yaml(self, value: object) -> bool:
        if not isinstance(value, bool):
            raise ValueError("")
        return value

    def from_text(self, text: str) -> bool:
        return parse_bool(text)


class Str(ValueType):
    """A string; ``allow_empty=False`` refuses ``""``."""

    def __init__(self, allow_empty: bool = True) -> None:
        self.allow_empty = allow_empty
        self.summary = "string" if allow_empty else "non-empty string"
        self.expected = "a " + self.summary

    def from_yaml(self, value: object) -> str:
        if not isinstance(value, str):
            raise ValueError("")
        if not value and not self.allow_empty:
            raise ValueError("")
        return str(value)


class Duration(ValueType):
    """A duration -> float seconds: ``"250ms"``, ``"10s"``, ``"1h30m"`` or a number of seconds."""

    summary = "duration"
    expected = 'a duration such as "250ms", "10s", "1h30m" or a number of seconds'

    def from_yaml(self, value: object) -> float:
        if isinstance(value, str):
            return parse_duration(value)
        if not _is_number(value):
            raise ValueError("")
        seconds = float(value)  # type: ignore[arg-type]
        if seconds < 0:
            raise ValueError("negative duration")
        if not math.isfinite(seconds):
            raise ValueError("not a finite duration")
        return seconds

    def from_text(self, text: str) -> float:
        return parse_duration(text)


class Size(ValueType):
    """A size -> int bytes: plain bytes or ``"64KiB"``, ``"1MiB"``, ``"1GiB"``, ``"10MB"``."""

    def __init__(self, minimum: int = 0) -> None:
        self.minimum = minimum
        self.summary = "size"
        lower = "" if minimum == 0 else " above 0" if minimum == 1 else f" of at least {minimum} bytes"
        self.expected = f'a size{lower} such as 1048576, "64KiB", "1MiB" or "10MB"'

    def from_yaml(self, value: object) -> int:
        if isinstance(value, str):
            return self._check(parse_size(value))
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError("")
        if value < 0:
            raise ValueError("negative size")
        return self._check(int(value))

    def from_text(self, text: str) -> int:
        return self._check(parse_size(text))

    def _check(self, value: int) -> int:
        if value < self.minimum:
            raise ValueError("")
        return value


class Addr(ValueType):
    """A listener address ``host:port`` kept as written; ``""`` (disabled) only if ``allow_empty``."""

    def __init__(self, allow_empty: bool = False) -> None:
        self.allow_empty = allow_empty
        self.summary = 'address or ""' if allow_empty else "address"
        self.expected = 'an address such as ":1883", "127.0.0.1:1883", "[::1]:1883"' + (
            ' or "" (disabled)' if allow_empty else "")

    def from_yaml(self, value: object) -> str:
        if not isinstance(value, str):
            raise ValueError("")
        text = str(value)
        if text == "" and self.allow_empty:
            return text
        parse_addr(text)
        return text


class Enum(ValueType):
    """One of a fixed set of strings (case-sensitive)."""

    def __init__(self, *choices: str) -> None:
        if not choices:
            raise ValueError("Enum needs at least one choice")
        self.choices = tuple(choices)
        shown = [choice or '""' for choice in choices]  # "" is a valid choice (e.g. "not set")
        self.summary = " | ".join(shown)
        self.expected = "one of " + ", ".join(shown)

    def from_yaml(self, value: object) -> str:
        if not isinstance(value, str) or value not in self.choices:
            raise ValueError("")
        return str(value)


class StrList(ValueType):
    """A list of non-empty strings: a YAML sequence in a file, comma-separated text from env or ``--set``."""

    summary = "list of strings"
    expected = 'a list of strings such as ["a", "b"] (comma-separated from the environment)'

    def from_yaml(self, value: object) -> list[str]:
        if not isinstance(value, list | tuple):
            raise ValueError("")
        items = []
        for item in value:
            if not isinstance(item, str) or not item.strip():
                raise ValueError("items must be non-empty strings")
            items.append(str(item).strip())
        return items

    def from_text(self, text: str) -> list[str]:
        """``a, b`` or a flow list ``[a, "b"]``; ``""`` and ``[]`` are the empty list."""
        s = text.strip()
        if s.startswith("[") and s.endswith("]"):
            s = s[1:-1]
        items = []
        for item in s.split(","):
            item = item.strip()
            if len(item) >= 2 and item[0] == item[-1] and item[0] in "\"'":
                item = item[1:-1].strip()
            if item:
                items.append(item)
        return items


class ItemError(ValueError):
    """A value inside a list or mapping key does not fit. ``path`` is where, relative to the key
    (``"[0].url"``), ``line`` its line in the file when known; the loader turns it into a
    ``ConfigError`` naming ``key[0].url``, the file and that line."""

    def __init__(self, path: str, expected: str, got: object = None, line: int | None = None,
                 problem: str | None = None) -> None:
        super().__init__(problem or expected)
        self.path = path
        self.expected = expected
        self.got = got
        self.line = line
        self.problem = problem


def _item_line(container: object, index: object) -> int | None:
    """The file line of ``container[index]`` (ruamel round-trip data), or None."""
    lc = getattr(container, "lc", None)
    if lc is None:
        return None
    try:
        return (lc.key(index) if isinstance(index, str) else lc.item(index))[0] + 1
    except (KeyError, IndexError, TypeError, AttributeError):
        return None


def _short(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value if not isinstance(value, str) else str(value))


class StrMap(ValueType):
    """A mapping of string names to string values (HTTP headers, labels)."""

    summary = "mapping of strings"
    expected = 'a mapping of strings such as {"X-Env": "prod"}'

    def from_yaml(self, value: object) -> dict[str, str]:
        if not isinstance(value, dict):
            raise ValueError("")
        out = {}
        for name, item in value.items():
            if not isinstance(name, str) or not name or not isinstance(item, str):
                raise ItemError(f".{name}", "a string", item, _item_line(value, name),
                                problem=f"expected string names and values, got {_short(item)}")
            out[str(name)] = str(item)
        return out


class Url(ValueType):
    """An absolute URL with one of ``schemes`` and a host."""

    def __init__(self, *schemes: str) -> None:
        self.schemes = schemes or ("http", "https")
        self.summary = "URL"
        self.expected = " or ".join(f"an {s}:// URL" if s[0] in "aeiouh" else f"a {s}:// URL" for s in self.schemes)

    def from_yaml(self, value: object) -> str:
        from urllib.parse import urlsplit

        if not isinstance(value, str):
            raise ValueError("")
        parts = urlsplit(value)
        if parts.scheme not in self.schemes or not parts.hostname:
            raise ValueError("")
        return str(value)


class Mapping(ValueType):
    """A mapping with fixed field names, each a value type with a default (strict: unknown or
    missing required fields are errors naming the field and its line).

    ``fields`` maps name -> (type, default); a default of ``None`` means "not set" (the field is
    then ``None`` in the typed value, and the code using it takes a default from elsewhere).
    ``required`` fields have no default. ``secret`` fields are replaced by ``redact``."""

    def __init__(self, fields: dict[str, tuple[ValueType, object]], required: tuple[str, ...] = (),
                 secret: tuple[str, ...] = ()) -> None:
        self.fields = dict(fields)
        self.required = tuple(required)
        self.secret = tuple(secret)
        self.summary = "mapping"
        self.expected = "a mapping with " + ", ".join(self.fields)

    def from_yaml(self, value: object) -> dict[str, object]:
        if not isinstance(value, dict):
            raise ItemError("", self.expected, value, problem=f"expected {self.expected}, got {_short(value)}")
        out: dict[str, object] = {}
        for name, raw in value.items():
            line = _item_line(value, name)
            spec = self.fields.get(name) if isinstance(name, str) else None
            if spec is None:
                raise ItemError(f".{name}", "a known field", name, line,
                                problem=f"unknown field; known: {', '.join(self.fields)}")
            kind = spec[0]
            if raw is None:
                raise ItemError(f".{name}", kind.expected, None, line,
                                problem=f"has no value; expected {kind.expected}")
            try:
                out[name] = kind.from_yaml(raw)
            except ItemError as exc:
                raise ItemError(f".{name}{exc.path}", exc.expected, exc.got, exc.line or line, exc.problem) from None
            except ValueError as exc:
                detail = f" ({exc})" if str(exc) else ""
                raise ItemError(f".{name}", kind.expected, raw, line,
                                problem=f"expected {kind.expected}{detail}, got {_short(raw)}") from None
        for name in self.required:
            if name not in out:
                raise ItemError("", self.expected, value, _item_line(value, next(iter(value), None)) if value else None,
                                problem=f"missing required field {name!r}")
        for name, (_kind, default) in self.fields.items():
            if name not in out:
                out[name] = list(default) if isinstance(default, list) else default
        return out

    def redact(self, value: dict) -> dict:
        return {name: ("<secret>" if name in self.secret and item else item) for name, item in value.items()}


class ListOf(ValueType):
    """A list whose items are each checked by ``item`` (e.g. ``ListOf(Mapping(...))``); from the
    environment or ``--set`` it is JSON (or YAML flow) text."""

    def __init__(self, item: ValueType) -> None:
        self.item = item
        self.summary = f"list of {item.summary}"
        self.expected = f"a list, each item {item.expected}"

    def from_yaml(self, value: object) -> list:
        if not isinstance(value, list | tuple):
            raise ValueError("")
        out = []
        for i, raw in enumerate(value):
            line = _item_line(value, i)
            try:
                out.append(self.item.from_yaml(raw))
            except ItemError as exc:
                raise ItemError(f"[{i}]{exc.path}", exc.expected, exc.got, exc.line or line, exc.problem) from None
            except ValueError as exc:
                detail = f" ({exc})" if str(exc) else ""
                raise ItemError(f"[{i}]", self.item.expected, raw, line,
                                problem=f"expected {self.item.expected}{detail}, got {_short(raw)}") from None
        return out

    def from_text(self, text: str) -> list:
        from ruamel.yaml import YAML
        from ruamel.yaml.error import YAMLError

        try:
            data = YAML(typ="safe", pure=True).load(text) if text.strip() else []
        except YAMLError:
            raise ValueError("not JSON or YAML flow text") from None
        return self.from_yaml(data if data is not None else [])

    def redact(self, value: list) -> list:
        redact = getattr(self.item, "redact", None)
        return [redact(item) for item in value] if redact is not None else value
