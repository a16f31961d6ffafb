"""sqlite_table(5) client: ``sqlite:/etc/postfix/file.cf`` (Postfix's dict_sqlite).

NAME
    sqlite -- look keys up with an SQL query in an SQLite database file

SYNOPSIS
    proxy_read_maps = proxy:sqlite:/etc/postfix/aliases.cf

    # /etc/postfix/aliases.cf
    dbpath = /etc/postfix/aliases.sqlite
    query = SELECT dest FROM aliases WHERE addr = '%s'

DESCRIPTION
    Parameters (a ``.cf`` file, or main.cf ``<name>_<param>`` when the name does not
    start with ``/`` or ``.``): ``dbpath`` (required), ``query`` or the legacy
    ``select_field``/``table``/``where_field``/``additional_conditions``,
    ``result_format`` (default ``%s``), ``domain`` and ``expansion_limit`` (0 = no
    limit); ``db_common`` implements the templates, the domain filter and the joining.

    A lookup, in Postfix's order: a key that is not UTF-8 is "not found" without a
    query; FOLD_FIX lower-cases it
    (ASCII; sqlite's ``=`` is case-sensitive); the ``domain`` filter and the query
    expansion run on the event-loop thread (nested tables are not thread-safe); each
    substituted piece is quoted like sqlite's ``%q`` (a ``'`` is doubled). Only the
    query runs in a driver thread. Of each row only the *first* column counts, as
    ``sqlite3_column_text`` renders it (integers in decimal, reals as sqlite prints
    them, text and blobs up to their first NUL); NULL is skipped; the values go
    through ``result_format`` and are joined with ``,``. Only the first statement of
    the query runs; text after it is ignored. The table is FIXED, read-only.

    Errors: the database cannot be opened, an SQL error (prepare or step), a lock held
    by a writer for longer than the timeout, a query running longer than the timeout,
    or more values than ``expansion_limit``: RETRY, never "not found". An outage is
    logged once (``pool.OutageLog``), with one line when lookups succeed again.

    Driver: the standard library's sqlite3. A lookup first runs on the event loop's
    thread (``lookup_now``): an indexed query takes microseconds, less than handing
    it to a thread, whose Python would then wait for the loop to let go of the GIL
    (make bench: 0.24x / 0.10x the C proxymap's lookups/s at 1 / 16 connections in
    threads, 1.26-1.39x / 0.99-1.05x inline). It never waits there: that connection has no
    busy timeout, and a progress handler stops the query after INLINE_BUDGET (1 ms).
    A lookup that meets a writer's lock or outruns the budget runs again (read-only:
    nothing to undo) in the blocking-driver executor (``blocking.BlockingTable``),
    and so do the table's lookups for the next INLINE_PAUSE (1 s). There, at most
    ``pyproxymap_sqlite_connections`` (default 4) lookups of one table run at once,
    each on a read-only connection of its own (``file:...?mode=ro``); the loop's
    connection is one more. Connections are pooled per table and handed to one
    thread at a time (hence ``check_same_thread=False``): per-thread connections
    would open one per executor thread (32) and could not be closed or replaced
    from another thread. ``pyproxymap_sqlite_timeout`` (default 10 s) bounds both the
    wait for a writer's lock (sqlite's busy timeout) and the query's run time (a
    progress handler stops it).

    A query whose expansions all stand in plain string literals (``addr = '%s'``)
    runs as one statement with parameters (``?1``, ``db_common.Statement``): the same
    text for every key, so sqlite3's statement cache compiles it once per
    connection, and the parameters carry the text the quoted literals would hold.

    Differences from Postfix 3.7, deliberate:

    * The database is opened read-only and never created. 3.7 opens it read-write
      and creates an empty file when it is missing, so the first lookup fails to
      prepare and the process exits. Here a missing or unreadable database answers
      RETRY, and the table recovers by itself once the file is there (3.12 opens
      read-only too, but makes the table unavailable until the process restarts).
    * An SQL error makes Postfix exit, and a client of the C proxymap then hangs: a
      prepare failure (``no such table``, a syntax error) directly, a step failure
      (``malformed JSON``, ``integer overflow``) through sqlite3_finalize, which
      reports the step's error again (observed with 3.7.11). Here both are RETRY,
      with the cause logged. (The expansion limit is RETRY in both.)
    * A database locked by a writer is waited for, up to the timeout; Postfix fails
      at once, fatally (``SQL prepare failed: database is locked``, observed).
    * A database file replaced by another (rename, rebuild) is noticed before the
      next lookup (one stat(2) of ``dbpath`` per lookup, in the driver thread) and
      the connections are reopened. Postfix keeps reading the replaced file until
      the process ends. The read-only service is not restarted for it (unlike
      indexed files): changes written in place are seen by an open connection
      anyway, and a restart would drop every other table and client of the worker.
    * A query that writes fails (read-only connection): RETRY. 3.7 would write.

SECURITY
    The key reaches the SQL text only inside quotes written by the administrator (or
    as a parameter of the statement form, outside the SQL text); a ``%`` code outside
    ``'...'`` in the query is warned about at open, as Postfix 3.12 does, because the
    quoting protects string literals only.

BUGS
    A database in WAL mode needs its ``-shm`` and ``-wal`` files, or a directory in
    which user postfix may create them; otherwise it cannot be read.
    A query template with bytes that are not UTF-8 cannot be given to sqlite3: RETRY.

SEE ALSO
    sqlite_table(5); docs/TABLES.md section 4.5; db_common; blocking.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

from proxymap import flags as F
from proxymap.tables.base import LATER, DictRetry, Later, OpenContext
from proxymap.tables.blocking import BlockingTable, configure
from proxymap.tables.cfg_parser import CfgParser
from proxymap.tables.db_common import QueryContext, parameterized
from proxymap.tables.pool import OutageLog, connection_limit
from proxymap.tables.streams import param_number
from proxymap.tables.texthash import require_read_only
from proxymap.tables.utf8 import is_valid_utf8

__all__ = ["SqliteTable", "first_statement", "sqlite_quote", "unquoted_codes"]

log = logging.getLogger("proxymap")

DEFAULT_CONNECTIONS = 4
DEFAULT_TIMEOUT = 10.0
# Progress-handler period in VM instructions: an indexed lookup needs far fewer, so it
# costs nothing there; a runaway query is checked about every millisecond, and rarely
# enough not to compete for the GIL with the worker's event loop.
_PROGRESS_STEPS = 100_000
# A statement form is one entry; queries that embed the key (no statement form) reuse
# entries only for repeated keys.
_CACHED_STATEMENTS = 32
# A lookup first runs on the event loop's thread, within this budget, without waiting
# for a writer's lock; past it (or locked) it runs again in a driver thread, and the
# table's lookups go there for INLINE_PAUSE seconds before the next inline attempt.
INLINE_BUDGET = 0.001
INLINE_PAUSE = 1.0
_INLINE_PROGRESS_STEPS = 1_000  # an indexed lookup needs fewer: never called there


# What a template's text must not contain for its statement form: sqlite's parameter
# marks, quoted identifiers, several statements, comments (which may hold quotes).
_NOT_PREPARABLE = re.compile(rb"[?:@$\"`\[;]|--|/\*")


def _question_mark(number: int) -> bytes:
    return b"?%d" % number


def sqlite_quote(piece: bytes) -> bytes:
    """sqlite's ``%q``: double every single quote (the text goes inside '...')."""
    return piece.replace(b"'", b"''")


