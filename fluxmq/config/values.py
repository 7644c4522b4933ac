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
    "Field",
    "Fields",
    "FieldsList",
    "Float",
    "Int",
    "ItemError",
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
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
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
        if end < 0 or s[end + 1 : end + 2] != ":":
            raise ValueError("IPv6 address must be written [host]:port")
        host, port_text = s[1:end], s[end + 2 :]
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
            self.maximum is not None and value > self.maximum
        ):
            raise ValueError("")
        return value


class Float(ValueType):
    """A finite number (integers accepted); ``minimum`` inclusive unless ``exclusive_minimum``."""

    def __init__(
        self, minimum: float | None = None, maximum: float | None = None, exclusive_minimum: bool = False
    ) -> None:
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
            value < self.minimum or (self.exclusive_minimum and value == self.minimum)
        ):
            raise ValueError("")
        if self.maximum is not None and value > self.maximum:
            raise ValueError("")
        return value


# YAML 1.1 booleans that YAML 1.2 (ruamel) reads as text; go-yaml v3 still decodes them into a bool
# field, so a config written for the Go FluxMQ may use them.
_YAML11_TRUE = frozenset({"yes", "on"})
_YAML11_FALSE = frozenset({"no", "off"})


class Bool(ValueType):
    """A boolean: YAML ``true``/``false`` (or YAML 1.1's yes/no/on/off) in a file; true/false/1/0/yes/no from env or ``--set``."""

    summary = "boolean"
    expected = "true or false (also yes/no, on/off)"

    def from_yaml(self, value: object) -> bool:
        if isinstance(value, str):
            text = value.strip().lower()
            if text in _YAML11_TRUE:
                return True
            if text in _YAML11_FALSE:
                return False
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
            ' or "" (disabled)' if allow_empty else ""
        )

    def from_yaml(self, value: object) -> str:
        if not isinstance(value, str):
            raise ValueError("")
        text = str(value)
        if text == "" and self.allow_empty:
            return text
        parse_addr(text)
        return text


class Enum(ValueType):
    """One of a fixed set of strings; case-sensitive unless ``ignore_case`` (then the choice as declared)."""

    def __init__(self, *choices: str, ignore_case: bool = False) -> None:
        if not choices:
            raise ValueError("Enum needs at least one choice")
        self.choices = tuple(choices)
        self.ignore_case = ignore_case
        self._folded = {choice.lower(): choice for choice in choices}
        shown = [choice or '""' for choice in choices]  # "" is a valid choice (e.g. "not set")
        self.summary = " | ".join(shown)
        self.expected = "one of " + ", ".join(shown) + (" (any case)" if ignore_case else "")

    def from_yaml(self, value: object) -> str:
        if not isinstance(value, str):
            raise ValueError("")
        if value in self.choices:
            return str(value)
        if self.ignore_case and value.lower() in self._folded:
            return self._folded[value.lower()]
        raise ValueError("")


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
                raise ValueError(f"{name!r}: names and values must be strings")
            out[str(name)] = str(item)
        return out


class Url(ValueType):
    """An absolute URL with one of ``schemes`` and a host."""

    def __init__(self, *schemes: str) -> None:
        self.schemes = schemes or ("http", "https")
        self.summary = "URL"
        self.expected = " or ".join(
            f"an {s}:// URL" if s[0] in "aeiouh" else f"a {s}:// URL" for s in self.schemes
        )

    def from_yaml(self, value: object) -> str:
        from urllib.parse import urlsplit

        if not isinstance(value, str):
            raise ValueError("")
        try:
            parts = urlsplit(value)
            ok = parts.scheme in self.schemes and bool(parts.hostname)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            ok = False
        if not ok:
            raise ValueError("")
        return str(value)


# -- structured values (lists of mappings, e.g. ``bridges``) ------------------------------------------


class ItemError(ValueError):
    """A fault inside a structured value: ``path`` (``[0].topics[1].qos``) and the YAML ``line``
    of the offending item or key, so the loader names exactly where it is."""

    def __init__(self, path: str, line: int | None, problem: str) -> None:
        super().__init__(problem)
        self.path = path
        self.line = line
        self.problem = problem


