"""memcache_table(5) client: ``memcache:/etc/postfix/file.cf`` (or a main.cf prefix).

NAME
    memcache -- lookups, updates and deletes on one memcached, with an optional backup

SYNOPSIS
    # /etc/postfix/verify-memcache.cf
    memcache = inet:127.0.0.1:11211      # or inet:[::1]:11211, unix:/path/to/socket
    key_format = verify:%s
    backup = btree:/var/lib/postfix/verify_cache
    ttl = 3600

DESCRIPTION
    Settings (memcache_table(5), Postfix 3.7): ``memcache`` (inet:localhost:11211),
    ``backup`` (none), ``key_format`` (%s), ``domain`` (none), ``ttl`` (3600),
    ``flags`` (0), ``timeout`` (2), ``max_try`` (2), ``retry_pause`` (1),
    ``line_size_limit`` (1024), ``data_size_limit`` (10240).

    The key sent to memcached. An empty key, a key outside ``domain``, a
    ``key_format`` expansion that is suppressed or empty, and a memcache key with
    an ASCII blank (space, tab, newline, VT, FF, CR; other control characters
    are sent, as by 3.7) are "not found" without any I/O (an update of such a
    key is skipped with a warning and answers "not stored"; a delete answers "not
    found"). ``domain`` is checked on the key as given, then the key is
    lower-cased (ASCII) when the request asks FOLD_FIX, then expanded through
    ``key_format`` with the ``%`` codes of db_common and no quoting. The table is
    FIXED and MULTI_WRITER whatever ``key_format`` uses of the key (in Postfix
    3.7 a partial-key format does not make it PATTERN).

    The text protocol. ``get KEY`` is answered ``END`` (not found) or ``VALUE x y
    LEN``, LEN bytes, ``END``; the value is cut at its first NUL (Postfix returns
    a C string). ``set KEY FLAGS TTL LEN`` + data expects ``STORED``; ``delete KEY``
    expects ``DELETED`` (0) or ``NOT_FOUND`` (1). A reply line longer than
    ``line_size_limit``, a LEN above ``data_size_limit``, any other reply, a
    timeout (``timeout`` seconds per read or write, as Postfix's stream timeout;
    0 = none) or an I/O error closes the connection and the command is tried
    again after ``retry_pause`` seconds, ``max_try`` times in all; then RETRY. A
    connection that cannot be made is not retried: RETRY at once. A value longer
    than ``data_size_limit`` is not sent: a warning, "not stored" (1), no error.

    The backup. ``backup`` is a type:name table opened with this table's access
    mode (O_RDONLY or O_RDWR, without O_CREAT) and open flags; it sees the key as
    given, never the ``key_format`` form. A lookup asks memcached first; on a
    miss, or when memcached fails, it asks the backup, whose answer (or error) is
    the lookup's, and writes a found value back to memcached with ``flags`` and
    ``ttl`` (errors of that write are ignored). Updates and deletes go to
    memcached, then to the backup, whose status and error are the operation's;
    without a backup they are memcached's. ``first``/``next`` is the backup's;
    without one it is "not found" with a warning. So with a backup a memcached
    outage is invisible: Postfix's rule, followed because the backup is the
    authoritative store. Each backup operation runs with the request bits of the
    request (proxywrite's DUP_REPLACE and SYNC_UPDATE on updates), as when the
    client opens the table itself; the C proxymap leaves the backup with the flags
    of the request that opened the instance (a backup opened by ``postmap -d``
    lacks SYNC_UPDATE there, and one opened without a DUP_* flag makes the C
    proxymap exit on the first update of an existing key).

    Concurrency: an ``AsyncTable`` on asyncio streams, with a ``pool.ConnectionPool``
    of at most ``pyproxymap_memcache_connections`` (main.cf, default 8)
    connections per table and worker, one command at a time on each; Postfix
    has one connection per table and serializes every lookup behind the slowest.
    A lookup that finds every connection busy waits up to ``timeout`` seconds
    for one (then RETRY). A connection that memcached closed while idle is
    replaced at once, not counted as a failed try (the C proxymap's event loop
    notices the close likewise). After a refused connect the server is asked
    again after a back-off of 0.25 s doubling up to 2 s (lookups meanwhile answer
    RETRY, or the backup's answer, without a connect; Postfix tries a connect
    each time): a restarted memcached is used again within 2 s. Failures are
    logged once per outage (the pool's connect warning, or one line for failed
    commands), and once when it is over.

SECURITY
    Refused (table unavailable) when the open flags carry NO_UNAUTH: anybody who
    can reach memcached can change it.

BUGS
    Postfix accepts a port name in ``inet:host:service``; it is resolved once, at
    open. Postfix's timeout applies to each read and write, so one try may take
    longer than ``timeout``; so does ours.

SEE ALSO
    memcache_table(5); db_common (key_format, domain); pool; streams.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

from proxymap import flags as F
from proxymap.tables.base import (
    AsyncTable,
    DictOpenError,
    DictRetry,
    DictUnsupported,
    OpenContext,
    Table,
)
from proxymap.tables.cfg_parser import CfgParser
from proxymap.tables.composite import Call, run_async
from proxymap.tables.db_common import DomainFilter, Template, expand
from proxymap.tables.pool import (
    ConnectionPool,
    OutageLog,
    PoolUnavailable,
    Sweeper,
    connection_limit,
    failure_reason,
)
from proxymap.tables.streams import Stream, stream_opener

log = logging.getLogger("proxymap")

T = TypeVar("T")

DEFAULT_SERVER = "inet:localhost:11211"
DEFAULT_CONNECTIONS = 8
_BLANKS = frozenset(b" \t\n\v\f\r")  # C isspace() in the C locale
_NUMBER = re.compile(rb"[+-]?[0-9]+")


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    """The .cf parameters, with Postfix's defaults and lower bounds."""

    server: str
    backup: str | None
    key_format: str
    timeout: float | None  # None: no limit (timeout <= 0)
    ttl: int
    mc_flags: int
    retry_pause: int
    max_try: int
    line_limit: int
    data_limit: int

    @classmethod
    def read(cls, cfg: CfgParser) -> Settings:
        timeout = cfg.get_int("timeout", 2)
        return cls(
            server=cfg.get_str("memcache", DEFAULT_SERVER),
            backup=cfg.get_str("backup", "") if cfg.has("backup") else None,
            key_format=cfg.get_str("key_format", "%s"),
            timeout=float(timeout) if timeout > 0 else None,
            ttl=cfg.get_int("ttl", 3600),
            mc_flags=cfg.get_int("flags", 0),
            retry_pause=cfg.get_int("retry_pause", 1, 1),
            max_try=cfg.get_int("max_try", 2, 1),
            line_limit=cfg.get_int("line_size_limit", 1024, 1),
            data_limit=cfg.get_int("data_size_limit", 10240, 1),
        )


