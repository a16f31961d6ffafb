"""Query a proxymap/proxywrite service from the command line, as a Postfix client would.

NAME
    proxymap-query -- look up, list, update or delete through proxymap(8)

SYNOPSIS
    proxymap-query [-s SOCKET | -c CONFIG_DIR] [--v311] [--write] KEY proxy:TYPE:NAME
    proxymap-query [...] --sequence proxy:TYPE:NAME
    proxymap-query [...] --update KEY VALUE proxy:TYPE:NAME
    proxymap-query [...] --delete KEY proxy:TYPE:NAME
    proxymap-query [-c CONFIG_DIR] --stats [--json]

DESCRIPTION
    Speaks the proxymap protocol exactly like a Postfix 3.7 client (``postmap -q``):
    ``open`` with flags 0, then ``lookup`` with flags 524353 (DUP_WARN|LOCK|UTF8_REQUEST),
    and, as that client's own UTF-8 layer does, checks that the key is UTF-8 and
    case-folds it when the table has fixed-string keys. With ``--v311`` it speaks like a
    3.11+ client: ``open`` with instance_flags 540737, then every request carries the
    flags of the previous reply; the key is folded client-side only when the server did
    not install its UTF-8 layer (no ``utf8_active`` in the open reply).

    ``--sequence`` lists every entry (``key<TAB>value`` lines, like ``postmap -s``);
    ``--update`` and ``--delete`` go to proxywrite, as does everything with ``--write``.

    The socket defaults to ``$queue_directory/private/$proxymap_service_name`` (or
    ``$proxywrite_service_name``) from main.cf in CONFIG_DIR, ``$MAIL_CONFIG`` or
    /etc/postfix.

    ``--stats`` prints the live statistics of every running worker of ours (per table:
    lookups, hit rate, RETRY/CONFIG/DENY, latency percentiles, backend connections; per
    worker: clients, uses, idle time) from their snapshots in
    ``$queue_directory/pid/pyproxymap-stats`` (``master.stats``), as ``proxymap-master
    status`` does: it needs neither our master nor a connection, so it serves the
    drop-in case, workers under Postfix's own master. ``--json`` prints the document.

    A table without the ``proxy:`` prefix is sent as it is, after a warning: the
    order and the names are postmap's (``KEY TABLE``), and ``postmap -q KEY TABLE``
    without ``proxy:`` would open the table directly instead. ``-h``/``--help`` shows
    all this, the options and the exit status.

EXIT STATUS
    0 found / done, 1 not found, 2 temporary error (status RETRY) or usage error, 3
    invalid request (BAD), 4 table not approved for this service (DENY), 5
    configuration error (status CONFIG, or main.cf unreadable), 75 cannot connect or
    the server broke the protocol.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import click

from proxymap import attr
from proxymap import flags as F
from proxymap.protocol import ANNOUNCEMENT, BAD, CONFIG, DENY, NOKEY, OK, RETRY

EXIT_FOUND, EXIT_NOT_FOUND, EXIT_RETRY, EXIT_BAD, EXIT_DENIED, EXIT_CONFIG = 0, 1, 2, 3, 4, 5
EXIT_CONNECTION = 75  # EX_TEMPFAIL

# Open-time dictionary flags of the Postfix commands this tool imitates.
QUERY_FLAGS = F.DUP_WARN | F.LOCK | F.FOLD_FIX | F.UTF8_REQUEST  # postmap -q, -s, -d: 540737
UPDATE_FLAGS = F.DUP_WARN | F.FOLD_FIX | F.UTF8_REQUEST  # postmap -i: 540673

STATUS_EXIT = {
    OK: EXIT_FOUND,
    NOKEY: EXIT_NOT_FOUND,
    RETRY: EXIT_RETRY,
    BAD: EXIT_BAD,
    DENY: EXIT_DENIED,
    CONFIG: EXIT_CONFIG,
}

# A Postfix client waits up to ipc_timeout (1 hour); a command-line tool should not.
TIMEOUT = 30.0


class QueryError(Exception):
    """Ends the command with a message and an exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Reply:
    """A reply: its status, its flags (when it has them) and every attribute as sent."""

    status: int
    flags: int | None
    values: dict[bytes, bytes]


