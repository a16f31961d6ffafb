"""A result cache in front of slow tables: fewer round trips, answers through an outage.

NAME
    cache -- per-worker LRU cache of lookup results, with TTLs, stale-on-error and
    coalesced misses, for the tables named in ``pyproxymap_cache_maps``

SYNOPSIS
    settings = CacheSettings.from_params(params)        # main.cf pyproxymap_cache_*
    if settings.wants("mysql:/etc/postfix/virtual.cf"):
        cache = TableCache("mysql:/etc/postfix/virtual.cf", settings)
    entry = cache.fresh((token, flags, key))     # an Entry (a hit), or None
    value = await cache.fill((token, flags, key), fetch)   # a miss: one query per key
    cache.invalidate(key)                        # after update/delete (proxywrite)
    cache.figures                                # hits misses coalesced stale ...
    cache.close()                                # at exit: the figures, to the log

DESCRIPTION
    Off by default. The request handler gives a cache to every instance of a table
    that ``pyproxymap_cache_maps`` names (as in requests or proxy_read_maps, with or
    without ``proxy:``) and that is asynchronous (network and database tables: mysql,
    pgsql, ldap, memcache, sqlite, tcp, socketmap, and composites of them). Local
    tables (files, memory) are answered inline in microseconds and change on rebuild,
    when the worker restarts anyway: a cache would only add a second copy that can be
    out of date, so they are never cached (the handler logs a warning when one is
    named).

    An entry is keyed by the table instance (a small number the handler gives each
    instance: canonical name, open mode, generation and instance flags), by the
    request's flag bits that can change an answer (everything but the duplicate,
    locking, sync and debug bits), and by the key exactly as the instance is handed
    it. A found value is fresh for ``pyproxymap_cache_ttl``, a "not found" for
    ``pyproxymap_cache_negative_ttl``; a fresh entry is a hit and no query is made.
    At most ``pyproxymap_cache_size`` entries per table, least recently used evicted
    first. Failures are never cached.

    Stale on error: an entry stays for ``pyproxymap_cache_stale_ttl`` after it
    expires. When the query that would renew it fails with a temporary error
    (DictRetry: server down, timeout, no connection) that entry -- a value or a "not
    found" -- is the answer instead of RETRY. Past that window, or without an entry,
    the answer is RETRY. Configuration errors (CONFIG) and other failures are never
    masked. An outage of one table starts with its first temporary failure and ends
    with its next answer from the backend; when stale answers were given, one line
    then says how long it lasted and how many stale answers and RETRYs it saw (at
    exit, for an outage still going on).

    Coalescing: concurrent misses of one cache key wait for one backend query. The
    query runs as a task of its own, so a client that goes away does not cancel it
    for the others.

    Writes: only lookups are cached. An update or delete through this worker (the
    proxywrite service) invalidates every entry of that key, in any letter case and
    any instance of the table, and any query for it still in flight does not store
    its answer: the next lookup through proxywrite queries the backend. The proxymap
    (read-only) workers are other processes and are not told: they see a change
    when their entry expires, at most ``pyproxymap_cache_ttl`` (a "not found":
    ``pyproxymap_cache_negative_ttl``) after it was stored. A table that is read
    back right after a write (address verification, postscreen) and needs that
    exactly should be cached only in the service that writes it or not at all.

    Per worker: each worker process has its own cache, as Postfix keeps its tables
    per process, and there is no shared cache server (that would be one more
    backend to lose). A site with N busy workers sees a hot key queried up to N
    times per TTL, hit rates per worker lower than one shared cache would have, and
    stale answers only from the workers that held the entry; a worker that exits
    (max_idle, max_use, a reload) takes its cache with it.

    Figures (``CacheFigures``, for the live statistics): hits, misses (of which
    ``coalesced`` waited for another request's query), stale answers, evictions,
    invalidations, size.

    Settings (main.cf; times in Postfix's notation, ``60s``, ``5m``, ``1h``; a bad
    value is logged and the default used): ``pyproxymap_cache_maps`` (empty),
    ``pyproxymap_cache_ttl`` (60s), ``pyproxymap_cache_negative_ttl`` (30s),
    ``pyproxymap_cache_stale_ttl`` (10m; 0 disables stale answers),
    ``pyproxymap_cache_size`` (10000 entries per table; 0 disables the cache).
    A TTL of 0 caches nothing as fresh but keeps the last answer for stale-on-error.

BUGS
    A backend that hangs (rather than refuses) makes every stale answer wait the
    table's query timeout first: stale-on-error keeps mail flowing, not fast.
    Letter-case invalidation folds ASCII and, for UTF-8 keys, Python's casefold,
    which may invalidate more than the table's own folding would (never less).

SEE ALSO
    proxymap.handler (where instances get their cache), master.mainconf.to_seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field

from master.mainconf import MainConfigError, to_int, to_seconds
from proxymap import flags as F
from proxymap.tables.base import DictRetry

log = logging.getLogger("proxymap")

MAPS = "pyproxymap_cache_maps"
TTL = "pyproxymap_cache_ttl"
NEGATIVE_TTL = "pyproxymap_cache_negative_ttl"
STALE_TTL = "pyproxymap_cache_stale_ttl"
SIZE = "pyproxymap_cache_size"
DEFAULTS = {TTL: "60s", NEGATIVE_TTL: "30s", STALE_TTL: "10m", SIZE: "10000"}

# Request bits that never change a lookup's answer: duplicate handling, locking,
# sync-on-update, debug, and the obsolete FOLD_KEY. Every other bit is part of the key.
ANSWER_BITS = (
    ~(F.DUP_ANY | F.LOCK | F.SYNC_UPDATE | F.DEBUG | F.FOLD_KEY | F.OPEN_LOCK | F.BULK_UPDATE)
    & F.ALL
)
_PROXY = "proxy:"
_LIST_SEPARATORS = str.maketrans(",;", "  ")

# (instance token, answer bits of the request flags, key)
CacheKey = tuple[int, int, bytes]
Fetch = Callable[[], Awaitable[bytes | None]]


def _strip_proxy(name: str) -> str:
    while name.startswith(_PROXY):
        name = name[len(_PROXY) :]
    return name


def _setting(params: Mapping[str, str], name: str, convert: Callable[[str, str], int]) -> int:
    text = params.get(name)
    if text is not None and text.strip():
        try:
            value = convert(name, text.strip())
            if value >= 0:
                return value
        except MainConfigError:
            pass
        log.warning('%s: bad value "%s", using %s', name, text, DEFAULTS[name])
    return convert(name, DEFAULTS[name])


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The main.cf side: which tables, and the TTLs (seconds) and size they get."""

    maps: frozenset[str] = frozenset()
    ttl: int = 60
    negative_ttl: int = 30
    stale_ttl: int = 600
    size: int = 10000

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> CacheSettings:
        names = (params.get(MAPS) or "").translate(_LIST_SEPARATORS).split()
        return cls(
            maps=frozenset(_strip_proxy(name) for name in names),
            ttl=_setting(params, TTL, to_seconds),
            negative_ttl=_setting(params, NEGATIVE_TTL, to_seconds),
            stale_ttl=_setting(params, STALE_TTL, to_seconds),
            size=_setting(params, SIZE, to_int),
        )

    def wants(self, canonical: str) -> bool:
        """True when the table (its name without ``proxy:``) is to be cached."""
        return self.size > 0 and canonical in self.maps


