"""Indexed tables keep a read's lock and freshness check for one event-loop turn.

On the worker's loop, the first read of a turn locks the file shared (when it must)
and checks that the handle shows the current file; the other reads of that turn reuse
both, and the lock is released when the turn ends. These tests run real loops (asyncio
and uvloop), real files built by the real postmap, and a second process that probes
the lock the way postmap takes it. Each ``await asyncio.sleep(0)`` ends a turn.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxymap import flags as F
from proxymap.tables import bdb, indexed
from proxymap.tables.base import DictRetry, LoopTurn, OpenContext
from tests.support.postmap import (
    CLIENT_LOOKUP_FLAGS,
    build_table,
    open_indexed,
    require_postmap,
    table_file,
)

pytestmark = pytest.mark.postfix

LOCKING_TYPES = ("hash", "btree", "lmdb")
LOCK_STYLE = {"hash": "flock", "btree": "flock", "lmdb": "lockf"}

# Answers "busy" or "free" for each line it reads: whether an exclusive lock of the
# file (postmap's, in the table type's style) can be taken right now.
LOCK_PROBE = """import fcntl, os, sys
lock = fcntl.flock if sys.argv[2] == "flock" else fcntl.lockf
fd = os.open(sys.argv[1], os.O_RDWR)
for _line in sys.stdin:
    try:
        lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print("busy", flush=True)
    else:
        lock(fd, fcntl.LOCK_UN)
        print("free", flush=True)
"""


def _loop_factories() -> list[Any]:
    factories: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
    except ImportError:
        return factories
    return [*factories, pytest.param(uvloop.new_event_loop, id="uvloop")]


@pytest.fixture(params=_loop_factories())
def run_on_loop(request) -> Iterator[Callable[[Callable[[], Coroutine[Any, Any, None]]], None]]:
    """Run a scenario coroutine on a fresh loop of each kind the worker may use."""
    loop = request.param()

    def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
        loop.run_until_complete(asyncio.wait_for(scenario(), 60))

    yield run
    loop.close()


@pytest.fixture(autouse=True)
def trusted_stamps(monkeypatch) -> None:
    # A rebuild must be noticed by its stamps, not by distrust of a fresh file.
    monkeypatch.setattr(indexed, "RACY_WINDOW_NS", 0)


class LockProbe:
    """A second process that tries the writer's lock on request."""

    def __init__(self, path: Path, style: str) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", LOCK_PROBE, str(path), style],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def state(self) -> str:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write("?\n")
        self._process.stdin.flush()
        return self._process.stdout.readline().strip()

    def close(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()
        self._process.wait(10)


@pytest.fixture
def probes() -> Iterator[Callable[[str, str], LockProbe]]:
    made: list[LockProbe] = []

    def probe(spec: str, dict_type: str) -> LockProbe:
        made.append(LockProbe(table_file(spec), LOCK_STYLE[dict_type]))
        return made[-1]

    yield probe
    for probe_process in made:
        probe_process.close()


def open_for_turns(spec: str, open_mode: int = os.O_RDONLY) -> tuple[Any, LoopTurn]:
    turn = LoopTurn()
    table = open_indexed(spec, open_mode, ctx=OpenContext(turn=turn))
    return table, turn


def lookup(table, key: bytes, flags: int = CLIENT_LOOKUP_FLAGS) -> bytes | None:
    """What the 3.7 handler does: the request's flag bits, then the lookup."""
    table.flags = (table.flags & ~F.RQST_MASK) | (flags & F.RQST_MASK)
    return table.lookup(key)


async def released_when_the_turn_ends(probe: LockProbe) -> None:
    """The lock is held now and gone once the turn in progress has ended."""
    assert probe.state() == "busy"
    await asyncio.sleep(0)  # the turn ends
    assert probe.state() == "free"


@pytest.mark.parametrize("dict_type", LOCKING_TYPES)
def test_the_lock_is_kept_for_the_turn_and_released_when_it_ends(
    tmp_path, dict_type, run_on_loop, probes
):
    require_postmap()
    spec = build_table(dict_type, tmp_path / "t", [("k", "one"), ("j", "two")])
    table, turn = open_for_turns(spec)
    probe = probes(spec, dict_type)

    async def scenario() -> None:
        turn.attach(asyncio.get_running_loop())
        assert probe.state() == "free"
        assert lookup(table, b"k") == b"one"
        assert probe.state() == "busy"  # the turn keeps the shared lock
        assert lookup(table, b"j") == b"two"
        assert lookup(table, b"missing") is None
        await released_when_the_turn_ends(probe)
        assert lookup(table, b"j") == b"two"  # the next turn locks again
        await released_when_the_turn_ends(probe)

    run_on_loop(scenario)


@pytest.mark.parametrize("dict_type", LOCKING_TYPES)
def test_a_writer_waits_for_the_turn_and_the_next_turn_sees_its_file(
    tmp_path, dict_type, run_on_loop
):
    """postmap, blocked on its exclusive lock during a turn, gets it when the turn
    ends; the answers of that turn are the old file's, those of the next the new's."""
    require_postmap()
    source = tmp_path / "t"
    spec = build_table(dict_type, source, [("k", "one")])
    table, turn = open_for_turns(spec)
    failures: list[BaseException] = []

    def rebuild() -> None:
        try:
            build_table(dict_type, source, [("k", "two")])
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)

    writer = threading.Thread(target=rebuild)

    async def scenario() -> None:
        turn.attach(asyncio.get_running_loop())
        assert lookup(table, b"k") == b"one"
        writer.start()
        writer.join(0.5)  # the loop is busy: still the same turn
        assert writer.is_alive(), "postmap rebuilt the file in the middle of a turn"
        assert lookup(table, b"k") == b"one"
        while writer.is_alive():  # later turns: the lock is free between them
            await asyncio.sleep(0.01)
        assert not failures, failures
        assert lookup(table, b"k") == b"two"

    run_on_loop(scenario)