class ProxymapClient:
    """A blocking proxymap client for one table, in either client generation."""

    def __init__(
        self,
        path: str,
        table: str,
        *,
        v311: bool,
        utf8: bool = True,
        service: str = "proxymap",
        timeout: float = TIMEOUT,
    ) -> None:
        self.path = path
        self.service = service
        self.table = table
        self.v311 = v311
        self.utf8 = utf8
        self.stream = f"{path} socket"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.decoder = attr.AttrDecoder()
        self.instance_flags = 0
        self.flags = 0  # G1: open-time instance bits; G2: the word from the last reply
        self.table_flags = 0  # FIXED/PATTERN/... learned at open
        self.server_utf8 = False

    # --- transport -----------------------------------------------------------------------
    def connect(self) -> None:
        try:
            self.sock.connect(self.path)
            announcement = self._receive()
        except OSError as exc:
            raise QueryError(f"connect to {self.path}: {exc.strerror or exc}", EXIT_CONNECTION)
        if attr.encode(announcement) != ANNOUNCEMENT:
            raise QueryError(
                f"{self.stream}: unexpected announcement {announcement!r}", EXIT_CONNECTION
            )

    def close(self) -> None:
        self.sock.close()

    def _receive(self) -> attr.Pairs:
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise QueryError(f"{self.stream}: server closed the connection", EXIT_CONNECTION)
            lists = self.decoder.feed(data)
            if lists:
                if len(lists) > 1 or self.decoder.pending:
                    raise QueryError(f"{self.stream}: unsolicited data", EXIT_CONNECTION)
                return lists[0]

    def call(self, pairs: list[tuple[bytes, bytes]], reply_names: Sequence[bytes]) -> Reply:
        """Send one request; return the reply attributes (strict order, like the client)."""
        try:
            self.sock.sendall(attr.encode(pairs))
            reply = self._receive()
        except OSError as exc:
            raise QueryError(f"{self.stream}: {exc.strerror or exc}", EXIT_CONNECTION)
        names = [name for name, _ in reply]
        if names[: len(reply_names)] != list(reply_names):
            raise QueryError(
                f"{self.stream}: unexpected reply {reply!r} (expecting: "
                f"{b', '.join(reply_names).decode()})",
                EXIT_CONNECTION,
            )
        values = dict(reply[: len(reply_names)])
        try:
            status = attr.parse_u32(values[b"status"])
            flags = attr.parse_u32(values[b"flags"]) if b"flags" in values else None
        except ValueError:
            raise QueryError(f"{self.stream}: malformed number in reply {reply!r}", EXIT_CONNECTION)
        if self.v311 and flags is not None and status not in (BAD, DENY):
            self.flags = flags  # the G2 client keeps what the server says
        return Reply(status, flags, values)

    # --- requests ------------------------------------------------------------------------
    def _head(self, op: bytes) -> list[tuple[bytes, bytes]]:
        head = [(b"request", op), (b"table", self.table.encode("utf-8", "surrogateescape"))]
        if self.v311:
            head.append((b"instance_flags", attr.encode_uint(self.instance_flags)))
        return head

    def open(self, dict_flags: int) -> None:
        """The ``open`` request; raises QueryError on BAD/DENY (fatal for Postfix too)."""
        self.instance_flags = dict_flags
        pairs = self._head(b"open")
        if not self.v311:
            pairs.append((b"flags", attr.encode_uint(dict_flags & F.INST_MASK)))
        reply = self.call(pairs, (b"status", b"flags"))
        self._fail_unless_ok(reply.status, "open")
        reply_flags = reply.flags
        assert reply_flags is not None  # asked for above; ``call`` checked it came
        if self.v311:
            self.flags = reply_flags
            self.server_utf8 = bool(self.flags & F.UTF8_ACTIVE)
        else:
            self.flags = dict_flags
        self.table_flags = reply_flags & F.IMPL_MASK

    def _client_utf8(self) -> bool:
        """True when this client runs its own UTF-8 layer (checks and folds keys itself)."""
        return self.utf8 and bool(self.instance_flags & F.UTF8_REQUEST) and not self.server_utf8

    def _request_flags(self) -> int:
        flags = self.flags
        if self._client_utf8():
            flags &= ~F.FOLD_ANY  # the layer folded already; the table must not again
        if not self.v311:
            flags = (self.instance_flags & F.INST_MASK) | (flags & F.RQST_MASK)
        return flags

    def _key(self, key: str) -> bytes:
        raw = key.encode("utf-8", "surrogateescape")
        if not self._client_utf8():
            return raw
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise QueryError(f'{self.table}: non-UTF-8 key "{key}"', EXIT_NOT_FOUND)
        fold = F.FOLD_FIX if self.table_flags & F.FIXED else F.FOLD_MUL
        if self.instance_flags & fold:
            text = text.casefold()
        return text.encode("utf-8")

    def _with_flags(self, op: bytes) -> list[tuple[bytes, bytes]]:
        return [*self._head(op), (b"flags", attr.encode_uint(self._request_flags()))]

    def _reply_names(self, *names: bytes) -> tuple[bytes, ...]:
        return (b"status", b"flags", *names) if self.v311 else (b"status", *names)

    def lookup(self, key: str) -> bytes | None:
        pairs = [*self._with_flags(b"lookup"), (b"key", self._key(key))]
        reply = self.call(pairs, self._reply_names(b"value"))
        if reply.status == NOKEY:
            return None
        self._fail_unless_ok(reply.status, "lookup", key)
        return reply.values[b"value"]

    def sequence(self) -> Iterator[tuple[bytes, bytes]]:
        function = 0
        while True:
            pairs = [*self._with_flags(b"sequence"), (b"function", b"%d" % function)]
            reply = self.call(pairs, self._reply_names(b"key", b"value"))
            if reply.status == NOKEY:
                return
            self._fail_unless_ok(reply.status, "sequence")
            yield reply.values[b"key"], reply.values[b"value"]
            function = 1

    def update(self, key: str, value: str) -> int:
        pairs = [
            *self._with_flags(b"update"),
            (b"key", self._key(key)),
            (b"value", value.encode("utf-8", "surrogateescape")),
        ]
        status = self.call(pairs, self._reply_names()).status
        if status != NOKEY:
            self._fail_unless_ok(status, "update", key)
        return status

    def delete(self, key: str) -> int:
        pairs = [*self._with_flags(b"delete"), (b"key", self._key(key))]
        status = self.call(pairs, self._reply_names()).status
        if status != NOKEY:
            self._fail_unless_ok(status, "delete", key)
        return status

    def _fail_unless_ok(self, status: int, op: str, key: str | None = None) -> None:
        if status == OK:
            return
        service = self.service
        where = f'table "{self.table}"' + (f' key "{key}"' if key is not None else "")
        messages = {
            BAD: f"{service} {op} failed for {where}: invalid request",
            DENY: (
                f'{service} update access is not configured for table "{self.table}"'
                if op in ("update", "delete")
                else f'{service} service is not configured for table "{self.table}"'
            ),
            RETRY: f"{service} {op} failed for {where}: temporary failure",
            CONFIG: f"{service} {op} failed for {where}: table configuration error",
        }
        message = messages.get(status, f"{service} {op} for {where}: unexpected status {status}")
        raise QueryError(message, STATUS_EXIT.get(status, EXIT_CONNECTION))


