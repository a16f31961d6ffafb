"""Behaviour shared by the indexed-file tables: hash, btree, lmdb and cdb.

NAME
    indexed -- the indexed-file tables: trailing-NUL probing, folding, file freshness

SYNOPSIS
    class HashTable(IndexedFileTable): ...   # implements the _backend_* primitives

DESCRIPTION
    Postfix stores each key and value of an indexed file either with or without one
    terminating NUL byte (postmap on Linux: with, for hash/btree/lmdb; without, for cdb).
    A reader does not know which, so an instance carries two flag bits:

    TRY1NULL
        try ``key + NUL`` first;
    TRY0NULL
        then try ``key`` as is.

    The first hit clears the other bit for the life of the instance: later lookups use
    only the learned form. An instance with neither bit is treated as having both (a
    3.11+ client may send such flags; Postfix would abort). An update on an instance
    that has not learned anything commits to the trailing NUL (the Linux default).
    Values are returned up to their first NUL, so a stored trailing NUL disappears.

    ``IndexedFileTable`` implements lookup/update/delete/sequence once, in these terms,
    on top of a handful of backend primitives. It also keeps the backend handle fresh:
    before each access it compares the file with the one the handle was opened on and
    reopens when it was replaced (``mv new old``, cdb rebuilds) or, for tables whose
    library caches pages (Berkeley DB), rewritten in place by ``postmap``. A file whose
    timestamp is too recent to trust ("racily clean", as git calls it) is reopened on
    every access until it is old enough: two rebuilds within one clock tick would
    otherwise look identical. ``Table.watch``/``changed`` (the restart signal for the
    read-only service) are independent of this and keep the open-time stamp.

DAMAGED FILES
    A file that the library refuses (truncated, garbled, of another type, empty when
    read) is an open error whose message names the file and the remedy; the registry
    logs it once and the table answers RETRY, every other table is served as before.
    A failure met later (a read or write error, a full file system) is logged once,
    as an error with the remedy, until an access succeeds again (then one line says
    so); each failing request is answered RETRY. The drivers check what their library
    would otherwise crash on: Berkeley DB files opened for writing are verified first
    (a garbled hash page makes libdb 5.3 write through wild pointers), and an LMDB
    file shorter than its own page count is refused (reading it would be SIGBUS).

LOCKING
    With the LOCK request flag each access holds a shared lock (exclusive for writes)
    on the table file; ``postmap`` holds an exclusive lock while it rebuilds a file in
    place, so a locked reader never sees a half-written table. The lock style is the
    subclass's (flock for Berkeley DB, fcntl for LMDB, none for cdb). An access does
    not wait for a lock a writer holds: it raises ``DictBusy`` and the request handler
    tries again a little later, serving other requests meanwhile (Postfix waits, and
    with it every client of the process, for as long as the rebuild takes). Berkeley DB
    tables lock even without the flag (``always_lock``): the library maps small
    read-only files, and a rebuild truncating the file under a lookup killed the
    process with SIGBUS in our tests.

    A read-only instance in a worker keeps what its first read in an event-loop turn
    acquired -- the shared lock, and the check that the file is the one the handle
    shows -- for its other reads in that turn, and releases the lock when the turn
    ends (``base.LoopTurn``). A rebuild cannot start meanwhile, so every answer of the
    turn comes from one version of the file, the version the next turn checks again;
    a writer waits for the end of the turn instead of the end of one lookup (flock and
    fcntl let a new shared lock in while a writer waits: with every worker busy it may
    wait for several turns, as it may for several lookups). Writes, and every access
    off the worker's loop, lock and check per access.

SEE ALSO
    bdb.py, lmdb.py, cdb.py; docs/TABLES.md 3.1-3.3; docs/PROTOCOL.md 3.5.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from proxymap import flags as F
from proxymap.tables.base import (
    DictBusy,
    DictConfig,
    DictOpenError,
    DictRetry,
    DictUnsupported,
    OpenContext,
    SyncTable,
)

log = logging.getLogger("proxymap")

NUL = b"\0"
SEQUENCE_FIRST = 0
SEQUENCE_NEXT = 1

# A file stamp taken less than this long after the file's last change cannot tell two
# changes in the same timestamp tick apart. Covers 1-second timestamp filesystems.
RACY_WINDOW_NS = 2_000_000_000

# errno values of a non-blocking lock attempt that met a conflicting lock (flock and
# fcntl say EWOULDBLOCK/EAGAIN; POSIX allows fcntl to say EACCES).
_LOCK_BUSY = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES})

# How much of a read's preparation the current loop turn still holds (ordered).
_TURN_NONE = 0  # nothing: the next read checks the file (and locks, if it must)
_TURN_CHECKED = 1  # the file was checked this turn; no lock is held
_TURN_LOCKED = 2  # checked under a shared lock that is held until the turn ends

T = TypeVar("T")
H = TypeVar("H")  # a backend's handle on the open file


# --- the NUL convention, as pure functions -----------------------------------------------


def initial_flags(flags: int, impl_flags: int) -> int:
    """Flags of a freshly opened instance: the table's own bits, and both TRY bits
    unless the opener chose one."""
    flags |= impl_flags
    if not flags & F.TRY_ANY:
        flags |= F.TRY_ANY
    return flags


def probe(flags: int, fetch: Callable[[bytes], T | None], key: bytes) -> tuple[T | None, int]:
    """Look ``key`` up in the forms ``flags`` allows; return (result, learned flags).

    ``fetch`` returns ``None`` for a miss. The flags returned have the other TRY bit
    cleared after a hit.
    """
    if not flags & F.TRY_ANY:
        flags |= F.TRY_ANY
    if flags & F.TRY1NULL:
        found = fetch(key + NUL)
        if found is not None:
            return found, flags & ~F.TRY0NULL
    if flags & F.TRY0NULL:
        found = fetch(key)
        if found is not None:
            return found, flags & ~F.TRY1NULL
    return None, flags


def storage_form(flags: int) -> tuple[bool, int]:
    """Whether new entries get a trailing NUL, and the flags after committing to it."""
    if not flags & F.TRY_ANY:
        flags |= F.TRY_ANY
    if flags & F.TRY1NULL:
        return True, flags & ~F.TRY0NULL
    return False, flags


def cut_at_nul(data: bytes) -> bytes:
    """The C-string view of stored bytes: everything before the first NUL."""
    end = data.find(NUL)
    return data if end < 0 else data[:end]


# --- file identity --------------------------------------------------------------------------


class FileStamp:
    """What a handle was opened on: content stamps, and whether they can be trusted."""

    __slots__ = ("content", "racy")

    def __init__(self, st: os.stat_result, taken_ns: int) -> None:
        self.content = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        # A later change within the same timestamp tick could leave every stamp equal.
        self.racy = taken_ns - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_WINDOW_NS

    @classmethod
    def of(cls, fd: int) -> FileStamp:
        """The stamp of the open file ``fd`` (what we read, whatever the path says now)."""
        return cls(os.fstat(fd), time.time_ns())


def _same_file(fd: int, other_fd: int) -> bool:
    a, b = os.fstat(fd), os.fstat(other_fd)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def open_error(path: str, exc: BaseException) -> DictOpenError:
    """A Postfix-shaped open failure: ``open database PATH: REASON``."""
    reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc)
    return DictOpenError(f"open database {path}: {reason}")


def damaged_remedy(path: str) -> str:
    """What the operator does about a file the library cannot use."""
    return (
        f"if {path} is a cache (address_verify_map, postscreen_cache_map), remove it: "
        "verify(8) and postscreen(8) create it anew; otherwise rebuild it with postmap(1)"
    )


def damaged_error(path: str, reason: str) -> DictOpenError:
    """The open failure of a damaged (or foreign) file, with the remedy."""
    return DictOpenError(
        f"open database {path}: {reason}: the file is damaged or not of "
        f"this type; {damaged_remedy(path)}"
    )


_NO_SPACE = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))


# Below this, a write error is taken for a full file system (LMDB reports a short
# write as EIO, not ENOSPC).
LOW_SPACE_BYTES = 1 << 20


def free_bytes(path: str) -> int | None:
    try:
        st = os.statvfs(os.path.dirname(path) or ".")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def failure_advice(path: str, reason: str) -> str:
    """The remedy for a failure met while using an open file."""
    free = free_bytes(path)
    if any(text in reason for text in _NO_SPACE) or (free is not None and free < LOW_SPACE_BYTES):
        return (
            f"the file system of {path} is full ({free} bytes free): free space; "
            "until then updates of this table are answered RETRY"
        )
    return damaged_remedy(path)


# --- the table skeleton ---------------------------------------------------------------------


class IndexedFileTable(SyncTable, Generic[H]):
    """A table kept in one file ``NAME + suffix`` with NUL-convention probing.

    Subclasses provide the backend primitives (all called with the file locked as the
    request asks): ``_backend_open``/``_backend_close``, ``_backend_get`` (stored value or
    None), ``_backend_put`` (False when the key exists and ``replace`` is false),
    ``_backend_remove`` (True when removed), ``_backend_first``/``_backend_next`` (raw
    key/value pairs), ``_backend_sync``; and ``_lock``/``_unlock`` for their lock style.
    ``H`` is the type of the backend's handle, which they reach through ``_live_handle``.
    """

    suffix = ""
    impl_flags = F.FIXED
    # Reopen when the file changed in place (page-caching libraries), not only when it
    # was replaced. LMDB reads the shared mapping, so in-place commits are visible.
    reopen_on_rewrite = True
    # Also reopen while the file's stamps are too recent to prove "unchanged" (libraries
    # whose cached pages would go stale unnoticed; cdb files are always replaced whole).
    distrust_recent_stamps = True
    # Lock even when the request does not ask for it: for libraries that map the file,
    # reading it while postmap truncates it in place is a crash (SIGBUS), not an error.
    always_lock = False

    def __init__(
        self, name: str, open_mode: int, flags: int, ctx: OpenContext | None = None
    ) -> None:
        super().__init__(name, open_mode, initial_flags(flags, self.impl_flags), ctx)
        self.path = name + self.suffix
        self.writable = (open_mode & os.O_ACCMODE) != os.O_RDONLY
        self._fd: int | None = None  # the lock descriptor; also pins the inode
        self._handle: H | None = None  # the backend's handle on that inode
        self._stamp: FileStamp | None = None
        self._new_fd_locked = False
        self._trouble: str | None = None  # the failure reported once, until a success
        self._turn = ctx.turn if ctx is not None and not self.writable else None
        self._turn_level = _TURN_NONE
        self._turn_held: tuple[int, ...] = ()  # what _end_turn unlocks
        self._end_turn_callback = self._end_turn  # made once, deferred every turn
        self._get: Callable[[bytes], bytes | None] = self._backend_get
        self._open_file(initial=True)
        self.watch(self.path)

    # --- subclass hooks --------------------------------------------------------------------
    def _backend_open(self, fd: int, create: bool, truncate: bool) -> H:
        """Open the library on ``self.path`` (``fd`` is locked); return the new handle."""
        raise NotImplementedError

    def _backend_close(self) -> None:
        """Close ``self._handle``."""
        raise NotImplementedError

    def _live_handle(self) -> H:
        """The backend's handle; none once the table is closed (an access then fails)."""
        handle = self._handle
        if handle is None:
            raise DictRetry(f"{self.path}: table is closed")
        return handle

    def _backend_get(self, raw_key: bytes) -> bytes | None:
        raise NotImplementedError

    # What the library's own getter raises (see _direct_get), and its meaning for us.
    library_errors: tuple[type[Exception], ...] = ()

    def _direct_get(self, handle: H) -> Callable[[bytes], bytes | None]:
        """The getter ``lookup`` calls on ``handle``: ``_backend_get``, or the library's
        own method where that is all ``_backend_get`` would do besides translating
        ``library_errors`` (``_read_failure``); two Python calls fewer per lookup."""
        return self._backend_get

    def _read_failure(self, exc: Exception) -> DictRetry:
        return DictRetry(f"error reading {self.path}: {exc}")

    def _backend_put(self, raw_key: bytes, raw_value: bytes, replace: bool) -> bool:
        raise DictUnsupported(f"table {self.spec}: update operation is not supported")

    def _backend_remove(self, raw_key: bytes) -> bool:
        raise DictUnsupported(f"table {self.spec}: delete operation is not supported")

    def _backend_first(self) -> tuple[bytes, bytes] | None:
        raise NotImplementedError

    def _backend_next(self) -> tuple[bytes, bytes] | None:
        raise NotImplementedError

    def _backend_sync(self) -> None:
        pass

    def _lock(self, fd: int, exclusive: bool, wait: bool = True) -> None:
        """Lock ``fd``; without ``wait`` a conflicting lock raises OSError (EAGAIN...)."""

    def _unlock(self, fd: int) -> None:
        pass

    # --- opening and freshness ---------------------------------------------------------------
    def _open_file(
        self, initial: bool = False, held_fd: int | None = None, exclusive: bool = False
    ) -> None:
        """Open (or reopen) the lock descriptor and the backend on what the path names now.

        The backend reads the file's metadata while opening: hold the lock meanwhile, so
        that an open never lands in the middle of a rebuild. ``held_fd`` is a descriptor
        the caller has locked for the access in progress: when the path still names the
        same file that lock already covers the new descriptor; otherwise the new one is
        locked too and stays locked (``_leave`` releases both).
        """
        create = initial and self.writable and bool(self.open_mode & os.O_CREAT)
        truncate = initial and self.writable and bool(self.open_mode & os.O_TRUNC)
        mode = (os.O_RDWR if self.writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            fd = os.open(self.path, mode | (os.O_CREAT if create else 0), 0o644)
        except OSError as exc:
            raise open_error(self.path, exc)
        lock_new = held_fd is None or not _same_file(fd, held_fd)
        try:
            if lock_new:
                try:
                    self._lock(fd, exclusive=exclusive or self.writable)
                except OSError as exc:
                    raise open_error(self.path, exc)
            try:
                stamp = FileStamp.of(fd)
                handle = self._backend_open(fd, create, truncate)
            except BaseException:
                if lock_new:
                    self._unlock(fd)
                raise
        except BaseException:
            os.close(fd)
            raise
        if lock_new and held_fd is None:
            self._unlock(fd)
        old_fd = self._fd
        if old_fd is not None:
            self._backend_close()
            if old_fd != held_fd:
                os.close(old_fd)
        self._fd, self._handle, self._stamp = fd, handle, stamp
        self._get = self._direct_get(handle)
        self._new_fd_locked = lock_new and held_fd is not None

    def _outdated(self) -> bool:
        """True when the handle no longer shows what the file name refers to.

        One ``fstat`` of the open file per access (half the cost of a ``stat`` of its
        path): its stamps show a rewrite in place, and a link count of zero shows that
        the name was removed or renamed over (``mv new old``, cdb rebuilds) -- only then
        is the path looked up. A replaced file that keeps another hard link still has
        links, but its ctime moved: tables that check stamps reopen; lmdb, which does
        not, serves it until ``changed`` (before the next accept) restarts the worker.
        """
        stamp, fd = self._stamp, self._fd
        if stamp is None or fd is None:
            return False  # closed: nothing to reopen, the access fails in the backend
        st = os.fstat(fd)
        if st.st_nlink == 0:
            try:
                os.stat(self.path)
            except OSError:
                return False  # unlinked, nothing in its place: keep serving, as Postfix does
            return True  # another file has the name now
        if not self.reopen_on_rewrite:
            return False
        if (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != stamp.content:
            return True
        return stamp.racy and self.distrust_recent_stamps and not self.writable

    def _reopen(self, held_fd: int | None, exclusive: bool) -> None:
        try:
            self._open_file(held_fd=held_fd, exclusive=exclusive)
        except DictOpenError as exc:
            raise DictRetry(str(exc))
        except Exception as exc:  # the library refused the new file: unavailable for now
            raise DictRetry(f"open database {self.path}: {exc}") from exc

    def _enter(self, exclusive: bool) -> tuple[int, ...]:
        """Start one access: a handle on the current file, locked as the request asks.

        Returns the descriptors ``_leave`` must unlock. One ``fstat`` per access.
        """
        if not (self.flags & F.LOCK or self.always_lock):
            if self._outdated():
                self._reopen(None, exclusive)
            return ()
        fd = self._fd
        assert fd is not None
        try:
            self._lock(fd, exclusive, wait=False)
        except OSError as exc:
            if exc.errno in _LOCK_BUSY:
                raise DictBusy(f"{self.path} is locked by a writer")
            # e.g. ENOLCK on a network filesystem; Postfix: fatal
            raise DictRetry(f"lock {self.path}: {os.strerror(exc.errno or 0)}")
        try:
            if not self._outdated():
                return (fd,)
            self._reopen(fd, exclusive)  # under the lock: no rebuild can start meanwhile
        except BaseException:
            self._unlock(fd)
            if fd != self._fd:
                os.close(fd)
            raise
        assert self._fd is not None
        return (fd, self._fd) if self._new_fd_locked else (fd,)

    def _leave(self, held: tuple[int, ...]) -> None:
        for fd in held:
            self._unlock(fd)
            if fd != self._fd:
                os.close(fd)  # the descriptor of a file we just stopped using

    def _enter_read(self, level: int) -> tuple[int, ...]:
        """``_enter`` for a read that needs ``level``; what it acquired stays for the rest
        of the loop turn when the turn can take it (then nothing is returned to leave)."""
        held = self._enter(exclusive=False)
        if self._turn_level:  # checked earlier this turn, locked now: add the lock
            self._turn_held += held
        elif self._turn is None or not self._turn.defer(self._end_turn_callback):
            return held
        else:
            self._turn_held = held
        self._turn_level = level
        return ()

    def _end_turn(self) -> None:
        """The loop turn is over: release what its reads kept; the next read checks anew."""
        held, self._turn_held, self._turn_level = self._turn_held, (), _TURN_NONE
        if held:
            self._leave(held)

    def _read_level(self) -> int:
        return _TURN_LOCKED if self.flags & F.LOCK or self.always_lock else _TURN_CHECKED

    # --- failures: one log line per episode -------------------------------------------------
    def _failed(self, exc: DictRetry) -> None:
        if self._trouble is None and not isinstance(exc, DictBusy):
            self._trouble = reason = str(exc)
            if "postmap(1)" in reason:  # a reopen's open error says it already
                log.error("%s", reason)
            else:
                log.error("%s; %s", reason, failure_advice(self.path, reason))

    def _succeeded(self) -> None:
        log.info("%s: accessible again after: %s", self.path, self._trouble)
        self._trouble = None

    def _after_write(self) -> None:
        try:
            if self.flags & F.SYNC_UPDATE:
                self._backend_sync()
        finally:
            # Our own change (even one the disk did not take) must not look like a
            # foreign rebuild: a reopen would lose what the library still holds.
            assert self._fd is not None
            self._stamp = FileStamp.of(self._fd)

    # --- operations -------------------------------------------------------------------------
    def _normalize_flags(self) -> None:
        self.flags |= self.impl_flags
        if not self.flags & F.TRY_ANY:
            self.flags |= F.TRY_ANY

    def lookup(self, key: bytes) -> bytes | None:
        # The hot path of the most used tables: _normalize_flags, fold, cut_at_nul and
        # probe written out (every call costs about as much as the fstat does).
        flags = self.flags | self.impl_flags
        if not flags & F.TRY_ANY:
            flags |= F.TRY_ANY
        self.flags = flags
        if flags & F.FOLD_FIX:  # indexed tables are FIXED: fold() would pick this bit
            key = key.lower()
        if 0 in key:  # the byte value: `NUL in key` first raises and clears a TypeError
            key = key[: key.index(NUL)]
        if not key:
            return None  # never stored by postmap; LMDB would even reject it
        try:
            level = _TURN_LOCKED if flags & F.LOCK or self.always_lock else _TURN_CHECKED
            held = self._enter_read(level) if self._turn_level < level else ()
            get = self._get  # after _enter_read: it may have reopened the file
            try:
                value = None
                if flags & F.TRY1NULL:
                    value = get(key + NUL)
                    if value is not None:
                        self.flags = flags & ~F.TRY0NULL
                if value is None and flags & F.TRY0NULL:
                    value = get(key)
                    if value is not None:
                        self.flags = flags & ~F.TRY1NULL
            finally:
                if held:
                    self._leave(held)
        except DictRetry as exc:
            self._failed(exc)
            raise
        except self.library_errors as exc:  # from the direct getter
            failure = self._read_failure(exc)
            self._failed(failure)
            raise failure from None
        if self._trouble is not None:
            self._succeeded()
        if value is None or 0 not in value:
            return value
        return value[: value.index(NUL)]

    def update(self, key: bytes, value: bytes) -> int:
        self._normalize_flags()
        key = cut_at_nul(self.fold(key))
        value = cut_at_nul(value)
        if not key:
            log.warning("%s: empty key: not stored", self.spec)
            return 1
        with_nul, self.flags = storage_form(self.flags)
        raw_key, raw_value = (key + NUL, value + NUL) if with_nul else (key, value)
        stored = self._exclusively(
            lambda: self._backend_put(raw_key, raw_value, bool(self.flags & F.DUP_REPLACE))
        )
        if stored:
            return 0
        if self.flags & F.DUP_IGNORE:
            pass
        elif self.flags & F.DUP_WARN:
            log.warning('%s: duplicate entry: "%s"', self.name, key.decode("utf-8", "replace"))
        else:
            log.error(
                '%s: duplicate entry: "%s" (not replaced)',
                self.name,
                key.decode("utf-8", "replace"),
            )
        return 1

    def delete(self, key: bytes) -> int:
        self._normalize_flags()
        key = cut_at_nul(self.fold(key))
        if not key:
            return 1
        return 0 if self._exclusively(lambda: self._remove(key)) else 1

    def _remove(self, key: bytes) -> bool:
        removed, self.flags = probe(self.flags, self._removed_or_none, key)
        return bool(removed)

    def _removed_or_none(self, raw_key: bytes) -> bool | None:
        return True if self._backend_remove(raw_key) else None

    def _exclusively(self, write: Callable[[], bool]) -> bool:
        """One write under the exclusive lock, synced when it changed the file."""

        def write_and_sync() -> bool:
            changed = write()
            if changed:
                self._after_write()
            return changed

        return self._access(True, write_and_sync)

    def _access(self, exclusive: bool, operation: Callable[[], T]) -> T:
        """``operation`` on a fresh handle, locked as asked; a failure or the end of one
        goes to the table's trouble log. (``lookup`` writes the same steps out.)"""
        try:
            if exclusive:
                held = self._enter(exclusive)
            else:
                level = self._read_level()
                held = self._enter_read(level) if self._turn_level < level else ()
            try:
                result = operation()
            finally:
                self._leave(held)
        except DictRetry as exc:
            self._failed(exc)
            raise
        if self._trouble is not None:
            self._succeeded()
        return result

    def sequence(self, function: int) -> tuple[bytes, bytes] | None:
        self._normalize_flags()
        if function == SEQUENCE_FIRST:
            step = self._backend_first
        elif function == SEQUENCE_NEXT:
            step = self._backend_next
        else:
            raise DictConfig(f"{self.spec}: invalid sequence function {function}")
        item = self._access(False, step)
        if item is None:
            return None
        return cut_at_nul(item[0]), cut_at_nul(item[1])

    def close(self) -> None:
        self._end_turn()
        if self._fd is not None:
            self._backend_close()
            os.close(self._fd)
            self._fd = self._handle = self._stamp = None
            self._get = self._backend_get  # which says that the table is closed
