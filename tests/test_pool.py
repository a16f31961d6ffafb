"""The connection pool against real loopback servers started by each test.

Bound (never more than ``size`` connections, a full pool waits then fails), reuse,
idle/age limits, the health check, failover in order, back-off and recovery of a
restarted server, and one log line per outage.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from proxymap.tables import pool as pool_module
from proxymap.tables.pool import ConnectionPool, PoolUnavailable, Sweeper, lookups_waiting
from proxymap.tables.streams import Stream, close_stream, stream_opener


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class EchoServer:
    """Answers each line with itself; counts the connections it accepted."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.accepted = 0
        self.open = 0
        self.server: asyncio.base_events.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    async def start(self) -> EchoServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:  # as a stopped server does (Python 3.11 keeps them)
            writer.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.accepted += 1
        self.open += 1
        self.writers.add(writer)
        try:
            while line := await reader.readline():
                if line.startswith(b"sleep"):
                    await asyncio.sleep(float(line.split()[1]))
                writer.write(line)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            self.writers.discard(writer)
            writer.close()


def make_pool(endpoints: list[str], **options) -> ConnectionPool[Stream, str]:
    options.setdefault("connect_timeout", 1.0)
    return ConnectionPool("test:pool", endpoints, stream_opener(), close_stream, **options)


async def ask(pool: ConnectionPool[Stream, str], line: bytes, timeout: float = 2.0) -> bytes:
    async with pool.connection(timeout) as lease:
        lease.connection.writer.write(line + b"\n")
        return (await lease.connection.reader.readline()).rstrip(b"\n")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_connections_are_reused_and_never_more_than_size():
    async def scenario():
        server = await EchoServer().start()
        pool = make_pool([server.endpoint], size=3)
        peak = 0

        async def one(n: int) -> bytes:
            nonlocal peak
            answer = await ask(pool, b"sleep 0.02 %d" % n)
            peak = max(peak, pool.open)
            return answer

        answers = await asyncio.gather(*(one(n) for n in range(30)))
        assert answers == [b"sleep 0.02 %d" % n for n in range(30)]
        assert server.accepted == 3 and peak == 3 and pool.open == 3 and pool.in_use == 0
        assert pool.connects == 3
        pool.close()
        await server.stop()

    run(scenario())


def test_the_running_loop_is_the_pools_own_only_on_its_thread():
    """Drivers ask the pool for the running loop (asyncio's lookup is a getpid() system
    call on Python 3.11): the pool's loop on the thread that bound it, asyncio's answer
    elsewhere -- none on an executor thread, the new one after a new loop."""

    async def scenario() -> ConnectionPool[Stream, str]:
        server = await EchoServer().start()
        pool = make_pool([server.endpoint], size=1)
        loop = asyncio.get_running_loop()
        assert pool.running_loop() is loop  # not bound yet: asyncio's answer
        assert await ask(pool, b"hello") == b"hello"
        assert pool.running_loop() is loop

        def off_the_loop() -> str:
            try:
                pool.running_loop()
            except RuntimeError:
                return "no running loop"
            return "the pool's loop"

        assert await loop.run_in_executor(None, off_the_loop) == "no running loop"
        await server.stop()
        return pool

    pool = run(scenario())

    async def later() -> None:
        assert pool.running_loop() is asyncio.get_running_loop()  # bound to a loop now gone

    run(later())
    pool.close()


def test_a_full_pool_waits_then_fails_with_retry():
    async def scenario():
        server = await EchoServer().start()
        pool = make_pool([server.endpoint], size=1)
        slow = asyncio.create_task(ask(pool, b"sleep 0.5"))
        await asyncio.sleep(0.05)
        assert pool.in_use == 1
        with pytest.raises(PoolUnavailable, match="busy"):
            await ask(pool, b"quick", timeout=0.1)
        assert await slow == b"sleep 0.5"
        assert await ask(pool, b"after") == b"after"  # the waiter left no slot behind
        assert server.accepted == 1
        pool.close()
        await server.stop()

    run(scenario())


