"""tcp and socketmap clients against small real servers run by the test itself.

Servers misbehave on purpose (hang, close mid-reply, garbage, refuse): every such case
must be RETRY, never "not found", and a hanging lookup must not hold up any other
lookup on the same event loop, of the same table or of another one.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from proxymap import flags as F
from proxymap.tables import open_table
from proxymap.tables.base import AsyncTable, DictConfig, DictRetry, OpenContext, SurrogateTable
from proxymap.tables.pipemap import open_pipemap
from proxymap.tables.socketmap import SocketmapTable
from proxymap.tables.tcp import TcpTable
from proxymap.tables.unionmap import open_unionmap

SHORT = {
    "pyproxymap_tcp_timeout": "0.3",
    "pyproxymap_tcp_max_tries": "2",
    "pyproxymap_tcp_retry_delay": "0.05",
    "pyproxymap_socketmap_timeout": "0.3",
}


def context(params=SHORT) -> OpenContext:
    ctx = OpenContext(params=dict(params))
    ctx.open_table = lambda spec, mode, flags: open_table(spec, mode, flags, ctx)
    return ctx


# --- servers -----------------------------------------------------------------------------


class TcpServer:
    """tcp_table(5) server whose behaviour depends on the key."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.connections += 1
        try:
            while line := await reader.readline():
                self.requests.append(line)
                key = line[4:-1]
                if key == b"hang":
                    await asyncio.sleep(30)
                elif key == b"midreply":
                    writer.write(b"20")
                    await writer.drain()
                    break
                elif key == b"garbage":
                    writer.write(b"\x00\xffnonsense\n")
                elif key.startswith(b"slow"):
                    await asyncio.sleep(0.2)
                    writer.write(b"200 " + key + b"\n")
                elif key == b"long":
                    writer.write(b"200 " + b"x" * 5000 + b"\n")
                elif key == b"temp":
                    writer.write(b"400 busy\n")
                elif key == b"miss":
                    writer.write(b"500 no\n")
                else:
                    writer.write(b"200 " + key + b"%21\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


class SocketmapServer:
    def __init__(self) -> None:
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.connections += 1
        try:
            while True:
                length = await reader.readuntil(b":")
                body = await reader.readexactly(int(length[:-1]) + 1)
                name, _, key = body[:-1].partition(b" ")
                if key == b"hang":
                    await asyncio.sleep(30)
                    continue
                if key == b"midreply":
                    writer.write(b"20:OK par")
                    await writer.drain()
                    break
                if key == b"garbage":
                    writer.write(b"garbage,")
                    await writer.drain()
                    break
                if key == b"closeidle":
                    break  # closes without answering: the client retries once
                if key.startswith(b"slow"):
                    await asyncio.sleep(0.2)
                reply = {
                    b"perm": b"PERM no",
                    b"temp": b"TEMP later",
                    b"bare": b"OK",
                    b"miss": b"NOTFOUND ",
                }.get(key, b"OK " + name + b"/" + key)
                writer.write(b"%d:%s," % (len(reply), reply))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError, ValueError):
            pass
        finally:
            writer.close()


