"""The proxymap request handler: approval, table instances, flags, status mapping.

NAME
    handler -- turn one well-formed proxymap request into a reply

SYNOPSIS
    handler = RequestHandler("proxymap", approved_tables(params, "proxymap"), params)
    reply = handler.handle(request)          # a Reply, or an awaitable of one
    name = handler.changed_table()           # before accept(): restart if not None

DESCRIPTION
    Per request, in Postfix's order (docs/PROTOCOL.md section 2.7):

    1. update/delete on the read-only service: warning, DENY (before approval).
    2. Every leading ``proxy:`` is removed; a name without ``:`` is BAD.
    3. A name outside the approved set: two warnings, DENY.
    4. The shared table instance is fetched or opened (O_RDONLY for proxymap,
       O_RDWR|O_CREAT for proxywrite). Opening never fails: an unusable table is
       a surrogate that answers RETRY.
    5. The instance's flags are set, the operation runs, and the outcome is mapped:
       value -> OK; absent -> NOKEY; update/delete/sequence 0 -> OK, else NOKEY;
       DictRetry and DictUnsupported (logged) -> RETRY; other DictError -> CONFIG.

    Instances and flags follow the client generation. The oracle is a *direct*
    ``postmap -q`` by the same client, not the Postfix 3.7 server's quirks:

    * 3.11+ clients (G2): one instance per (name, open mode, instance_flags), opened
      with those flags plus the UTF-8 layer when they ask UTF8_REQUEST and
      ``smtputf8_enable = yes``. Each request runs with its own complete flag word
      (update adds SYNC_UPDATE|DUP_REPLACE, delete SYNC_UPDATE); the reply carries the
      flags after the operation; ``open`` answers the flags of the fresh instance.
    * 3.7-3.10 clients (G1): one instance per (name, open mode, instance bits of the
      request). It is opened with FOLD_FIX|DUP_WARN|UTF8_REQUEST added, so that text
      tables fold their keys at load time as a direct postmap would, and texthash
      duplicates keep the first value. There is no server-side UTF-8 layer: the G1
      client has its own. Each request keeps the instance's non-request bits (so the
      TRY0NULL/TRY1NULL learning persists) and takes the request bits from the
      client. ``open`` answers the fresh flags without request bits: no cross-talk.

    Flag sanitising: OPEN_LOCK and BULK_UPDATE (postmap's build-time locking) are
    never passed to a table -- an exclusive lock held for the life of a server
    process would block every other user of the file. They are echoed back in
    the reply flags, so a G2 client's flag word round-trips unchanged. A G2
    request whose flags carry neither TRY0NULL nor TRY1NULL for a table that uses
    them gets the instance's fresh TRY bits (Postfix would abort).

    A sequence "next" with no "first" before it on that instance is answered as
    "first".

    Fast path: ``compile_lookup(request)`` returns a function key -> encoded reply
    for every lookup that differs from ``request`` only in its key; it does what
    ``handle`` and ``encode_reply`` do, minus the per-request routing, flag
    arithmetic and ``Reply`` objects. For an asynchronous table the function gives
    a coroutine of the encoded reply (``SlowLookup``: one coroutine frame over the
    table's, where the general path has ``_counted_async`` and ``_run_async``). The
    session keeps these functions in ``lookup_shortcuts`` under the request bytes
    that precede the key.

    G1 and G2 instances of one table are never shared. A table has at most 8 instances
    (``proxymap.instances``): a request that would open another gets RETRY. Member tables of
    pipemap/unionmap are opened through ``open_nested``, which adds the UTF-8 layer
    whenever their flags ask for it, as Postfix's dict_open does, in both generations.

    Synchronous tables are answered inline (the hot path: one dict hit finds the
    instance for a repeated (table, generation, instance flags)); asynchronous
    tables get a coroutine that the caller awaits. So does a synchronous operation
    that raised DictBusy (a writer holds the table file locked): the coroutine tries
    it again after 1, 2, 4 ... 50 ms until the lock is gone, where Postfix would wait
    in flock() with all its clients; a compiled lookup then answers None and the
    session takes the general path.

    Result cache (``proxymap.cache``, off by default): an asynchronous instance of a
    table named in ``pyproxymap_cache_maps`` gets its table's cache when it is
    opened. A lookup with a fresh entry is answered inline, as a local table's (so
    does the compiled lookup); a miss awaits ``TableCache.fill`` (one query per key,
    stale entries when the backend fails temporarily). An update or delete
    invalidates the key. Synchronous tables never see the cache: their paths are
    unchanged.

BUGS
    An asynchronous table shares one flag word between concurrent requests on the
    same instance; the handler sets it right before each call, so a driver must
    read what it needs from ``flags`` before its first ``await``. Replies report
    the flags the request ran with. A compiled G1 lookup takes the instance's own
    bits from the shared word when it starts, the general path when it is handled
    (a turn of the event loop earlier).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass, replace
from time import perf_counter
from typing import Any, cast

from proxymap import flags as F
from proxymap.cache import ANSWER_BITS, MAPS, CacheKey, CacheSettings, TableCache
from proxymap.instances import InstanceLimit
from proxymap.protocol import (
    BAD,
    CONFIG,
    DENY,
    G1,
    G2,
    LOOKUP_END,
    NOKEY,
    OK,
    RETRY,
    Reply,
    Request,
    encode_reply,
    g2_lookup_templates,
    lookup_replies,
)
from proxymap.stats import StatsSettings, TableStats
from proxymap.tables import open_table
from proxymap.tables.base import (
    BUSY_PAUSE_MAX,
    BUSY_PAUSE_MIN,
    LATER,
    STARTED,
    AsyncTable,
    DictBusy,
    DictConfig,
    DictError,
    DictRetry,
    DictUnsupported,
    OpenContext,
    SyncTable,
    Table,
)
from proxymap.tables.utf8 import activate, utf8_wanted

log = logging.getLogger("proxymap")

WRITER_SERVICE = "proxywrite"
_PROXY = "proxy:"
# Build-time locking bits that must never reach a long-lived server table (see above).
_SANITISED = F.OPEN_LOCK | F.BULK_UPDATE
_UPDATE_EXTRA = F.SYNC_UPDATE | F.DUP_REPLACE
_DELETE_EXTRA = F.SYNC_UPDATE
# What the G1 instance is opened with on top of the client's instance bits: what a
# direct postmap -q opens with, minus LOCK (a request bit the client sends anyway).
_G1_OPEN_EXTRA = F.FOLD_FIX | F.DUP_WARN | F.UTF8_REQUEST
# Routes are cheap to rebuild; the bound only stops a client that cycles through
# endless flag words from growing the cache without limit.
_MAX_ROUTES = 4096
# Denied table names get figures of their own up to this many; the rest share one.
MAX_DENIED_NAMES = 64
OTHER_DENIED = "(other unapproved tables)"
# G1 lookup replies carry no flags (docs/PROTOCOL.md 2.5): a constant head before the value
# of a hit, a constant reply for a miss. G2 replies carry the flags after the lookup.
_G1_FOUND, _G1_NOT_FOUND = lookup_replies(G1)
_G2_FOUND, _G2_NOT_FOUND = g2_lookup_templates()

# A compiled lookup answers with the encoded reply, an awaitable of it (an asynchronous
# table), or None when the request must take the general path after all (the table is
# locked by a writer: see DictBusy).
LookupFunction = Callable[[bytes], bytes | Awaitable[bytes] | None]


@dataclass(slots=True, eq=False)
class Instance:
    """A shared table instance and what the handler remembers about it."""

    table: Table
    fresh_flags: int  # flags right after the open
    open_reply: int  # what an ``open`` request is answered with
    registered_name: str  # for "table <name> has changed -- restarting"
    sequence_started: bool = False
    cache: TableCache | None = None  # pyproxymap_cache_maps names it (asynchronous only)
    cache_token: int = 0  # this instance in its table's cache keys
    stats: TableStats | None = None  # its table's live figures (pyproxymap_statistics)


@dataclass(slots=True, frozen=True)
class Refusal:
    """A cached BAD or DENY decision for a raw table name."""

    status: int
    canonical: str


def canonical_name(table: str) -> str:
    """Remove every leading ``proxy:`` (the server never proxies to itself)."""
    while table.startswith(_PROXY):
        table = table[len(_PROXY) :]
    return table


def parse_bool(params: Mapping[str, str], name: str, default: bool) -> bool:
    """A main.cf boolean; MainConfig's own parser when it has one."""
    if name not in params:
        return default
    get_bool = getattr(params, "get_bool", None)
    if get_bool is not None:
        return bool(get_bool(name))
    return params[name].strip().lower() == "yes"