def parse_server(server: str) -> str:
    """``inet:host:port`` / ``unix:path`` / ``local:path`` -> an endpoint for
    ``stream_opener``; ValueError with the reason when Postfix would refuse it.

    As Postfix's host_port(): ``inet:port`` and ``inet::port`` mean localhost; a port
    may be a service name.
    """
    transport, colon, address = server.partition(":")
    if not colon or not transport or not address:
        raise ValueError(f'need service transport:endpoint instead of "{server}"')
    if transport in ("unix", "local"):
        return f"unix:{address}"
    if transport != "inet":
        raise ValueError(f"invalid transport name: {transport} in service: {server}")
    host, port = _host_port(address)
    return f"inet:[{host}]:{port}"


def _host_port(address: str) -> tuple[str, int]:
    if address.startswith("["):
        host, bracket, rest = address[1:].partition("]")
        if not bracket:
            raise ValueError('missing "]"')
        if rest and not rest.startswith(":"):
            raise ValueError('garbage after "]"')
        if host[:5].lower() == "ipv6:":
            host = host[5:]
        port = rest[1:]
    else:
        host, colon, port = address.rpartition(":")
        if not colon:
            port = address
        host = host or "localhost"
    if not host:
        raise ValueError("missing host information")
    if not port:
        raise ValueError("missing service information")
    if port[0].isdigit():
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("garbage after numerical service")
        return host, int(port)
    try:
        return host, socket.getservbyname(port, "tcp")
    except OSError:
        raise ValueError(f"unknown service: {port}/tcp") from None


# ---------------------------------------------------------------------------
# The protocol, one command on one connection
# ---------------------------------------------------------------------------


class _Failure(Exception):
    """One try failed (I/O, timeout, unexpected reply): close, pause, try again."""