def first_statement(sql: str) -> str:
    """The first complete statement of ``sql`` (sqlite3_prepare ignores the rest)."""
    position = sql.find(";")
    while position >= 0:
        if sqlite3.complete_statement(sql[: position + 1]):
            return sql[: position + 1]
        position = sql.find(";", position + 1)
    return sql


def unquoted_codes(query: str) -> list[str]:
    """``%x`` codes (letter or digit) outside a '...' literal of the query."""
    found, quote, position = [], "", 0
    while position < len(query):
        char = query[position]
        if not quote and char in "'\"":
            quote = char
        elif quote and char == quote:
            quote = ""
        elif quote != "'" and char == "%" and position + 1 < len(query):
            code = query[position + 1]
            if code == "%" or code.isalnum():
                if code != "%":
                    found.append("%" + code)
                position += 1
        position += 1
    return found


# sqlite's answers to an inline attempt that mean "not here": a writer's lock
# (busy timeout 0) or the budget spent (the progress handler's interrupt).
_NOT_INLINE_ERRORS = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_INTERRUPT"})


class _Unavailable(DictRetry):
    """The database could not be used: an outage, logged once."""

    def __init__(self, spec: str, reason: str) -> None:
        super().__init__(f"{spec}: {reason}")
        self.reason = reason