def test_an_unlocked_turn_reuses_its_check_until_the_turn_ends(tmp_path, run_on_loop):
    """cdb takes no lock: a file replaced in the middle of a turn is noticed by the
    next turn (the old file, still mapped, answered consistently until then)."""
    require_postmap()
    source = tmp_path / "t"
    spec = build_table("cdb", source, [("k", "one")])
    table, turn = open_for_turns(spec)

    async def scenario() -> None:
        turn.attach(asyncio.get_running_loop())
        assert lookup(table, b"k") == b"one"
        build_table("cdb", source, [("k", "two")])  # NAME.cdb.tmp, renamed over NAME.cdb
        assert lookup(table, b"k") == b"one"
        await asyncio.sleep(0)
        assert lookup(table, b"k") == b"two"

    run_on_loop(scenario)


def test_a_lock_asked_for_later_in_a_turn_is_taken_then(tmp_path, run_on_loop, probes):
    """A turn that checked lmdb without LOCK locks when a request with LOCK comes."""
    require_postmap()
    spec = build_table("lmdb", tmp_path / "t", [("k", "one")])
    table, turn = open_for_turns(spec)
    probe = probes(spec, "lmdb")

    async def scenario() -> None:
        turn.attach(asyncio.get_running_loop())
        assert lookup(table, b"k", CLIENT_LOOKUP_FLAGS & ~F.LOCK) == b"one"
        assert probe.state() == "free"
        assert lookup(table, b"k") == b"one"
        await released_when_the_turn_ends(probe)

    run_on_loop(scenario)


@pytest.mark.parametrize("dict_type", LOCKING_TYPES)
def test_reads_off_the_loop_and_writable_tables_release_at_once(
    tmp_path, dict_type, run_on_loop, probes
):
    require_postmap()
    spec = build_table(dict_type, tmp_path / "t", [("k", "one")])
    reader, reader_turn = open_for_turns(spec)
    probe = probes(spec, dict_type)

    async def attach() -> None:
        reader_turn.attach(asyncio.get_running_loop())

    run_on_loop(attach)
    # The loop is attached but not running (-S, the self-check): nothing is deferred.
    assert lookup(reader, b"k") == b"one"
    assert probe.state() == "free"
    reader.close()

    writer, writer_turn = open_for_turns(spec, os.O_RDWR | os.O_CREAT)

    async def scenario() -> None:
        writer_turn.attach(asyncio.get_running_loop())
        assert lookup(writer, b"k") == b"one"
        assert probe.state() == "free"  # proxywrite locks per access
        writer.flags |= F.SYNC_UPDATE | F.DUP_REPLACE
        assert writer.update(b"k", b"new") == 0
        assert probe.state() == "free"
        assert lookup(writer, b"k") == b"new"

    run_on_loop(scenario)
    writer.close()


