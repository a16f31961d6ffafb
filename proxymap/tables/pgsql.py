"""pgsql_table(5) client: ``pgsql:/etc/postfix/file.cf`` or ``pgsql:prefix``, asynchronous.

NAME
    pgsql -- PostgreSQL lookups on libpq (through psycopg 3) on a bounded pool

SYNOPSIS
    table = PgsqlTable("/etc/postfix/pgsql-aliases.cf", os.O_RDONLY, flags, ctx)
    value = await table.alookup(b"alice@example.com")   # bytes, None, or DictRetry

DESCRIPTION
    Settings (a ``.cf`` file, or main.cf parameters ``<prefix>_<name>``, see
    ``cfg_parser``): ``hosts``, ``user``, ``password``, ``dbname``, ``query`` (or the
    legacy ``select_function``, or ``table``/``select_field``/``where_field``/
    ``additional_conditions``), ``result_format``, ``domain``, ``expansion_limit``
    (``db_common``), ``encoding``, ``idle_interval`` and ``retry_interval``. Postfix
    has no ``connect_timeout`` setting; a connection URI may carry libpq's own.

    Hosts: ``unix:/dir`` or ``/dir`` (the directory of the server's socket),
    ``inet:host[:port]`` or ``host[:port]`` (the port is what follows the last
    ``:``), and connection URIs: names starting with ``postgresql:`` (3.7) or any
    ``scheme://`` (3.12). A URI carries its own user, password and database; the
    other forms use ``user``, ``password`` and ``dbname``, and ``dbname`` is then
    required (else the table is unavailable: every lookup RETRY). No hosts means
    ``localhost``.

    A lookup: the key is folded (FOLD_FIX), checked against ``domain`` and against
    what the templates need of it (a key that cannot fill them is "not found"
    without a query). The query is then expanded on the connection that will run
    it, each substituted piece escaped with libpq's PQescapeStringConn for that
    connection's client encoding (with standard_conforming_strings, a ``'`` is
    doubled and a backslash stays as it is), and sent as one simple query, as
    Postfix's PQexec does: several statements are allowed and the last result
    counts. When every expansion of the query stands in a plain string literal
    (``k = '%s'``, ``'%u@%d'``), the query goes instead as a statement prepared
    once per connection, each such literal a parameter carrying the text the
    literal would hold (``db_common.Statement``): the server then skips parsing and
    planning, about half its work for a key lookup. The answer is the same; a
    statement that fails where the simple query works (a parameter whose type
    the server cannot infer, as in ``concat('%s')``; a table changed under it; a
    pooler that loses statements) makes the table send simple queries from then
    on, logged once. Success is a result that returned rows or a completed command; every
    column of every row, as the server's bytes, goes through ``result_format``
    and is joined with ``,``. SQL NULL is the empty string, which is skipped with
    Postfix's "empty lookup result" warning.

    Client encoding: ``encoding`` when set; else LATIN1 for an instance serving a
    3.7-3.10 client (``OpenContext.legacy_client``: Postfix 3.7 hard-codes LATIN1,
    so a UTF-8 key does not match and a value that LATIN1 cannot hold is a query
    error) and UTF8 for a 3.11+ client (the 3.8+ default). 3.7 ignores
    ``encoding``; here an explicit setting counts for every client, so that a 3.7
    site can choose UTF8 (and a 3.8-3.10 client gets what its own direct lookup
    does).

    Connections: one ``pool.ConnectionPool`` per table configuration in a worker
    (instances of one table opened with different flags share it), at most
    ``pyproxymap_pgsql_connections`` (8) connections, in autocommit mode, one query
    at a time on each; a lookup that finds them all busy waits for one. psycopg's
    asyncio API connects them and cancels queries; a query itself goes to libpq
    directly (PQsendQuery, then PQconsumeInput/PQisBusy/PQgetResult as the socket
    becomes readable), with one reader registered per connection for its life: a
    fifth of the CPU of psycopg's cursor machinery. That reader also notices a
    connection that the server closed while it was idle, which is then not used
    again. New
    connections go to the hosts in Postfix's order: UNIX sockets, then TCP hosts,
    then URIs, in random order within each kind. An unreachable host is skipped for
    the pool's back-off (0.25 s doubling to 2 s, logged once per outage); Postfix's
    ``retry_interval`` (60 s) only moves a host whose query failed or whose
    connection broke to the end of that order, so a restarted server is used again
    within seconds. Idle connections close after ``idle_interval`` (60 s); one idle
    for more than 5 s is first checked for a pending server message or a closed
    socket (a restarted server), without a round trip.

    Started lookups (``lookup_start``, the handler's fast path): when the statement
    is already prepared on a pooled connection that is free (or, with all busy,
    once one comes back: ``lend_later``), it is sent from the client's request
    callback and its result taken in the connection's reader, with no task or
    coroutine. Any other outcome (an error result, a lost connection) runs the
    lookup again the coroutine way, from its start, with the failover below (so a
    statement that fails runs twice, and the deadline starts again).

    Failures, never "not found": a query error, an escaping error or an unexpected
    result status moves on to a connection to another host (the failing host's idle
    connections are dropped), as Postfix marks the host down; a connection lost
    during the query is replaced and the query tried once more; with no host left,
    RETRY. A COPY statement is a failed query (PQexec stops there too), and its
    connection is closed. ``pyproxymap_pgsql_timeout`` (10 s) bounds a whole lookup
    (waiting for a connection, connecting, the query): then RETRY at once, while the
    query is cancelled on the server in the background (libpq's non-blocking cancel)
    and its connection, still counted until then, discarded. Query
    failures are logged once per outage of a host (``pool.OutageLog``); a connection
    lost once (a restarted server) is not logged.

SECURITY
    A key reaches the SQL text only through PQescapeStringConn, for the encoding of
    the connection that runs it, or as a parameter value, outside the SQL text. Logs
    show a URI host with its password hidden.

BUGS
    Deliberate differences from Postfix 3.7: an explicit ``encoding`` is honoured;
    URIs of any scheme and ``dbname``-less URI-only configurations are accepted
    (3.10/3.12 rules; 3.7 treats a missing ``dbname`` as fatal); a failed host is
    not refused for ``retry_interval`` but tried last; a slow query times out.

    Instances that differ in client encoding (a worker serving 3.7 and 3.11+
    clients of one table, without ``encoding``) cannot share connections: each
    has a pool, and that table may then have twice the bound.

SEE ALSO
    pgsql_table(5), ``db_common``, ``cfg_parser``, ``pool``,
    docs/TABLES.md section 4.4.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import re
import select
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq
from psycopg.conninfo import make_conninfo

from proxymap import flags as F
from proxymap.tables.base import (
    LATER,
    STARTED,
    AnswerCallback,
    AsyncTable,
    DictOpenError,
    DictRetry,
    Later,
    OpenContext,
    Started,
    answer_with,
)
from proxymap.tables.cfg_parser import CfgParser
from proxymap.tables.db_common import Escape, QueryContext, Statement, Template, parameterized
from proxymap.tables.pool import (
    ConnectionPool,
    EndpointState,
    Lease,
    OutageLog,
    ReadWaiter,
    Sweeper,
    connection_limit,
    start_on_lease,
)
from proxymap.tables.streams import param_number

log = logging.getLogger("proxymap")

DEFAULT_TIMEOUT = 10.0
DEFAULT_INTERVAL = 60  # Postfix's idle_interval and retry_interval
CHECK_AFTER = 5.0  # idle seconds after which a connection is checked before reuse
_HOST_SEPARATORS = re.compile(r"[, \t\r\n]+")
# Postfix 3.12 valid_uri_scheme(): an ASCII letter, then letters, digits, + or -, then ://
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+-]*://", re.ASCII)
_URI_PASSWORD = re.compile(r"^([^/]*//[^:@/]*:)[^@/]*@")
# Plain ints: enum comparisons cost on every lookup.
_OK_STATUSES = frozenset({int(pq.ExecStatus.TUPLES_OK), int(pq.ExecStatus.COMMAND_OK)})
_COPY_STATUSES = frozenset(
    {int(pq.ExecStatus.COPY_IN), int(pq.ExecStatus.COPY_OUT), int(pq.ExecStatus.COPY_BOTH)}
)
_FATAL_ERROR = int(pq.ExecStatus.FATAL_ERROR)
_CONNECTION_BAD = int(pq.ConnStatus.BAD)
CANCEL_TIMEOUT = 5.0  # for the cancel request, and then for the cancelled query's end

Connection = psycopg.AsyncConnection[Any]


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------

UNIX, INET, URI = 0, 1, 2  # host kinds, in Postfix's order of preference


@dataclass(frozen=True, slots=True)
class Host:
    """One entry of ``hosts``: what libpq is given, and how logs show it."""

    text: str
    kind: int
    name: str  # socket directory, host name, or the whole URI
    port: str = ""

    @property
    def label(self) -> str:
        """The entry as written, a URI's password hidden."""
        return _URI_PASSWORD.sub(r"\1***@", self.text) if self.kind == URI else self.text