@dataclass(slots=True)
class CacheFigures:
    """Counters of one table's cache, for the worker's log and the live statistics."""

    hits: int = 0
    misses: int = 0  # lookups not answered from a fresh entry ...
    coalesced: int = 0  # ... of which waited for another request's query
    stale: int = 0  # answers given from an expired entry while the backend failed
    evictions: int = 0  # entries dropped for room (LRU)
    invalidations: int = 0  # entries dropped by an update/delete
    size: int = 0  # entries held now

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(slots=True, eq=False)
class Entry:
    """One cached answer: a value, or None for "not found"."""

    value: bytes | None
    fresh_until: float
    stale_until: float


def fold_key(key: bytes) -> bytes:
    """Letter-case folded key, for invalidation only (wider than any table's folding)."""
    if key.isascii():
        return key.lower()
    return key.decode("utf-8", "surrogateescape").casefold().encode("utf-8", "surrogateescape")


@dataclass(eq=False)
class _Outage:
    started: float
    stale: int = 0
    retry: int = 0


@dataclass(eq=False)
class TableCache:
    """The cache of one table (all its instances) in one worker."""

    name: str
    settings: CacheSettings
    #: Keep the index that ``invalidate`` needs (the proxywrite service only).
    track_writes: bool = False
    clock: Callable[[], float] = time.monotonic
    figures: CacheFigures = field(default_factory=CacheFigures)

    def __post_init__(self) -> None:
        self._entries: OrderedDict[CacheKey, Entry] = OrderedDict()
        self._inflight: dict[CacheKey, asyncio.Task[tuple[bytes | None, bool]]] = {}
        self._outage: _Outage | None = None
        # folded key -> its cache keys; a reader has no writes and does without.
        self._by_fold: dict[bytes, set[CacheKey]] | None = {} if self.track_writes else None

    # --- hits ----------------------------------------------------------------------------
    def fresh(self, ckey: CacheKey) -> Entry | None:
        """The fresh entry for ``ckey`` (counted as a hit), or None."""
        entry = self._entries.get(ckey)
        if entry is None:
            return None
        now = self.clock()
        if now < entry.fresh_until:
            self._entries.move_to_end(ckey)
            self.figures.hits += 1
            return entry
        if now >= entry.stale_until:
            self._drop(ckey)
        return None

    # --- misses --------------------------------------------------------------------------
    async def fill(self, ckey: CacheKey, fetch: Fetch) -> bytes | None:
        """The answer for a key that had no fresh entry: from the backend (one query
        for all concurrent callers), or stale when the backend fails temporarily."""
        entry = self.fresh(ckey)  # another request may have filled it meanwhile
        if entry is not None:
            return entry.value
        self.figures.misses += 1
        flight = self._inflight.get(ckey)
        if flight is None:
            flight = asyncio.ensure_future(self._query(ckey, fetch))
            flight.add_done_callback(_consume)
            self._inflight[ckey] = flight
        else:
            self.figures.coalesced += 1
        try:
            value, stale = await asyncio.shield(flight)
        except DictRetry:
            if self._outage is not None:
                self._outage.retry += 1
            raise
        if stale:
            self.figures.stale += 1
            if self._outage is not None:
                self._outage.stale += 1
        return value

    async def _query(self, ckey: CacheKey, fetch: Fetch) -> tuple[bytes | None, bool]:
        me = asyncio.current_task()
        try:
            value = await fetch()
        except DictRetry:
            if self._outage is None:
                self._outage = _Outage(self.clock())
            entry = self._entries.get(ckey)
            if entry is not None and self.clock() < entry.stale_until:
                self._entries.move_to_end(ckey)
                return entry.value, True
            raise
        finally:
            mine = self._inflight.get(ckey) is me
            if mine:
                del self._inflight[ckey]
        if self._outage is not None:
            self._end_outage("answering again")
        if mine:  # not invalidated meanwhile
            self._store(ckey, value)
        return value, False

    def _store(self, ckey: CacheKey, value: bytes | None) -> None:
        settings = self.settings
        ttl = settings.ttl if value is not None else settings.negative_ttl
        if ttl == 0 and settings.stale_ttl == 0:
            return
        fresh_until = self.clock() + ttl
        entries = self._entries
        entries[ckey] = Entry(value, fresh_until, fresh_until + settings.stale_ttl)
        entries.move_to_end(ckey)
        if self._by_fold is not None:
            self._by_fold.setdefault(fold_key(ckey[2]), set()).add(ckey)
        while len(entries) > settings.size:
            old, _ = entries.popitem(last=False)
            self._unindex(old)
            self.figures.evictions += 1
        self.figures.size = len(entries)

    def _drop(self, ckey: CacheKey) -> None:
        del self._entries[ckey]
        self._unindex(ckey)
        self.figures.size = len(self._entries)

    def _unindex(self, ckey: CacheKey) -> None:
        if self._by_fold is None:
            return
        folded = fold_key(ckey[2])
        variants = self._by_fold.get(folded)
        if variants is not None:
            variants.discard(ckey)
            if not variants:
                del self._by_fold[folded]

    # --- writes --------------------------------------------------------------------------
    def invalidate(self, key: bytes) -> None:
        """Forget ``key`` (any letter case, any instance): an update or delete ran."""
        folded = fold_key(key)
        if self._by_fold is not None:
            doomed = list(self._by_fold.get(folded, ()))
        else:
            doomed = [ckey for ckey in self._entries if fold_key(ckey[2]) == folded]
        for ckey in doomed:
            self._drop(ckey)
        self.figures.invalidations += len(doomed)
        for ckey in [ckey for ckey in self._inflight if fold_key(ckey[2]) == folded]:
            del self._inflight[ckey]  # its answer may predate the write: not stored

    # --- outages and exit ----------------------------------------------------------------
    def _end_outage(self, how: str) -> None:
        outage, self._outage = self._outage, None
        if outage is None or not outage.stale:
            return  # the driver has logged the failure; no stale answer to report
        log.warning(
            "%s: backend %s after %.0fs; %d stale answers and %d RETRY during the outage",
            self.name,
            how,
            self.clock() - outage.started,
            outage.stale,
            outage.retry,
        )

    def close(self) -> None:
        """At worker exit: the figures, and an outage still going on, to the log."""
        self._end_outage("still failing at exit")
        figures = " ".join(f"{name}={value}" for name, value in self.figures.as_dict().items())
        log.info("cache %s: %s", self.name, figures)


def _consume(task: asyncio.Task[object]) -> None:
    """Retrieve the query's outcome, so a failure nobody waited for is not logged."""
    if not task.cancelled():
        task.exception()
