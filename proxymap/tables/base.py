"""The one interface every lookup-table type implements (Postfix's ``DICT``).

NAME
    base -- table interface, errors, surrogate ("unavailable") table, open context

DESCRIPTION
    A table instance is opened once per (canonical name, open mode, instance flags) by the
    request handler and kept for the life of the worker process (Postfix never closes them).
    The handler sets ``table.flags`` to the flag word of the request before every operation
    and reads it back afterwards (tables may change it, e.g. TRY0NULL/TRY1NULL learning),
    exactly as Postfix's proxymap sets ``dict->flags``.

    Keys and values are ``bytes``: Postfix is 8-bit clean and byte-exact; the UTF-8 layer
    (``proxymap.tables.utf8``) decodes only where Postfix does.

    Results: ``lookup`` returns the value or ``None`` (not found). Failures are exceptions:
    ``DictRetry`` (temporary: status RETRY) and ``DictConfig`` (status CONFIG). A backend
    failure must never become "not found": that would bounce mail.

    Synchronous vs asynchronous tables: local tables (files, memory) derive from
    ``SyncTable`` and answer inline on the worker's event-loop thread -- the short,
    allocation-light path. Tables whose operations may wait (network, databases) derive
    from ``AsyncTable`` and implement the ``a*`` coroutines; the handler awaits them so
    that other clients of the same worker are served meanwhile. Native asyncio drivers
    and socket protocols use ``proxymap.tables.pool`` for their connections; a driver
    that blocks derives from ``proxymap.tables.blocking.BlockingTable``, whose calls run
    in a bounded executor of its own. An asynchronous table may also answer at once
    (``lookup_now``) or start a lookup that calls back (``lookup_start``): the
    handler's fast path then needs no task. Tables built on other tables (the UTF-8 layer,
    pipemap, unionmap) write their logic once, as plans (``proxymap.tables.composite``),
    and are synchronous or asynchronous as their members are.

SECURITY
    Tables are opened only after the handler has approved the name.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxymap import flags as F

log = logging.getLogger("proxymap")


class DictError(Exception):
    """A table operation failed; the subclass says which proxymap status to answer."""


class DictRetry(DictError):
    """Temporary failure (DICT_ERR_RETRY): backend down, timeout, unavailable table."""


class DictBusy(DictRetry):
    """The table file is locked by a writer (postmap rebuilding it): try again soon.

    Raised instead of waiting for the lock, so that the worker's other clients are
    served meanwhile; the request handler retries the operation after a pause. Where
    it is not handled it is a temporary failure like any ``DictRetry``.
    """


# Pauses between attempts on a table whose file a writer holds locked (DictBusy).
BUSY_PAUSE_MIN = 0.001
BUSY_PAUSE_MAX = 0.05


class DictConfig(DictError):
    """Configuration error (DICT_ERR_CONFIG): e.g. socketmap PERM, non-UTF-8 value."""


class DictOpenError(Exception):
    """Raised by a table constructor when the table cannot be opened.

    The registry turns it into a ``SurrogateTable`` (Postfix's dict_surrogate), logging
    ``error: <message>`` once; every later operation then answers RETRY.
    """


class DictUnsupported(DictError):
    """The table type does not support the operation (Postfix would abort the process).

    The handler logs it and answers RETRY instead of dropping every client of the process.
    """


class BoundLoop:
    """An event loop and the thread that bound it: whether it is the running loop here,
    without asyncio's running-loop lookup (on Python 3.11 a getpid() system call, which
    a per-lookup caller would pay every time)."""

    __slots__ = ("loop", "_thread")

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._thread = threading.get_ident()

    def running(self) -> asyncio.AbstractEventLoop | None:
        """The bound loop when it runs on the calling thread, else None."""
        loop = self.loop
        if loop is not None and self._thread == threading.get_ident() and loop.is_running():
            return loop
        return None


class LoopTurn:
    """What tables leave for the end of the event-loop turn in progress.

    A local table may keep what an access acquired (a shared file lock, the check that
    its file is unchanged) for the other requests answered in the same turn, and give
    it up in a callback that runs as soon as the turn is over (``loop.call_soon``: the
    next turn's first callbacks, before the loop polls again). That is possible only
    on the thread of the loop the worker attached; elsewhere (``-S``, the self-check,
    tests without a loop, other threads) ``defer`` refuses and the table releases at
    once, as after every access.
    """

    __slots__ = ("_bound",)

    def __init__(self) -> None:
        self._bound = BoundLoop()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Turns of ``loop`` (the worker's, from the moment it runs on this thread) may
        defer work."""
        self._bound.bind(loop)

    def defer(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` when the current turn ends; False (not deferred) off the loop.

        Each callback is a handle of its own: the loop reports one that fails (its
        exception handler) and still runs the others.
        """
        loop = self._bound.running()
        if loop is None:
            return False
        loop.call_soon(callback)
        return True


@dataclass
class OpenContext:
    """What a table may need beyond its name: configuration, and how to open nested tables.

    ``params`` is main.cf with ``$name`` expansion applied on access (used by tables whose
    name is a main.cf prefix, e.g. ``mysql:foo`` reads ``foo_hosts``) and for
    ``smtputf8_enable``. ``open_table`` opens a nested table (``pipemap:{...}`` members) with
    the same rules as the registry, stripping any ``proxy:`` prefix (the server never
    connects to itself).
    """

    params: Mapping[str, str] = field(default_factory=dict)
    open_table: Callable[[str, int, int], Table] | None = None
    utf8_enabled: bool = True
    # The instance serves a 3.7-3.10 client (G1). Where Postfix's defaults changed
    # after 3.7 (pgsql's client encoding), a table follows the direct lookup of the
    # client generation it serves: the 3.7 default for these, the current one else.
    legacy_client: bool = False
    # The worker's loop turns (shared by every copy of the context): see LoopTurn.
    turn: LoopTurn = field(default_factory=LoopTurn)


class Table:
    """What every table has: name, open mode, flag word, change detection, close.

    Operations live in the two subclasses, one per way of answering: ``SyncTable``
    (``lookup`` ...) and ``AsyncTable`` (``alookup`` ...). ``asynchronous`` says which;
    it is a property of the class, decided once when the table is opened.

    Constructor contract (the registry's): ``cls(name, open_mode, flags, ctx)``, as
    ``Table.__init__`` declares it; ``DictOpenError`` when the table cannot be opened.
    """

    dict_type = "?"
    asynchronous = False
    # Files whose change makes the read-only service restart (Postfix checks mtime/nlink
    # before accept). Tables that keep no file leave this empty.
    watched_files: tuple[str, ...] = ()

    def __init__(
        self, name: str, open_mode: int, flags: int, ctx: OpenContext | None = None
    ) -> None:
        """What the registry passes to every table type it opens.

        The base keeps nothing of ``ctx``: a table reads what it needs from it in its own
        constructor. Tables the registry does not open (stand-ins, layers) pass ``None``.
        """
        self.name = name
        self.open_mode = open_mode
        self.flags = flags
        self._stamps: list[tuple[int, int, int]] = []  # (fd-independent) dev, ino, mtime_ns

    @property
    def spec(self) -> str:
        return f"{self.dict_type}:{self.name}"

    # --- life cycle ----------------------------------------------------------------------
    def watch(self, path: str) -> None:
        """Record a file whose later change (mtime, or unlinked) means "table changed"."""
        st = os.stat(path)
        self.watched_files = (*self.watched_files, path)
        self._stamps.append((st.st_dev, st.st_ino, st.st_mtime_ns))

    def changed(self) -> bool:
        """True when a watched file was modified, replaced or removed since open."""
        for path, (dev, ino, mtime) in zip(self.watched_files, self._stamps, strict=True):
            try:
                st = os.stat(path)
            except OSError:
                return True
            if (st.st_dev, st.st_ino) != (dev, ino) or st.st_nlink == 0:
                return True
            if not (self.flags & F.MULTI_WRITER) and st.st_mtime_ns != mtime:
                return True
        return False

    def close(self) -> None:
        pass

    # --- helpers for drivers -------------------------------------------------------------
    def fold(self, key: bytes, flags: int | None = None) -> bytes:
        """Driver-level folding: ASCII lower-case when the request asks for it.

        FOLD_FIX applies to fixed tables, FOLD_MUL to the others (Postfix drivers fold
        only ASCII; full Unicode folding is the UTF-8 layer's job). ``flags`` defaults to
        the table's own word; code running outside the event-loop thread passes the word
        it captured there.
        """
        if flags is None:
            flags = self.flags
        want = F.FOLD_FIX if flags & F.FIXED else F.FOLD_MUL
        return key.lower() if flags & want else key


class SyncTable(Table):
    """A table answered inline on the worker's event-loop thread (files, memory).

    Subclasses override what they support; the rest is ``DictUnsupported``.
    """

    asynchronous = False

    def lookup(self, key: bytes) -> bytes | None:
        raise DictUnsupported(f"{self.spec}: lookup is not supported")

    def update(self, key: bytes, value: bytes) -> int:
        """Store; 0 = stored, 1 = not stored (e.g. duplicate kept, value too large)."""
        raise DictUnsupported(f"table {self.spec}: update operation is not supported")

    def delete(self, key: bytes) -> int:
        """Remove; 0 = removed, 1 = not found."""
        raise DictUnsupported(f"table {self.spec}: delete operation is not supported")

    def sequence(self, function: int) -> tuple[bytes, bytes] | None:
        """function 0 = first, 1 = next; ``None`` at the end."""
        raise DictUnsupported(f"table {self.spec}: sequence operation is not supported")


class Later(enum.Enum):
    """``AsyncTable.lookup_now``'s and ``lookup_start``'s "await ``alookup`` instead"."""

    LATER = enum.auto()


class Started(enum.Enum):
    """``AsyncTable.lookup_start``'s "the answer comes through the callback"."""

    STARTED = enum.auto()


LATER = Later.LATER
STARTED = Started.STARTED

#: ``lookup_start``'s callback: the value (None: not found) or the exception
AnswerCallback = Callable[["bytes | None | Exception"], None]


def answer_with(
    answer: AnswerCallback,
    value_of: Callable[[bytes, Any], bytes | None],
    key: bytes,
    result: Any,
    table: Table,
) -> None:
    """Give a started lookup's value, ``value_of(key, result)``, or the exception it
    raised (e.g. expansion_limit), to ``answer``. It runs in a driver's callback: a
    failure of ``answer`` itself is logged there (with ``table``'s name), and goes no
    further."""
    try:
        value: bytes | None | Exception = value_of(key, result)
    except Exception as exc:  # noqa: BLE001 - a status for the client
        value = exc
    try:
        answer(value)
    except Exception as exc:
        log.error("%s: answering a lookup failed: %r", table.spec, exc, exc_info=exc)


class AsyncTable(Table):
    """A table whose operations may wait (network, database): coroutines, awaited by the
    handler while the worker serves its other clients.

    A driver must read what it needs from ``flags`` before its first ``await``: the
    handler sets the word right before the call, and a concurrent request may set it
    again while this one waits.
    """

    asynchronous = True

    async def alookup(self, key: bytes) -> bytes | None:
        raise DictUnsupported(f"{self.spec}: lookup is not supported")

    #: ``lookup_now`` may answer (the handler calls it only then)
    answers_now = False

    def lookup_now(self, key: bytes) -> bytes | None | Later:
        """The lookup's answer without waiting, when the table can give it at once (an
        sqlite query on an indexed file: less work than a coroutine's); ``LATER`` when
        it cannot: ``alookup`` then answers. The same flag rule as ``alookup``."""
        return LATER

    #: ``lookup_start`` may start a lookup (the handler calls it only then)
    starts = False

    def lookup_start(self, key: bytes, answer: AnswerCallback) -> bytes | None | Later | Started:
        """Start the lookup from the caller's own stack, without a coroutine or a task:
        ``STARTED``, and ``answer`` is called once, from a later event-loop callback
        (never from this call), with the value or the exception ``alookup`` would give;
        the value at once; or ``LATER`` when the table cannot start it this way
        (``alookup`` then answers). The same flag rule as ``alookup``. What it saves
        is two event-loop turns and the coroutine frames (tables/mysql.py)."""
        return LATER

    async def aupdate(self, key: bytes, value: bytes) -> int:
        raise DictUnsupported(f"table {self.spec}: update operation is not supported")

    async def adelete(self, key: bytes) -> int:
        raise DictUnsupported(f"table {self.spec}: delete operation is not supported")

    async def asequence(self, function: int) -> tuple[bytes, bytes] | None:
        raise DictUnsupported(f"table {self.spec}: sequence operation is not supported")


def require_network_open(spec: str, open_mode: int, flags: int) -> None:
    """Network clients (tcp, socketmap) are read-only and never serve security-sensitive
    lookups (NO_UNAUTH): either makes the table unavailable, as in Postfix."""
    if open_mode != os.O_RDONLY:
        raise DictOpenError(f"{spec} map requires O_RDONLY access mode")
    if flags & F.NO_UNAUTH:
        raise DictOpenError(f"{spec} map is not allowed for security-sensitive data")


class FailingTable(SyncTable):
    """A table whose every operation fails with the error that ``_fail`` builds."""

    def _fail(self) -> DictRetry:
        raise NotImplementedError

    def lookup(self, key: bytes) -> bytes | None:
        raise self._fail()

    def update(self, key: bytes, value: bytes) -> int:
        raise self._fail()

    def delete(self, key: bytes) -> int:
        raise self._fail()

    def sequence(self, function: int) -> tuple[bytes, bytes] | None:
        raise self._fail()


class SurrogateTable(FailingTable):
    """Stand-in for a table that could not be opened (Postfix's dict_surrogate).

    Open succeeds (flags = requested | PATTERN, plus SURROGATE for 3.11+ replies); every
    operation fails with RETRY and logs ``warning: <type:name> is unavailable. <reason>``.
    """

    dict_type = "surrogate"

    def __init__(self, dict_type: str, name: str, open_mode: int, flags: int, reason: str):
        super().__init__(name, open_mode, (flags & ~F.FIXED) | F.PATTERN | F.SURROGATE)
        self.dict_type = dict_type
        self.reason = reason

    def _fail(self) -> DictRetry:
        log.warning("%s is unavailable. %s", self.spec, self.reason)
        return DictRetry(self.reason)