def is_uri(text: str) -> bool:
    return text.startswith("postgresql:") or _URI_SCHEME.match(text) is not None


def parse_host(text: str) -> Host:
    """Postfix's host_init(): a URI, else strip ``unix:``/``inet:``; a name that is
    empty or starts with ``/`` is a socket directory, else ``host[:port]``."""
    if is_uri(text):
        return Host(text, URI, text)
    name = text[5:] if text.startswith(("unix:", "inet:")) else text
    if not name or name.startswith("/"):
        return Host(text, UNIX, name)
    host, colon, port = name.rpartition(":")
    return Host(text, INET, host, port) if colon else Host(text, INET, name)


def parse_hosts(value: str) -> tuple[Host, ...]:
    names = [name for name in _HOST_SEPARATORS.split(value) if name]
    return tuple(parse_host(name) for name in names or ["localhost"])


@dataclass(frozen=True, slots=True)
class Settings:
    """What the connections of a table depend on (the key of its shared pool)."""

    hosts: tuple[Host, ...]
    user: str
    password: str
    dbname: str
    encoding: str
    idle_interval: int
    retry_interval: int

    def conninfo(self, host: Host) -> str:
        """libpq's connection string for one host (built when connecting, so that a
        malformed URI is a connect failure, as in Postfix)."""
        if host.kind == URI:
            return make_conninfo(host.name, client_encoding=self.encoding)
        params = {
            "host": host.name,
            "port": host.port,
            "dbname": self.dbname,
            "user": self.user,
            "password": self.password,
            "client_encoding": self.encoding,
        }
        return make_conninfo("", **{name: value for name, value in params.items() if value})