@pytest.mark.parametrize("dict_type", LOCKING_TYPES)
def test_a_read_on_another_thread_while_the_loop_runs_releases_at_once(
    tmp_path, dict_type, run_on_loop, probes
):
    """A blocking executor's thread is not the loop's turn: its access locks and
    releases as it always did (the loop's thread is told apart without asking asyncio
    for the running loop, a getpid() system call on Python 3.11)."""
    require_postmap()
    spec = build_table(dict_type, tmp_path / "t", [("k", "one")])
    table, turn = open_for_turns(spec)
    probe = probes(spec, dict_type)

    def read_and_look() -> tuple[bytes | None, str]:
        value = lookup(table, b"k")
        return value, probe.state()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        turn.attach(loop)
        assert await loop.run_in_executor(None, read_and_look) == (b"one", "free")
        assert lookup(table, b"k") == b"one"  # on the loop's thread: kept for the turn
        assert probe.state() == "busy"

    run_on_loop(scenario)
    table.close()


@pytest.mark.parametrize("dict_type", LOCKING_TYPES)
def test_closing_a_table_in_a_turn_releases_its_lock(tmp_path, dict_type, run_on_loop, probes):
    require_postmap()
    spec = build_table(dict_type, tmp_path / "t", [("k", "one")])
    table, turn = open_for_turns(spec)
    probe = probes(spec, dict_type)

    async def scenario() -> None:
        turn.attach(asyncio.get_running_loop())
        assert lookup(table, b"k") == b"one"
        assert probe.state() == "busy"
        table.close()
        assert probe.state() == "free"
        await asyncio.sleep(0)  # the end of the turn finds nothing left to release
        assert probe.state() == "free"

    run_on_loop(scenario)


@pytest.mark.parametrize("dict_type", LOCKING_TYPES)
def test_a_walk_in_a_turn_shares_the_turns_lock(tmp_path, dict_type, run_on_loop, probes):
    """sequence reads in the same turn: it must neither drop the turn's lock (lockf
    locks belong to the process, one unlock drops them all) nor take another."""
    require_postmap()
    spec = build_table(dict_type, tmp_path / "t", [("k", "one"), ("j", "two")])
    table, turn = open_for_turns(spec)
    probe = probes(spec, dict_type)

    async def scenario() -> None:
        turn.attach(asyncio.get_running_loop())
        assert lookup(table, b"k") == b"one"
        walked = [table.sequence(0), table.sequence(1), table.sequence(1)]
        assert sorted(item for item in walked if item) == [(b"j", b"two"), (b"k", b"one")]
        await released_when_the_turn_ends(probe)

    run_on_loop(scenario)


# --- the Berkeley DB reader's fast path ----------------------------------------------------


def test_a_library_error_from_the_direct_getter_is_retry_logged_once(tmp_path, caplog):
    """lookup calls DB.get itself: a Berkeley DB error there is a temporary failure
    with the file's name, logged once, as one from the driver's own wrapper is."""
    require_postmap()
    spec = build_table("hash", tmp_path / "t", [("k", "one")])
    table, _turn = open_for_turns(spec)
    assert lookup(table, b"k") == b"one"
    table._handle.close()  # the library now refuses every call on the handle
    for _ in range(2):
        with pytest.raises(DictRetry, match=f"error reading {table.path}: "):
            lookup(table, b"k")
    assert caplog.text.count(f"error reading {table.path}") == 1


@pytest.mark.parametrize("entries", [5_000, 40_000])
def test_a_reader_cache_holds_its_file_up_to_the_limit(tmp_path, entries):
    """Readers get a cache of at least their file's size (no pread per lookup), up to
    READER_CACHE_LIMIT; a writer keeps berkeley_db_read_buffer_size."""
    require_postmap()
    spec = build_table(
        "hash", tmp_path / "t", [(f"user{n}@example.com", "x") for n in range(entries)]
    )
    size = table_file(spec).stat().st_size
    reader = open_indexed(spec)
    writer = open_indexed(spec, os.O_RDWR)
    _, reader_bytes, _ = reader._handle.get_cachesize()
    _, writer_bytes, _ = writer._handle.get_cachesize()
    assert reader_bytes >= min(size, bdb.READER_CACHE_LIMIT)
    assert reader_bytes < bdb.READER_CACHE_LIMIT * 2
    assert writer_bytes < min(size, bdb.READER_CACHE_LIMIT)
    reader.close()
    writer.close()
