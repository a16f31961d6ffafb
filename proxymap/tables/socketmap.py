"""socketmap_table(5) client: ``socketmap:inet:host:port:name``, ``socketmap:unix:/path:name``.

NAME
    socketmap -- Sendmail-style socketmap lookups over netstrings, asynchronous

DESCRIPTION
    Request: the netstring ``LEN:NAME KEY,`` (the key is sent raw). Reply: a netstring
    of at most 100000 bytes whose payload is ``STATUS[ data]``: ``OK data`` is found
    (``OK `` found empty, but a bare ``OK`` is not found), ``NOTFOUND`` not found,
    ``TEMP``/``TIMEOUT`` and any other word RETRY, ``PERM`` CONFIG
    (``docs/TABLES.md`` section 4.9). Netstring errors and timeouts are RETRY;
    an EOF before any reply byte (a server that closed an idle connection) is retried
    once on a new connection.

    Beyond the original: Postfix shares one connection per endpoint and so serializes
    every lookup behind the slowest one. Here each endpoint has a pool
    (``pool.ConnectionPool``, shared by every socketmap table naming that endpoint) of up to
    ``pyproxymap_socketmap_connections`` (default 16) connections, one request at a time
    on each, so concurrent slow lookups proceed in parallel on the worker's event loop.
    Idle connections are dropped after 10 s, any connection after 100 s (Postfix's
    limits). I/O timeout: ``pyproxymap_socketmap_timeout`` (100 s).

SECURITY
    Refused (table unavailable) when the open flags carry NO_UNAUTH.
"""

from __future__ import annotations

import asyncio
import logging

from proxymap import flags as F
from proxymap.tables.base import (
    AsyncTable,
    DictConfig,
    DictOpenError,
    DictRetry,
    OpenContext,
    require_network_open,
)
from proxymap.tables.pool import ConnectionPool, connection_limit, failure_reason
from proxymap.tables.streams import (
    Stream,
    check_endpoint,
    close_stream,
    param_number,
    stream_opener,
)

log = logging.getLogger("proxymap")

MAX_REPLY = 100000  # socketmap_table(5) reply size limit
_MAX_LENGTH_DIGITS = 10
IDLE_LIMIT = 10.0
AGE_LIMIT = 100.0

# Pools are per endpoint: every socketmap table naming the same server shares one.
_POOLS: dict[str, ConnectionPool[Stream, str]] = {}


class NetstringError(Exception):
    pass


class _EarlyEOF(Exception):
    """The server closed the connection before sending any reply byte."""


def netstring(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


async def read_netstring(reader: asyncio.StreamReader, limit: int = MAX_REPLY) -> bytes:
    digits = bytearray()
    while True:
        try:
            byte = await reader.readexactly(1)
        except asyncio.IncompleteReadError:
            if not digits:
                raise _EarlyEOF() from None
            raise NetstringError("unexpected EOF in netstring length") from None
        if byte == b":":
            break
        if not byte.isdigit() or len(digits) >= _MAX_LENGTH_DIGITS:
            raise NetstringError("netstring syntax error")
        digits += byte
    if not digits:
        raise NetstringError("netstring syntax error")
    length = int(digits)
    if length > limit:
        raise NetstringError(f"netstring length {length} exceeds {limit}")
    try:
        payload = await reader.readexactly(length)
        terminator = await reader.readexactly(1)
    except asyncio.IncompleteReadError:
        raise NetstringError("unexpected EOF in netstring") from None
    if terminator != b",":
        raise NetstringError("netstring syntax error")
    return payload


def interpret_reply(spec: str, payload: bytes) -> bytes | None:
    word, blank, data = payload.partition(b" ")
    if word == b"OK":
        return data if blank else None
    if word == b"NOTFOUND":
        return None
    reason = data.decode("utf-8", "replace")
    if word == b"PERM":
        raise DictConfig(f"{spec}: permanent error: {reason}")
    if word in (b"TEMP", b"TIMEOUT"):
        raise DictRetry(f"{spec}: temporary error: {reason}")
    raise DictRetry(f"{spec}: unknown reply status: {word[:50]!r}")


class SocketmapTable(AsyncTable):
    dict_type = "socketmap"

    def __init__(
        self, name: str, open_mode: int, flags: int, ctx: OpenContext | None = None
    ) -> None:
        super().__init__(name, open_mode, (flags & ~F.FIXED) | F.PATTERN, ctx)
        require_network_open(self.spec, open_mode, flags)
        endpoint, sep, map_name = name.rpartition(":")
        if not sep or not endpoint or not map_name:
            raise DictOpenError(f'{self.spec}: expected "transport:endpoint:mapname"')
        transport = endpoint.partition(":")[0]
        try:
            if transport not in ("inet", "unix", "local"):
                raise ValueError(f'invalid endpoint "{endpoint}"')
            check_endpoint(endpoint)
        except ValueError as exc:
            raise DictOpenError(f"{self.spec}: {exc}") from None
        self.endpoint = endpoint
        self.map_name = map_name.encode("utf-8", "surrogateescape")
        self.timeout = param_number(ctx, "pyproxymap_socketmap_timeout", 100.0)
        size = connection_limit("socketmap", ctx.params if ctx else None) or 16
        pool = _POOLS.get(endpoint)
        if pool is None:
            pool = _POOLS[endpoint] = ConnectionPool(
                f"socketmap:{endpoint}",
                [endpoint],
                stream_opener(),
                close_stream,
                size=size,
                connect_timeout=self.timeout,
                idle_limit=IDLE_LIMIT,
                age_limit=AGE_LIMIT,
            )
        self.pool = pool

    async def alookup(self, key: bytes) -> bytes | None:
        request = netstring(self.map_name + b" " + self.fold(key))
        for attempt in range(2):
            try:
                payload = await self._exchange(request)
            except _EarlyEOF:
                if attempt == 0:
                    continue
                raise DictRetry(f"{self.spec}: connection closed before a reply") from None
            return interpret_reply(self.spec, payload)
        raise AssertionError("not reached")

    async def _exchange(self, request: bytes) -> bytes:
        lease = await self.pool.acquire(self.timeout)  # PoolUnavailable is a DictRetry
        stream = lease.connection
        try:
            stream.writer.write(request)
            payload = await asyncio.wait_for(read_netstring(stream.reader), self.timeout)
        except (BrokenPipeError, ConnectionResetError):
            self.pool.release(lease, False)
            raise _EarlyEOF() from None
        except (TimeoutError, OSError, NetstringError) as exc:
            self.pool.release(lease, False)
            raise DictRetry(f"{self.spec}: {failure_reason(exc)}") from None
        except BaseException:
            self.pool.release(lease, False)
            raise
        self.pool.release(lease, True)
        return payload

    def close(self) -> None:
        pass  # the pool belongs to the endpoint, shared with other tables