def read_settings(cfg: CfgParser, legacy_client: bool) -> Settings:
    """The connection settings, checked as Postfix 3.12 checks them (``check_dbname``
    comes after the templates are read, as in Postfix)."""
    user = cfg.get_str("user", "")
    password = cfg.get_str("password", "")
    dbname = cfg.get_str("dbname", "")
    if legacy_client:
        encoding = cfg.get_optional("encoding") or "LATIN1"
    else:
        encoding = cfg.get_str("encoding", "UTF8", 1)
    retry_interval = cfg.get_int("retry_interval", DEFAULT_INTERVAL, 1)
    idle_interval = cfg.get_int("idle_interval", DEFAULT_INTERVAL, 1)
    hosts = parse_hosts(cfg.get_str("hosts", ""))
    return Settings(hosts, user, password, dbname, encoding, idle_interval, retry_interval)


def check_dbname(settings: Settings, spec: str) -> None:
    """``dbname`` is required unless every host is a URI (3.10+; 3.7 always needs it)."""
    if not settings.dbname:
        for host in settings.hosts:
            if host.kind != URI:
                raise DictOpenError(f"{spec} host target '{host.name}' requires dbname setting")


# ---------------------------------------------------------------------------------------
# Prepared statements
# ---------------------------------------------------------------------------------------

# What a template's literal text must not contain for its statement form: dollar
# quotes and positional parameters, backslash escapes (E'' strings; non-standard
# strings), quoted identifiers, several statements, comments (which may hold quotes).
_NOT_PREPARABLE = re.compile(rb"[$\\\";]|--|/\*")


def statement_for(template: Template) -> Statement | None:
    """The query as a statement with ``$n`` parameters (``db_common.Statement``). The
    server parses and plans it once per connection instead of once per lookup: half
    its work for a key lookup. Where PostgreSQL resolves a parameter's type unlike
    the literal's (``concat('%s')``), preparing fails and the table sends simple
    queries as before (``Backend``)."""
    return parameterized(template, _NOT_PREPARABLE, _dollar)


def _dollar(number: int) -> bytes:
    return b"$%d" % number


# ---------------------------------------------------------------------------------------
# Connections
# ---------------------------------------------------------------------------------------


