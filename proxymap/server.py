"""The proxymap(8) / proxywrite service, run by the multi-server skeleton.

NAME
    proxymap -- Postfix lookup table proxy server (read-only and read-write services)

SYNOPSIS
    proxymap [generic Postfix daemon options]          (started by master(8))
    proxymap -S [-n proxymap|proxywrite]  < request   (one request on stdin/stdout)
    proxymap -S -n export-proxy-proxymap < /dev/null  (list the approved tables)
    proxymap -S -n connections-proxymap < /dev/null   (their connection bounds)
    proxymap -S -V -n check-proxymap [-u] < /dev/null (open each one: the self-check)

DESCRIPTION
    The service name (``-n``, else the program's basename) selects the mode:
    ``proxymap`` serves read-only requests for tables listed with ``proxy:`` in
    ``proxy_read_maps``; ``proxywrite`` also accepts updates and deletes, for tables
    in ``proxy_write_maps``. Any other name is fatal, as is any argument after the
    options. With the 3.11+ prefixes
    ``export-proxy-`` or ``export-all-`` the approved tables are printed, sorted
    bytewise, and the process exits 0 without serving. With ``connections-`` each
    approved table that opens network connections is printed with the most one worker
    opens for it (``TABLE<TAB>LIMIT``; a composite counts its members): what
    ``proxymap-master status`` multiplies by the process limit. With ``check-`` each
    approved table is opened, after the privilege drop (``-u``) as when serving, and
    asked for a key that should not exist; one line per table, sorted bytewise:
    ``TABLE<TAB>ok`` or ``TABLE<TAB>error: <cause>`` (the reason the table would answer
    "try again", e.g. ``unsupported dictionary type: foo`` or ``open /x: No such file
    or directory``); the exit status is 1 when any table failed. This is what
    ``proxymap-master check`` and ``proxymap-master dropin enable`` run.

    Hooks, in the skeleton's order (``master.service``):

    pre_init
        checks the service name, computes the approved set (before the privilege
        drop, so that root-only ``/file/name`` lists are readable, as in 3.11+),
        imports the modules of the approved table types while still root, and
        for proxywrite leaves the master's process group (``setsid``) so that
        ``postfix stop`` cannot interrupt an update half-way.
    post_init
        creates the request handler (tables are opened on first use, as mail_owner),
        and the statistics reporter (``proxymap.stats``; its directory was opened in
        pre_init, while still root).
    pre_accept
        read-only service only: when a table file changed since it was opened, logs
        ``table <name> has changed -- restarting`` and exits 0 without accepting;
        the waiting client is accepted by a fresh process.

    ``-S``: one request is read from stdin and answered on stdout, without the
    announcement, by a ``Session`` as on a connection; a slow table is awaited on a
    private event loop.

SEE ALSO
    proxymap.session (one client), proxymap.connection (its event-loop driver),
    proxymap.handler (one request), docs/PROTOCOL.md sections 2 and 4.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, BinaryIO, TypeVar, cast

from master.log import fatal
from proxymap import flags as F
from proxymap.approval import approved_tables
from proxymap.connection import ProxymapProtocol
from proxymap.handler import RequestHandler
from proxymap.protocol import STANDALONE_STREAM, stream_name
from proxymap.session import Session
from proxymap.stats import Reporter, StatsSettings, open_directory
from proxymap.tables import TABLE_TYPES, table_class
from proxymap.tables.base import AsyncTable, DictBusy, DictOpenError, SyncTable
from proxymap.tables.blocking import calls_waiting
from proxymap.tables.pool import connection_limit, lookups_waiting

if TYPE_CHECKING:
    from master.multi_server import MultiServer

log = logging.getLogger("proxymap")
T = TypeVar("T")

READER, WRITER = "proxymap", "proxywrite"
EXPORT_PREFIXES = (("export-proxy-", False), ("export-all-", True))
CONNECTIONS_PREFIX = "connections-"
CHECK_PREFIX = "check-"
# The self-check opens tables as postmap -q does and asks for a key nobody has.
CHECK_FLAGS = F.DUP_WARN | F.LOCK | F.FOLD_FIX | F.UTF8_REQUEST
CHECK_KEY = b"pyproxymap-check-probe"
# Per table, on top of the table's own timeouts (they answer first when shorter).
CHECK_TIMEOUT = 25.0


class ServiceNameError(ValueError):
    """The service name is neither proxymap nor proxywrite."""


def parse_service_name(name: str) -> tuple[str, bool | None]:
    """(proxymap|proxywrite, export mode): export mode None, False (proxy) or True (all)."""
    export: bool | None = None
    for prefix, export_all in EXPORT_PREFIXES:
        if name.startswith(prefix):
            name, export = name[len(prefix) :], export_all
            break
    if name not in (READER, WRITER):
        raise ServiceNameError(
            f'invalid service name: "{name}" - service name must be "proxywrite" or "proxymap"'
        )
    return name, export


def sorted_bytewise(names) -> list[str]:
    """Sorted like C ``strcmp`` on the bytes, whatever the locale."""
    return sorted(names, key=lambda name: name.encode("utf-8", "surrogateescape"))


class ProxymapService:
    """The proxymap/proxywrite service (``master.service.Service``)."""

    name = READER

    def __init__(self) -> None:
        self.service_name = READER
        self.approved: frozenset[str] = frozenset()
        self.handler: RequestHandler | None = None
        self.self_check = False
        self.stats_directory: int | None = None  # descriptor, opened as root
        self.reporter: Reporter | None = None

    # --- skeleton hooks ----------------------------------------------------------------------
    def pre_init(self, server: MultiServer) -> None:
        report_connections = server.service_name.startswith(CONNECTIONS_PREFIX)
        self.self_check = server.service_name.startswith(CHECK_PREFIX)
        service_name = server.service_name.removeprefix(CONNECTIONS_PREFIX)
        service_name = service_name.removeprefix(CHECK_PREFIX)
        try:
            self.service_name, export = parse_service_name(service_name)
        except ServiceNameError as exc:
            fatal("%s", exc, logger="proxymap")
        arguments = getattr(getattr(server, "options", None), "arguments", None)
        if arguments:
            fatal("unexpected command-line argument: %s", arguments[0], logger="proxymap")
        approved = approved_tables(server.config, self.service_name, export_all=bool(export))
        if report_connections:
            for name, limit in connection_bounds(approved, server.config):
                sys.stdout.write(f"{name}\t{limit}\n")
            sys.stdout.flush()
            server.exit(0)  # before the loop runs, exit() leaves the process
        if export is not None:
            out = sys.stdout
            for name in sorted_bytewise(set(approved)):
                out.write(name + "\n")
            out.flush()
            server.exit(0)
        self.approved = frozenset(approved)
        preload_table_modules(self.approved)
        if (
            not self.self_check
            and not _standalone(server)
            and StatsSettings.from_params(server.config).enabled
        ):
            # Before the privilege drop and chroot: the directory may need creating.
            self.stats_directory = open_directory(server.config.get("mail_owner"))
        if self.service_name == WRITER and not self.self_check:
            # Leave the master's process group: "postfix stop" signals that group, and a
            # writer must only ever stop between requests (on the status-fd EOF).
            try:
                os.setsid()
            except OSError:
                pass  # already a session leader (e.g. started by hand)

    def post_init(self, server: MultiServer) -> None:
        self.handler = RequestHandler(self.service_name, self.approved, server.config)
        server.on_exit(self.handler.close)  # result-cache figures, an outage still going on
        settings = self.handler.stats_settings
        if (
            settings.enabled
            and not self.self_check
            and not _standalone(server)
            and (self.stats_directory is not None or settings.proctitle)
        ):
            self.reporter = Reporter(server, self.handler, self.stats_directory, settings)
            server.on_exit(self.reporter.close)
        if self.self_check:
            results = check_tables(self.handler, self.approved)
            for name, outcome in results:
                sys.stdout.write(f"{name}\t{outcome}\n")
            sys.stdout.flush()
            failed = any(outcome != "ok" for _, outcome in results)
            server.exit(1 if failed else 0)

    def pre_accept(self, server: MultiServer) -> None:
        if self.service_name != READER or self.handler is None:
            return
        changed = self.handler.changed_table()
        if changed is not None:
            log.info("table %s has changed -- restarting", changed)
            server.exit(0)

    def waiting_for_backends(self, _server: MultiServer) -> bool:
        """A request waits for a backend at its bound: a pooled connection, a driver
        thread, or a table file that a writer holds locked (which admits one writer;
        Postfix's daemon would wait in flock() and be busy for its master)."""
        handler = self.handler
        return (
            lookups_waiting() or calls_waiting() or (handler is not None and handler.lock_waits > 0)
        )

    def protocol_factory(self, server: MultiServer) -> Callable[[], asyncio.Protocol]:
        handler = self.handler
        assert handler is not None, "post_init makes the handler"
        stream = stream_name(self.service_name)
        if self.reporter is not None:
            self.reporter.start(server.loop)
        if server.loop is not None:  # local tables may keep a lock until a turn ends
            handler.context.turn.attach(server.loop)

        def new_connection() -> ProxymapProtocol:
            return ProxymapProtocol(server, handler, stream)

        return new_connection

    def serve_standalone(self, _server: MultiServer, infile: BinaryIO, outfile: BinaryIO) -> None:
        assert self.handler is not None, "post_init makes the handler"
        reply = answer_standalone(self.handler, infile)
        if reply:
            outfile.write(reply)
            outfile.flush()


_TYPE_REFERENCE = re.compile(r"([A-Za-z0-9_]+):")


def _standalone(server: MultiServer) -> bool:
    """-S (one request, no loop): no statistics. So is a harness without the attribute."""
    return getattr(server, "standalone", True)


def connection_bounds(approved, params) -> list[tuple[str, int]]:
    """(table, most connections one worker opens for it), for tables that open any."""
    bounds = []
    for name in sorted_bytewise(set(approved)):
        limits = [
            connection_limit(match.group(1), params) for match in _TYPE_REFERENCE.finditer(name)
        ]
        total = sum(limit for limit in limits if limit)
        if total:
            bounds.append((name, total))
    return bounds


def preload_table_modules(approved) -> None:
    """Import the modules of every table type the approved names mention, now.

    Tables are opened after the privilege drop (and chroot); a Python installation
    that mail_owner cannot read -- or that is outside the chroot -- would then fail
    to import a driver or its standard-library dependencies (``grp``, ``sqlite3`` ...),
    and the table would be a surrogate answering RETRY. Importing while still root,
    in pre-init, avoids that. A module that cannot load is left to the first open,
    which reports it the Postfix way.
    """
    wanted = {match.group(1) for name in approved for match in _TYPE_REFERENCE.finditer(name)}
    for dict_type in sorted(wanted & TABLE_TYPES.keys()):
        try:
            table_class(dict_type)
        except DictOpenError:
            pass


# --- self-check (-n check-SERVICE) -----------------------------------------------------------
def check_tables(handler: RequestHandler, names) -> list[tuple[str, str]]:
    """(table, "ok" or "error: <cause>") for each name, sorted bytewise.

    Each table is opened the way the handler opens it for a client and asked for one
    key: Postfix opens a table that fails as a surrogate whose failure shows only when
    it is used, and a database table connects only then. Asynchronous tables are asked
    concurrently, so a hung backend costs one timeout, not one per table.
    """
    outcomes: dict[str, str] = {}
    waiting: dict[str, AsyncTable] = {}
    for name in sorted_bytewise(set(names)):
        try:
            table = handler.open_nested(name, handler.open_mode, CHECK_FLAGS)
        except Exception as exc:  # noqa: BLE001 - a driver bug is a cause too
            outcomes[name] = _failure(exc)
            continue
        if table.asynchronous:
            waiting[name] = cast(AsyncTable, table)
        else:
            outcomes[name] = _probe(cast(SyncTable, table))
    if waiting:
        outcomes.update(_await_privately(_probe_all(waiting)))
    return [(name, outcomes[name]) for name in sorted_bytewise(outcomes)]


def _probe(table: SyncTable) -> str:
    try:
        table.lookup(CHECK_KEY)
    except DictBusy:
        return "ok"  # opened; a writer holds its lock right now
    except Exception as exc:  # noqa: BLE001 - every failure is a cause to report
        return _failure(exc)
    return "ok"


async def _probe_all(tables: dict[str, AsyncTable]) -> dict[str, str]:
    async def probe(table: AsyncTable) -> str:
        try:
            await asyncio.wait_for(table.alookup(CHECK_KEY), CHECK_TIMEOUT)
        except TimeoutError:
            return f"error: no answer within {CHECK_TIMEOUT:.0f}s"
        except Exception as exc:  # noqa: BLE001 - every failure is a cause to report
            return _failure(exc)
        return "ok"

    results = await asyncio.gather(*(probe(table) for table in tables.values()))
    return dict(zip(tables, results, strict=True))


def _failure(exc: BaseException) -> str:
    """``error: <cause>`` on one line (the caller splits lines on tabs and newlines)."""
    cause = " ".join(str(exc).split()) or type(exc).__name__
    return f"error: {cause}"


# --- stand-alone mode (-S) -------------------------------------------------------------------
def answer_standalone(handler: RequestHandler, infile: BinaryIO) -> bytes:
    """-S: the first list on ``infile`` answered as a connection would answer it
    (a slow table awaited on a private loop); b"" when it gets no reply."""
    session = Session(handler, STANDALONE_STREAM, one_request=True)
    try:
        fd: int | None = infile.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None  # not a real file (tests): read it as a stream
    out: list[bytes] = []
    while not session.finished:
        data = os.read(fd, 65536) if fd is not None else infile.read(65536)
        out.append(session.receive_data(data) if data else session.receive_eof())
        while (slow := session.slow) is not None:
            try:
                outcome: object = _await_privately(slow)
            except Exception as exc:  # noqa: BLE001 - the session logs it and answers RETRY
                outcome = exc
            out.append(session.slow_answered(outcome))
    return b"".join(out)


def _await_privately(awaitable: Awaitable[T]) -> T:
    async def wait() -> T:
        return await awaitable

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(wait())
    finally:
        loop.close()


def main(argv: list[str] | None = None) -> None:
    """Console script ``proxymap``: run the service under the multi-server skeleton."""
    from master.multi_server import run

    sys.exit(run(ProxymapService(), sys.argv if argv is None else argv))
