"""Opening an LMDB store (fluxmq/storage/lmdb_env.py, through LMDBStorage): a new directory is
initialised; a bad one is refused with one clear line and never wiped, and not left locked."""

from __future__ import annotations

import struct
from pathlib import Path

import lmdb
import pytest

from fluxmq.errors import StorageError
from fluxmq.storage.lmdb import MAGIC, SCHEMA_VERSION, LMDBStorage


def test_new_directory_is_initialised_with_magic_and_schema(tmp_path: Path) -> None:
    s = LMDBStorage(tmp_path / "new")
    with s.env.begin() as txn:
        meta = s.env.open_db(b"meta", txn=txn, create=False)
        assert txn.get(b"magic", db=meta) == b"fluxmq-storage"
        assert struct.unpack("<I", txn.get(b"schema_version", db=meta))[0] == SCHEMA_VERSION
    state = s.load()
    assert state.sessions == {} and state.retained == []
    s.close()


# -- bad directories: one clear line, never a wipe ---------------------------------------------------


def test_foreign_lmdb_environment_is_refused(tmp_path: Path) -> None:
    env = lmdb.open(str(tmp_path), max_dbs=2)
    with env.begin(write=True) as txn:
        txn.put(b"someone", b"else's data")
    env.close()
    with pytest.raises(StorageError, match="not a fluxmq store"):
        LMDBStorage(tmp_path)
    env = lmdb.open(str(tmp_path))
    with env.begin() as txn:
        assert txn.get(b"someone") == b"else's data"  # untouched
    env.close()


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    s = LMDBStorage(tmp_path)
    with s.env.begin(write=True) as txn:
        txn.put(b"schema_version", struct.pack("<I", SCHEMA_VERSION + 1), db=s._dbs[0])
    s.abort()
    with pytest.raises(StorageError, match=f"newer fluxmq \\(schema version {SCHEMA_VERSION + 1}"):
        LMDBStorage(tmp_path)


def test_wrong_magic_is_refused(tmp_path: Path) -> None:
    s = LMDBStorage(tmp_path)
    with s.env.begin(write=True) as txn:
        txn.put(b"magic", b"other-product", db=s._dbs[0])
    s.abort()
    with pytest.raises(StorageError, match="not a fluxmq store"):
        LMDBStorage(tmp_path)


@pytest.mark.parametrize("content", [b"", b"\x00" * 8192, b"this is not an lmdb file at all" * 500])
def test_damaged_data_file_is_refused_and_kept(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "data.mdb").write_bytes(content)
    with pytest.raises(StorageError, match="data.mdb") as err:
        LMDBStorage(tmp_path)
    assert "\n" not in str(err.value)
    assert (tmp_path / "data.mdb").read_bytes() == content


def test_a_second_process_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    first = LMDBStorage(tmp_path)
    with pytest.raises(StorageError, match="in use by another fluxmq process"):
        LMDBStorage(tmp_path)
    first.close()
    LMDBStorage(tmp_path).close()  # free again once the holder closed (or died)


def test_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(StorageError, match="is a file"):
        LMDBStorage(path)


def test_a_refused_directory_is_not_left_locked(tmp_path: Path) -> None:
    """The lock taken before the checks is released when one refuses the store: once the cause is
    gone the same process opens it (a leaked lock file would refuse it as in use)."""
    s = LMDBStorage(tmp_path)
    with s.env.begin(write=True) as txn:
        txn.put(b"magic", b"other-product", db=s._dbs[0])
    s.abort()
    with pytest.raises(StorageError, match="not a fluxmq store"):
        LMDBStorage(tmp_path)
    env = lmdb.open(str(tmp_path), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(b"magic", MAGIC, db=env.open_db(b"meta", txn=txn))
    env.close()
    LMDBStorage(tmp_path).close()
