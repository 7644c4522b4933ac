"""Opening a store's LMDB environment: the data directory and its lock (one fluxmq process per
directory), a damaged ``data.mdb`` refused before this process maps it, and the sub-databases of
``lmdb_layout`` created, checked against the schema version, or upgraded from an older one."""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import lmdb

from fluxmq.errors import StorageError

from .lmdb_layout import _ADDED_IN, _F64, _U32, DB_NAMES, MAGIC, META, SCHEMA_VERSION

log = logging.getLogger("fluxmq.storage")

# Run in a child process before an existing store is opened: LMDB has no checksums and can abort()
# the process on some damaged pages, which in the worker would become a restart loop. The child
# reads every page of every database (read-only, without the lock file); a crash or error there
# refuses the directory with one line instead.
_VERIFY = """
import sys, lmdb
env = lmdb.open(sys.argv[1], readonly=True, lock=False, max_dbs=64, subdir=True)
n = 0
with env.begin(buffers=True) as txn:
    names = [bytes(k) for k, _ in txn.cursor()]
    for name in names:
        try:
            db = env.open_db(name, txn=txn, create=False)
        except lmdb.Error:
            continue
        for k, v in txn.cursor(db):
            n += len(v) > -1
print(n)
"""
VERIFY_TIMEOUT = 600.0


def where(path: Path) -> str:
    """How errors name the store."""
    return f"storage.path {path}"


def make_directory(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise StorageError(f"{where(path)} is a file, not a data directory; refusing to use it")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"{where(path)}: cannot create the data directory: {exc.strerror}") from None


def lock_directory(path: Path) -> IO:
    """One fluxmq process per data directory: a second node on the same path is refused (LMDB
    itself would let both write). The lock dies with the process, so a killed node's directory
    is free for its restart. Returns the open lock file: the lock is held until it is closed."""
    lock = open(path / "fluxmq.lock", "a+")  # noqa: SIM115 - held until the store closes
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise StorageError(f"{where(path)} is in use by another fluxmq process (pid {holder})") from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def open_environment(path: Path, map_size: int, durable: bool, verify: bool) -> lmdb.Environment:
    """The LMDB environment in ``path`` (made and locked), with a map of ``map_size`` bytes and
    synchronous commits when ``durable``; ``verify`` reads an existing store in a child first."""
    data = path / "data.mdb"
    if data.exists() and data.stat().st_size == 0:
        raise StorageError(
            f"{where(path)}: data.mdb is empty (damaged); refusing to use it, "
            "move it away to start with an empty store"
        )
    if verify and data.exists():
        verify_in_child(path)
    try:
        return lmdb.open(
            str(path),
            map_size=map_size,
            max_dbs=len(DB_NAMES) + 2,
            subdir=True,
            sync=durable,
            metasync=durable,
            readahead=False,
            meminit=False,
            max_spare_txns=2,
        )
    except lmdb.InvalidError:
        raise StorageError(
            f"{where(path)}: data.mdb is not an LMDB file (damaged or foreign); refusing to use it"
        ) from None
    except lmdb.VersionMismatchError:
        raise StorageError(f"{where(path)}: data.mdb was written by an incompatible LMDB version") from None
    except (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.PanicError):
        raise StorageError(f"{where(path)}: data.mdb is damaged; refusing to use it") from None
    except lmdb.Error as exc:
        raise StorageError(f"{where(path)}: cannot open the LMDB environment: {exc}") from None


def verify_in_child(path: Path) -> None:
    try:
        done = subprocess.run(
            [sys.executable, "-c", _VERIFY, str(path)],
            capture_output=True,
            text=True,
            timeout=VERIFY_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise StorageError(
            f"{where(path)}: reading the store took over {VERIFY_TIMEOUT:.0f}s; refusing to use it"
        ) from None
    if done.returncode < 0:
        raise StorageError(
            f"{where(path)}: data.mdb is damaged (LMDB crashed reading it, signal "
            f"{-done.returncode}); refusing to use it"
        )
    # A clean error (not an LMDB file, damaged page): the open and load report it precisely.


def open_dbs(env: lmdb.Environment, path: Path) -> list:
    """The sub-databases of DB_NAMES, in order: created in an empty environment, else checked
    (magic, schema version) and upgraded when older. The caller closes ``env`` on an error."""
    try:
        with env.begin(write=True) as txn:
            names = [bytes(k) for k, _ in txn.cursor()]
            if b"meta" not in names:
                if names:
                    raise StorageError(
                        f"{where(path)}: holds an LMDB environment that is not a fluxmq "
                        f"store (no meta record; found {len(names)} other keys); "
                        "refusing to use it"
                    )
                dbs = [env.open_db(name, txn=txn) for name in DB_NAMES]
                txn.put(b"magic", MAGIC, db=dbs[META])
                txn.put(b"schema_version", _U32.pack(SCHEMA_VERSION), db=dbs[META])
                txn.put(b"created", _F64.pack(time.time()), db=dbs[META])
                log.info("storage_created", extra={"path": str(path), "schema_version": SCHEMA_VERSION})
                return dbs
            meta = env.open_db(b"meta", txn=txn, create=False)
            magic = txn.get(b"magic", db=meta)
            if magic != MAGIC:
                raise StorageError(
                    f"{where(path)}: the LMDB environment is not a fluxmq store "
                    f"(magic {magic!r}); refusing to use it"
                )
            raw = txn.get(b"schema_version", db=meta)
            version = _U32.unpack(raw)[0] if raw and len(raw) == 4 else None
            if version is None:
                raise StorageError(
                    f"{where(path)}: the store has no valid schema_version; refusing to use it"
                )
            if version > SCHEMA_VERSION:
                raise StorageError(
                    f"{where(path)}: written by a newer fluxmq (schema version {version}, "
                    f"this build reads up to {SCHEMA_VERSION}); refusing to use it"
                )
            if version < SCHEMA_VERSION:
                _migrate(env, path, txn, meta, version, names)
            return [env.open_db(name, txn=txn) for name in DB_NAMES]
    except StorageError:
        raise
    except (
        lmdb.CorruptedError,
        lmdb.PageNotFoundError,
        lmdb.PanicError,
        lmdb.InvalidError,
        lmdb.BadValsizeError,
        lmdb.IncompatibleError,
    ):
        raise StorageError(f"{where(path)}: data.mdb is damaged; refusing to use it") from None
    except lmdb.Error as exc:
        raise StorageError(f"{where(path)}: cannot read the store: {exc}") from None


def _migrate(env: lmdb.Environment, path: Path, txn, meta, version: int, names: list[bytes]) -> None:
    """Upgrade an older store in the opening transaction: create the sub-databases later
    versions added (empty) and record the new version. Older builds refuse the result (their
    "newer schema" check), so the upgrade is logged."""
    for step in range(version + 1, SCHEMA_VERSION + 1):
        for name in _ADDED_IN.get(step, ()):
            if name not in names:
                env.open_db(name, txn=txn)
    txn.put(b"schema_version", _U32.pack(SCHEMA_VERSION), db=meta)
    log.warning(
        "storage_upgraded",
        extra={"path": str(path), "from_version": version, "to_version": SCHEMA_VERSION},
    )
