"""Live statistics inside one process: counting, timing, snapshots, reading them back.

The request handler serves real tables (a texthash file, socketmap servers run by the
test on its own event loop, one that answers after 40 ms, a closed port); the figures
it counts are checked exactly, the latencies within the histogram's resolution. The
snapshot files are written by the real ``Reporter`` into a directory of the test, read
back by ``master.stats``, which removes those of dead (and reused) pids.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from master import stats as reader
from master.multi_server import MultiServer
from proxymap import stats as writer
from proxymap.handler import OTHER_DENIED, RequestHandler
from proxymap.protocol import G1, G2, NOKEY, OK, RETRY, Reply, Request
from proxymap.server import ProxymapService

POSTMAP_FLAGS = 0x80041  # what a 3.7 postmap -q sends with its lookups
POSTMAP_Q = 540737  # instance_flags of a 3.12 postmap -q


@pytest.fixture
def aliases(tmp_path: Path) -> str:
    path = tmp_path / "aliases"
    path.write_text("alice alice@example.com\nbob bob@example.com\n")
    return f"texthash:{path}"


def lookup(key: str, table: str, generation: int = G1) -> Request:
    if generation == G2:
        return Request(
            "lookup", table, G2, flags=POSTMAP_Q, instance_flags=POSTMAP_Q, key=key.encode()
        )
    return Request("lookup", table, G1, flags=POSTMAP_FLAGS, key=key.encode())


def answer(handler: RequestHandler, request: Request):
    result = handler.handle(request)
    if result.__class__ is not Reply:
        result = asyncio.get_event_loop().run_until_complete(result)
    return result


# --- the histogram --------------------------------------------------------------------------
def test_percentiles_come_from_eighth_octave_buckets():
    latency = writer.Latency()
    for _ in range(98):
        latency.record(0.002)  # 2 ms
    latency.record(0.150)
    latency.record(0.300)
    stats = writer.TableStats("t")
    stats.latency = latency
    stats.lookups = 100
    figures = reader.aggregate([snapshot({"t": stats.figures()})])["proxymap"]["tables"]["t"]
    p50, p99, largest = (figures["latency"][name] for name in ("p50_ms", "p99_ms", "max_ms"))
    assert 2.0 <= p50 <= 2.0 * 2 ** (1 / 8)
    assert 150 <= p99 <= 150 * 2 ** (1 / 8)
    assert largest == 300.0
    assert figures["latency"]["samples"] == 100


def test_the_window_forgets_after_six_slots():
    latency = writer.Latency()
    latency.record(0.5)
    for _ in range(writer.SLOTS - 1):
        latency.rotate()
        latency.record(0.001)
    assert latency.figures()["max_ms"] == 500.0
    latency.rotate()  # the 0.5 s sample's slot leaves the window
    figures = latency.figures()
    assert figures["max_ms"] == 1.0 and figures["samples"] == writer.SLOTS - 1


def test_settings():
    assert writer.StatsSettings.from_params({}) == writer.StatsSettings(True, False, 0.1)
    settings = writer.StatsSettings.from_params(
        {
            "pyproxymap_statistics": "no",
            "pyproxymap_verbose_proctitle": "yes",
            "pyproxymap_slow_table_threshold": "250ms",
        }
    )
    assert settings == writer.StatsSettings(False, True, 0.25)
    assert writer.parse_milliseconds("2s") == 2.0
    assert writer.parse_milliseconds("40") == 0.04


# --- counting on every path --------------------------------------------------------------------
def test_fast_and_general_paths_count_the_same(aliases):
    handler = RequestHandler("proxymap", [aliases], {})
    for generation in (G1, G2):
        first = lookup("alice", aliases, generation)
        assert answer(handler, first).status == OK  # the general path
        compiled = handler.compile_lookup(first)
        assert compiled.__qualname__.startswith("_counted")
        for key in ("alice", "bob", "carol", "dave"):
            compiled(key.encode())  # the fast path
        assert answer(handler, lookup("erin", aliases, generation)).status == NOKEY
    stats = handler.statistics[aliases.removeprefix("proxy:")]
    assert (stats.lookups, stats.hits, stats.misses, stats.retry) == (12, 6, 6, 0)
    # Few lookups a second: every one is timed.
    assert stats.latency.figures()["samples"] == 12


def test_a_busy_local_table_is_sampled(aliases):
    handler = RequestHandler("proxymap", [aliases], {})
    request = lookup("alice", aliases)
    answer(handler, request)
    compiled = handler.compile_lookup(request)
    stats = handler.statistics[aliases]
    for _ in range(writer.SAMPLE_ALL_BELOW):
        compiled(b"alice")
    stats.tick()  # over 1000 lookups in the last second: 1 in 64
    before = stats.latency.figures()["samples"]
    for _ in range(64 * 10):
        compiled(b"alice")
    assert stats.latency.figures()["samples"] - before == 10
    assert stats.lookups == 1 + writer.SAMPLE_ALL_BELOW + 640 == stats.hits


def test_denied_bad_and_refused_writes(aliases):
    handler = RequestHandler("proxymap", [aliases], {})
    assert answer(handler, lookup("alice", "proxy:texthash:/nowhere")).status == 4  # DENY
    assert answer(handler, lookup("alice", "nocolon")).status == 3  # BAD
    update = Request("update", aliases, G1, flags=0x40, key=b"k", value=b"v")
    assert answer(handler, update).status == 4
    assert handler.statistics["texthash:/nowhere"].deny == 1
    assert handler.statistics[aliases].deny == 1
    assert handler.bad == 1


def test_denied_names_are_bounded(aliases):
    handler = RequestHandler("proxymap", [aliases], {})
    for number in range(100):
        answer(handler, lookup("k", f"texthash:/denied{number}"))
    assert len(handler.statistics) == 64 + 1
    assert handler.statistics[OTHER_DENIED].deny == 100 - 64


def test_statistics_off_leaves_the_fast_path_alone(aliases):
    handler = RequestHandler("proxymap", [aliases], {"pyproxymap_statistics": "no"})
    request = lookup("alice", aliases)
    assert answer(handler, request).status == OK
    assert handler.statistics is None
    assert not handler.compile_lookup(request).__qualname__.startswith("_counted")


# --- asynchronous tables: real socketmap servers ----------------------------------------------
async def socketmap_server(delay: float) -> tuple[asyncio.AbstractServer, int]:
    async def handle(reader_: asyncio.StreamReader, writer_: asyncio.StreamWriter) -> None:
        try:
            while True:
                length = await reader_.readuntil(b":")
                body = (await reader_.readexactly(int(length[:-1]) + 1))[:-1]
                key = body.split(b" ", 1)[1]
                await asyncio.sleep(delay)
                reply = b"NOTFOUND " if key.startswith(b"no") else b"OK " + key + b"@slow"
                writer_.write(b"%d:%s," % (len(reply), reply))
                await writer_.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer_.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_network_tables_are_timed_and_their_failures_counted(caplog):
    async def scenario():
        server, port = await socketmap_server(0.04)
        slow = f"socketmap:inet:127.0.0.1:{port}:m"
        dead = f"socketmap:inet:127.0.0.1:{closed_port()}:m"
        handler = RequestHandler(
            "proxymap",
            [slow, dead],
            {"pyproxymap_slow_table_threshold": "30ms", "pyproxymap_socketmap_timeout": "2"},
        )
        statuses = []
        for key in ("a", "b", "nothing", "c"):
            statuses.append((await handler.handle(lookup(key, slow))).status)
        for key in ("x", "y"):
            statuses.append((await handler.handle(lookup(key, dead))).status)
        server.close()
        return handler, slow, dead, statuses

    caplog.set_level(logging.WARNING, logger="proxymap")
    handler, slow, dead, statuses = asyncio.run(scenario())
    assert statuses == [OK, OK, NOKEY, OK, RETRY, RETRY]
    slow_figures = handler.statistics[slow].figures()
    assert (slow_figures["lookups"], slow_figures["hits"], slow_figures["misses"]) == (4, 3, 1)
    latency = slow_figures["latency"]
    assert latency["samples"] == 4 and latency["sampling"] == 1
    assert 40 <= latency["smoothed_ms"] < 400 and 40 <= latency["max_ms"] < 1000
    backend = slow_figures["backend"]
    assert backend["open"] == 1 and backend["limit"] == 16 and backend["down"] == []
    dead_figures = handler.statistics[dead].figures()
    assert (dead_figures["lookups"], dead_figures["retry"], dead_figures["hits"]) == (2, 2, 0)
    assert dead_figures["backend"]["open"] == 0
    assert [entry.split(":")[0:3] for entry in dead_figures["backend"]["down"]] == [
        ["inet", "127.0.0.1", dead.split(":")[3]]
    ]
    # The slow-table warning: once, then quiet (four slow lookups, one line).
    warnings = [r.getMessage() for r in caplog.records if "is slow" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"table {slow} is slow: smoothed lookup latency ")
    assert warnings[0].endswith("ms (pyproxymap_slow_table_threshold = 30ms)")


# --- snapshots --------------------------------------------------------------------------------
def snapshot(tables: dict, pid: int | None = None, **worker) -> dict:
    pid = os.getpid() if pid is None else pid
    return {
        "format": 1,
        "pid": pid,
        "start_ticks": reader.process_start_ticks(pid),
        "service": "proxymap",
        "generation": 1,
        "started": time.time() - 5,
        "written": time.time(),
        "last_request": time.time() - 2,
        "clients": 1,
        "in_flight": 0,
        "connections_served": 3,
        "max_use": 100,
        "max_idle": 100,
        "bad": 0,
        "window": 60,
        "tables": tables,
        **worker,
    }


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def server() -> MultiServer:
    server = MultiServer(ProxymapService(), ["proxymap", "-t", "unix"])
    server.max_use = 100
    return server


def test_the_reporter_writes_when_something_changed(tmp_path, aliases, server):
    handler = RequestHandler("proxymap", [aliases], {})
    directory = tmp_path / "stats"
    directory.mkdir()
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    reporter = writer.Reporter(server, handler, fd, writer.StatsSettings())
    reporter.update()
    path = directory / f"{os.getpid()}.json"
    first = json.loads(path.read_text())
    assert first["tables"] == {} and first["pid"] == os.getpid()
    assert first["start_ticks"] == reader.process_start_ticks(os.getpid())
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    written = path.stat().st_mtime_ns
    time.sleep(0.02)
    reporter.update()  # nothing changed: not rewritten
    assert path.stat().st_mtime_ns == written
    answer(handler, lookup("alice", aliases))
    answer(handler, lookup("nobody", aliases))
    reporter.update()
    document = json.loads(path.read_text())
    figures = document["tables"][aliases]
    assert (figures["lookups"], figures["hits"], figures["misses"]) == (2, 1, 1)
    assert "backend" not in figures
    assert document["last_request"] is not None
    [read] = reader.read_snapshots(str(directory))
    assert read == document
    reporter.close()
    assert not path.exists()
    os.close(fd)


def test_readers_drop_the_files_of_dead_and_reused_pids(tmp_path):
    directory = tmp_path / "stats"
    directory.mkdir()
    live = snapshot({"t": {"lookups": 5, "hits": 5}})
    gone = dead_pid()
    (directory / f"{os.getpid()}.json").write_text(json.dumps(live))
    (directory / f"{gone}.json").write_text(json.dumps(snapshot({}, pid=gone)))
    # Our own pid, but another process's start time: a pid the kernel gave out again.
    reused = snapshot({}, pid=os.getpid(), start_ticks=live["start_ticks"] - 1)
    (directory / "1.json").write_text(json.dumps({**reused, "pid": 1, "start_ticks": 0}))
    (directory / f".{gone}.tmp").write_text("{")
    old = time.time() - 3600
    os.utime(directory / f".{gone}.tmp", (old, old))
    (directory / "notes.txt").write_text("left alone")
    snapshots = reader.read_snapshots(str(directory))
    assert [doc["pid"] for doc in snapshots] == [os.getpid()]
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [f"{os.getpid()}.json", "notes.txt"]
    )


def test_aggregate_sums_workers_and_formats():
    one = snapshot(
        {
            "mysql:/m.cf": {
                "lookups": 10,
                "hits": 8,
                "misses": 1,
                "retry": 1,
                "config": 0,
                "deny": 0,
                "latency": {
                    "samples": 10,
                    "sampling": 1,
                    "max_ms": 3.0,
                    "smoothed_ms": 2.0,
                    "histogram": [[1000.0, 9], [2828.4, 1]],
                },
                "backend": {
                    "open": 2,
                    "in_use": 1,
                    "waiting": 0,
                    "limit": 8,
                    "connects": 3,
                    "failovers": 1,
                    "down": ["inet:db1:3306: refused"],
                },
                "cache": {
                    "hits": 3,
                    "misses": 1,
                    "coalesced": 0,
                    "stale": 0,
                    "evictions": 0,
                    "invalidations": 0,
                    "size": 1,
                },
            }
        }
    )
    two = snapshot(
        {
            "mysql:/m.cf": {
                "lookups": 30,
                "hits": 30,
                "misses": 0,
                "retry": 0,
                "config": 0,
                "deny": 0,
                "latency": {
                    "samples": 30,
                    "sampling": 1,
                    "max_ms": 1.0,
                    "smoothed_ms": 0.9,
                    "histogram": [[1000.0, 30]],
                },
                "backend": {
                    "open": 3,
                    "in_use": 0,
                    "waiting": 0,
                    "limit": 8,
                    "connects": 3,
                    "failovers": 0,
                    "down": [],
                },
            }
        },
        pid=os.getppid(),
    )
    services = reader.aggregate([one, two])
    table = services["proxymap"]["tables"]["mysql:/m.cf"]
    assert (table["lookups"], table["hits"], table["retry"], table["workers"]) == (40, 38, 1, 2)
    assert table["latency"]["p50_ms"] == 1.0 and table["latency"]["p99_ms"] == 2.828
    assert table["latency"]["max_ms"] == 3.0 and table["latency"]["smoothed_ms"] == 2.0
    assert table["backend"] == {
        "open": 5,
        "in_use": 1,
        "waiting": 0,
        "limit": 16,
        "connects": 6,
        "failovers": 1,
        "down": ["inet:db1:3306: refused"],
    }
    text = reader.format_statistics({"directory": "d", "services": services})
    assert "   40  95.0       1      1      0     0    1.00    2.83    3.00    5/16" in text
    assert "down: inet:db1:3306: refused" in text and "failovers: 1" in text
    assert "cache: hits 3, misses 1, coalesced 0, stale 0, evictions 0, size 1" in text
    assert "  3/100 " in text
    assert "no worker statistics" in reader.format_statistics({"directory": "d", "services": {}})


def test_the_directory_belongs_to_mail_owner(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("creating a directory for another user needs root")
    import pwd

    (tmp_path / "pid").mkdir()
    monkeypatch.chdir(tmp_path)
    old_umask = os.umask(0o077)  # the Postfix master's
    try:
        fd = writer.open_directory("postfix")
    finally:
        os.umask(old_umask)
    assert fd is not None
    os.close(fd)
    info = (tmp_path / reader.DIRECTORY).stat()
    assert info.st_uid == pwd.getpwnam("postfix").pw_uid
    assert oct(info.st_mode & 0o777) == "0o755"


def test_process_title_summary(aliases, server):
    handler = RequestHandler("proxymap", [aliases], {})
    answer(handler, lookup("alice", aliases))
    reporter = writer.Reporter(server, handler, None, writer.StatsSettings(proctitle=True))
    server.open_connections, server.connections_closed = 2, 17
    assert reporter.title() == "[2 clients, 0 busy, 1 lookups, 0 retry, 17/100 served]"


def test_cached_table_figures_in_the_snapshot(server):
    async def scenario():
        listener, port = await socketmap_server(0.01)
        spec = f"socketmap:inet:127.0.0.1:{port}:m"
        handler = RequestHandler("proxymap", [spec], {"pyproxymap_cache_maps": f"proxy:{spec}"})
        first = await handler.handle(lookup("alice", spec))
        second = handler.handle(lookup("alice", spec))  # a fresh entry: answered inline
        assert second.__class__ is Reply
        third = handler.compile_lookup(lookup("alice", spec))(b"alice")  # the fast path
        listener.close()
        return handler, spec, first, second, third

    handler, spec, first, second, third = asyncio.run(scenario())
    assert first.value == second.value == b"alice@slow" and b"alice@slow" in third
    figures = writer.Reporter(server, handler, None, writer.StatsSettings()).snapshot()
    table = figures["tables"][spec]
    assert (table["lookups"], table["hits"], table["latency"]["samples"]) == (3, 3, 1)
    assert table["cache"]["hits"] == 2 and table["cache"]["misses"] == 1
