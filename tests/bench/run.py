"""Benchmark our proxymap against the C proxymap, both under the real Postfix master.

NAME
    run -- `make bench` / `python -m tests.bench.run`: throughput, latency, CPU, RSS, cold start

SYNOPSIS
    python -m tests.bench.run [--quick] [--tables hash,lmdb,...] [--conns 1,16,256]
                              [--seconds S] [--repeat N] [--v311] [--only c|ours]
                              [--ours PATH] [--results DIR] [--slow-ms MS]
                              [--slow-conns N] [--db-conns 1,16] [--db-pool N]
                              [--scale IDLE]

DESCRIPTION
    Two private Postfix instances (tests.support.postfix.PrivatePostfix) serve the same
    tables: one spawns the installed C proxymap, the other our worker. The load
    generator is pmload.c (the project's load generator, kept beside this file,
    compiled once into a cache directory): a closed loop of CONNS connections, one
    request outstanding per connection, with the flags `postmap -q` sends. Nothing
    outside the repository is read at run time.

    Each table gets a fresh pair of instances (started before its first run, stopped
    after its last), so that no table inherits the worker processes an earlier table's
    256-connection runs made the masters spawn: with them the figures depended on the
    order of the tables (ours spreads 16 clients over all the workers it has, and fewer
    requests per wake-up cost more CPU per request; the C proxymap gained from the extra
    processes). Within a table the connection counts run in the order given (ascending
    by default), each after the last. For every table and connection count the two
    implementations run alternately (C first, then ours first, ...), REPEAT times each;
    the report gives medians of:
      lookups/s, p50 and p99 latency (from pmload),
      server CPU per lookup (utime+stime of the instance's proxymap processes, from
      /proc, before and after the run, divided by the lookups served),
      RSS per worker (VmRSS after the run, mean over the instance's proxymap processes),
      and PSS per worker (proportional set size: shared library pages divided among
      the processes mapping them; for context, the target is stated in RSS),
    and, per implementation, the cold start: time from starting the master to the first
    successful lookup on a fresh connection.

    Both instances get the same process limit and a max_use/max_idle high enough that
    no worker is recycled during a run. A table type our worker cannot serve yet (the
    probe lookup does not answer OK) is reported as n/a.

    Local table kinds: hash, btree, lmdb, cdb (10 000 entries, built by postmap),
    texthash (their source), pcre, regexp, cidr (1 000 rules), inline (30 entries),
    static, unix:passwd.byname, sqlite (the 10 000 entries in an SQLite file, a
    primary key on the address); one key in ten absent.

    Table kind ``hash-busy`` is a hash table as a busy site has it: 20 000 entries, 5 000
    keys drawn at random with one in five absent, and a 2-second warm-up at the largest
    connection count, so that both masters spawn the workers they would under that load
    before the first measured run.

    Table kind ``socketmap`` is a remote backend (slow_socketmap.py beside this file)
    that answers after --slow-ms milliseconds, measured at --slow-conns connections: the
    C proxymap serialises lookups in each process, ours overlaps them.

    Kind ``cache-5ms`` (ours only, cache_workload.py): our worker with the result cache
    off and on, a --slow-ms socketmap backend that counts its queries, nine lookups
    in ten for 1000 hot keys, at the largest --slow-conns count; the report gives
    lookups/s, p50, p99 and backend queries per lookup for each.

    Kind ``floor`` (floor_workload.py): one connection against a C fixed-reply epoll
    server (echo_floor.c), the same in Python on our event loop, and both proxymaps on
    texthash, each with the server and the load where the kernel puts them, both on
    one CPU, and on two; the floor of a one-connection lookup on this machine.

    Kind ``statistics`` (ours only, stats_workload.py): the cost of live statistics,
    pyproxymap_statistics = no against yes on texthash and hash at 16 connections, in
    pairs of runs (at least seven); the report gives each setting's medians and the
    median of the paired ratios (target: at most 3 % fewer lookups/s).

    Database table kinds (databases.py): ``mysql-5ms`` and ``pgsql-5ms`` (a query that
    takes 5 ms, hit or miss, measured at --slow-conns connections), ``mysql``, ``pgsql``
    and ``ldap`` (the server's own cost, at --db-conns connections), on a private
    MariaDB, PostgreSQL and slapd each holding 10 000 entries; one key in five misses.
    Each side uses its own database user (one slapd per side), and during every run
    the server is asked four times how many connections that side holds: the report
    gives the most it saw, per side, beside our bound (our workers at that moment x
    pyproxymap_<type>_connections, the type's default unless --db-pool N sets it in
    our main.cf) and whether the issue's targets are met (5 ms @ 32: ours >= 5x the C
    lookups/s with p99 <= 15 ms; without the sleep: ours not slower than C). The warm-up
    of a database table runs at its largest connection count, so that both sides have
    their connections and workers before the first measured run. Beside them, mysql and
    pgsql rows are also measured "direct": the same queries from a C client
    (dbdirect.c, built with libmariadb and libpq) with one connection per client and no
    proxy, as that many Postfix processes with a direct table would query; the
    database's own latency at that load, which no proxy can go below.

    --scale IDLE holds IDLE connections open to our server (raising RLIMIT_NOFILE, which
    the workers inherit) and compares 256 active connections' p99 with and without them.

    --v311 makes pmload send the Postfix 3.11+ request form to OUR server; the C 3.7
    server does not speak it, so its column keeps the 3.7 form as the baseline.

FILES
    tests/bench/results/runs/<UTC timestamp>.json (every sample) and .md: every run's,
    untracked (.gitignore); tests/bench/results/latest.md: a copy of the last .md, the one
    to commit. --results DIR puts both under DIR instead (DIR/runs/, DIR/latest.md).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from proxymap.tables.pool import connection_limit
from tests.bench.databases import (
    DATABASE_KINDS,
    ConnectionWatch,
    DatabaseBackends,
    build_direct_client,
    dict_type,
    is_database_kind,
)
from tests.support.postfix import (
    C_PROXYMAP,
    PrivatePostfix,
    install_postfix,
    missing_postfix_parts,
    proc_cpu_ticks,
    proc_pss_kib,
    proc_rss_kib,
    run_postmap,
    settle_files,
    system_postfix_running,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# A hash table as a busy site has it: twice the entries, one key in five missing, keys in
# no particular order, and a warm-up long enough for both masters to spawn what they will.
BUSY_KIND = "hash-busy"
BUSY_ENTRIES = 20_000
BUSY_KEYS = 5_000
BUSY_WARM_UP = 2.0
# Indexed files built by postmap from one source (texthash reads the source itself).
INDEXED_KINDS = ("hash", "btree", "lmdb", "cdb", "texthash")
LOCAL_TABLES = (
    *INDEXED_KINDS,
    "pcre",
    "regexp",
    "cidr",
    "inline",
    "static",
    "unix",
    "sqlite",
    "socketmap",
    BUSY_KIND,
)
# Not a table of both sides: our worker with its result cache off and on (ours only).
CACHE_KIND = "cache-5ms"
# Neither: our worker with pyproxymap_statistics off and on (ours only).
STATS_KIND = "statistics"
# Nor this: fixed-reply servers and both proxymaps at one connection, pinned to CPUs.
FLOOR_KIND = "floor"
WORKLOAD_KINDS = (CACHE_KIND, STATS_KIND, FLOOR_KIND)  # each its own workload module
ALL_TABLES = LOCAL_TABLES + DATABASE_KINDS + WORKLOAD_KINDS
BENCH_DIR = Path(__file__).resolve().parent
# The load generator and the slow backend live here, beside this file: the
# benchmark reads nothing outside the repository at run time.
PMLOAD_SOURCE = BENCH_DIR / "pmload.c"
SLOW_BACKEND = BENCH_DIR / "slow_socketmap.py"
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
IMPLEMENTATIONS = ("c", "ours")

# Table sizes: big enough that lookups are not trivially cached by accident, small
# enough to build in a second.
INDEXED_ENTRIES = 10_000
RULES = 1_000
KEYS_PER_TABLE = 1_000
INLINE_ENTRIES = 30  # inline: lives in main.cf (a list, not a database); pmload sends <4 KiB


# ---------------------------------------------------------------------------
# Load generator
# ---------------------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or "/tmp"
    return Path(base) / "pyproxymap-bench-cache"


def build_pmload() -> Path:
    """Compile pmload.c with gcc -O2 once per source version."""
    source = PMLOAD_SOURCE
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    binary = cache_dir() / f"pmload-{digest}"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        partial = binary.with_suffix(f".{os.getpid()}.tmp")  # two builds may race
        subprocess.run(["gcc", "-O2", "-o", str(partial), str(source)], check=True)
        partial.rename(binary)
    return binary


@dataclass
class LoadResult:
    requests: int = 0
    ok: int = 0
    nokey: int = 0
    other: int = 0
    rps: float = 0.0
    p50_us: float = 0.0
    p99_us: float = 0.0
    max_us: float = 0.0
    exit: int = 0
    error: str = ""


def run_pmload(
    pmload: Path,
    socket_path: Path,
    table: str,
    conns: int,
    seconds: float,
    keyfile: Path,
    v311: bool,
    watch: ConnectionWatch | None = None,
    cpus: set[int] | None = None,
) -> LoadResult:
    """One closed-loop run; WATCH (if any) samples the database server meanwhile;
    CPUS (if any) is where pmload may run."""
    command = [str(pmload), str(socket_path), table, str(conns), str(seconds), str(keyfile)]
    if v311:
        command.append("--v311")
    began = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if cpus is not None:
        os.sched_setaffinity(process.pid, cpus)  # before it has connected: a few syscalls in
    try:
        if watch is not None:
            watch.during(began, seconds)
        stdout, stderr = process.communicate(
            timeout=max(1.0, began + seconds + 30 - time.monotonic())
        )
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return LoadResult(exit=-1, error="pmload timed out (server hung)")
    return parse_load(stdout, process.returncode, stderr)


def parse_load(stdout: str, returncode: int, stderr: str) -> LoadResult:
    """The name=value line of pmload (and of dbdirect.c, which prints the same)."""
    result = LoadResult(exit=returncode, error=stderr.strip())
    for item in stdout.split():
        name, _, value = item.partition("=")
        if name in ("requests", "ok", "nokey", "other"):
            setattr(result, name, int(value))
        elif name in ("rps", "p50_us", "p99_us", "max_us"):
            setattr(result, name, float(value))
    return result


def run_direct(binary: Path, args: list[str], conns: int, seconds: float) -> LoadResult:
    """One closed-loop run of dbdirect.c: the database without any proxy."""
    command = [str(binary), *args, str(conns), str(seconds)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=seconds + 30, check=False
        )
    except subprocess.TimeoutExpired:
        return LoadResult(exit=-1, error="dbdirect timed out")
    return parse_load(done.stdout, done.returncode, done.stderr)


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------


@dataclass
class BenchTable:
    kind: str
    spec: str  # table name as the client sends it (without proxy:)
    keyfile: Path
    probe_key: str
    # Database tables: a .cf per implementation (each its own database user) and the
    # server-side connection count of an implementation.
    specs: dict[str, str] = field(default_factory=dict)
    count_connections: Callable[[str], int] | None = None
    direct_args: list[str] | None = None  # dbdirect.c's (databases.DatabaseTable)

    def spec_for(self, impl: str) -> str:
        return self.specs.get(impl, self.spec)


def build_tables(
    directory: Path,
    kinds: list[str],
    slow_port: int = 0,
    backends: DatabaseBackends | None = None,
) -> dict[str, BenchTable]:
    """Write sources and key files, build indexed files with the real postmap."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    source = directory / "users"
    source.write_text(
        "".join(f"user{i}@example.com user{i}@mail.example.net\n" for i in range(INDEXED_ENTRIES))
    )
    # Nine hits for one miss, spread over the whole table.
    user_keys = [
        f"user{(i * 7919) % INDEXED_ENTRIES}@example.com" if i % 10 else f"nobody{i}@example.com"
        for i in range(KEYS_PER_TABLE)
    ]
    tables: dict[str, BenchTable] = {}
    for kind in kinds:
        if kind in INDEXED_KINDS:
            path = source
            if kind == "btree":  # hash and btree files are both NAME.db
                path = directory / "users-btree"
                shutil.copyfile(source, path)
            if kind != "texthash":
                run_checked([f"{kind}:{path}"])
            keyfile = write_keys(directory / "keys-users", user_keys)
            tables[kind] = BenchTable(kind, f"{kind}:{path}", keyfile, "user1@example.com")
        elif kind in ("inline", "static"):
            tables[kind] = small_table(directory, kind)
        elif kind == BUSY_KIND:
            tables[kind] = busy_table(directory)
        elif kind in ("pcre", "regexp"):
            rules = directory / f"rules.{kind}"
            rules.write_text("".join(f"/^user{i}@example\\.com$/ rule{i}\n" for i in range(RULES)))
            keys = [
                f"user{(i * 37) % RULES}@example.com" if i % 10 else "nomatch@x"
                for i in range(KEYS_PER_TABLE)
            ]
            tables[kind] = BenchTable(
                kind,
                f"{kind}:{rules}",
                write_keys(directory / f"keys-{kind}", keys),
                "user1@example.com",
            )
        elif kind == "cidr":
            rules = directory / "nets.cidr"
            rules.write_text(
                "".join(f"10.{i // 256}.{i % 256}.0/24 net{i}\n" for i in range(RULES))
            )
            keys = [
                f"10.{(j := (i * 37) % RULES) // 256}.{j % 256}.9" if i % 10 else "192.0.2.1"
                for i in range(KEYS_PER_TABLE)
            ]
            tables[kind] = BenchTable(
                kind, f"cidr:{rules}", write_keys(directory / "keys-cidr", keys), "10.0.1.9"
            )
        elif kind == "sqlite":
            tables[kind] = sqlite_table(directory, user_keys)
        elif kind == "unix":
            keys = ["root", "postfix", "nobody", "daemon", "no-such-user"] * 200
            tables[kind] = BenchTable(
                kind, "unix:passwd.byname", write_keys(directory / "keys-unix", keys), "root"
            )
        elif kind == "socketmap":
            # A remote backend answering after a fixed delay (started by run_benchmark).
            keys = [f"user{i}" for i in range(KEYS_PER_TABLE)]
            tables[kind] = BenchTable(
                kind,
                f"socketmap:inet:127.0.0.1:{slow_port}:slow",
                write_keys(directory / "keys-slow", keys),
                "user1",
            )
        elif is_database_kind(kind) and backends is not None:
            made = backends.table(kind, directory)
            tables[kind] = BenchTable(
                kind,
                made.specs["c"],
                made.keyfile,
                made.probe_key,
                made.specs,
                made.count_connections,
                made.direct_args,
            )
        else:
            raise SystemExit(f"unknown table kind {kind!r}; choose from {', '.join(ALL_TABLES)}")
    for path in directory.iterdir():
        path.chmod(0o644)
    settle_files(directory)
    return tables


