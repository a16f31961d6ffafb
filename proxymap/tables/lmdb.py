"""LMDB tables: ``lmdb:NAME`` kept in the single file ``NAME.lmdb``.

NAME
    lmdb -- OpenLDAP LMDB table (Postfix dict_lmdb)

SYNOPSIS
    lmdb:/etc/postfix/virtual -> /etc/postfix/virtual.lmdb

DESCRIPTION
    The file is opened the way Postfix opens it: no sub-directory and no LMDB lock file
    (``subdir=False, lock=False``); Postfix's own file lock replaces LMDB's reader table.
    The table is "multi-writer" (open reply carries MULTI_WRITER): several processes may
    update it, and commits by others are visible to the next read transaction because
    each lookup reads the shared mapping in a fresh transaction. Only a replaced or
    removed file counts as a change.

    Map size: a reader adopts the size recorded in the file; a writer starts from
    ``lmdb_map_size`` (default 16 MiB) or the file's size if larger, doubles it when a
    commit does not fit, and a reader adopts a map grown by another process.

    A file that LMDB refuses, an empty file opened for reading, or a file shorter than
    the pages its tree counts (truncated: reading it through the mapping would kill
    the process with SIGBUS) is an open error naming the file and the remedy
    (indexed, DAMAGED FILES). The check is a lower bound: a file cut short by less
    than its free pages passes it.

    An empty or over-long key is "not found" (LMDB rejects such keys; Postfix would
    abort). Sequence walks the keys in order; each step is its own transaction and
    continues after the last key returned, so no transaction spans two requests.

LOCKING
    With the LOCK request flag, a shared ``fcntl`` lock (exclusive for updates) covers
    each access -- the lock ``postmap`` holds while it rebuilds the table; in a worker,
    a read keeps it until the event-loop turn ends (indexed LOCKING). A writable
    instance locks every access, flag or not: the file is opened without LMDB's own
    lock file, so two proxywrite processes (a process limit above 1) committing at
    once would corrupt it, and verify(8) and postscreen(8) ask for OPEN_LOCK (which
    the handler keeps from tables), not LOCK.

SEE ALSO
    indexed.py, docs/TABLES.md 3.2, postmap(1).
"""

from __future__ import annotations

import fcntl
import os
from typing import cast

import lmdb

from proxymap import flags as F
from proxymap.tables.base import DictConfig, DictOpenError, DictRetry, OpenContext
from proxymap.tables.indexed import IndexedFileTable, damaged_error

DEFAULT_MAP_SIZE = 16 * 1024 * 1024  # Postfix lmdb_map_size


class LmdbTable(IndexedFileTable["SharedEnvironment"]):
    """``lmdb:NAME``: LMDB file ``NAME.lmdb``."""

    dict_type = "lmdb"
    suffix = ".lmdb"
    impl_flags = F.FIXED | F.MULTI_WRITER
    reopen_on_rewrite = False  # commits are visible through the shared mapping

    def __init__(self, name: str, open_mode: int, flags: int, ctx: OpenContext) -> None:
        self._map_size = _configured_map_size(ctx)
        self._last_key: bytes | None = None
        super().__init__(name, open_mode, flags, ctx)
        self.always_lock = self.writable  # see LOCKING

    def changed(self) -> bool:
        # Only replacement or removal counts (base rule for MULTI_WRITER); the bit is ours
        # to keep even when a request's flag word forgot it.
        self.flags |= F.MULTI_WRITER
        return super().changed()

    # --- locking: fcntl on the .lmdb file, like postmap ------------------------------------
    def _lock(self, fd: int, exclusive: bool, wait: bool = True) -> None:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        fcntl.lockf(fd, mode if wait else mode | fcntl.LOCK_NB)

    def _unlock(self, fd: int) -> None:
        fcntl.lockf(fd, fcntl.LOCK_UN)

    # --- backend ----------------------------------------------------------------------------
    def _backend_open(self, fd: int, create: bool, truncate: bool) -> SharedEnvironment:
        # A reader adopts the size recorded in the file (0); a writer may need more.
        map_size = max(self._map_size, os.fstat(fd).st_size) if self.writable else 0

        def open_environment(writable: bool) -> lmdb.Environment:
            return lmdb.open(
                self.path,
                subdir=False,
                lock=False,
                readonly=not writable,
                create=create,
                map_size=map_size if writable else 0,
                max_dbs=0,
                sync=False,
                readahead=False,
                meminit=False,
            )

        size = os.fstat(fd).st_size
        if size == 0 and not self.writable:
            raise damaged_error(self.path, "empty file")
        try:
            shared = SharedEnvironment.acquire(fd, self.writable, open_environment)
        except (
            lmdb.InvalidError,
            lmdb.CorruptedError,
            lmdb.PageNotFoundError,
            lmdb.VersionMismatchError,
        ) as exc:
            raise damaged_error(self.path, _reason(exc))
        except lmdb.Error as exc:
            raise DictOpenError(f"open database {self.path}: {_reason(exc)}")
        if size and size < _used_bytes(shared.env):
            shared.release()
            raise damaged_error(self.path, f"truncated to {size} bytes")
        if truncate:
            with shared.env.begin(write=True) as txn:
                txn.drop(shared.env.open_db(), delete=False)
        return shared

    def _backend_close(self) -> None:
        self._live_handle().release()

    def _read(self, operation):
        """Run ``operation(txn)`` in a fresh read transaction (sees the latest commit)."""
        env: lmdb.Environment = self._live_handle().env
        for _attempt in range(2):
            try:
                with env.begin(buffers=False) as txn:
                    return operation(txn)
            except lmdb.MapResizedError:
                env.set_mapsize(0)  # another process grew the map: adopt its size
            except lmdb.Error as exc:
                raise DictRetry(f"error reading {self.path}: {_reason(exc)}")
        raise DictRetry(f"error reading {self.path}: map resized repeatedly")

    def _write(self, operation):
        """Run ``operation(txn)`` in a write transaction, growing the map when full."""
        env: lmdb.Environment = self._live_handle().env
        while True:
            try:
                with env.begin(write=True) as txn:
                    return operation(txn)
            except lmdb.MapFullError:
                env.set_mapsize(env.info()["map_size"] * 2)
            except lmdb.MapResizedError:
                env.set_mapsize(0)
            except lmdb.BadValsizeError as exc:
                raise DictConfig(f"error writing {self.path}: {_reason(exc)}")
            except lmdb.Error as exc:
                raise DictRetry(f"error writing {self.path}: {_reason(exc)}")

    def _backend_get(self, raw_key: bytes) -> bytes | None:
        env: lmdb.Environment = self._live_handle().env
        if not raw_key or len(raw_key) > env.max_key_size():
            return None
        try:  # _read's first attempt, without the closure: this is every lookup
            with env.begin(buffers=False) as txn:
                return txn.get(raw_key)
        except lmdb.Error:
            return self._read(lambda txn: txn.get(raw_key))  # resized map, or the error

    def _backend_put(self, raw_key: bytes, raw_value: bytes, replace: bool) -> bool:
        return self._write(lambda txn: txn.put(raw_key, raw_value, overwrite=replace))

    def _backend_remove(self, raw_key: bytes) -> bool:
        if not raw_key or len(raw_key) > self._live_handle().env.max_key_size():
            return False
        return self._write(lambda txn: txn.delete(raw_key))

    def _backend_sync(self) -> None:
        try:
            self._live_handle().env.sync(True)
        except lmdb.Error as exc:
            raise DictRetry(f"error syncing {self.path}: {_reason(exc)}")

    def _backend_first(self) -> tuple[bytes, bytes] | None:
        return self._remember(self._read(lambda txn: _first(txn.cursor())))

    def _backend_next(self) -> tuple[bytes, bytes] | None:
        last = self._last_key
        if last is None:
            return None
        return self._remember(self._read(lambda txn: _after(txn.cursor(), last)))

    def _remember(self, item: tuple[bytes, bytes] | None) -> tuple[bytes, bytes] | None:
        self._last_key = None if item is None else item[0]
        return item