def _cached_reply(
    value: bytes | None, stats: TableStats | None, found: bytes, not_found: bytes
) -> bytes:
    """A cached answer, encoded with the reply heads of its generation, and counted."""
    if stats is not None:
        stats.lookups += 1
        if value is None:
            stats.misses += 1
    if value is None:
        return not_found
    if 0 in value:  # the byte value: `b"\x00" in value` raises and clears a TypeError
        value = value[: value.index(b"\x00")]
    return found + value + LOOKUP_END


class RequestHandler:
    """Answers proxymap/proxywrite requests against the approved tables."""

    def __init__(self, service_name: str, approved, params: Mapping[str, str]) -> None:
        self.service_name = service_name
        self.writer = service_name == WRITER_SERVICE
        self.approved = frozenset(approved)
        self.params = params
        self.open_mode = os.O_RDWR | os.O_CREAT if self.writer else os.O_RDONLY
        self.utf8_enabled = parse_bool(params, "smtputf8_enable", True)
        self.context = OpenContext(
            params=params, open_table=self.open_nested, utf8_enabled=self.utf8_enabled
        )
        self.legacy_context = replace(self.context, legacy_client=True)
        self._routes: dict[tuple[str, int, int], Instance | Refusal] = {}
        #: Filled by the sessions: request bytes before the key -> compiled lookup
        #: (None: that request shape takes the general path).
        self.lookup_shortcuts: dict[bytes, LookupFunction | None] = {}
        self._instances: dict[tuple[str, int, int, int], Instance] = {}
        self.instance_limit = InstanceLimit()
        self.cache_settings = CacheSettings.from_params(params)
        #: canonical table name -> the result cache of its instances (pyproxymap_cache_*)
        self.caches: dict[str, TableCache] = {}
        self.stats_settings = StatsSettings.from_params(params)
        #: canonical table name -> its live figures (None: pyproxymap_statistics = no)
        self.statistics: dict[str, TableStats] | None = {} if self.stats_settings.enabled else None
        self.bad = 0  # requests answered BAD (not a table's figure)
        self.lock_waits = 0  # requests waiting for a table file a writer holds locked
        self._denied_names = 0  # unapproved names with figures of their own
        access = "read-write" if self.writer else "read-only"
        parameter = "proxy_write_maps" if self.writer else "proxy_read_maps"
        self._approve_hint = (
            f"to approve this table for {access} access, list proxy:%s in main.cf:{parameter}"
        )

    # --- opening ---------------------------------------------------------------------------
    def open_nested(self, spec: str, open_mode: int, flags: int) -> Table:
        """Open a member table (pipemap/unionmap) the way Postfix's dict_open does."""
        table = open_table(spec, open_mode, flags & ~_SANITISED, self.context)
        if utf8_wanted(flags, self.utf8_enabled):
            table = activate(table)
        return table

    def _instance(self, canonical: str, generation: int, instance_flags: int) -> Instance:
        key = (canonical, self.open_mode, generation, instance_flags)
        instance = self._instances.get(key)
        if instance is None:
            if not self.instance_limit.admits(canonical):  # not kept: proxymap.instances
                return self._open_instance(
                    canonical, generation, instance_flags, self.instance_limit.stand_in
                )
            self.instance_limit.opened(canonical)
            instance = self._open_instance(canonical, generation, instance_flags)
            if self.cache_settings.wants(canonical):
                self._attach_cache(canonical, instance)
            stats = self.table_stats(canonical)
            if stats is not None:
                instance.stats = stats
                stats.tables.append(instance.table)
                stats.asynchronous = stats.asynchronous or instance.table.asynchronous
            self._instances[key] = instance
        return instance

    def table_stats(self, canonical: str) -> TableStats | None:
        """The live figures of a table name (made on first use); None when off."""
        statistics = self.statistics
        if statistics is None:
            return None
        stats = statistics.get(canonical)
        if stats is None:
            stats = statistics[canonical] = TableStats(
                canonical, self.stats_settings.slow_threshold
            )
        return stats

    def _attach_cache(self, canonical: str, instance: Instance) -> None:
        """Give the instance its table's cache; local tables are never cached."""
        table = instance.table
        if not table.asynchronous:
            if not table.flags & F.SURROGATE:  # an open failure is logged already
                log.warning("%s: %s is a local table, it is not cached", MAPS, canonical)
            return
        cache = self.caches.get(canonical)
        if cache is None:
            cache = self.caches[canonical] = TableCache(
                canonical, self.cache_settings, track_writes=self.writer
            )
        instance.cache = cache
        instance.cache_token = len(self._instances)

    def _open_instance(
        self,
        canonical: str,
        generation: int,
        instance_flags: int,
        stand_in: Callable[[str, int, int], Table] | None = None,
    ) -> Instance:
        """The instance, or with stand_in (beyond the bound) its unavailable stand-in."""
        echo = instance_flags & _SANITISED
        if generation == G2:
            table = (stand_in or self.open_nested)(canonical, self.open_mode, instance_flags)
            fresh = table.flags
            open_reply = fresh | echo
            registered = f"{canonical}({self.open_mode:o},{F.flag_names(instance_flags)})"
        else:
            flags = (instance_flags | _G1_OPEN_EXTRA) & ~_SANITISED
            if stand_in is not None:
                table = stand_in(canonical, self.open_mode, flags)
            else:
                table = open_table(canonical, self.open_mode, flags, self.legacy_context)
            fresh = table.flags
            open_reply = fresh & ~F.RQST_MASK & ~F.SURROGATE
            registered = f"{canonical}:{F.flag_names(instance_flags)}"
        return Instance(table, fresh, open_reply, registered)

    # --- routing: name -> instance ------------------------------------------------------
    def _route(self, raw: str, generation: int, instance_flags: int) -> Instance | Refusal:
        canonical = canonical_name(raw)
        if ":" not in canonical:
            return Refusal(BAD, canonical)
        if canonical not in self.approved:
            return Refusal(DENY, canonical)
        return self._instance(canonical, generation, instance_flags)

    def _routed(self, req: Request) -> Instance | Refusal:
        selector = req.instance_flags if req.generation == G2 else req.flags & F.INST_MASK
        route_key = (req.table, req.generation, selector)
        instance = self._routes.get(route_key)
        if instance is None:
            instance = self._route(req.table, req.generation, selector)
            if len(self._routes) >= _MAX_ROUTES:
                self._routes.clear()
            self._routes[route_key] = instance
        return instance

    def _refuse(self, refusal: Refusal) -> Reply:
        if refusal.status == DENY:
            log.warning('request for unapproved table: "%s"', refusal.canonical)
            log.warning(self._approve_hint, refusal.canonical)
            self._count_denied(refusal.canonical)
        else:
            self.bad += 1
        return Reply(refusal.status)

    def _count_denied(self, canonical: str) -> None:
        """A DENY, under the table's name; a client that cycles through names it may not
        use does not grow the figures without bound."""
        statistics = self.statistics
        if statistics is None:
            return
        if canonical not in statistics and canonical not in self.approved:
            if self._denied_names >= MAX_DENIED_NAMES:
                canonical = OTHER_DENIED
            else:
                self._denied_names += 1
        stats = self.table_stats(canonical)
        assert stats is not None
        stats.deny += 1

    # --- requests ------------------------------------------------------------------------
    def handle(self, req: Request) -> Reply | Awaitable[Reply]:
        op = req.op
        if (op == "update" or op == "delete") and not self.writer:
            log.warning("refusing %s %s request on non-proxywrite service", req.table, op)
            self._count_denied(canonical_name(req.table))
            return Reply(DENY)
        g2 = req.generation == G2
        instance = self._routed(req)
        if isinstance(instance, Refusal):
            return self._refuse(instance)
        if op == "open":
            return Reply(OK, instance.open_reply)
        if op == "sequence" and req.function not in (0, 1):
            self.bad += 1
            return Reply(BAD)

        table = instance.table
        if g2:
            flags = req.flags
            if not flags & F.TRY_ANY:
                flags |= instance.fresh_flags & F.TRY_ANY
        else:
            flags = (table.flags & ~F.RQST_MASK) | (req.flags & F.RQST_MASK)
        if op == "update":
            flags |= _UPDATE_EXTRA
        elif op == "delete":
            flags |= _DELETE_EXTRA
        echo = req.flags & _SANITISED
        flags &= ~_SANITISED
        if table.asynchronous:
            if op == "lookup" and instance.cache is not None:
                entry = instance.cache.fresh((instance.cache_token, flags & ANSWER_BITS, req.key))
                if entry is not None:  # a hit: answered inline, like a local table
                    if instance.stats is not None:
                        instance.stats.count(op, NOKEY if entry.value is None else OK)
                    if entry.value is None:
                        return Reply(NOKEY, flags | echo)
                    return Reply(OK, flags | echo, value=entry.value)
            if instance.stats is not None:
                return self._counted_async(instance, req, flags, echo)
            return self._run_async(instance, req, flags, echo)
        function = self._sequence_function(instance, req.function) if op == "sequence" else 0
        table.flags = flags
        try:
            if instance.stats is not None:
                return self._counted_sync(instance, req, echo, function)
            return self._run_sync(instance, req, echo, function)
        except DictBusy:
            return self._when_unlocked(instance, req, flags, echo, function)

    def _counted_sync(self, instance: Instance, req: Request, echo: int, function: int) -> Reply:
        """``_run_sync`` with its figures: counted, and timed as the table is sampled."""
        stats = instance.stats
        assert stats is not None
        if req.op == "lookup" and not (stats.lookups + 1) & stats.sample_mask:
            started = perf_counter()
            reply = self._run_sync(instance, req, echo, function)
            stats.record(perf_counter() - started)
        else:
            reply = self._run_sync(instance, req, echo, function)
        stats.count(req.op, reply.status)
        return reply

    async def _counted_async(
        self, instance: Instance, req: Request, flags: int, echo: int
    ) -> Reply:
        """``_run_async`` with its figures: every lookup is timed."""
        stats = instance.stats
        assert stats is not None
        started = perf_counter()
        reply = await self._run_async(instance, req, flags, echo)
        if req.op == "lookup":
            stats.record(perf_counter() - started)
        stats.count(req.op, reply.status)
        return reply

    def _run_sync(self, instance: Instance, req: Request, echo: int, function: int) -> Reply:
        """One operation on a synchronous table; DictBusy passes through."""
        table: SyncTable = instance.table  # type: ignore[assignment]  # not asynchronous
        op = req.op
        try:
            if op == "lookup":
                value = table.lookup(req.key)
                if value is None:
                    return Reply(NOKEY, table.flags | echo)
                return Reply(OK, table.flags | echo, value=value)
            if op == "update":
                return Reply(
                    OK if table.update(req.key, req.value) == 0 else NOKEY, table.flags | echo
                )
            if op == "delete":
                return Reply(OK if table.delete(req.key) == 0 else NOKEY, table.flags | echo)
            if op == "sequence":
                entry = table.sequence(function)
                if entry is None:
                    return Reply(NOKEY, table.flags | echo)
                return Reply(OK, table.flags | echo, key=entry[0], value=entry[1])
        except DictBusy:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            return Reply(self._error_status(exc, instance, op), table.flags | echo)
        return Reply(BAD)

    async def _when_unlocked(
        self, instance: Instance, req: Request, flags: int, echo: int, function: int
    ) -> Reply:
        """Try again, pausing in between, until the writer's lock is gone.

        As long as Postfix would wait in flock(), but on the event loop: this client's
        later requests wait behind this one, the other clients are served meanwhile.
        """
        pause = BUSY_PAUSE_MIN
        self.lock_waits += 1
        try:
            while True:
                await asyncio.sleep(pause)
                instance.table.flags = flags  # other requests may have run in between
                try:
                    reply = self._run_sync(instance, req, echo, function)
                except DictBusy:
                    pause = min(pause * 2, BUSY_PAUSE_MAX)
                    continue
                if instance.stats is not None:
                    instance.stats.count(req.op, reply.status)
                return reply
        finally:
            self.lock_waits -= 1

    # --- the fast path ------------------------------------------------------------------
    def compile_lookup(self, req: Request) -> LookupFunction | None:
        """A function answering, already encoded, every lookup like ``req`` but its key.

        ``compile_lookup(req)(key)`` equals ``encode_reply("lookup", generation,
        handle(req with key))``: same table instance, same flags before and after,
        same status mapping, same figures. For an asynchronous table it is a coroutine
        of those bytes (a fresh cache entry's bytes at once). None for a refusal
        (logged per request).
        """
        if req.op != "lookup":
            return None
        instance = self._routed(req)
        if isinstance(instance, Refusal):
            return None
        if instance.table.asynchronous:
            return self._compile_async(req, instance)
        table = cast(SyncTable, instance.table)
        echo = req.flags & _SANITISED
        error_status = self._error_status
        stats = instance.stats

        def failed(exc: Exception, generation: int) -> bytes:
            status = error_status(exc, instance, "lookup")
            if stats is not None:
                stats.failed(status)
            return encode_reply("lookup", generation, Reply(status, table.flags | echo))

        if req.generation == G2:
            flags = _g2_flags(req, instance)
            if stats is not None:
                return _counted_g2(table, flags, echo, stats, failed)

            def lookup_g2(key: bytes) -> bytes | None:
                table.flags = flags
                try:
                    value = table.lookup(key)
                except DictBusy:
                    return None
                except Exception as exc:  # noqa: BLE001 - every failure becomes a status
                    return failed(exc, G2)
                reply_flags = (table.flags | echo) & F.ALL
                if value is None:
                    return _G2_NOT_FOUND % reply_flags
                if 0 in value:
                    value = value[: value.index(b"\x00")]
                return _G2_FOUND % (reply_flags, value)

            return lookup_g2

        # G1: the instance keeps its own bits (TRY learning), the client sets the others.
        kept_bits = ~F.RQST_MASK & ~_SANITISED
        request_bits = req.flags & F.RQST_MASK & ~_SANITISED
        if stats is not None:
            return _counted_g1(table, kept_bits, request_bits, stats, failed)

        def lookup_g1(key: bytes) -> bytes | None:
            table.flags = (table.flags & kept_bits) | request_bits
            try:
                value = table.lookup(key)
            except DictBusy:
                return None
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status
                return failed(exc, G1)
            if value is None:
                return _G1_NOT_FOUND
            if 0 in value:
                value = value[: value.index(b"\x00")]
            return _G1_FOUND + value + LOOKUP_END

        return lookup_g1

    def _compile_async(self, req: Request, instance: Instance) -> LookupFunction:
        """The fast path of an asynchronous table: a coroutine of the encoded reply per
        key; with the result cache, a fresh entry's reply at once (as ``handle``)."""
        echo = req.flags & _SANITISED
        if req.generation == G2:
            kept_bits, request_bits = 0, _g2_flags(req, instance)
            found, not_found = lookup_replies(G2, request_bits | echo)
        else:
            kept_bits = ~F.RQST_MASK & ~_SANITISED
            request_bits = req.flags & F.RQST_MASK & ~_SANITISED
            found, not_found = _G1_FOUND, _G1_NOT_FOUND
        slow = SlowLookup(
            instance,
            cast(AsyncTable, instance.table),
            kept_bits,
            request_bits,
            echo,
            req.generation,
            found,
            not_found,
            self._error_status,
        )
        if instance.cache is not None:
            return slow.cached
        if slow.table.starts:
            return slow.answer_start if instance.stats is None else slow.answer_start_counted
        if slow.table.answers_now:
            return slow.answer_now if instance.stats is None else slow.answer_now_counted
        return slow.answer if instance.stats is None else slow.answer_counted

    async def _run_async(self, instance: Instance, req: Request, flags: int, echo: int) -> Reply:
        # Flags are set here, not in handle(): other requests may run in between.
        # The reply reports the flags this request ran with: with concurrent
        # requests on one instance the table's own word may belong to another.
        table: AsyncTable = instance.table  # type: ignore[assignment]  # asynchronous
        op = req.op
        table.flags = flags
        reply_flags = flags | echo
        cache = instance.cache
        try:
            if op == "lookup":
                if cache is None:
                    value = await table.alookup(req.key)
                else:
                    value = await cache.fill(
                        self._cache_key(instance, flags, req.key),
                        lambda: _flagged_lookup(table, flags, req.key),
                    )
                if value is None:
                    return Reply(NOKEY, reply_flags)
                return Reply(OK, reply_flags, value=value)
            if op == "update":
                try:
                    status = await table.aupdate(req.key, req.value)
                finally:
                    if cache is not None:  # even a failed write may have been done
                        cache.invalidate(req.key)
                return Reply(OK if status == 0 else NOKEY, reply_flags)
            if op == "delete":
                try:
                    status = await table.adelete(req.key)
                finally:
                    if cache is not None:
                        cache.invalidate(req.key)
                return Reply(OK if status == 0 else NOKEY, reply_flags)
            if op == "sequence":
                entry = await table.asequence(self._sequence_function(instance, req.function))
                if entry is None:
                    return Reply(NOKEY, reply_flags)
                return Reply(OK, reply_flags, key=entry[0], value=entry[1])
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            return Reply(self._error_status(exc, instance, op), reply_flags)
        return Reply(BAD)

    @staticmethod
    def _cache_key(instance: Instance, flags: int, key: bytes) -> CacheKey:
        return (instance.cache_token, flags & ANSWER_BITS, key)

    # --- cache figures -------------------------------------------------------------------
    def cache_figures(self) -> dict[str, dict[str, int]]:
        """Per cached table: hits, misses, coalesced, stale, evictions, ... size."""
        return {name: cache.figures.as_dict() for name, cache in self.caches.items()}

    def close(self) -> None:
        """At worker exit: each cache logs its figures (and an outage still going on)."""
        for cache in self.caches.values():
            cache.close()

    @staticmethod
    def _sequence_function(instance: Instance, function: int) -> int:
        if not instance.sequence_started:
            instance.sequence_started = True
            return 0
        return function

    @staticmethod
    def _error_status(exc: Exception, instance: Instance, op: str) -> int:
        if isinstance(exc, DictUnsupported):
            # Postfix would abort the whole process here; one failed request is enough.
            log.warning("%s", exc)
            return RETRY
        if isinstance(exc, DictRetry):
            return RETRY
        if isinstance(exc, (DictConfig, DictError)):
            return CONFIG
        log.error("%s %s failed: %r", instance.table.spec, op, exc, exc_info=exc)
        return RETRY

    # --- restart check -------------------------------------------------------------------
    def changed_table(self) -> str | None:
        """Registered name of the first open table whose file changed (read-only only)."""
        if self.writer:
            return None
        for instance in self._instances.values():
            table = instance.table
            if table.watched_files and table.changed():
                return instance.registered_name
        return None


