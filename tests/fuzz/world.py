"""Fuzz target for a whole connection: bytes in -> bytes out, with real tables behind it.

NAME
    world -- the proxymap and proxywrite services of one worker, fed from fuzz input

SYNOPSIS
    world = World(Path("/dev/shm/fuzz"))
    world.one_input(data)          # raises PropertyViolation or HangError on a bug
    world.close()

DESCRIPTION
    The connection code (``proxymap.connection.ProxymapProtocol``) and the request
    handler are the worker's own; only the socket is replaced by an in-memory
    transport that honours ``pause_reading`` as a real one does (no data is delivered
    while the protocol does not read) and closes like one (``connection_lost`` on the
    next loop iteration). The tables are real files and servers: texthash, hash,
    btree, lmdb, cdb (built with the table drivers themselves), regexp, pcre, cidr,
    inline, static, fail, a missing hash file (a surrogate), unionmap/pipemap, and a
    socketmap server on the same event loop (the asynchronous path: the reply waits
    for the server while later requests queue behind it). The proxywrite service
    has writable btree, hash and lmdb tables.

    The first input byte chooses the service (bit 0), whether the client half-closes
    at the end (bit 1), and whether the kernel "fills up" after the first chunk
    (bit 2: ``pause_writing`` then ``resume_writing``); the next two bytes choose
    where to split; the rest is what the client sends. Each input is sent three
    times, to three identical worlds: whole, split at one point, and cut in small
    pieces (one byte each when short). Properties:

    * nothing raises out of the protocol, no unexpected error is logged (an
      exception that the protocol or handler caught and turned into RETRY is a bug
      here), nothing is written after the transport was closed, TAKEN and AVAIL
      balance;
    * every list that starts with ``request`` gets exactly one reply, in order,
      shaped for its request and generation; a request cut short by the half-close
      gets one BAD reply; the output is the announcement and complete lists only;
    * at the end the connection is closed if the client half-closed or left a request
      incomplete (after the 1-second deadline, by a virtual clock), open otherwise;
    * the three deliveries give the same bytes and the same end state (the
      differential property: chunking never changes an answer). The three worlds
      see the same requests in the same order, so even writes keep them identical.

    A request that does not finish within ``HANG_SECONDS`` of real time is a hang.
    Every ``RENEW_EVERY`` inputs the worlds are rebuilt (fresh files and handlers), so
    that files and table instances cannot grow without bound during a long run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import time
from pathlib import Path

from proxymap import attr
from proxymap import protocol as P
from proxymap.connection import ProxymapProtocol
from proxymap.handler import RequestHandler
from proxymap.tables import open_table
from proxymap.tables.cdb import write_cdb
from tests.fuzz.targets import PropertyViolation, check_reply, expected_op, require

HANG_SECONDS = 10.0
RENEW_EVERY = 5000
#: A small list limit, so that the oversized-list path is reachable by small inputs.
FUZZ_LIST_LIMIT = 2048
ALIASES = {b"alice": b"alice@example.com", b"bob": b"bob@example.com", b"a": b"1", b"": b"e"}

#: Approved names (relative: each world serves the same names from its own directory).
READ_TABLES = (
    "texthash:a",
    "hash:h",
    "btree:b",
    "lmdb:a",
    "cdb:a",
    "regexp:r",
    "pcre:p",
    "cidr:c",
    "inline:{a=1,b=2}",
    "static:s",
    "fail:f",
    "hash:missing",
    "unionmap:{hash:h,inline:{a=2}}",
    "pipemap:{inline:{a=b},inline:{b=c}}",
)
WRITE_TABLES = ("btree:w", "hash:x", "lmdb:w", "texthash:a", "inline:{a=1}")
SOCKETMAP = "socketmap:unix:{dir}/sm:m"
ASYNC_UNION = "unionmap:{{socketmap:unix:{dir}/sm:m,inline:{{a=1}}}}"


class HangError(AssertionError):
    """A request was not answered (or a connection not closed) in time."""


class _Unexpected(logging.Handler):
    """Collects log records that reveal a caught bug: an exception's traceback."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if (
            record.exc_info
            or "failed:" in record.getMessage()
            or "handler returned" in record.getMessage()
        ):
            self.records.append(record)


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock the harness can move forward (the 1-second deadline)."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = 0.0

    def time(self) -> float:
        return super().time() + self.offset


