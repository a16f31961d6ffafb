"""mysql_table(5) client: ``mysql:/etc/postfix/file.cf`` or ``mysql:prefix`` (main.cf).

NAME
    mysql -- MySQL/MariaDB lookups on asyncmy, a bounded pool per table, failover

SYNOPSIS
    table = MysqlTable("/etc/postfix/aliases.cf", os.O_RDONLY, flags, ctx)
    value = await table.alookup(b"alice@example.com")   # bytes, None, or DictRetry

DESCRIPTION
    Parameters (mysql_table(5), Postfix 3.7; a name not starting with ``/`` or ``.``
    is a main.cf prefix): ``hosts``, ``user``, ``password``, ``dbname`` (required),
    ``query`` or the legacy ``select_field``/``table``/``where_field``/
    ``additional_conditions``, ``result_format``, ``domain``, ``expansion_limit``
    (``db_common``), ``option_file``, ``option_group`` (default ``client``),
    ``require_result_set`` (default yes), ``tls_cert_file``, ``tls_key_file``,
    ``tls_CAfile``, ``tls_CApath``, ``tls_ciphers``, ``tls_verify_cert``, and from
    Postfix 3.9 ``charset``, ``idle_interval`` and ``retry_interval``.

    Hosts: ``unix:/path``, ``inet:host[:port]`` or ``host[:port]`` (the port may be a
    service name; the text after the last ``:`` is the port, for ``unix:`` too, as in
    Postfix); ``localhost`` in any form is the default UNIX socket (the option
    files' ``socket``, else ``$MYSQL_UNIX_PORT``, else /run/mysqld/mysqld.sock), as
    the C client does; no hosts means ``localhost``. New connections go to the hosts
    in random order, UNIX sockets first.

    Option files are read as the MariaDB C client reads them: ``option_file`` alone
    when set, else (when ``option_group`` is not empty) /etc/my.cnf,
    /etc/mysql/my.cnf, ``$MARIADB_HOME``/my.cnf (or ``$MYSQL_HOME``) and ~/.my.cnf;
    the groups [client], [client-server], [client-mariadb] and ``option_group``;
    ``!include FILE`` and ``!includedir DIR`` (which reads DIR/my.cnf only, like
    that client). Used from them: ``socket``, ``port``, ``user`` (when ``user`` is
    empty), ``default-character-set``, ``ssl`` and the ``ssl-*`` settings (they
    override the ``tls_*`` ones, read later by the C client too).

    Character set: ``charset`` if set, else the option files' choice, else utf8mb4
    (the default of this C client and of Postfix 3.9+). Keys are escaped as
    mysql_real_escape_string does for that character set (NUL, LF, CR, ``\\``, ``'``,
    ``"`` and ^Z get a backslash; only ``'`` is doubled when the server runs with
    NO_BACKSLASH_ESCAPES; multi-byte characters of big5, cp932, gbk, sjis and
    gb18030 are kept whole); the server is never asked to quote.

    Results: every column of every row of the one result set, in row order; NULL is
    skipped; each value is the bytes the server sent (up to a NUL, as a C string),
    through ``result_format``, joined with ``,``. More than one result set, an
    error in any, or none at all with ``require_result_set = yes`` is RETRY; with
    ``no`` a statement without a result set is "not found". Multi-statement
    queries are refused by the server, as for Postfix (CLIENT_MULTI_STATEMENTS is
    not sent; CLIENT_MULTI_RESULTS is, for stored procedures).

    Connections: a ``pool.ConnectionPool`` per table and worker of at most
    ``pyproxymap_mysql_connections`` (main.cf, default 8) connections, one query at
    a time on each; a lookup that finds them all busy waits, within its timeout.
    Idle connections are closed after ``idle_interval`` seconds (default 60, as
    Postfix); one idle for more than 5 s is pinged before reuse. Every lookup is
    bounded by ``pyproxymap_mysql_timeout`` (default 10 s): waiting for a
    connection, connecting and the query (checked by the pool's sweeper, so up to
    50 ms late); past it the answer is RETRY at once, while another pooled
    connection stops the query with ``KILL QUERY`` and the timed-out connection,
    still counted in the bound until then, is closed. A connection lost during a
    query (server restarted, killed, gone away) is dropped with its idle siblings
    to that server, and the query is tried once more on another connection
    before answering RETRY.

    Started lookups (``lookup_start``, the handler's fast path): when a pooled
    connection is free at once, the query is written from the client's request
    callback and its answer taken in the database connection's data callback, with
    no task or coroutine; anything but one whole result set (an error, several
    sets, a lost connection) goes on in the coroutine path from where it is. With
    every connection busy it waits in the pool's queue (``lend_later``), in turn
    with the coroutine lookups, and goes out from the callback that frees one.

    Failover: a server whose connect fails is passed over for a back-off of 0.25 s
    doubling to ``retry_interval`` but at most 2 s (Postfix: ``retry_interval``,
    60 s), so a restarted server is used again within seconds. A failure is never
    "not found". One warning per outage: the pool logs a server that cannot be
    reached once, and query failures are logged once until a lookup succeeds.

SECURITY
    Keys are escaped locally (above); LOAD DATA LOCAL is refused. TLS as the C
    client: ``tls_*`` settings turn it on and make it required; a CA file or
    directory makes the certificate chain checked; ``tls_verify_cert = yes`` also
    checks the server name.

BUGS
    A timed-out query whose ``KILL QUERY`` fails (no connection to be had) runs on
    to its end on the server. Postfix marks a server down for ``retry_interval``
    after ANY query error (even a syntax error); here a query error fails only its
    own lookup. ``charset`` is honoured for 3.7 clients too (Postfix 3.7 ignores it).

SEE ALSO
    mysql_table(5), ``db_common`` (templates, domain, result joining), ``pool``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import random
import re
import socket
import ssl
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from asyncmy import errors as mysql_errors
from asyncmy.charset import charset_by_name
from asyncmy.connection import Connection
from asyncmy.constants.CLIENT import MULTI_STATEMENTS
from asyncmy.protocol import parse_rows_from_buffer, skip_packets_from_buffer

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
from proxymap.tables.db_common import QueryContext
from proxymap.tables.pool import (
    BACKOFF_MAX,
    ConnectionPool,
    EndpointState,
    Lease,
    OutageLog,
    ReadWaiter,
    connection_limit,
    start_on_lease,
)
from proxymap.tables.streams import param_number

__all__ = ["Endpoint", "MysqlTable", "mysql_escape", "parse_host", "read_option_files"]

log = logging.getLogger("proxymap")

DEFAULT_SOCKET = "/run/mysqld/mysqld.sock"  # this MariaDB client's compiled default
DEFAULT_PORT = 3306
DEFAULT_CHARSET = "utf8mb4"
DEFAULT_CONNECTIONS = 8
DEFAULT_TIMEOUT = 10.0
_QUOTE = ord("'")  # a byte value: `b"'" in data` costs a raised TypeError per test
DEFAULT_INTERVAL = 60  # idle_interval and retry_interval, seconds
CHECK_AFTER = 5.0  # ping a connection idle longer than this before reusing it
SERVER_STATUS_NO_BACKSLASH_ESCAPES = 0x200
_QUIT_PACKET = b"\x01\x00\x00\x00\x01"  # length 1, sequence 0, COM_QUIT
_COM_QUERY = 3
_QUERY_HEADER = struct.Struct("<iB")  # payload length (3 bytes), sequence 0, command
_MAX_PAYLOAD = 0xFFFFFF  # a packet this long continues in the next one
_MORE_RESULTS = 0x08  # SERVER_MORE_RESULTS_EXISTS


class _Answer(enum.Enum):
    NOT_MINE = "an answer that asyncmy reads"


_NOT_MINE: Final = _Answer.NOT_MINE
_BYTES_CONVERTERS: dict[int, tuple] = {}
_HOST_SEPARATORS = re.compile(r"[, \t\r\n]+")
_DEFAULT_OPTION_FILES = ("/etc/my.cnf", "/etc/mysql/my.cnf")
_OPTION_GROUPS = ("client", "client-server", "client-mariadb")
# Client errors and server errors that mean "this connection is gone".
_LOST_CODES = frozenset(
    {
        2006,  # CR_SERVER_GONE_ERROR
        2013,  # CR_SERVER_LOST
        2055,  # CR_SERVER_LOST_EXTENDED
        1053,  # ER_SERVER_SHUTDOWN
        1927,  # ER_CONNECTION_KILLED
        4031,  # ER_CLIENT_INTERACTION_TIMEOUT (MySQL 8)
    }
)


# ---------------------------------------------------------------------------------------
# Escaping (mysql_real_escape_string)
# ---------------------------------------------------------------------------------------

_BACKSLASHED = {
    0x00: b"\\0",
    0x0A: b"\\n",
    0x0D: b"\\r",
    0x5C: b"\\\\",
    0x27: b"\\'",
    0x22: b'\\"',
    0x1A: b"\\Z",
}
_SPECIAL = re.compile(rb"[\x00\n\r\\'\"\x1a]")


def _in(byte: int, *ranges: tuple[int, int]) -> bool:
    return any(low <= byte <= high for low, high in ranges)


def _mb_big5(data: bytes, pos: int) -> int:
    if (
        len(data) - pos >= 2
        and _in(data[pos], (0xA1, 0xF9))
        and _in(data[pos + 1], (0x40, 0x7E), (0xA1, 0xFE))
    ):
        return 2
    return 0


def _mb_sjis(data: bytes, pos: int) -> int:
    if (
        len(data) - pos >= 2
        and _in(data[pos], (0x81, 0x9F), (0xE0, 0xFC))
        and _in(data[pos + 1], (0x40, 0x7E), (0x80, 0xFC))
    ):
        return 2
    return 0


def _mb_gbk(data: bytes, pos: int) -> int:
    if (
        len(data) - pos >= 2
        and _in(data[pos], (0x81, 0xFE))
        and _in(data[pos + 1], (0x40, 0x7E), (0x80, 0xFE))
    ):
        return 2
    return 0


def _mb_gb18030(data: bytes, pos: int) -> int:
    if (
        len(data) - pos >= 4
        and _in(data[pos], (0x81, 0xFE))
        and _in(data[pos + 1], (0x30, 0x39))
        and _in(data[pos + 2], (0x81, 0xFE))
        and _in(data[pos + 3], (0x30, 0x39))
    ):
        return 4
    return _mb_gbk(data, pos)


# Character sets whose multi-byte characters may contain the byte of "\" or "'": a
# byte-wise escape would split them (and open an injection), so they are kept whole.
_MULTIBYTE: dict[str, Callable[[bytes, int], int]] = {
    "big5": _mb_big5,
    "cp932": _mb_sjis,
    "sjis": _mb_sjis,
    "gbk": _mb_gbk,
    "gb18030": _mb_gb18030,
}
# Not usable as a client character set (the server would refuse or misread queries).
_NOT_CLIENT_CHARSETS = frozenset({"ucs2", "utf16", "utf16le", "utf32"})


def _backslashed(match: re.Match[bytes]) -> bytes:
    return _BACKSLASHED[match.group()[0]]


def _escape_backslashes(data: bytes) -> bytes:
    """mysql_real_escape_string for a single-byte-safe character set (utf8mb4, latin1...)."""
    if _SPECIAL.search(data) is None:  # the common key: nothing to quote
        return data
    return _SPECIAL.sub(_backslashed, data)


def _escape_quotes(data: bytes) -> bytes:
    """The same under NO_BACKSLASH_ESCAPES: only ``'`` is doubled."""
    return data.replace(b"'", b"''") if _QUOTE in data else data


