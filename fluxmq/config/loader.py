"""Load the configuration: schema defaults, then the YAML file, then the environment, then ``--set``.

Precedence is command line > environment > file > defaults. Every source is checked against the
schema; the first problem raises ``ConfigError`` with one line naming the key, where it came from
(``file:line``, ``env NAME`` or ``cli --set``), what was expected and what was found::

    config error: broker.max_inflight (/etc/fluxmq.yaml:14): expected an integer 1..65535, got 'lots'

The result is a read-only ``Config``: attribute access by section (``cfg.broker.max_inflight``),
dotted access (``cfg.get("broker.max_inflight")``), where each value came from
(``cfg.origin(...)``) and a plain dict (``cfg.to_dict()``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from fluxmq.config import compat
from fluxmq.config.schema import ENV_PREFIX, SCHEMA, Key, Schema
from fluxmq.config.values import ItemError, plain_scalar
from fluxmq.errors import ConfigError, ConfigErrors

__all__ = ["Config", "Section", "load_config"]

_MISSING: Any = object()

CLI_SOURCE = "cli --set"
DEFAULT_SOURCE = "default"


class Section:
    """A read-only group of config values; attributes are its keys and sub-sections."""

    __slots__ = ("_name", "_children")

    def __init__(self, name: str, children: dict[str, Any]) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_children", children)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        try:
            return self._children[attr]
        except KeyError:
            where = f"{self._name}.{attr}" if self._name else attr
            raise AttributeError(f"no config key or section {where!r}") from None

    def __setattr__(self, attr: str, value: object) -> None:
        raise AttributeError("configuration is read-only; load it again with overrides")

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._children))

    def __iter__(self) -> Iterator[str]:
        return iter(self._children)

    def __contains__(self, name: object) -> bool:
        return name in self._children

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Section):
            return NotImplemented
        return self._name == other._name and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self._name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._name!r}, {self.to_dict()!r})"

    def get(self, dotted: str, default: Any = _MISSING) -> Any:
        """The value (or sub-section) at a dotted path relative to this section."""
        node: Any = self
        for part in dotted.split("."):
            if not isinstance(node, Section) or part not in node._children:
                if default is not _MISSING:
                    return default
                prefix = f"{self._name}." if self._name else ""
                raise KeyError(f"no config key {prefix}{dotted}")
            node = node._children[part]
        return node

    def to_dict(self) -> dict[str, Any]:
        """The effective values as plain nested dicts."""
        return {
            name: value.to_dict() if isinstance(value, Section) else value
            for name, value in self._children.items()
        }


class Config(Section):
    """The effective configuration (the top-level Section) and where each value came from."""

    __slots__ = ("_origins", "_schema", "_notices")

    def __init__(
        self,
        values: Mapping[str, Any],
        origins: Mapping[str, str],
        schema: Schema = SCHEMA,
        notices: Sequence[str] = (),
    ) -> None:
        root: dict[str, Any] = {}
        for dotted, value in values.items():
            node = root
            for part in dotted.split(".")[:-1]:
                node = node.setdefault(part, {})
            node[dotted.rpartition(".")[2]] = value
        super().__init__("", _sections("", root))
        object.__setattr__(self, "_origins", dict(origins))
        object.__setattr__(self, "_schema", schema)
        object.__setattr__(self, "_notices", tuple(notices))

    @property
    def notices(self) -> tuple[str, ...]:
        """One line per setting accepted from the reference documents but not implemented (or mapped)."""
        return self._notices

    def origin(self, dotted: str) -> str:
        """Where a key's value came from: ``default``, ``FILE:LINE``, ``env NAME`` or ``cli --set``."""
        try:
            return self._origins[dotted]
        except KeyError:
            raise KeyError(f"no config key {dotted}") from None

    def to_dict(self, *, redact_secrets: bool = False) -> dict[str, Any]:
        """The effective values as plain nested dicts; secret values replaced if ``redact_secrets``."""
        out = super().to_dict()
        if redact_secrets:
            for key in self._schema.keys.values():
                if key.secret:
                    node = out
                    for part in key.section.split("."):
                        node = node[part]
                    node[key.leaf] = "<secret>"
        return out


def _sections(name: str, tree: dict[str, Any]) -> dict[str, Any]:
    prefix = f"{name}." if name else ""
    return {
        part: Section(prefix + part, _sections(prefix + part, child)) if isinstance(child, dict) else child
        for part, child in tree.items()
    }


