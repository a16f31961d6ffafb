"""ProxymapProtocol on a real asyncio loop over socketpairs (docs/PROTOCOL.md 2.2, 2.8, 6.3).

The request handler is the real one, serving a texthash table and, for slowness, a
small asynchronous table type registered for these tests only (``slow:<seconds>``),
which answers ``slow:<key>`` after sleeping. The skeleton side is a recorder of
request_started/request_done calls.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxymap import attr
from proxymap import flags as F
from proxymap.connection import ProxymapProtocol
from proxymap.handler import RequestHandler
from proxymap.protocol import ANNOUNCEMENT, stream_name
from proxymap.tables import TABLE_TYPES
from proxymap.tables.base import STARTED, AsyncTable

ALICE_REPLY = b"status\x000\x00value\x00alice@example.com\x00\x00"


class SlowTable(AsyncTable):
    """An asynchronous table: ``slow:0.3`` answers every key after 0.3 s."""

    dict_type = "slow"

    def __init__(self, name, open_mode, flags, ctx):
        super().__init__(name, open_mode, flags | F.FIXED)
        self.delay = float(name)

    async def alookup(self, key: bytes) -> bytes | None:
        await asyncio.sleep(self.delay)
        return b"slow:" + key


class StartingSlowTable(SlowTable):
    """``SlowTable`` whose lookups start without a coroutine (``lookup_start``), as
    mysql's do: a stand-in, answering from a timer instead of a database callback."""

    starts = True

    def lookup_start(self, key: bytes, answer):
        loop = asyncio.get_running_loop()
        loop.call_later(self.delay, answer, b"slow:" + key)
        return STARTED


class RecordingServer:
    """What MultiServer gives a protocol: TAKEN/AVAIL and connection bookkeeping (recorded)."""

    ipc_timeout = 3600

    def __init__(self):
        self.events: list[str] = []
        self.busy = 0
        self.connections = 0
        self.loop = asyncio.get_event_loop()

    def _connection_made(self, protocol):
        self.connections += 1

    def _connection_lost(self, protocol):
        self.connections -= 1

    def request_started(self):
        self.busy += 1
        self.events.append("TAKEN")

    def request_done(self):
        self.busy -= 1
        self.events.append("AVAIL")


@pytest.fixture(autouse=True, params=["asyncio", "uvloop"])
def event_loop_kind(request):
    """Every connection test runs on both loops the worker may use."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    yield request.param
    asyncio.set_event_loop_policy(None)


@pytest.fixture(params=["SlowTable", "StartingSlowTable"])
def table(request, tmp_path, monkeypatch):
    """A texthash table's name; ``slow:<delay>`` tables await, or start (both)."""
    monkeypatch.setitem(TABLE_TYPES, "slow", f"tests.test_connection:{request.param}")
    path = tmp_path / "map"
    path.write_text("alice alice@example.com\nbob bob@example.com\n")
    return f"texthash:{path}"


def lookup(table: str, key: bytes, flags: bytes = b"64") -> bytes:
    return attr.encode(
        [(b"request", b"lookup"), (b"table", table.encode()), (b"flags", flags), (b"key", key)]
    )


