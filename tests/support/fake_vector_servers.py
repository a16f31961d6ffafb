"""Fake tcp_table, socketmap and memcache servers for the network rows of the vectors.

NAME
    fake_vector_servers -- FAKE backends on 127.0.0.1:19601-19603, answering per key

SYNOPSIS
    with FakeVectorServers(wire_log=path):
        ...  # tcp:127.0.0.1:19601, socketmap:inet:127.0.0.1:19602:mymap, memcache.cf

DESCRIPTION
    These are fakes, not servers: each one answers a fixed reply per key, chosen so that
    the tcp, socketmap and memcache rows of tests/vectors/vectors.tsv see what the real
    Postfix 3.7.11 client saw when the rows were recorded. The ports and the reply for
    every key are part of that recording (the map specs name the ports), so they must not
    change.

    tcp_table(5), port 19601
        request ``get KEY\\n`` (KEY %XX-encoded). A fixed reply for the keys in
        TCP_REPLIES; a key starting with ``echo`` comes back found, as ``[KEY]``;
        anything else is ``500 no``.

    socketmap, port 19602
        netstring requests ``NAME KEY``. Fixed replies for the keys in SOCKETMAP_REPLIES;
        ``echo...`` answers ``OK name=[NAME] key=[KEY]``; ``badnetstring`` gets bytes that
        are no netstring, ``close`` a closed connection; anything else ``NOTFOUND``.

    memcache, port 19603
        get/set/delete on a store that starts as MEMCACHE_START every time the fakes
        start (the memcache-backup.cf rows store entries: they assume a fresh store);
        ``test:servererror`` answers SERVER_ERROR.

    The fakes run on their own event loop in a daemon thread of the test process. Every
    request is appended (as repr of the bytes) to the wire log when one is given.

    ``ports=(0, 0, 0)`` makes them listen on free ports instead, for a test that rewrites
    the map specs (``on_own_ports``) and so need not wait for another test process
    holding the recorded ones (see tests/support/vectors.py, fake_servers).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TextIO

HOST = "127.0.0.1"
TCP_PORT = 19601
SOCKETMAP_PORT = 19602
MEMCACHE_PORT = 19603
PORTS = (TCP_PORT, SOCKETMAP_PORT, MEMCACHE_PORT)

# Reply lines (as sent, %XX-encoded where needed) for the tcp rows of vectors.tsv.
TCP_REPLIES = {
    b"found": b"200 value%20with%20spaces",
    b"empty": b"200 ",
    b"nospace": b"200",
    b"notfound": b"500 not%20found",
    b"notfound-badhex": b"500 %zz",
    b"temp": b"400 try%20later",
    b"weird": b"600 strange",
    b"malformed": b"20 x",
    b"badhex": b"200 %zz",
    b"long": b"200 " + b"x" * 5000,
    b"tab": b"200 a\tb",
}
TCP_OTHER = b"500 no"

# Netstring payloads for the socketmap rows of vectors.tsv.
SOCKETMAP_REPLIES = {
    b"found": b"OK value with spaces",
    b"okbare": b"OK",
    b"okempty": b"OK ",
    b"notfound": b"NOTFOUND ",
    b"notfoundbare": b"NOTFOUND",
    b"temp": b"TEMP database down",
    b"timeout": b"TIMEOUT",
    b"perm": b"PERM bad config",
    b"weird": b"WHAT ever",
    b"lowerok": b"ok x",
}
SOCKETMAP_OTHER = b"NOTFOUND "

# The memcache store when the fakes start (memcache.cf uses key_format test:%s).
MEMCACHE_START = {b"test:found": b"memcache value", b"test:empty": b""}

_ESCAPED = re.compile(rb"%([0-9A-Fa-f]{2})")


def tcp_encode(data: bytes) -> bytes:
    """tcp_table(5) encoding: printable ASCII except '%' as is, other bytes as %XX."""
    return b"".join(
        bytes([byte]) if 0x21 <= byte <= 0x7E and byte != 0x25 else b"%%%02X" % byte
        for byte in data
    )


def tcp_decode(data: bytes) -> bytes:
    """Undo %XX escapes (a '%' not followed by two hex digits stays as it is)."""
    return _ESCAPED.sub(lambda match: bytes([int(match.group(1), 16)]), data)


def tcp_reply(key: bytes) -> bytes:
    if key in TCP_REPLIES:
        return TCP_REPLIES[key]
    if key.startswith(b"echo"):
        return b"200 " + tcp_encode(b"[" + key + b"]")
    return TCP_OTHER


def socketmap_reply(name: bytes, key: bytes) -> bytes:
    if key in SOCKETMAP_REPLIES:
        return SOCKETMAP_REPLIES[key]
    if key.startswith(b"echo"):
        return b"OK name=[" + name + b"] key=[" + key + b"]"
    return SOCKETMAP_OTHER


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class FakeVectorServers:
    """The three fakes, started by ``start()`` (or ``with``), stopped by ``stop()``."""

    def __init__(
        self,
        wire_log: str | os.PathLike | None = None,
        host: str = HOST,
        ports: tuple[int, int, int] = PORTS,
    ) -> None:
        self.host = host
        # (tcp, socketmap, memcache); 0 = any free port, the one taken replaces it on start.
        self.ports = ports
        self.wire_log = Path(wire_log) if wire_log is not None else None
        self.memcache: dict[bytes, bytes] = {}
        self._log: TextIO | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: list[asyncio.Server] = []

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> FakeVectorServers:
        """Listen on all three ports or raise OSError (for instance: port in use)."""
        self.memcache = dict(MEMCACHE_START)
        if self.wire_log is not None:
            self._log = open(self.wire_log, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._listen())
        except BaseException:
            self._shutdown()
            raise
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fake-vector-servers", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        if self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._thread = None
        self._shutdown()

    def __enter__(self) -> FakeVectorServers:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    async def _listen(self) -> None:
        taken = []
        for handler, port in zip(
            (self._tcp, self._socketmap, self._memcache), self.ports, strict=True
        ):
            server = await asyncio.start_server(
                self._guarded(handler), self.host, port, reuse_address=True
            )
            self._servers.append(server)
            taken.append(server.sockets[0].getsockname()[1])
        self.ports = (taken[0], taken[1], taken[2])

    def on_own_ports(self, spec: str) -> str:
        """SPEC (a map naming the recorded ports) with the ports these fakes listen on."""
        for recorded, own in zip(PORTS, self.ports, strict=True):
            spec = spec.replace(f"{self.host}:{recorded}", f"{self.host}:{own}")
        return spec

    def _shutdown(self) -> None:
        loop = self._loop
        assert loop is not None
        for server in self._servers:
            server.close()
        with contextlib.suppress(Exception):
            loop.run_until_complete(self._close_servers())
            pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()
        self._loop = None
        self._servers = []
        if self._log is not None:
            self._log.close()
            self._log = None

    async def _close_servers(self) -> None:
        for server in self._servers:
            await server.wait_closed()

    # --- the fakes -----------------------------------------------------------------------

    def _record(self, kind: str, data: bytes) -> None:
        if self._log is not None:
            self._log.write(f"{kind} {data!r}\n")

    def _guarded(self, handler: Handler) -> Handler:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await handler(reader, writer)
            except (
                ConnectionError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                ValueError,
            ) as exc:
                self._record("ERROR", repr(exc).encode())
            finally:
                writer.close()

        return run

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            self._record("TCP", line)
            if not (line.startswith(b"get ") and line.endswith(b"\n")):
                return
            writer.write(tcp_reply(tcp_decode(line[4:-1])) + b"\n")
            await writer.drain()

    async def _socketmap(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                length = await reader.readuntil(b":")
            except asyncio.IncompleteReadError:
                return  # the client closed between requests
            payload = await reader.readexactly(int(length[:-1]) + 1)
            self._record("SM", length + payload)
            if payload[-1:] != b",":
                return
            name, _, key = payload[:-1].partition(b" ")
            if key == b"badnetstring":
                writer.write(b"garbage")
                await writer.drain()
                return
            if key == b"close":
                return
            reply = socketmap_reply(name, key)
            writer.write(b"%d:%s," % (len(reply), reply))
            await writer.drain()

    async def _memcache(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            self._record("MC", line)
            words = line.split()
            command = words[0] if words else b""
            if command == b"get" and len(words) >= 2:
                key = words[1]
                if key == b"test:servererror":
                    writer.write(b"SERVER_ERROR out of memory\r\n")
                elif key in self.memcache:
                    value = self.memcache[key]
                    writer.write(b"VALUE %s 0 %d\r\n%s\r\nEND\r\n" % (key, len(value), value))
                else:
                    writer.write(b"END\r\n")
            elif command == b"set" and len(words) >= 5:
                data = await reader.readexactly(int(words[4]) + 2)
                self._record("MCDATA", data)
                self.memcache[words[1]] = data[:-2]
                writer.write(b"STORED\r\n")
            elif command == b"delete" and len(words) >= 2:
                found = self.memcache.pop(words[1], None) is not None
                writer.write(b"DELETED\r\n" if found else b"NOT_FOUND\r\n")
            else:
                writer.write(b"ERROR\r\n")
            await writer.drain()