class Link:
    """One connection: psycopg connects it (and cancels a query on the server);
    queries go straight to libpq (``send_query``, ``consume_input``, ``is_busy``,
    ``get_result``), which costs a fifth of psycopg's cursor machinery.

    A reader stays registered on the socket for the connection's life: it reads
    whatever arrives and wakes the query waiting for it once libpq has a whole
    result, so a query costs no (un)registration system calls. When the connection
    breaks (also while idle: a restarted server) the reader goes, the link is
    marked broken and the pool never lends it again.
    """

    __slots__ = (
        "connection",
        "pgconn",
        "escape",
        "encoding",
        "loop",
        "fd",
        "waiter",
        "timer",
        "broken",
        "sweeper",
        "statements",
    )

    def __init__(
        self, connection: Connection, loop: asyncio.AbstractEventLoop, sweeper: Sweeper
    ) -> None:
        self.connection = connection
        self.sweeper = sweeper  # the pool's: watches query deadlines
        self.pgconn = connection.pgconn
        # PQescapeStringConn for this connection's client encoding.
        self.escape: Escape = pq.Escaping(self.pgconn).escape_string
        self.encoding = self.pgconn._encoding
        self.loop = loop
        self.fd = self.pgconn.socket
        self.waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.broken = ""  # why the connection is unusable; "" while it works
        self.statements: dict[bytes, bytes] = {}  # prepared here: statement text -> name
        loop.add_reader(self.fd, self._readable)

    @property
    def usable(self) -> bool:
        return not self.broken

    # --- events ------------------------------------------------------------------------
    def _readable(self) -> None:
        pgconn = self.pgconn
        try:
            pgconn.consume_input()
        except psycopg.Error as exc:
            self._lose(_reason(exc))
            return
        waiter = self.waiter
        if waiter is not None and not pgconn.is_busy():
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _writable(self) -> None:
        waiter = self.waiter
        try:
            if self.pgconn.flush():
                return  # more to send
        except psycopg.Error as exc:
            self._lose(_reason(exc))
            return
        self.loop.remove_writer(self.fd)
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _expire(self) -> None:
        self.timer = None
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError())

    def _lose(self, reason: str) -> None:
        """The connection broke: no more reading, and the waiting query learns it."""
        self.broken = reason or "connection lost"
        self._unregister()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(_Lost(self.broken))

    def _unregister(self) -> None:
        try:
            self.loop.remove_reader(self.fd)
            self.loop.remove_writer(self.fd)
        except Exception:  # noqa: BLE001 - the loop is closed: nothing to remove
            pass

    # --- one query ---------------------------------------------------------------------
    async def _wait(self) -> None:
        waiter = self.loop.create_future()
        self.waiter = waiter
        await waiter

    async def run(
        self,
        query: bytes,
        deadline: float | None,
        values: Sequence[bytes] | None = None,
        prepare: bytes | None = None,
    ) -> pq.abc.PGresult:
        """Send ``query`` as one simple query and return its last result (PQexec's),
        which is TUPLES_OK or COMMAND_OK; else _Failed or _Lost. Past ``deadline``
        (loop time) TimeoutError, the query still running. With ``values``, run
        the prepared statement named ``query`` with them; with ``prepare``,
        prepare ``query`` under that name.

        One coroutine frame from sending to the result: every nested await level
        costs again on each resumption."""
        if self.broken:
            raise _Lost(self.broken)
        pgconn = self.pgconn
        if deadline is not None:
            self.sweeper.watch(self, deadline, self._expire, self.loop)
        try:
            try:
                if values is not None:
                    pgconn.send_query_prepared(query, values)
                elif prepare is not None:
                    pgconn.send_prepare(prepare, query)
                else:
                    pgconn.send_query(query)
                if pgconn.flush():  # the rest when the socket takes it (libpq is non-blocking)
                    self.loop.add_writer(self.fd, self._writable)
                    await self._wait()
            except psycopg.Error as exc:
                raise self._failure(_reason(exc)) from None
            last = None
            while True:
                if pgconn.is_busy():
                    waiter = self.waiter = self.loop.create_future()
                    await waiter
                result = pgconn.get_result()
                if result is None:
                    break
                last = result
                if result.status in _COPY_STATUSES:
                    # PQexec stops here too; the connection is stuck in COPY: discard it.
                    self.broken = "COPY in a lookup query"
                    self._unregister()
                    break
        finally:
            self.waiter = None
            if deadline is not None:
                self.sweeper.unwatch(self)
        if last is None:
            raise self._failure("no result")
        status = last.status
        if status in _OK_STATUSES:
            return last
        if status == _FATAL_ERROR:
            raise self._failure(_first_line(last.get_error_message(self.encoding)))
        raise _Failed(f"unexpected result status {pq.ExecStatus(status).name}")

    def _failure(self, reason: str) -> Exception:
        """An error: the connection's loss, or the server's refusal of the query."""
        if self.broken or self.pgconn.status == _CONNECTION_BAD:
            if not self.broken:
                self._lose(reason)
            return _Lost(reason)
        return _Failed(reason)

    async def drain(self, timeout: float) -> None:
        """Read what a cancelled query still returns, until the connection is idle."""
        pgconn = self.pgconn
        self.timer = self.loop.call_later(timeout, self._expire)
        try:
            while not self.broken:
                if pgconn.is_busy():
                    await self._wait()
                if pgconn.get_result() is None:
                    return
        finally:
            self.waiter = None
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

    def close(self) -> None:
        """Close at once (libpq's PQfinish; no await): also for a pool whose loop is gone."""
        self._unregister()
        self.broken = self.broken or "closed"
        try:
            self.pgconn.finish()
        except Exception:  # noqa: BLE001 - already finished
            pass


def close_connection(link: Link) -> None:
    link.close()