class Client:
    """The test's end of a socketpair, read with asyncio."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self):
        self.reader, self.writer = await asyncio.open_unix_connection(sock=self.sock)

    async def send(self, data: bytes):
        self.writer.write(data)
        await self.writer.drain()

    async def read_lists(self, count: int, timeout: float = 5.0) -> list:
        decoder = attr.AttrDecoder()
        lists: list = []
        while len(lists) < count:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                break
            lists += decoder.feed(data)
        return lists

    async def read_exactly(self, size: int, timeout: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(size), timeout)

    async def read_to_eof(self, timeout: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.reader.read(), timeout)


async def connect(handler, server) -> tuple[Client, ProxymapProtocol]:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    protocol = ProxymapProtocol(server, handler, stream_name("proxymap"))
    await loop.connect_accepted_socket(lambda: protocol, ours)
    client = Client(theirs)
    await client.open()
    assert await client.read_exactly(28) == ANNOUNCEMENT
    return client, protocol


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_announcement_then_request_reply_with_taken_avail(table):
    async def main():
        server = RecordingServer()
        handler = RequestHandler("proxymap", {table}, {})
        client, _ = await connect(handler, server)
        assert server.events == []  # nothing at accept (Postfix sends status per request)
        await client.send(lookup(table, b"alice"))
        assert await client.read_exactly(len(ALICE_REPLY)) == ALICE_REPLY
        await client.send(lookup(table, b"nobody"))
        assert await client.read_exactly(17) == b"status\x001\x00value\x00\x00\x00"
        assert server.events == ["TAKEN", "AVAIL"] * 2

    run(main())


def test_slow_request_then_fast_ones_keep_order(table):
    async def main():
        server = RecordingServer()
        handler = RequestHandler("proxymap", {table, "slow:0.3"}, {})
        client, _ = await connect(handler, server)
        # Pipelined: slow, fast, fast -- the fast table could answer first, but must not.
        await client.send(
            lookup("slow:0.3", b"k1") + lookup(table, b"alice") + lookup(table, b"bob")
        )
        started = time.monotonic()
        lists = await client.read_lists(3)
        assert time.monotonic() - started >= 0.25
        assert [dict(pairs)[b"value"] for pairs in lists] == [
            b"slow:k1",
            b"alice@example.com",
            b"bob@example.com",
        ]
        assert server.events == ["TAKEN", "AVAIL"] * 3 and server.busy == 0

    run(main())


def test_requests_behind_a_started_lookup_keep_order(table):
    async def main():
        server = RecordingServer()
        handler = RequestHandler("proxymap", {table, "slow:0.2"}, {})
        client, protocol = await connect(handler, server)
        await client.send(lookup("slow:0.2", b"k1"))  # learns the shortcut
        assert dict((await client.read_lists(1))[0])[b"value"] == b"slow:k1"
        await client.send(lookup("slow:0.2", b"k2"))  # the shortcut: started, or a task
        await asyncio.sleep(0.05)
        await client.send(lookup(table, b"alice") + lookup("slow:0.2", b"k3"))
        lists = await client.read_lists(3)
        assert [dict(pairs)[b"value"] for pairs in lists] == [
            b"slow:k2",
            b"alice@example.com",
            b"slow:k3",
        ]
        assert server.events == ["TAKEN", "AVAIL"] * 4 and server.busy == 0
        await client.send(lookup("slow:0.2", b"k4"))
        await asyncio.sleep(0.05)
        client.writer.close()  # gone before its answer: nothing breaks, nothing leaks
        await asyncio.sleep(0.3)
        assert server.busy == 0 and protocol.session.slow is None

    run(main())


@pytest.mark.serial
def test_second_client_served_while_first_waits(table):
    async def main():
        server = RecordingServer()
        handler = RequestHandler("proxymap", {table, "slow:1.0"}, {})
        first, _ = await connect(handler, server)
        second, _ = await connect(handler, server)
        await first.send(lookup("slow:1.0", b"k"))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await second.send(lookup(table, b"alice"))
        assert await second.read_exactly(len(ALICE_REPLY)) == ALICE_REPLY
        assert time.monotonic() - started < 0.5
        assert dict((await first.read_lists(1))[0])[b"value"] == b"slow:k"

    run(main())


def test_partial_request_completed_within_deadline_is_answered(table):
    async def main():
        handler = RequestHandler("proxymap", {table}, {})
        client, _ = await connect(handler, RecordingServer())
        wire = lookup(table, b"alice")
        await client.send(wire[:20])
        await asyncio.sleep(0.5)
        await client.send(wire[20:40])
        await asyncio.sleep(0.3)
        await client.send(wire[40:])
        assert await client.read_exactly(len(ALICE_REPLY)) == ALICE_REPLY

    run(main())


@pytest.mark.serial
def test_deadline_closes_the_connection(table, caplog):
    async def main():
        handler = RequestHandler("proxymap", {table}, {})
        client, _ = await connect(handler, RecordingServer())
        wire = lookup(table, b"alice")
        await client.send(wire[:30])  # inside the value of "table"
        started = time.monotonic()
        assert await client.read_to_eof() == b""  # closed, no reply
        return time.monotonic() - started

    with caplog.at_level(logging.WARNING, "proxymap"):
        elapsed = run(main())
    assert 0.9 <= elapsed < 2.0
    assert "timeout on proxymap socket while reading input attribute value" in caplog.messages


def test_deadline_budget_is_per_request_not_reset_by_each_byte(table):
    async def main():
        handler = RequestHandler("proxymap", {table}, {})
        client, _ = await connect(handler, RecordingServer())
        wire = lookup(table, b"alice")
        started = time.monotonic()
        for i in range(0, 12):  # a byte every 0.15 s: 1.8 s for the first 12 bytes
            await client.send(wire[i : i + 1])
            await asyncio.sleep(0.15)
            if client.reader.at_eof():
                break
        assert await client.read_to_eof() == b""
        return time.monotonic() - started

    assert run(main()) < 1.5


def test_eof_mid_request_replies_bad_then_closes(table, caplog):
    async def main():
        server = RecordingServer()
        handler = RequestHandler("proxymap", {table}, {})
        client, _ = await connect(handler, server)
        await client.send(b"request\x00lookup\x00table")
        client.writer.write_eof()  # half-close, as in docs/PROTOCOL.md 6.3
        assert await client.read_to_eof() == b"status\x003\x00value\x00\x00\x00"
        assert server.busy == 0

    with caplog.at_level(logging.WARNING, "proxymap"):
        run(main())
    assert (
        "unexpected end-of-input from proxymap socket while reading input attribute name"
        in caplog.messages
    )


def test_eof_after_complete_request_still_answers_it(table):
    async def main():
        handler = RequestHandler("proxymap", {table, "slow:0.2"}, {})
        client, _ = await connect(handler, RecordingServer())
        await client.send(lookup("slow:0.2", b"x") + lookup(table, b"alice"))
        client.writer.write_eof()
        rest = await client.read_to_eof()
        assert rest == b"status\x000\x00value\x00slow:x\x00\x00" + ALICE_REPLY

    run(main())


def test_eof_between_requests_closes_silently(table):
    async def main():
        server = RecordingServer()
        handler = RequestHandler("proxymap", {table}, {})
        client, _ = await connect(handler, server)
        client.writer.write_eof()
        assert await client.read_to_eof() == b""
        assert server.events == []

    run(main())


def test_malformed_frames_and_the_connection_stays_usable(table):
    async def main():
        handler = RequestHandler("proxymap", {table}, {})
        client, _ = await connect(handler, RecordingServer())
        await client.send(b"\x00")  # empty list: no reply
        await client.send(b"table\x00x\x00flags\x0064\x00\x00")  # no request attribute: no reply
        await client.send(b"request\x00bogus\x00\x00")
        assert await client.read_exactly(10) == b"status\x003\x00\x00"
        await client.send(lookup(table, b"alice", flags=b"64abc"))
        assert await client.read_exactly(17) == b"status\x003\x00value\x00\x00\x00"
        await client.send(lookup(table, b"alice", flags=b"-1"))  # crashes 3.7; served here
        assert await client.read_exactly(len(ALICE_REPLY)) == ALICE_REPLY
        g2 = (
            b"request\x00open\x00table\x00"
            + table.encode()
            + b"\x00instance_flags\x0065600\x00\x00"
        )
        await client.send(g2)
        reply = (await client.read_lists(1))[0]
        assert reply[0] == (b"status", b"0") and reply[1][0] == b"flags"

    run(main())


def test_pipelined_requests_all_answered_in_order_in_one_write(table):
    async def main():
        handler = RequestHandler("proxymap", {table}, {})
        client, protocol = await connect(handler, RecordingServer())
        writes = []

        class CountingTransport:  # uvloop transports do not allow patching write
            def __init__(self, inner):
                self.inner = inner

            def write(self, data):
                writes.append(data)
                self.inner.write(data)

            def __getattr__(self, name):
                return getattr(self.inner, name)

        protocol.transport = CountingTransport(protocol.transport)
        await client.send(
            lookup(table, b"alice") + b"\x00" + lookup(table, b"nobody") + lookup(table, b"bob")
        )
        lists = await client.read_lists(3)
        assert [dict(p)[b"status"] for p in lists] == [b"0", b"1", b"0"]
        assert len(writes) == 1

    run(main())


def test_repeated_lookups_take_the_shortcut_with_the_same_answers(table, caplog):
    async def main():
        server = RecordingServer()
        handler = RequestHandler("proxymap", {table}, {})
        client, _ = await connect(handler, server)

        async def ask(request: bytes) -> list:
            await client.send(request)
            return await client.read_lists(1)

        first = await ask(lookup(table, b"alice"))
        (prefix,) = handler.lookup_shortcuts  # learnt from the general path
        assert lookup(table, b"alice").startswith(prefix)
        assert await ask(lookup(table, b"alice")) == first
        assert dict((await ask(lookup(table, b"bob")))[0])[b"value"] == b"bob@example.com"
        assert await ask(lookup(table, b"nobody")) == [[(b"status", b"1"), (b"value", b"")]]
        assert await ask(lookup(table, b"")) == [[(b"status", b"1"), (b"value", b"")]]
        # Same prefix, but a second key attribute: the general path keeps the first value.
        repeated = lookup(table, b"alice")[:-1] + b"key\x00bob\x00\x00"
        with caplog.at_level(logging.WARNING, logger="proxymap"):
            assert await ask(repeated) == first
        assert "unexpected attribute key" in caplog.text
        # Two lookups in one chunk: both answered.
        await client.send(lookup(table, b"bob") + lookup(table, b"alice"))
        lists = await client.read_lists(2)
        assert [dict(p)[b"value"] for p in lists] == [b"bob@example.com", b"alice@example.com"]
        assert server.events == ["TAKEN", "AVAIL"] * 8 and server.busy == 0

    run(main())


def test_refused_lookups_never_take_the_shortcut(table, caplog):
    async def main():
        handler = RequestHandler("proxymap", {table}, {})
        client, _ = await connect(handler, RecordingServer())
        for _ in range(3):
            await client.send(lookup("texthash:/unapproved", b"alice"))
            assert await client.read_lists(1) == [[(b"status", b"4"), (b"value", b"")]]
        assert list(handler.lookup_shortcuts.values()) == [None]

    with caplog.at_level(logging.WARNING, logger="proxymap"):
        run(main())
    assert caplog.text.count("request for unapproved table") == 3


def test_oversized_list_answered_bad_and_closed(table, monkeypatch):
    monkeypatch.setattr(attr, "MAX_LIST_BYTES", 4096)

    async def main():
        handler = RequestHandler("proxymap", {table}, {})
        client, protocol = await connect(handler, RecordingServer())
        protocol.decoder.limit = 4096
        await client.send(lookup(table, b"alice") + lookup(table, b"k" * 5000))
        assert await client.read_to_eof() == ALICE_REPLY + b"status\x003\x00value\x00\x00\x00"

    run(main())


def test_client_gone_while_slow_request_runs(table):
    async def main():
        server = RecordingServer()
        handler = RequestHandler("proxymap", {table, "slow:0.2"}, {})
        client, _ = await connect(handler, server)
        await client.send(lookup("slow:0.2", b"x"))
        await asyncio.sleep(0.05)
        client.writer.close()
        await asyncio.sleep(0.4)
        assert server.events == ["TAKEN", "AVAIL"] and server.busy == 0

    run(main())


def test_client_that_does_not_read_is_not_read_from(table):
    async def main():
        handler = RequestHandler("proxymap", {table}, {})
        client, protocol = await connect(handler, RecordingServer())
        request = lookup(table, b"alice")
        count = 60000  # ~4 MB of requests, ~2 MB of replies: more than the socket buffers

        async def flood():
            for _ in range(count // 1000):
                await client.send(request * 1000)

        sender = asyncio.ensure_future(flood())
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not protocol.transport.is_reading():
                break
        assert not protocol.transport.is_reading()  # backpressure instead of buffering
        assert protocol.transport.get_write_buffer_size() < 1 << 20
        decoder = attr.AttrDecoder()
        replies = 0
        while replies < count:
            data = await asyncio.wait_for(client.reader.read(1 << 20), 5)
            replies += len(decoder.feed(data))
        await sender
        assert replies == count and protocol.transport.is_reading()

    run(main())


class MemoryTransport:
    """Records what the protocol writes; enough of a transport for feeding bytes directly."""

    def __init__(self):
        self.output = bytearray()
        self.closed = False
        self.reading = True
        self.pauses = 0

    def write(self, data):
        self.output += data

    def close(self):
        self.closed = True

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def pause_reading(self):
        assert self.reading, "paused twice"
        self.reading = False
        self.pauses += 1

    def resume_reading(self):
        assert not self.reading, "resumed while reading"
        self.reading = True

    def is_closing(self):
        return self.closed


def connected_in_memory(*tables: str) -> tuple[RecordingServer, ProxymapProtocol, MemoryTransport]:
    """A protocol serving TABLES, connected to a MemoryTransport (bytes fed directly)."""
    server = RecordingServer()
    handler = RequestHandler("proxymap", set(tables), {})
    protocol = ProxymapProtocol(server, handler, stream_name("proxymap"))
    transport = MemoryTransport()
    protocol.connection_made(transport)
    return server, protocol, transport


def test_slow_request_cancelled_before_its_task_ran_is_answered_and_counted(table, recwarn):
    async def main():
        server, protocol, transport = connected_in_memory("slow:0.2")
        protocol.data_received(lookup("slow:0.2", b"x"))
        assert server.busy == 1 and transport.reading
        protocol._slow.cancel()  # e.g. the loop shutting down: before its first step
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert server.busy == 0 and protocol._slow is None
        assert bytes(transport.output) == ANNOUNCEMENT + b"status\x002\x00value\x00\x00\x00"
        assert transport.reading
        protocol.connection_lost(None)

    run(main())
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


def test_one_task_serves_a_clients_slow_requests_and_ends_with_the_connection(table):
    """No task per slow request: the connection's task waits between them, and ends
    when the client goes."""

    async def main():
        server, protocol, transport = connected_in_memory("slow:0")
        tasks = set()
        for key in (b"a", b"b", b"c"):  # the general path, then the fast path
            protocol.data_received(lookup("slow:0", key))
            tasks.add(protocol._slow_task)
            while protocol._slow is not None:
                await asyncio.sleep(0)
            assert server.busy == 0
        (task,) = tasks
        assert not task.done() and protocol._wake is not None
        assert bytes(transport.output).count(b"status\x000\x00value\x00slow:") == 3
        protocol.connection_lost(None)
        await asyncio.sleep(0)
        assert task.cancelled() and protocol._slow_task is None

    run(main())


@pytest.mark.parametrize("while_serving", [False, True])
def test_a_cancelled_task_is_replaced_by_the_next_slow_request(table, while_serving):
    """The loop closing cancels every task: one that waits between requests ends at
    once; one serving a request answers it RETRY and ends after it (so that the
    loop's teardown, which waits for cancelled tasks, is not held up). The next slow
    request gets a task of its own."""

    async def main():
        server, protocol, transport = connected_in_memory("slow:0.01")
        protocol.data_received(lookup("slow:0.01", b"a"))
        first = protocol._slow_task
        if not while_serving:
            while protocol._slow is not None:
                await asyncio.sleep(0.005)
        else:
            await asyncio.sleep(0.001)  # under way: the table waits
        first.cancel()
        while not first.done():
            await asyncio.sleep(0)
        assert server.busy == 0 and protocol._slow_task is None and protocol._wake is None
        protocol.data_received(lookup("slow:0.01", b"b"))
        assert protocol._slow_task is not first
        while protocol._slow is not None:
            await asyncio.sleep(0.005)
        replies = bytes(transport.output)[len(ANNOUNCEMENT) :]
        first_reply = b"status\x002\x00" if while_serving else b"status\x000\x00"
        assert replies.startswith(first_reply)
        assert replies.endswith(b"status\x000\x00value\x00slow:b\x00\x00")
        assert server.busy == 0
        protocol.connection_lost(None)

    run(main())


def test_a_client_waiting_for_a_slow_reply_is_never_paused(table):
    """Real clients send one request and wait: no pause and resume per slow request."""

    async def main():
        server, protocol, transport = connected_in_memory("slow:0.01")
        for key in (b"a", b"b", b"c"):
            protocol.data_received(lookup("slow:0.01", key))
            while protocol._slow is not None:
                await asyncio.sleep(0.005)
        assert transport.pauses == 0 and transport.reading
        assert bytes(transport.output).count(b"status\x00") == 3
        protocol.connection_lost(None)

    run(main())


def test_input_behind_a_slow_request_pauses_reading_until_it_is_answered(table):
    """A pipelining client: its next chunk is queued, reading stops until the slow
    reply (and the queued one) are out, then resumes; replies stay in order."""

    async def main():
        server, protocol, transport = connected_in_memory("slow:0.05", table)
        protocol.data_received(lookup("slow:0.05", b"first"))
        assert transport.reading
        protocol.data_received(lookup(table, b"alice"))  # behind the slow one
        assert not transport.reading and transport.pauses == 1
        assert bytes(transport.output) == ANNOUNCEMENT  # nothing answered out of order
        while protocol._slow is not None:
            await asyncio.sleep(0.005)
        assert transport.reading and server.busy == 0
        replies = bytes(transport.output)[len(ANNOUNCEMENT) :]
        assert replies.index(b"first") < replies.index(b"alice")
        protocol.connection_lost(None)

    run(main())


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    chunks=st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.sampled_from(
                [
                    b"request\x00lookup\x00",
                    b"table\x00x:y\x00",
                    b"flags\x00-1\x00",
                    b"key\x00k\x00",
                    b"\x00",
                    b"instance_flags\x000\x00",
                    b"request\x00bogus\x00\x00",
                ]
            ),
        ),
        max_size=10,
    ),
    eof=st.booleans(),
)
def test_arbitrary_input_never_breaks_the_protocol(chunks, eof, event_loop_kind):
    async def main():
        server = RecordingServer()
        protocol = ProxymapProtocol(
            server, RequestHandler("proxymap", {"inline:{k=v}"}, {}), "proxymap socket"
        )
        transport = MemoryTransport()
        protocol.connection_made(transport)
        for chunk in chunks:
            if transport.closed:
                break
            protocol.data_received(chunk)
        if eof and not transport.closed and not protocol.eof_received():
            transport.closed = True
        protocol.connection_lost(None)
        assert server.busy == 0
        # Whatever was written is a sequence of complete attribute lists.
        decoder = attr.AttrDecoder()
        decoder.feed(bytes(transport.output))
        assert not decoder.pending

    asyncio.run(main())