class _ClosedEarly(_Failure):
    """The server closed the connection before the first byte of a reply."""


@dataclass(eq=False, slots=True)
class _Connection:
    stream: Stream
    commands: int = 0  # commands started on it; 0 = fresh from connect
    reusable: bool = True

    @property
    def stale(self) -> bool:
        """Closed by the server while it was idle (memcached restarted)."""
        return self.stream.reader.at_eof() or self.stream.writer.is_closing()


def parse_value_header(line: bytes) -> int | None:
    """The LEN of ``VALUE key flags LEN [cas]`` read as sscanf("VALUE %*s %*s %ld")
    would; None when it does not match."""
    if not line.startswith(b"VALUE"):
        return None
    fields = line[5:].split()
    if len(fields) < 3:
        return None
    number = _NUMBER.match(fields[2])
    return int(number.group()) if number else None


class _Wire:
    """Reads and writes with Postfix's limits and per-operation timeout."""

    def __init__(self, connection: _Connection, settings: Settings, sweeper: Sweeper) -> None:
        self.reader = connection.stream.reader
        self.writer = connection.stream.writer
        self.timeout = settings.timeout
        self.sweeper = sweeper  # the pool's: no timer per read (asyncio.timeout's)
        self.line_limit = settings.line_limit
        self.started = False  # a reply byte has arrived
        # False after a reply that was usable but did not end as it should: keep what
        # it brought, drop the connection (as Postfix does).
        self.reusable = True

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        if self.writer.transport.get_write_buffer_size():  # else nothing to wait for
            async with self.sweeper.timeout(self.timeout):
                await self.writer.drain()

    async def line(self) -> bytes:
        """One reply line without CRLF (or bare LF); at most line_size_limit bytes."""
        try:
            async with self.sweeper.timeout(self.timeout):
                raw = await self.reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial and not self.started:
                raise _ClosedEarly("connection closed by the server") from None
            raise _Failure("EOF in a reply line") from None
        except asyncio.LimitOverrunError:
            raise _Failure("reply line too long") from None
        self.started = True
        end = len(raw) - 1
        # Postfix reads at most line_size_limit bytes, accepting a CR at the limit
        # when the LF follows.
        if end >= self.line_limit and not (end == self.line_limit and raw[end - 1] == 0x0D):
            raise _Failure("reply line too long")
        body = raw[:end]
        if body.endswith(b"\r"):
            body = body[:-1]
        return body.split(b"\0", 1)[0]

    async def data(self, length: int) -> bytes:
        try:
            async with self.sweeper.timeout(self.timeout):
                raw = await self.reader.readexactly(length + 2)
        except asyncio.IncompleteReadError:
            raise _Failure("EOF receiving the reply data") from None
        if raw[length:] != b"\r\n":
            raise _Failure("reply data not followed by CRLF")
        return raw[:length]


async def _get(wire: _Wire, key: bytes, data_limit: int) -> bytes | None:
    await wire.send(b"get " + key + b"\r\n")
    line = await wire.line()
    if line == b"END":
        return None
    length = parse_value_header(line)
    if length is None or length < 0 or length > data_limit:
        raise _Failure(f"unexpected reply: {_shown(line[:30])}")
    value = await wire.data(length)
    try:
        complete = await wire.line() == b"END"
    except (_Failure, OSError, TimeoutError):
        complete = False
    if not complete:
        wire.reusable = False  # the value arrived, END did not
    return value.split(b"\0", 1)[0]


async def _set(wire: _Wire, key: bytes, value: bytes, mc_flags: int, ttl: int) -> int:
    await wire.send(b"set %s %d %d %d\r\n%s\r\n" % (key, mc_flags, ttl, len(value), value))
    line = await wire.line()
    if line != b"STORED":
        raise _Failure(f"update failed: {_shown(line[:30])}")
    return 0


async def _delete(wire: _Wire, key: bytes) -> int:
    await wire.send(b"delete " + key + b"\r\n")
    line = await wire.line()
    if line == b"DELETED":
        return 0
    if line == b"NOT_FOUND":
        return 1
    raise _Failure(f"delete failed: {_shown(line[:30])}")


def _shown(data: bytes) -> str:
    return data.decode("utf-8", "backslashreplace")


def _one_call(call: Call) -> Generator[Call, Any, Any]:
    """A plan of one member operation (composite.run_async handles sync and async
    members, and a writer's lock on a member file)."""
    result = yield call
    return result


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