def sqlite_table(directory: Path, keys: list[str]) -> BenchTable:
    """The indexed tables' entries in an SQLite database (a primary key on the address)."""
    database = directory / "users.sqlite"
    with contextlib.closing(sqlite3.connect(database)) as connection:
        connection.execute("CREATE TABLE t (addr TEXT PRIMARY KEY, dest TEXT NOT NULL)")
        connection.executemany(
            "INSERT INTO t VALUES (?, ?)",
            ((f"user{i}@example.com", f"user{i}@mail.example.net") for i in range(INDEXED_ENTRIES)),
        )
        connection.commit()
    cf = directory / "sqlite.cf"
    cf.write_text(f"dbpath = {database}\nquery = SELECT dest FROM t WHERE addr = '%s'\n")
    keyfile = write_keys(directory / "keys-users", keys)
    return BenchTable("sqlite", f"sqlite:{cf}", keyfile, "user1@example.com")


def small_table(directory: Path, kind: str) -> BenchTable:
    """inline: (INLINE_ENTRIES entries written in the table name) or static: (every
    key found); keys as for the other tables, one in ten absent from inline:."""
    if kind == "static":
        spec = "static:user@mail.example.net"
    else:
        entries = ",".join(
            f"user{i}@example.com=user{i}@mail.example.net" for i in range(INLINE_ENTRIES)
        )
        spec = f"inline:{{{entries}}}"
    keys = [
        f"user{(i * 37) % INLINE_ENTRIES}@example.com" if i % 10 else f"nobody{i}@example.com"
        for i in range(KEYS_PER_TABLE)
    ]
    return BenchTable(kind, spec, write_keys(directory / f"keys-{kind}", keys), "user1@example.com")


