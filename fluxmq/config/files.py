"""The files that config keys name (the ACL and password files): their text, or one ``ConfigError``
naming the key, the file and why it could not be read."""

from __future__ import annotations

from fluxmq.errors import ConfigError


def read_text(key: str, what: str, path: str) -> str:
    """The UTF-8 text of ``path``, named by config key ``key`` (``what`` it should be, for the
    error: "a readable ACL file"); ``ConfigError`` when it cannot be read or is not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(key, what, path, problem=f"cannot read {path}: {reason}") from None
