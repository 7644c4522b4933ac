"""The storage tests' shared fixture: ``node``, a broker over a real LMDBStorage in a tmp directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.storage.lmdb_node import Node


@pytest.fixture
def node(tmp_path: Path):
    n = Node(tmp_path / "data")
    yield n
    try:
        n.storage.abort()
    except Exception:
        pass