def default_socket(config_dir: str | None, write: bool) -> tuple[str, bool]:
    """``$queue_directory/private/<service>`` and smtputf8_enable, from main.cf."""
    from master.mainconf import MainConfig

    try:
        config = MainConfig.load(config_dir)
        service = config.get("proxywrite_service_name" if write else "proxymap_service_name")
        service = service or ("proxywrite" if write else "proxymap")
        path = f"{config['queue_directory']}/private/{service}"
        return path, config.get_bool("smtputf8_enable")
    except (OSError, ValueError, KeyError) as exc:
        raise QueryError(f"cannot read the configuration: {exc}", EXIT_CONFIG)


HELP_TEXT = """Look up KEY in TABLE through the proxymap service, as a Postfix client does.

\b
The order is postmap's: the key first, the table last.
  proxymap-query [OPTIONS] KEY proxy:TYPE:NAME
  proxymap-query [OPTIONS] --sequence proxy:TYPE:NAME
  proxymap-query [OPTIONS] --update KEY VALUE proxy:TYPE:NAME
  proxymap-query [OPTIONS] --delete KEY proxy:TYPE:NAME
  proxymap-query [-c CONFIG_DIR] --stats [--json]

\b
Example:
  proxymap-query -c /etc/postfix alice proxy:hash:/etc/postfix/virtual

TABLE is what main.cf lists in proxy_read_maps (proxy_write_maps for --update,
--delete and --write), proxy: prefix included; without it the name is sent all
the same, with a warning (postmap -q would open such a table directly). The
answer is written on stdout; the socket is $queue_directory/private/proxymap of
the main.cf in CONFIG_DIR unless -s names one.
"""

