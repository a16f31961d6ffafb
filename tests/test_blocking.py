"""BlockingTable: blocking calls in the bounded executor, flags captured on the loop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from proxymap import flags as F
from proxymap.tables import blocking
from proxymap.tables.base import DictRetry
from proxymap.tables.blocking import BlockingTable


class SleepyTable(BlockingTable):
    """Answers the key after ``delay`` seconds in a driver thread; records concurrency."""

    concurrency = 2

    def __init__(self, delay: float, timeout: float | None = None) -> None:
        super().__init__("sleepy", 0, F.FIXED)
        self.delay = delay
        self.timeout = timeout
        self.running = 0
        self.peak = 0
        self.lock = threading.Lock()
        self.threads: set[str] = set()

    def blocking_lookup(self, key: bytes, flags: int) -> bytes | None:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        with self.lock:
            self.running -= 1
        return self.fold(key, flags)


def test_calls_run_in_the_blocking_executor_with_their_own_flags():
    table = SleepyTable(0.05)

    async def with_flags(flags: int, key: bytes) -> bytes | None:
        table.flags = flags  # as the handler does, right before the call
        return await table.alookup(key)

    async def scenario():
        # The second request sets the word while the first one's thread still works.
        return tuple(
            await asyncio.gather(
                with_flags(F.FIXED | F.FOLD_FIX, b"ABC"), with_flags(F.FIXED, b"ABC")
            )
        )

    assert asyncio.run(scenario()) == (b"abc", b"ABC")
    assert all(name.startswith("blocking") for name in table.threads)


def test_at_most_concurrency_calls_at_once_and_the_loop_keeps_running():
    table = SleepyTable(0.1)

    async def scenario():
        ticks = 0
        lookups = asyncio.gather(*(table.alookup(b"k%d" % n) for n in range(6)))
        while not lookups.done():
            await asyncio.sleep(0.01)
            ticks += 1
        return await lookups, ticks

    answers, ticks = asyncio.run(scenario())
    assert answers == [b"k%d" % n for n in range(6)]
    assert table.peak == 2 and ticks >= 20  # three rounds of 0.1 s, loop never blocked


def test_calls_waiting_for_a_thread_tell_the_worker_it_waits_for_backends():
    table = SleepyTable(0.1)

    async def scenario():
        two = asyncio.gather(table.alookup(b"a"), table.alookup(b"b"))
        await asyncio.sleep(0.03)
        running = blocking.calls_waiting()  # both threads of the table busy, none waits
        third = asyncio.ensure_future(table.alookup(b"c"))
        await asyncio.sleep(0.03)
        waiting = blocking.calls_waiting()
        await two
        await third
        return running, waiting, blocking.calls_waiting()

    assert asyncio.run(scenario()) == (False, True, False)


@pytest.mark.serial
def test_a_hung_driver_answers_retry_at_the_timeout_and_holds_its_slots():
    table = SleepyTable(0.6, timeout=0.1)

    async def scenario():
        started = time.monotonic()
        for _ in range(2):
            with pytest.raises(DictRetry, match="no answer within"):
                await table.alookup(b"x")
        with pytest.raises(DictRetry, match="threads busy"):
            await table.alookup(b"y")  # both slots still held by the hung calls
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 0.5


def test_the_executor_is_not_the_loops_default():
    async def scenario():
        loop = asyncio.get_running_loop()
        default_thread = await loop.run_in_executor(None, lambda: threading.current_thread().name)
        ours = await blocking.run_blocking(lambda: threading.current_thread().name)
        return default_thread, ours

    default_thread, ours = asyncio.run(scenario())
    assert ours.startswith("blocking") and not default_thread.startswith("blocking")