class SharedEnvironment:
    """The one ``lmdb.Environment`` of a file in this process, shared by its tables.

    The binding refuses to open a file twice in one process (LMDB's own rule), yet the
    server may hold several instances of one table (different instance flags, read and
    write). They share the environment; the last release closes it. A read-only
    environment is upgraded when a writer arrives. Environments must not cross a
    fork: open tables in the process that uses them.
    """

    _by_file: dict[tuple[int, int], SharedEnvironment] = {}

    def __init__(self, key: tuple[int, int], env: lmdb.Environment, writable: bool) -> None:
        self.key, self.env, self.writable, self.users = key, env, writable, 0

    @classmethod
    def acquire(cls, fd: int, writable: bool, open_environment) -> SharedEnvironment:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        shared = cls._by_file.get(key)
        if shared is None:
            shared = cls(key, open_environment(writable), writable)
            cls._by_file[key] = shared
        elif writable and not shared.writable:
            shared.env.close()
            try:
                shared.env, shared.writable = open_environment(True), True
            except lmdb.Error:
                shared.env = open_environment(False)  # keep serving the readers
                raise
        shared.users += 1
        return shared

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            self.env.close()
            self._by_file.pop(self.key, None)


def _used_bytes(env: lmdb.Environment) -> int:
    """The least size of a sound file: the two meta pages and every page of the tree.

    These are distinct pages, so a sound file holds them all; the last page number in
    use is no bound (pages freed in the transaction that allocated them are never
    written, so a sound file may end before it).
    """
    stat = env.stat()
    pages = 2 + stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
    return pages * stat["psize"]


def _first(cursor: lmdb.Cursor) -> tuple[bytes, bytes] | None:
    return _item(cursor) if cursor.first() else None


def _after(cursor: lmdb.Cursor, last: bytes) -> tuple[bytes, bytes] | None:
    if not cursor.set_range(last):
        return None
    if cursor.key() == last and not cursor.next():
        return None
    return _item(cursor)


def _item(cursor: lmdb.Cursor) -> tuple[bytes, bytes]:
    # ``_read`` begins its transactions with buffers=False: the binding returns bytes
    # (its annotations also allow the memoryviews of buffers=True).
    return cast(tuple[bytes, bytes], cursor.item())


def _configured_map_size(ctx: OpenContext) -> int:
    try:
        return max(int(ctx.params.get("lmdb_map_size", DEFAULT_MAP_SIZE)), 1 << 16)
    except (TypeError, ValueError):
        return DEFAULT_MAP_SIZE


def _reason(exc: lmdb.Error) -> str:
    """LMDB's message without the leading ``path:`` the binding puts there."""
    text = str(exc)
    head, sep, tail = text.partition(": ")
    return tail if sep and ("/" in head or head.endswith(".lmdb")) else text