@dataclass(eq=False)
class _Connection:
    """One read-only connection, used by one thread at a time."""

    db: sqlite3.Connection
    identity: tuple[int, int]  # (st_dev, st_ino) of the file when it was opened
    deadline: float = 0.0

    def expired(self) -> bool:
        return time.monotonic() > self.deadline


class _NotInline(Exception):
    """The inline attempt gave up (locked, or past its budget): a driver thread runs it."""


class SqliteTable(BlockingTable):
    """``sqlite:NAME``: NAME is a .cf file or a main.cf parameter prefix."""

    dict_type = "sqlite"
    answers_now = True

    def __init__(self, name: str, open_mode: int, flags: int, ctx: OpenContext) -> None:
        super().__init__(name, open_mode, flags | F.FIXED, ctx)
        require_read_only(self.dict_type, name, open_mode)
        configure(ctx.params)
        cfg = CfgParser(name, ctx.params)
        self.dbpath = cfg.get_str("dbpath", "", 1)
        self.query = QueryContext.for_sql(cfg, ctx, self.dict_type, table=self.spec)
        for code in dict.fromkeys(
            unquoted_codes(self.query.query.text.decode("utf-8", "surrogateescape"))
        ):
            log.warning(
                "%s: %s is used outside '...' quotes in the query: the key is "
                "quoted for string literals only",
                self.spec,
                code,
            )
        self.statement = parameterized(self.query.query, _NOT_PREPARABLE, _question_mark)
        try:
            self._statement_sql = "" if self.statement is None else self.statement.text.decode()
        except UnicodeDecodeError:  # the simple query fails the same way: let it
            self.statement = None
        self.concurrency = connection_limit(self.dict_type, ctx.params) or DEFAULT_CONNECTIONS
        self.query_timeout = param_number(ctx, "pyproxymap_sqlite_timeout", DEFAULT_TIMEOUT)
        # A backstop only: the driver thread itself gives up after query_timeout.
        self.timeout = self.query_timeout + 1.0
        self._uri = "file:" + urllib.parse.quote(os.fsencode(self.dbpath)) + "?mode=ro"
        self._outage = OutageLog(self.spec)
        self._lock = threading.Lock()
        self._idle: list[_Connection] = []
        self._identity: tuple[int, int] | None = None
        self._inline: _Connection | None = None  # the event loop thread's connection
        self._inline_after = 0.0  # no inline attempt before (time.monotonic)
        self._closed = False
        try:  # report a missing database at once; lookups keep trying to open it
            self._checkin(self._checkout())
        except _Unavailable as exc:
            self._outage.failed(exc.reason)

    # --- the lookup ----------------------------------------------------------------------
    def _admit(self, key: bytes, flags: int) -> bytes | None:
        """The key to query for, or None: not UTF-8, so not looked up.

        Postfix skips the check when the UTF-8 layer is active (it checked already);
        checking again costs little and keeps such keys away from sqlite3, which
        takes SQL as text only.
        """
        if not is_valid_utf8(key):
            return None
        # FOLD_FIX is what Postfix's driver tests, whatever the table's other bits.
        return key.lower() if flags & F.FOLD_FIX else key

    async def alookup(self, key: bytes) -> bytes | None:
        admitted = self._admit(key, self.flags)  # the flag word, before any await
        if admitted is None:
            return None
        context = self.query
        if context.domain is not None and context.domain.asynchronous:
            query = await context.aquery_for(admitted, sqlite_quote)
        else:
            query = context.query_for(admitted, sqlite_quote)
        if query is None:
            return None
        value = self._answer_now(admitted, query)
        if value is not LATER:
            return value
        try:
            sql, parameters = self._statement(admitted, query)
            value = await self._run(self._execute, admitted, sql, parameters)
        except _Unavailable as exc:
            self._outage.failed(exc.reason)
            raise
        self._outage.ok()
        return value

    def lookup_now(self, key: bytes) -> bytes | None | Later:
        """``alookup`` without waiting: LATER when its domain filter must wait, or the
        query cannot run on this thread (``_answer_now``)."""
        context = self.query
        if context.domain is not None and context.domain.asynchronous:
            return LATER
        admitted = self._admit(key, self.flags)
        if admitted is None:
            return None
        query = context.query_for(admitted, sqlite_quote)
        return None if query is None else self._answer_now(admitted, query)

    def _answer_now(self, key: bytes, query: bytes) -> bytes | None | Later:
        """The query run on the event loop's thread (``_execute_inline``); LATER when
        it is locked, too slow, or was lately (INLINE_PAUSE): a driver thread runs it."""
        if time.monotonic() < self._inline_after:
            return LATER
        try:
            sql, parameters = self._statement(key, query)
            value = self._execute_inline(key, sql, parameters)
        except _NotInline:
            return LATER
        except _Unavailable as exc:
            self._outage.failed(exc.reason)
            raise
        self._outage.ok()
        return value

    def blocking_lookup(self, key: bytes, flags: int) -> bytes | None:
        """The whole lookup in the calling thread (``alookup`` is what the worker uses).

        An asynchronous table in ``domain`` cannot be asked from here: RETRY.
        """
        admitted = self._admit(key, flags)
        if admitted is None:
            return None
        query = self.query.query_for(admitted, sqlite_quote)
        return None if query is None else self._execute(admitted, self._sql(query))

    def _statement(self, key: bytes, query: bytes) -> tuple[str, Sequence[str]]:
        """The SQL to run for KEY and its parameters: the statement form when the
        query has one (the same text for every key: sqlite3 prepares it once per
        connection, see ``db_common.Statement``), else QUERY as expanded and quoted."""
        statement = self.statement
        if statement is None:
            return self._sql(query), ()
        values = statement.expand(key, self.query.needs)
        return self._statement_sql, [value.decode("utf-8") for value in values]

    def _execute(self, key: bytes, sql: str, parameters: Sequence[str] = ()) -> bytes | None:
        """Run ``sql`` and join the first column of its rows (in a driver thread)."""
        connection = self._checkout()
        try:
            connection.deadline = time.monotonic() + self.query_timeout
            value = self._rows(connection, key, sql, parameters)
        except sqlite3.Error as exc:
            connection.db.close()  # a fresh connection for the next lookup
            raise _Unavailable(self.spec, self._reason(exc, sql)) from None
        except BaseException:
            self._checkin(connection)  # the expansion limit: the connection is fine
            raise
        self._checkin(connection)
        return value

    def _execute_inline(self, key: bytes, sql: str, parameters: Sequence[str]) -> bytes | None:
        """``_execute`` on the event loop's thread: an indexed lookup takes microseconds,
        less than handing it to a thread (whose Python must then wait for the loop's
        GIL). A lookup that meets a writer's lock or outruns INLINE_BUDGET stops
        (read-only: nothing to undo) and raises _NotInline."""
        identity = self._current_identity()
        connection = self._inline
        if connection is None or connection.identity != identity:
            if connection is not None:
                connection.db.close()
            connection = self._inline = self._connect(identity, inline=True)
        connection.deadline = time.monotonic() + INLINE_BUDGET
        try:
            return self._rows(connection, key, sql, parameters)
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorname", "") in _NOT_INLINE_ERRORS:
                self._inline_after = time.monotonic() + INLINE_PAUSE
                raise _NotInline from None
            connection.db.close()
            self._inline = None
            raise _Unavailable(self.spec, self._reason(exc, sql)) from None

    def _sql(self, query: bytes) -> str:
        try:
            sql = query.decode("utf-8")
        except UnicodeDecodeError:
            raise _Unavailable(self.spec, "the query is not UTF-8 text") from None
        return first_statement(sql) if ";" in sql else sql

    def _rows(
        self, connection: _Connection, key: bytes, sql: str, parameters: Sequence[str]
    ) -> bytes | None:
        """The first column of the rows, joined (sqlite3.Error on failure)."""
        joined = self.query.results(key)
        cursor = connection.db.execute(sql, parameters)
        try:
            for row in cursor:
                joined.add(self._column_text(connection.db, row[0]))
        finally:
            cursor.close()  # ends the read transaction: writers are not held up
        return joined.value()

    @staticmethod
    def _column_text(db: sqlite3.Connection, value: object) -> bytes | None:
        """A value as sqlite3_column_text renders it, cut at a NUL as a C string is."""
        if value is None or isinstance(value, bytes):
            return value if value is None or 0 not in value else value.split(b"\0", 1)[0]
        if isinstance(value, int):
            return b"%d" % value
        cursor = db.execute("SELECT CAST(? AS TEXT)", (value,))  # sqlite's own %!.15g
        try:
            return cursor.fetchone()[0]
        finally:
            cursor.close()

    def _reason(self, exc: sqlite3.Error, sql: str) -> str:
        name = getattr(exc, "sqlite_errorname", "")
        if name == "SQLITE_INTERRUPT":
            return f"query stopped after {self.query_timeout:g}s (pyproxymap_sqlite_timeout): {sql}"
        if name in ("SQLITE_BUSY", "SQLITE_LOCKED"):
            return f"database {self.dbpath} still locked by a writer after {self.query_timeout:g}s"
        return f"SQL query failed: {exc}: {sql}"

    # --- connections -------------------------------------------------------------------
    def _current_identity(self) -> tuple[int, int]:
        """The file's identity now; a replaced file retires the older connections."""
        try:
            st = os.stat(self.dbpath)
        except OSError as exc:
            raise _Unavailable(
                self.spec, f"cannot open database {self.dbpath}: {os.strerror(exc.errno or 0)}"
            ) from None
        identity = (st.st_dev, st.st_ino)
        if identity != self._identity:
            with self._lock:
                stale, self._idle = self._idle, []
                self._identity = identity
            for connection in stale:
                connection.db.close()
        return identity

    def _checkout(self) -> _Connection:
        identity = self._current_identity()
        with self._lock:
            while self._idle:
                connection = self._idle.pop()
                if connection.identity == identity:
                    return connection
                connection.db.close()
        return self._connect(identity)

    def _checkin(self, connection: _Connection) -> None:
        with self._lock:
            if not self._closed and connection.identity == self._identity:
                self._idle.append(connection)
                return
        connection.db.close()

    def _connect(self, identity: tuple[int, int], inline: bool = False) -> _Connection:
        try:
            db = sqlite3.connect(
                self._uri,
                uri=True,
                timeout=0 if inline else self.query_timeout,  # inline: never wait for a lock
                isolation_level=None,
                check_same_thread=False,
                cached_statements=_CACHED_STATEMENTS,
            )
        except sqlite3.Error as exc:
            raise _Unavailable(self.spec, f"cannot open database {self.dbpath}: {exc}") from None
        db.text_factory = bytes  # the bytes as stored; no decoding
        connection = _Connection(db, identity)
        steps = _INLINE_PROGRESS_STEPS if inline else _PROGRESS_STEPS
        db.set_progress_handler(connection.expired, steps)
        return connection

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        if self._inline is not None:
            idle.append(self._inline)
            self._inline = None
        for connection in idle:
            connection.db.close()