class MemoryTransport(asyncio.Transport):
    """What the protocol writes, and the reading/closing states a socket would have."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.protocol: ProxymapProtocol | None = None
        self.output = bytearray()
        self.reading = True
        self.closed = False
        self.late_writes = 0

    def write(self, data: bytes) -> None:
        if self.closed:
            self.late_writes += 1
            return
        self.output += data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading and not self.closed

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name, default=None):
        return default


class Skeleton:
    """What MultiServer gives a protocol: TAKEN/AVAIL and connection counts."""

    ipc_timeout = 3600

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.busy = 0
        self.connections = 0

    def _connection_made(self, protocol) -> None:
        self.connections += 1

    def _connection_lost(self, protocol) -> None:
        self.connections -= 1

    def request_started(self) -> None:
        self.busy += 1

    def request_done(self) -> None:
        self.busy -= 1


# --- table files --------------------------------------------------------------------------


def _write_indexed(spec: str, entries: dict[bytes, bytes]) -> None:
    table = open_table(spec, os.O_RDWR | os.O_CREAT, 0, _context())
    for key, value in entries.items():
        if key:
            table.update(key, value)
    table.close()


def _context():
    from proxymap.tables.base import OpenContext

    return OpenContext(params={})


def make_tables(directory: Path) -> None:
    """The files every world serves, in ``directory`` (the worker's cwd while it runs)."""
    directory.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        Path("a").write_bytes(b"".join(k + b" " + v + b"\n" for k, v in ALIASES.items() if k))
        for spec in ("hash:h", "btree:b", "lmdb:a", "btree:w", "hash:x", "lmdb:w"):
            _write_indexed(spec, ALIASES)
        write_cdb("a.cdb", [(k, v) for k, v in ALIASES.items() if k])
        Path("r").write_text("/^a(.*)$/ A$1\n/b/ B\nif /c/\n/d/ CD\nendif\n")
        Path("p").write_text("/^a(.*)$/ A$1\n/\\x00|b/ B\n")
        Path("c").write_text("127.0.0.0/8 L\n::1/128 L6\n0.0.0.0/0 ANY\n")
    finally:
        os.chdir(cwd)


# --- the socketmap server -----------------------------------------------------------------


async def _socketmap_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers by the key's first byte: t TEMP, p PERM, n NOTFOUND, else OK (echo)."""
    try:
        while True:
            head = await reader.readuntil(b":")
            payload = await reader.readexactly(int(head[:-1]))
            await reader.readexactly(1)
            key = payload.partition(b" ")[2]
            first = key[:1]
            answer = {b"t": b"TEMP busy", b"p": b"PERM no", b"n": b"NOTFOUND"}.get(
                first, b"OK sm:" + key
            )
            writer.write(b"%d:%s," % (len(answer), answer))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


# --- one world: a handler per service, in its own directory -------------------------------


class Replica:
    """One copy of the worker's state: its directory and its two services' handlers."""

    def __init__(self, directory: Path, extra: tuple[str, ...]) -> None:
        self.directory = directory
        make_tables(directory)
        params = {"pyproxymap_socketmap_timeout": "5"}
        self.handlers = {
            "proxymap": RequestHandler("proxymap", READ_TABLES + extra, params),
            "proxywrite": RequestHandler("proxywrite", WRITE_TABLES, params),
        }

    def close(self) -> None:
        os.chdir(self.directory)  # the table names are relative to it
        for handler in self.handlers.values():
            handler.close()
            for instance in handler._instances.values():  # test code: free the files
                instance.table.close()
            handler._instances.clear()
        os.chdir(self.directory.parent)
        shutil.rmtree(self.directory, ignore_errors=True)


class World:
    """Three identical replicas, each fed one delivery of every input."""

    def __init__(self, base: Path) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.loop = VirtualClockLoop()
        asyncio.set_event_loop(self.loop)
        self.unexpected = _Unexpected()
        logger = logging.getLogger("proxymap")
        # Restored by close() (the pytest replay shares the process with other tests).
        self._saved = (os.getcwd(), logger.level, logger.propagate)
        logger.addHandler(self.unexpected)
        logger.setLevel(logging.ERROR)
        logger.propagate = False
        self.server = self.loop.run_until_complete(
            asyncio.start_unix_server(_socketmap_session, str(base / "sm"))
        )
        #: The approved names that depend on where the world is (the socketmap server).
        self.extra_tables = (SOCKETMAP.format(dir=base), ASYNC_UNION.format(dir=base))
        self.generation = 0
        self.count = 0
        self.replicas: list[Replica] = []
        self._renew()

    def _renew(self) -> None:
        os.chdir(self.base)  # not inside a directory about to be removed
        for replica in self.replicas:
            replica.close()
        self.generation += 1
        self.replicas = [
            Replica(self.base / f"g{self.generation}r{i}", self.extra_tables) for i in range(3)
        ]

    def close(self) -> None:
        os.chdir(self.base.parent)
        for replica in self.replicas:
            replica.close()
        self.server.close()
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(self.server.wait_closed())
        self.loop.close()
        asyncio.set_event_loop(None)
        logger = logging.getLogger("proxymap")
        logger.removeHandler(self.unexpected)
        cwd, logger.level, logger.propagate = self._saved
        os.chdir(cwd)
        shutil.rmtree(self.base, ignore_errors=True)

    # --- one input ------------------------------------------------------------------------
    def one_input(self, data: bytes) -> None:
        if len(data) < 3:
            return
        self.count += 1
        if self.count % RENEW_EVERY == 0:
            self._renew()
        control, seed, payload = data[0], data[1:3], data[3:]
        service = "proxywrite" if control & 1 else "proxymap"
        eof, squeeze = bool(control & 2), bool(control & 4)
        cut = int.from_bytes(seed, "big") % (len(payload) + 1)
        deliveries = (
            [payload],
            [payload[:cut], payload[cut:]],
            _small_pieces(payload, seed),
        )
        results = []
        for replica, chunks in zip(self.replicas, deliveries, strict=True):
            os.chdir(replica.directory)
            handler = replica.handlers[service]
            results.append(
                self.loop.run_until_complete(self._converse(handler, chunks, eof, squeeze))
            )
        whole = results[0]
        require(results[1] == whole, f"split at {cut} answers differently", whole, results[1])
        require(results[2] == whole, "small pieces answer differently", whole, results[2])
        check_output(payload, eof, *whole)

    async def _converse(
        self, handler: RequestHandler, chunks: list[bytes], eof: bool, squeeze: bool
    ) -> tuple[bytes, bool]:
        loop = self.loop
        skeleton = Skeleton(loop)
        transport = MemoryTransport(loop)
        protocol = ProxymapProtocol(skeleton, handler, P.stream_name(handler.service_name))
        protocol.decoder.limit = FUZZ_LIST_LIMIT
        transport.protocol = protocol
        protocol.connection_made(transport)
        for index, chunk in enumerate(chunks):
            if not chunk:
                continue
            await self._until_readable(transport)
            if transport.closed:
                break
            protocol.data_received(chunk)
            if squeeze and index == 0:
                protocol.pause_writing()  # the kernel took nothing more...
                await asyncio.sleep(0)
                protocol.resume_writing()  # ...and then all of it
        await self._until_readable(transport, protocol)
        if eof and not transport.closed and not protocol.eof_received():
            transport.close()
        await self._until_readable(transport, protocol)
        if not transport.closed and protocol.decoder.pending:
            loop.offset += 1.5  # past the 1-second request deadline
            for _ in range(3):
                await asyncio.sleep(0)
            require(transport.closed, "incomplete request survived its deadline")
        closed = transport.closed
        if not closed:
            transport.close()  # the client goes away
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        require(skeleton.busy == 0, "TAKEN/AVAIL unbalanced", skeleton.busy)
        require(skeleton.connections == 0, "connection not counted closed")
        require(transport.late_writes == 0, "written after close")
        if self.unexpected.records:
            records, self.unexpected.records = self.unexpected.records, []
            raise PropertyViolation("unexpected error logged: " + records[0].getMessage())
        return bytes(transport.output), closed

    async def _until_readable(
        self, transport: MemoryTransport, protocol: ProxymapProtocol | None = None
    ) -> None:
        """Wait while the transport is paused (it delivers nothing until resumed); with
        ``protocol``, also until its slow requests are answered (a client that waits
        for its replies is read from meanwhile)."""
        started = time.monotonic()
        while not transport.closed and (
            not transport.reading or (protocol is not None and protocol._slow is not None)
        ):
            if time.monotonic() - started > HANG_SECONDS:
                raise HangError("reading stayed paused")
            await asyncio.sleep(0.0005)


def _small_pieces(payload: bytes, seed: bytes) -> list[bytes]:
    if len(payload) <= 64:
        return [payload[i : i + 1] for i in range(len(payload))]
    rng = random.Random(seed)
    out, start = [], 0
    while start < len(payload):
        end = start + rng.randint(1, 16)
        out.append(payload[start:end])
        start = end
    return out


def check_output(payload: bytes, eof: bool, output: bytes, closed: bool) -> None:
    """The replies a client sending ``payload`` must get, by shape and number."""
    require(output.startswith(P.ANNOUNCEMENT), "no announcement first", output[:40])
    decoder = attr.AttrDecoder(FUZZ_LIST_LIMIT)
    oversized = False
    try:
        requests = decoder.feed(payload)
    except attr.AttrTooLarge as exc:
        requests, oversized = exc.complete, True
    rest = attr.AttrDecoder()
    replies = rest.feed(output[len(P.ANNOUNCEMENT) :])
    require(not rest.pending, "output ends inside a list", output[-40:])
    due = [(pairs, op) for pairs in requests for wanted, op in [expected_op(pairs)] if wanted]
    require(len(replies) >= len(due), "a request got no reply", len(due), len(replies))
    for (pairs, op), reply in zip(due, replies, strict=False):
        check_reply(op, _generation(pairs), reply)
    extra = replies[len(due) :]
    require(len(extra) <= 1, "more replies than requests", extra)
    if extra:
        # The answer to a request cut short (half-close or oversized list): BAD or status 3.
        require(eof or oversized, "an unsolicited reply", extra)
        require(extra[0][0] == (b"status", b"3"), "truncated request not BAD", extra)
    if oversized or eof:
        require(closed, "connection left open after half-close or oversized list")
    elif decoder.pending:
        require(closed, "incomplete request left open past the deadline")
    else:
        require(not closed, "connection closed although nothing was wrong")


def _generation(pairs: attr.Pairs) -> int:
    return P.G2 if len(pairs) > 2 and pairs[2][0] == b"instance_flags" else P.G1