async def start(handler) -> tuple[asyncio.AbstractServer, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


# --- tcp ------------------------------------------------------------------------------


def test_tcp_answers_and_failures():
    async def scenario():
        fake = TcpServer()
        server, port = await start(fake.handle)
        table = TcpTable(f"127.0.0.1:{port}", os.O_RDONLY, 0, context())
        assert table.asynchronous and table.flags == F.PATTERN
        assert await table.alookup(b"a b%") == b"a b%!"
        assert fake.requests[0] == b"get a%20b%25\n"
        assert await table.alookup(b"miss") is None
        for key in (b"hang", b"midreply", b"garbage", b"long", b"temp"):
            started = time.monotonic()
            with pytest.raises(DictRetry):
                await table.alookup(key)
            assert time.monotonic() - started < 2
        assert await table.alookup(b"after") == b"after!"  # recovered on a new connection
        table.flags |= F.FOLD_MUL
        assert await table.alookup(b"UP") == b"up!"
        server.close()
        table.close()

    run(scenario())


def test_tcp_dead_server_is_retry_not_found():
    async def scenario():
        server, port = await start(TcpServer().handle)
        server.close()
        await server.wait_closed()
        table = TcpTable(f"127.0.0.1:{port}", os.O_RDONLY, 0, context())
        with pytest.raises(DictRetry):
            await table.alookup(b"x")

    run(scenario())


def test_tcp_and_socketmap_refuse_no_unauth_and_read_write():
    ctx = context()
    for spec in ("tcp:127.0.0.1:1", "socketmap:inet:127.0.0.1:1:m"):
        assert isinstance(open_table(spec, os.O_RDONLY, F.NO_UNAUTH, ctx), SurrogateTable)
        assert isinstance(open_table(spec, os.O_RDWR, 0, ctx), SurrogateTable)
    assert isinstance(open_table("socketmap:inet:127.0.0.1:1", 0, 0, ctx), SurrogateTable)
    assert isinstance(open_table("socketmap:bogus:x:m", 0, 0, ctx), SurrogateTable)


@pytest.mark.serial
def test_tcp_hanging_lookup_does_not_block_others():
    async def scenario():
        fake = TcpServer()
        server, port = await start(fake.handle)
        params = dict(SHORT, pyproxymap_tcp_timeout="1", pyproxymap_tcp_max_tries="1")
        table = TcpTable(f"127.0.0.1:{port}", os.O_RDONLY, 0, context(params))
        other = TcpTable(f"127.0.0.1:{port}", os.O_RDONLY, 0, context(params))
        hanging = asyncio.create_task(table.alookup(b"hang"))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        answers = await asyncio.gather(
            *(table.alookup(b"slow%d" % n) for n in range(5)), other.alookup(b"quick")
        )
        elapsed = time.monotonic() - started
        assert answers == [b"slow%d" % n for n in range(5)] + [b"quick!"]
        assert elapsed < 1.0, "slow lookups ran one after another"
        assert not hanging.done()
        with pytest.raises(DictRetry):
            await hanging
        server.close()

    run(scenario())


# --- socketmap --------------------------------------------------------------------------


def test_socketmap_answers_and_failures(tmp_path):
    async def scenario():
        fake = SocketmapServer()
        server, port = await start(fake.handle)
        table = SocketmapTable(f"inet:127.0.0.1:{port}:mymap", os.O_RDONLY, 0, context())
        assert table.asynchronous and table.flags == F.PATTERN
        assert await table.alookup(b"key with spaces") == b"mymap/key with spaces"
        assert await table.alookup(b"bare") is None
        assert await table.alookup(b"miss") is None
        with pytest.raises(DictConfig):
            await table.alookup(b"perm")
        with pytest.raises(DictRetry):
            await table.alookup(b"temp")
        for key in (b"hang", b"midreply", b"garbage"):
            started = time.monotonic()
            with pytest.raises(DictRetry):
                await table.alookup(key)
            assert time.monotonic() - started < 2
        before = fake.connections
        with pytest.raises(DictRetry):  # closed twice before a reply: retried once only
            await table.alookup(b"closeidle")
        assert fake.connections - before == 2
        assert await table.alookup(b"ok") == b"mymap/ok"
        server.close()

        unix_path = str(tmp_path / "sm.sock")
        unix_server = await asyncio.start_unix_server(SocketmapServer().handle, unix_path)
        local = SocketmapTable(f"unix:{unix_path}:other", os.O_RDONLY, 0, context())
        assert await local.alookup(b"k") == b"other/k"
        unix_server.close()

    run(scenario())


@pytest.mark.serial
def test_socketmap_slow_backend_does_not_serialize_clients():
    async def scenario():
        server, port = await start(SocketmapServer().handle)
        params = dict(SHORT, pyproxymap_socketmap_timeout="1")
        one = SocketmapTable(f"inet:127.0.0.1:{port}:one", os.O_RDONLY, 0, context(params))
        two = SocketmapTable(f"inet:127.0.0.1:{port}:two", os.O_RDONLY, 0, context(params))
        hanging = asyncio.create_task(one.alookup(b"hang"))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        answers = await asyncio.gather(
            *(one.alookup(b"slow%d" % n) for n in range(6)), two.alookup(b"fast")
        )
        assert time.monotonic() - started < 1.0
        assert answers == [b"one/slow%d" % n for n in range(6)] + [b"two/fast"]
        with pytest.raises(DictRetry):
            await hanging
        server.close()

    run(scenario())


def test_composite_with_network_member_is_asynchronous():
    async def scenario():
        server, port = await start(SocketmapServer().handle)
        ctx = context()
        union = open_unionmap(
            f"{{socketmap:inet:127.0.0.1:{port}:u, randmap:{{r}}}}", os.O_RDONLY, 0, ctx
        )
        assert isinstance(union, AsyncTable) and union.flags & F.PATTERN
        assert await union.alookup(b"k") == b"u/k,r"
        pipe = open_pipemap(
            f"{{randmap:{{mid}}, socketmap:inet:127.0.0.1:{port}:p}}", os.O_RDONLY, 0, ctx
        )
        assert await pipe.alookup(b"any") == b"p/mid"
        failing = open_pipemap(
            f"{{randmap:{{temp}}, socketmap:inet:127.0.0.1:{port}:p}}", os.O_RDONLY, 0, ctx
        )
        with pytest.raises(DictRetry):
            await failing.alookup(b"any")
        server.close()

    run(scenario())