def test_a_queued_lookup_tells_the_worker_it_waits_for_backends(monkeypatch):
    """What the worker tells its master (``waiting_for_backends``): a lookup waits for
    a connection of a pool at its bound, or began to within QUEUE_MEMORY."""
    monkeypatch.setattr(pool_module, "QUEUE_MEMORY", 0.5)

    async def scenario():
        server = await EchoServer().start()
        pool = make_pool([server.endpoint], size=1)
        assert await ask(pool, b"first") == b"first"  # a busy connection: not waiting
        slow = asyncio.create_task(ask(pool, b"sleep 0.3"))
        await asyncio.sleep(0.05)
        assert pool.in_use == 1 and not lookups_waiting()
        queued = asyncio.create_task(ask(pool, b"queued"))
        await asyncio.sleep(0.05)
        assert pool.waiting == 1 and lookups_waiting()
        assert (await slow, await queued) == (b"sleep 0.3", b"queued")
        assert pool.waiting == 0 and lookups_waiting()  # it queued some 0.25 s ago
        await asyncio.sleep(0.35)
        assert not lookups_waiting()
        pool.close()
        await server.stop()

    run(scenario())


def test_idle_and_age_limits_and_the_health_check():
    async def scenario():
        server = await EchoServer().start()
        checks: list[Stream] = []

        async def healthy(stream: Stream) -> bool:
            checks.append(stream)
            return not stream.reader.at_eof()

        pool = make_pool([server.endpoint], idle_limit=0.2, health_check=healthy, check_after=0.05)
        await ask(pool, b"a")
        await ask(pool, b"b")  # reused at once: no check
        assert server.accepted == 1 and not checks
        await asyncio.sleep(0.1)
        await ask(pool, b"c")  # idle past check_after: checked, reused
        assert server.accepted == 1 and len(checks) == 1
        await asyncio.sleep(0.3)
        await ask(pool, b"d")  # idle past idle_limit: replaced
        assert server.accepted == 2

        aged = make_pool([server.endpoint], age_limit=0.1)
        await ask(aged, b"x")
        await asyncio.sleep(0.15)
        await ask(aged, b"y")
        assert server.accepted == 4
        pool.close()
        aged.close()
        await server.stop()

    run(scenario())


def test_failover_in_order_and_one_warning_per_outage(caplog):
    async def scenario():
        dead = free_port()
        second = await EchoServer().start()
        pool = make_pool([f"inet:127.0.0.1:{dead}", second.endpoint], size=2)
        with caplog.at_level(logging.WARNING, "proxymap"):
            assert await ask(pool, b"one") == b"one"
            pool.close()  # force new connections: the dead one stays in back-off
            for n in range(5):
                assert await ask(pool, b"%d" % n) == b"%d" % n
                pool.close()
        warnings = [r for r in caplog.records if f"127.0.0.1:{dead}" in r.getMessage()]
        assert len(warnings) == 1 and "cannot connect" in warnings[0].getMessage()
        assert pool.failovers >= 1
        await second.stop()

    run(scenario())


@pytest.mark.serial
def test_all_down_fails_fast_then_a_restarted_server_is_used_again():
    async def scenario():
        loop = asyncio.get_running_loop()
        server = await EchoServer().start()
        pool = make_pool([server.endpoint], backoff_min=0.1, backoff_max=0.4)
        assert await ask(pool, b"up") == b"up"
        await server.stop()
        pool.close()  # the idle connection died with the server
        started = loop.time()
        with pytest.raises(PoolUnavailable, match="cannot connect"):
            await ask(pool, b"down")  # connect refused: the endpoint is down
        with pytest.raises(PoolUnavailable, match="no server available"):
            await ask(pool, b"backoff")  # inside the back-off: no connect at all
        assert loop.time() - started < 0.1
        restarted = await EchoServer(server.port).start()
        while True:
            try:
                assert await ask(pool, b"again") == b"again"
                break
            except PoolUnavailable:
                await asyncio.sleep(0.05)
        assert loop.time() - started < 1.0  # within backoff_max of the restart
        pool.close()
        await restarted.stop()

    run(scenario())