def escaper(charset: str, no_backslash_escapes: bool = False) -> Callable[[bytes], bytes]:
    """``mysql_escape`` for one character set and mode, chosen once."""
    if charset not in _MULTIBYTE:
        return _escape_quotes if no_backslash_escapes else _escape_backslashes
    return lambda data: mysql_escape(data, charset, no_backslash_escapes)


def mysql_escape(
    data: bytes, charset: str = DEFAULT_CHARSET, no_backslash_escapes: bool = False
) -> bytes:
    """``data`` as mysql_real_escape_string writes it for a connection in ``charset``."""
    mb_length = _MULTIBYTE.get(charset)
    if mb_length is None:
        if no_backslash_escapes:
            return _escape_quotes(data)
        return _escape_backslashes(data)
    out = bytearray()
    pos = 0
    while pos < len(data):
        length = mb_length(data, pos)
        if length:
            out += data[pos : pos + length]
            pos += length
            continue
        byte = data[pos]
        if no_backslash_escapes:
            out += b"''" if byte == 0x27 else bytes((byte,))
        else:
            out += _BACKSLASHED.get(byte) or bytes((byte,))
        pos += 1
    return bytes(out)


# ---------------------------------------------------------------------------------------
# Option files (my.cnf)
# ---------------------------------------------------------------------------------------