async def _flagged_lookup(table: AsyncTable, flags: int, key: bytes) -> bytes | None:
    """A cache miss's query: it runs as a task of its own, so the flag word is set
    here, right before the driver reads it."""
    table.flags = flags
    return await table.alookup(key)


def _g2_flags(req: Request, instance: Instance) -> int:
    """The flag word a G2 request runs with: its own, with the instance's fresh TRY bits
    when it has neither, minus the build-time locking bits."""
    flags = req.flags
    if not flags & F.TRY_ANY:
        flags |= instance.fresh_flags & F.TRY_ANY
    return flags & ~_SANITISED


class PendingReply:
    """The reply to a lookup that its table started (``SlowLookup.answer_start``):
    the table calls ``answered`` with the outcome, and the reply, encoded and counted
    as ``answer`` would, goes to ``on_reply`` (set by the connection, which writes
    it) -- from the table's own I/O callback, without a task. Awaiting it works too."""

    __slots__ = ("slow", "flags", "stats", "started", "on_reply", "reply")

    def __init__(
        self, slow: SlowLookup, flags: int, stats: TableStats | None, started: float
    ) -> None:
        self.slow = slow
        self.flags = flags
        self.stats = stats  # None: not counted (pyproxymap_statistics = no)
        self.started = started
        self.on_reply: Callable[[bytes], object] | None = None
        self.reply: bytes | None = None  # kept when it comes before on_reply is set

    def answered(self, outcome: bytes | None | Exception) -> None:
        slow = self.slow
        if isinstance(outcome, Exception):
            if self.stats is None:
                reply = slow._failed(outcome, self.flags)
            else:
                reply = slow._failed_counted(outcome, self.flags, self.started)
        else:
            reply = slow._encoded(outcome)
            if self.stats is not None:  # counted after the reply is out, timed before
                elapsed = perf_counter() - self.started
                try:
                    self._deliver(reply)
                finally:
                    self._count(outcome, elapsed)
                return
        self._deliver(reply)

    def _deliver(self, reply: bytes) -> None:
        on_reply, self.on_reply = self.on_reply, None
        if on_reply is None:
            self.reply = reply
        else:
            on_reply(reply)

    def counted(self, value: bytes | None) -> bytes:
        self._count(value, perf_counter() - self.started)
        return self.slow._encoded(value)

    def _count(self, value: bytes | None, elapsed: float) -> None:
        stats = self.stats
        assert stats is not None
        stats.record(elapsed)
        stats.lookups += 1
        stats.misses += value is None

    def __await__(self) -> Generator[Any, None, bytes]:
        if self.reply is None:
            future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            self.on_reply = future.set_result
            return (yield from future.__await__())
        return self.reply


