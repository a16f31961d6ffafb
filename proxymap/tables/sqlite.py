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

    Driver: the standard library's sqlite3 in the blocking-driver executor
    (``blocking.BlockingTable``); at most ``pyproxymap_sqlite_connections`` (default
    4) lookups of one table run at once, each on a read-only connection of its own
    (``file:...?mode=ro``). Connections are pooled per table and handed to one thread
    at a time (hence ``check_same_thread=False``): per-thread connections would open
    one per executor thread (32) and could not be closed or replaced from another
    thread. ``pyproxymap_sqlite_timeout`` (default 10 s) bounds both the wait for a
    writer's lock (sqlite's busy timeout) and the query's run time (a progress
    handler stops it).

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
    The key reaches the SQL text only inside quotes written by the administrator; a
    ``%`` code outside ``'...'`` in the query is warned about at open, as Postfix 3.12
    does, because the quoting protects string literals only.

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
import sqlite3
import threading
import time
import urllib.parse
from dataclasses import dataclass

from proxymap import flags as F
from proxymap.tables.base import DictRetry, OpenContext
from proxymap.tables.blocking import BlockingTable, configure
from proxymap.tables.cfg_parser import CfgParser
from proxymap.tables.db_common import QueryContext
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
_CACHED_STATEMENTS = 32  # queries embed the key: a small cache serves repeated keys


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


class SqliteTable(BlockingTable):
    """``sqlite:NAME``: NAME is a .cf file or a main.cf parameter prefix."""

    dict_type = "sqlite"

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
        self.concurrency = connection_limit(self.dict_type, ctx.params) or DEFAULT_CONNECTIONS
        self.query_timeout = param_number(ctx, "pyproxymap_sqlite_timeout", DEFAULT_TIMEOUT)
        # A backstop only: the driver thread itself gives up after query_timeout.
        self.timeout = self.query_timeout + 1.0
        self._uri = "file:" + urllib.parse.quote(os.fsencode(self.dbpath)) + "?mode=ro"
        self._outage = OutageLog(self.spec)
        self._lock = threading.Lock()
        self._idle: list[_Connection] = []
        self._identity: tuple[int, int] | None = None
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
        try:
            value = await self._run(self._execute, admitted, query)
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
        return None if query is None else self._execute(admitted, query)

    def _execute(self, key: bytes, query: bytes) -> bytes | None:
        """Run ``query`` and join the first column of its rows (in a driver thread)."""
        try:
            sql = query.decode("utf-8")
        except UnicodeDecodeError:
            raise _Unavailable(self.spec, "the query is not UTF-8 text") from None
        if ";" in sql:
            sql = first_statement(sql)
        connection = self._checkout()
        try:
            connection.deadline = time.monotonic() + self.query_timeout
            joined = self.query.results(key)
            cursor = connection.db.execute(sql)
            try:
                for row in cursor:
                    joined.add(self._column_text(connection.db, row[0]))
            finally:
                cursor.close()  # ends the read transaction: writers are not held up
        except sqlite3.Error as exc:
            connection.db.close()  # a fresh connection for the next lookup
            raise _Unavailable(self.spec, self._reason(exc, sql)) from None
        except BaseException:
            self._checkin(connection)  # the expansion limit: the connection is fine
            raise
        self._checkin(connection)
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

    def _connect(self, identity: tuple[int, int]) -> _Connection:
        try:
            db = sqlite3.connect(
                self._uri,
                uri=True,
                timeout=self.query_timeout,
                isolation_level=None,
                check_same_thread=False,
                cached_statements=_CACHED_STATEMENTS,
            )
        except sqlite3.Error as exc:
            raise _Unavailable(self.spec, f"cannot open database {self.dbpath}: {exc}") from None
        db.text_factory = bytes  # the bytes as stored; no decoding
        connection = _Connection(db, identity)
        db.set_progress_handler(connection.expired, _PROGRESS_STEPS)
        return connection

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.db.close()