def test_suspect_drops_the_idle_siblings():
    async def scenario():
        server = await EchoServer().start()
        pool = make_pool([server.endpoint], size=3)
        await asyncio.gather(*(ask(pool, b"sleep 0.05") for _ in range(3)))
        assert pool.open == 3
        lease = await pool.acquire()
        pool.release(lease, reusable=False)
        pool.suspect(lease)
        assert pool.open == 0
        pool.close()
        await server.stop()

    run(scenario())


def test_a_new_event_loop_starts_the_pool_afresh():
    server_port = free_port()
    pool = make_pool([f"inet:127.0.0.1:{server_port}"], size=1)

    async def once():
        server = await EchoServer(server_port).start()
        assert await ask(pool, b"x") == b"x"
        await server.stop()

    run(once())
    run(once())  # the first loop's idle connection is not handed to the second


def test_lend_gives_a_ready_idle_connection_without_an_await():
    async def scenario():
        server = await EchoServer().start()
        pool = make_pool([server.endpoint], size=1)
        assert pool.lend() is None  # nothing idle yet
        assert await ask(pool, b"a") == b"a"
        lease = pool.lend()
        assert lease is not None and pool.in_use == 1
        assert pool.lend() is None  # the only slot is lent
        pool.release(lease)
        assert pool.in_use == 0 and pool.open == 1
        assert server.accepted == 1
        pool.close()
        await server.stop()

    run(scenario())


def test_lend_leaves_a_connection_that_needs_its_health_check_to_acquire():
    async def scenario():
        server = await EchoServer().start()
        checks = 0

        async def healthy(stream: Stream) -> bool:
            nonlocal checks
            checks += 1
            return True

        pool = make_pool([server.endpoint], health_check=healthy, check_after=0.05)
        await ask(pool, b"a")
        await asyncio.sleep(0.1)
        assert pool.lend() is None and checks == 0
        assert await ask(pool, b"b") == b"b" and checks == 1
        pool.close()
        await server.stop()

    run(scenario())


def test_waiters_are_served_in_arrival_order_and_a_cancelled_one_loses_no_slot():
    async def scenario():
        server = await EchoServer().start()
        pool = make_pool([server.endpoint], size=1)
        first = await pool.acquire()
        order: list[int] = []

        async def waiter(n: int) -> None:
            lease = await pool.acquire(5.0)
            order.append(n)
            await asyncio.sleep(0.01)
            pool.release(lease)

        tasks = [asyncio.create_task(waiter(n)) for n in range(4)]
        await asyncio.sleep(0.05)
        assert pool.waiting == 4
        tasks[1].cancel()  # waiting: it leaves the queue
        pool.release(first)  # handed to the first in line...
        tasks[0].cancel()  # ...which is cancelled before it runs: passed on
        await asyncio.gather(*tasks, return_exceptions=True)
        assert order == [2, 3]
        assert pool.waiting == 0 and pool.in_use == 0
        lease = await pool.acquire(0.1)  # the slot is free again
        pool.release(lease)
        assert server.accepted == 1
        pool.close()
        await server.stop()

    run(scenario())


def test_a_timed_out_waiter_leaves_the_queue():
    async def scenario():
        server = await EchoServer().start()
        pool = make_pool([server.endpoint], size=1)
        held = await pool.acquire()
        with pytest.raises(PoolUnavailable, match="busy for 0.05s"):
            await pool.acquire(0.05)
        assert pool.waiting == 0 and not pool._waiters
        pool.release(held)
        lease = await pool.acquire(0.1)
        pool.release(lease)
        pool.close()
        await server.stop()

    run(scenario())


