"""Berkeley DB tables: ``hash:NAME`` and ``btree:NAME`` (both kept in ``NAME.db``).

NAME
    bdb -- Berkeley DB hash and btree tables (Postfix dict_db)

SYNOPSIS
    hash:/etc/postfix/virtual       -> /etc/postfix/virtual.db, DB_HASH
    btree:/var/lib/postfix/verify   -> /var/lib/postfix/verify.db, DB_BTREE

DESCRIPTION
    Files are read and written with the ``berkeleydb`` binding (libdb 5.3, the library
    Debian's postmap links), so a file built by ``postmap`` is read byte for byte and a
    file written here is read by ``postmap -q``/``-s``. Keys and values follow the
    trailing-NUL convention of ``indexed``. Opening a hash table on a btree file (or
    the reverse), a missing, empty or corrupt file is an open error shaped like
    Postfix's: ``open database /p/name.db: Invalid argument``.

    Sequence walks the database order (hash: bucket order; btree: key order).

    Cache: ``berkeley_db_read_buffer_size`` (128 KiB), and for a read-only instance at
    least the size of its file up to 2 MiB: then a lookup reads no page from the file
    (with 128 KiB, three lookups in four did a ``pread``), at the cost of memory in
    each worker for the pages it reads.

    A file opened for writing (proxywrite: the verify and postscreen caches) is first
    checked with the library's verifier (a few milliseconds per megabyte, once per
    open): libdb 5.3 crashes the process when it updates a garbled hash page, and
    what a full disk leaves behind must not take the service down. A damaged file is
    an open error naming the file and the remedy (indexed, DAMAGED FILES).

LOCKING
    Each access holds ``flock(LOCK_SH)`` (``LOCK_EX`` for update/delete) on ``NAME.db``,
    the lock ``postmap`` takes exclusively while it rebuilds the file in place; in a
    worker, a read keeps it until the event-loop turn ends (indexed LOCKING). Postfix
    locks only when the request carries LOCK (every stock client does); we lock always,
    because an unlocked read racing a rebuild can crash the process. Berkeley DB caches
    pages inside the process, so after such a rebuild the handle is reopened (see
    ``indexed``) instead of reading stale pages.

SEE ALSO
    indexed.py, docs/TABLES.md 3.1, postmap(1).
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable

from berkeleydb import db as bdb

from proxymap.tables.base import DictOpenError, DictRetry, OpenContext
from proxymap.tables.indexed import IndexedFileTable, damaged_error, open_error

# The generic meta-page header: LSN, page number, magic (offset 12), version, page size.
_META_SIZE = 24

# Postfix's berkeley_db_read_buffer_size (the create buffer size applies to postmap).
DEFAULT_CACHE_SIZE = 128 * 1024
# A reader's cache holds the whole file up to this size (more when configured): with
# Postfix's 128 KiB, three lookups in four read a page with pread(2).
READER_CACHE_LIMIT = 2 * 1024 * 1024


class _BerkeleyTable(IndexedFileTable[bdb.DB]):
    """Common code of hash and btree; subclasses choose the access method."""

    suffix = ".db"
    access_method = bdb.DB_UNKNOWN
    magic = 0  # the access method's number in the file's first page
    always_lock = True  # see indexed LOCKING: an unlocked read during a rebuild can SIGBUS

    def __init__(self, name: str, open_mode: int, flags: int, ctx: OpenContext) -> None:
        self._cache_size = _cache_size(ctx)
        self._cursor: bdb.DBCursor | None = None
        self._last_key: bytes | None = None
        super().__init__(name, open_mode, flags, ctx)

    # --- locking: flock on the .db file, like postmap -----------------------------------------
    def _lock(self, fd: int, exclusive: bool, wait: bool = True) -> None:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        fcntl.flock(fd, mode if wait else mode | fcntl.LOCK_NB)

    def _unlock(self, fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

    # --- backend --------------------------------------------------------------------------------
    def _backend_open(self, fd: int, create: bool, truncate: bool) -> bdb.DB:
        handle = bdb.DB()
        handle.set_cachesize(0, self._cache_bytes(fd), 0)
        if self.writable:
            open_flags = (bdb.DB_CREATE if create else 0) | (bdb.DB_TRUNCATE if truncate else 0)
            if not truncate and os.fstat(fd).st_size > 0:
                self._check_magic(fd)
                _verify(self.path)
        else:
            open_flags = bdb.DB_RDONLY
        try:
            handle.open(self.path, dbtype=self.access_method, flags=open_flags, mode=0o644)
        except bdb.DBError as exc:
            handle.close()
            raise _open_error(self.path, exc)
        self._cursor = None
        return handle

    def _cache_bytes(self, fd: int) -> int:
        """The configured cache; a reader's grows to hold its file, up to the limit."""
        if self.writable:
            return self._cache_size
        return max(self._cache_size, min(os.fstat(fd).st_size, READER_CACHE_LIMIT))

    def _check_magic(self, fd: int) -> None:
        """Refuse a file whose first page is not ours before the verifier reads it
        (its parsing of a garbled meta page is the least robust part of libdb)."""
        head = os.pread(fd, _META_SIZE, 0)
        if len(head) < _META_SIZE or self.magic not in (
            int.from_bytes(head[12:16], "little"),
            int.from_bytes(head[12:16], "big"),
        ):
            raise damaged_error(self.path, f"not a Berkeley DB {self.dict_type} file")

    def _backend_close(self) -> None:
        self._close_cursor()
        self._live_handle().close()

    def _backend_get(self, raw_key: bytes) -> bytes | None:
        try:
            return self._live_handle().get(raw_key)
        except bdb.DBError as exc:
            raise self._read_failure(exc)

    library_errors = (bdb.DBError,)

    def _direct_get(self, handle: bdb.DB) -> Callable[[bytes], bytes | None]:
        return handle.get

    def _read_failure(self, exc: Exception) -> DictRetry:
        assert isinstance(exc, bdb.DBError)
        return DictRetry(f"error reading {self.path}: {_reason(exc)}")

    def _backend_put(self, raw_key: bytes, raw_value: bytes, replace: bool) -> bool:
        try:
            if replace:
                self._live_handle().put(raw_key, raw_value)
                return True
            return (
                self._live_handle().put(raw_key, raw_value, flags=bdb.DB_NOOVERWRITE)
                != bdb.DB_KEYEXIST
            )
        except bdb.DBKeyExistError:
            return False
        except bdb.DBError as exc:
            raise DictRetry(f"error writing {self.path}: {_reason(exc)}")

    def _backend_remove(self, raw_key: bytes) -> bool:
        try:
            self._live_handle().delete(raw_key)
            return True
        except bdb.DBNotFoundError:
            return False
        except bdb.DBError as exc:
            raise DictRetry(f"error deleting from {self.path}: {_reason(exc)}")

    def _backend_sync(self) -> None:
        try:
            self._live_handle().sync()
        except bdb.DBError as exc:
            raise DictRetry(f"error syncing {self.path}: {_reason(exc)}")

    def _backend_first(self) -> tuple[bytes, bytes] | None:
        self._close_cursor()
        try:
            self._cursor = self._live_handle().cursor()
            return self._remember(self._cursor.first())
        except bdb.DBError as exc:
            raise DictRetry(f"error reading {self.path}: {_reason(exc)}")

    def _backend_next(self) -> tuple[bytes, bytes] | None:
        try:
            if self._cursor is None:
                return self._resume()
            return self._remember(self._cursor.next())
        except bdb.DBError as exc:
            raise DictRetry(f"error reading {self.path}: {_reason(exc)}")

    def _resume(self) -> tuple[bytes, bytes] | None:
        """Continue a walk whose cursor was lost when the handle was reopened."""
        if self._last_key is None:
            return None
        self._cursor = self._live_handle().cursor()
        if self._cursor.set(self._last_key) is None:
            return None  # the key is gone from the rebuilt file; nothing sensible follows
        return self._remember(self._cursor.next())

    def _remember(self, item: tuple[bytes, bytes] | None) -> tuple[bytes, bytes] | None:
        self._last_key = None if item is None else item[0]
        if item is None:
            self._close_cursor()
        return item

    def _close_cursor(self) -> None:
        if self._cursor is not None:
            try:
                self._cursor.close()
            except bdb.DBError:
                pass
            self._cursor = None