_MAX_INCLUDE_DEPTH = 64
_VALUE_ESCAPES = {
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "b": "\b",
    "s": " ",
    '"': '"',
    "'": "'",
    "\\": "\\",
}


def _option_value(text: str) -> str:
    """Blanks and one pair of quotes removed, backslash escapes applied."""
    value = text.strip()
    if value[:1] in ("'", '"'):
        value = value[1:]
        if value[-1:] in ("'", '"'):
            value = value[:-1]
    out: list[str] = []
    pos = 0
    while pos < len(value):
        char = value[pos]
        if char == "\\" and pos + 1 < len(value):
            pos += 1
            out.append(_VALUE_ESCAPES.get(value[pos], "\\" + value[pos]))
        else:
            out.append(char)
        pos += 1
    return "".join(out)


def _read_option_file(
    path: str, groups: frozenset[str], options: dict[str, str], depth: int
) -> None:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as source:
            lines = source.read().splitlines()
    except OSError:
        return
    reading = False
    for raw in lines:
        line = raw.strip()
        if line.startswith("!"):
            directive, _, argument = line[1:].partition(" ")
            argument = argument.strip()
            if depth < _MAX_INCLUDE_DEPTH and argument and directive == "include":
                _read_option_file(argument, groups, options, depth + 1)
            elif depth < _MAX_INCLUDE_DEPTH and argument and directive == "includedir":
                _read_option_file(os.path.join(argument, "my.cnf"), groups, options, depth + 1)
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            reading = line[1:].partition("]")[0].strip() in groups
            continue
        if reading:
            name, sep, value = line.partition("=")
            key = name.strip().replace("_", "-")
            options[key] = _option_value(value) if sep else ""


