"""tcp_table(5) client: ``tcp:host:port``, asynchronous, with a small connection pool.

NAME
    tcp -- look keys up with the line-based ``get`` protocol of tcp_table(5)

DESCRIPTION
    Request ``get KEY\\n`` where every byte of KEY that is ``%``, blank, a control
    character or >= 0x80 is written ``%XX``. Reply: one line of at most 4096 bytes,
    ``DDD text`` (three digits, one blank, ``%XX``-encoded text): 2xx = found, 5xx =
    not found, 4xx = RETRY (connection closed), anything else or a malformed line =
    RETRY and disconnect (``../shared/spec/TABLES.md`` section 4.8).

    Never blocking the worker: ``asynchronous = True``; ``alookup`` uses asyncio
    streams. Each table keeps a pool of connections (``StreamPool``) so that a slow
    answer does not hold up other lookups of the same table: a lookup takes an idle
    connection or opens a new one, up to ``pyproxymap_tcp_connections`` (default 16);
    one connection never carries two requests at once.

    Transport failures (connect, write, read, timeout, EOF before a full line) close
    the connection and are retried on a new one, up to ``pyproxymap_tcp_max_tries``
    attempts (10, like Postfix) with ``pyproxymap_tcp_retry_delay`` seconds (1) in
    between; then RETRY. Connect and I/O timeout: ``pyproxymap_tcp_timeout`` (100 s).
    A failure is never reported as "not found".

SECURITY
    Refused (table unavailable) when the open flags carry NO_UNAUTH.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from proxymap import flags as F
from proxymap.tables.base import (
    DictOpenError,
    DictRetry,
    OpenContext,
    Table,
    require_network_open,
)

log = logging.getLogger("proxymap")

MAX_REPLY_LINE = 4096  # tcp_table(5): longer replies are protocol errors
_STREAM_LIMIT = 2 * MAX_REPLY_LINE
# Per byte: itself when printable ASCII other than "%", else %XX.
_QUOTED = [bytes([b]) if 0x21 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in range(256)]
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_C_SPACE = b" \t\n\v\f\r"


_TRANSPORT_FAILED = object()  # marker: the exchange failed below the protocol; try again


class ProtocolError(Exception):
    """The server's reply does not follow the protocol."""


# ---------------------------------------------------------------------------------------
# Connection pool (also used by socketmap)
# ---------------------------------------------------------------------------------------

Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class Connection:
    __slots__ = ("reader", "writer", "created", "last_used")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.created = self.last_used = time.monotonic()

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # already closed, or its event loop is gone
            pass