@dataclass(slots=True, eq=False)
class SlowLookup:
    """The compiled lookup of an asynchronous table (``RequestHandler.compile_lookup``).

    ``answer(key)`` is a coroutine of the encoded reply: what ``handle``, ``_run_async``
    (``_counted_async`` with statistics) and ``encode_reply`` give, in one coroutine
    frame. ``cached(key)`` answers a fresh cache entry at once, else a coroutine that
    fills it. The flag word is set when the coroutine starts, as ``_run_async`` does:
    the instance's own bits (``kept_bits``: G1's TRY learning) and the request's.
    """

    instance: Instance
    table: AsyncTable
    kept_bits: int  # 0 for G2: the request sets the whole word
    request_bits: int
    echo: int  # OPEN_LOCK and BULK_UPDATE: echoed, never set on the table
    generation: int
    found: bytes  # the reply heads: a hit is found + value + LOOKUP_END
    not_found: bytes
    error_status: Callable[[Exception, Instance, str], int]

    async def answer(self, key: bytes) -> bytes:
        table = self.table
        flags = table.flags = (table.flags & self.kept_bits) | self.request_bits
        try:
            if self.instance.cache is None:
                value = await table.alookup(key)
            else:
                value = await self._fill(key, flags)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            return self._failed(exc, flags)
        if value is None:
            return self.not_found
        if 0 in value:  # the byte value: `b"\x00" in value` raises and clears a TypeError
            value = value[: value.index(b"\x00")]
        return self.found + value + LOOKUP_END

    async def answer_counted(self, key: bytes) -> bytes:
        """``answer`` with the figures: every lookup timed and counted. Written out
        rather than awaiting ``answer``: that second coroutine frame cost 400-2,000
        instructions per lookup (tests/bench/async_micro.py, nothing and mysql)."""
        stats = self.instance.stats
        assert stats is not None
        started = perf_counter()
        table = self.table
        flags = table.flags = (table.flags & self.kept_bits) | self.request_bits
        try:
            if self.instance.cache is None:
                value = await table.alookup(key)
            else:
                value = await self._fill(key, flags)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            return self._failed_counted(exc, flags, started)
        stats.record(perf_counter() - started)
        stats.lookups += 1
        if value is None:
            stats.misses += 1
            return self.not_found
        if 0 in value:
            value = value[: value.index(b"\x00")]
        return self.found + value + LOOKUP_END

    def answer_now(self, key: bytes) -> bytes | Awaitable[bytes]:
        """The reply at once when the table gives its answer without waiting
        (``AsyncTable.lookup_now``), else ``answer``'s coroutine."""
        table = self.table
        flags = table.flags = (table.flags & self.kept_bits) | self.request_bits
        try:
            value = table.lookup_now(key)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            return self._failed(exc, flags)
        if value is LATER:
            return self.answer(key)
        return self._encoded(value)

    def answer_now_counted(self, key: bytes) -> bytes | Awaitable[bytes]:
        """``answer_now`` with the figures (``answer_counted``'s)."""
        started = perf_counter()
        table = self.table
        flags = table.flags = (table.flags & self.kept_bits) | self.request_bits
        try:
            value = table.lookup_now(key)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            return self._failed_counted(exc, flags, started)
        if value is LATER:
            return self.answer_counted(key)
        stats = self.instance.stats
        assert stats is not None
        stats.record(perf_counter() - started)
        stats.lookups += 1
        stats.misses += value is None
        return self._encoded(value)

    def answer_start(self, key: bytes) -> bytes | Awaitable[bytes] | PendingReply:
        """The reply at once, a ``PendingReply`` when the table started the lookup
        (``AsyncTable.lookup_start``), else ``answer``'s coroutine."""
        table = self.table
        flags = table.flags = (table.flags & self.kept_bits) | self.request_bits
        pending = PendingReply(self, flags, None, 0.0)
        try:
            value = table.lookup_start(key, pending.answered)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            return self._failed(exc, flags)
        if value is STARTED:
            return pending
        if value is LATER:
            return self.answer(key)
        return self._encoded(value)

    def answer_start_counted(self, key: bytes) -> bytes | Awaitable[bytes] | PendingReply:
        """``answer_start`` with the figures (``answer_counted``'s)."""
        started = perf_counter()
        table = self.table
        flags = table.flags = (table.flags & self.kept_bits) | self.request_bits
        pending = PendingReply(self, flags, self.instance.stats, started)
        try:
            value = table.lookup_start(key, pending.answered)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            return self._failed_counted(exc, flags, started)
        if value is STARTED:
            return pending
        if value is LATER:
            return self.answer_counted(key)
        return pending.counted(value)

    def _failed_counted(self, exc: Exception, flags: int, started: float) -> bytes:
        """``_failed`` of a lookup that the figures time and count."""
        stats = self.instance.stats
        assert stats is not None
        stats.record(perf_counter() - started)
        stats.lookups += 1
        return self._failed(exc, flags)

    def _encoded(self, value: bytes | None) -> bytes:
        """The reply to a lookup that gave VALUE (a C string: a NUL ends it)."""
        if value is None:
            return self.not_found
        if 0 in value:
            value = value[: value.index(b"\x00")]
        return self.found + value + LOOKUP_END

    def cached(self, key: bytes) -> bytes | Awaitable[bytes]:
        """A fresh entry's reply (counted as ``handle`` counts it), else ``answer``."""
        instance = self.instance
        cache = instance.cache
        assert cache is not None
        flags = (self.table.flags & self.kept_bits) | self.request_bits
        entry = cache.fresh((instance.cache_token, flags & ANSWER_BITS, key))
        if entry is not None:
            return _cached_reply(entry.value, instance.stats, self.found, self.not_found)
        if instance.stats is not None:
            return self.answer_counted(key)
        return self.answer(key)

    def _fill(self, key: bytes, flags: int) -> Awaitable[bytes | None]:
        instance = self.instance
        cache = instance.cache
        assert cache is not None
        table = self.table
        return cache.fill(
            (instance.cache_token, flags & ANSWER_BITS, key),
            lambda: _flagged_lookup(table, flags, key),
        )

    def _failed(self, exc: Exception, flags: int) -> bytes:
        status = self.error_status(exc, self.instance, "lookup")
        if self.instance.stats is not None:
            self.instance.stats.failed(status)
        return encode_reply("lookup", self.generation, Reply(status, flags | self.echo))


