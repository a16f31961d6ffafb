"""The result cache in front of slow tables (proxymap.cache and its handler wiring).

Settings and the cache's own rules run against a clock the test moves (LRU, TTLs,
stale windows, invalidation, coalescing, the outage line). The handler's wiring runs
with an in-memory asynchronous table: a hit answers inline, and the compiled fast
path answers byte for byte what the general path does.

What the issue asks to see runs against the real private PostgreSQL
(tests/support/servers.py) through the request handler and our pgsql table. Queries
are counted on the server, exactly: every query the table sends first inserts a row
(the key and the server's clock_timestamp()) into ``querylog``, in the same
simple-query string as the SELECT (the pgsql table sends the whole string in one
go, in autocommit). So: a hit makes no query; fresh and negative TTLs end within a
second of their setting (server timestamps); with the server stopped a configured
table answers from stale entries for the stale window and then RETRY, an
unconfigured one RETRY at once; N concurrent misses make one query. Updates and
deletes through proxywrite use the real memcached (the one asynchronous table type
that accepts them): the next lookup through proxywrite sees them, and a read-only
worker sees them when its entry expires.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from proxymap import flags as F
from proxymap.cache import (
    ANSWER_BITS,
    CacheSettings,
    TableCache,
    fold_key,
)
from proxymap.handler import RequestHandler
from proxymap.protocol import G1, G2, NOKEY, OK, RETRY, Reply, Request, encode_reply
from proxymap.tables import TABLE_TYPES
from proxymap.tables.base import AsyncTable, DictConfig, DictRetry
from proxymap.tables.internal import InternalTable
from tests.support.servers import (  # noqa: F401  (fixtures)
    PrivateMemcached,
    PrivatePostgres,
    memcached,
    postgres,
    postgres_module,
)

T = TypeVar("T")
POSTMAP_Q = 540737  # 3.12 postmap -q: DUP_WARN|LOCK|FOLD_FIX|UTF8_REQUEST
G1_LOOKUP = 0x80041  # what a 3.7 postmap -q sends
USER, PASSWORD, DBNAME = "pmcache", "cache-secret", "pmcache"


def run(coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def settings(**kw: Any) -> CacheSettings:
    return CacheSettings(maps=frozenset({"t:x"}), **kw)


# --- settings ---------------------------------------------------------------------------------


def test_defaults_and_off_by_default() -> None:
    s = CacheSettings.from_params({})
    assert (s.ttl, s.negative_ttl, s.stale_ttl, s.size) == (60, 30, 600, 10000)
    assert s.maps == frozenset() and not s.wants("mysql:/etc/postfix/a.cf")


def test_postfix_time_values_and_names() -> None:
    s = CacheSettings.from_params(
        {
            "pyproxymap_cache_maps": "proxy:mysql:/a.cf, pgsql:/b.cf\n\tproxy:proxy:ldap:/c.cf",
            "pyproxymap_cache_ttl": "5m",
            "pyproxymap_cache_negative_ttl": "10",
            "pyproxymap_cache_stale_ttl": "1h",
            "pyproxymap_cache_size": "7",
        }
    )
    assert s.maps == {"mysql:/a.cf", "pgsql:/b.cf", "ldap:/c.cf"}
    assert (s.ttl, s.negative_ttl, s.stale_ttl, s.size) == (300, 10, 3600, 7)
    assert s.wants("pgsql:/b.cf") and not s.wants("proxy:pgsql:/b.cf")


def test_bad_values_fall_back_with_a_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, "proxymap"):
        s = CacheSettings.from_params(
            {"pyproxymap_cache_ttl": "soon", "pyproxymap_cache_size": "-3"}
        )
    assert (s.ttl, s.size) == (60, 10000)
    assert 'pyproxymap_cache_ttl: bad value "soon", using 60s' in caplog.text
    assert 'pyproxymap_cache_size: bad value "-3", using 10000' in caplog.text


def test_size_zero_turns_the_cache_off() -> None:
    s = CacheSettings.from_params({"pyproxymap_cache_maps": "t:x", "pyproxymap_cache_size": "0"})
    assert not s.wants("t:x")


def test_answer_bits_leave_out_what_cannot_change_an_answer() -> None:
    assert POSTMAP_Q & ANSWER_BITS == F.FOLD_FIX | F.UTF8_REQUEST
    for bit in (F.TRY0NULL, F.TRY1NULL, F.FOLD_MUL, F.NO_REGSUB, F.UTF8_ACTIVE, F.NO_UNAUTH):
        assert bit & ANSWER_BITS


def test_fold_key() -> None:
    assert fold_key(b"Alice@Example.COM") == b"alice@example.com"
    assert fold_key("ÜNÏ@x".encode()) == "ünï@x".encode()
    assert fold_key(b"\xff\xfeA") == b"\xff\xfea"  # not UTF-8: still folded, byte-exact


# --- the cache's rules, with a clock the test moves -------------------------------------------


class Backend:
    """Answers from a dict after a pause; ``down`` makes it fail (DictRetry)."""

    def __init__(self, data: dict[bytes, bytes]) -> None:
        self.data = data
        self.queries: list[bytes] = []
        self.down = False
        self.config_error = False
        self.pause = 0.0

    def fetch(self, key: bytes):
        async def query() -> bytes | None:
            self.queries.append(key)
            value = self.data.get(key)  # what the server reads, before it answers
            await asyncio.sleep(self.pause)
            if self.config_error:
                raise DictConfig("bad result_format")
            if self.down:
                raise DictRetry("server down")
            return value

        return query


def make_cache(clock: Clock, **kw: Any) -> tuple[TableCache, Backend]:
    track = kw.pop("track_writes", False)
    cache = TableCache("t:x", settings(**kw), track_writes=track, clock=clock)
    return cache, Backend({b"alice": b"A", b"bob": b"B"})


async def lookup(
    cache: TableCache, backend: Backend, key: bytes, token: int = 0, bits: int = 0
) -> bytes | None:
    ckey = (token, bits, key)
    entry = cache.fresh(ckey)
    if entry is not None:
        return entry.value
    return await cache.fill(ckey, backend.fetch(key))


def test_hits_and_ttls() -> None:
    clock = Clock()
    cache, backend = make_cache(clock, ttl=10, negative_ttl=3, stale_ttl=0)

    async def scenario() -> None:
        assert await lookup(cache, backend, b"alice") == b"A"
        assert await lookup(cache, backend, b"nobody") is None
        clock.now += 2.9
        assert await lookup(cache, backend, b"alice") == b"A"
        assert await lookup(cache, backend, b"nobody") is None
        assert backend.queries == [b"alice", b"nobody"]
        clock.now += 0.1  # the negative entry is 3 s old: expired
        assert await lookup(cache, backend, b"nobody") is None
        assert await lookup(cache, backend, b"alice") == b"A"
        assert backend.queries == [b"alice", b"nobody", b"nobody"]
        clock.now += 7  # alice: 10 s
        assert await lookup(cache, backend, b"alice") == b"A"
        assert backend.queries[-1] == b"alice"
        # The instance token and the answer bits are part of the key.
        await lookup(cache, backend, b"alice", token=1)
        await lookup(cache, backend, b"alice", bits=F.FOLD_FIX)
        assert len(backend.queries) == 6

    run(scenario())
    f = cache.figures
    assert (f.hits, f.misses, f.coalesced, f.stale, f.size) == (3, 6, 0, 0, 4)


def test_lru_eviction() -> None:
    clock = Clock()
    cache, backend = make_cache(clock, size=2)
    backend.data.update({b"k%d" % n: b"v%d" % n for n in range(4)})

    async def scenario() -> None:
        await lookup(cache, backend, b"k0")
        await lookup(cache, backend, b"k1")
        await lookup(cache, backend, b"k0")  # k1 is now the least recently used
        await lookup(cache, backend, b"k2")  # evicts k1
        del backend.queries[:]
        await lookup(cache, backend, b"k0")
        await lookup(cache, backend, b"k2")
        assert backend.queries == []
        await lookup(cache, backend, b"k1")
        assert backend.queries == [b"k1"]

    run(scenario())
    assert (cache.figures.evictions, cache.figures.size) == (2, 2)


def test_stale_on_error_then_retry_and_one_outage_line(caplog) -> None:
    clock = Clock()
    cache, backend = make_cache(clock, ttl=10, negative_ttl=10, stale_ttl=5)

    async def scenario() -> None:
        await lookup(cache, backend, b"alice")
        await lookup(cache, backend, b"nobody")
        backend.down = True
        clock.now += 10  # expired; stale for 5 s more
        for _ in range(3):
            assert await lookup(cache, backend, b"alice") == b"A"
            assert await lookup(cache, backend, b"nobody") is None  # a stale "not found"
        with pytest.raises(DictRetry):
            await lookup(cache, backend, b"bob")  # never cached: RETRY at once
        clock.now += 4.9
        assert await lookup(cache, backend, b"alice") == b"A"
        clock.now += 0.1
        with pytest.raises(DictRetry):
            await lookup(cache, backend, b"alice")  # the stale window is over
        backend.config_error = True
        with pytest.raises(DictConfig):
            await lookup(cache, backend, b"nobody")  # within its window, but CONFIG
        backend.down = backend.config_error = False
        clock.now += 2
        assert await lookup(cache, backend, b"alice") == b"A"  # the backend is back
        assert await lookup(cache, backend, b"alice") == b"A"  # and a fresh hit again

    with caplog.at_level(logging.INFO, "proxymap"):
        run(scenario())
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "t:x: backend answering again after 7s; 7 stale answers and 2 RETRY during the outage"
    ]
    assert cache.figures.stale == 7


def test_no_outage_line_without_stale_answers(caplog) -> None:
    clock = Clock()
    cache, backend = make_cache(clock)
    backend.down = True

    async def scenario() -> None:
        with pytest.raises(DictRetry):
            await lookup(cache, backend, b"alice")
        backend.down = False
        await lookup(cache, backend, b"alice")

    with caplog.at_level(logging.INFO, "proxymap"):
        run(scenario())
    assert caplog.records == []


def test_ttl_zero_keeps_only_the_stale_copy() -> None:
    clock = Clock()
    cache, backend = make_cache(clock, ttl=0, negative_ttl=0, stale_ttl=60)

    async def scenario() -> None:
        for _ in range(3):
            assert await lookup(cache, backend, b"alice") == b"A"
        assert len(backend.queries) == 3  # never a hit ...
        backend.down = True
        assert await lookup(cache, backend, b"alice") == b"A"  # ... but an outage copy

    run(scenario())


def test_nothing_kept_with_every_ttl_zero() -> None:
    cache, backend = make_cache(Clock(), ttl=0, negative_ttl=0, stale_ttl=0)
    run(lookup(cache, backend, b"alice"))
    assert cache.figures.size == 0


def test_coalescing() -> None:
    cache, backend = make_cache(Clock())
    backend.pause = 0.05

    async def scenario() -> list[bytes | None]:
        return await asyncio.gather(*(lookup(cache, backend, b"alice") for _ in range(20)))

    assert run(scenario()) == [b"A"] * 20
    assert backend.queries == [b"alice"]
    f = cache.figures
    assert (f.misses, f.coalesced) == (20, 19)


def test_coalesced_failure_reaches_every_waiter() -> None:
    cache, backend = make_cache(Clock())
    backend.pause = 0.05
    backend.down = True

    async def scenario() -> list[object]:
        return await asyncio.gather(
            *(lookup(cache, backend, b"alice") for _ in range(5)), return_exceptions=True
        )

    outcomes = run(scenario())
    assert all(isinstance(outcome, DictRetry) for outcome in outcomes)
    assert backend.queries == [b"alice"]


def test_a_waiter_that_goes_away_does_not_cancel_the_query() -> None:
    cache, backend = make_cache(Clock())
    backend.pause = 0.05

    async def scenario() -> bytes | None:
        first = asyncio.ensure_future(lookup(cache, backend, b"alice"))
        second = asyncio.ensure_future(lookup(cache, backend, b"alice"))
        await asyncio.sleep(0.01)
        first.cancel()
        return await second

    assert run(scenario()) == b"A"
    assert backend.queries == [b"alice"] and cache.figures.size == 1


@pytest.mark.parametrize("track", [True, False])
def test_invalidation_any_case_any_instance(track: bool) -> None:
    clock = Clock()
    cache, backend = make_cache(clock, track_writes=track)

    async def scenario() -> None:
        await lookup(cache, backend, b"alice")
        await lookup(cache, backend, b"ALICE", token=1)
        await lookup(cache, backend, b"bob")
        cache.invalidate(b"Alice")
        backend.data[b"alice"] = b"A2"
        assert await lookup(cache, backend, b"alice") == b"A2"
        assert await lookup(cache, backend, b"bob") == b"B"

    run(scenario())
    assert backend.queries == [b"alice", b"ALICE", b"bob", b"alice"]
    assert cache.figures.invalidations == 2


def test_a_query_in_flight_during_a_write_stores_nothing() -> None:
    cache, backend = make_cache(Clock(), track_writes=True)
    backend.pause = 0.05

    async def scenario() -> None:
        before = asyncio.ensure_future(lookup(cache, backend, b"alice"))
        await asyncio.sleep(0.01)
        backend.data[b"alice"] = b"A2"  # the write ...
        cache.invalidate(b"alice")  # ... and its invalidation, while the query runs
        after = await lookup(cache, backend, b"alice")  # not joined to the old query
        assert (await before, after) == (b"A", b"A2")
        assert await lookup(cache, backend, b"alice") == b"A2"

    run(scenario())
    assert backend.queries == [b"alice", b"alice"]


def test_close_logs_the_figures_and_an_outage_going_on(caplog) -> None:
    clock = Clock()
    cache, backend = make_cache(clock, ttl=1, stale_ttl=60)

    async def scenario() -> None:
        await lookup(cache, backend, b"alice")
        await lookup(cache, backend, b"alice")
        backend.down = True
        clock.now += 2
        await lookup(cache, backend, b"alice")

    run(scenario())
    with caplog.at_level(logging.INFO, "proxymap"):
        cache.close()
    assert [r.getMessage() for r in caplog.records] == [
        "t:x: backend still failing at exit after 0s; 1 stale answers and 0 RETRY during "
        "the outage",
        "cache t:x: hits=1 misses=2 coalesced=0 stale=1 evictions=0 invalidations=0 size=1",
    ]


# --- the handler's wiring ---------------------------------------------------------------------


class CountingTable(AsyncTable):
    """An in-memory table behind the asynchronous interface, counting its lookups."""

    dict_type = "acount"
    lookups: list[bytes] = []

    def __init__(self, name: str, open_mode: int, flags: int, ctx) -> None:
        self.memory = InternalTable(name, open_mode, flags, ctx)
        super().__init__(name, open_mode, self.memory.flags)

    async def alookup(self, key: bytes) -> bytes | None:
        self.memory.flags = self.flags
        CountingTable.lookups.append(key)
        await asyncio.sleep(0)
        return self.memory.lookup(key)

    async def aupdate(self, key: bytes, value: bytes) -> int:
        self.memory.flags = self.flags
        await asyncio.sleep(0)
        return self.memory.update(key, value)

    async def adelete(self, key: bytes) -> int:
        self.memory.flags = self.flags
        await asyncio.sleep(0)
        return self.memory.delete(key)


@pytest.fixture
def counting(monkeypatch) -> list[bytes]:
    monkeypatch.setitem(TABLE_TYPES, "acount", f"{__name__}:CountingTable")
    CountingTable.lookups = []
    return CountingTable.lookups


def handler_for(service: str, *approved: str, cached: str = "", **params: str) -> RequestHandler:
    return RequestHandler(
        service,
        list(approved),
        {"smtputf8_enable": "yes", "pyproxymap_cache_maps": cached, **params},
    )


async def ask(handler: RequestHandler, request: Request) -> Reply:
    reply = handler.handle(request)
    if reply.__class__ is not Reply:
        reply = await reply
    return reply


def g2(op: str, table: str, key: bytes, flags: int = POSTMAP_Q, **kw: Any) -> Request:
    return Request(op, table, G2, flags=flags, instance_flags=POSTMAP_Q, key=key, **kw)


def g1(table: str, key: bytes) -> Request:
    return Request("lookup", table, G1, flags=G1_LOOKUP, key=key)


def test_hits_are_answered_inline_and_the_fast_path_agrees(counting) -> None:
    handler = handler_for("proxywrite", "acount:t", cached="proxy:acount:t")

    async def scenario() -> None:
        await ask(handler, g2("update", "acount:t", b"alice", value=b"A\x00tail"))
        await ask(handler, g2("update", "acount:t", b"bob", value=b"B"))
        for request in (
            g2("lookup", "acount:t", b"alice"),
            g2("lookup", "acount:t", b"nobody"),
            g1("acount:t", b"alice"),
            g1("acount:t", b"nobody"),
        ):
            pending = handler.handle(request)
            assert pending.__class__ is not Reply  # a miss: the backend
            first = await pending
            hit = handler.handle(request)
            assert hit == first  # a hit: inline, the same reply
            compiled = handler.compile_lookup(request)
            assert compiled is not None
            assert compiled(request.key) == encode_reply("lookup", request.generation, hit)
            # A miss (the first time per generation): the backend, awaited by the caller.
            bob = compiled(b"bob")
            if bob.__class__ is not bytes:
                bob = await bob  # type: ignore[misc]
            hit = handler.handle(replace(request, key=b"bob"))  # filled by the fast path
            assert bob == encode_reply("lookup", request.generation, hit)

    run(scenario())
    # bob once per generation: the G1 and G2 requests differ in their answer bits.
    assert counting == [b"alice", b"bob", b"nobody", b"alice", b"bob", b"nobody"]


def test_local_and_unlisted_tables_are_not_cached(counting, tmp_path, caplog) -> None:
    local = tmp_path / "local"
    local.write_text("alice A\n")
    spec = f"texthash:{local}"
    with caplog.at_level(logging.WARNING, "proxymap"):
        handler = handler_for("proxymap", spec, "acount:other", cached=f"{spec} acount:x")
        assert handler.handle(g2("lookup", spec, b"alice")).value == b"A"
    assert f"pyproxymap_cache_maps: {spec} is a local table, it is not cached" in caplog.text
    assert handler.caches == {}

    async def scenario() -> None:
        for _ in range(3):
            await ask(handler, g2("lookup", "acount:other", b"alice"))

    run(scenario())
    assert counting == [b"alice"] * 3
    compiled = handler.compile_lookup(g2("lookup", "acount:other", b"alice"))
    assert compiled is not None
    for _ in range(2):  # the fast path asks the backend every time too
        run(compiled(b"alice"))  # type: ignore[arg-type]
    assert counting == [b"alice"] * 5


def test_writes_through_proxywrite_invalidate(counting) -> None:
    handler = handler_for("proxywrite", "acount:t", cached="acount:t")

    async def scenario() -> None:
        await ask(handler, g2("update", "acount:t", b"alice", value=b"old"))
        assert (await ask(handler, g2("lookup", "acount:t", b"alice"))).value == b"old"
        assert (await ask(handler, g2("lookup", "acount:t", b"alice"))).value == b"old"
        await ask(handler, g2("update", "acount:t", b"alice", value=b"new"))
        assert (await ask(handler, g2("lookup", "acount:t", b"alice"))).value == b"new"
        assert (await ask(handler, g2("delete", "acount:t", b"alice"))).status == OK
        assert (await ask(handler, g2("lookup", "acount:t", b"alice"))).status == NOKEY

    run(scenario())
    assert counting == [b"alice"] * 3
    assert handler.cache_figures()["acount:t"]["invalidations"] == 2


def test_handler_close_logs_each_cache(counting, caplog) -> None:
    handler = handler_for("proxymap", "acount:t", cached="acount:t")
    run(ask(handler, g2("lookup", "acount:t", b"alice")))
    with caplog.at_level(logging.INFO, "proxymap"):
        handler.close()
    assert "cache acount:t: hits=0 misses=1 coalesced=0 stale=0" in caplog.text


# --- against the real PostgreSQL --------------------------------------------------------------

COUNTED = (
    "INSERT INTO querylog VALUES ('%s', clock_timestamp()); SELECT v FROM aliases WHERE k = '%s'"
)
SLOW_COUNTED = "SELECT pg_sleep(0.3); " + COUNTED


def prepare(db: PrivatePostgres) -> None:
    db.create_user(USER, PASSWORD, DBNAME)
    db.execute(
        "CREATE TABLE IF NOT EXISTS aliases (k text PRIMARY KEY, v text);"
        "CREATE TABLE IF NOT EXISTS querylog (k text, at timestamptz);"
        "INSERT INTO aliases VALUES ('alice', 'alice@example.com'), "
        "('bob', 'bob@example.com') ON CONFLICT DO NOTHING;"
        f"ALTER TABLE aliases OWNER TO {USER}; ALTER TABLE querylog OWNER TO {USER};",
        dbname=DBNAME,
    )


@pytest.fixture(scope="module")
def database(postgres_module: PrivatePostgres) -> PrivatePostgres:  # noqa: F811
    prepare(postgres_module)
    return postgres_module


@pytest.fixture(scope="module")
def cf_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="cache-cf-", dir="/tmp"))
    yield directory
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()


def pgsql_table(db: PrivatePostgres, directory: Path, name: str, query: str = COUNTED) -> str:
    path = directory / f"{name}-{db.port}.cf"
    path.write_text(
        f"hosts = inet:127.0.0.1:{db.port}\nuser = {USER}\npassword = {PASSWORD}\n"
        f"dbname = {DBNAME}\nquery = {query}\n"
    )
    return f"pgsql:{path}"


class QueryLog:
    """What the server says it was asked: rows of querylog (per test: a mark)."""

    def __init__(self, db: PrivatePostgres) -> None:
        self.db = db
        self.mark = float(db.execute("SELECT extract(epoch FROM clock_timestamp())", dbname=DBNAME))

    def times(self, key: str) -> list[float]:
        out = self.db.execute(
            f"SELECT extract(epoch FROM at) FROM querylog WHERE k = '{key}' "
            f"AND at > to_timestamp({self.mark}) ORDER BY at",
            dbname=DBNAME,
        )
        return [float(line) for line in out.split()]

    def count(self, key: str) -> int:
        return len(self.times(key))


def test_a_hit_is_served_without_a_query(database: PrivatePostgres, cf_dir: Path) -> None:
    cached = pgsql_table(database, cf_dir, "hit")
    plain = pgsql_table(database, cf_dir, "hit-plain")
    handler = handler_for("proxymap", cached, plain, cached=f"proxy:{cached}")
    log = QueryLog(database)

    async def scenario() -> None:
        for _ in range(50):
            assert (
                await ask(handler, g2("lookup", cached, b"alice"))
            ).value == b"alice@example.com"
            assert (await ask(handler, g2("lookup", cached, b"nobody"))).status == NOKEY
        for _ in range(5):  # the counting itself: every uncached lookup is one row
            await ask(handler, g2("lookup", plain, b"bob"))

    run(scenario())
    assert (log.count("alice"), log.count("nobody"), log.count("bob")) == (1, 1, 5)
    figures = handler.cache_figures()[cached]
    assert (figures["hits"], figures["misses"]) == (98, 2)


def test_ttl_and_negative_ttl_to_within_a_second(database: PrivatePostgres, cf_dir: Path) -> None:
    cached = pgsql_table(database, cf_dir, "ttl")
    handler = handler_for(
        "proxymap",
        cached,
        cached=cached,
        pyproxymap_cache_ttl="3s",
        pyproxymap_cache_negative_ttl="1s",
    )
    log = QueryLog(database)

    async def scenario() -> None:
        started = time.monotonic()
        while time.monotonic() - started < 3.6:  # a lookup of each key every 20 ms
            assert (await ask(handler, g2("lookup", cached, b"alice"))).status == OK
            assert (await ask(handler, g2("lookup", cached, b"nobody"))).status == NOKEY
            await asyncio.sleep(0.02)

    run(scenario())
    found, missing = log.times("alice"), log.times("nobody")
    assert len(found) == 2 and len(missing) == 4, (found, missing)
    assert 3.0 <= found[1] - found[0] < 3.5, found
    for earlier, later in zip(missing, missing[1:], strict=False):
        assert 1.0 <= later - earlier < 1.5, missing


def test_concurrent_misses_make_one_query(database: PrivatePostgres, cf_dir: Path) -> None:
    cached = pgsql_table(database, cf_dir, "coalesce", SLOW_COUNTED)
    plain = pgsql_table(database, cf_dir, "coalesce-plain", SLOW_COUNTED)
    handler = handler_for("proxymap", cached, plain, cached=cached)
    log = QueryLog(database)

    async def scenario() -> None:
        replies = await asyncio.gather(
            *(ask(handler, g2("lookup", cached, b"alice")) for _ in range(20))
        )
        assert {reply.value for reply in replies} == {b"alice@example.com"}
        replies = await asyncio.gather(
            *(ask(handler, g2("lookup", plain, b"bob")) for _ in range(8))
        )
        assert {reply.value for reply in replies} == {b"bob@example.com"}

    run(scenario())
    assert (log.count("alice"), log.count("bob")) == (1, 8)
    figures = handler.cache_figures()[cached]
    assert (figures["misses"], figures["coalesced"]) == (20, 19)


@pytest.mark.serial
def test_stopped_backend_stale_then_retry(
    postgres: PrivatePostgres,  # noqa: F811
    cf_dir: Path,
    caplog,
) -> None:
    prepare(postgres)
    cached = pgsql_table(postgres, cf_dir, "stale")
    plain = pgsql_table(postgres, cf_dir, "stale-plain")
    handler = handler_for(
        "proxymap",
        cached,
        plain,
        cached=cached,
        pyproxymap_cache_ttl="1s",
        pyproxymap_cache_negative_ttl="1s",
        pyproxymap_cache_stale_ttl="3s",
    )

    async def status(table: str, key: bytes) -> tuple[int, bytes]:
        reply = await ask(handler, g2("lookup", table, key))
        return reply.status, reply.value

    async def scenario() -> None:
        for table in (plain, cached):
            assert await status(table, b"nobody") == (NOKEY, b"")
            assert await status(table, b"alice") == (OK, b"alice@example.com")
        stored = time.monotonic()  # the last entry: alice's in the cache
        await asyncio.to_thread(postgres.stop)
        started = time.monotonic()
        assert await status(plain, b"alice") == (RETRY, b"")  # unconfigured: at once
        assert await status(plain, b"nobody") == (RETRY, b"")
        assert await status(cached, b"bob") == (RETRY, b"")  # never cached
        assert time.monotonic() - started < 0.5
        answers = []
        while True:  # fresh, then stale, then RETRY
            answers.append((await status(cached, b"nobody"), await status(cached, b"alice")))
            if answers[-1][1][0] == RETRY:
                break
            await asyncio.sleep(0.05)
        retry_after = time.monotonic() - stored
        assert 4.0 <= retry_after < 5.0, retry_after
        alice = (OK, b"alice@example.com")
        *served, boundary, _ = answers
        assert set(served) == {((NOKEY, b""), alice)}
        # nobody's entry, stored one lookup before alice's, may end in between
        assert boundary in {((NOKEY, b""), alice), ((RETRY, b""), alice)}
        assert await status(cached, b"nobody") == (RETRY, b"")  # stored before alice
        assert handler.cache_figures()[cached]["stale"] >= 2 * 20  # 2 s at 20 a second
        await asyncio.to_thread(postgres.start)
        deadline = time.monotonic() + 5
        while await status(cached, b"alice") != (OK, b"alice@example.com"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)

    with caplog.at_level(logging.WARNING, "proxymap"):
        run(scenario())
    lines = [r.getMessage() for r in caplog.records if "stale answers" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"{cached}: backend answering again after")
    stale = handler.cache_figures()[cached]["stale"]
    assert f"; {stale} stale answers and " in lines[0]


# --- updates through proxywrite (memcache) ----------------------------------------------------


def test_an_update_through_proxywrite_is_seen_by_the_next_lookup(
    memcached: PrivateMemcached,  # noqa: F811
    tmp_path: Path,
) -> None:
    cf = tmp_path / "memcache.cf"
    cf.write_text(f"memcache = {memcached.postfix_server}\n")
    spec = f"memcache:{cf}"
    params = {"pyproxymap_cache_ttl": "1s", "pyproxymap_cache_negative_ttl": "1s"}
    writer = handler_for("proxywrite", spec, cached=f"proxy:{spec}", **params)
    reader = handler_for("proxymap", spec, cached=spec, **params)

    def gets() -> int:
        return int(memcached.stats()["cmd_get"])

    # A 3.11+ client sends the flags of its open reply: FIXED, so that FOLD_FIX counts.
    flags = POSTMAP_Q | F.FIXED

    async def value(handler: RequestHandler, key: bytes) -> bytes | None:
        reply = await ask(handler, g2("lookup", spec, key, flags))
        return reply.value if reply.status == OK else None

    async def scenario() -> None:
        assert (await ask(writer, g2("update", spec, b"alice", flags, value=b"v1"))).status == OK
        assert await value(writer, b"alice") == b"v1"
        assert await value(reader, b"alice") == b"v1"
        before = gets()
        assert await value(writer, b"alice") == b"v1"  # hits: no memcached get
        assert await value(reader, b"alice") == b"v1"
        assert gets() == before
        await ask(writer, g2("update", spec, b"Alice", flags, value=b"v2"))  # folded
        assert await value(writer, b"alice") == b"v2"  # the next lookup sees it
        assert await value(reader, b"alice") == b"v1"  # another process: until its TTL
        await ask(writer, g2("delete", spec, b"ALICE", flags))
        assert await value(writer, b"alice") is None
        await asyncio.sleep(1.05)
        assert await value(reader, b"alice") is None

    run(scenario())