def test_lend_later_waits_in_turn_with_acquire_and_times_out():
    """A callback's place in the queue: served in arrival order with acquire's
    waiters, from the callback that frees the slot; PoolUnavailable past its time;
    False while a slot is free (acquire connects)."""

    async def scenario():
        server = await EchoServer().start()
        pool = make_pool([server.endpoint], size=1)
        loop = asyncio.get_running_loop()
        assert not pool.lend_later(print, 1.0, loop)  # a free slot: acquire's work
        first = await pool.acquire()
        got: list[object] = []
        assert pool.lend_later(got.append, 5.0, loop)
        waiting = asyncio.ensure_future(pool.acquire(5.0))
        await asyncio.sleep(0.01)
        assert pool.waiting == 2
        pool.release(first)  # to the callback, at once, with the same connection
        assert got == [first] and pool.in_use == 1 and pool.waiting == 1
        pool.release(first)
        second = await waiting  # then acquire's waiter
        assert second is first and server.accepted == 1
        assert pool.lend_later(got.append, 0.05, loop)
        await asyncio.sleep(0.2)
        assert isinstance(got[-1], PoolUnavailable) and "busy for 0.05s" in str(got[-1])
        assert pool.waiting == 0 and not pool._waiters
        pool.release(second)
        pool.close()
        await server.stop()

    run(scenario())


def test_lend_later_opens_a_connection_when_none_is_idle():
    async def scenario():
        server = await EchoServer().start()
        pool = make_pool([server.endpoint], size=1)
        loop = asyncio.get_running_loop()
        held = await pool.acquire()
        got: list[object] = []
        assert pool.lend_later(got.append, 5.0, loop)
        pool.release(held, reusable=False)  # closed: the slot alone is handed on
        while not got:
            await asyncio.sleep(0.01)
        assert got[0] is not held and pool.in_use == 1 and server.accepted == 2
        pool.release(got[0])  # type: ignore[arg-type]
        pool.close()
        await server.stop()

    run(scenario())


def test_swept_timeout_behaves_like_asyncio_timeout():
    async def scenario():
        sweeper = Sweeper(resolution=0.02)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            async with sweeper.timeout(0.1):
                await asyncio.sleep(5)
        assert 0.09 <= loop.time() - started < 0.5  # late by at most a sweep or so
        await asyncio.sleep(0.01)  # the task is not left cancelled
        async with sweeper.timeout(1.0):  # in time: nothing happens, nothing is left
            await asyncio.sleep(0.01)
        async with sweeper.deadline(None):  # no deadline at all
            await asyncio.sleep(0.01)
        assert not sweeper._watched
        await asyncio.sleep(0.05)
        assert sweeper._timer is None  # nothing watched: no timer armed

        async def outer_cancelled():
            async with sweeper.timeout(5):
                await asyncio.sleep(5)

        task = asyncio.ensure_future(outer_cancelled())
        await asyncio.sleep(0.01)
        task.cancel()  # not ours: stays a cancellation, not a timeout
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())


def test_sweeper_calls_each_expired_entry_once_and_starts_afresh_on_a_new_loop():
    sweeper = Sweeper(resolution=0.01)

    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        fired: list[str] = []
        sweeper.watch("a", loop.time() + 0.02, lambda: fired.append("a"))
        sweeper.watch("b", loop.time() + 10, lambda: fired.append("b"))
        sweeper.watch("c", loop.time() + 0.02, lambda: fired.append("c"))
        sweeper.unwatch("c")
        await asyncio.sleep(0.1)
        return fired

    assert run(scenario()) == ["a"]
    assert run(scenario()) == ["a"]  # "b" of the first loop is forgotten


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10", 10.0),
        ("10s", 10.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5", 1.5),
        ("0.25S", 0.25),
        ("x", 7.0),
        ("", 7.0),
        ("5q", 7.0),
    ],
)
def test_our_numeric_settings_take_postfix_time_units(text, expected):
    from proxymap.tables.base import OpenContext
    from proxymap.tables.streams import param_number

    assert param_number(OpenContext(params={"pyproxymap_x": text}), "pyproxymap_x", 7) == expected