class _Problems:
    """Where the loader puts what it finds: errors (raised at once, or all at the end) and notices."""

    def __init__(self, collect: bool) -> None:
        self.collect = collect
        self.errors: list[ConfigError] = []
        self.notices: list[str] = []

    def error(self, exc: ConfigError) -> None:
        if not self.collect:
            raise exc
        self.errors.append(exc)


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
    *,
    schema: Schema = SCHEMA,
    all_errors: bool = False,
) -> Config:
    """Merge defaults < YAML file ``path`` < ``env`` (default ``os.environ``) < ``--set`` overrides.

    ``overrides`` are ``"key=value"`` strings whose values are read as YAML scalars. Raises
    ``ConfigError`` for the first unknown key, bad value, unknown ``FLUXMQ_`` variable or YAML error;
    with ``all_errors`` it reads on and raises ``ConfigErrors`` carrying every problem (``.errors``).
    Settings of the reference documents fluxmq accepts but does not implement become ``notices``.
    """
    values: dict[str, Any] = dict(schema.defaults)
    origins = dict.fromkeys(schema.keys, DEFAULT_SOURCE)
    problems = _Problems(all_errors)
    if path is not None:
        try:
            _apply_file(schema, os.fspath(path), values, origins, problems)
        except ConfigError as exc:  # the file as a whole: unreadable, not YAML, not a mapping
            problems.error(exc)
    _apply_env(schema, os.environ if env is None else env, values, origins, problems)
    _apply_overrides(schema, overrides, values, origins, problems)
    if problems.errors:
        raise problems.errors[0] if len(problems.errors) == 1 else ConfigErrors(problems.errors)
    return Config(values, origins, schema, problems.notices)


# -- the file ---------------------------------------------------------------------------------------


def _apply_file(
    schema: Schema, path: str, values: dict[str, Any], origins: dict[str, str], problems: _Problems
) -> None:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(
            "config file",
            "a readable YAML file",
            path,
            problem=f"cannot read the file: {exc.strerror or exc}",
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            "config file", "UTF-8 YAML", path, problem=f"not UTF-8 text (byte {exc.start})"
        ) from None
    try:
        data = YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        what = "; ".join(p for p in (exc.problem, exc.context) if p) or "invalid YAML"
        raise ConfigError(
            "yaml syntax", "valid YAML", path, line, problem=f"YAML syntax error: {what}"
        ) from None
    except YAMLError as exc:
        raise ConfigError(
            "yaml syntax", "valid YAML", path, problem=f"YAML syntax error: {_one_line(str(exc))}"
        ) from None
    if data is None:
        return
    if not isinstance(data, Mapping):
        raise ConfigError(
            "(top level)",
            "a mapping of sections",
            path,
            1,
            problem=f"expected a mapping of sections, got {_describe(data)}",
        )
    _walk(schema, data, "", path, values, origins, problems)


def _walk(
    schema: Schema,
    mapping: Mapping[Any, Any],
    prefix: str,
    path: str,
    values: dict[str, Any],
    origins: dict[str, str],
    problems: _Problems,
) -> None:
    for name, value in mapping.items():
        try:
            _walk_item(schema, name, value, _line_of(mapping, name), prefix, path, values, origins, problems)
        except ConfigError as exc:
            problems.error(exc)


def _walk_item(
    schema: Schema,
    name: Any,
    value: Any,
    line: int | None,
    prefix: str,
    path: str,
    values: dict[str, Any],
    origins: dict[str, str],
    problems: _Problems,
) -> None:
    dotted = f"{prefix}{name}"
    if not isinstance(name, str):
        raise ConfigError(dotted, "a known key", path, line, problem=_unknown(schema, dotted))
    key = schema.keys.get(dotted)
    if key is not None:
        if key.secret:
            raise ConfigError(
                dotted,
                "no value in the file",
                path,
                line,
                problem=f"is a secret and may only be set from the environment ({key.env})",
            )
        raw = plain_scalar(value)
        alias = compat.VALUE_ALIASES.get(dotted, {}).get(raw) if isinstance(raw, str) else None
        if alias is not None:
            problems.notices.append(
                f"{dotted} ({_where(path, line)}): {raw!r} is read as {alias!r} "
                f"(fluxmq's implementation of it)"
            )
            raw = alias
        values[dotted] = _convert(key, key.type.from_yaml, raw, path, line)
        origins[dotted] = _where(path, line)
    elif dotted in schema.sections:
        if value is None:  # a section whose keys are all commented out
            return
        if not isinstance(value, Mapping):
            raise ConfigError(
                dotted,
                f"a mapping of {dotted}.* keys",
                path,
                line,
                problem=f"expected a mapping of {dotted}.* keys, got {_describe(value)}",
            )
        _walk(schema, value, dotted + ".", path, values, origins, problems)
    elif compat.not_implemented(dotted):
        problems.notices.append(
            f"{dotted} ({_where(path, line)}): documented by the reference but not "
            "implemented yet in fluxmq; ignored"
        )
    else:
        raise ConfigError(dotted, "a known key", path, line, problem=_unknown(schema, dotted))


