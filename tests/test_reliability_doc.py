"""docs/reliability.rst stays true: every test it names as holding a promise exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.rst"
REF = re.compile(r"``(tests/[\w/]+\.py)::(\w+)``")


def _defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")
    }


def test_every_named_test_exists() -> None:
    refs = REF.findall(DOC.read_text(encoding="utf-8"))
    assert len(refs) >= 20, "docs/reliability.rst names the tests that hold each promise"
    missing = []
    cache: dict[str, set[str]] = {}
    for file, name in refs:
        path = ROOT / file
        if not path.is_file():
            missing.append(f"{file} (no such file)")
            continue
        if file not in cache:
            cache[file] = _defined_tests(path)
        if name not in cache[file]:
            missing.append(f"{file}::{name}")
    assert not missing, f"docs/reliability.rst names tests that do not exist: {missing}"


def test_every_promise_names_a_test() -> None:
    """Each promise (a ``*`` item under a section) carries at least one test reference."""
    text = DOC.read_text(encoding="utf-8")
    items = re.split(r"\n(?=\* )", text)
    bare = [item.splitlines()[0] for item in items[1:] if not REF.search(item)]
    assert not bare, f"promises without a test: {bare}"
