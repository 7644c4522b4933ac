"""README.rst stays true: its config key table is the schema's, and it names the two set-up commands."""

from __future__ import annotations

from pathlib import Path

from fluxmq.config.schema import SCHEMA, readme_with_table

README = Path(__file__).resolve().parent.parent / "README.rst"


def test_readme_config_table_is_current():
    text = README.read_text(encoding="utf-8")
    assert readme_with_table(text, SCHEMA.readme_table()) == text, (
        "README.rst's key table is stale: run python -m fluxmq.config.schema --update-readme README.rst"
    )


def test_readme_names_the_two_setup_commands():
    text = README.read_text(encoding="utf-8")
    assert "scripts/run" in text and "scripts/test" in text