async def connection_is_idle(link: Link) -> bool:
    """A reusable idle connection has nothing to read: a readable socket means a
    message from the server (a shutdown notice) or a closed connection."""
    if link.broken or link.pgconn.status == _CONNECTION_BAD:
        return False
    try:
        readable, _, _ = select.select([link.fd], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


class ConnectError(Exception):
    """A connection could not be made (the pool logs it once per outage)."""


class _Lost(Exception):
    """The connection broke during the query."""


class _Failed(Exception):
    """The server answered the query with an error (or it could not be escaped)."""


class _Abandoned(DictRetry):
    """The query timed out: it is being cancelled, and its connection is not ours."""


PgLease = Lease[Link, Host]


class Backend:
    """The pool of one table configuration, and what its lookups learn about hosts."""

    def __init__(self, spec: str, settings: Settings, size: int, timeout: float) -> None:
        self.spec = spec
        self.settings = settings
        self.timeout = timeout
        self._outages: dict[str, OutageLog] = {}  # host label -> its query failures
        self._penalties: dict[str, float] = {}  # host label -> end of its retry_interval
        self._cancelling: set[asyncio.Future[None]] = set()
        # Queries go as prepared statements until one fails where the simple query
        # works (see Statement): then simple queries, for good.
        self.prepared = True
        self.pool: ConnectionPool[Link, Host] = ConnectionPool(
            spec,
            settings.hosts,
            self._connect,
            close_connection,
            size=size,
            connect_timeout=timeout,
            idle_limit=settings.idle_interval,
            health_check=connection_is_idle,
            check_after=CHECK_AFTER,
            order=self._order,
            label=lambda host: host.label,
            usable=_link_usable,
        )

    async def _connect(self, host: Host) -> Link:
        try:
            connection = await psycopg.AsyncConnection.connect(
                self.settings.conninfo(host), autocommit=True, prepare_threshold=None
            )
        except psycopg.Error as exc:  # libpq's message has hint lines: keep a log line one
            raise ConnectError(_reason(exc)) from None
        try:
            return Link(connection, asyncio.get_running_loop(), self.pool.sweeper)
        except BaseException:
            connection.pgconn.finish()
            raise

    def _order(self, states: list[EndpointState[Host]]) -> list[EndpointState[Host]]:
        """Random within each kind, UNIX first; hosts whose query failed lately last."""
        now = time.monotonic()
        random.shuffle(states)
        return sorted(
            states,
            key=lambda state: (self._penalties.get(state.label, 0.0) > now, state.endpoint.kind),
        )

    def outage(self, host: EndpointState[Host]) -> OutageLog:
        """Query failures of one host, logged once per outage (the pool logs the
        connect failures)."""
        outage = self._outages.get(host.label)
        if outage is None:
            outage = self._outages[host.label] = OutageLog(f"{self.spec}: {host.label}")
        return outage

    def _penalize(self, host: EndpointState[Host]) -> None:
        self._penalties[host.label] = time.monotonic() + self.settings.retry_interval

    # --- one lookup ------------------------------------------------------------------
    async def query(
        self, context: QueryContext, key: bytes, statement: Statement | None = None
    ) -> pq.abc.PGresult:
        """Run the query of ``context`` for ``key`` (which fills its templates),
        as ``statement`` (its statement form) or escaped for the connection that runs
        it; the result, or DictRetry. See the module description for the failover
        rules."""
        if not self.prepared:
            statement = None
        pool = self.pool
        loop = pool.running_loop()
        deadline = loop.time() + self.timeout
        failed: set[str] = set()
        losses = 0
        reason = "no host answered"
        for _ in range(len(self.settings.hosts) + 1):
            lease = pool.lend(loop)
            if lease is None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                lease = await pool.acquire(remaining)  # PoolUnavailable: a DictRetry
            host = lease.endpoint
            if failed and host.label in failed:
                pool.release(lease)  # no other host to fail over to
                break
            link = lease.connection
            try:
                name = None if statement is None else link.statements.get(statement.text)
                if name is not None:
                    assert statement is not None
                    values = statement.expand(key, context.needs)
                    try:
                        result = await link.run(name, deadline, values)
                    except _Failed as error:
                        result = await self._simple_instead(link, context, key, deadline, error)
                else:
                    result = await self._first_run(link, context, key, statement, deadline)
            except _Lost as lost:
                losses += 1
                reason = self._after_loss(lease, str(lost), losses, failed)
                continue
            except _Failed as error:
                reason = f"{host.label}: {error}"
                if self._after_failure(lease, str(error), failed):
                    break
                continue
            except TimeoutError:
                raise self._timed_out(lease) from None
            except asyncio.CancelledError:
                self._abandon(lease)  # the cancelling task gives the connection back
                raise
            except OSError as exc:  # below the driver: treat the connection as lost
                losses += 1
                reason = self._after_loss(lease, str(exc) or exc.__class__.__name__, losses, failed)
                continue
            except BaseException:
                pool.release(lease, reusable=False)
                raise
            self._give_back(lease, loop)
            return result
        raise DictRetry(f"{self.spec}: {reason}")

    def _give_back(self, lease: PgLease, loop: asyncio.AbstractEventLoop) -> None:
        """A connection back in the pool after its query's result; its host's outage
        (if any) is over."""
        self.pool.release(lease, lease.connection.usable, loop)
        outage = self._outages.get(lease.endpoint.label)
        if outage is not None:
            outage.ok()

    def _timed_out(self, lease: PgLease) -> _Abandoned:
        """A query past its deadline: cancelled on the server (``_abandon``); RETRY."""
        self._abandon(lease)
        self.outage(lease.endpoint).failed(f"query timed out after {self.timeout:g}s")
        return _Abandoned(f"{self.spec}: query timed out after {self.timeout:g}s")

    async def _first_run(
        self,
        link: Link,
        context: QueryContext,
        key: bytes,
        statement: Statement | None,
        deadline: float,
    ) -> pq.abc.PGresult:
        """A simple query, or the statement's first run on this connection: prepare it."""
        if statement is None or not self.prepared:
            return await _simple(link, context, key, deadline)
        name = b"pyproxymap_%d" % next(_STATEMENT_NUMBERS)
        try:
            await link.run(statement.text, deadline, prepare=name)
            link.statements[statement.text] = name
            return await link.run(name, deadline, statement.expand(key, context.needs))
        except _Failed as error:
            return await self._simple_instead(link, context, key, deadline, error)

    async def _simple_instead(
        self, link: Link, context: QueryContext, key: bytes, deadline: float, error: _Failed
    ) -> pq.abc.PGresult:
        """The statement failed: the simple query answers. Its success shows that the
        statement form is wrong for this table (a parameter whose type PostgreSQL
        cannot infer, a pooler that loses statements): simple queries from now on."""
        result = await _simple(link, context, key, deadline)
        if self.prepared:
            self.prepared = False
            log.info(
                "%s: sending simple queries from now on: the prepared statement failed: %s",
                self.spec,
                error,
            )
        return result

    def _after_loss(self, lease: PgLease, lost: str, losses: int, failed: set[str]) -> str:
        """A connection broke: replace it. Once is a connection the server dropped
        (a restart) and is not logged; twice, the host counts as failed."""
        self._discard(lease)
        if losses > 1:
            self.outage(lease.endpoint).failed(f"connection lost: {lost}")
            failed.add(lease.endpoint.label)
        return f"{lease.endpoint.label}: connection lost: {lost}"

    def _after_failure(self, lease: PgLease, error: str, failed: set[str]) -> bool:
        """The host answered with an error: whether no other host is left to try."""
        host = lease.endpoint
        self.outage(host).failed(f"query failed: {error}")
        self._penalize(host)
        failed.add(host.label)
        if all(state.label in failed for state in self.pool.endpoints):
            # The connection itself is fine (unless a COPY left it unusable).
            self.pool.release(lease, reusable=lease.connection.usable)
            return True
        self._discard(lease)
        return False

    def _discard(self, lease: PgLease) -> None:
        """Close the connection and its idle siblings to that host, so that the next
        attempt takes another host (or a new connection)."""
        self._penalize(lease.endpoint)
        self.pool.release(lease, reusable=False)
        self.pool.suspect(lease)

    def _abandon(self, lease: PgLease) -> None:
        """The lookup answers at once; the query is cancelled on the server in the
        background, and its connection stays counted (then closed) until that is over."""
        task = asyncio.ensure_future(self._cancel(lease))
        self._cancelling.add(task)
        task.add_done_callback(self._cancelling.discard)

    async def _cancel(self, lease: PgLease) -> None:
        link = lease.connection
        try:
            if not link.broken:
                await link.connection.cancel_safe(timeout=CANCEL_TIMEOUT)
                await link.drain(CANCEL_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - the connection is closed anyway
            log.debug("%s: cancelling a timed-out query: %s", self.spec, exc)
        finally:
            self.pool.release(lease, reusable=False)


_STATEMENT_NUMBERS = itertools.count(1)


async def _simple(
    link: Link, context: QueryContext, key: bytes, deadline: float
) -> pq.abc.PGresult:
    """The query as Postfix sends it: expanded, each piece escaped for this connection."""
    try:
        query = context.expand_query(context.query, key, link.escape)
    except psycopg.Error as exc:
        raise link._failure(f"cannot escape the key: {_reason(exc)}") from None
    assert query is not None  # the caller checked that the key fills the templates
    return await link.run(query, deadline)


def _link_usable(link: Link) -> bool:
    return not link.broken


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0] if text else ""


def _reason(exc: psycopg.Error) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__


# Backends are shared by the instances of one table configuration in a worker.
_BACKENDS: dict[tuple[str, Settings, int, float], Backend] = {}


def backend_for(spec: str, settings: Settings, ctx: OpenContext | None) -> Backend:
    params = ctx.params if ctx else None
    size = connection_limit("pgsql", params) or 8
    timeout = param_number(ctx, "pyproxymap_pgsql_timeout", DEFAULT_TIMEOUT)
    key = (spec, settings, size, timeout)
    backend = _BACKENDS.get(key)
    if backend is None:
        backend = _BACKENDS[key] = Backend(spec, settings, size, timeout)
    return backend


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _PgQueued:
    """A started lookup waiting for a pooled connection (``ConnectionPool.lend_later``)."""

    table: PgsqlTable
    key: bytes
    answer: AnswerCallback
    loop: asyncio.AbstractEventLoop  # the running one

    def leased(self, lease: PgLease | Exception) -> None:
        table = self.table
        start_on_lease(table.backend.pool, lease, self.start, self.answer, table)

    def start(self, lease: PgLease) -> None:
        self.table._queued_lease(self, lease)


@dataclass(slots=True, eq=False)
class _PgFlight(ReadWaiter):
    """A started lookup's statement (``PgsqlTable.lookup_start``), on its link.

    It stands in the link as the waiter, which the link's reader (and writer) wakes
    with ``set_result`` once libpq is not busy, or ``set_exception`` when the
    connection is lost. The pool's sweeper calls ``expire`` past the deadline."""

    table: PgsqlTable
    lease: PgLease
    key: bytes
    answer: AnswerCallback
    loop: asyncio.AbstractEventLoop  # the running one, where the answer comes
    last: pq.abc.PGresult | None = None
    over: bool = False

    def _broken(self, exc: Exception) -> None:
        self._end()
        log.error("%s: lookup failed: %r", self.table.spec, exc, exc_info=exc)
        self.table.backend.pool.release(self.lease, reusable=False)
        self.answer(DictRetry(f"{self.table.spec}: lookup failed: {exc!r}"))

    def _read(self) -> None:
        link = self.lease.connection
        pgconn = link.pgconn
        while True:
            if pgconn.is_busy():
                link.waiter = self  # type: ignore[assignment]  # a future's stand-in
                return
            result = pgconn.get_result()
            if result is None:
                break
            self.last = result
            if result.status in _COPY_STATUSES:
                break  # stuck in COPY: the link is of no more use (Link.run's rule)
        self._end()
        last = self.last
        if last is not None and last.status in _OK_STATUSES:
            self.table._answered(self, last)
            return
        if last is not None and last.status in _COPY_STATUSES:
            link.broken = "COPY in a lookup query"
            link._unregister()
        pool = self.table.backend.pool
        pool.release(self.lease, link.usable, pool.running_loop())
        self.table._again(self)  # an error: the coroutine way tells which, and retries

    def set_exception(self, _exc: BaseException) -> None:
        if self.over:
            return
        self._end()
        self.table.backend._discard(self.lease)  # lost (the link says so): another one
        self.table._again(self)

    def expire(self) -> None:
        if not self.over:
            self._end()
            self.table._expired(self)

    def _end(self) -> None:
        self.over = True
        self.table.backend.pool.sweeper.unwatch(self)


class PgsqlTable(AsyncTable):
    dict_type = "pgsql"

    def __init__(
        self, name: str, open_mode: int, flags: int, ctx: OpenContext | None = None
    ) -> None:
        super().__init__(name, open_mode, flags | F.FIXED, ctx)
        if open_mode != os.O_RDONLY:
            raise DictOpenError(f"{self.spec} map requires O_RDONLY access mode")
        context = ctx or OpenContext()
        cfg = CfgParser(name, context.params)
        # Postfix's order, so that the first error reported is the same one.
        settings = read_settings(cfg, context.legacy_client)
        self.query_context = QueryContext.for_sql(cfg, context, "pgsql", table=self.spec)
        check_dbname(settings, self.spec)
        self.backend = backend_for(self.spec, settings, ctx)
        self.statement = statement_for(self.query_context.query)
        self._going_on: set[asyncio.Future[None]] = set()  # started lookups, again

    @property
    def pool(self) -> ConnectionPool[Link, Host]:
        return self.backend.pool

    async def alookup(self, key: bytes) -> bytes | None:
        key = self.fold(key)  # before any await: the flag word is shared
        context = self.query_context
        if context.domain is not None and not (
            await context.acheck_domain(key)
            if context.domain_asynchronous
            else context.check_domain(key)
        ):
            return None
        if not (key and context.any_key_fills) and (
            context.expand_query(context.query, key, None) is None
        ):
            return None  # the key cannot fill the templates: no query
        return self._value(key, await self.backend.query(context, key, self.statement))

    def _value(self, key: bytes, result: pq.abc.PGresult) -> bytes | None:
        context = self.query_context
        rows = result.ntuples
        if not rows:
            return None
        if rows == 1 and result.nfields == 1 and context.verbatim_results:
            value = result.get_value(0, 0)
            if value:
                return value  # what the joiner makes of one value, without it
        joined = context.results(key)
        add = joined.add
        get_value = result.get_value
        columns = range(result.nfields)
        for row in range(rows):
            for column in columns:
                # libpq gives NULL as "": Postfix skips it with a warning, like "".
                add(get_value(row, column) or b"")
        return joined.value()

    # --- started lookups (AsyncTable.lookup_start) -----------------------------------------
    starts = True

    def lookup_start(self, key: bytes, answer: AnswerCallback) -> bytes | None | Later | Started:
        """``alookup`` without a coroutine when the statement is prepared on a pooled
        connection that is free at once: it is sent now, and the result taken in the
        link's reader (``_PgFlight``). A result that is not TUPLES_OK or COMMAND_OK,
        or a lost connection, runs the lookup again the coroutine way (failover,
        the simple-query fallback); the deadline expires as there."""
        backend = self.backend
        statement = self.statement
        context = self.query_context
        if statement is None or not backend.prepared or context.domain is not None:
            return LATER
        key = self.fold(key)  # before anything waits: the flag word is shared
        if not (key and context.any_key_fills) and (
            context.expand_query(context.query, key, None) is None
        ):
            return None  # the key cannot fill the templates: no query
        pool = backend.pool
        loop = pool.running_loop()
        lease = pool.lend(loop)
        if lease is not None:
            return self._send(lease, key, answer, loop)
        queued = _PgQueued(self, key, answer, loop)
        return STARTED if pool.lend_later(queued.leased, backend.timeout, loop) else LATER

    def _send(
        self, lease: PgLease, key: bytes, answer: AnswerCallback, loop: asyncio.AbstractEventLoop
    ) -> Later | Started:
        """Send a started lookup's statement on LEASE: STARTED, or LATER (the lease
        given back) when the link has not prepared it or cannot take it now."""
        backend = self.backend
        pool = backend.pool
        statement = self.statement
        assert statement is not None
        link = lease.connection
        name = link.statements.get(statement.text)
        if name is None or link.broken or link.waiter is not None:
            pool.release(lease, True, loop)
            return LATER
        pgconn = link.pgconn
        try:
            pgconn.send_query_prepared(name, statement.expand(key, self.query_context.needs))
            unsent = pgconn.flush()
        except psycopg.Error:  # the connection broke: alookup takes another
            backend._discard(lease)
            return LATER
        flight = _PgFlight(self, lease, key, answer, loop)
        link.waiter = flight  # type: ignore[assignment]  # a future's stand-in
        if unsent:  # the rest when the socket takes it; then the result
            loop.add_writer(link.fd, link._writable)
        pool.sweeper.watch(flight, loop.time() + backend.timeout, flight.expire, loop)
        return STARTED

    def _answered(self, flight: _PgFlight, result: pq.abc.PGresult) -> None:
        """A started lookup's result: the reply first, the bookkeeping after it."""
        answer_with(flight.answer, self._value, flight.key, result, self)  # never raises
        self.backend._give_back(flight.lease, flight.loop)

    def _queued_lease(self, queued: _PgQueued, lease: PgLease) -> None:
        """A connection for a started lookup that waited for one."""
        if self._send(lease, queued.key, queued.answer, queued.loop) is LATER:
            self._again(queued)

    def _again(self, flight: _PgFlight | _PgQueued) -> None:
        """The lookup the coroutine way, from the start (the lease is given back)."""
        task = asyncio.ensure_future(self._query_again(flight.key, flight.answer))
        self._going_on.add(task)
        task.add_done_callback(self._going_on.discard)

    async def _query_again(self, key: bytes, answer: AnswerCallback) -> None:
        try:
            result = await self.backend.query(self.query_context, key, self.statement)
            value: bytes | None | Exception = self._value(key, result)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            value = exc
        answer(value)

    def _expired(self, flight: _PgFlight) -> None:
        """No result by the deadline: RETRY, and the query is cancelled, as in
        ``Backend.query``."""
        lease = flight.lease
        link = lease.connection
        if link.waiter is flight:  # type: ignore[comparison-overlap]  # a future's stand-in
            link.waiter = None
        flight.answer(self.backend._timed_out(lease))

    def close(self) -> None:
        for task in self._going_on:
            task.cancel()
        self.backend.pool.discard_idle()
