"""Damaged table files and full file systems (issue 15, point 6).

A verify or postscreen cache left damaged (a full disk, a crash, an operator's
mistake) must not take the service down: the worker logs one error naming the file
and the remedy, answers RETRY for that table only, serves every other table, and
does not die (a worker that dies at every request makes the master throttle the
whole service). The requests go through the real request handler, as the worker
runs them; the tables are the real drivers on real files.
"""

from __future__ import annotations

import logging
import os
import random
import subprocess
import tempfile
from pathlib import Path

import pytest

from proxymap.handler import RequestHandler
from proxymap.protocol import G1, OK, RETRY, Request
from proxymap.tables import open_table
from proxymap.tables.base import OpenContext

SUFFIX = {"hash": ".db", "btree": ".db", "lmdb": ".lmdb"}
LOCK = 0x40


def build(spec: str, count: int = 2000) -> None:
    table = open_table(spec, os.O_RDWR | os.O_CREAT, 0, OpenContext())
    for index in range(count):
        table.update(b"key%d" % index, b"value%d" % index * 4)
    table.close()


def damage(path: Path, how: str) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as file:
        if how == "truncated":
            file.truncate(size // 2)
        elif how == "header":
            file.write(random.Random(7).randbytes(512))
        elif how == "garbled":
            rng = random.Random(11)
            for _ in range(24):
                file.seek(rng.randrange(4096, size))
                file.write(rng.randbytes(64))
        elif how == "empty":
            file.truncate(0)


def ask(handler: RequestHandler, op: str, table: str, key: bytes, value: bytes = b"") -> int:
    reply = handler.handle(Request(op, table, G1, flags=LOCK, key=key, value=value))
    return reply.status


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


DAMAGES = [
    # (type, damage, service): what a reader and a writer meet.
    *[
        (t, d, s)
        for t in ("hash", "btree", "lmdb")
        for d in ("truncated", "header")
        for s in ("proxymap", "proxywrite")
    ],
    # Garbled pages are found by the verifier, which runs for writers (the caches).
    ("hash", "garbled", "proxywrite"),
    ("btree", "garbled", "proxywrite"),
    ("hash", "empty", "proxymap"),
    ("btree", "empty", "proxymap"),
    ("lmdb", "empty", "proxymap"),
]


@pytest.mark.parametrize(("kind", "how", "service"), DAMAGES)
def test_damaged_file_is_one_error_and_retry_for_that_table_only(
    tmp_path, caplog, kind, how, service
):
    cache = f"{kind}:{tmp_path}/cache"
    healthy = f"btree:{tmp_path}/healthy"
    build(healthy, 10)
    build(cache)
    path = Path(f"{tmp_path}/cache{SUFFIX[kind]}")
    damage(path, how)
    handler = RequestHandler(service, {cache, healthy}, {})
    with caplog.at_level(logging.INFO, logger="proxymap"):
        for index in range(20):
            assert ask(handler, "lookup", cache, b"key%d" % index) == RETRY
            if service == "proxywrite":
                assert ask(handler, "update", cache, b"new%d" % index, b"v") == RETRY
            assert ask(handler, "lookup", healthy, b"key1") == OK
    logged = errors(caplog)
    assert len(logged) == 1, logged
    assert str(path) in logged[0]
    assert "remove it" in logged[0] and "postmap(1)" in logged[0]


@pytest.mark.parametrize("kind", ["hash", "btree", "lmdb"])
def test_removed_cache_is_recreated_by_the_next_worker(tmp_path, kind):
    """The README's remedy: remove the file; the next open (a new worker) creates it."""
    cache = f"{kind}:{tmp_path}/cache"
    build(cache)
    path = Path(f"{tmp_path}/cache{SUFFIX[kind]}")
    damage(path, "truncated")
    assert ask(RequestHandler("proxywrite", {cache}, {}), "update", cache, b"k", b"v") == RETRY
    path.unlink()
    fresh = RequestHandler("proxywrite", {cache}, {})
    assert ask(fresh, "update", cache, b"k", b"v") == OK
    assert ask(fresh, "lookup", cache, b"k") == OK


@pytest.fixture
def small_filesystem():
    """A tmpfs of 256 KiB (root only): what a full /var looks like to the cache."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = Path(tempfile.mkdtemp(prefix="pm-full-"))
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "pm-full", str(mount_point)],
        check=True,
    )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
        mount_point.rmdir()


@pytest.mark.parametrize("kind", ["hash", "btree", "lmdb"])
def test_full_filesystem_during_updates(small_filesystem, tmp_path, caplog, kind):
    cache = f"{kind}:{small_filesystem}/cache"
    healthy = f"btree:{tmp_path}/healthy"
    build(healthy, 10)
    filler = small_filesystem / "filler"
    filler.write_bytes(b"x" * 96 * 1024)  # what will be freed later
    params = {"lmdb_map_size": str(64 * 1024)}  # grows by doubling when full
    handler = RequestHandler("proxywrite", {cache, healthy}, params)
    statuses = []
    with caplog.at_level(logging.INFO, logger="proxymap"):
        for index in range(3000):
            statuses.append(ask(handler, "update", cache, b"key%05d" % index, b"v" * 100))
            if statuses[-20:] == [RETRY] * 20:
                break
        assert RETRY in statuses, "the file system never filled up"
        first_failure = statuses.index(RETRY)
        assert first_failure > 0
        # Other tables are served; what was stored before is still read back.
        assert ask(handler, "lookup", healthy, b"key1") == OK
        assert ask(handler, "lookup", cache, b"key00000") == OK
        full_errors = errors(caplog)
        assert len(full_errors) == 1, full_errors
        assert str(small_filesystem) in full_errors[0]
        assert "is full" in full_errors[0] and "free space" in full_errors[0]
        # Space comes back: updates succeed again, and that is said once.
        filler.unlink()
        assert ask(handler, "update", cache, b"after", b"v") == OK
        assert ask(handler, "lookup", cache, b"after") == OK
    assert any("accessible again" in r.getMessage() for r in caplog.records)
    assert len(errors(caplog)) == 1
    # A new worker opens what the full disk left behind without dying: either the
    # file is sound, or it is refused as damaged (RETRY, with the remedy).
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="proxymap"):
        status = ask(RequestHandler("proxywrite", {cache}, params), "lookup", cache, b"after")
    assert status in (OK, RETRY)
    if status == RETRY:
        assert "remove it" in " ".join(errors(caplog))
