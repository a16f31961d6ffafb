"""Tables whose driver blocks: their calls run in a bounded executor of their own.

NAME
    blocking -- the executor for blocking drivers, and the table base that uses it

SYNOPSIS
    class SqliteTable(BlockingTable):
        def blocking_lookup(self, key: bytes, flags: int) -> bytes | None: ...

    value = await run_blocking(function, arg, ...)     # any blocking call

DESCRIPTION
    Some drivers have no asyncio API (sqlite3, a name service behind getpwnam(3)).
    Their calls run in one thread pool per worker process, created on first use
    (after the fork) with ``pyproxymap_blocking_threads`` threads (default 32). It is
    never the event loop's default executor, which other code may fill.

    ``BlockingTable`` is an ``AsyncTable`` whose ``a*`` operations run the subclass's
    ``blocking_*`` methods there. The flag word is captured on the event-loop thread
    and passed along, because a concurrent request may change ``flags`` while a
    thread works. Per table at most ``concurrency`` calls run at once (default 4):
    a table whose backend hangs holds at most that many threads, so it cannot starve
    the other blocking tables. A call that does not finish within ``timeout`` (when
    set) answers RETRY; its thread is left to finish on its own and keeps its slot
    until then, so a hung backend is never asked more than ``concurrency`` times.
    ``calls_waiting()`` says whether a call waits for one of its table's threads (the
    worker is then saturated, for its master).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from proxymap.tables.base import AsyncTable, DictRetry, DictUnsupported, OpenContext

log = logging.getLogger("proxymap")

R = TypeVar("R")

DEFAULT_THREADS = 32
_executor: ThreadPoolExecutor | None = None
_threads = DEFAULT_THREADS
_waiting = [0]  # calls that found every thread of their table busy, waiting for one


def calls_waiting() -> bool:
    """A call of this process waits for a thread: its table's threads are all busy."""
    return _waiting[0] > 0


def configure(params: Mapping[str, str]) -> None:
    """Take the thread count from main.cf; only before the executor exists."""
    global _threads
    text = params.get("pyproxymap_blocking_threads") if params else None
    if text is None or _executor is not None:
        return
    try:
        _threads = max(1, int(text))
    except ValueError:
        log.warning(
            'pyproxymap_blocking_threads: bad numerical value "%s", using %d', text, DEFAULT_THREADS
        )


def executor() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(_threads, thread_name_prefix="blocking")
    return _executor


async def run_blocking(function: Callable[..., R], *args: object) -> R:
    """``function(*args)`` in the blocking-driver executor, awaited."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor(), function, *args)


class BlockingTable(AsyncTable):
    """An asynchronous table over a blocking driver: override the ``blocking_*`` methods.

    Each runs in an executor thread with the flag word of its request.
    """

    concurrency = 4
    timeout: float | None = None

    def __init__(
        self, name: str, open_mode: int, flags: int, ctx: OpenContext | None = None
    ) -> None:
        super().__init__(name, open_mode, flags, ctx)
        self._gate: asyncio.Semaphore | None = None
        self._gate_loop: asyncio.AbstractEventLoop | None = None

    # --- what a driver implements ------------------------------------------------------
    def blocking_lookup(self, key: bytes, flags: int) -> bytes | None:
        raise DictUnsupported(f"{self.spec}: lookup is not supported")

    def blocking_update(self, key: bytes, value: bytes, flags: int) -> int:
        raise DictUnsupported(f"table {self.spec}: update operation is not supported")

    def blocking_delete(self, key: bytes, flags: int) -> int:
        raise DictUnsupported(f"table {self.spec}: delete operation is not supported")

    def blocking_sequence(self, function: int, flags: int) -> tuple[bytes, bytes] | None:
        raise DictUnsupported(f"table {self.spec}: sequence operation is not supported")

    # --- the asynchronous operations ------------------------------------------------------
    async def alookup(self, key: bytes) -> bytes | None:
        return await self._run(self.blocking_lookup, key, self.flags)

    async def aupdate(self, key: bytes, value: bytes) -> int:
        return await self._run(self.blocking_update, key, value, self.flags)

    async def adelete(self, key: bytes) -> int:
        return await self._run(self.blocking_delete, key, self.flags)

    async def asequence(self, function: int) -> tuple[bytes, bytes] | None:
        return await self._run(self.blocking_sequence, function, self.flags)

    async def _run(self, function: Callable[..., R], *args: object) -> R:
        gate = self._bound_gate()
        waits = gate.locked()  # every thread of the table is busy
        _waiting[0] += waits
        try:
            await asyncio.wait_for(gate.acquire(), self.timeout)
        except TimeoutError:
            raise DictRetry(
                f"{self.spec}: all {self.concurrency} driver threads busy for {self.timeout:g}s"
            ) from None
        finally:
            _waiting[0] -= waits
        future = asyncio.get_running_loop().run_in_executor(executor(), function, *args)
        future.add_done_callback(lambda done: self._finished(gate, done))
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except TimeoutError:
            raise DictRetry(f"{self.spec}: no answer within {self.timeout:g}s") from None

    def _bound_gate(self) -> asyncio.Semaphore:
        # Semaphores belong to one event loop (tests run one loop per test).
        loop = asyncio.get_running_loop()
        if self._gate is None or self._gate_loop is not loop:
            self._gate = asyncio.Semaphore(self.concurrency)
            self._gate_loop = loop
        return self._gate

    def _finished(self, gate: asyncio.Semaphore, done: asyncio.Future[Any]) -> None:
        if not done.cancelled():
            done.exception()  # retrieved: a call that timed out may still fail later
        if gate is self._gate:
            gate.release()
