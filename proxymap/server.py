"""The proxymap(8) / proxywrite service, run by the multi-server skeleton.

NAME
    proxymap -- Postfix lookup table proxy server (read-only and read-write services)

SYNOPSIS
    proxymap [generic Postfix daemon options]          (started by master(8))
    proxymap -S [-n proxymap|proxywrite]  < request   (one request on stdin/stdout)
    proxymap -S -n export-proxy-proxymap < /dev/null  (list the approved tables)
    proxymap -S -n connections-proxymap < /dev/null   (their connection bounds)

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
    ``proxymap-master status`` multiplies by the process limit.

    Hooks, in the skeleton's order (``master.service``):

    pre_init
        checks the service name, computes the approved set (before the privilege
        drop, so that root-only ``/file/name`` lists are readable, as in 3.11+),
        imports the modules of the approved table types while still root, and
        for proxywrite leaves the master's process group (``setsid``) so that
        ``postfix stop`` cannot interrupt an update half-way.
    post_init
        creates the request handler (tables are opened on first use, as mail_owner).
    pre_accept
        read-only service only: when a table file changed since it was opened, logs
        ``table <name> has changed -- restarting`` and exits 0 without accepting;
        the waiting client is accepted by a fresh process.

    ``-S``: one request is read from stdin and answered on stdout, without the
    announcement; a slow table is awaited on a private event loop.

SEE ALSO
    proxymap.connection (one client), proxymap.handler (one request),
    ../shared/spec/PROTOCOLS.md sections 2 and 4.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO

from master.log import fatal
from proxymap import attr
from proxymap.approval import approved_tables
from proxymap.connection import ProxymapProtocol
from proxymap.handler import RequestHandler
from proxymap.protocol import (
    BAD_REPLIES,
    RETRY,
    STANDALONE_STREAM,
    Reply,
    Request,
    encode_reply,
    parse_request,
    reply_to_truncated,
    stream_name,
)
from proxymap.tables import TABLE_TYPES, table_class
from proxymap.tables.base import DictOpenError
from proxymap.tables.pool import connection_limit

if TYPE_CHECKING:
    from master.multi_server import MultiServer

log = logging.getLogger("proxymap")

READER, WRITER = "proxymap", "proxywrite"
EXPORT_PREFIXES = (("export-proxy-", False), ("export-all-", True))
CONNECTIONS_PREFIX = "connections-"


class ServiceNameError(ValueError):
    """The service name is neither proxymap nor proxywrite."""


def parse_service_name(name: str) -> tuple[str, bool | None]:
    """(proxymap|proxywrite, export mode): export mode None, False (proxy) or True (all)."""
    export: bool | None = None
    for prefix, export_all in EXPORT_PREFIXES:
        if name.startswith(prefix):
            name, export = name[len(prefix):], export_all
            break
    if name not in (READER, WRITER):
        raise ServiceNameError(
            f'invalid service name: "{name}" - service name must be "proxywrite" or "proxymap"')
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

    # --- skeleton hooks ----------------------------------------------------------------------
    def pre_init(self, server: MultiServer) -> None:
        report_connections = server.service_name.startswith(CONNECTIONS_PREFIX)
        service_name = server.service_name.removeprefix(CONNECTIONS_PREFIX)
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
            server.exit(0)
            raise SystemExit(0)
        if export is not None:
            out = sys.stdout
            for name in sorted_bytewise(set(approved)):
                out.write(name + "\n")
            out.flush()
            server.exit(0)
            raise SystemExit(0)
        self.approved = frozenset(approved)
        preload_table_modules(self.approved)
        if self.service_name == WRITER:
            # Leave the master's process group: "postfix stop" signals that group, and a
            # writer must only ever stop between requests (on the status-fd EOF).
            try:
                os.setsid()
            except OSError:
                pass  # already a session leader (e.g. started by hand)

    def post_init(self, server: MultiServer) -> None:
        self.handler = RequestHandler(self.service_name, self.approved, server.config)

    def pre_accept(self, server: MultiServer) -> None:
        if self.service_name != READER or self.handler is None:
            return
        changed = self.handler.changed_table()
        if changed is not None:
            log.info("table %s has changed -- restarting", changed)
            server.exit(0)

    def protocol_factory(self, server: MultiServer) -> Callable[[], asyncio.Protocol]:
        handler = self.handler
        stream = stream_name(self.service_name)

        def new_connection() -> ProxymapProtocol:
            return ProxymapProtocol(server, handler, stream)

        return new_connection

    def serve_standalone(self, server: MultiServer, infile: BinaryIO, outfile: BinaryIO) -> None:
        reply = answer_one(self.handler, read_one_request(infile))
        if reply is not None:
            outfile.write(reply)
            outfile.flush()


_TYPE_REFERENCE = re.compile(r"([A-Za-z0-9_]+):")


def connection_bounds(approved, params) -> list[tuple[str, int]]:
    """(table, most connections one worker opens for it), for tables that open any."""
    bounds = []
    for name in sorted_bytewise(set(approved)):
        limits = [connection_limit(match.group(1), params)
                  for match in _TYPE_REFERENCE.finditer(name)]
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


# --- stand-alone mode (-S) -------------------------------------------------------------------
def read_one_request(infile: BinaryIO) -> attr.Pairs | bytes | None:
    """The first list on ``infile``; or the reply to a cut-short one; None at plain EOF."""
    decoder = attr.AttrDecoder()
    try:
        fd = infile.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    while True:
        data = os.read(fd, 65536) if fd is not None else infile.read(65536)
        if not data:
            if not decoder.pending:
                return None  # end of input before any byte: silence, as Postfix
            where = decoder.reading
            if decoder.in_field:
                log.warning("unexpected end-of-input from %s while reading input attribute %s",
                            STANDALONE_STREAM, where)
            else:
                log.warning("premature end-of-input on %s while reading input attribute %s",
                            STANDALONE_STREAM, where)
            return reply_to_truncated(decoder.pairs_so_far, decoder.pending_name)
        try:
            lists = decoder.feed(data)
        except attr.AttrTooLarge as exc:
            if exc.complete:
                return exc.complete[0]
            return reply_to_truncated(exc.partial)
        if lists:
            return lists[0]


def answer_one(handler: RequestHandler, received: attr.Pairs | bytes | None) -> bytes | None:
    """Handle one received list in stand-alone mode; the encoded reply, or None."""
    if received is None or received.__class__ is bytes:
        return received
    parsed = parse_request(received, STANDALONE_STREAM)
    if parsed.__class__ is not Request:
        return parsed
    try:
        result = handler.handle(parsed)
        if result.__class__ is not Reply:
            result = _await_privately(result)
    except Exception as exc:  # noqa: BLE001 - a handler bug still gets an answer
        log.error("%s request for %s failed: %r", parsed.op, parsed.table, exc, exc_info=exc)
        result = Reply(RETRY)
    if result.__class__ is not Reply:
        return BAD_REPLIES[parsed.op, parsed.generation]
    return encode_reply(parsed.op, parsed.generation, result)


def _await_privately(awaitable) -> Reply:
    async def wait() -> Reply:
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