class MemcacheTable(AsyncTable):
    dict_type = "memcache"

    def __init__(
        self, name: str, open_mode: int, flags: int, ctx: OpenContext | None = None
    ) -> None:
        super().__init__(name, open_mode, flags, ctx)
        if flags & F.NO_UNAUTH:
            raise DictOpenError(f"{self.spec} map is not allowed for security-sensitive data")
        access = open_mode & (os.O_ACCMODE | os.O_APPEND)
        if access not in (os.O_RDONLY, os.O_RDWR):
            raise DictOpenError(f"{self.spec} map requires O_RDONLY or O_RDWR access mode")
        self.writable = access == os.O_RDWR
        ctx = ctx or OpenContext()
        cfg = CfgParser(name, ctx.params)
        self.settings = settings = Settings.read(cfg)
        try:
            endpoint = parse_server(settings.server)
        except ValueError as exc:
            raise DictOpenError(f"{self.spec}: {exc}") from None
        template = Template.parse(settings.key_format, "query", table=name)
        # Postfix copies the key when the format is exactly "%s" (no expansion checks).
        self.key_format = None if settings.key_format == "%s" else template
        self.domain = DomainFilter.from_config(cfg, ctx)
        self.backup = _open_backup(settings.backup, access, flags, ctx)
        # Always FIXED: Postfix's db_common_dict_partial() answers "no" whatever the
        # key_format (a PATTERN table would break recipient_delimiter lookups).
        self.flags |= F.FIXED | F.MULTI_WRITER
        self.outage = OutageLog(self.spec)
        size = connection_limit("memcache", ctx.params) or DEFAULT_CONNECTIONS
        opener = stream_opener(settings.line_limit + 2)

        async def connect(target: str) -> _Connection:
            return _Connection(await opener(target))

        self.pool: ConnectionPool[_Connection, str] = ConnectionPool(
            self.spec,
            [endpoint],
            connect,
            _close,
            size=size,
            connect_timeout=settings.timeout or 3600.0,
            label=lambda _endpoint: settings.server,
        )

    # --- keys --------------------------------------------------------------------------
    async def _memcache_key(self, key: bytes, flags: int, operation: str) -> bytes | None:
        """The key to send, or None: skip the operation (see DESCRIPTION)."""
        why = None
        if not key:
            why = "empty lookup key"
        elif self.domain is not None and not await self.domain.aallows(key):
            why = "domain mismatch"
        else:
            folded = key.lower() if flags & F.FOLD_FIX else key
            wanted = folded if self.key_format is None else expand(self.key_format, folded, None)
            if not wanted:
                why = "empty lookup key expansion"
            elif any(byte in _BLANKS for byte in wanted):
                why = "name contains space"
            else:
                return wanted
        # Postfix is silent about skipped lookups and deletes, noisy about updates.
        level = logging.WARNING if operation == "update" else logging.DEBUG
        log.log(level, '%s: skipping %s for name "%s": %s', self.name, operation, _shown(key), why)
        return None

    # --- commands with tries -----------------------------------------------------------
    async def _command(self, what: str, command: Callable[[_Wire], Awaitable[T]]) -> T:
        """Up to max_try tries with retry_pause in between; DictRetry when all fail or
        no connection can be had."""
        settings = self.settings
        reason = ""
        for count in range(settings.max_try):
            if count:
                await asyncio.sleep(settings.retry_pause)
            try:
                result = await self._try_once(command)
            except PoolUnavailable:
                raise  # logged by the pool; Postfix does not retry a failed connect
            except _Failure as exc:
                reason = str(exc)
                continue
            self.outage.ok()
            return result
        self.outage.failed(f"{what} failed after {settings.max_try} tries: {reason}")
        raise DictRetry(f"{self.spec}: {what}: {reason}")

    async def _try_once(self, command: Callable[[_Wire], Awaitable[T]]) -> T:
        """One try; a connection found closed by the server is replaced for free."""
        while True:
            lease = await self.pool.acquire(self.settings.timeout)
            connection = lease.connection
            reused = connection.commands > 0
            if reused and connection.stale:
                self.pool.release(lease, False)
                continue
            connection.commands += 1
            wire = _Wire(connection, self.settings, self.pool.sweeper)
            try:
                result = await command(wire)
            except _ClosedEarly:
                self._discard(lease)
                if reused:
                    continue
                raise
            except _Failure:
                self.pool.release(lease, False)  # a reply we cannot use: this one only
                raise
            except (OSError, TimeoutError) as exc:
                self._discard(lease)
                if isinstance(exc, ConnectionError) and reused:
                    continue  # reset by a restarted server before we sent anything
                raise _Failure(failure_reason(exc)) from None
            except BaseException:
                self._discard(lease)
                raise
            self.pool.release(lease, wire.reusable)
            return result

    def _discard(self, lease: Any) -> None:
        self.pool.release(lease, False)
        self.pool.suspect(lease)

    async def _mc_get(self, key: bytes) -> bytes | None:
        limit = self.settings.data_limit
        return await self._command("lookup", lambda wire: _get(wire, key, limit))

    async def _mc_set(self, key: bytes, value: bytes) -> int:
        settings = self.settings
        value = value.split(b"\0", 1)[0]  # Postfix stores a C string
        if len(value) > settings.data_limit:
            log.warning(
                "database %s: data for key %s is too long (data_size_limit=%d) -- not stored",
                self.spec,
                _shown(key),
                settings.data_limit,
            )
            return 1
        return await self._command(
            "update", lambda wire: _set(wire, key, value, settings.mc_flags, settings.ttl)
        )

    async def _mc_delete(self, key: bytes) -> int:
        return await self._command("delete", lambda wire: _delete(wire, key))

    async def _backup(self, flags: int, op: str, *args: Any) -> Any:
        """One backup operation with the request bits of this request (DUP_REPLACE
        and SYNC_UPDATE for a proxywrite update), as if the client had opened the
        backup itself; its own bits (TRY0NULL/TRY1NULL learning) stay its own."""
        backup = self.backup
        assert backup is not None
        backup.flags = (backup.flags & ~F.RQST_MASK) | (flags & F.RQST_MASK)
        return await run_async(_one_call(Call(backup, op, *args)))

    # --- operations --------------------------------------------------------------------
    async def alookup(self, key: bytes) -> bytes | None:
        flags = self.flags
        mc_key = await self._memcache_key(key, flags, "lookup")
        if mc_key is None:
            return None
        if self.backup is None:
            return await self._mc_get(mc_key)
        try:
            value = await self._mc_get(mc_key)
        except DictRetry:
            value = None  # the backup decides
        if value is not None:
            return value
        value = await self._backup(flags, "lookup", key)
        if value is not None:
            try:
                await self._mc_set(mc_key, value)
            except DictRetry:
                pass  # the cache stays cold; the answer stands
        return value

    async def aupdate(self, key: bytes, value: bytes) -> int:
        self._check_writable("update")
        flags = self.flags
        mc_key = await self._memcache_key(key, flags, "update")
        if mc_key is None:
            return 1
        if self.backup is None:
            return await self._mc_set(mc_key, value)
        try:
            await self._mc_set(mc_key, value)
        except DictRetry:
            pass
        return await self._backup(flags, "update", key, value)

    async def adelete(self, key: bytes) -> int:
        self._check_writable("delete")
        flags = self.flags
        mc_key = await self._memcache_key(key, flags, "delete")
        if mc_key is None:
            return 1
        if self.backup is None:
            return await self._mc_delete(mc_key)
        try:
            await self._mc_delete(mc_key)
        except DictRetry:
            pass
        return await self._backup(flags, "delete", key)

    async def asequence(self, function: int) -> tuple[bytes, bytes] | None:
        if self.backup is None:
            log.warning("database %s: first/next support requires backup database", self.spec)
            return None
        return await self._backup(self.flags, "sequence", function)

    def _check_writable(self, operation: str) -> None:
        if not self.writable:
            raise DictUnsupported(f"table {self.spec}: {operation} operation is not supported")

    def close(self) -> None:
        self.pool.close()
        if self.backup is not None:
            self.backup.close()


def _open_backup(spec: str | None, access: int, flags: int, ctx: OpenContext) -> Table | None:
    """The backup table, opened as Postfix's dict_open would (never fails: an
    unusable one is a surrogate answering RETRY)."""
    if spec is None:
        return None
    if ctx.open_table is not None:
        return ctx.open_table(spec, access, flags)
    from proxymap.tables import open_table

    return open_table(spec, access, flags, ctx)


def _close(connection: _Connection) -> None:
    connection.stream.close()