# --- the fast path with statistics -----------------------------------------------------------
# The closures of compile_lookup plus the figures: a count per lookup and per miss, and the
# clock on the lookups the table's sample mask selects. Separate functions, so that with
# pyproxymap_statistics = no the fast path is exactly the one without figures.
def _counted_g2(
    table: SyncTable,
    flags: int,
    echo: int,
    stats: TableStats,
    failed: Callable[[Exception, int], bytes],
) -> LookupFunction:
    def lookup_g2(key: bytes) -> bytes | None:
        table.flags = flags
        count = stats.lookups = stats.lookups + 1
        try:
            if count & stats.sample_mask:
                value = table.lookup(key)
            else:
                started = perf_counter()
                value = table.lookup(key)
                stats.record(perf_counter() - started)
        except DictBusy:
            stats.lookups -= 1  # the general path counts it
            return None
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            return failed(exc, G2)
        reply_flags = (table.flags | echo) & F.ALL
        if value is None:
            stats.misses += 1
            return _G2_NOT_FOUND % reply_flags
        if 0 in value:
            value = value[: value.index(b"\x00")]
        return _G2_FOUND % (reply_flags, value)

    return lookup_g2


def _counted_g1(
    table: SyncTable,
    kept_bits: int,
    request_bits: int,
    stats: TableStats,
    failed: Callable[[Exception, int], bytes],
) -> LookupFunction:
    def lookup_g1(key: bytes) -> bytes | None:
        table.flags = (table.flags & kept_bits) | request_bits
        count = stats.lookups = stats.lookups + 1
        try:
            if count & stats.sample_mask:
                value = table.lookup(key)
            else:
                started = perf_counter()
                value = table.lookup(key)
                stats.record(perf_counter() - started)
        except DictBusy:
            stats.lookups -= 1  # the general path counts it
            return None
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            return failed(exc, G1)
        if value is None:
            stats.misses += 1
            return _G1_NOT_FOUND
        if 0 in value:
            value = value[: value.index(b"\x00")]
        return _G1_FOUND + value + LOOKUP_END

    return lookup_g1