class StreamPool:
    """At most ``size`` connections to one server; one request at a time per connection.

    Streams belong to the event loop that created them: the pool starts afresh when it
    is used from another loop (tests run one loop per test; a worker has one loop).
    """

    def __init__(self, opener: Opener, size: int, idle_limit: float | None = None,
                 age_limit: float | None = None) -> None:
        self._opener = opener
        self.size = max(1, size)
        self.idle_limit = idle_limit
        self.age_limit = age_limit
        self._idle: list[Connection] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None

    def _bind(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if loop is not self._loop or self._slots is None:
            self.discard_idle()
            self._loop = loop
            self._slots = asyncio.Semaphore(self.size)
        return self._slots

    async def acquire(self, connect_timeout: float) -> Connection:
        slots = self._bind()
        await slots.acquire()
        try:
            now = time.monotonic()
            while self._idle:
                connection = self._idle.pop()
                if self._fresh(connection, now):
                    return connection
                connection.close()
            reader, writer = await asyncio.wait_for(self._opener(), connect_timeout)
            return Connection(reader, writer)
        except BaseException:
            slots.release()
            raise

    def _fresh(self, connection: Connection, now: float) -> bool:
        if connection.reader.at_eof():
            return False
        if self.idle_limit is not None and now - connection.last_used > self.idle_limit:
            return False
        return self.age_limit is None or now - connection.created <= self.age_limit

    def release(self, connection: Connection, reusable: bool) -> None:
        if reusable:
            connection.last_used = time.monotonic()
            self._idle.append(connection)
        else:
            connection.close()
        if self._slots is not None and asyncio.get_running_loop() is self._loop:
            self._slots.release()

    def discard_idle(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()


def param_number(ctx: OpenContext | None, name: str, default: float) -> float:
    """A numeric main.cf parameter of ours; a bad value falls back with a warning."""
    if ctx is None or name not in ctx.params:
        return default
    try:
        return float(ctx.params[name])
    except (TypeError, ValueError):
        log.warning("%s: bad numerical value \"%s\", using %s", name, ctx.params[name], default)
        return default


def split_host_port(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6addr]:port`` -> (host, port); ValueError when malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port:
        raise ValueError(f"need host:port, not \"{text}\"")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in \"{text}\"")
    return host, int(port)


# ---------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------


def quote_key(key: bytes) -> bytes:
    return b"".join([_QUOTED[b] for b in key])


def unquote_text(text: bytes) -> bytes:
    if b"%" not in text:
        return text
    out = bytearray()
    pos, end = 0, len(text)
    while pos < end:
        byte = text[pos]
        if byte != 0x25:
            out.append(byte)
            pos += 1
            continue
        digits = text[pos + 1:pos + 3]
        if len(digits) != 2 or digits[0] not in _HEX_DIGITS or digits[1] not in _HEX_DIGITS:
            raise ProtocolError("bad % encoding")
        out.append(int(digits, 16))
        pos += 3
    return bytes(out)


def parse_reply(line: bytes) -> tuple[int, bytes]:
    """(first status digit, decoded text) of one reply line without its newline."""
    if len(line) > MAX_REPLY_LINE:
        raise ProtocolError("reply too long")
    if len(line) < 4 or not line[:3].isdigit() or line[3] not in _C_SPACE:
        raise ProtocolError("malformed reply")
    return line[0] - 0x30, unquote_text(line[4:])


class TcpTable(Table):
    dict_type = "tcp"
    asynchronous = True

    def __init__(self, name: str, open_mode: int, flags: int,
                 ctx: OpenContext | None = None) -> None:
        super().__init__(name, open_mode, (flags & ~F.FIXED) | F.PATTERN)
        require_network_open(self.spec, open_mode, flags)
        try:
            self.host, self.port = split_host_port(name)
        except ValueError as exc:
            raise DictOpenError(f"{self.spec}: {exc}") from None
        self.timeout = param_number(ctx, "pyproxymap_tcp_timeout", 100.0)
        self.max_tries = max(1, int(param_number(ctx, "pyproxymap_tcp_max_tries", 10)))
        self.retry_delay = param_number(ctx, "pyproxymap_tcp_retry_delay", 1.0)
        size = int(param_number(ctx, "pyproxymap_tcp_connections", 16))
        self.pool = StreamPool(self._connect, size)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port, limit=_STREAM_LIMIT)

    def lookup(self, key: bytes) -> bytes | None:
        raise DictRetry(f"{self.spec}: asynchronous table looked up synchronously")

    async def alookup(self, key: bytes) -> bytes | None:
        request = b"get " + quote_key(self.fold(key)) + b"\n"
        for attempt in range(self.max_tries):
            if attempt:
                await asyncio.sleep(self.retry_delay)
            outcome = await self._exchange(request)
            if outcome is not _TRANSPORT_FAILED:
                return outcome
        raise DictRetry(f"{self.spec}: giving up after {self.max_tries} attempts")

    async def _exchange(self, request: bytes):
        """One request on one connection: the answer, or _TRANSPORT_FAILED (try again)."""
        try:
            connection = await self.pool.acquire(self.timeout)
        except (TimeoutError, OSError) as exc:
            log.warning("connect to %s:%d: %s", self.host, self.port, _reason(exc))
            return _TRANSPORT_FAILED
        try:
            connection.writer.write(request)
            line = await asyncio.wait_for(connection.reader.readuntil(b"\n"), self.timeout)
            answer = self._answer(line[:-1])
        except asyncio.LimitOverrunError:
            self.pool.release(connection, False)
            raise DictRetry(f"{self.spec}: reply too long") from None
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            self.pool.release(connection, False)
            log.warning("read %s:%d: %s", self.host, self.port, _reason(exc))
            return _TRANSPORT_FAILED
        except BaseException:  # protocol errors (RETRY), cancellation: never reuse it
            self.pool.release(connection, False)
            raise
        self.pool.release(connection, True)
        return answer

    def _answer(self, line: bytes) -> bytes | None:
        try:
            digit, text = parse_reply(line)
        except ProtocolError as exc:
            raise DictRetry(f"{self.spec}: {exc}: {line[:100]!r}") from None
        if digit == 2:
            return text
        if digit == 5:
            return None
        if digit == 4:
            raise DictRetry(f"{self.spec}: server error: {text[:200]!r}")
        raise DictRetry(f"{self.spec}: unexpected reply: {line[:100]!r}")

    def close(self) -> None:
        self.pool.discard_idle()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed before a complete reply"
    return str(exc) or exc.__class__.__name__
