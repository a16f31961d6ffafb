"""tcp_table(5) client: ``tcp:host:port``, asynchronous, with a small connection pool.

NAME
    tcp -- look keys up with the line-based ``get`` protocol of tcp_table(5)

DESCRIPTION
    Request ``get KEY\\n`` where every byte of KEY that is ``%``, blank, a control
    character or >= 0x80 is written ``%XX``. Reply: one line of at most 4096 bytes,
    ``DDD text`` (three digits, one blank, ``%XX``-encoded text): 2xx = found, 5xx =
    not found, 4xx = RETRY (connection closed), anything else or a malformed line =
    RETRY and disconnect (``docs/TABLES.md`` section 4.8).

    Never blocking the worker: an ``AsyncTable`` on asyncio streams. Each table keeps
    a ``pool.ConnectionPool`` so that a slow answer does not hold up other lookups of
    the same table: a lookup takes an idle connection or opens a new one, up to
    ``pyproxymap_tcp_connections`` (default 16); one connection never carries two
    requests at once.

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
import enum
import logging
from typing import Final, Literal

from proxymap import flags as F
from proxymap.tables.base import (
    AsyncTable,
    DictOpenError,
    DictRetry,
    OpenContext,
    require_network_open,
)
from proxymap.tables.pool import (
    ConnectionPool,
    PoolUnavailable,
    connection_limit,
    failure_reason,
)
from proxymap.tables.streams import (
    Stream,
    close_stream,
    param_number,
    split_host_port,
    stream_opener,
)

log = logging.getLogger("proxymap")

MAX_REPLY_LINE = 4096  # tcp_table(5): longer replies are protocol errors
_STREAM_LIMIT = 2 * MAX_REPLY_LINE
# Per byte: itself when printable ASCII other than "%", else %XX.
_QUOTED = [bytes([b]) if 0x21 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in range(256)]
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_C_SPACE = b" \t\n\v\f\r"
# A byte value: `b"%" in text` first tries its left side as an integer (a raised and
# cleared TypeError per test).
_PERCENT = ord("%")


class _Outcome(enum.Enum):
    TRANSPORT_FAILED = enum.auto()  # the exchange failed below the protocol; try again


_TRANSPORT_FAILED: Final = _Outcome.TRANSPORT_FAILED


class ProtocolError(Exception):
    """The server's reply does not follow the protocol."""


# ---------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------


def quote_key(key: bytes) -> bytes:
    return b"".join([_QUOTED[b] for b in key])


def unquote_text(text: bytes) -> bytes:
    if _PERCENT not in text:
        return text
    out = bytearray()
    pos, end = 0, len(text)
    while pos < end:
        byte = text[pos]
        if byte != 0x25:
            out.append(byte)
            pos += 1
            continue
        digits = text[pos + 1 : pos + 3]
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


class TcpTable(AsyncTable):
    dict_type = "tcp"

    def __init__(
        self, name: str, open_mode: int, flags: int, ctx: OpenContext | None = None
    ) -> None:
        super().__init__(name, open_mode, (flags & ~F.FIXED) | F.PATTERN, ctx)
        require_network_open(self.spec, open_mode, flags)
        try:
            split_host_port(name)
        except ValueError as exc:
            raise DictOpenError(f"{self.spec}: {exc}") from None
        self.timeout = param_number(ctx, "pyproxymap_tcp_timeout", 100.0)
        self.max_tries = max(1, int(param_number(ctx, "pyproxymap_tcp_max_tries", 10)))
        self.retry_delay = param_number(ctx, "pyproxymap_tcp_retry_delay", 1.0)
        size = connection_limit("tcp", ctx.params if ctx else None) or 16
        # Postfix sleeps retry_delay between attempts: the pool's back-off is no longer.
        self.pool: ConnectionPool[Stream, str] = ConnectionPool(
            self.spec,
            [name],
            stream_opener(_STREAM_LIMIT),
            close_stream,
            size=size,
            connect_timeout=self.timeout,
            backoff_min=min(self.retry_delay, 0.25),
            backoff_max=self.retry_delay,
        )

    async def alookup(self, key: bytes) -> bytes | None:
        request = b"get " + quote_key(self.fold(key)) + b"\n"
        for attempt in range(self.max_tries):
            if attempt:
                await asyncio.sleep(self.retry_delay)
            outcome = await self._exchange(request)
            if outcome is not _TRANSPORT_FAILED:
                return outcome
        raise DictRetry(f"{self.spec}: giving up after {self.max_tries} attempts")

    async def _exchange(self, request: bytes) -> bytes | None | Literal[_Outcome.TRANSPORT_FAILED]:
        """One request on one connection: the answer, or _TRANSPORT_FAILED (try again)."""
        try:
            lease = await self.pool.acquire(self.timeout)
        except PoolUnavailable:
            return _TRANSPORT_FAILED  # logged by the pool, once per outage
        stream = lease.connection
        try:
            stream.writer.write(request)
            line = await asyncio.wait_for(stream.reader.readuntil(b"\n"), self.timeout)
            answer = self._answer(line[:-1])
        except asyncio.LimitOverrunError:
            self.pool.release(lease, False)
            raise DictRetry(f"{self.spec}: reply too long") from None
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            self.pool.release(lease, False)
            self.pool.suspect(lease)
            log.warning("read %s: %s", self.name, _reason(exc))
            return _TRANSPORT_FAILED
        except BaseException:  # protocol errors (RETRY), cancellation: never reuse it
            self.pool.release(lease, False)
            raise
        self.pool.release(lease, True)
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
        self.pool.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed before a complete reply"
    return failure_reason(exc)
