"""``fluxmq.config.files.read_text``: the text of a file a config key names, or one ConfigError
naming the key, the file and the reason (the ACL and password files are read through it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxmq.config.files import read_text
from fluxmq.errors import ConfigError


def test_the_text_of_a_readable_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "acl"
    path.write_text("user alice\ntopic read été/#\n", encoding="utf-8")
    assert read_text("auth.acl_file", "a readable ACL file", str(path)) == "user alice\ntopic read été/#\n"


def test_a_missing_file_names_the_key_the_file_and_the_reason(tmp_path: Path) -> None:
    path = str(tmp_path / "missing")
    with pytest.raises(ConfigError) as info:
        read_text("auth.password_file", "a readable password file", path)
    text = str(info.value)
    assert "auth.password_file" in text and f"cannot read {path}: No such file or directory" in text


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "acl"
    path.write_bytes(b"user \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        read_text("auth.acl_file", "a readable ACL file", str(path))