def _where(path: str, line: int | None) -> str:
    return f"{path}:{line}" if line is not None else path


def _line_of(mapping: Mapping[Any, Any], name: object) -> int | None:
    lc = getattr(mapping, "lc", None)
    try:
        return lc.key(name)[0] + 1 if lc is not None else None
    except (KeyError, TypeError):
        return None


# -- the environment --------------------------------------------------------------------------------


def _apply_env(
    schema: Schema,
    env: Mapping[str, str],
    values: dict[str, Any],
    origins: dict[str, str],
    problems: _Problems,
) -> None:
    # Sorted, so FLUXMQ_DEBUG (an alias of log.debug) comes before FLUXMQ_LOG_DEBUG, which then wins.
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        key = schema.env.get(name)
        alias = compat.ENV_ALIASES.get(name)
        if key is None and alias is not None:
            key = schema.keys.get(alias)
        source = f"env {name}"
        try:
            if key is None:
                if name in schema.env_allowed or compat.env_ignored(name, env):
                    continue
                near = schema.suggest_env(name)
                hint = f"did you mean {near}? " if near else ""
                raise ConfigError(
                    name,
                    "a known FLUXMQ_ variable",
                    "env",
                    problem=f"no config key maps to this variable; {hint}to pass it on purpose, "
                    f"list it in {compat.ENV_IGNORE} (comma-separated, PREFIX* allowed)",
                )
            values[key.name] = _convert(key, key.type.from_text, env[name], source, None)
            origins[key.name] = source
        except ConfigError as exc:
            problems.error(exc)


# -- the command line -------------------------------------------------------------------------------

_SCALAR = YAML(typ="safe", pure=True)


def _apply_overrides(
    schema: Schema,
    overrides: Sequence[str],
    values: dict[str, Any],
    origins: dict[str, str],
    problems: _Problems,
) -> None:
    if isinstance(overrides, str):  # a lone "k=v" would otherwise be read character by character
        overrides = (overrides,)
    for item in overrides:
        try:
            _apply_override(schema, item, values, origins)
        except ConfigError as exc:
            problems.error(exc)


def _apply_override(schema: Schema, item: str, values: dict[str, Any], origins: dict[str, str]) -> None:
    """One ``--set key=value``."""
    name, sep, raw = item.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ConfigError(item, "key=value", CLI_SOURCE, problem=f"expected key=value, got {item!r}")
    key = schema.keys.get(name)
    if key is None:
        if name in schema.sections:
            raise ConfigError(
                name, "a key", CLI_SOURCE, problem=f"is a section; set one of its keys ({name}.<key>=value)"
            )
        raise ConfigError(name, "a known key", CLI_SOURCE, problem=_unknown(schema, name))
    if key.secret:
        raise ConfigError(
            name,
            "no value on the command line",
            CLI_SOURCE,
            problem=f"is a secret and may only be set from the environment ({key.env})",
        )
    values[name] = _convert(key, lambda raw, key=key: _cli_value(key, raw), raw, CLI_SOURCE, None)
    origins[name] = CLI_SOURCE


def _cli_value(key: Key, raw: str) -> Any:
    """A ``--set`` value read as a YAML scalar, falling back to the text for lenient types."""
    text = raw.strip()
    if not text:
        return key.type.from_text("")
    try:
        parsed = _SCALAR.load(text)
    except YAMLError:
        parsed = text
    if isinstance(parsed, str):
        return key.type.from_text(parsed)
    try:
        return key.type.from_yaml(parsed)
    except ValueError:
        # 1/0 for a boolean, 123 for a string: the text is what the user meant.
        return key.type.from_text(text)


# -- errors -----------------------------------------------------------------------------------------


def _convert(key: Key, parse: Callable[[Any], Any], raw: Any, source: str, line: int | None) -> Any:
    if raw is None:
        raise ConfigError(
            key.name, key.type.expected, source, line, problem=f"has no value; expected {key.type.expected}"
        )
    try:
        return parse(raw)
    except ItemError as exc:
        # A fault inside a list of mappings: name the item's path and line, not only the key's.
        raise ConfigError(
            f"{key.name}{exc.path}",
            key.type.expected,
            source,
            exc.line if exc.line is not None else line,
            problem=exc.problem,
        ) from None
    except ValueError as exc:
        detail = f" ({exc})" if str(exc) else ""
        raise ConfigError(
            key.name,
            key.type.expected,
            source,
            line,
            got=raw,
            problem=f"expected {key.type.expected}{detail}, got {_describe(raw)}",
        ) from None


def _unknown(schema: Schema, dotted: str) -> str:
    near = schema.suggest(dotted)
    return f"unknown key; did you mean {near}?" if near else "unknown key"


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(plain_scalar(value))


def _one_line(text: str) -> str:
    return " ".join(text.split())