def _yaml_line(container: object, key: object, is_item: bool) -> int | None:
    """1-based line of a ruamel round-trip mapping key or sequence item (None for plain values)."""
    lc = getattr(container, "lc", None)
    if lc is None:
        return None
    try:
        return (lc.item(key) if is_item else lc.key(key))[0] + 1
    except (KeyError, TypeError, IndexError):
        return None


def plain_scalar(value: object) -> object:
    """ruamel's round-trip scalars (ScalarInt, ScalarFloat, quoted strings) as plain Python values."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    return value


class Field:
    """One field of a ``Fields`` mapping: its type, default and whether it must be given."""

    __slots__ = ("type", "default", "required", "doc", "refuse")

    def __init__(
        self, type: ValueType, default: object = None, required: bool = False, doc: str = "", refuse: str = ""
    ) -> None:
        self.type = type
        self.default = default
        self.required = required
        self.doc = doc
        self.refuse = refuse  # non-empty: the field is recognised but never accepted (why, in words)


class Fields(ValueType):
    """A mapping with a fixed set of fields, each validated by its own type; unknown fields are
    errors. The typed value is a plain dict with every field (defaults filled in)."""

    def __init__(self, fields: dict[str, Field], summary: str = "mapping") -> None:
        self.fields = fields
        self.summary = summary
        self.expected = "a mapping with fields " + ", ".join(fields)

    def from_yaml(self, value: object, path: str = "") -> dict:
        if not isinstance(value, dict):
            raise ItemError(path, None, f"expected a mapping with fields {', '.join(self.fields)}")
        out: dict = {}
        for name, raw in value.items():
            line = _yaml_line(value, name, False)
            field = self.fields.get(name) if isinstance(name, str) else None
            where = f"{path}.{name}"
            if field is None:
                raise ItemError(where, line, f"unknown field; expected one of {', '.join(self.fields)}")
            if field.refuse:
                raise ItemError(where, line, field.refuse)
            try:
                if isinstance(field.type, Fields | FieldsList):
                    out[name] = field.type.from_yaml(raw, where)
                else:
                    raw = plain_scalar(raw)
                    if raw is None:
                        raise ValueError("has no value")
                    out[name] = field.type.from_yaml(raw)
            except ItemError as exc:
                if exc.line is None:
                    exc.line = line
                raise
            except ValueError as exc:
                detail = f" ({exc})" if str(exc) else ""
                raise ItemError(where, line, f"expected {field.type.expected}{detail}, got {raw!r}") from None
        for name, field in self.fields.items():
            if name in out:
                continue
            if field.required:
                raise ItemError(path, None, f"missing field {name!r}")
            if field.refuse:
                continue
            default = field.default
            if default is None:
                out[name] = None
            elif isinstance(field.type, Fields | FieldsList):
                out[name] = field.type.from_yaml(default, f"{path}.{name}")
            else:
                out[name] = field.type.from_yaml(default)  # written as in YAML ("1s")
        return out

    def from_text(self, text: str) -> dict:
        import json

        try:
            return self.from_yaml(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc.msg}") from None


class FieldsList(ValueType):
    """A list of ``Fields`` mappings (a YAML sequence; JSON text from the environment)."""

    def __init__(self, item: Fields, summary: str = "list of mappings", unique: str | None = None) -> None:
        self.item = item
        self.summary = summary
        self.unique = unique  # a field whose value must differ between items (``name``)
        self.expected = f"a list of mappings with fields {', '.join(item.fields)}"

    def from_yaml(self, value: object, path: str = "") -> list[dict]:
        if value is None:
            return []
        if not isinstance(value, list | tuple):
            raise ItemError(path, None, "expected a list of mappings")
        items = []
        seen: dict = {}
        for i, item in enumerate(value):
            try:
                parsed = self.item.from_yaml(item, f"{path}[{i}]")
            except ItemError as exc:
                if exc.line is None:
                    exc.line = _yaml_line(value, i, True)
                raise
            if self.unique is not None:
                name = parsed.get(self.unique)
                if name in seen:
                    line = _yaml_line(item, self.unique, False) or _yaml_line(value, i, True)
                    raise ItemError(
                        f"{path}[{i}].{self.unique}",
                        line,
                        f"duplicate {self.unique} {name!r} (also item [{seen[name]}])",
                    )
                seen[name] = i
            items.append(parsed)
        return items

    def from_text(self, text: str) -> list[dict]:
        import json

        try:
            return self.from_yaml(json.loads(text) if text.strip() else [])
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc.msg}") from None