def read_option_files(
    option_file: str | None, option_group: str | None, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The client settings the MariaDB C client would read (later ones win)."""
    if not option_file and not option_group:
        return {}
    environ = os.environ if environ is None else environ
    groups = frozenset(_OPTION_GROUPS + ((option_group,) if option_group else ()))
    options: dict[str, str] = {}
    if option_file:
        _read_option_file(option_file, groups, options, 0)
        return options
    files = list(_DEFAULT_OPTION_FILES)
    home = environ.get("MARIADB_HOME") or environ.get("MYSQL_HOME")
    if home:
        files.append(os.path.join(home, "my.cnf"))
    if environ.get("HOME"):
        files.append(os.path.join(environ["HOME"], ".my.cnf"))
    for path in files:
        _read_option_file(path, groups, options, 0)
    return options


# ---------------------------------------------------------------------------------------
# Hosts
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One entry of ``hosts``: a UNIX socket path, or a TCP host and port."""

    label: str
    unix_socket: str | None = None
    host: str | None = None
    port: int = DEFAULT_PORT


def _port_number(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return socket.getservbyname(text, "tcp")
    except OSError:
        raise DictOpenError(f"unknown service: {text}/tcp") from None


def parse_host(
    text: str, options: Mapping[str, str], environ: Mapping[str, str] | None = None
) -> Endpoint:
    """One ``hosts`` entry, read as Postfix does; ``localhost`` is the default socket."""
    environ = os.environ if environ is None else environ
    unix = text.startswith("unix:")
    name = text[5:] if unix or text.startswith("inet:") else text
    port = 0
    name, colon, service = name.rpartition(":") if ":" in name else (name, "", "")
    if colon and service:
        port = _port_number(service)
    if name.lower() == "localhost":
        path = options.get("socket") or environ.get("MYSQL_UNIX_PORT") or DEFAULT_SOCKET
        return Endpoint(text, unix_socket=path)
    if unix:
        return Endpoint(text, unix_socket=name)
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if not port:
        port = _port_number(options["port"]) if options.get("port") else DEFAULT_PORT
    return Endpoint(text, host=name, port=port)


def unix_first_random(states: list[EndpointState[Endpoint]]) -> list[EndpointState[Endpoint]]:
    """Random order, UNIX sockets before TCP (mysql_table(5))."""
    unix = [s for s in states if s.endpoint.unix_socket is not None]
    inet = [s for s in states if s.endpoint.unix_socket is None]
    random.shuffle(unix)
    random.shuffle(inet)
    return unix + inet


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------


def _tls_context(cfg: CfgParser, options: Mapping[str, str]) -> ssl.SSLContext | None:
    """TLS as the C client does it: any tls_* (or ssl-*) setting makes it required."""
    files = {
        "cert": options.get("ssl-cert") or cfg.get_optional("tls_cert_file"),
        "key": options.get("ssl-key") or cfg.get_optional("tls_key_file"),
        "ca": options.get("ssl-ca") or cfg.get_optional("tls_CAfile"),
        "capath": options.get("ssl-capath") or cfg.get_optional("tls_CApath"),
        "cipher": options.get("ssl-cipher") or cfg.get_optional("tls_ciphers"),
    }
    verify = cfg.get_bool("tls_verify_cert", False) if cfg.has("tls_verify_cert") else False
    if "ssl-verify-server-cert" in options:
        verify = options["ssl-verify-server-cert"].lower() not in ("0", "off", "false", "no")
    wanted = options.get("ssl", "0").lower() not in ("0", "off", "false", "no")
    if not any(files.values()) and not verify and not wanted:
        return None
    try:
        if files["ca"] or files["capath"] or verify:
            context = ssl.create_default_context(cafile=files["ca"], capath=files["capath"])
        else:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # encrypted, but any server will do
        context.check_hostname = verify
        if files["cert"]:
            context.load_cert_chain(files["cert"], keyfile=files["key"])
        if files["cipher"]:
            context.set_ciphers(files["cipher"])
    except (OSError, ssl.SSLError) as exc:
        raise DictOpenError(f"mysql:{cfg.name}: TLS settings: {exc}") from None
    return context


def _as_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


@dataclass(slots=True)
class _Login:
    """What every new connection is made with."""

    user: bytes
    password: bytes
    dbname: bytes
    charset: str
    tls: ssl.SSLContext | None
    connect_timeout: float


# ---------------------------------------------------------------------------------------
# Connections
# ---------------------------------------------------------------------------------------


class _LostConnection(Exception):
    """The connection broke during the query; another connection may succeed."""


class _QueryFailed(Exception):
    """The server refused or failed the query, or its results break the rules."""


async def _connect(login: _Login, endpoint: Endpoint) -> Connection:
    connection = Connection(
        user=login.user,
        password=login.password,
        database=login.dbname,
        host=endpoint.host,
        port=endpoint.port,
        unix_socket=endpoint.unix_socket,
        charset=login.charset,
        conv={},
        use_unicode=False,
        autocommit=None,
        connect_timeout=login.connect_timeout,
        ssl=login.tls,
        program_name="pyproxymap",
    )
    # Postfix sends CLIENT_MULTI_RESULTS only: "SELECT 1; SELECT 2" is a syntax error.
    connection._client_flag &= ~MULTI_STATEMENTS  # type: ignore[attr-defined]  # not in asyncmy's stub
    await connection.connect()
    return connection


def _close_connection(connection: Connection) -> None:
    """Say QUIT when the connection still works (else the server logs an aborted
    connection), without waiting for anything."""
    transport = connection._transport  # type: ignore[attr-defined]  # not in asyncmy's stub
    connected = connection._connected  # type: ignore[attr-defined]  # not in asyncmy's stub
    if connected and transport is not None and not transport.is_closing():
        try:
            transport.write(_QUIT_PACKET)
        except Exception:  # noqa: BLE001 - its event loop may be gone; close anyway
            pass
    connection.close()


async def _ping(connection: Connection) -> bool:
    await connection.ping(reconnect=False)
    return True


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, mysql_errors.MySQLError) and len(exc.args) >= 2:
        return f"{exc.args[1]} ({exc.args[0]})"
    return str(exc) or exc.__class__.__name__


def _is_lost(exc: BaseException) -> bool:
    if isinstance(exc, (OSError, EOFError, mysql_errors.InterfaceError)):
        return True
    if isinstance(exc, mysql_errors.InternalError) and "sequence" in str(exc):
        return True
    code = exc.args[0] if isinstance(exc, mysql_errors.MySQLError) and exc.args else None
    return code in _LOST_CODES


async def _result_sets(
    connection: Connection, query: bytes, header: ResultHeader | None = None
) -> list[tuple]:
    """The rows of every result set the query returns (statements without one add
    nothing); the protocol is read to its end so that the connection stays usable.
    ``header``: the table's ``ResultHeader`` (none for a query of its own).

    The usual answer -- one result set, complete in the receive buffer after at most
    one wake-up -- is parsed here in one pass over the buffer (``_take_result_set``);
    anything else (an error, an OK packet, several result sets, a large or slow
    answer) is left unread for asyncmy to read from its first packet. asyncmy's own
    path costs a quarter of a lookup: a coroutine per packet, and column
    descriptions built and thrown away on every query."""
    raw: Any = connection
    try:
        if not _send_query(raw, query):
            await connection.query(query)
            return await _sets_read(raw)
        proto = raw._proto
        if proto.length == proto.pos and not proto.eof and proto.exc is None:
            # Wait for the answer (asyncmy's protocol wakes its read waiter on
            # data, end of file and loss alike).
            waiter = proto._read_waiter = raw._loop.create_future()
            try:
                await waiter
            except asyncio.CancelledError:
                raw._close_on_cancel()  # as asyncmy: the answer is unread
                raise
            finally:
                if proto._read_waiter is waiter:
                    proto._read_waiter = None
        rows = _take_result_set(raw, header or ResultHeader())
        if rows is not None and rows is not _NOT_MINE:
            return [rows]
    except (mysql_errors.MySQLError, OSError, EOFError) as exc:
        raise _query_error(exc) from None
    return await _rest_of_result_sets(raw)


async def _rest_of_result_sets(connection: Any) -> list[tuple]:
    """``_result_sets`` of a query sent (``_send_query``) and not taken whole: asyncmy
    reads its answer from the first packet."""
    try:
        await connection._read_query_result()
        return await _sets_read(connection)
    except (mysql_errors.MySQLError, OSError, EOFError) as exc:
        raise _query_error(exc) from None


async def _sets_read(connection: Any) -> list[tuple]:
    """The rows of the result sets asyncmy has read, reading the next ones."""
    result = connection._result
    if result is not None and not result.has_next:  # the usual: one result
        return [result.rows or ()] if result.field_count else []
    sets = []
    while True:
        if result is not None and result.field_count:
            sets.append(result.rows or ())
        if result is None or not result.has_next:
            return sets
        await connection.next_result()
        result = connection._result


def _query_error(exc: BaseException) -> _LostConnection | _QueryFailed:
    if _is_lost(exc):
        return _LostConnection(_error_text(exc))
    return _QueryFailed(f"query failed: {_error_text(exc)}")


def _send_query(connection: Any, query: bytes) -> bool:
    """Write COM_QUERY the way asyncmy would, when its state allows the answer to be
    read here; False (nothing written) otherwise: asyncmy then sends it itself."""
    # asyncmy's internals (its receive buffer, write path and read waiter), as of the
    # versions setup.cfg allows; tests/test_tables_mysql.py covers every branch.
    previous = connection._result
    if (
        not connection._connected
        or len(query) >= _MAX_PAYLOAD
        or (previous is not None and (previous.has_next or previous.unbuffered_active))
    ):
        return False
    connection._result = None
    connection._write_bytes(_QUERY_HEADER.pack(len(query) + 1, _COM_QUERY) + query)
    connection._next_seq_id = 1
    return True


def _take_result_set(connection: Any, header: ResultHeader) -> tuple | _Answer | None:
    """The rows of the one whole result set in asyncmy's receive buffer, consumed
    (``_one_result_set``); None when more bytes are needed, _NOT_MINE for the rest."""
    parsed = _one_result_set(connection._proto, connection._deprecate_eof, header)
    if parsed is None or parsed is _NOT_MINE:
        return parsed
    rows, connection._proto.pos, connection._next_seq_id, status = parsed
    connection._affected_rows = len(rows)
    if status:
        connection.server_status = status
    return rows


def _as_bytes_columns(count: int) -> tuple:
    """asyncmy's row converters for COUNT columns, each value as the server's bytes
    (kept in _BYTES_CONVERTERS)."""
    converters = _BYTES_CONVERTERS[count] = ((0, None, None),) * count
    return converters


@dataclass(slots=True)
class ResultHeader:
    """The packets that opened a table's last whole result set, up to its rows: the
    column count, the column definitions and (without DEPRECATE_EOF) their EOF
    packet. A query's answers repeat them byte for byte whatever the key, so an
    answer that starts with the same bytes has the same columns and is parsed from
    its first row (``_one_result_set``); any other is parsed whole, and kept."""

    data: bytes = b""
    converters: tuple = ()  # asyncmy's, one per column: each value as the server's bytes
    seq: int = 0  # the sequence id of the first row packet


def _one_result_set(
    proto: Any, deprecate_eof: bool, header: ResultHeader
) -> tuple | _Answer | None:
    """Parse the answer to a COM_QUERY in asyncmy's receive buffer without consuming
    it: (rows, end position, next sequence id, server status) for one whole result
    set; None when more bytes are needed; _NOT_MINE for anything else."""
    buffer = proto.buffer
    pos = proto.pos
    end = proto.length
    known = header.data
    if known and buffer.startswith(known, pos, end):
        converters = header.converters
        seq = header.seq
        pos += len(known)
    else:
        parsed = _columns(buffer, pos, end, deprecate_eof)
        if parsed is None or parsed is _NOT_MINE:
            return parsed
        columns, seq, start = parsed
        converters = _BYTES_CONVERTERS.get(columns) or _as_bytes_columns(columns)
        header.data, header.converters, header.seq = bytes(buffer[pos:start]), converters, seq
        pos = start
    rows: list[tuple] = []
    pos, seq = parse_rows_from_buffer(buffer, pos, end, converters, seq, rows, deprecate_eof)
    size = _terminator(buffer, pos, end, seq, deprecate_eof)
    if size is None or size is _NOT_MINE:
        return size
    # An EOF packet: the warning count (2 bytes), then the status. An OK packet
    # (DEPRECATE_EOF): affected rows and insert id (length-encoded, one byte each
    # after a SELECT), then the status.
    at = pos + 7
    if deprecate_eof and (buffer[pos + 5] >= 0xFB or buffer[pos + 6] >= 0xFB):
        at = _skip_length_encoded(buffer, _skip_length_encoded(buffer, pos + 5))
    status = buffer[at] | buffer[at + 1] << 8
    if status & _MORE_RESULTS:
        return _NOT_MINE
    return rows, pos + 4 + size, (seq + 1) & 0xFF, status


def _columns(
    buffer: bytearray, pos: int, end: int, deprecate_eof: bool
) -> tuple[int, int, int] | _Answer | None:
    """The packets that open a result set at POS: (columns, sequence id of the first
    row, position of the first row); None or _NOT_MINE as ``_one_result_set``."""
    size = _complete_packet(buffer, pos, end, 1)
    if size is None or size is _NOT_MINE:
        return size
    columns = buffer[pos + 4]
    if columns == 0 or columns >= 0xFB:  # OK, LOCAL INFILE, error; or 251+ columns
        return _NOT_MINE
    pos, seq, skipped = skip_packets_from_buffer(buffer, pos + 4 + size, end, 2, columns)
    if skipped < columns:  # stopped at a packet not all there, or not a column's
        return None if _complete_packet(buffer, pos, end, seq) is None else _NOT_MINE
    if not deprecate_eof:  # an EOF packet after the column definitions
        size = _terminator(buffer, pos, end, seq, deprecate_eof)
        if size is None or size is _NOT_MINE:
            return size
        pos += 4 + size
        seq = (seq + 1) & 0xFF
    return columns, seq, pos


def _complete_packet(buffer: bytearray, pos: int, end: int, seq: int) -> int | _Answer | None:
    """The payload size of the packet at POS; None when it is not all there yet;
    _NOT_MINE when it is empty, out of sequence, an error or a 16 MB one."""
    if end - pos < 5:
        return None
    size = buffer[pos] | buffer[pos + 1] << 8 | buffer[pos + 2] << 16
    if buffer[pos + 3] != seq or size == 0 or size == _MAX_PAYLOAD:
        return _NOT_MINE
    if end - pos - 4 < size:
        return None
    return _NOT_MINE if buffer[pos + 4] == 0xFF else size


def _terminator(
    buffer: bytearray, pos: int, end: int, seq: int, deprecate_eof: bool
) -> int | _Answer | None:
    """The payload size of the EOF packet (or, with DEPRECATE_EOF, the OK packet with
    an 0xFE header) at POS; None or _NOT_MINE as ``_complete_packet``."""
    size = _complete_packet(buffer, pos, end, seq)
    if size is None or size is _NOT_MINE:
        return size
    if buffer[pos + 4] != 0xFE or not (deprecate_eof or size < 9):
        return _NOT_MINE
    return size


def _skip_length_encoded(buffer: bytearray, pos: int) -> int:
    first = buffer[pos]
    return pos + (1 if first < 0xFB else 3 if first == 0xFC else 4 if first == 0xFD else 9)


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class _IdleReaper:
    """Closes the pool's idle connections once a table has been quiet for
    ``idle_interval`` (Postfix closes them after a minute without a query)."""

    interval: float
    last_use: float = 0.0
    handle: asyncio.TimerHandle | None = None
    loop: asyncio.AbstractEventLoop | None = field(default=None)

    def touch(self, pool: ConnectionPool, loop: asyncio.AbstractEventLoop) -> None:
        self.last_use = time.monotonic()
        if self.handle is None or self.loop is not loop:
            self.loop = loop
            self.handle = loop.call_later(self.interval, self._fire, pool)

    def _fire(self, pool: ConnectionPool) -> None:
        quiet = time.monotonic() - self.last_use
        assert self.loop is not None
        if quiet >= self.interval:
            pool.discard_idle()
            self.handle = None
        else:
            self.handle = self.loop.call_later(self.interval - quiet, self._fire, pool)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


@dataclass(slots=True, eq=False)
class _QueryInFlight(ReadWaiter):
    """A started lookup's query (``MysqlTable.lookup_start``), on its connection.

    It stands in asyncmy's protocol as the read waiter, which that protocol wakes
    with ``set_result`` from its data, end-of-file and loss callbacks: the answer is
    taken there, in the same callback, when it is one whole result set; else more
    data is awaited, or ``_rows`` goes on from here. The pool's sweeper calls
    ``expire`` past the deadline. ``answer`` is called once."""

    table: MysqlTable
    lease: Lease[Connection, Endpoint]
    key: bytes
    query: bytes
    answer: AnswerCallback
    deadline: float
    loop: asyncio.AbstractEventLoop  # the running one, where the answer comes
    over: bool = False

    def _broken(self, exc: Exception) -> None:
        self.over = True
        self.table._answer_failure(self, exc)

    def _read(self) -> None:
        connection: Any = self.lease.connection
        rows = _take_result_set(connection, self.table.header)
        if rows is None:
            proto = connection._proto
            if not (proto.eof or proto.exc is not None):
                proto._read_waiter = self  # a part of the answer: wait for the rest
                return
        self.over = True
        if rows is None or rows is _NOT_MINE:
            self.table._go_on(self)
        else:
            self.table._answered(self, rows)

    def expire(self) -> None:
        if not self.over:
            self.over = True
            self.table._expired(self)


@dataclass(slots=True, eq=False)
class _Queued:
    """A started lookup waiting for a pooled connection (``ConnectionPool.lend_later``)."""

    table: MysqlTable
    key: bytes
    query: bytes
    answer: AnswerCallback
    deadline: float
    loop: asyncio.AbstractEventLoop  # the running one

    def leased(self, lease: Lease[Connection, Endpoint] | Exception) -> None:
        table = self.table
        start_on_lease(table.pool, lease, self.start, self.answer, table)

    def start(self, lease: Lease[Connection, Endpoint]) -> None:
        self.table._queued_lease(self, lease)


class MysqlTable(AsyncTable):
    dict_type = "mysql"

    def __init__(
        self, name: str, open_mode: int, flags: int, ctx: OpenContext | None = None
    ) -> None:
        super().__init__(name, open_mode, flags, ctx)
        if open_mode != os.O_RDONLY:
            raise DictOpenError(f"{self.spec} map requires O_RDONLY access mode")
        ctx = ctx or OpenContext()
        cfg = CfgParser(name, ctx.params)
        self.timeout = param_number(ctx, "pyproxymap_mysql_timeout", DEFAULT_TIMEOUT)
        self.login = self._read_login(cfg)
        retry_interval = cfg.get_int("retry_interval", DEFAULT_INTERVAL, 1)
        idle_interval = cfg.get_int("idle_interval", DEFAULT_INTERVAL, 1)
        self.require_result_set = cfg.get_bool("require_result_set", True)
        self.queries = QueryContext.for_sql(cfg, ctx, "mysql", table=self.spec)
        # Always fixed, as in Postfix (its "partial key" test is disabled: it broke
        # recipient_delimiter lookups), even when the query uses %u, %d or %1-%9.
        self.flags = (flags & ~F.PATTERN) | F.FIXED
        self.endpoints = self._read_hosts(cfg)
        size = connection_limit("mysql", ctx.params) or DEFAULT_CONNECTIONS
        self.pool: ConnectionPool[Connection, Endpoint] = ConnectionPool(
            self.spec,
            self.endpoints,
            self._connect,
            _close_connection,
            size=size,
            connect_timeout=self.timeout,
            idle_limit=idle_interval,
            health_check=_ping,
            check_after=CHECK_AFTER,
            backoff_max=min(float(retry_interval), BACKOFF_MAX),
            order=unix_first_random,
            label=lambda endpoint: endpoint.label,
        )
        self.outage = OutageLog(self.spec)
        self.reaper = _IdleReaper(float(idle_interval))
        self._abandoned: set[asyncio.Future[None]] = set()
        self._going_on: set[asyncio.Future[None]] = set()  # started lookups, in _rows
        self._escape = escaper(self.login.charset)
        self._escape_quotes = escaper(self.login.charset, no_backslash_escapes=True)
        self.header = ResultHeader()  # of this table's answers (_one_result_set)

    # --- configuration -----------------------------------------------------------------
    def _read_login(self, cfg: CfgParser) -> _Login:
        user = cfg.get_str("user", "")
        password = cfg.get_str("password", "")
        dbname = cfg.get_str("dbname", "", 1)
        option_file = cfg.get_optional("option_file")
        option_group = cfg.get_str("option_group", "client")
        self.options = read_option_files(option_file, option_group)
        charset = (
            cfg.get_optional("charset")
            or self.options.get("default-character-set")
            or DEFAULT_CHARSET
        )
        if charset_by_name(charset) is None or charset in _NOT_CLIENT_CHARSETS:
            raise DictOpenError(f"{self.spec}: unsupported character set: {charset}")
        return _Login(
            user=_as_bytes(user or self.options.get("user", "")),
            password=_as_bytes(password),
            dbname=_as_bytes(dbname),
            charset=charset,
            tls=_tls_context(cfg, self.options),
            connect_timeout=max(1.0, self.timeout),
        )

    def _read_hosts(self, cfg: CfgParser) -> list[Endpoint]:
        names = [name for name in _HOST_SEPARATORS.split(cfg.get_str("hosts", "")) if name]
        return [parse_host(name, self.options) for name in names or ["localhost"]]

    async def _connect(self, endpoint: Endpoint) -> Connection:
        return await _connect(self.login, endpoint)

    # --- lookups ---------------------------------------------------------------------------
    async def alookup(self, key: bytes) -> bytes | None:
        key = self.fold(key)  # reads the flags: before the first await
        queries = self.queries
        if queries.domain_asynchronous:
            query = await queries.aquery_for(key, self._escape)
        else:
            query = queries.query_for(key, self._escape)
        if query is None:
            return None
        return self._value(key, await self._rows(key, query))

    def _value(self, key: bytes, rows: tuple | None) -> bytes | None:
        if not rows:
            return None
        queries = self.queries
        if len(rows) == 1 and len(rows[0]) == 1 and queries.verbatim_results:
            value = rows[0][0]
            if value and 0 not in value:
                return value  # what the joiner makes of one value, without it
        joined = queries.results(key)
        add = joined.add
        for row in rows:
            for value in row:
                # Postfix reads values as C strings: a NUL ends them.
                if value is not None and 0 in value:
                    value = value[: value.index(b"\0")]
                add(value)
        return joined.value()

    async def _rows(
        self, key: bytes, query: bytes, sent: _QueryInFlight | None = None
    ) -> tuple | None:
        """The rows of the query's one result set; None when it has none (allowed).
        ``sent``: a started lookup whose answer asyncmy reads from here on.

        The deadline is watched by the pool's sweeper, which cancels this task past
        it, as asyncio.timeout would (then TimeoutError): no task, timer or context
        manager per query."""
        pool = self.pool
        loop = pool.running_loop()
        deadline = loop.time() + self.timeout if sent is None else sent.deadline
        sweeper = pool.sweeper
        task = asyncio.current_task(loop)
        assert task is not None
        for attempt in range(2):
            if sent is None:
                lease = pool.lend(loop) or await pool.acquire(max(0.0, deadline - loop.time()))
            else:
                lease = sent.lease
            connection = lease.connection
            try:
                if sent is None:
                    text = self._query_text(connection, key, query)
                    reading = _result_sets(connection, text, self.header)
                else:
                    reading = _rest_of_result_sets(connection)
                    sent = None
                if deadline <= loop.time():
                    reading.close()
                    raise TimeoutError
                sweeper.watch(task, deadline, task.cancel, loop)
                try:
                    sets = await reading
                except asyncio.CancelledError:
                    if not sweeper.watching(task) and task.uncancel() == 0:
                        raise TimeoutError from None  # the sweeper's cancellation
                    raise
                finally:
                    sweeper.unwatch(task)
            except _LostConnection as exc:
                pool.release(lease, reusable=False)
                pool.suspect(lease)
                if attempt == 0:
                    continue  # the server may have restarted: once more, on a new connection
                raise self._failed(f"lost connection to {lease.endpoint.label}: {exc}")
            except TimeoutError:
                raise self._timed_out(lease) from None
            except _QueryFailed as exc:
                pool.release(lease, reusable=False)
                raise self._failed(str(exc)) from None
            except BaseException:
                pool.release(lease, reusable=False)
                raise
            if len(sets) == 1:
                self._give_back(lease, loop)
                return sets[0]
            self._give_back(lease, loop, answered=False)
            return self._check_sets(sets)
        raise AssertionError("not reached")

    def _query_text(self, connection: Connection, key: bytes, query: bytes) -> bytes:
        """The query as escaped for the server mode of this connection."""
        if connection.server_status & SERVER_STATUS_NO_BACKSLASH_ESCAPES:  # type: ignore[attr-defined]  # not in the stub
            queries = self.queries
            return queries.expand_query(queries.query, key, self._escape_quotes) or query
        return query

    # --- started lookups (AsyncTable.lookup_start) -----------------------------------------
    starts = True

    def lookup_start(self, key: bytes, answer: AnswerCallback) -> bytes | None | Later | Started:
        """``alookup`` without a coroutine when a pooled connection is free at once and
        the query goes out as ``_result_sets`` sends it: the query is written now, and
        the answer is read in asyncmy's data callback (``_QueryInFlight``). Anything
        but one whole result set goes on in ``_rows``, from where it is."""
        queries = self.queries
        if queries.domain_asynchronous:
            return LATER
        key = self.fold(key)  # reads the flags: before anything waits
        query = queries.query_for(key, self._escape)
        if query is None:
            return None
        pool = self.pool
        loop = pool.running_loop()
        deadline = loop.time() + self.timeout
        lease = pool.lend(loop)
        if lease is not None:
            return self._send(lease, key, query, answer, deadline, loop)
        queued = _Queued(self, key, query, answer, deadline, loop)
        return STARTED if pool.lend_later(queued.leased, self.timeout, loop) else LATER

    def _send(
        self,
        lease: Lease[Connection, Endpoint],
        key: bytes,
        query: bytes,
        answer: AnswerCallback,
        deadline: float,
        loop: asyncio.AbstractEventLoop,
    ) -> Later | Started:
        """Send a started lookup's query on LEASE: STARTED, or LATER (the lease given
        back) when it cannot go out as ``_result_sets`` would send it."""
        pool = self.pool
        connection: Any = lease.connection
        try:
            sent = not connection.server_status & SERVER_STATUS_NO_BACKSLASH_ESCAPES and (
                _send_query(connection, query)
            )
        except (mysql_errors.MySQLError, OSError, EOFError):  # found lost: alookup retries
            pool.release(lease, reusable=False)
            pool.suspect(lease)
            return LATER
        if not sent:
            pool.release(lease, True, loop)
            return LATER
        flight = _QueryInFlight(self, lease, key, query, answer, deadline, loop)
        pool.sweeper.watch(flight, deadline, flight.expire, loop)
        proto = connection._proto
        if proto.length == proto.pos and not proto.eof and proto.exc is None:
            proto._read_waiter = flight
        else:  # already there, or lost: read on the next turn, never from this call
            loop.call_soon(flight.set_result, None)
        return STARTED

    def _queued_lease(self, queued: _Queued, lease: Lease[Connection, Endpoint]) -> None:
        """A connection for a started lookup that waited for one."""
        key, query, answer = queued.key, queued.query, queued.answer
        if self._send(lease, key, query, answer, queued.deadline, queued.loop) is LATER:
            task = asyncio.ensure_future(self._finish_later(key, query, answer))
            self._going_on.add(task)
            task.add_done_callback(self._going_on.discard)

    async def _finish_later(self, key: bytes, query: bytes, answer: AnswerCallback) -> None:
        """``alookup``'s end of a started lookup that could not be sent as started."""
        try:
            value: bytes | None | Exception = self._value(key, await self._rows(key, query))
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            value = exc
        answer(value)

    def _answered(self, flight: _QueryInFlight, rows: tuple) -> None:
        """A started lookup's one result set, taken whole: the reply goes out first,
        the bookkeeping after it (off the client's wait)."""
        answer_with(flight.answer, self._value, flight.key, rows, self)  # never raises
        self.pool.sweeper.unwatch(flight)
        self._give_back(flight.lease, flight.loop)

    def _expired(self, flight: _QueryInFlight) -> None:
        """No whole answer by the deadline: RETRY, and the query is stopped."""
        lease = flight.lease
        proto = lease.connection._proto  # type: ignore[attr-defined]  # not in asyncmy's stub
        if proto._read_waiter is flight:
            proto._read_waiter = None
        flight.answer(self._timed_out(lease))

    def _timed_out(self, lease: Lease[Connection, Endpoint]) -> DictRetry:
        """A lookup past its deadline: its query is stopped (``_abandon``); RETRY."""
        self._abandon(lease)
        return self._failed(f"no answer from {lease.endpoint.label} within {self.timeout:g}s")

    def _give_back(
        self,
        lease: Lease[Connection, Endpoint],
        loop: asyncio.AbstractEventLoop | None = None,
        answered: bool = True,
    ) -> None:
        """A connection back in the pool after its query's whole answer; ``answered``:
        one result set, so the outage (if any) is over."""
        pool = self.pool
        loop = loop or pool.running_loop()
        pool.release(lease, True, loop)
        self.reaper.touch(pool, loop)
        if answered and self.outage.failing:
            self.outage.ok()

    def _answer_failure(self, flight: _QueryInFlight, exc: Exception) -> None:
        """A started lookup that failed here (a bug): RETRY, the connection closed."""
        log.error("%s: lookup failed: %r", self.spec, exc, exc_info=exc)
        self.pool.sweeper.unwatch(flight)
        self.pool.release(flight.lease, reusable=False)
        flight.answer(self._failed(f"lookup failed: {exc!r}"))

    def _go_on(self, flight: _QueryInFlight) -> None:
        """A started lookup whose answer is not one whole result set: ``_rows`` takes
        it from where it is (errors, retry on a lost connection, the deadline)."""
        self.pool.sweeper.unwatch(flight)
        task = asyncio.ensure_future(self._finish(flight))
        self._going_on.add(task)
        task.add_done_callback(self._going_on.discard)

    async def _finish(self, flight: _QueryInFlight) -> None:
        try:
            value: bytes | None | Exception = self._value(
                flight.key, await self._rows(flight.key, flight.query, flight)
            )
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            value = exc
        flight.answer(value)

    def _abandon(self, lease: Lease[Connection, Endpoint]) -> None:
        """A query that timed out still runs on the server, on a connection the server
        still counts: it keeps its pool slot until a pooled connection has killed it
        (``KILL QUERY``) and it is closed. So the bound holds on the server's side too."""
        task = asyncio.ensure_future(self._kill_query(lease))
        self._abandoned.add(task)
        task.add_done_callback(self._abandoned.discard)

    async def _kill_query(self, lease: Lease[Connection, Endpoint]) -> None:
        try:
            thread_id = lease.connection.thread_id()
            async with self.pool.connection(self.timeout) as killer:
                await _result_sets(killer.connection, b"KILL QUERY %d" % thread_id)
        except Exception as exc:  # noqa: BLE001 - the server ends it at the query's end
            log.info("%s: could not stop a query that timed out: %s", self.spec, exc)
        finally:
            self.pool.release(lease, reusable=False)

    def _check_sets(self, sets: list[tuple]) -> tuple | None:
        if len(sets) > 1:
            raise self._failed(
                "query failed: multiple result sets returning data are not supported"
            )
        if not sets:
            if self.require_result_set:
                raise self._failed(
                    "query failed: query returned no result set (require_result_set = yes)"
                )
            self.outage.ok()
            return None
        self.outage.ok()
        return sets[0]

    def _failed(self, reason: str) -> DictRetry:
        self.outage.failed(reason)
        return DictRetry(f"{self.spec}: {reason}")

    def close(self) -> None:
        for task in (*self._abandoned, *self._going_on):
            task.cancel()
        self.reaper.cancel()
        self.pool.close()