def busy_table(directory: Path) -> BenchTable:
    """BUSY_ENTRIES addresses; BUSY_KEYS keys drawn at random, one in five absent."""
    source = directory / "users-busy"
    source.write_text(
        "".join(f"busy{i}@example.org busy{i}@mail.example.net\n" for i in range(BUSY_ENTRIES))
    )
    run_checked([f"hash:{source}"])
    rng = random.Random(17)
    keys = [
        f"busy{rng.randrange(BUSY_ENTRIES)}@example.org"
        if rng.random() >= 0.2
        else f"absent{rng.randrange(10**6)}@example.org"
        for _ in range(BUSY_KEYS)
    ]
    keyfile = write_keys(directory / "keys-busy", keys)
    return BenchTable(BUSY_KIND, f"hash:{source}", keyfile, "busy1@example.org")


def write_keys(path: Path, keys: list[str]) -> Path:
    path.write_text("".join(f"{key}\n" for key in keys))
    return path


def run_checked(args: list[str]) -> None:
    result = run_postmap(args, timeout=120)
    if result.exit != 0:
        raise SystemExit(f"postmap {' '.join(args)} failed: {result.stderr}")


# ---------------------------------------------------------------------------
# Server measurements
# ---------------------------------------------------------------------------


def worker_ticks(instance: PrivatePostfix) -> dict[int, int]:
    return {pid: proc_cpu_ticks(pid) for pid in instance.worker_pids("proxymap")}


