"""One connection pool for every network table: bounded, failing over, recovering.

NAME
    pool -- connections to an ordered list of servers, shared by concurrent lookups

SYNOPSIS
    pool = ConnectionPool("mysql:/etc/postfix/aliases.cf", endpoints, connect, close,
                          size=8, idle_limit=60, health_check=ping)
    async with pool.connection(timeout=10) as lease:
        rows = await query(lease.connection, sql)     # an exception discards it

DESCRIPTION
    A pool belongs to one table (or, for socketmap, to one endpoint) in one worker
    process, and holds at most ``size`` connections, in use or idle, across all its
    endpoints: the number a site opens is bounded by workers x size. A lookup that
    finds every connection in use waits for one, at most ``timeout`` seconds, and then
    fails (RETRY); it never opens one more. One connection carries one request at a
    time.

    Reuse: the most recently released idle connection first (so that a quiet period
    lets the others expire). A connection idle longer than ``idle_limit`` or older
    than ``age_limit``, or one that ``usable`` (a cheap test without I/O, e.g. a
    flag the driver set when it saw the connection break) refuses, is closed
    instead of reused; one idle longer than
    ``check_after`` seconds is first passed to ``health_check`` (e.g. a ping), and
    closed if that fails.

    New connections go to the endpoints in order (``order`` may shuffle them per
    attempt, as Postfix's mysql and pgsql clients do, UNIX sockets first). An
    endpoint whose connect failed is *down*: it is passed over for a back-off that
    starts at ``backoff_min`` and doubles up to ``backoff_max``, and the next endpoint
    is tried (a *failover*). When every endpoint is down, a lookup fails at once
    rather than wait; once a back-off has passed, one lookup at a time probes that
    endpoint again, so a restarted server is used again within ``backoff_max``
    seconds. The warning that an endpoint is down is logged once per outage, and its
    return once.

    A connection that failed in use (lost, timed out) is discarded by the caller;
    ``suspect`` also closes the idle connections to that endpoint, which a restarted
    server has broken too.

    Figures for the live statistics: ``open``, ``in_use``, ``waiting``, ``size``,
    ``connects``, ``failovers``. For the worker's status to its master,
    ``lookups_waiting()`` says whether any pool of the process is at its bound (a
    lookup waits, or began to in the last 50 ms): the worker is then saturated.

    Lending is cheap on purpose (it is on every lookup's path): a free slot with a
    ready idle connection is lent without an await (``lend``, or ``acquire``'s
    fast path); a lookup that waits for a slot waits on one future (no task), in
    arrival order, and ``release`` hands the slot straight to the first waiter. A
    caller without a coroutine may queue a callback instead (``lend_later``): it gets
    the lease from within the ``release`` that frees the slot, in the same order.
    Its timeout, and the drivers' query timeouts, are watched by the pool's
    ``Sweeper``: one coarse timer (50 ms) instead of one timer per operation.

    Pools are bound to the event loop that first uses them; used from another loop
    (tests run one loop per test) they start afresh.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Generic, TypeVar

from proxymap.tables.base import BoundLoop, DictRetry, Table

log = logging.getLogger("proxymap")

C = TypeVar("C")  # a driver's connection object
E = TypeVar("E")  # a driver's description of one server

BACKOFF_MIN = 0.25
BACKOFF_MAX = 2.0

# Per type: the main.cf setting that bounds one table's connections in one worker, and
# its default. The drivers read their limit through connection_limit(); the worker's
# "connections-" report (proxymap -S) and so `proxymap-master status` use the same.
CONNECTION_SETTINGS: dict[str, tuple[str, int]] = {
    "mysql": ("pyproxymap_mysql_connections", 8),
    "pgsql": ("pyproxymap_pgsql_connections", 8),
    "ldap": ("pyproxymap_ldap_connections", 2),
    "memcache": ("pyproxymap_memcache_connections", 8),
    "sqlite": ("pyproxymap_sqlite_connections", 4),
    "tcp": ("pyproxymap_tcp_connections", 16),
    "socketmap": ("pyproxymap_socketmap_connections", 16),
}


def connection_limit(dict_type: str, params: Mapping[str, str] | None) -> int | None:
    """The per-table, per-worker connection bound of a type (None: it opens none)."""
    setting = CONNECTION_SETTINGS.get(dict_type)
    if setting is None:
        return None
    name, default = setting
    text = params.get(name) if params else None
    if text is None:
        return default
    try:
        return max(1, int(text))
    except ValueError:
        log.warning('%s: bad numerical value "%s", using %d', name, text, default)
        return default


class PoolUnavailable(DictRetry):
    """No connection could be had: every server down, or every connection busy."""


@dataclass(eq=False)
class EndpointState(Generic[E]):
    """One server of the list and what the pool knows about it."""

    endpoint: E
    label: str
    down_until: float = 0.0
    backoff: float = 0.0
    probing: bool = False
    reason: str = ""

    @property
    def down(self) -> bool:
        return self.backoff > 0


@dataclass(eq=False)
class Lease(Generic[C, E]):
    """A connection lent to one request."""

    connection: C
    endpoint: EndpointState[E]
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)


_POOLS: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()  # every pool of this process
QUEUE_MEMORY = 0.05  # seconds a pool counts as at its bound after a lookup queued


def lookups_waiting() -> bool:
    """A lookup of this process waits for a pooled connection, or one began to in the
    last QUEUE_MEMORY seconds: a pool is at its bound (the queue of a pool at its
    bound empties and fills again with every answer, so the moment alone says little)."""
    since = time.monotonic() - QUEUE_MEMORY
    return any(pool.waiting or pool.queued_at > since for pool in _POOLS)


class ConnectionPool(Generic[C, E]):
    def __init__(
        self,
        name: str,
        endpoints: Sequence[E],
        connect: Callable[[E], Awaitable[C]],
        close: Callable[[C], object],
        *,
        size: int = 8,
        connect_timeout: float = 10.0,
        idle_limit: float | None = None,
        age_limit: float | None = None,
        health_check: Callable[[C], Awaitable[bool]] | None = None,
        check_after: float = 5.0,
        backoff_min: float = BACKOFF_MIN,
        backoff_max: float = BACKOFF_MAX,
        order: Callable[[list[EndpointState[E]]], list[EndpointState[E]]] | None = None,
        label: Callable[[E], str] = str,
        usable: Callable[[C], bool] | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError(f"{name}: no server to connect to")
        self.name = name
        self._states = [EndpointState(endpoint, label(endpoint)) for endpoint in endpoints]
        self._connect = connect
        self._close = close
        self.size = max(1, size)
        self.connect_timeout = connect_timeout
        self.idle_limit = idle_limit
        self.age_limit = age_limit
        self.health_check = health_check
        self.check_after = check_after
        self.backoff_min = backoff_min
        self.backoff_max = max(backoff_min, backoff_max)
        self._order = order
        self._usable = usable
        self._idle: list[Lease[C, E]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bound = BoundLoop()  # _loop and the thread that bound it
        self._free = self.size  # slots neither lent nor handed to a waiter
        self._waiters: deque[asyncio.Future[bool]] = deque()  # True: a slot is yours
        self.sweeper = Sweeper()  # deadlines of waiting lookups (drivers use it too)
        self.in_use = 0
        self.waiting = 0
        self.queued_at = float("-inf")  # time.monotonic() when a lookup last queued
        self.connects = 0
        self.failovers = 0
        _POOLS.add(self)

    @property
    def open(self) -> int:
        return self.in_use + len(self._idle)

    @property
    def endpoints(self) -> list[EndpointState[E]]:
        return list(self._states)

    # --- lending ------------------------------------------------------------------------
    def connection(self, timeout: float | None = None) -> _Borrowed[C, E]:
        """``async with``: a connection for one request; discarded when the block raises."""
        return _Borrowed(self, timeout)

    def lend(self, loop: asyncio.AbstractEventLoop | None = None) -> Lease[C, E] | None:
        """A lease at once, without an await, when a slot is free and an idle
        connection needs neither replacing nor a health check; else None (then
        ``acquire``). ``loop``: the running loop, when the caller has it (asking
        for it costs a getpid() system call in Python 3.11)."""
        if self._free <= 0 or not self._idle or self._loop is not (loop or _get_running_loop()):
            return None
        lease = self._take_recent()
        if lease is not None:
            self._free -= 1
            self.in_use += 1
        return lease

    def _take_recent(self) -> Lease[C, E] | None:
        """``_take_idle``, with the usual case first: the most recently released
        connection, idle no longer than check_after and idle_limit, taken without
        another look."""
        idle = self._idle
        top = idle[-1]
        idle_for = time.monotonic() - top.last_used
        if (
            idle_for <= self.check_after
            and (self.idle_limit is None or idle_for <= self.idle_limit)
            and self.age_limit is None
            and (self._usable is None or self._usable(top.connection))
        ):
            return idle.pop()
        return self._take_idle()

    async def acquire(self, timeout: float | None = None) -> Lease[C, E]:
        self._bind()
        if self._free > 0:
            self._free -= 1
        else:
            await self._wait_for_slot(timeout)
        try:
            lease = self._take_idle()
        except BaseException:
            self._release_slot()
            raise
        if lease is None:
            return await self._lease_in_slot()
        self.in_use += 1
        return lease

    async def _lease_in_slot(self) -> Lease[C, E]:
        """A lease in a slot already taken, when no idle connection can be taken as
        it is: one checked for reuse, or a new one."""
        try:
            lease = (await self._reuse() if self._idle else None) or await self._open()
        except BaseException:
            self._release_slot()
            raise
        self.in_use += 1
        return lease

    def lend_later(
        self,
        deliver: Callable[[Lease[C, E] | Exception], object],
        timeout: float,
        loop: asyncio.AbstractEventLoop,
    ) -> bool:
        """Queue for a lease without a coroutine when every slot is taken: ``deliver``
        gets it (or PoolUnavailable past ``timeout``) from the callback that frees a
        slot, in turn with ``acquire``'s waiters. False when a slot is free: then
        ``acquire`` (a connection to open or to check)."""
        if self._free > 0 or self._loop is not loop:
            return False
        waiter = _CallbackWaiter(self, deliver, timeout)
        self._join_queue(waiter)  # type: ignore[arg-type]  # a future's stand-in
        self.sweeper.watch(waiter, loop.time() + timeout, waiter.expire, loop)
        return True

    def _join_queue(self, waiter: asyncio.Future[bool]) -> None:
        """WAITER waits for a slot, last in line; counted (``waiting``, and the time for
        ``lookups_waiting``) until it is served or gives up."""
        self._waiters.append(waiter)
        self.waiting += 1
        self.queued_at = time.monotonic()

    async def _wait_for_slot(self, timeout: float | None) -> None:
        """Queue for a slot: one future and at most one timer, no task."""
        loop = self._loop
        assert loop is not None
        waiter: asyncio.Future[bool] = loop.create_future()
        self._join_queue(waiter)
        if timeout is not None:
            self.sweeper.watch(waiter, loop.time() + timeout, lambda: _expire(waiter))
        try:
            granted = await waiter
        except BaseException:
            # Cancelled: a slot handed over meanwhile goes to the next in line.
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self._release_slot()
            else:
                self._forget(waiter)
            raise
        finally:
            self.waiting -= 1
            if timeout is not None:
                self.sweeper.unwatch(waiter)
        if not granted:
            self._forget(waiter)
            raise self.busy_for(timeout)

    def busy_for(self, timeout: float | None) -> PoolUnavailable:
        """What a lookup that waited ``timeout`` seconds for a connection gets."""
        return PoolUnavailable(f"{self.name}: all {self.size} connections busy for {timeout:g}s")

    def _forget(self, waiter: asyncio.Future[bool]) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass

    def _release_slot(self) -> None:
        """A slot is free: to the first live waiter, else back to the count."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return
        self._free += 1

    def release(
        self,
        lease: Lease[C, E],
        reusable: bool = True,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """Give a connection back; ``reusable=False`` closes it (it failed in use).
        ``loop``: the running loop, as for ``lend``."""
        self.in_use -= 1
        if reusable and self._loop is not None:
            lease.last_used = time.monotonic()
            self._idle.append(lease)  # from another loop: closed when the pool rebinds
        else:
            self._dispose(lease)
        if self._loop is not None and (loop or _get_running_loop()) is self._loop:
            if self._waiters:
                self._release_slot()
            else:
                self._free += 1

    def suspect(self, lease: Lease[C, E]) -> None:
        """The connection failed in use: its idle siblings to that server go too."""
        stale = [idle for idle in self._idle if idle.endpoint is lease.endpoint]
        for idle in stale:
            self._idle.remove(idle)
            self._dispose(idle)

    def discard_idle(self) -> None:
        idle, self._idle = self._idle, []
        for lease in idle:
            self._dispose(lease)

    close = discard_idle

    # --- reuse --------------------------------------------------------------------------
    def _take_idle(self) -> Lease[C, E] | None:
        """The most recently released idle connection that can be used as it is;
        expired ones are closed; None also when the top one needs a health check."""
        idle = self._idle
        while idle:
            lease = idle[-1]
            now = time.monotonic()
            if self._expired(lease, now) or (
                self._usable is not None and not self._usable(lease.connection)
            ):
                idle.pop()
                self._dispose(lease)
                continue
            if self.health_check is not None and now - lease.last_used > self.check_after:
                return None
            return idle.pop()
        return None

    async def _reuse(self) -> Lease[C, E] | None:
        while self._idle:
            lease = self._idle.pop()
            now = time.monotonic()
            if self._expired(lease, now) or (
                self._usable is not None and not self._usable(lease.connection)
            ):
                self._dispose(lease)
                continue
            if (
                self.health_check is not None
                and now - lease.last_used > self.check_after
                and not await self._healthy(lease)
            ):
                self._dispose(lease)
                continue
            return lease
        return None

    def _expired(self, lease: Lease[C, E], now: float) -> bool:
        if self.idle_limit is not None and now - lease.last_used > self.idle_limit:
            return True
        return self.age_limit is not None and now - lease.created > self.age_limit

    async def _healthy(self, lease: Lease[C, E]) -> bool:
        assert self.health_check is not None
        try:
            async with asyncio.timeout(self.connect_timeout):
                return bool(await self.health_check(lease.connection))
        except Exception:  # noqa: BLE001 - any failure of the check means "not healthy"
            return False

    # --- new connections ----------------------------------------------------------------
    async def _open(self) -> Lease[C, E]:
        reasons = []
        for attempt, state in enumerate(self._candidates()):
            if attempt:
                self.failovers += 1
            state.probing = state.down
            try:
                connection = await asyncio.wait_for(
                    self._connect(state.endpoint), self.connect_timeout
                )
            except Exception as exc:  # noqa: BLE001 - OSError, timeout, a driver's own type
                self._mark_down(state, failure_reason(exc))
                reasons.append(f"{state.label}: {state.reason}")
                continue
            finally:
                state.probing = False
            self._mark_up(state)
            self.connects += 1
            return Lease(connection, state)
        if not reasons:
            reasons = [f"{s.label}: {s.reason}" for s in self._states]
            raise PoolUnavailable(f"{self.name}: no server available ({'; '.join(reasons)})")
        raise PoolUnavailable(f"{self.name}: cannot connect ({'; '.join(reasons)})")

    def _candidates(self) -> list[EndpointState[E]]:
        """Servers worth a connect now: up ones, and down ones whose back-off is over
        and that no other lookup is probing."""
        now = time.monotonic()
        states = self._order(list(self._states)) if self._order else list(self._states)
        return [s for s in states if not s.down or (now >= s.down_until and not s.probing)]

    def _mark_down(self, state: EndpointState[E], reason: str) -> None:
        if not state.down:
            log.warning("%s: cannot connect to %s: %s", self.name, state.label, reason)
        state.backoff = min(self.backoff_max, max(self.backoff_min, state.backoff * 2))
        state.down_until = time.monotonic() + state.backoff
        state.reason = reason

    def _mark_up(self, state: EndpointState[E]) -> None:
        if state.down:
            log.info("%s: connected to %s again", self.name, state.label)
        state.backoff = 0.0
        state.down_until = 0.0
        state.reason = ""

    # --- plumbing -------------------------------------------------------------------------
    def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            idle, self._idle = self._idle, []
            for lease in idle:  # they belong to a loop that is gone: close what closes
                self._dispose(lease, schedule=False)
            self.in_use = 0
            self.waiting = 0
            self._loop = loop
            self._bound.bind(loop)
            self._free = self.size
            self._waiters = deque()

    def running_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop: the pool's own when it runs on this thread (no system call),
        else asyncio's lookup (on Python 3.11 a getpid() system call each time)."""
        return self._bound.running() or asyncio.get_running_loop()

    def _dispose(self, lease: Lease[C, E], schedule: bool = True) -> None:
        try:
            outcome = self._close(lease.connection)
        except Exception:  # noqa: BLE001 - closing a broken connection may fail too
            return
        if not hasattr(outcome, "__await__"):  # a driver whose close() is a coroutine
            return
        if schedule and _running_loop() is not None:
            asyncio.ensure_future(outcome).add_done_callback(_ignore_failure)
        elif asyncio.iscoroutine(outcome):
            outcome.close()


# The running loop or None, without an exception when there is none.
_get_running_loop = asyncio._get_running_loop


def _running_loop() -> asyncio.AbstractEventLoop | None:
    return _get_running_loop()


class _CallbackWaiter(Generic[C, E]):
    """``lend_later``'s place in the waiters' queue, where it stands for a future
    (``done``, ``set_result``): a granted slot becomes a lease for ``deliver``."""

    __slots__ = ("pool", "deliver", "timeout", "over")

    def __init__(
        self,
        pool: ConnectionPool[C, E],
        deliver: Callable[[Lease[C, E] | Exception], object],
        timeout: float,
    ) -> None:
        self.pool = pool
        self.deliver = deliver
        self.timeout = timeout
        self.over = False

    def done(self) -> bool:
        return self.over

    def set_result(self, granted: bool) -> None:
        if self.over:
            return
        self.over = True
        pool = self.pool
        pool.waiting -= 1
        pool.sweeper.unwatch(self)
        if not granted:
            pool._forget(self)  # type: ignore[arg-type]  # a future's stand-in
            self.deliver(pool.busy_for(self.timeout))
            return
        try:
            lease = pool._take_recent() if pool._idle else None
        except Exception as exc:  # noqa: BLE001 - the deliverer answers it
            pool._release_slot()
            self.deliver(exc)
            return
        if lease is None:  # a connection to check or to open: that waits
            task = asyncio.ensure_future(pool._lease_in_slot())
            task.add_done_callback(self._leased)
            return
        pool.in_use += 1
        self.deliver(lease)

    def _leased(self, task: asyncio.Future[Lease[C, E]]) -> None:
        if task.cancelled():
            self.deliver(PoolUnavailable(f"{self.pool.name}: closed"))
            return
        failure = task.exception()
        self.deliver(task.result() if failure is None else _as_exception(failure))

    def expire(self) -> None:
        self.set_result(False)


class ReadWaiter:
    """A driver's read waiter that is not a future: the driver's data callback calls
    ``set_result`` (after ``done``), and the answer is read in that same callback
    (``_read``), for a started lookup. An exception there is the subclass's
    ``_broken``, never the driver's."""

    __slots__ = ()
    over: bool

    def done(self) -> bool:
        return self.over

    def set_result(self, _result: None) -> None:
        if self.over:
            return
        try:
            self._read()
        except Exception as exc:  # noqa: BLE001 - never into the driver's callback
            self._broken(exc)

    def _read(self) -> None:
        raise NotImplementedError

    def _broken(self, exc: Exception) -> None:
        """``_read`` failed (a bug): end the lookup (``over``) with RETRY."""
        raise NotImplementedError


def start_on_lease(
    pool: ConnectionPool[C, E],
    lease: Lease[C, E] | Exception,
    start: Callable[[Lease[C, E]], object],
    answer: Callable[[Exception], object],
    table: Table,
) -> None:
    """``lend_later``'s delivery to a started lookup: ``start`` it on the lease, or
    ``answer`` the failure (PoolUnavailable, as ``acquire`` raises it). It runs inside
    the ``release`` that freed the slot, so nothing may escape: a bug is RETRY,
    logged, and the lease is closed."""
    try:
        if isinstance(lease, Exception):
            answer(lease)
            return
        try:
            start(lease)
        except Exception:
            pool.release(lease, reusable=False)
            raise
    except Exception as exc:
        log.error("%s: lookup failed: %r", table.spec, exc, exc_info=exc)
        answer(DictRetry(f"{table.spec}: lookup failed: {exc!r}"))


def _as_exception(failure: BaseException) -> Exception:
    return failure if isinstance(failure, Exception) else PoolUnavailable(str(failure))


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class Sweeper:
    """Deadlines of many short operations on one coarse timer.

    A timer per operation is dear: uvloop's call_at plus cancel costs ~3.5 us,
    asyncio.timeout ~7.5 us, a tenth of a database lookup. Here an operation is
    an entry in a dict, and one timer, armed only while something is watched,
    looks every ``resolution`` seconds for entries past their deadline and calls
    their ``expire``: a deadline is met up to ``resolution`` late.
    """

    __slots__ = ("resolution", "_watched", "_loop", "_timer")

    def __init__(self, resolution: float = 0.05) -> None:
        self.resolution = resolution
        self._watched: dict[object, tuple[float, Callable[[], object]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def watch(
        self,
        key: object,
        deadline: float,
        expire: Callable[[], object],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """Call ``expire`` once the loop's time passes ``deadline``, unless
        ``unwatch(key)`` comes first. Must run in an event loop; ``loop`` is the
        running one, when the caller has it (as for ``ConnectionPool.lend``)."""
        loop = loop or _get_running_loop()
        if loop is not self._loop:  # a new loop (tests): what the old one watched is gone
            self._watched.clear()
            self._loop = loop
            self._timer = None
        self._watched[key] = (deadline, expire)
        if self._timer is None:
            assert loop is not None
            self._timer = loop.call_later(self.resolution, self._sweep)

    def unwatch(self, key: object) -> None:
        self._watched.pop(key, None)

    def watching(self, key: object) -> bool:
        """Whether ``key`` is still watched: False once its ``expire`` was called."""
        return key in self._watched

    def deadline(self, when: float | None) -> SweptTimeout:
        """``async with``: asyncio.timeout_at on this sweeper (loop time; None: none)."""
        return SweptTimeout(self, when)

    def timeout(self, delay: float | None) -> SweptTimeout:
        """``async with``: asyncio.timeout on this sweeper (seconds; None: none)."""
        return SweptTimeout(self, None if delay is None else _loop_time() + delay)

    def _sweep(self) -> None:
        self._timer = None
        watched = self._watched
        if not watched or self._loop is None:
            return
        now = self._loop.time()
        due = [key for key, (deadline, _) in watched.items() if deadline <= now]
        for key in due:
            _, expire = watched.pop(key)
            try:
                expire()
            except Exception:  # one failing callback must not stop the rest
                log.exception("deadline callback failed")
        if watched:
            self._timer = self._loop.call_later(self.resolution, self._sweep)


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


class SweptTimeout:
    """What asyncio.timeout does -- past the deadline the task is cancelled and the
    block raises TimeoutError -- with the deadline on a ``Sweeper``."""

    __slots__ = ("sweeper", "when", "task", "fired")

    def __init__(self, sweeper: Sweeper, when: float | None) -> None:
        self.sweeper = sweeper
        self.when = when
        self.task: asyncio.Task | None = None
        self.fired = False

    async def __aenter__(self) -> SweptTimeout:
        if self.when is not None:
            self.task = asyncio.current_task()
            self.sweeper.watch(self, self.when, self._fire)
        return self

    def _fire(self) -> None:
        # The task waits inside the block (the sweeper watches only meanwhile), so the
        # cancellation arrives there as CancelledError.
        self.fired = True
        assert self.task is not None
        self.task.cancel()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.when is None:
            return
        self.sweeper.unwatch(self)
        if (
            self.fired
            and kind is not None
            and issubclass(kind, asyncio.CancelledError)
            and self.task is not None
            and self.task.uncancel() == 0
        ):
            raise TimeoutError from error


class _Borrowed(Generic[C, E]):
    """``pool.connection(timeout)``: lends on entry; gives back on exit, discarding
    the connection when the block raised. (A class: cheaper than a generator-based
    context manager.)"""

    __slots__ = ("pool", "timeout", "lease")

    def __init__(self, pool: ConnectionPool[C, E], timeout: float | None) -> None:
        self.pool = pool
        self.timeout = timeout
        self.lease: Lease[C, E] | None = None

    async def __aenter__(self) -> Lease[C, E]:
        lease = self.pool.lend() or await self.pool.acquire(self.timeout)
        self.lease = lease
        return lease

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        lease, self.lease = self.lease, None
        if lease is not None:
            self.pool.release(lease, reusable=kind is None)


def _ignore_failure(task: asyncio.Future[object]) -> None:
    if not task.cancelled():
        task.exception()


def failure_reason(exc: BaseException) -> str:
    """How a connection failure reads in a log line or a RETRY reason."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    return str(exc) or exc.__class__.__name__


class OutageLog:
    """One warning when something starts failing, one line when it works again.

    For failures the pool does not see (a query error on a good connection, a server
    that answers with errors): a table calls ``failed`` on every failure and ``ok`` on
    every success; only the transitions are logged, so an outage is one line, not one
    per lookup.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.failing = False
        self.failures = 0

    def failed(self, reason: str) -> None:
        self.failures += 1
        if not self.failing:
            self.failing = True
            log.warning("%s: %s", self.name, reason)

    def ok(self) -> None:
        if self.failing:
            self.failing = False
            log.info("%s: lookups succeed again after %d failed", self.name, self.failures)
            self.failures = 0