EXIT_TEXT = """\b
Exit status:
  0   found (--update, --delete: done; --sequence: at least one entry)
  1   not found (also: a key that is not UTF-8)
  2   temporary error: the server answered "try again" (RETRY); also a usage
      error (bad options or arguments: then stderr says "Usage:")
  3   invalid request (BAD)
  4   the table is not approved for this service (DENY)
  5   configuration error (status CONFIG, or main.cf unreadable)
  75  cannot connect, or the server broke the protocol
"""


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]}, help=HELP_TEXT, epilog=EXIT_TEXT
)
@click.option(
    "-s", "--socket", "socket_path", metavar="SOCKET", help="proxymap socket (default from main.cf)"
)
@click.option(
    "-c",
    "--config-dir",
    metavar="CONFIG_DIR",
    help="directory of main.cf (default $MAIL_CONFIG or /etc/postfix)",
)
@click.option("--v311", is_flag=True, help="speak like a Postfix 3.11+ client")
@click.option("--write", is_flag=True, help="use the proxywrite service")
@click.option("--sequence", is_flag=True, help="list all entries (KEY<TAB>VALUE lines)")
@click.option("--update", nargs=2, metavar="KEY VALUE", help="store KEY VALUE (proxywrite)")
@click.option("--delete", metavar="KEY", help="remove KEY (proxywrite)")
@click.option("--no-utf8", is_flag=True, help="as with smtputf8_enable = no (server folds)")
@click.option(
    "--stats", is_flag=True, help="print the workers' live statistics (no lookup; needs no master)"
)
@click.option("--json", "as_json", is_flag=True, help="with --stats: the JSON document")
@click.argument("args", nargs=-1, metavar="KEY proxy:TYPE:NAME")
def main(
    socket_path, config_dir, v311, write, sequence, update, delete, no_utf8, stats, as_json, args
):
    try:
        if stats:
            if args or sequence or update or delete:
                raise click.UsageError("--stats takes no table and no other mode")
            sys.exit(print_statistics(config_dir, as_json))
        if as_json:
            raise click.UsageError("--json goes with --stats")
        sys.exit(run(socket_path, config_dir, v311, write, sequence, update, delete, no_utf8, args))
    except QueryError as exc:
        click.echo(f"proxymap-query: {exc}", err=True)
        sys.exit(exc.status)


def print_statistics(config_dir: str | None, as_json: bool) -> int:
    """``--stats``: the snapshot files under main.cf's queue_directory, summed."""
    import json

    from master.mainconf import MainConfig
    from master.stats import collect, format_statistics

    try:
        queue_directory = MainConfig.load(config_dir)["queue_directory"]
    except (OSError, ValueError, KeyError) as exc:
        raise QueryError(f"cannot read the configuration: {exc}", EXIT_CONFIG)
    figures = collect(queue_directory)
    click.echo(json.dumps(figures, indent=2) if as_json else format_statistics(figures))
    return EXIT_FOUND


def run(socket_path, config_dir, v311, write, sequence, update, delete, no_utf8, args) -> int:
    modes = sum(bool(m) for m in (sequence, update, delete))
    if modes > 1:
        raise click.UsageError("use only one of --sequence, --update, --delete")
    expected = 1 if modes else 2
    if len(args) != expected:
        usage = "proxy:TYPE:NAME" if modes else "KEY proxy:TYPE:NAME"
        raise click.UsageError(f"expected {usage}")
    table = args[-1]
    if table.startswith("proxy:"):
        table = table[len("proxy:") :]  # the client sends the name after its own type
    else:
        click.echo(
            f'proxymap-query: warning: "{table}" has no proxy: prefix: asking the '
            f"{'proxywrite' if write or update or delete else 'proxymap'} service "
            f"for proxy:{table} (postmap -q would open {table} directly)",
            err=True,
        )
    if ":" not in table:
        raise QueryError(f'need dictionary_type:dictionary_name instead of "{args[-1]}"', EXIT_BAD)
    write = write or bool(update or delete)
    utf8 = not no_utf8
    if socket_path is None:
        socket_path, utf8_enabled = default_socket(config_dir, write)
        utf8 = utf8 and utf8_enabled
    client = ProxymapClient(
        socket_path, table, v311=v311, utf8=utf8, service="proxywrite" if write else "proxymap"
    )
    client.connect()
    try:
        if update:
            client.open(UPDATE_FLAGS)
            return STATUS_EXIT[client.update(*update)]
        client.open(QUERY_FLAGS)
        if delete:
            return STATUS_EXIT[client.delete(delete)]
        if sequence:
            found = False
            for key, value in client.sequence():
                found = True
                sys.stdout.buffer.write(key + b"\t" + value + b"\n")
            sys.stdout.buffer.flush()
            return EXIT_FOUND if found else EXIT_NOT_FOUND
        answer = client.lookup(args[0])
        if answer is None:
            return EXIT_NOT_FOUND
        sys.stdout.buffer.write(answer + b"\n")
        sys.stdout.buffer.flush()
        return EXIT_FOUND
    finally:
        client.close()


if __name__ == "__main__":  # pragma: no cover
    main()