class HashTable(_BerkeleyTable):
    """``hash:NAME`` -- Berkeley DB hash file ``NAME.db``."""

    dict_type = "hash"
    access_method = bdb.DB_HASH
    magic = 0x061561


class BtreeTable(_BerkeleyTable):
    """``btree:NAME`` -- Berkeley DB btree file ``NAME.db`` (sequence in key order)."""

    dict_type = "btree"
    access_method = bdb.DB_BTREE
    magic = 0x053162

    def _resume(self) -> tuple[bytes, bytes] | None:
        # Key order survives a rebuild: continue after the last key returned.
        if self._last_key is None:
            return None
        self._cursor = self._live_handle().cursor()
        item = self._cursor.set_range(self._last_key)
        if item is not None and item[0] == self._last_key:
            item = self._cursor.next()
        return self._remember(item)


def _cache_size(ctx: OpenContext) -> int:
    try:
        return int(ctx.params.get("berkeley_db_read_buffer_size", DEFAULT_CACHE_SIZE))
    except (TypeError, ValueError):
        return DEFAULT_CACHE_SIZE


def _reason(exc: bdb.DBError) -> str:
    """The errno text of a Berkeley DB error (its own detail goes after ``--``)."""
    if exc.args and isinstance(exc.args[0], int) and exc.args[0] > 0:
        return os.strerror(exc.args[0])
    return str(exc.args[-1] if exc.args else exc)


def _open_error(path: str, exc: bdb.DBError) -> DictOpenError:
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
    if code == errno.EINVAL or code < 0:  # refused content, or a library error code
        return damaged_error(path, _reason(exc) if code > 0 else _library_reason(exc))
    if code > 0:
        return open_error(path, OSError(code, os.strerror(code)))
    return DictOpenError(f"open database {path}: {_reason(exc)}")


def _library_reason(exc: bdb.DBError) -> str:
    """Berkeley DB's own words for a non-errno failure, without the path it repeats."""
    text = str(exc.args[1] if len(exc.args) > 1 else exc)
    return text.split(" -- ", 1)[0]


def _verify(path: str) -> None:
    """DB->verify: refuse a file whose structure is damaged (DictOpenError)."""
    checker = bdb.DB()  # verify consumes its handle, whatever the outcome
    try:
        checker.verify(path)
    except bdb.DBError as exc:
        raise damaged_error(path, f"verification failed ({_library_reason(exc)})") from None