def cpu_seconds_between(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU used by the workers between two snapshots (new workers count in full)."""
    ticks = sum(after[pid] - before.get(pid, 0) for pid in after)
    return ticks / TICKS_PER_SECOND


def mean_rss_mib(instance: PrivatePostfix) -> float | None:
    sizes = [proc_rss_kib(pid) for pid in instance.worker_pids("proxymap")]
    sizes = [size for size in sizes if size]
    return statistics.mean(sizes) / 1024 if sizes else None


def mean_pss_mib(instance: PrivatePostfix) -> float | None:
    sizes = [proc_pss_kib(pid) for pid in instance.worker_pids("proxymap")]
    sizes = [size for size in sizes if size]
    return statistics.mean(sizes) / 1024 if sizes else None


def probe(instance: PrivatePostfix, table: BenchTable, impl: str) -> str:
    """'' when the table answers OK, else why not (for the n/a column)."""
    try:
        with instance.client(timeout=10) as client:
            reply = client.lookup(table.spec_for(impl), table.probe_key)
    except (OSError, EOFError) as error:
        return f"no answer ({error})"
    status = reply.get("status", b"?").decode()
    return "" if status == "0" else f"probe lookup status {status}"


# ---------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------


@dataclass
class Sample:
    implementation: str
    table: str
    conns: int
    repeat: int
    load: LoadResult
    cpu_us_per_lookup: float | None
    rss_mib: float | None
    workers: int
    pss_mib: float | None = None
    # Database tables: the most connections the server saw from this side during the
    # run, the bound (workers x pyproxymap_<type>_connections; ours only), how many
    # samples were taken and how many exceeded the bound.
    db_connections: int | None = None
    db_bound: int | None = None
    db_samples: int = 0
    db_over_bound: int = 0


@dataclass
class Report:
    started: str
    options: dict
    host: dict
    cold_start_ms: dict = field(default_factory=dict)
    not_available: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)
    summary: list = field(default_factory=list)
    scale: dict = field(default_factory=dict)
    # Our per-worker connection limit per database type (pyproxymap_<type>_connections).
    db_limits: dict = field(default_factory=dict)
    # cache_workload.cache_rows: our worker with the result cache off and on.
    cache: list = field(default_factory=list)
    # stats_workload.stats_rows: our worker with pyproxymap_statistics off and on.
    stats_cost: list = field(default_factory=list)
    # floor_workload.floor_rows: one connection, fixed-reply servers, CPU placements.
    floor: list = field(default_factory=list)


def listed_tables(tables: dict[str, BenchTable], own: str | None) -> dict[str, BenchTable]:
    """The tables an instance lists in proxy_read_maps: the local ones, and OWN.

    Our worker imports the driver of every type proxy_read_maps names before it drops
    privileges (asyncmy, psycopg and python-ldap together: about 25 MiB more RSS per
    worker), so an instance lists a database table only when it measures that table:
    the figures of the other tables (RSS, cold start) stay those of a site without one.
    """
    listed = {
        kind: table for kind, table in tables.items() if not is_database_kind(kind) or kind == own
    }
    return listed or dict([next(iter(tables.items()))])


def make_instance(
    program: Path,
    tables: dict[str, BenchTable],
    base: Path,
    tag: str,
    impl: str,
    db_pool: int = 0,
    own: str | None = None,
    settings: dict[str, str] | None = None,
):
    """A private Postfix instance serving TABLES with IMPL; SETTINGS go to its main.cf."""
    tables = listed_tables(tables, own)
    main_cf = {
        # No recycling during a run, the same process limit for both.
        "max_use": "1000000",
        "max_idle": "3600",
        "default_process_limit": "100",
    }
    if impl == "ours" and db_pool:
        main_cf.update(pool_settings(tables, db_pool))
    main_cf.update(settings or {})
    return PrivatePostfix(
        proxymap_program=program,
        proxy_read_maps=" ".join(f"proxy:{t.spec_for(impl)}" for t in tables.values()),
        main_cf=main_cf,
        readable_paths=[t.keyfile.parent for t in tables.values()],
        base_dir=base,
        name=tag,
    )


def pool_settings(tables: dict[str, BenchTable], db_pool: int) -> dict[str, str]:
    """pyproxymap_<type>_connections for every database type among TABLES."""
    types = {dict_type(kind) for kind in tables if is_database_kind(kind)}
    return {f"pyproxymap_{kind}_connections": str(db_pool) for kind in sorted(types)}


def measure_cold_start(
    program: Path, tables, base: Path, tag: str, repeat: int, impl: str, db_pool: int
) -> list[float]:
    """Milliseconds from master start to the first OK answer; empty if none came."""
    # The simplest table type, so that the figure is about starting, not about loading.
    tables = listed_tables(tables, None)
    table = tables.get("texthash") or tables.get("unix") or next(iter(tables.values()))
    times = []
    for _ in range(repeat):
        instance = make_instance(program, tables, base, tag, impl, db_pool)
        try:
            instance.start()
            times.append(
                instance.time_to_first_answer(table.probe_key, table.spec_for(impl), timeout=10)
                * 1000
            )
        except (TimeoutError, RuntimeError) as error:
            log(f"cold start {tag}: {error}")
            return []
        finally:
            instance.stop()
            instance.cleanup()
    return times


def run_benchmark(options: argparse.Namespace) -> Report:
    if missing_postfix_parts():
        install_postfix()  # as root on a fresh machine, like the tests do
    if missing_postfix_parts():
        raise SystemExit(f"Postfix is not installed: {missing_postfix_parts()}")
    if system_postfix_running():
        # Never stopped for a benchmark: this may be a mail server. Its load is noise.
        print(
            "note: a system Postfix is running; its activity may disturb the figures",
            file=sys.stderr,
        )
    pmload = build_pmload()
    base = Path(tempfile.mkdtemp(prefix="pmbench-", dir="/tmp"))
    base.chmod(0o755)
    programs = {"c": C_PROXYMAP, "ours": Path(options.ours)}
    implementations = [i for i in IMPLEMENTATIONS if options.only in (None, i)]
    report = Report(
        started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        options={k: v for k, v in vars(options).items()},
        host={"cpus": os.cpu_count(), "uname": " ".join(os.uname()), "postfix": postfix_version()},
    )
    if not programs["ours"].exists() and "ours" in implementations:
        report.not_available["ours"] = f"{programs['ours']} does not exist"
        implementations.remove("ours")
    backend = start_slow_backend(options) if "socketmap" in options.tables else None
    backends = DatabaseBackends(base / "servers")
    if options.scale:
        raise_open_file_limit(options.scale + 4096)
    kinds = [kind for kind in options.tables if kind not in WORKLOAD_KINDS]
    try:
        tables = (
            build_tables(base / "tables", kinds, backend.port if backend else 0, backends)
            if kinds
            else {}
        )
        direct_client = (
            build_direct_client(cache_dir())
            if any(table.direct_args for table in tables.values())
            else None
        )
        report.db_limits = {
            dict_type(kind): our_connection_limit(kind, options.db_pool)
            for kind in tables
            if is_database_kind(kind)
        }
        for impl in implementations if tables else ():
            times = measure_cold_start(
                programs[impl], tables, base, f"cold-{impl}", options.repeat, impl, options.db_pool
            )
            report.cold_start_ms[impl] = statistics.median(times) if times else None
            log(f"cold start {impl}: {_fmt(report.cold_start_ms[impl], 1)} ms ({len(times)} runs)")
        for kind, table in tables.items():
            instances = {
                impl: make_instance(
                    programs[impl], tables, base, f"{impl}-{kind}", impl, options.db_pool, own=kind
                )
                for impl in implementations
            }
            with running(instances):
                measure_table(options, pmload, table, instances, report, direct_client)
        if options.scale and "ours" in implementations:
            instances = {
                "ours": make_instance(
                    programs["ours"], tables, base, "ours-scale", "ours", options.db_pool
                )
            }
            with running(instances):
                measure_scale(options, pmload, instances["ours"], tables, report)
        if CACHE_KIND in options.tables and "ours" in implementations:
            measure_cache(options, pmload, programs["ours"], base, report)
        if STATS_KIND in options.tables and "ours" in implementations:
            measure_statistics(options, pmload, programs["ours"], base, report)
        if FLOOR_KIND in options.tables and "ours" in implementations:
            measure_floor(options, pmload, programs["ours"], base, report)
    finally:
        if backend:
            backend.stop()
        backends.close()
        shutil.rmtree(base, ignore_errors=True)
    report.summary = summarize(report)
    return report


def measure_cache(options, pmload: Path, program: Path, base: Path, report: Report) -> None:
    """The result cache off and on: a --slow-ms backend, 90 % repeated keys, at the
    largest --slow-conns count (cache_workload.py)."""
    from tests.bench.cache_workload import cache_rows  # it imports this module

    conns = max(options.slow_conns)
    report.cache = cache_rows(
        pmload,
        base,
        program,
        seconds=options.seconds,
        conns=conns,
        delay_ms=options.slow_ms,
        repeat=options.repeat,
    )
    for row in report.cache:
        log(
            f"ours {CACHE_KIND} cache {row['cache']}: {row['rps']:.0f} lookups/s, "
            f"p99 {row['p99_us']:.0f} us, {row['queries_per_lookup']:.3f} queries/lookup"
        )


def measure_statistics(options, pmload: Path, program: Path, base: Path, report: Report) -> None:
    """pyproxymap_statistics off and on, texthash and hash at 16 connections, in
    pairs of runs (stats_workload.py); at least seven pairs."""
    from tests.bench.stats_workload import stats_rows  # it imports this module

    report.stats_cost = stats_rows(
        pmload, base, program, seconds=options.seconds, repeat=max(options.repeat, 7)
    )
    for row in report.stats_cost:
        log(
            f"ours {row['table']} statistics on/off: lookups/s {row['rps_ratio']:.3f}, "
            f"CPU per lookup {row['cpu_ratio']:.3f}"
        )


def measure_floor(options, pmload: Path, program: Path, base: Path, report: Report) -> None:
    """One connection against fixed-reply servers and both proxymaps, in three CPU
    placements (floor_workload.py)."""
    from tests.bench.floor_workload import floor_rows  # it imports this module

    report.floor = floor_rows(pmload, base, program, seconds=options.seconds, repeat=options.repeat)


@contextlib.contextmanager
def running(instances: dict[str, PrivatePostfix]):
    """Start the instances; stop them (and check for leftovers) afterwards."""
    try:
        for instance in instances.values():
            instance.start()
        yield instances
    finally:
        for impl, instance in instances.items():
            leftovers = instance.stop()
            if leftovers:
                log(f"warning: {impl} instance left processes behind: {leftovers}")
            instance.cleanup()


def measure_table(options, pmload, table, instances, report, direct_client=None) -> None:
    """Every connection count on one table, C and ours alternating, on fresh instances."""
    available = {}
    for impl, instance in instances.items():
        why_not = probe(instance, table, impl)
        available[impl] = not why_not
        if why_not:
            report.not_available[f"{impl}/{table.kind}"] = why_not
            log(f"{impl} {table.kind}: n/a ({why_not})")
            continue
        # Warm-up: open the table, spawn workers.
        if is_database_kind(table.kind):
            rounds = warm_up_database(options, pmload, instance, impl, table)
            log(
                f"{impl} {table.kind}: warm-up {rounds} rounds, "
                f"{len(instance.worker_pids('proxymap'))} workers"
            )
        else:
            busy = table.kind == BUSY_KIND
            run_pmload(
                pmload,
                instance.socket_path(),
                table.spec_for(impl),
                max(conns_for(table.kind, options)) if busy else 16,
                BUSY_WARM_UP if busy else 0.5,
                table.keyfile,
                options.v311 and impl == "ours",
            )
    direct = direct_client if table.direct_args else None
    for conns in conns_for(table.kind, options):
        for repeat in range(options.repeat):
            order = list(instances) if repeat % 2 == 0 else list(reversed(instances))
            for impl in order:
                if not available[impl]:
                    continue
                sample = measure_one(options, pmload, instances[impl], impl, table, conns)
                sample.repeat = repeat
                report.samples.append(sample)
                log(describe(sample))
            if direct is not None:
                sample = measure_direct(options, direct, table, conns)
                sample.repeat = repeat
                report.samples.append(sample)
                log(describe(sample))


def measure_direct(options, binary: Path, table: BenchTable, conns: int) -> Sample:
    """The same queries from a C client, one connection per client and no proxy: the
    database's own throughput and latency at this load, in the same run."""
    assert table.direct_args is not None
    load = run_direct(binary, table.direct_args, conns, options.seconds)
    return Sample("direct", table.kind, conns, 0, load, None, None, 0)


WARM_UP_ROUNDS = 10


def warm_up_database(options, pmload, instance, impl, table) -> int:
    """Bursts at the table's largest connection count until the workers stop growing.

    The C master spawns another proxymap only when a client connects while every
    process is in the middle of a request, so one burst of 32 connections leaves
    anywhere from 1 to 8 processes and the C figures of the 5-ms rows varied 7-fold
    from run to run. Repeated bursts (each one a new set of connections, as clients
    come and go in a real system) let both masters reach the processes that load
    makes them spawn; the connections to the server are open before the first run.
    """
    conns = max(16, *conns_for(table.kind, options))
    seen: list[int] = []
    for _ in range(WARM_UP_ROUNDS):
        run_pmload(
            pmload,
            instance.socket_path(),
            table.spec_for(impl),
            conns,
            0.5,
            table.keyfile,
            options.v311 and impl == "ours",
        )
        seen.append(len(instance.worker_pids("proxymap")))
        if len(seen) >= 3 and seen[-1] == seen[-3]:
            break
    return len(seen)


def conns_for(kind: str, options: argparse.Namespace) -> list[int]:
    """The slow backends (socketmap, the 5-ms queries) are measured at their own
    connection counts (latency workloads), the other database tables at theirs."""
    if kind == "socketmap" or kind.endswith("-5ms"):
        return options.slow_conns
    return options.db_conns if is_database_kind(kind) else options.conns


class SlowBackend:
    """slow_socketmap.py on a free loopback port."""

    def __init__(self, delay_ms: float) -> None:
        with socket.socket() as probe_socket:
            probe_socket.bind(("127.0.0.1", 0))
            self.port = probe_socket.getsockname()[1]
        self.process = subprocess.Popen(
            [sys.executable, str(SLOW_BACKEND), str(self.port), str(delay_ms)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise SystemExit("the slow socketmap backend did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def start_slow_backend(options: argparse.Namespace) -> SlowBackend:
    return SlowBackend(options.slow_ms)


def raise_open_file_limit(wanted: int) -> None:
    """Idle connections need descriptors here and in the workers (they inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))


def open_idle_connections(path: Path, count: int) -> list[socket.socket]:
    """Connect COUNT clients that never send anything (they keep their worker slots)."""
    idle = []
    for _ in range(count):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        idle.append(client)
    return idle


def measure_scale(options, pmload, instance, tables, report) -> None:
    """256 active connections with and without SCALE idle ones held open (ours only)."""
    table = tables.get("hash") or tables.get("texthash") or next(iter(tables.values()))
    active = 256
    baseline = run_pmload(
        pmload, instance.socket_path(), table.spec, active, options.seconds, table.keyfile, False
    )
    idle = open_idle_connections(instance.socket_path(), options.scale)
    try:
        time.sleep(1.0)  # let the workers accept them all
        loaded = run_pmload(
            pmload,
            instance.socket_path(),
            table.spec,
            active,
            options.seconds,
            table.keyfile,
            False,
        )
        alive = sum(1 for client in idle if _still_open(client))
    finally:
        for client in idle:
            client.close()
    report.scale = {
        "table": table.kind,
        "idle": options.scale,
        "active": active,
        "idle_still_open": alive,
        "baseline": asdict(baseline),
        "with_idle": asdict(loaded),
        "workers": len(instance.worker_pids()),
    }
    log(
        f"scale: {options.scale} idle + {active} active: p99 {loaded.p99_us:.0f} us "
        f"(without idle {baseline.p99_us:.0f} us), errors {loaded.other}, "
        f"idle still open {alive}"
    )


def _still_open(client: socket.socket) -> bool:
    """An idle connection the server closed reads EOF; one still open would block."""
    client.setblocking(False)
    try:
        data = client.recv(4096)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return bool(data)  # the unread announcement: still open


def our_connection_limit(kind: str, db_pool: int) -> int | None:
    """Our per-worker limit for a database table: --db-pool, else the type's default."""
    settings = pool_settings({kind: None}, db_pool) if db_pool else {}
    return connection_limit(dict_type(kind), settings)


def connection_watch(options, instance, impl, table) -> ConnectionWatch | None:
    """For a database table: count IMPL's connections on the server during the run."""
    count = table.count_connections
    if count is None:
        return None
    return ConnectionWatch(
        count=lambda: count(impl),
        workers=lambda: len(instance.worker_pids("proxymap")),
        per_worker=our_connection_limit(table.kind, options.db_pool) if impl == "ours" else None,
    )


def measure_one(options, pmload, instance, impl, table, conns) -> Sample:
    watch = connection_watch(options, instance, impl, table)
    before = worker_ticks(instance)
    load = run_pmload(
        pmload,
        instance.socket_path(),
        table.spec_for(impl),
        conns,
        options.seconds,
        table.keyfile,
        options.v311 and impl == "ours",
        watch,
    )
    after = worker_ticks(instance)
    served = load.requests
    cpu = cpu_seconds_between(before, after)
    if watch is not None and watch.errors:
        log(f"{impl} {table.kind}: connection count failed: {watch.errors[0]}")
    return Sample(
        implementation=impl,
        table=table.kind,
        conns=conns,
        repeat=0,
        load=load,
        cpu_us_per_lookup=cpu / served * 1e6 if served else None,
        rss_mib=mean_rss_mib(instance),
        workers=len(after),
        pss_mib=mean_pss_mib(instance),
        db_connections=watch.max_connections if watch and watch.samples else None,
        db_bound=watch.bound if watch and watch.samples else None,
        db_samples=watch.samples if watch else 0,
        db_over_bound=watch.over_bound if watch else 0,
    )


def describe(sample: Sample) -> str:
    load = sample.load
    cpu = f"{sample.cpu_us_per_lookup:.1f}" if sample.cpu_us_per_lookup else "?"
    if sample.implementation == "direct":
        cpu = "-"
    problem = f" ERROR exit={load.exit} {load.error}" if load.exit else ""
    database = ""
    if sample.db_samples:
        bound = f"/{sample.db_bound}" if sample.db_bound is not None else ""
        over = f" OVER BOUND in {sample.db_over_bound} samples" if sample.db_over_bound else ""
        database = f" db_conns={sample.db_connections}{bound}{over}"
    return (
        f"{sample.implementation:6} {sample.table:9} conns={sample.conns:<3} "
        f"rps={load.rps:8.0f} p50={load.p50_us:8.1f}us p99={load.p99_us:8.1f}us "
        f"cpu={cpu}us/lookup workers={sample.workers}{database}{problem}"
    )


def postfix_version() -> str:
    done = subprocess.run(
        ["postconf", "-dh", "mail_version"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Summary and output
# ---------------------------------------------------------------------------


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(report: Report) -> list[dict]:
    groups: dict[tuple, list[Sample]] = {}
    for sample in report.samples:
        groups.setdefault((sample.table, sample.conns, sample.implementation), []).append(sample)
    rows = []
    for (table, conns, impl), samples in groups.items():
        good = [s for s in samples if s.load.exit == 0 and s.load.requests]
        rows.append(
            {
                "table": table,
                "conns": conns,
                "implementation": impl,
                "runs": len(samples),
                "failed_runs": len(samples) - len(good),
                "rps": _median([s.load.rps for s in good]),
                "p50_us": _median([s.load.p50_us for s in good]),
                "p99_us": _median([s.load.p99_us for s in good]),
                "cpu_us_per_lookup": _median([s.cpu_us_per_lookup for s in good]),
                "rss_mib": _median([s.rss_mib for s in good]),
                "pss_mib": _median([s.pss_mib for s in good]),
                "workers": max((s.workers for s in samples), default=0),
                "db_connections": _max([s.db_connections for s in samples]),
                "db_bound": _max([s.db_bound for s in samples]),
                "db_over_bound": sum(s.db_over_bound for s in samples),
                "errors": sum(s.load.other for s in samples),
            }
        )
    return rows


def _max(values):
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _fmt(value, digits=0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def _ratio(ours, c) -> str:
    if ours is None or c in (None, 0):
        return "n/a"
    return f"{ours / c:.2f}"


def markdown(report: Report) -> str:
    by_key = {(r["table"], r["conns"], r["implementation"]): r for r in report.summary}
    tables = list(
        dict.fromkeys(r["table"] for r in report.summary if not is_database_kind(r["table"]))
    )
    conns = sorted({r["conns"] for r in report.summary})
    lines = [
        f"# proxymap benchmark, {report.started}",
        "",
        f"Host: {report.host['cpus']} CPUs, Postfix {report.host['postfix']}. "
        f"{report.options['seconds']} s per run, {report.options['repeat']} runs per cell "
        "(medians), C and ours alternating. Request form: "
        + ("3.11+ for ours, 3.7 for C" if report.options["v311"] else "3.7 (postmap flags)")
        + ". Ratios are ours/C (throughput: higher is better; the rest: lower is better).",
    ]
    if tables:  # local tables (a run of database kinds alone has none)
        lines += [
            "",
            "| table | conns | lookups/s C | ours | ratio | p50 µs C | ours | p99 µs C | ours "
            "| CPU µs/lookup C | ours | ratio | RSS MiB/worker C | ours | PSS MiB/worker C | ours "
            "| workers C | ours |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    empty: dict = {}
    for table in tables:
        for conn in conns:
            c = by_key.get((table, conn, "c"), empty)
            o = by_key.get((table, conn, "ours"), empty)
            if not c and not o:
                continue
            lines.append(
                f"| {table} | {conn} | {_fmt(c.get('rps'))} | {_fmt(o.get('rps'))} "
                f"| {_ratio(o.get('rps'), c.get('rps'))} "
                f"| {_fmt(c.get('p50_us'), 1)} | {_fmt(o.get('p50_us'), 1)} "
                f"| {_fmt(c.get('p99_us'), 1)} | {_fmt(o.get('p99_us'), 1)} "
                f"| {_fmt(c.get('cpu_us_per_lookup'), 1)} | {_fmt(o.get('cpu_us_per_lookup'), 1)} "
                f"| {_ratio(o.get('cpu_us_per_lookup'), c.get('cpu_us_per_lookup'))} "
                f"| {_fmt(c.get('rss_mib'), 1)} | {_fmt(o.get('rss_mib'), 1)} "
                f"| {_fmt(c.get('pss_mib'), 1)} | {_fmt(o.get('pss_mib'), 1)} "
                f"| {c.get('workers', 'n/a')} | {o.get('workers', 'n/a')} |"
            )
    lines += database_markdown(report, by_key, conns)
    if report.cache:
        from tests.bench.cache_workload import cache_markdown  # it imports this module

        first = report.cache[0]
        lines += [
            "",
            f"Result cache (ours only; the C proxymap has none): a "
            f"{first['delay_ms']:g} ms socketmap backend, "
            f"{first['repeated']:.0%} of lookups for 1000 hot keys, the rest for keys "
            "used once; pyproxymap_cache_ttl = 60s; backend queries counted by the "
            "backend.",
            "",
        ]
        lines += cache_markdown(report.cache)
    if report.stats_cost:
        from tests.bench.stats_workload import stats_markdown  # it imports this module

        lines += [
            "",
            "Live statistics (ours only): pyproxymap_statistics = no against yes, "
            "two workers each, paired runs in alternating order; ratios on/off.",
            "",
        ]
        lines += stats_markdown(report.stats_cost)
    if report.floor:
        from tests.bench.floor_workload import floor_markdown  # it imports this module

        lines += [
            "",
            "One-connection floor: fixed-reply servers (C epoll, Python on our event loop) "
            "and both proxymaps on texthash, one worker each; free = the kernel places "
            "server and load, one-cpu = both on CPU 0, two-cpus = server on 0, load on 1.",
            "",
        ]
        lines += floor_markdown(report.floor)
    lines += ["", "Cold start (master start to first answer on a fresh connection, median):", ""]
    for impl in IMPLEMENTATIONS:
        cold = report.cold_start_ms.get(impl)
        lines.append(f"- {impl}: " + (f"{cold:.1f} ms" if cold is not None else "n/a"))
    if report.scale:
        scale = report.scale
        base, loaded = scale["baseline"], scale["with_idle"]
        ratio = _ratio(loaded["p99_us"], base["p99_us"])
        lines += [
            "",
            f"Scale (ours): {scale['idle']:,} idle + {scale['active']} active "
            f"connections on {scale['table']}, {scale['workers']} workers: "
            f"{loaded['rps']:,.0f} lookups/s, p99 {loaded['p99_us']:,.0f} µs vs "
            f"{base['p99_us']:,.0f} µs without the idle ones (ratio {ratio}); "
            f"errors {loaded['other']}, pmload exit {loaded['exit']}, "
            f"idle connections still open {scale['idle_still_open']:,}.",
        ]
    failed = [r for r in report.summary if r["failed_runs"]]
    if failed:
        lines += ["", "Runs with errors (pmload exit != 0 or no requests):", ""]
        lines += [
            f"- {r['implementation']} {r['table']} conns={r['conns']}: "
            f"{r['failed_runs']} of {r['runs']}"
            for r in failed
        ]
    if report.not_available:
        lines += ["", "Not available:", ""]
        lines += [f"- {what}: {why}" for what, why in sorted(report.not_available.items())]
    return "\n".join(lines) + "\n"


# The targets of the database workloads: (throughput ratio ours/C at least, p99 at most).
TARGETS = {
    "mysql-5ms": (5.0, 15_000.0),
    "pgsql-5ms": (5.0, 15_000.0),
    "mysql": (1.0, None),
    "pgsql": (1.0, None),
}


def target_verdict(kind: str, c: dict, ours: dict) -> str:
    """Whether a database row meets its target ('-' for a table without one)."""
    if kind not in TARGETS:
        return "-"
    ratio, p99_max = TARGETS[kind]
    wanted = f"≥ {ratio:g}x C" + (f", p99 ≤ {p99_max / 1000:g} ms" if p99_max else "")
    if not c.get("rps") or ours.get("rps") is None:
        return f"{wanted}: n/a"
    met = ours["rps"] >= ratio * c["rps"] and (
        p99_max is None or (ours.get("p99_us") or 0) <= p99_max
    )
    met = met and not ours.get("failed_runs") and not ours.get("db_over_bound")
    return f"{wanted}: {'met' if met else 'NOT met'}"


def database_markdown(report: Report, by_key: dict, conns: list[int]) -> list[str]:
    """The database rows: throughput, latency, and the connections each side held."""
    kinds = list(dict.fromkeys(r["table"] for r in report.summary if is_database_kind(r["table"])))
    if not kinds:
        return []
    limits = ", ".join(f"{kind} {limit}" for kind, limit in report.db_limits.items())
    source = "--db-pool" if report.options.get("db_pool") else "the defaults"
    lines = [
        "",
        "Database tables (private MariaDB / PostgreSQL / slapd, 10 000 rows, 20 % misses). "
        "DB conns: the most connections the server listed for each side during its runs "
        "(sampled 4 times per run: MariaDB PROCESSLIST and pg_stat_activity by user, "
        "slapd's established TCP connections, one slapd per side); bound: our workers x "
        f"pyproxymap_<type>_connections ({limits}: {source}). Ratios ours/C. "
        "Direct: the same queries from a C client (dbdirect.c, libmariadb / libpq), one "
        "connection per client and no proxy, as that many Postfix processes with a direct "
        "table would send them: the server's own throughput and latency at that load, "
        "measured between the two sides' runs.",
        "",
        "| table | conns | lookups/s C | ours | ratio | p50 ms C | ours | p99 ms C | ours "
        "| CPU µs/lookup C | ours | RSS MiB/worker C | ours | DB conns C | ours | bound ours "
        "| workers C | ours | target | direct lookups/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    empty: dict = {}
    for kind in kinds:
        for conn in conns:
            c = by_key.get((kind, conn, "c"), empty)
            o = by_key.get((kind, conn, "ours"), empty)
            d = by_key.get((kind, conn, "direct"), empty)
            if not c and not o:
                continue
            over = f" ({o['db_over_bound']} samples over)" if o.get("db_over_bound") else ""
            lines.append(
                f"| {kind} | {conn} | {_fmt(c.get('rps'))} | {_fmt(o.get('rps'))} "
                f"| {_ratio(o.get('rps'), c.get('rps'))} "
                f"| {_ms(c.get('p50_us'))} | {_ms(o.get('p50_us'))} "
                f"| {_ms(c.get('p99_us'))} | {_ms(o.get('p99_us'))} "
                f"| {_fmt(c.get('cpu_us_per_lookup'), 1)} | {_fmt(o.get('cpu_us_per_lookup'), 1)} "
                f"| {_fmt(c.get('rss_mib'), 1)} | {_fmt(o.get('rss_mib'), 1)} "
                f"| {_fmt(c.get('db_connections'))} | {_fmt(o.get('db_connections'))}{over} "
                f"| {_fmt(o.get('db_bound'))} "
                f"| {c.get('workers', 'n/a')} | {o.get('workers', 'n/a')} "
                f"| {target_verdict(kind, c, o)} "
                f"| {_fmt(d.get('rps'))} | {_ms(d.get('p50_us'))} | {_ms(d.get('p99_us'))} |"
            )
    return lines


def _ms(value_us) -> str:
    return "n/a" if value_us is None else f"{value_us / 1000:,.2f}"


def write_results(report: Report, directory: Path) -> Path:
    """Every sample and the summary into DIRECTORY/runs/ (kept out of git: a run's JSON is
    thousands of lines), the summary also into DIRECTORY/latest.md (the one committed)."""
    runs = directory / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    stamp = report.started.replace(":", "").replace("-", "")
    data = asdict(report)
    (runs / f"{stamp}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    text = markdown(report)
    (runs / f"{stamp}.md").write_text(text)
    (directory / "latest.md").write_text(text)
    return runs / f"{stamp}.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="1.5 s runs, one repeat, 1 and 16 connections"
    )
    parser.add_argument(
        "--tables",
        default=",".join(ALL_TABLES),
        help=f"comma-separated subset of {','.join(ALL_TABLES)}",
    )
    parser.add_argument("--conns", default="1,16,256", help="connection counts")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell (median)")
    parser.add_argument(
        "--v311", action="store_true", help="send the 3.11+ request form to our server"
    )
    parser.add_argument("--only", choices=IMPLEMENTATIONS, help="measure one implementation")
    parser.add_argument(
        "--ours",
        default=str(Path(sys.executable).parent / "proxymap"),
        help="our worker executable (default: the venv's proxymap script)",
    )
    parser.add_argument(
        "--results",
        default=str(RESULTS_DIR),
        help="where to write results (runs/ for every run's files, latest.md)",
    )
    parser.add_argument(
        "--slow-ms",
        type=float,
        default=5.0,
        help="delay of the socketmap backend (table kind socketmap)",
    )
    parser.add_argument(
        "--slow-conns", default="32", help="connection counts for the socketmap workload"
    )
    parser.add_argument(
        "--db-conns",
        default="1,16",
        help="connection counts for the mysql, pgsql and ldap workloads "
        "(the -5ms ones use --slow-conns)",
    )
    parser.add_argument(
        "--db-pool",
        type=int,
        default=0,
        metavar="N",
        help="pyproxymap_<type>_connections in our main.cf for the database "
        "tables (default: unset, the types' defaults)",
    )
    parser.add_argument(
        "--scale",
        type=int,
        default=0,
        metavar="IDLE",
        help="also run 256 active connections next to IDLE idle ones (ours)",
    )
    options = parser.parse_args(argv)
    if options.quick:
        options.seconds = min(options.seconds, 1.5)
        options.repeat = 1
        if options.conns == "1,16,256":
            options.conns = "1,16"
    options.tables = [t for t in options.tables.split(",") if t]
    options.conns = [int(c) for c in options.conns.split(",") if c]
    options.slow_conns = [int(c) for c in options.slow_conns.split(",") if c]
    options.db_conns = [int(c) for c in options.db_conns.split(",") if c]
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    if os.geteuid() != 0:
        print("the benchmark runs private Postfix masters and must run as root", file=sys.stderr)
        return 2
    report = run_benchmark(options)
    path = write_results(report, Path(options.results))
    print(markdown(report))
    print(f"results: {path} (and .json), {Path(options.results) / 'latest.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
